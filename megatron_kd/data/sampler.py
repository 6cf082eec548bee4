"""Data-parallel sampling that resumes exactly from ``consumed_samples``.

The only data state a checkpoint needs is ``consumed_samples`` (global windows consumed by all DP
ranks together): the stream is a pure function of it, so a resumed run sees exactly the suffix of
the uninterrupted one.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from megatron_kd.data.errors import DataError


class PretrainingSampler:
    """Like Megatron-LM's MegatronPretrainingSampler: walks indices ``consumed_samples ..
    total_samples-1`` in order, in global groups of ``micro_batch_size * data_parallel_size``,
    and yields this rank's slice (one micro-batch). The last incomplete group is dropped."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise DataError(f"sampler: expected total_samples > 0, got {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(f"sampler: consumed_samples={consumed_samples} not in [0, total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError(f"sampler: expected micro_batch_size, data_parallel_size > 0, got {micro_batch_size}, {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"sampler: data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        group = self.micro_batch_size * self.data_parallel_size
        lo = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + group <= self.total_samples:
            yield list(range(start + lo, start + lo + self.micro_batch_size))
            start += group


def collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """list of dicts of ``[s]`` tensors -> dict of ``[b, s]`` tensors."""
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def build_data_iterator(dataset, consumed_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Endless iterator of this rank's collated micro-batches (``[b, s]`` tensors).

    An epoch is the dataset's length rounded down to whole groups of ``micro_batch_size *
    dp_size``; past it the same (GPTDataset-shuffled) order repeats: epoch = consumed // epoch_len.
    Each ``next`` advances the global ``consumed_samples`` by ``micro_batch_size * dp_size``.
    (Build the dataset with ``num_samples`` >= the run's need for fresh shuffles per epoch.)
    """
    group = micro_batch_size * dp_size
    epoch_len = (len(dataset) // group) * group
    if epoch_len == 0:
        raise DataError(f"dataset has {len(dataset)} windows, fewer than micro_batch_size x dp_size = {group}")
    if consumed_samples < 0:
        raise DataError(f"consumed_samples: expected >= 0, got {consumed_samples}")

    def _gen():
        consumed = consumed_samples
        while True:
            sampler = PretrainingSampler(epoch_len, consumed % epoch_len, micro_batch_size, dp_rank, dp_size)
            for indices in sampler:
                yield collate([dataset[i] for i in indices])
                consumed += group

    return _gen()
