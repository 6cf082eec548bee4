"""Skipped position ids: the head / middle / tail contract for random lengths, both placements."""
import random

import pytest
import torch

from megatron_kd.longred.positions import skipped_position_ids


def _segments(ids):
    """Split into maximal runs of consecutive integers."""
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append(ids[start:i])
            start = i
    return runs


@pytest.mark.parametrize("placement", ["uniform", "cream"])
def test_contract_random_lengths(placement):
    rng = random.Random(0)
    for trial in range(300):
        length = rng.randint(3, 600)
        target = length + rng.randint(1, 8 * length)
        head = rng.choice([None, rng.randint(1, max(1, length // 3))])
        tail = rng.choice([None, rng.randint(1, max(1, length // 3))])
        if head is not None and tail is not None and head + tail >= length:
            continue
        ids = skipped_position_ids(length, target, seed=trial, index=rng.randint(0, 10**6),
                                   placement=placement, head=head, tail=tail)
        assert ids.dtype == torch.long and ids.shape == (length,)
        x = ids.tolist()
        assert all(b > a for a, b in zip(x, x[1:])), "strictly increasing"
        assert x[0] == 0 and x[-1] == target - 1, "head starts at 0, tail ends at T-1"
        assert 0 <= min(x) and max(x) < target
        runs = _segments(x)
        assert 1 <= len(runs) <= 3  # head | middle | tail (neighbours may touch and merge)
        if head is not None:
            assert x[:head] == list(range(head)), "head untouched"
        if tail is not None:
            assert x[-tail:] == list(range(target - tail, target))


def test_deterministic_and_varied():
    a = skipped_position_ids(64, 512, seed=3, index=11)
    assert torch.equal(a, skipped_position_ids(64, 512, seed=3, index=11))
    others = {tuple(skipped_position_ids(64, 512, seed=3, index=i).tolist()) for i in range(20)}
    assert len(others) > 10  # different samples get different middles
    assert not torch.equal(a, skipped_position_ids(64, 512, seed=4, index=11))


def test_cream_concentrates_middle_at_centre():
    """CREAM's truncated Gaussian puts the middle nearer the window centre than uniform does."""
    L, T = 256, 256 * 16

    def centre_dist(placement):
        d = []
        for i in range(400):
            ids = skipped_position_ids(L, T, 0, i, placement, head=8, tail=8)
            d.append(abs(float(ids[8:-8].float().mean()) - T / 2))
        return sum(d) / len(d)

    assert centre_dist("cream") < centre_dist("uniform")


def test_bad_lengths():
    with pytest.raises(ValueError, match="larger"):
        skipped_position_ids(64, 64, 0, 0)
    with pytest.raises(ValueError, match="middle"):
        skipped_position_ids(10, 100, 0, 0, head=5, tail=5)
    with pytest.raises(ValueError, match="placement"):
        skipped_position_ids(10, 100, 0, 0, placement="gauss")
