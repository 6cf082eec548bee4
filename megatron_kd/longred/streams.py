"""LongReD's three data streams, each cut into micro-batches of the same shape, and their schedule.

megatron-core's pipeline schedules allocate one p2p buffer shape ``[seq_length, micro_batch,
hidden]`` for every micro-batch of a ``forward_backward`` call, so streams of different sample
lengths (long T, short 1k, original L) cannot simply alternate. Here **every micro-batch is a
window of ``data.seq_length`` tokens holding one stream**: a long window, or T/L_short short
samples, or T/L original-length samples, packed side by side as separate documents (the document
mask keeps them apart, each keeps its own position ids). That is the reference's own balance
(its short, s2l and long micro-batches all hold 128k tokens), so the stream ratio in micro-batches
is also the token ratio; one forward_backward call per step, one set of gradients, one
optimizer step. Cost: attention over a packed window of short samples costs what a long window
costs with the dense CPU mask; a varlen (THD) kernel would bring it down to the samples' own.

Stream ``k`` consumes ``n_k * micro_batch * dp`` windows per step, so its position after
``iteration`` steps is a pure function of the iteration (resume needs no extra state).
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from megatron_kd.config import LONGRED_STREAMS, ConfigError
from megatron_kd.longred.positions import skipped_position_ids


class PackedSamples(torch.utils.data.Dataset):
    """``k`` consecutive samples of a PackedDataset (seq ``L``) as one window of ``k * L`` tokens.

    Window ``i`` holds samples ``i*k .. i*k+k-1``; document ids are offset so no document spans two
    samples; ``teacher_position_ids`` are each sample's own (0..L-1 with global positions).
    With ``target`` set (the s2l stream), ``position_ids`` become the skipped positions of the
    sample's global index, simulating a window of ``target``.
    """

    def __init__(self, samples, per_window: int, target: int = None, placement: str = "cream",
                 seed: int = 0, head: int = None, tail: int = None):
        self.samples, self.k = samples, per_window
        self.target, self.placement, self.seed, self.head, self.tail = target, placement, seed, head, tail

    def __len__(self) -> int:
        return len(self.samples) // self.k

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        parts = [self.samples[i * self.k + j] for j in range(self.k)]
        out = {key: torch.cat([p[key] for p in parts]) for key in ("tokens", "labels", "loss_mask")}
        docs, offset = [], 0
        for p in parts:
            docs.append(p["document_ids"] + offset)
            offset = int(docs[-1].max()) + 1
        out["document_ids"] = torch.cat(docs)
        out["teacher_position_ids"] = torch.cat([p["position_ids"] for p in parts])
        if self.target is None:
            out["position_ids"] = out["teacher_position_ids"].clone()
        else:
            length = parts[0]["tokens"].numel()
            out["position_ids"] = torch.cat([
                skipped_position_ids(length, self.target, self.seed, i * self.k + j, self.placement,
                                     self.head, self.tail) for j in range(self.k)])
        return out


def per_step_counts(stream_counts: dict, microbatches: int) -> dict:
    """Micro-batches of each stream in one step (per data-parallel rank) from the ratio."""
    total = sum(stream_counts.values())
    if microbatches % total:
        raise ConfigError(
            f"longred.stream_ratio {':'.join(str(stream_counts[s]) for s in LONGRED_STREAMS)}: "
            f"the {microbatches} micro-batches per step (train.global_batch_size / (micro_batch_size "
            f"x data-parallel size)) are not a multiple of {total}")
    return {s: stream_counts[s] * microbatches // total for s in LONGRED_STREAMS}


def step_schedule(counts: dict) -> List[str]:
    """Interleave the streams over one step (smooth weighted round robin, deterministic): with
    8:6:2 it spreads them like the reference's 16-micro-batch cycle instead of in blocks."""
    total = sum(counts.values())
    placed = dict.fromkeys(counts, 0)
    order = []
    for i in range(total):
        name = max(LONGRED_STREAMS, key=lambda s: (counts[s] * (i + 1) / total - placed[s], counts[s]))
        placed[name] += 1
        order.append(name)
    return order


def mixed_iterator(iterators: dict, schedule: List[str]) -> Iterator[dict]:
    """Endless: the step's schedule, again and again; each micro-batch marked with its stream."""
    while True:
        for name in schedule:
            batch = next(iterators[name])
            batch["stream"] = name
            yield batch
