"""preemption.StopOnSignal in one process: what a signal does while the context is active.

The multi-rank agreement (one rank signalled, all stop after the same step) and the resume are
tested with real processes in tests/multirank/test_preemption.py and tests/slurm/.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_kd.training import preemption
from megatron_kd.training.preemption import StopOnSignal


def _blocked(pid: int) -> set:
    """Signals blocked in a process's main thread (SigBlk in /proc/<pid>/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {signal.Signals(n) for n in range(1, 64) if mask >> (n - 1) & 1 and n in signal.Signals._value2member_map_}
    raise AssertionError("no SigBlk line")


def _eventually(predicate, timeout=5.0):
    """Signal delivery to oneself is not synchronous everywhere (gVisor): poll briefly."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_no_signals_is_inert():
    before = signal.getsignal(signal.SIGUSR1)
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGUSR1) is before
        assert stop.stop_requested() is False


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_requests_a_stop_instead_of_killing(sig):
    with StopOnSignal(preemption.DEFAULT_SIGNALS) as stop:
        assert stop.stop_requested() is False
        os.kill(os.getpid(), sig)  # default action of both: terminate this process
        assert _eventually(stop.stop_requested)
        assert stop.describe() == sig.name
        assert stop.stop_requested() is True  # stays requested


def test_handlers_and_mask_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with StopOnSignal(["USR1", "SIGTERM"]):
        assert {signal.SIGUSR1, signal.SIGTERM} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
    assert {s: signal.getsignal(s) for s in before} == before


def test_signal_arriving_after_the_last_step_is_absorbed():
    # a signal that lands after the final check is collected on exit, not delivered to the
    # restored default disposition (which would kill the process)
    with StopOnSignal(["SIGUSR1"]) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        # pending (blocked in every thread) or already recorded by the handler (a thread that
        # existed before the context took it)
        assert _eventually(lambda: stop.received or signal.SIGUSR1 in signal.sigpending())
    assert stop.received == signal.SIGUSR1


def test_processes_started_inside_are_immune():
    """Slurm signals every process of a step: a helper started by a rank (checkpoint writer,
    data worker) must survive SIGUSR1/SIGTERM, so that the rank can still save."""
    code = "import time; time.sleep(30)"
    with StopOnSignal(preemption.DEFAULT_SIGNALS):
        child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not {signal.SIGUSR1, signal.SIGTERM} <= _blocked(child.pid):
            assert time.monotonic() < deadline, _blocked(child.pid)
            time.sleep(0.05)
        child.send_signal(signal.SIGUSR1)
        child.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=1)
    finally:
        child.kill()
        child.wait()
    # outside the context a child dies of it as usual
    child = subprocess.Popen([sys.executable, "-c", code])
    child.send_signal(signal.SIGUSR1)
    assert child.wait(timeout=30) == -signal.SIGUSR1


def test_unknown_signal_name():
    with pytest.raises(ValueError, match="SIGNOPE"):
        StopOnSignal(["SIGNOPE"])
