"""Refuse an optimizer step whose loss or gradient norm is not finite, on every rank alike.

Why: without a check a run with a NaN loss goes on, applies NaN updates, writes checkpoints of
NaN weights (the ``latest`` pointer moves onto them) and exits 0; every later resume starts from
garbage. Megatron-LM checks by default (``--check-for-nan-in-loss-and-grad``); here
``train.check_for_nan_in_loss_and_grad`` (default on) does the same, before the update.

Where the decision sits: megatron-core 0.16's ``optimizer.step()`` is ``prepare_grads()`` (main
grads ready; fp16's own overflow check) -> grad norm -> clip -> ``step_with_ready_grads()``.
:meth:`StepCheck.step` makes the same calls through the optimizer's public methods and decides
between the norm and the update, so a refused step leaves weights, Adam moments and the
scheduler untouched. The one piece spelled out rather than called is the clip by the known norm
(``clip_grad_by_total_norm_fp32`` per chained optimizer, what ``ChainedOptimizer.step`` does):
the optimizer has no public "clip by this norm", and ``clip_grad_norm()`` would compute the norm
a second time. The norm is computed whatever ``train.clip_grad`` is (the chained optimizer that
``get_megatron_optimizer`` returns always computes it; a single optimizer would skip it at
``clip_grad=0``). Rejected: megatron-core's ``DDPConfig.check_for_nan_in_grad`` checks each rank's
buckets before the gradient reduction and raises on that rank alone through the rerun state
machine: no agreement, so the other ranks would hang in their next collective, and it does not
see the loss; wrapping ``optimizer.step()`` with instance hooks would hide the control flow.

Agreement: the loss is checked where it exists (this rank's local loss sums, last pipeline
stage, before ``reduce_losses`` mixes ranks), the norm everywhere. Each rank's two flags ride in
the int32 MAX all-reduce over the world group that the stop signal already needs once per step
(preemption.py): three ints, one collective, so all ranks skip or stop after the same step. With
the check off and no stop signals nothing is communicated. Only when a step is refused does a
second collective (an all-gather, the run is about to skip or end) say which ranks saw what.

A refused step follows megatron's ``update_ok=False`` convention: the iteration and its batch
count, the scheduler does not advance, ``skipped`` in the metrics counts it. Up to
``train.skip_nonfinite_steps`` refusals per run segment (not persisted across a resume) are
skipped; the next one ends the run: no checkpoint at or after that step (not even the end-of-run
save), a one-line message on stderr, ``logs/diverged.txt`` holding the same line, and exit
``EXIT_NONFINITE`` on every rank (cli.py). slurm/common.sh never requeues it: the same data
would diverge again from the same checkpoint.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_kd import platform

# sysexits.h EX_DATAERR: not a temporary failure (75 is), so launchers and the sbatch scripts
# stop instead of retrying; distinct from 1 (a crash) and 2 (bad input).
EXIT_NONFINITE = 65
# <run dir>/logs/<this>: the failing rank-0 line, for a launcher that hides exit codes (torchrun
# exits 1 whatever its workers returned; slurm/common.sh reads this file).
DIVERGED_MARKER = "diverged.txt"


class NonFiniteError(RuntimeError):
    """The run refused a non-finite step and had no skips left (raised on every rank)."""

    def __init__(self, message: str, iteration: int, rank: int):
        super().__init__(message)
        self.iteration = iteration
        self.rank = rank  # this process's world rank: the CLI prints the line on rank 0 only


@dataclass
class Verdict:
    """What all ranks agreed on for one step."""

    stop: bool = False  # a stop signal reached some rank (preemption.py)
    loss: bool = False  # some rank's local loss sums are not finite
    grad_norm: bool = False  # the global grad norm is not finite

    @property
    def nonfinite(self) -> bool:
        return self.loss or self.grad_norm


def local_loss_nonfinite(losses: list) -> Optional[float]:
    """The first non-finite value among this rank's per-micro-batch ``{name: [sum, count]}``
    reports (the loss function's), else None (also off the last pipeline stage: no reports)."""
    values = [v.detach().float().flatten() for report in losses if isinstance(report, dict)
              for v in report.values() if torch.is_tensor(v)]
    if not values:
        return None
    values = torch.cat(values)
    bad = values[~torch.isfinite(values)]  # one host sync per step
    return bad[0].item() if bad.numel() else None


def clip_by_norm(optimizer, grad_norm: float) -> None:
    """Clip every chained optimizer's main grads by the already computed global norm, as
    ``ChainedOptimizer.step`` does (through the module, so platform.py's CPU path is used)."""
    from megatron.core.optimizer import clip_grads

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


class StepCheck:
    """The per-step agreement (stop signal + non-finite flags) and the checked optimizer step.

    ``step()`` is collective: every rank calls it once per training step. ``verdict`` holds the
    last step's agreement; ``describe()`` (collective too, only after a non-finite verdict)
    names the quantities and ranks.
    """

    def __init__(self, stop, check: bool):
        self.stop = stop
        self.check = check
        self.verdict = Verdict()
        self._local = (None, None)  # (non-finite local loss value, grad norm) of the last step
        self._flags: Optional[torch.Tensor] = None

    def agree(self, loss_bad: bool = False, norm_bad: bool = False) -> Verdict:
        """One MAX all-reduce of [stop, loss, grad norm] over the world group; no communication
        when there is nothing to agree on (check off, no stop signals) or one rank."""
        stop_here = self.stop.requested_here()
        if not self.check and not self.stop.signals:
            return Verdict()
        if self._flags is None:
            self._flags = torch.zeros(3, dtype=torch.int32, device=platform.device())
        flags = self._flags
        flags[0], flags[1], flags[2] = int(stop_here), int(loss_bad), int(norm_bad)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, loss, norm = (bool(x) for x in flags.tolist())
        return Verdict(stop=stop, loss=loss, grad_norm=norm)

    @torch.no_grad()
    def step(self, optimizer, losses: list) -> tuple:
        """``optimizer.step()`` with the agreement between the grad norm and the update.

        Returns ``(update applied, grad norm)``; the agreement is in ``self.verdict``."""
        if not self.check:
            self.verdict = self.agree()  # the stop flag alone (nothing without signals)
            update_ok, grad_norm, _ = optimizer.step()
            return update_ok, grad_norm
        found_inf = optimizer.prepare_grads()  # True only with fp16 loss scaling: megatron's skip
        grad_norm = None if found_inf else optimizer.get_grad_norm()
        loss_value = local_loss_nonfinite(losses)
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm)
        self._local = (loss_value, grad_norm)
        self.verdict = self.agree(loss_value is not None, norm_bad)
        if found_inf or self.verdict.nonfinite:
            return False, grad_norm
        clip_by_norm(optimizer, grad_norm)
        return optimizer.step_with_ready_grads(), grad_norm

    def describe(self) -> str:
        """"loss nan on rank 0; grad norm nan on all 2 ranks" for the last (refused) step.
        Collective: an all-gather of each rank's two flags and values."""
        loss_value, grad_norm = self._local
        mine = torch.tensor([loss_value is not None, loss_value if loss_value is not None else 0.0,
                             grad_norm is not None and not math.isfinite(grad_norm),
                             grad_norm if grad_norm is not None else 0.0],
                            dtype=torch.float64, device=platform.device())
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rows = [mine]
        if world > 1:
            rows = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(rows, mine)
        rows = [r.tolist() for r in rows]
        parts = []
        for name, flag, value in (("loss", 0, 1), ("grad norm", 2, 3)):
            ranks = [r for r, row in enumerate(rows) if row[flag]]
            if ranks:
                parts.append(f"{name} {_value(rows[ranks[0]][value])} on {format_ranks(ranks, world)}")
        return "; ".join(parts) or "non-finite value"


def _value(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:g}"


def format_ranks(ranks: list, world: int, limit: int = 8) -> str:
    if len(ranks) == world and world > 1:
        return f"all {world} ranks"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ",".join(str(r) for r in ranks[:limit])
    return f"ranks {shown}" + (f",... ({len(ranks)} of {world})" if len(ranks) > limit else "")


class LossSpikeMonitor:
    """Warn when a logged loss exceeds ``factor`` x the median of the last ``window`` logged
    finite losses (the spike a non-finite check cannot see: the run goes on, but a loss that
    jumps several-fold in one step usually means a bad batch or an lr too high). Only finite
    losses enter the window; at least ``min_history`` of them before any warning."""

    def __init__(self, factor: float, window: int = 50, min_history: int = 5):
        self.factor = factor
        self.min_history = min_history
        self.recent: deque = deque(maxlen=window)

    def observe(self, iteration: int, loss: float) -> Optional[str]:
        """The warning line for this logged loss, or None."""
        if not math.isfinite(loss):
            return None
        line = None
        if len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                line = (f"warning: loss spike at iteration {iteration}: loss {loss:.4f} > "
                        f"{self.factor:g} x running median {median:.4f} (last {len(self.recent)} "
                        f"logged losses; train.loss_spike_factor)")
        self.recent.append(loss)
        return line
