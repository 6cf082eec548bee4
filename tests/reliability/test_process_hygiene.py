"""Process hygiene (issue 19, item 4), with real processes: torchrun, TP=2, two workers.

(a) SIGKILL of the launcher alone: every worker and every helper is gone within 15 s (before
    megatron_kd/watchdog.py both workers trained on, writing checkpoints: 2 of 5 and 3 of 3
    tries when the issue was filed, 2 of 2 here).
(b) SIGKILL of one worker after a checkpoint save: its helpers (its watchdog; megatron-core's
    spawn manager and Python's resource tracker before platform._patch_checkpoint_results_queue)
    are gone within 15 s.
(c) SIGSTOP of one worker with parallel.distributed_timeout_minutes=0.25: every rank exits
    non-zero within the timeout + 30 s, and the log names the stopped rank.

Each run saves at every step, so the checkpoint writer's helpers exist when the fault lands.
"""
from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

import multirank_util as mr

TIMEOUT_MIN = 0.25
LEFT_BEHIND_S = 15


def _launch(tiny_recipe, tmp_path, *extra):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    cmd = mr.train_cmd(tiny_recipe, run_dir, 2,
                       ["train.train_iters=100", "train.eval_interval=0", "checkpoint.save_interval=1",
                        "parallel.tensor_model_parallel_size=2",
                        f"parallel.distributed_timeout_minutes={TIMEOUT_MIN}", *extra], ["--overwrite"])
    proc = mr.start(cmd, log=log)
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    mr.wait_for(lambda: latest.exists(), proc, mr.TIMEOUT, "first checkpoint saved", log)
    return proc, run_dir, log


def _workers(launcher: psutil.Process) -> dict:
    """rank -> the worker process (torchrun's children that carry RANK)."""
    out = {}
    for child in launcher.children():
        rank = child.environ().get("RANK")
        if rank is not None:
            out[int(rank)] = child
    return out


def _helpers(worker: psutil.Process) -> list:
    return worker.children(recursive=True)


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs, seconds: float) -> float:
    """Seconds until every process is gone; fails naming the survivors after ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if all(_gone(p) for p in procs):
            return time.monotonic() - t0
        time.sleep(0.05)
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in procs if not _gone(p)]
    pytest.fail(f"alive {seconds} s after the fault:\n" + "\n".join(left))


def _kill_all(procs) -> None:
    """Test hygiene: whatever a failed test left running."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _describe(procs) -> str:
    return " | ".join(" ".join(p.cmdline())[-60:] for p in procs)


def _in_run_dir(run_dir) -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in a for a in p.info["cmdline"] or ()) and not _gone(p):
            out.append(p)
    return out


def test_plain_process_starts_no_watchdog():
    """A process no launcher started (tests, the demo's in-process train()) is left as it is."""
    from megatron_kd import watchdog
    from megatron_kd.distributed import discover

    info = discover({})
    assert info.launcher == "single"
    before = psutil.Process().children()
    assert watchdog.start(info, 10) is False
    assert psutil.Process().children() == before and watchdog._started is None


def test_distributed_timeout_minutes_is_a_checked_key():
    from megatron_kd.config import ConfigError, load_config

    assert load_config(None, []).parallel.distributed_timeout_minutes == 10  # Megatron-LM's default
    assert load_config(None, ["parallel.distributed_timeout_minutes=0.25"]).parallel.distributed_timeout_minutes == 0.25
    with pytest.raises(ConfigError, match=r"parallel\.distributed_timeout_minutes: expected a number of minutes > 0"):
        load_config(None, ["parallel.distributed_timeout_minutes=0"])


def test_kill_checks_the_start_time_against_pid_reuse(tmp_path):
    from megatron_kd import watchdog

    child = psutil.Popen(["sleep", "30"])
    try:
        start = watchdog._stat(child.pid)[3]
        assert watchdog._kill(child.pid, start + 1) is False  # another process under the same pid
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        assert watchdog._kill(child.pid, start) is True
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        _kill_all([child])


def test_launcher_sigkill_leaves_no_worker_or_helper(tiny_recipe, tmp_path):
    proc, run_dir, log = _launch(tiny_recipe, tmp_path)
    launcher = psutil.Process(proc.pid)
    tree = launcher.children(recursive=True)
    try:
        ranks = _workers(launcher)
        assert sorted(ranks) == [0, 1], _describe(tree)
        cmdlines = [" ".join(p.cmdline()) for p in tree]
        assert sum("megatron_kd/watchdog.py" in c for c in cmdlines) == 2, cmdlines
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers lead sessions of their own
        took = _wait_gone(tree, LEFT_BEHIND_S)
        assert not _in_run_dir(run_dir)
    finally:
        _kill_all(tree)
        mr.kill_group(proc)
    print(f"launcher SIGKILLed: its {len(tree)} descendants gone after {took:.2f} s")
    assert len(re.findall(r"the launcher \(pid \d+\) died: killing rank", log.read_text())) == 2


def test_rank_sigkill_leaves_no_helper(tiny_recipe, tmp_path):
    proc, run_dir, log = _launch(tiny_recipe, tmp_path)
    launcher = psutil.Process(proc.pid)
    tree = launcher.children(recursive=True)
    try:
        rank1 = _workers(launcher)[1]
        helpers = _helpers(rank1)
        cmdlines = [" ".join(p.cmdline()) for p in helpers]
        # megatron-core's checkpoint writer no longer leaves a spawn Manager (and its resource
        # tracker) running: platform._patch_checkpoint_results_queue. The rank's watchdog remains.
        assert not any("multiprocessing.spawn import spawn_main" in c for c in cmdlines), cmdlines
        assert any("megatron_kd/watchdog.py" in c for c in cmdlines), cmdlines
        rank1.kill()
        took = _wait_gone(helpers, LEFT_BEHIND_S)
        # torchrun ends rank 0 (SIGTERM to its group); rank 0's watchdog ends its helpers
        took_all = _wait_gone(tree, LEFT_BEHIND_S)
        assert proc.wait(timeout=LEFT_BEHIND_S) != 0
        assert not _in_run_dir(run_dir)
    finally:
        _kill_all(tree)
        mr.kill_group(proc)
    print(f"rank 1 SIGKILLed: its {len(helpers)} helpers gone after {took:.2f} s, "
          f"the whole tree after {took_all:.2f} s")


def test_frozen_rank_is_named_and_every_rank_exits(tiny_recipe, tmp_path):
    proc, run_dir, log = _launch(tiny_recipe, tmp_path)
    launcher = psutil.Process(proc.pid)
    tree = launcher.children(recursive=True)
    try:
        ranks = _workers(launcher)
        ranks[0].suspend()  # SIGSTOP
        t0 = time.monotonic()
        rc = proc.wait(timeout=TIMEOUT_MIN * 60 + 30)
        took = time.monotonic() - t0
        took_all = _wait_gone(tree, 5)
    finally:
        _kill_all(tree)
        mr.kill_group(proc)
    text = log.read_text()
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", text)
    assert rc != 0 and codes and "0" not in codes, mr.tail(text)
    assert not _in_run_dir(run_dir)
    # the surviving rank names the silent one; rank 0's watchdog says why it ended it
    named = re.search(r"\[rank 1\] failed \(\w+\); heartbeats: rank 0 is silent: no heartbeat for "
                      r"([\d.]+) s", text)
    assert named, mr.tail(text)
    assert re.search(r"\[watchdog rank 0\] rank 0 \(pid \d+\) is frozen \(stopped\)", text), mr.tail(text)
    print(f"rank 0 SIGSTOPped: named by rank 1 after {named.group(1)} s without a heartbeat, launcher "
          f"exit {rc} after {took:.1f} s, every process gone after {took + took_all:.1f} s "
          f"(collective timeout {TIMEOUT_MIN * 60:.0f} s)")
