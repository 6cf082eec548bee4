"""DP sampling: exact resumption from consumed_samples, disjoint ranks, epoch cycling."""
import itertools

import pytest
import torch

from megatron_kd.data import DataError, PretrainingSampler, build_data_iterator


def stream(total, consumed, mbs, dp):
    """Per rank: the list of micro-batches the sampler yields."""
    return [list(PretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]


@pytest.mark.parametrize("total,mbs,dp", [(100, 2, 4), (37, 3, 2), (9, 1, 1), (64, 4, 4)])
def test_ranks_disjoint_and_cover_each_global_batch(total, mbs, dp):
    per_rank = stream(total, 0, mbs, dp)
    group = mbs * dp
    n = total // group  # the last incomplete global batch is dropped
    assert all(len(r) == n for r in per_rank)
    for step in range(n):
        batches = [per_rank[r][step] for r in range(dp)]
        assert all(len(b) == mbs for b in batches)
        assert sorted(itertools.chain(*batches)) == list(range(step * group, (step + 1) * group))


@pytest.mark.parametrize("total,mbs,dp", [(100, 2, 4), (37, 3, 2)])
def test_resume_yields_suffix(total, mbs, dp):
    full = stream(total, 0, mbs, dp)
    for steps_done in range(total // (mbs * dp)):
        resumed = stream(total, steps_done * mbs * dp, mbs, dp)
        assert resumed == [r[steps_done:] for r in full]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(DataError, match="consumed_samples"):
        PretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(DataError, match="data_parallel_rank"):
        PretrainingSampler(10, 0, 1, 2, 2)


class ToyDataset(torch.utils.data.Dataset):
    """Window i holds the value i everywhere, so batches reveal which indices they came from."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return {"tokens": torch.full((5,), i, dtype=torch.long),
                "loss_mask": torch.ones(5, dtype=torch.float32)}


def take(it, n):
    return [b["tokens"][:, 0].tolist() for b in itertools.islice(it, n)]


def test_iterator_collates_and_cycles_epochs():
    ds = ToyDataset()
    it = build_data_iterator(ds, 0, micro_batch_size=2, dp_rank=1, dp_size=3)
    b = next(it)
    assert b["tokens"].shape == (2, 5) and b["loss_mask"].dtype == torch.float32
    got = [b["tokens"][:, 0].tolist()] + take(it, 6)
    # epoch = 18 windows (23 rounded down to groups of 6): rank 1 gets [2,3], [8,9], [14,15], again
    assert got == [[2, 3], [8, 9], [14, 15]] * 2 + [[2, 3]]


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_iterator_resume_is_exact_suffix_across_epochs(dp_size):
    ds, mbs = ToyDataset(), 2
    group = mbs * dp_size
    for rank in range(dp_size):
        full = take(build_data_iterator(ds, 0, mbs, rank, dp_size), 20)
        for k in (1, 3, 7, 11):
            resumed = take(build_data_iterator(ds, k * group, mbs, rank, dp_size), 20 - k)
            assert resumed == full[k:]
    with pytest.raises(DataError, match="fewer than micro_batch_size"):
        build_data_iterator(ds, 0, 8, 0, 3)
