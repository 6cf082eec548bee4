"""The study's control switches as config keys: one-line errors naming the keys, the frozen rows'
layout in megatron-core's fused linear_qkv."""
import pytest
import torch

from megatron_kd.config import ConfigError, from_dict, parse_frequency_spans, validate_training
from megatron_kd.models.rotary_freeze import frozen_head_dims, qkv_frozen_rows

MODEL = {"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2}


def test_teacher_reset_positions_needs_kd():
    cfg = from_dict({"model": MODEL, "teacher": {**MODEL, "reset_position_ids": True}, "kd": {"alpha": 0.0}})
    with pytest.raises(ConfigError) as e:
        validate_training(cfg)
    assert "teacher.reset_position_ids" in str(e.value) and "kd.alpha=0" in str(e.value)
    validate_training(from_dict({"model": MODEL, "teacher": {**MODEL, "reset_position_ids": True},
                                 "kd": {"alpha": 0.5}}))


@pytest.mark.parametrize("spec", ["8-16", "16:8", "a:b", "-1:2", ""])
def test_bad_frequency_spans(spec):
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"freeze_rotary_frequencies": spec}})
    assert "train.freeze_rotary_frequencies" in str(e.value)


def test_span_beyond_the_rotary_frequencies():
    assert parse_frequency_spans("0:2,8:16") == [(0, 2), (8, 16)]
    with pytest.raises(ConfigError) as e:  # head dim 32 -> 16 frequencies
        validate_training(from_dict({"model": MODEL, "train": {"freeze_rotary_frequencies": "8:17"}}))
    assert "16 rotary frequencies" in str(e.value)


def test_frozen_rows_follow_megatron_qkv_layout():
    # head dim 4 (2 frequencies), 4 query heads in 2 groups: per group [q, q, k, v] x 4 rows
    dims = frozen_head_dims([(1, 2)], rotary_dim=4)
    assert dims == [1, 3]  # frequency 1 rotates dims 1 and 1 + 4/2
    rows = qkv_frozen_rows(num_heads=4, num_groups=2, head_dim=4, dims=dims)
    head = [False, True, False, True]
    group = head + head + head + [False] * 4  # two query heads, the key head; never the value head
    assert rows.tolist() == group * 2
    assert torch.equal(qkv_frozen_rows(4, 2, 4, dims, tp=2), torch.tensor(group))  # one group per TP rank
