"""Tiny random HF checkpoints (written with transformers' own save_pretrained) for the interop tests."""
from __future__ import annotations

from pathlib import Path

import torch


def word_level_tokenizer(path: Path, vocab_size: int) -> Path:
    """A tokenizer.json with ``vocab_size`` tokens t0..t{V-1}, t0 renamed '</s>' (our EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["</s>"] = vocab.pop("t0")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def tiny_config(family: str, vocab: int = 256):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, rms_norm_eps=1e-5, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32},
                              rope_theta=50000.0)
    if family == "llama_tied":
        return tf.LlamaConfig(**{**common, "tie_word_embeddings": True})
    if family == "qwen2":
        return tf.Qwen2Config(**common, rope_theta=1000000.0)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, rope_theta=1000000.0)
    if family == "llama4":
        return tf.Llama4TextConfig(
            **{**common, "num_hidden_layers": 4, "intermediate_size": 48}, intermediate_size_mlp=96,
            head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            no_rope_layer_interval=2, attention_chunk_size=8, attn_temperature_tuning=True,
            floor_scale=4, attn_scale=0.5, use_qk_norm=True, rope_theta=10000.0)
    if family == "llama4_sparse":  # interleave step 2 over 3 layers: MoE at layer 1 only (2 does not divide 3)
        return tf.Llama4TextConfig(
            **{**common, "num_hidden_layers": 3, "intermediate_size": 48}, intermediate_size_mlp=96,
            head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            no_rope_layer_interval=3, attention_chunk_size=8, attn_temperature_tuning=True,
            floor_scale=4, attn_scale=0.5, use_qk_norm=True, rope_theta=10000.0)
    raise ValueError(family)


CLASSES = {"llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "llama4": "Llama4ForCausalLM", "llama4_sparse": "Llama4ForCausalLM"}


def make_hf_model(family: str, out: Path, seed: int = 0, vocab: int = 256):
    """Random tiny HF model saved to ``out`` (safetensors + config.json + tokenizer.json)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab)
    model = getattr(tf, CLASSES[family])(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a transposed/mis-mapped norm is visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(out)
    word_level_tokenizer(out, vocab)
    return model
