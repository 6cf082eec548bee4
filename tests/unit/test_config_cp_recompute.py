"""Config keys of the H100 path: context parallelism and activation recompute, with one-line
errors naming the key before any build."""
from __future__ import annotations

import re

import pytest

from megatron_kd.config import ConfigError, load_config, validate_layout


def test_context_parallel_is_accepted_and_validated():
    cfg = load_config(None, ["parallel.context_parallel_size=2", "data.seq_length=64"])
    validate_layout(cfg, 2)
    with pytest.raises(ConfigError, match="data.seq_length=66 is not divisible by 2 x context_parallel_size"):
        validate_layout(load_config(None, ["parallel.context_parallel_size=2", "data.seq_length=66"]), 2)
    with pytest.raises(ConfigError, match=r"world size 3 .* context_parallel_size\(2\)"):
        validate_layout(cfg, 3)
    with pytest.raises(ConfigError, match="parallel.context_parallel_padding"):
        load_config(None, ["parallel.context_parallel_padding=-1"])
    with pytest.raises(ConfigError, match="parallel.cp_comm_type"):
        load_config(None, ["parallel.cp_comm_type=a2a"])
    with pytest.raises(ConfigError, match="model.attention_dropout=0.1"):
        validate_layout(load_config(None, ["parallel.context_parallel_size=2",
                                           "model.attention_dropout=0.1"]), 2)


@pytest.mark.parametrize("overrides, needle", [
    (["model.recompute_granularity=some"], "model.recompute_granularity"),
    (["model.recompute_granularity=full"], "model.recompute_method"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform"], "model.recompute_num_layers"),
    (["model.recompute_granularity=full", "model.recompute_method=uniform",
      "model.recompute_num_layers=3", "model.num_layers=2"], "1..num_layers(2)"),
    (["model.recompute_granularity=selective", "model.recompute_num_layers=1"], "selective"),
    (["model.recompute_method=block"], "model.recompute_granularity"),
    (["model.recompute_granularity=selective", "model.recompute_modules=core_attn,mpl"], "mpl"),
])
def test_recompute_errors(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, overrides)



def test_recompute_reaches_transformer_config():
    from megatron_kd.models.builder import transformer_config

    cfg = load_config(None, ["model.recompute_granularity=full", "model.recompute_method=block",
                             "model.recompute_num_layers=1"])
    tc = transformer_config(cfg.model, cfg.parallel)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 1)
    cfg = load_config(None, ["model.recompute_granularity=selective", "model.recompute_modules=core_attn,mlp"])
    tc = transformer_config(cfg.model, cfg.parallel)
    assert tc.recompute_granularity == "selective" and tc.recompute_modules == ["core_attn", "mlp"]


def test_fp8_keys():
    with pytest.raises(ConfigError, match="model.fp8"):
        load_config(None, ["model.fp8=e5m2"])
    with pytest.raises(ConfigError, match="model.fp8_recipe"):
        load_config(None, ["model.fp8=hybrid", "model.fp8_recipe=mxfp4"])
    with pytest.raises(ConfigError, match="train.bf16=true"):
        validate_layout(load_config(None, ["model.fp8=hybrid"]), 1)
    # the CPU has no transformer-engine: refused by name before any model is built
    from megatron_kd.models.builder import transformer_config

    cfg = load_config(None, ["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "train.bf16=true"])
    validate_layout(cfg, 1)
    with pytest.raises(ConfigError, match="transformer-engine"):
        transformer_config(cfg.model, cfg.parallel, bf16=True)


def test_communication_overlap_keys_follow_megatron_rules():
    cfg = load_config(None, ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                             "parallel.overlap_param_gather=true", "parallel.ddp_bucket_size=1000000"])
    assert cfg.parallel.overlap_param_gather and cfg.parallel.ddp_bucket_size == 1_000_000
    for bad in (["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"],
                ["parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=true"]):
        with pytest.raises(ConfigError, match="parallel.overlap_param_gather=true needs "
                                              "parallel.use_distributed_optimizer=true"):
            load_config(None, bad)
    with pytest.raises(ConfigError, match="parallel.ddp_bucket_size: expected a positive"):
        load_config(None, ["parallel.ddp_bucket_size=0"])


def test_moe_training_under_tp_needs_sequence_parallel_up_front():
    from megatron_kd.config import validate_training

    moe = ["model.num_moe_experts=4", "parallel.tensor_model_parallel_size=2", "data.seq_length=64"]
    validate_layout(load_config(None, moe), 2)  # converting / evaluating such a model is fine
    with pytest.raises(ConfigError, match="model.num_moe_experts=4 with parallel.tensor_model_parallel_size=2 "
                                          "needs parallel.sequence_parallel=true"):
        validate_training(load_config(None, moe))
    validate_training(load_config(None, moe + ["parallel.sequence_parallel=true"]))
