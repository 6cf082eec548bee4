"""Skipped position ids: a sample of the original length L that *looks like* a window of T > L.

Short-to-long distillation feeds the student a sample of L tokens whose position ids are spread
over the extended window [0, T): a **head** keeping its positions 0..h-1, a contiguous **middle**
block moved somewhere in between, and a **tail** ending at T-1 -- so the student meets the large
relative distances of the long window on text the teacher (which sees 0..L-1) knows well.
(PoSE/CREAM-style position skipping; LongReD §3.3.)

Two placements of the middle block:

* ``uniform``: its last position uniform in [L - t, T - t - 1] (LongReD-U);
* ``cream``: CREAM's truncated Gaussian: a factor r in [2, 2T/L] drawn from N(1 + T/L, 5)
  truncated to that range (floored to an integer, as the reference does), then the middle's end
  uniform in [h + (m-1) r/2, r L/2 - t - 1]: the middle concentrates around the centre of the
  window, where "lost in the middle" says the model needs the most practice (LongReD-C).

Head/tail lengths default to CREAM's rule: with probability 1/2 each is L//3, else 4 T/L
(capped at L//3 so the middle keeps at least one token).

Everything is a function of (seed, sample index): the same global sample gets the same
positions under any TP/PP/DP layout and after a resume. Hand-written (a few lines of integer
arithmetic) because no maintained library exposes it; the reference code is read, not copied.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

PLACEMENTS = ("uniform", "cream")
_CREAM_SIGMA = 5.0


def _generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    # one stream per (seed, sample): independent of how samples are batched or sharded
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7_919 + 17) % (2**63 - 1))
    return g


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def _truncated_normal_int(mu: float, sigma: float, lo: int, hi: int, g: torch.Generator) -> int:
    """floor(x), x ~ N(mu, sigma) truncated to [lo, hi] (inverse CDF on the truncated range)."""
    cdf = lambda x: 0.5 * (1.0 + math.erf((x - mu) / (sigma * math.sqrt(2.0))))  # noqa: E731
    a, b = cdf(lo), cdf(hi)
    u = a + (b - a) * float(torch.rand((), generator=g, dtype=torch.float64))
    u = min(max(u, 1e-12), 1 - 1e-12)
    x = mu + sigma * math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * u - 1, dtype=torch.float64)).item()
    return int(min(max(math.floor(x), lo), hi))


def head_tail_lengths(length: int, target: int, g: torch.Generator,
                      head: Optional[int] = None, tail: Optional[int] = None) -> tuple[int, int]:
    """CREAM's rule where not given: both L//3, or both 4*T/L (coin flip), capped at L//3."""
    if head is None or tail is None:
        factor = target // length
        coin = _randint(0, 1, g)
        default = length // 3 if coin == 0 else min(4 * factor, length // 3)
        head = default if head is None else head
        tail = default if tail is None else tail
    return head, tail


def skipped_position_ids(length: int, target: int, seed: int, index: int,
                         placement: str = "cream", head: Optional[int] = None,
                         tail: Optional[int] = None) -> torch.Tensor:
    """``[length]`` int64 strictly increasing position ids in [0, target): head 0..h-1, a
    contiguous middle, a tail ending at target-1. ``index``: the sample's global index."""
    if target <= length:
        raise ValueError(f"target length {target} must be larger than the sample length {length}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement: expected one of {PLACEMENTS}, got {placement!r}")
    g = _generator(seed, index)
    h, t = head_tail_lengths(length, target, g, head, tail)
    m = length - h - t  # middle length
    if h < 1 or t < 1 or m < 1:
        raise ValueError(f"head {h} + tail {t} must leave a middle of >= 1 of the {length} tokens")
    if placement == "uniform":
        end = _randint(length - t, target - t - 1, g)
    else:
        factor = target / length
        r = _truncated_normal_int(1.0 + factor, _CREAM_SIGMA, 2, int(2 * factor), g)
        lo = int(h + (m - 1) * (r / 2))
        hi = int(r / 2 * length) - t - 1
        end = _randint(lo, max(lo, min(hi, target - t - 1)), g)
    head_ids = torch.arange(0, h)
    middle_ids = torch.arange(end - m + 1, end + 1)
    tail_ids = torch.arange(target - t, target)
    return torch.cat([head_ids, middle_ids, tail_ids]).to(torch.long)
