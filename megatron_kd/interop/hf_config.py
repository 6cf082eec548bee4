"""HF ``config.json`` <-> our ``model`` section, per supported architecture.

The mapping is explicit per family (Llama, Qwen2, Qwen3, Llama-4 text) and refuses anything it
would silently get wrong (another RoPE type, sliding windows, biases we do not model), so a
converted checkpoint either computes the HF model's function or does not exist.
"""
from __future__ import annotations

from typing import Optional

from megatron_kd.config import ConfigError, moe_layer_pattern

#: HF ``architectures[0]`` -> family name used by the weight mapping (hf_weights.py)
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Llama4ForCausalLM": "llama4",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "llama4": "llama4_text"}


def family_of(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None:  # a bare config (save_pretrained of a config only) still names its model_type
        by_type = {v: k for k, v in MODEL_TYPES.items()}
        if hf.get("model_type") in by_type:
            return by_type[hf["model_type"]]
    if arch not in SUPPORTED:
        raise ConfigError(f"{source}: unsupported architecture {arch!r} (model_type "
                          f"{hf.get('model_type')!r}); supported: {', '.join(SUPPORTED)}")
    return SUPPORTED[arch]


def _rope(hf: dict, source: str) -> dict:
    """rotary_base and Llama-3 scaling from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` / ``rope_scaling`` keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out = {"rotary_base": float(theta)}
    if kind == "llama3":
        out.update(use_rope_scaling=True,
                   rope_scaling_factor=float(params["factor"]),
                   rope_scaling_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   rope_scaling_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   rope_scaling_original_max_position_embeddings=int(
                       params.get("original_max_position_embeddings", 8192)))
    elif kind != "default":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: default, llama3)")
    return out


def model_section(hf: dict, source: str = "config.json") -> dict:
    """HF config dict -> keyword arguments of ModelConfig (the model section of config.yaml)."""
    family = family_of(hf, source)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r}; only SwiGLU (silu) MLPs are supported")
    if hf.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    m = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=head_dim,
        position_embedding_type="rope",
        normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        add_bias_linear=False,
        **_rope(hf, source),
    )
    if family == "llama" and hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true (bias on o_proj too) is not supported")
    if family == "qwen2":
        m["add_qkv_bias"] = True
    if family == "qwen3":
        if hf.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported for Qwen3")
        m["qk_layernorm"] = True
    if family == "llama4":
        m.update(_llama4_section(hf, source))
    return m


def _llama4_section(hf: dict, source: str) -> dict:
    n = hf["num_hidden_layers"]
    step = hf.get("interleave_moe_layer_step", 1)
    moe_layers = hf.get("moe_layers")
    if moe_layers is None:  # transformers' default: every step-th layer, whether or not step divides n
        if not isinstance(step, int) or step < 1:
            raise ConfigError(f"{source}: interleave_moe_layer_step={step!r}; expected a positive integer")
        moe_layers = list(range(step - 1, n, step))
    bad = [i for i in moe_layers if not isinstance(i, int) or not 0 <= i < n]
    if bad or len(set(moe_layers)) != len(moe_layers):
        raise ConfigError(f"{source}: moe_layers={list(moe_layers)}: expected distinct layer indices in "
                          f"0..{n - 1} (num_hidden_layers={n})")
    pattern = [int(i in set(moe_layers)) for i in range(n)]
    # megatron-core's moe_layer_freq: an int N (every N-th layer) when that is the pattern, else the
    # per-layer 0/1 list it also accepts (Megatron-LM's --moe-layer-freq "[0,1,...]")
    freq = next((k for k in range(1, n + 1) if n % k == 0
                 and pattern == [int((i + 1) % k == 0) for i in range(n)]), pattern)
    interval = hf.get("no_rope_layer_interval", 4)  # transformers' defaults for absent keys
    nope = hf.get("no_rope_layers")
    if nope and all(v == 1 for v in nope):  # RoPE in every layer (an exported model without NoPE)
        interval = None
    elif nope:
        want = [int((i + 1) % interval != 0) for i in range(n)] if interval else [1] * n
        if list(nope) != want:
            raise ConfigError(f"{source}: no_rope_layers is not every no_rope_layer_interval={interval}-th "
                              "layer; only that pattern is supported")
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for Llama-4")
    out = dict(
        ffn_hidden_size=hf["intermediate_size_mlp"],
        num_moe_experts=hf["num_local_experts"],
        moe_layer_freq=freq,
        moe_ffn_hidden_size=hf["intermediate_size"],
        moe_shared_expert_intermediate_size=hf["intermediate_size"],
        moe_router_topk=hf.get("num_experts_per_tok", 1),
        moe_router_score_function="sigmoid",
        moe_apply_probs_on_input=True,
        no_rope_freq=interval or None,
        qk_l2_norm=bool(hf.get("use_qk_norm", True)),
        attention_chunk_size=hf.get("attention_chunk_size"),
        attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)) and bool(interval),
        attn_temperature_floor_scale=float(hf.get("floor_scale", 8192)),
        attn_temperature_scale=float(hf.get("attn_scale", 0.1)),
    )
    if out["moe_router_topk"] != 1:
        raise ConfigError(f"{source}: num_experts_per_tok={out['moe_router_topk']}; Llama-4 routing "
                          "is top-1 (the only value supported)")
    return out


def family_of_model(m) -> str:
    """Family a ModelConfig exports as, when the run does not record its HF origin."""
    if m.num_moe_experts or m.qk_l2_norm or m.attention_chunk_size or m.attn_temperature_tuning:
        return "llama4"
    if m.qk_layernorm:
        return "qwen3"
    if m.add_qkv_bias:
        return "qwen2"
    return "llama"


def hf_config(m, vocab_size: int, family: str, base: Optional[dict] = None) -> dict:
    """ModelConfig -> HF config dict (the fields the model computes with; ``base``, the imported
    config.json, supplies the rest: token ids, max positions, ...)."""
    if m.normalization != "RMSNorm" or not m.swiglu or m.add_bias_linear \
            or m.position_embedding_type != "rope" or m.rotary_percent != 1.0:
        raise ConfigError("export: only RMSNorm + SwiGLU + RoPE models without linear biases map to "
                          "a HF Llama-family config")
    arch = {v: k for k, v in SUPPORTED.items()}[family]
    heads = m.num_attention_heads
    out = dict(base or {})
    for k in ("rope_scaling", "rope_theta", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        out.pop(k, None)
    rope = {"rope_theta": float(m.rotary_base), "rope_type": "default"}
    if m.use_rope_scaling:
        rope.update(rope_type="llama3", factor=m.rope_scaling_factor,
                    low_freq_factor=m.rope_scaling_low_freq_factor,
                    high_freq_factor=m.rope_scaling_high_freq_factor,
                    original_max_position_embeddings=m.rope_scaling_original_max_position_embeddings)
    out.update(
        architectures=[arch], model_type=MODEL_TYPES[family],
        num_hidden_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=heads,
        num_key_value_heads=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size,
        hidden_act="silu", rms_norm_eps=m.norm_epsilon,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        vocab_size=int(out.get("vocab_size") or vocab_size),
        rope_parameters=rope,
    )
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if family == "llama4":
        out.update(_llama4_hf(m, base or {}))
    _keep_types(out, base or {})
    return out


def _llama4_hf(m, base: dict) -> dict:
    n = m.num_layers
    pattern = moe_layer_pattern(m)
    moe_layers = [i for i, v in enumerate(pattern) if v]
    # interleave_moe_layer_step only matters to transformers when moe_layers is absent; keep the
    # imported value, else the step that generates the pattern (1 when none does)
    step = base.get("interleave_moe_layer_step") or next(
        (k for k in range(1, n + 1) if moe_layers == list(range(k - 1, n, k))), 1)
    floor = m.attn_temperature_floor_scale
    if float(floor) != int(floor):
        raise ConfigError(f"export: model.attn_temperature_floor_scale={floor}; Llama-4's config.json "
                          "field floor_scale is an integer")
    return dict(
        intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
        intermediate_size_mlp=m.ffn_hidden_size or 4 * m.hidden_size,
        num_local_experts=m.num_moe_experts, num_experts_per_tok=m.moe_router_topk,
        interleave_moe_layer_step=step, moe_layers=moe_layers,
        # transformers computes its default NoPE list from the interval even when no_rope_layers is
        # given (0 divides by zero), so a model without NoPE layers still gets a positive interval
        no_rope_layer_interval=m.no_rope_freq or base.get("no_rope_layer_interval") or 4,
        no_rope_layers=[int(not m.no_rope_freq or (i + 1) % m.no_rope_freq != 0) for i in range(n)],
        use_qk_norm=m.qk_l2_norm, attention_chunk_size=m.attention_chunk_size,
        attn_temperature_tuning=m.attn_temperature_tuning,
        floor_scale=int(floor), attn_scale=m.attn_temperature_scale,
        attention_bias=False,
    )


def _keep_types(out: dict, base: dict) -> None:
    """Write every field back with the JSON type it was imported with: our config holds some
    integers as floats, and transformers 5's strict config classes refuse ``8.0`` for an int."""
    for key, old in base.items():
        new = out.get(key)
        if type(old) is int and isinstance(new, float) and new.is_integer():
            out[key] = int(new)
        elif type(old) is float and type(new) is int:
            out[key] = float(new)
