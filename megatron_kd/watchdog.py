"""Process hygiene for launched ranks: none outlives its launcher, no helper outlives its rank, and
a frozen rank is ended and named.

Faults, as measured before this module (torchrun, TP=2, two workers on the CPU):

* SIGKILL of the launcher left both workers training and writing checkpoints with nobody
  watching (torchrun starts each worker in a session of its own, so nothing reaches them).
* A rank's helpers outlive it: megatron-core's checkpoint writer starts a ``spawn`` manager
  (``multiprocessing.spawn.spawn_main``) and with it Python's ``resource_tracker``, and forks one
  writer per bucket during each save. After SIGKILL of the rank they are orphans (parent pid 1).
* A frozen rank (SIGSTOP, a stuck kernel call) cannot act on the SIGTERM a launcher sends after
  its peers failed; torchrun escalates to SIGKILL only 30 s later, Slurm after ``srun --wait``.

Design: each rank started by a launcher (torchrun / srun / mpirun; never a plain process, so
tests and the in-process demo are untouched; Linux only) starts one tiny **watchdog process**
and two **heartbeat threads**:

* The watchdog (this file run as a script: stdlib only, no torch, ~10 ms to start; it ignores
  the catchable signals a launcher or Slurm sends to a whole group or step, so it outlives the
  rank) polls four times a second. When the rank's parent changes (the launcher died: the rank
  was reparented), it SIGKILLs the rank and the rank's descendants. When its own parent changes
  (the rank died), it SIGKILLs what the rank left. When the rank sent no heartbeat for the
  collective timeout + 5 s (frozen: its peers have failed and named it by then, and it cannot
  act on the launcher's SIGTERM), it names the rank and SIGKILLs it and its helpers; a rank
  under a debugger (``TracerPid``) is left alone. Then it exits.
* What the rank left: its descendants, remembered while it lives (a /proc scan every second: an
  orphan no longer shows whose it was), their descendants, and everything in the rank's session
  when the rank leads one (torchrun's workers do, so a helper forked in the last second is
  caught too; srun's tasks share a process group led by the node's first task, so groups are
  never used). Each process is identified by pid *and* start time and signalled through a
  pidfd, so a reused pid is never hit. Python's resource tracker gets 5 s to exit by itself
  first (on the end of its pipe it unlinks the semaphores the dead left behind).
* One thread writes a byte to the watchdog's pipe every second; the other publishes
  (time, iteration, pid, host) to the job's c10d store (``megatron_kd/heartbeat/<attempt>/
  <rank>``; torchrun's agent holds it, rank 0 under srun/mpirun). A rank that dies of an uncaught
  exception (a collective that timed out, or "connection closed by peer" once a frozen peer was
  ended) reads every rank's heartbeat and names the ranks whose heartbeat is stale: gloo's
  timeout error does not say which peer went silent.

Why not the alternatives: ``prctl(PR_SET_PDEATHSIG)`` in the rank covers only the launcher's
death (and fires on the death of the *thread* that forked the rank), never the rank's own
helpers after the rank is SIGKILLed, since the setting is not inherited across fork; a thread
polling ``os.getppid()`` dies with its rank for the same reason. Only a separate process that
outlives the rank covers both. nvidia-resiliency-ext 0.4.1 (the newest release the registry
here serves, for any Python) installs and runs on the CPU with gloo, but its ft_launcher is a torchrun replacement whose
workers and rank monitors survived a SIGKILL of the launcher as torchrun's did (measured), and
its cleanup of multiprocessing helpers sends SIGTERM, which the resource tracker ignores.

The ``exec`` in slurm/common.sh's ``bash -c`` wrappers matters: the rank's parent must be the
launcher itself for its death to be seen.
"""
from __future__ import annotations

import os
import signal
import sys
import time

HEARTBEAT_S = 1.0  # the rank's heartbeat period
STALE_S = 5.0  # a heartbeat older than this names its rank as silent (cross-host clocks: NTP)
FROZEN_MARGIN_S = 5.0  # after the collective timeout: the peers report first, then the kill
_TICK_S = 0.25  # the watchdog's poll period
_SCAN_S = 1.0  # its /proc scan period (descendants)
_TRACKER_GRACE_S = 5.0  # resource trackers clean up after the dead before they are killed
_KEY = "megatron_kd/heartbeat/{attempt}/{rank}"
# signals a launcher or Slurm sends to a whole process group or job step: the watchdog must
# outlive the rank to clean up after it, and it exits by itself once the rank is gone
_IGNORED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGPIPE")


# ------------------------------------------------------------------ /proc (watchdog side)
def _stat(pid: int):
    """(state, ppid, session id, start time in clock ticks) of a live process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19])


def _scan() -> dict:
    """pid -> (state, ppid, session id, start) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _descendants(table: dict, roots) -> set:
    children: dict = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _name(cmdline: str) -> str:
    if "multiprocessing.resource_tracker" in cmdline:
        return "resource tracker"
    if "multiprocessing.spawn" in cmdline:
        return "multiprocessing spawn child"
    return cmdline[:60] or "?"


def _traced(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(l.startswith("TracerPid:") and l.split()[1] != "0" for l in f)
    except OSError:
        return False


def _kill(pid: int, start: int) -> bool:
    """SIGKILL pid if it is still the process that started at ``start`` (pid reuse)."""
    try:  # a pidfd pins the process: a start time read after opening it is its own
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds (old kernel): check, then kill by pid
        fd = None
    try:
        st = _stat(pid)
        if st is None or st[3] != start:
            return False
        if fd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[3] == start and st[0] not in ("Z", "X")


class _Watchdog:
    def __init__(self, rank: int, rank_pid: int, launcher_pid: int, frozen_after: float, beat_fd: int):
        self.rank, self.rank_pid, self.launcher_pid = rank, rank_pid, launcher_pid
        self.frozen_after, self.beat_fd = frozen_after, beat_fd
        st = _stat(rank_pid)
        self.rank_start = st[3] if st else -1
        self.rank_sid = st[2] if st else -1
        self.known: dict = {}  # pid -> start time of every descendant of the rank seen alive

    def log(self, msg: str) -> None:
        try:
            print(f"[watchdog rank {self.rank}] {msg}", file=sys.stderr, flush=True)
        except OSError:
            # stderr is a pipe to the launcher, which may be what died (a lost node's slurmstepd):
            # a BrokenPipeError here ended the watchdog before it killed anything, and the rank's
            # spawn child and resource tracker outlived it (tests/slurm/test_multinode.py)
            pass

    def remember(self, table: dict) -> None:
        me = os.getpid()
        for pid in _descendants(table, [self.rank_pid]):
            if pid != me:
                self.known[pid] = table[pid][3]
        self.known = {p: s for p, s in self.known.items() if p in table and table[p][3] == s}

    def victims(self) -> dict:
        """What the rank left: remembered descendants, their descendants now, and everything in
        the rank's session when the rank leads one (torchrun's workers do): only the rank's
        descendants can be in it, orphaned or not. Not the process group: srun puts a node's
        tasks in one group, led by its first task."""
        table = _scan()
        self.remember(table)  # known: only the processes still alive in this table
        me = os.getpid()
        found = dict(self.known)
        for pid in _descendants(table, list(found) + [self.rank_pid]):
            found[pid] = table[pid][3]
        if self.rank_sid == self.rank_pid:
            for pid, (_, _, sid, start) in table.items():
                if sid == self.rank_sid and start >= self.rank_start:
                    found[pid] = start
        found.pop(me, None)
        found.pop(self.rank_pid, None)
        return {p: s for p, s in found.items() if p in table and table[p][0] not in ("Z", "X")}

    def end(self, kill_rank: bool) -> list:
        """SIGKILL the rank (when asked) and what it left; wait until they are gone. Returns what
        had to be killed (a resource tracker that leaves by itself within its grace is not)."""
        victims = self.victims()
        if kill_rank:
            _kill(self.rank_pid, self.rank_start)
        names = {p: _name(_cmdline(p)) for p in victims}
        trackers = {p for p, name in names.items() if name == "resource tracker"}
        killed = [names[p] for p, start in victims.items() if p not in trackers and _kill(p, start)]
        deadline = time.monotonic() + _TRACKER_GRACE_S
        while time.monotonic() < deadline and any(_alive(p, victims[p]) for p in trackers):
            time.sleep(0.05)
        killed += [names[p] for p in trackers if _kill(p, victims[p])]
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in victims.items()):
            time.sleep(0.05)
        return killed

    def run(self) -> int:
        last_beat = last_tick = time.monotonic()
        last_scan = 0.0
        while True:
            now = time.monotonic()
            if now - last_tick > 10 * _TICK_S:  # we were stopped ourselves (e.g. a suspended job)
                last_beat = now
            last_tick = now
            try:
                if os.read(self.beat_fd, 4096):
                    last_beat = now
            except BlockingIOError:
                pass
            if os.getppid() != self.rank_pid:
                killed = self.end(kill_rank=False)
                if killed:
                    self.log(f"rank {self.rank} (pid {self.rank_pid}) is gone: killed what it left "
                             f"running: {', '.join(killed)}")
                return 0
            st = _stat(self.rank_pid)
            if st is not None and st[1] != self.launcher_pid:
                self.log(f"the launcher (pid {self.launcher_pid}) died: killing rank {self.rank} "
                         f"(pid {self.rank_pid}) and its helpers")
                self.end(kill_rank=True)
                return 0
            silent = now - last_beat
            if st is not None and silent > self.frozen_after and not _traced(self.rank_pid):
                state = {"T": "stopped", "D": "in an uninterruptible wait"}.get(st[0], f"state {st[0]}")
                self.log(f"rank {self.rank} (pid {self.rank_pid}) is frozen ({state}): no heartbeat "
                         f"for {silent:.1f} s (collective timeout + {FROZEN_MARGIN_S:.0f} s): killing "
                         f"it and its helpers")
                self.end(kill_rank=True)
                return 0
            if now - last_scan >= _SCAN_S:
                self.remember(_scan())
                last_scan = now
            time.sleep(_TICK_S)


def _watchdog_main(argv) -> int:
    for name in _IGNORED:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # started with them blocked (see start())
    rank, rank_pid, launcher_pid, beat_fd = (int(a) for a in argv[:4])
    os.set_blocking(beat_fd, False)
    return _Watchdog(rank, rank_pid, launcher_pid, float(argv[4]), beat_fd).run()


# ------------------------------------------------------------------ rank side
_started = None  # the rank's (info, watchdog Popen), once started
_iteration = 0
_store_beat = None  # (stop Event, thread) of the store heartbeat, once started


def progress(iteration: int) -> None:
    """The training loop's step counter, published with the next heartbeat."""
    global _iteration
    _iteration = iteration


def _attempt() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def _store(info, timeout_s: float):
    """A client of the job's c10d store (torchrun's agent, or rank 0 under srun/mpirun)."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(info.master_addr, info.master_port, is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _beat_watchdog(beat_fd: int) -> None:
    while True:
        try:
            os.write(beat_fd, b".")
        except BlockingIOError:  # the watchdog is stopped too: its pipe is full
            pass
        except OSError:  # the watchdog is gone
            return
        time.sleep(HEARTBEAT_S)


def _beat_store(info, stop) -> None:
    """Apart from the pipe beat: a store that is not up yet (srun: rank 0 starts it) or stopped
    blocks a call for up to its timeout, and the watchdog must not take that for a frozen rank."""
    import socket

    # Slurm's node name where there is one: the name a user finds in sinfo and the node list
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    key, store = _KEY.format(attempt=_attempt(), rank=info.rank), None
    while not stop.is_set():
        try:
            if store is None:
                store = _store(info, 30.0)
            store.set(key, f"{time.time():.3f} {_iteration} {os.getpid()} {host}")
        except Exception:  # the store is not up yet, or gone: the pipe beat goes on
            store = None
        stop.wait(HEARTBEAT_S)
    del store  # the client closes in this thread, before the process group goes


def stop_store_heartbeat(timeout_s: float = 5.0) -> None:
    """End the store heartbeat thread before the process group (and, under srun / mpirun, the
    store server in rank 0) is destroyed, and at exit: a daemon thread still inside a TCPStore
    call when the interpreter finalises aborts the process ("terminate called without an active
    exception", exit 134 instead of the run's own code; 1 of 6 toy runs did here)."""
    global _store_beat
    if _store_beat is None:
        return
    stop, thread = _store_beat
    _store_beat = None
    stop.set()
    # a beat takes milliseconds; a thread stuck on a dead store (a failing run) is not waited for
    thread.join(timeout_s)


def silent_ranks(info=None, timeout_s: float = 5.0) -> str:
    """One line naming the ranks whose heartbeat is stale (or missing), from the c10d store."""
    info = info or (_started[0] if _started else None)
    if info is None:
        return "no heartbeats (not a launched multi-rank run)"
    try:
        store = _store(info, timeout_s)
        now, silent, seen = time.time(), [], 0
        for rank in range(info.world_size):
            if _started and rank == _started[0].rank:
                seen += 1  # the reporting rank is alive; it may just have been stopped a while
                continue
            key = _KEY.format(attempt=_attempt(), rank=rank)
            if not store.check([key]):
                silent.append(f"rank {rank} never sent a heartbeat")
                continue
            t, it, pid, host = store.get(key).decode().split(" ", 3)
            seen += 1
            if now - float(t) > STALE_S:
                silent.append(f"rank {rank} is silent: no heartbeat for {now - float(t):.1f} s "
                              f"(last at iteration {it}, pid {pid} on {host})")
    except Exception as e:
        return (f"heartbeats unreadable: the c10d store at {info.master_addr}:{info.master_port} "
                f"did not answer in {timeout_s:.0f} s ({type(e).__name__}); under srun/mpirun it "
                "lives in rank 0, which is then the likely silent rank")
    return "; ".join(silent) if silent else f"all {seen} ranks' heartbeats are current: no rank is silent"


def _excepthook_with_heartbeats(previous):
    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        if _started and _started[0].world_size > 1 and not issubclass(exc_type, KeyboardInterrupt):
            rank = _started[0].rank
            report = silent_ranks()
            if report.endswith("no rank is silent"):
                # a peer that died a moment ago (its socket closed: "connection closed by peer")
                # still has a current heartbeat; once it is STALE_S old the dead one is named
                time.sleep(STALE_S + HEARTBEAT_S)
                report = silent_ranks()
            print(f"[rank {rank}] failed ({exc_type.__name__}); heartbeats: {report}",
                  file=sys.stderr, flush=True)
    return hook


def start(info, timeout_minutes: float) -> bool:
    """In a launched rank (``info.launcher`` is not "single"): start the watchdog process and the
    heartbeat thread, once per process. Returns whether they run."""
    global _started
    if _started is not None or info.launcher == "single" or not sys.platform.startswith("linux"):
        return _started is not None  # /proc and pidfds: Linux
    import atexit
    import subprocess
    import threading

    read_fd, beat_fd = os.pipe()
    os.set_blocking(beat_fd, False)  # a stopped watchdog must never block the rank
    frozen_after = timeout_minutes * 60 + FROZEN_MARGIN_S
    # Blocked across the start (the mask is inherited across fork and exec): a group-wide
    # SIGTERM in the watchdog's first milliseconds, before it ignores the signals, is held.
    sigs = {getattr(signal, n) for n in _IGNORED}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", os.path.abspath(__file__), str(info.rank), str(os.getpid()),
             str(os.getppid()), str(read_fd), repr(frozen_after)],
            pass_fds=(read_fd,), stdin=subprocess.DEVNULL, cwd="/")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(read_fd)
    _started = (info, proc)
    threading.Thread(target=_beat_watchdog, args=(beat_fd,), daemon=True,
                     name="megatron_kd-heartbeat-watchdog").start()
    global _store_beat
    stop = threading.Event()
    _store_beat = (stop, threading.Thread(target=_beat_store, args=(info, stop), daemon=True,
                                          name="megatron_kd-heartbeat-store"))
    _store_beat[1].start()
    atexit.register(stop_store_heartbeat)  # before finalisation freezes daemon threads
    return True


def install_failure_report() -> None:
    """After torch.distributed's own excepthook (it prefixes lines with the rank): a rank that
    dies of an exception names the silent ranks last, where a reader of the log looks."""
    if _started is not None:
        sys.excepthook = _excepthook_with_heartbeats(sys.excepthook)


if __name__ == "__main__":
    sys.exit(_watchdog_main(sys.argv[1:]))
