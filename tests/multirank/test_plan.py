"""``megatron-kd plan`` against what megatron-core really allocates.

- Parameters per rank: exact, against models built at TP=2, PP=2 (tied and untied embeddings,
  learned absolute positions), MoE layers at EP=2 and TP=2, QK norm + QKV bias, in 2 real
  processes.
- Optimizer state: plain Adam holds 2 fp32 elements per parameter (exact); the distributed
  optimizer shards them over DP (within megatron's bucket padding).
- Activations: in test_recompute.py (it measures the saved tensors of the same forward passes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import multirank_util as mr

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.ffn_hidden_size=128", "model.make_vocab_size_divisible_by=128",
         "data.seq_length=64"]
LAYOUTS = {
    "tp2": MODEL + ["parallel.tensor_model_parallel_size=2"],
    "pp2": MODEL + ["parallel.pipeline_model_parallel_size=2"],
    "pp2_untied_abs": MODEL + ["parallel.pipeline_model_parallel_size=2",
                               "model.untie_embeddings_and_output_weights=true",
                               "model.position_embedding_type=learned_absolute"],
    "dp2_distopt": MODEL + ["parallel.use_distributed_optimizer=true"],
    # Llama-4-style MoE every 2nd layer (router, 4 experts, shared expert) with the experts split
    # over EP=2, and over TP=2 (megatron splits each expert's FFN over TP); Qwen-style norms/bias
    "moe_ep2": MODEL + ["model.num_moe_experts=4", "model.moe_layer_freq=2", "model.moe_ffn_hidden_size=48",
                        "model.moe_shared_expert_intermediate_size=32", "parallel.expert_model_parallel_size=2"],
    "moe_tp2": MODEL + ["model.num_moe_experts=4", "model.moe_layer_freq=2", "model.moe_ffn_hidden_size=48",
                        "model.moe_shared_expert_intermediate_size=32", "parallel.tensor_model_parallel_size=2",
                        "parallel.sequence_parallel=true"],
    "qk_norm_qkv_bias_pp2": MODEL + ["model.qk_layernorm=true", "model.add_qkv_bias=true",
                                     "parallel.pipeline_model_parallel_size=2"],
}


@pytest.fixture(scope="module")
def measured():
    worker = Path(__file__).with_name("plan_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(mr.free_port()), str(worker), json.dumps(LAYOUTS)]
    p = mr.run(cmd)
    return [json.loads(l[len("RESULT "):]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]


def _plan(overrides, world=2):
    from megatron_kd.config import load_config
    from megatron_kd.plan import make_plan

    return make_plan(load_config(None, overrides), world=world, vocab_size=500)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parameters_per_rank_exact(measured, name):
    plan = _plan(LAYOUTS[name])
    assert len(measured) == 2
    for r in measured:
        got = r["layouts"][name]
        assert got["params"] == plan.params_per_rank[got["pp_rank"]], (name, got, plan.params_per_rank)


@pytest.mark.parametrize("name", ["tp2", "pp2", "pp2_untied_abs"])
def test_plain_optimizer_state_exact(measured, name):
    plan = _plan(LAYOUTS[name])
    for r in measured:
        got = r["layouts"][name]
        assert got["optimizer_elements"] == 2 * got["params"]
        # fp32 training: the plan's optimizer bytes are the moments of the worst rank
        assert plan.bytes["optimizer (plain)"] == 8 * max(plan.params_per_rank)


def test_distributed_optimizer_shards_over_dp(measured):
    plan = _plan(LAYOUTS["dp2_distopt"])
    est = plan.bytes["optimizer (distributed /2)"] / 4  # fp32 elements per rank
    for r in measured:
        got = r["layouts"]["dp2_distopt"]["optimizer_elements"]
        assert abs(got - est) / est < 0.02, (got, est)  # megatron pads buckets
    assert sum(r["layouts"]["dp2_distopt"]["optimizer_elements"] for r in measured) >= est * 2
