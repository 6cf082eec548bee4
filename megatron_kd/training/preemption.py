"""Stop a run cleanly on a signal: checkpoint after the current step, exit with ``EXIT_PREEMPTED``.

Why: Slurm warns a job before its time limit (``sbatch --signal``; the scripts in ``slurm/`` ask
for SIGUSR1) and sends SIGTERM on preemption or ``scancel``. Killing a rank mid-step loses
everything since the last periodic checkpoint; stopping at a step boundary loses nothing, and the
requeued job continues bit-for-bit from that checkpoint.

How, and why this way:

* Slurm signals *every* process of a job step, not only the ranks: also the helper processes a
  rank starts (megatron-core's checkpoint writer runs a ``multiprocessing`` manager; data loader
  workers). A helper dies of SIGUSR1/SIGTERM (a handler does not survive ``exec``), and a rank
  whose writer died cannot save. So the signals are *blocked* in the rank's main thread: blocked
  masks are inherited across fork and exec, so every thread and process started afterwards is
  immune, and the rank collects the pending signal itself at the next step boundary
  (``sigpending`` + ``sigtimedwait``, no asynchronous handler code at all). A handler that only
  records the signal is installed too, for a thread that existed before and left it unblocked.
* All ranks must stop after the *same* step (Slurm signals nodes one at a time; torchrun forwards
  SIGTERM to its own workers only): each rank contributes its flag to one MAX all-reduce of one
  int32 over the world group per step, microseconds next to a step. Megatron-LM's
  ``--exit-signal-handler`` makes the same trade with an all-gather. The training loop folds this
  flag into the non-finite check's all-reduce (nonfinite.py ``StepCheck``: still one collective
  per step) and asks :meth:`StopOnSignal.requested_here` for the local flag.
"""
from __future__ import annotations

import signal
import threading
from typing import Iterable, Optional

import torch

from megatron_kd import platform

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": the sbatch scripts
# requeue the job on this code and on no other.
EXIT_PREEMPTED = 75
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
# Linux has sigtimedwait; elsewhere (macOS) only the recording handler is used.
_CAN_POLL = hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")


def parse_signal(name) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    text = str(name).strip().upper()
    try:
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (expected e.g. SIGUSR1, SIGTERM)") from None


class StopOnSignal:
    """Context manager: while active, the given signals request a stop instead of killing.

    ``stop_requested()`` is collective: every rank of the world group must call it at the same
    point of every step (the training loop does, once per step). With no signals it is a no-op
    and does not communicate.
    """

    def __init__(self, signals: Iterable = ()):
        self.signals = [parse_signal(s) for s in signals]
        self.received: Optional[signal.Signals] = None
        self._previous: dict = {}
        self._old_mask: set = set()
        self._flag: Optional[torch.Tensor] = None

    def __enter__(self) -> "StopOnSignal":
        if not self.signals:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal: signal handlers can only be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
            signal.siginterrupt(sig, False)  # a thread that takes it: restart its syscall, no EINTR
        if _CAN_POLL:
            self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        return self

    def __exit__(self, *exc) -> None:
        if not self.signals:
            return
        if _CAN_POLL:
            self._collect_pending()  # before unblocking: nothing is delivered to the old handlers
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def _collect_pending(self) -> None:
        while set(self.signals) & signal.sigpending():
            info = signal.sigtimedwait(self.signals, 0)
            if info is None:
                break
            self._handle(info.si_signo, None)

    def requested_here(self) -> bool:
        """Whether this rank has received one of the signals (local, no communication)."""
        if self.signals and _CAN_POLL:
            self._collect_pending()
        return self.received is not None

    def stop_requested(self) -> bool:
        """True on every rank iff any rank has received one of the signals (collective)."""
        if not self.signals:
            return False
        here = self.requested_here()
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.int32, device=platform.device())
        self._flag.fill_(int(here))
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX)
        return bool(self._flag.item())

    def describe(self) -> str:
        """What stopped the run, for the log ('SIGUSR1', or 'a signal on another rank')."""
        return self.received.name if self.received is not None else "a signal on another rank"
