"""config.json <-> model section without building a model: Llama-4 layer patterns transformers
accepts (MoE layers that are not every N-th of a divisible count) and the JSON types of the
export, checked with transformers' own strict config class."""
import pytest

from megatron_kd.config import ConfigError, ModelConfig, load_config, moe_layer_pattern
from megatron_kd.interop import hf_config as hfc


def _llama4(**kw) -> dict:
    import transformers as tf

    base = dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, num_local_experts=4,
                no_rope_layer_interval=3, attention_chunk_size=8, floor_scale=4, attn_scale=0.5)
    cfg = tf.Llama4TextConfig(**{**base, **kw}).to_dict()
    cfg["architectures"] = ["Llama4ForCausalLM"]
    return cfg


def _model(hf: dict) -> ModelConfig:
    return ModelConfig(**hfc.model_section(hf, "config.json"))


@pytest.mark.parametrize("kw, pattern, freq", [
    ({"interleave_moe_layer_step": 2}, [0, 1, 0], [0, 1, 0]),  # 2 does not divide 3 layers
    ({"interleave_moe_layer_step": 3}, [0, 0, 1], 3),  # a divisor stays an int
    ({"interleave_moe_layer_step": 1}, [1, 1, 1], 1),
    ({"moe_layers": [0, 2]}, [1, 0, 1], [1, 0, 1]),  # an explicit list overrides the step
])
def test_any_moe_pattern_transformers_accepts_imports(kw, pattern, freq):
    hf = _llama4(**kw)
    m = _model(hf)
    assert m.moe_layer_freq == freq
    assert moe_layer_pattern(m) == pattern == [int(i in hf["moe_layers"]) for i in range(3)]


@pytest.mark.parametrize("kw", [{"interleave_moe_layer_step": 2}, {"moe_layers": [0, 2]},
                                {"interleave_moe_layer_step": 1}])
def test_export_is_accepted_by_transformers_strict_config(kw):
    import transformers as tf

    src = _llama4(**kw)
    m = _model(src)
    for base in (src, None):  # with the imported config.json, and for a model trained from scratch
        out = hfc.hf_config(m, 256, "llama4", base)
        back = tf.Llama4TextConfig(**{k: v for k, v in out.items() if k != "architectures"})
        assert back.moe_layers == src["moe_layers"]
        assert back.no_rope_layers == src["no_rope_layers"]
        assert type(out["floor_scale"]) is int and out["floor_scale"] == 4
        assert _model(out) == m  # and it imports back to the same model


def test_export_of_a_model_without_nope_layers_loads():
    """no_rope_freq unset: transformers derives its default NoPE list from the interval even when
    no_rope_layers is given, so the interval must not be 0 (ZeroDivisionError before the fix)."""
    import transformers as tf

    m = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    num_moe_experts=4, moe_layer_freq=[1, 0], moe_ffn_hidden_size=48, qk_l2_norm=True,
                    attn_temperature_floor_scale=8192.0)
    out = hfc.hf_config(m, 256, "llama4")
    back = tf.Llama4TextConfig(**{k: v for k, v in out.items() if k != "architectures"})
    assert back.no_rope_layers == [1, 1] and back.moe_layers == [0]
    assert out["floor_scale"] == 8192 and type(out["floor_scale"]) is int
    assert _model(out).no_rope_freq is None


def test_types_follow_the_imported_config():
    m = _model(_llama4())
    base = dict(_llama4(), rms_norm_eps=1e-5, initializer_range=0.02, max_position_embeddings=4096)
    out = hfc.hf_config(m, 256, "llama4", base)
    for key, value in base.items():
        if key in out and key not in ("dtype", "transformers_version"):
            assert type(out[key]) is type(value), key


@pytest.mark.parametrize("kw, words", [
    ({"moe_layers": [0, 3]}, "moe_layers=[0, 3]"),
    ({"moe_layers": [1, 1]}, "distinct layer indices"),
])
def test_bad_moe_layers_named(kw, words):
    hf = _llama4()
    hf.update(kw)
    with pytest.raises(ConfigError, match="config.json: moe_layers") as e:
        hfc.model_section(hf, "config.json")
    assert words in str(e.value)


def test_moe_layer_freq_list_in_recipes(tmp_path):
    cfg = load_config(None, ["model.num_layers=3", "model.num_moe_experts=2", "model.moe_layer_freq=[0,1,1]"])
    assert cfg.model.moe_layer_freq == [0, 1, 1] and moe_layer_pattern(cfg.model) == [0, 1, 1]
    with pytest.raises(ConfigError, match=r"model.moe_layer_freq=\[0, 1\]: expected a 0/1 list with one entry "
                                          r"per layer \(num_layers=3\)"):
        load_config(None, ["model.num_layers=3", "model.num_moe_experts=2", "model.moe_layer_freq=[0,1]"])
    with pytest.raises(ConfigError, match="model.moe_layer_freq=2: expected a positive divisor"):
        load_config(None, ["model.num_layers=3", "model.num_moe_experts=2", "model.moe_layer_freq=2"])
