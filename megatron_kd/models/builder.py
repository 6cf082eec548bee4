"""Build the student (or any teacher of the same family) from a ModelConfig."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_kd import platform
from megatron_kd.config import moe_layer_pattern


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron's padding: round V up to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(model_cfg, parallel_cfg, bf16: bool = False):
    from megatron.core.transformer import TransformerConfig

    if model_cfg.fp8 and platform.layer_spec_kind() != "te":
        from megatron_kd.config import ConfigError

        raise ConfigError(f"fp8={model_cfg.fp8}: FP8 needs transformer-engine on CUDA (the GPU extra); "
                          "this process has the local spec")
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        kv_channels=model_cfg.kv_channels,
        normalization=model_cfg.normalization,
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=model_cfg.swiglu,
        activation_func=F.silu if model_cfg.swiglu else F.gelu,
        add_bias_linear=model_cfg.add_bias_linear,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        no_rope_freq=model_cfg.no_rope_freq,
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        # a dense model (the student of a MoE teacher) has no experts to split: megatron refuses EP
        expert_model_parallel_size=parallel_cfg.expert_model_parallel_size if model_cfg.num_moe_experts else 1,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=platform.initialize_weights_on_cpu(),
        # Fused kernels are CUDA-only; their unfused twins compute the same thing.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        **_hf_family_options(model_cfg),
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
        recompute_modules=(None if model_cfg.recompute_modules is None else
                           [x.strip() for x in model_cfg.recompute_modules.split(",")]),
        **_fp8_kwargs(model_cfg),
    )


def _hf_family_options(model_cfg) -> dict:
    """TransformerConfig fields of the HF-family options (QKV bias, QK-norm, MoE); see
    docs/interop.md. Empty for the default model, so its TransformerConfig is unchanged."""
    m = model_cfg
    out = {}
    if m.add_qkv_bias:
        out["add_qkv_bias"] = True
    if m.qk_layernorm:
        out["qk_layernorm"] = True
    if m.qk_l2_norm:
        out["qk_l2_norm"] = True
    if m.num_moe_experts:
        out.update(
            num_moe_experts=m.num_moe_experts,
            moe_layer_freq=moe_layer_pattern(m) if m.moe_layer_freq != 1 else 1,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
            moe_router_topk=m.moe_router_topk,
            moe_router_score_function=m.moe_router_score_function,
            moe_apply_probs_on_input=m.moe_apply_probs_on_input,
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_router_dtype="fp32",
        )
    return out


def _fp8_kwargs(model_cfg) -> dict:
    """TransformerConfig's FP8 fields (megatron-core 0.16: fp8 = format, fp8_recipe 'delayed' or
    'tensorwise' = current scaling); TE applies them per layer via megatron's get_fp8_context."""
    if not model_cfg.fp8:
        return {}
    return dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe, fp8_margin=model_cfg.fp8_margin,
                fp8_amax_history_len=model_cfg.fp8_amax_history_len,
                fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo)


def build_model(model_cfg, parallel_cfg, vocab_size: int, seq_length: int, bf16: bool = False,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None):
    """One pipeline chunk of the model for this rank (megatron's model_provider)."""
    from megatron.core import parallel_state

    from megatron_kd.models.attention import block_spec, layer_spec
    from megatron_kd.models.gpt_model import PositionIdGPTModel
    from megatron_kd.models import llama4

    config = transformer_config(model_cfg, parallel_cfg, bf16)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    padded = padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by,
                               parallel_cfg.tensor_model_parallel_size)
    model_cls = PositionIdGPTModel
    if llama4.needs_custom_layers(model_cfg):  # MoE / iRoPE pieces: per-layer specs
        if (model_cfg.attention_chunk_size and platform.layer_spec_kind() == "te"
                and parallel_cfg.context_parallel_size > 1):
            from megatron_kd.config import ConfigError

            raise ConfigError(f"model.attention_chunk_size={model_cfg.attention_chunk_size} with "
                              f"parallel.context_parallel_size={parallel_cfg.context_parallel_size} on the "
                              "TE spec: not supported yet (TE's CP layout pads per document, chunks would "
                              "need their own padding); use CP = 1 or the local spec")
        model_cls = llama4.Llama4GPTModel
        spec = llama4.decoder_block_spec(model_cfg, config, vp_stage, parallel_cfg.context_parallel_size)
    else:
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        spec = block_spec([layer_spec(model_cfg, parallel_cfg.context_parallel_size)]
                          * get_num_layers_to_build(config, vp_stage=vp_stage))
    model = model_cls(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded,
        max_sequence_length=model_cfg.max_position_embeddings or seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type=model_cfg.position_embedding_type,
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=int(model_cfg.rotary_base),
        vp_stage=vp_stage,
    )
    if model_cfg.use_rope_scaling and model_cfg.position_embedding_type == "rope":
        apply_llama3_rope_scaling(model.rotary_pos_emb, model_cfg)
    return model.to(platform.device())


def apply_llama3_rope_scaling(rotary, model_cfg) -> None:
    """Llama-3 frequency scaling with all four of the checkpoint's parameters.

    megatron-core 0.16.1's ``RotaryEmbedding(rope_scaling=True)`` only passes ``factor`` and
    keeps low/high-frequency factors 1/4 and an 8192-token original context; Llama-3.2 and our
    tiny test configs use others, so the unscaled frequencies are rescaled here with the same
    (mcore) ``_apply_scaling`` and every argument given.
    """
    dim = rotary.inv_freq.numel() * 2
    base = 1.0 / (int(model_cfg.rotary_base) ** (
        torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device) / dim))
    rotary.inv_freq = rotary._apply_scaling(
        base, factor=model_cfg.rope_scaling_factor,
        low_freq_factor=model_cfg.rope_scaling_low_freq_factor,
        high_freq_factor=model_cfg.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model_cfg.rope_scaling_original_max_position_embeddings)


def count_parameters(model_cfg, vocab_size: int, seq_length: int = 0) -> int:
    """Closed-form parameter count of the (unsharded) model, for recipes and the planner."""
    h = model_cfg.hidden_size
    heads = model_cfg.num_attention_heads
    kv = model_cfg.kv_channels or h // heads
    groups = model_cfg.num_query_groups or heads
    ffn = model_cfg.ffn_hidden_size or 4 * h
    bias = model_cfg.add_bias_linear
    qkv_bias = bias or model_cfg.add_qkv_bias
    qkv = h * kv * (heads + 2 * groups) + (kv * (heads + 2 * groups) if qkv_bias else 0)
    if model_cfg.qk_layernorm:
        qkv += 2 * (kv if model_cfg.normalization == "RMSNorm" else 2 * kv)
    proj = heads * kv * h + (h if bias else 0)
    glu = 2 if model_cfg.swiglu else 1

    def mlp(f):
        return h * f * glu + (glu * f if bias else 0) + f * h + (h if bias else 0)

    norm = h if model_cfg.normalization == "RMSNorm" else 2 * h
    per_layer = qkv + proj + mlp(ffn) + 2 * norm
    if model_cfg.num_moe_experts:  # every moe_layer_freq-th layer: router + experts (+ shared) instead
        e, f = model_cfg.num_moe_experts, model_cfg.moe_ffn_hidden_size or ffn
        shared = model_cfg.moe_shared_expert_intermediate_size
        moe_layer = per_layer - mlp(ffn) + e * h + e * mlp(f) + (mlp(shared) if shared else 0)
        n_moe = sum(moe_layer_pattern(model_cfg))
        return (n_moe * moe_layer + (model_cfg.num_layers - n_moe) * per_layer
                + _embedding_parameters(model_cfg, vocab_size, seq_length) + norm)
    return model_cfg.num_layers * per_layer + _embedding_parameters(model_cfg, vocab_size, seq_length) + norm


def _embedding_parameters(model_cfg, vocab_size: int, seq_length: int) -> int:
    h = model_cfg.hidden_size
    emb = vocab_size * h
    out = 0 if not model_cfg.untie_embeddings_and_output_weights else vocab_size * h
    pos = 0
    if model_cfg.position_embedding_type == "learned_absolute":
        # build_model's table: max_position_embeddings rows, or seq_length when unset
        pos = (model_cfg.max_position_embeddings or seq_length) * h
    return emb + out + pos
