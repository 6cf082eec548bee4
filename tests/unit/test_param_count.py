"""count_parameters: the paper's student is ~1.08B, and the closed form matches a real
megatron-core GPTModel built by models.build_model (paper widths, 2 layers, small vocab)."""
import json
import os
import subprocess
import sys

import pytest

from megatron_kd.config import ModelConfig
from megatron_kd.models.builder import count_parameters, padded_vocab_size

PAPER_VOCAB = 202_048
PAPER_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "paper", "phase1_theta10k.yaml")
PAPER = dict(num_layers=30, hidden_size=1280, num_attention_heads=20, num_query_groups=4,
             ffn_hidden_size=6144, swiglu=True, untie_embeddings_and_output_weights=False,
             normalization="RMSNorm", add_bias_linear=False, position_embedding_type="rope")


def test_paper_student_is_1_08b():
    n = count_parameters(ModelConfig(**PAPER), PAPER_VOCAB)
    print(f"paper student: {n:,} parameters (vocab {PAPER_VOCAB:,})")
    assert n == pytest.approx(1.08e9, abs=0.01e9)
    # by hand: per layer qkv 1280*64*(20+2*4) + proj 1280^2 + fc1 2*1280*6144 + fc2 6144*1280
    # + 2 RMSNorms; embeddings tied; one final norm.
    per_layer = 1280 * 64 * 28 + 1280 * 1280 + 2 * 1280 * 6144 + 6144 * 1280 + 2 * 1280
    assert n == 30 * per_layer + PAPER_VOCAB * 1280 + 1280


def test_paper_student_padded_vocab_and_untied():
    cfg = ModelConfig(**PAPER)
    padded = padded_vocab_size(PAPER_VOCAB, cfg.make_vocab_size_divisible_by, 1)
    assert padded == 202_112  # 202,048 is not a multiple of 128
    n_tied = count_parameters(cfg, padded)
    assert n_tied == pytest.approx(1.08e9, abs=0.01e9)
    untied = count_parameters(ModelConfig(**{**PAPER, "untie_embeddings_and_output_weights": True}), padded)
    assert untied - n_tied == padded * 1280


def test_paper_recipe_has_the_paper_shape():
    from megatron_kd.config import load_config

    model = load_config(PAPER_RECIPE).model
    assert {k: getattr(model, k) for k in PAPER} == PAPER
    assert count_parameters(model, PAPER_VOCAB) == count_parameters(ModelConfig(**PAPER), PAPER_VOCAB)


# ----------------------------------------------------------------------------- vs a real model

SMALL_VOCAB = 1024
SEQ = 128
VARIANTS = {
    "paper_tied": dict(PAPER, num_layers=2),
    "paper_untied": dict(PAPER, num_layers=2, untie_embeddings_and_output_weights=True),
    "paper_learned_absolute": dict(PAPER, num_layers=2, position_embedding_type="learned_absolute",
                                   max_position_embeddings=SEQ),
    # the other branches of the formula, at a small width
    "layernorm_bias_gelu_mha": dict(num_layers=2, hidden_size=96, num_attention_heads=4,
                                    normalization="LayerNorm", add_bias_linear=True, swiglu=False),
    "kv_channels_gqa_untied": dict(num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2,
                                   kv_channels=32, ffn_hidden_size=200, add_bias_linear=True,
                                   untie_embeddings_and_output_weights=True),
    # max_position_embeddings=None: build_model sizes the table from seq_length
    "learned_absolute_default_table": dict(num_layers=2, hidden_size=96, num_attention_heads=4,
                                           position_embedding_type="learned_absolute"),
    # HF-family options (docs/interop.md)
    "qwen2_qkv_bias": dict(num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2,
                           add_qkv_bias=True),
    "qwen3_qk_layernorm": dict(num_layers=2, hidden_size=96, num_attention_heads=4, qk_layernorm=True),
    "llama4_moe_irope": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=96, num_moe_experts=4, moe_layer_freq=2, moe_ffn_hidden_size=48,
                             moe_shared_expert_intermediate_size=48, no_rope_freq=2, qk_l2_norm=True,
                             attention_chunk_size=8, attn_temperature_tuning=True),
}

BUILD = r"""
import json, sys
from megatron_kd import distributed
from megatron_kd.config import ModelConfig, ParallelConfig
from megatron_kd.models import build_model
variants, vocab, seq = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
distributed.init_distributed()
distributed.init_model_parallel(ParallelConfig(), 1234)
out = {}
try:
    for name, kwargs in variants.items():
        model = build_model(ModelConfig(**kwargs), ParallelConfig(), vocab, seq)
        out[name] = {"numel": sum(p.numel() for p in model.parameters()),
                     "shared_output": getattr(model, "share_embeddings_and_output_weights", None)}
        del model
finally:
    distributed.destroy()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK",
                        "PMI_RANK", "PMIX_RANK", "MASTER_PORT")}
    env.update(PYTHONWARNINGS="ignore", MEGATRON_KD_FORCE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", BUILD, json.dumps(VARIANTS), str(SMALL_VOCAB), str(SEQ)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_formula_matches_megatron_model(built, name):
    cfg = ModelConfig(**VARIANTS[name])
    assert padded_vocab_size(SMALL_VOCAB, cfg.make_vocab_size_divisible_by, 1) == SMALL_VOCAB
    expected = count_parameters(cfg, SMALL_VOCAB, seq_length=SEQ)
    print(f"{name}: model {built[name]['numel']:,} vs formula {expected:,}")
    assert built[name]["numel"] == expected


def test_variants_differ_as_expected(built):
    h = PAPER["hidden_size"]
    assert built["paper_untied"]["numel"] - built["paper_tied"]["numel"] == SMALL_VOCAB * h
    assert built["paper_learned_absolute"]["numel"] - built["paper_tied"]["numel"] == SEQ * h
    assert built["paper_tied"]["shared_output"] is True and built["paper_untied"]["shared_output"] is False
