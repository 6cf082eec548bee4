"""A real several-node Slurm on one machine for the tests: munged, slurmctld and one slurmd per node.

Debian's ``slurm-wlm`` and ``munge`` (``tools/install.sh test`` installs them). Everything lives
under one directory: the munge key and socket, ``slurm.conf`` (``SLURM_CONF`` points every client
command at it), state and spool dirs, daemon logs. The daemons run in the foreground as children
of this process, so they are stopped by their PIDs, never by name.

Nodes: ``slurmd -N <name>`` once per node, each node its own ``Port`` (all slurmd bind every
address) and its own loopback address (``127.<a>.<b>.<i>``: all of 127/8 is the loopback
interface on Linux). The names resolve the way a cluster's do, through ``/etc/hosts``: the cluster
adds one line per node, tagged with its root directory, and removes exactly those lines when it
stops (or, after a crash, the next cluster removes lines whose root is gone). The names carry a
random tag, so clusters of concurrent sessions never share a name. Processes started for a node
(its tasks, torchrun, the ranks) see ``SLURMD_NODENAME``; the machine's hostname stays the same.

Why these settings: ``proctrack/linuxproc`` and ``task/none`` need no cgroups (containers and
gVisor have none to delegate); ``select/cons_tres`` is what GPU clusters use; ``SlurmdParameters=
config_overrides`` lets each node declare at least 2 CPUs on a 1-core runner; ``JobRequeue=1`` and
``--requeue`` in the scripts make ``scontrol requeue`` legal; ``SlurmdTimeout`` is short so a lost
node is marked DOWN within seconds (tests/slurm/test_multinode.py).
"""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
PARTITION = "ci"
HOSTS = Path("/etc/hosts")
_HOSTS_TAG = "# mkd-local-slurm "

CONF = """\
ClusterName=mkdci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd.%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
MessageTimeout=60
SlurmdTimeout=10
{nodes}
PartitionName={partition} Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmMissing(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]
    return [b for b in BINARIES if not any(Path(d, b).is_file() for d in dirs)]


def _which(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hosts_edit(keep) -> None:
    """Rewrite /etc/hosts in place (it may be a bind mount: no rename) keeping the lines for which
    keep(line) is true, under an exclusive lock (concurrent clusters edit it too)."""
    with open(HOSTS, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = f.read().splitlines(keepends=True)
        kept = [l for l in lines if keep(l)]
        if kept != lines:
            f.seek(0)
            f.write("".join(kept))
            f.truncate()


def _hosts_add(lines: list[str]) -> None:
    with open(HOSTS, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("".join(lines))


def _stale_or(root: Path):
    """keep() for _hosts_edit: drop this root's lines and those of clusters whose root is gone."""
    def keep(line: str) -> bool:
        if _HOSTS_TAG not in line:
            return True
        owner = line.split(_HOSTS_TAG, 1)[1].strip()
        return owner != str(root) and Path(owner).exists()
    return keep


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = max(2, cpus or os.cpu_count() or 1)  # per node
        self.conf = self.root / "slurm.conf"
        tag = "".join(random.choices("abcdefghijkmnpqrstuvwxyz", k=4))
        self.nodes = [f"mkd{tag}n{i}" for i in range(1, nodes + 1)]
        net = f"127.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
        self.addr = {n: f"{net}.{i}" for i, n in enumerate(self.nodes, 1)}
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._hosts_added = False

    @property
    def nodelist(self) -> str:
        """The nodes as Slurm writes a list: ``mkdabcdn[1-2]``."""
        prefix = self.nodes[0][:-1]
        return f"{prefix}[1-{len(self.nodes)}]" if len(self.nodes) > 1 else self.nodes[0]

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> "LocalSlurm":
        missing = missing_binaries()
        if missing:
            raise SlurmMissing(
                f"Slurm/munge binaries not found: {', '.join(missing)}; the Slurm tests need Debian's "
                "packages: apt-get install -y slurm-wlm munge openmpi-bin (`bash tools/install.sh test` installs them)")
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} Port={_free_port()} "
                          f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(CONF.format(
            host=socket.gethostname().split(".")[0], nodes=nodes, nodelist=",".join(self.nodes),
            root=self.root, partition=PARTITION, ctld_port=_free_port()))
        try:
            _hosts_edit(_stale_or(self.root))
            _hosts_add([f"{self.addr[n]} {n} {_HOSTS_TAG}{self.root}\n" for n in self.nodes])
            self._hosts_added = True
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--key-file={key}", f"--socket={self.root}/munge/munge.socket",
                                   f"--pid-file={self.root}/run/munged.pid",
                                   f"--seed-file={self.root}/munge/munged.seed",
                                   f"--log-file={self.root}/log/munged.log"])
            self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), 20, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                self.start_node(n)
            self._wait(self._all_idle, timeout, f"nodes {self.nodelist} idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node: str) -> None:
        """(Re)start one node's slurmd: on the spool it left, as a rebooted node would."""
        self._spawn(f"slurmd.{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])

    def job_pids(self, job_id: int, node: str | None = None) -> list[int]:
        """job_pids() of this cluster's job."""
        return job_pids(job_id, node, self.conf)

    def node_processes(self, node: str, job_id: int | None = None) -> list[int]:
        """What dies with a lost node: its slurmd, the slurmstepd it started and (with
        ``job_id``) that job's tasks on it (torchrun, the ranks, a rank's forked writers). Not
        the ranks' other helpers (watchdog, the checkpoint writer's spawn child, the resource
        tracker): on a machine that stays up they must not outlive their rank by themselves."""
        pids = [self.procs[f"slurmd.{node}"].pid] + self.stepd_pids(node)
        if job_id is not None:
            pids += [p for p in job_pids(job_id, node, self.conf)
                     if {b"megatron_kd.cli", b"torch.distributed.run"} & set(_cmd(p))]
        return pids

    def kill_node(self, node: str, pids: list[int]) -> None:
        """Lose a node: SIGKILL ``pids`` (node_processes(), listed beforehand) at once."""
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self.procs[f"slurmd.{node}"]
        proc.wait(timeout=15)
        proc._mkd_killed = True

    def stepd_pids(self, node: str) -> list[int]:
        """This node's slurmstepd processes: each binds a unix socket in its node's spool dir."""
        spool = str(self.root / "spool" / f"slurmd.{node}") + "/"
        return [int(d.name) for d in Path("/proc").iterdir()
                if d.name.isdigit() and _cmd(int(d.name))[0].startswith(b"slurmstepd")
                and spool in _unix_paths(int(d.name))]

    def stop(self) -> None:
        """Cancel this cluster's jobs (a failed test may leave one running: its slurmstepd and
        batch script would outlive slurmd), then SIGTERM each daemon by PID (slurmd first) and
        SIGKILL whatever is left; remove this cluster's /etc/hosts lines."""
        try:
            ctld = self.procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                try:
                    jobs = self.cmd("squeue", "-h", "-o", "%i", check=False, timeout=30).stdout.split()
                    if jobs:
                        self.cmd("scancel", "--full", "--signal=KILL", *jobs, check=False, timeout=30)
                        self.cmd("scancel", *jobs, check=False, timeout=30)
                        # idle again = slurmd has ended every step process (squeue forgets sooner)
                        self._wait(self._all_idle, 60, "nodes idle after scancel")
                except (subprocess.TimeoutExpired, RuntimeError):
                    pass  # stopping the daemons below still happens
            order = [k for k in self.procs if k.startswith("slurmd.")] + ["slurmctld", "munged"]
            for name in order:
                proc = self.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
            # a slurmstepd whose slurmd is gone (a test that failed mid-fault)
            for node in self.nodes:
                for pid in self.stepd_pids(node):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        finally:
            if self._hosts_added:
                _hosts_edit(_stale_or(self.root))
                self._hosts_added = False
            for log in self._logs:
                log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --------------------------------------------------------------- helpers
    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) with SLURM_CONF set to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def cmd(self, *args: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env(env), cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}\n"
                               f"{self.daemon_logs()}")
        return p

    def job(self, job_id: int, attempts: int = 10) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...).

        Retried: on a heavily loaded box an RPC can fail once (slurmctld busy, SIGPIPE).
        """
        for attempt in range(attempts):
            p = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=attempt == attempts - 1)
            if p.returncode == 0:
                break
            time.sleep(1)
        out = p.stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait_job(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                                                            "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.cmd("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")
            time.sleep(0.2)

    def daemon_logs(self, n: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", *(f"slurmd.{node}.log" for node in self.nodes), "munged.log"):
            p = self.root / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def node_states(self) -> dict:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        return dict(l.split() for l in p.stdout.splitlines() if len(l.split()) == 2) if p.returncode == 0 else {}

    def _all_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None and not getattr(proc, "_mkd_killed", False):
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.daemon_logs()}")
        states = self.node_states()
        alive = [n for n in self.nodes if self.procs.get(f"slurmd.{n}") and self.procs[f"slurmd.{n}"].poll() is None]
        return all(states.get(n) == "idle" for n in alive)  # a killed node never gets there

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"local Slurm: {what} not reached in {timeout:.0f}s\n{self.daemon_logs()}")


# ------------------------------------------------------------------ /proc
def _cmd(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return [b""]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _unix_paths(pid: int) -> str:
    """Paths of the unix sockets a process has bound (a slurmstepd binds one in its node's spool)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return ""
    return " ".join(l.split()[-1] for l in lines if len(l.split()) >= 8 and l.split()[6] in inodes)


def job_pids(job_id: int, node: str | None = None, conf: Path | None = None) -> list[int]:
    """Every live process whose environment names this job (and, given, this node and this
    cluster's slurm.conf: job ids repeat across clusters): the batch script, srun, torchrun, the
    ranks and whatever they started (watchdogs, checkpoint writers)."""
    want = {f"SLURM_JOB_ID={job_id}".encode()}
    if conf is not None:
        want.add(f"SLURM_CONF={conf}".encode())
    if node is not None:
        want.add(f"SLURMD_NODENAME={node}".encode())
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid() and want <= set(_environ(int(d.name))):
            out.append(int(d.name))
    return sorted(out)
