"""config: YAML recipes + dotted overrides, one-line errors naming the key, layout arithmetic."""
import dataclasses
import glob
import math
import os

import pytest

from megatron_kd.config import (ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig,
                                TrainConfig, dump_config, load_config, validate_layout)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.yaml"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "megatron_kd", "recipes", "*.yaml")))


def _write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ----------------------------------------------------------------------------- YAML + overrides


def test_yaml_then_overrides_win(tmp_path):
    path = _write(tmp_path, "model:\n  hidden_size: 96\n  num_attention_heads: 4\n"
                            "train:\n  lr: 1.0e-3\n  min_lr: 1.0e-5\n  micro_batch_size: 4\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.num_layers=6"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == pytest.approx(1e-5)  # untouched by the overrides
    assert cfg.train.micro_batch_size == 4
    assert cfg.model.hidden_size == 96 and cfg.model.num_layers == 6
    assert cfg.data == DataConfig()  # sections absent from the file keep their defaults


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `3e-4` (no dot) as a string; the float field still gets a float.
    cfg = load_config(_write(tmp_path, "train:\n  lr: 3e-4\n  min_lr: 1e-5\n"))
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("false", False), ("True", True), ("yes", True), ("no", False),
    ("1", True), ("0", False),
])
def test_bool_overrides(raw, expected):
    assert load_config(None, [f"data.reset_position_ids={raw}"]).data.reset_position_ids is expected


@pytest.mark.parametrize("raw", ["null", "None", "none", "~", ""])
def test_none_overrides(raw):
    cfg = load_config(None, ["train.exit_interval=5", f"train.exit_interval={raw}"])
    assert cfg.train.exit_interval is None


def test_optional_int_set_from_override():
    cfg = load_config(None, ["model.num_query_groups=2", "train.exit_interval=7"])
    assert cfg.model.num_query_groups == 2 and cfg.train.exit_interval == 7


@pytest.mark.parametrize("raw", ["8.0", "8", "8e0", "8.0e0"])
def test_int_from_integral_float(raw):
    value = load_config(None, [f"train.global_batch_size={raw}"]).train.global_batch_size
    assert value == 8 and type(value) is int


def test_int_from_integral_float_in_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  train_iters: 1.0e+3\n"))
    assert cfg.train.train_iters == 1000 and type(cfg.train.train_iters) is int


def test_string_field_keeps_commas():
    assert load_config(None, ["data.split=90,10,0"]).data.split == "90,10,0"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override,suggestion", [
    ("model.hiden_size=3", "model.hidden_size"),
    ("train.lerning_rate=1e-3", "train.lr"),
    ("train.seq_length=128", "data.seq_length"),  # right name, wrong section
    ("train.micro_batch=2", "train.micro_batch_size"),
    ("hidden_size=64", "model.hidden_size"),  # section forgotten
])
def test_unknown_key_suggests(override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and f"did you mean {suggestion!r}" in msg and "\n" not in msg


def test_unknown_key_without_close_match_has_no_hint():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.xyzzy=1"])
    assert "train.xyzzy" in str(e.value) and "did you mean" not in str(e.value)


def test_unknown_section_in_yaml_names_file(tmp_path):
    path = _write(tmp_path, "modle:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'modle'" in msg and "did you mean 'model'" in msg and path in msg


def test_unknown_key_in_yaml_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*did you mean 'model\.hidden_size'"):
        load_config(_write(tmp_path, "model:\n  hiden_size: 64\n"))


def test_unknown_section_in_override():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


@pytest.mark.parametrize("override,key,expected", [
    ("train.micro_batch_size=abc", "train.micro_batch_size", "an integer"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size", "an integer"),
    ("train.micro_batch_size=true", "train.micro_batch_size", "an integer"),
    ("train.lr=fast", "train.lr", "a number"),
    ("model.swiglu=maybe", "model.swiglu", "true/false"),
    ("data.split=[1, 2]", "data.split", "a string"),
])
def test_wrong_type_names_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key) and expected in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("model.num_layers=-1", "model.num_layers"),
    ("model.normalization=BatchNorm", "model.normalization"),
    ("model.position_embedding_type=alibi", "model.position_embedding_type"),
    ("data.split=1,2", "data.split"),
    ("train.lr_decay_style=step", "train.lr_decay_style"),
    ("train.min_lr=1.0", "train.min_lr"),
    ("parallel.virtual_pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size"),
])
def test_section_post_init_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_heads_not_divisible_by_query_groups():
    with pytest.raises(ConfigError, match=r"num_attention_heads=4 .*num_query_groups=3"):
        ModelConfig(num_attention_heads=4, num_query_groups=3)


@pytest.mark.parametrize("item", ["train.lr", "train"])
def test_override_without_equals(item):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [item])


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert missing in str(e.value) and "not found" in str(e.value) and "--config" in str(e.value)


def test_invalid_yaml(tmp_path):
    path = _write(tmp_path, "model:\n  hidden_size: [64\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and "not valid YAML" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n"])
def test_yaml_top_level_not_a_mapping(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_section_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(_write(tmp_path, "train: 3\n"))


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == RunConfig()


# ----------------------------------------------------------------------------- validate_layout


def _cfg(**sections):
    cfg = RunConfig()
    for name, kwargs in sections.items():
        setattr(cfg, name, type(getattr(cfg, name))(**kwargs))
    return cfg


def test_layout_ok():
    cfg = _cfg(model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2),
               parallel=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
               train=dict(micro_batch_size=1, global_batch_size=4))
    validate_layout(cfg, 8)  # DP = 8 / (2 x 2) = 2; 4 / (1 x 2) = 2 micro-batches per step


def test_world_size_not_divisible_shows_arithmetic():
    cfg = _cfg(parallel=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=3),
               model=dict(num_layers=6))
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg, 8)
    msg = str(e.value)
    assert "world size 8" in msg and "tensor_model_parallel_size(2)" in msg
    assert "pipeline_model_parallel_size(3)" in msg and "= 6" in msg


def test_expert_parallel_layout_checks():
    moe = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=6)
    cfg = _cfg(model=moe, parallel=dict(expert_model_parallel_size=2),
               train=dict(micro_batch_size=1, global_batch_size=4))
    validate_layout(cfg, 4)  # 6 experts over 2 of the 4 data-parallel ranks
    cfg.parallel.expert_model_parallel_size = 4
    with pytest.raises(ConfigError, match=r"model.num_moe_experts=6 is not divisible by "
                                          r"parallel.expert_model_parallel_size=4"):
        validate_layout(cfg, 4)
    cfg.parallel.expert_model_parallel_size = 3
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=3 must divide data-parallel "
                                          r"size\(4\) x context_parallel_size\(1\) = 4"):
        validate_layout(cfg, 4)
    with pytest.raises(ConfigError, match="expert_model_parallel_size"):
        ParallelConfig(expert_model_parallel_size=0)


def test_heads_not_divisible_by_tp():
    cfg = _cfg(model=dict(hidden_size=96, num_attention_heads=6),
               parallel=dict(tensor_model_parallel_size=4), train=dict(micro_batch_size=1, global_batch_size=1))
    with pytest.raises(ConfigError, match=r"num_attention_heads=6 .*tensor_model_parallel_size=4"):
        validate_layout(cfg, 4)


def test_query_groups_not_divisible_by_tp():
    cfg = _cfg(model=dict(num_attention_heads=8, num_query_groups=2),
               parallel=dict(tensor_model_parallel_size=4), train=dict(micro_batch_size=1, global_batch_size=1))
    with pytest.raises(ConfigError, match=r"num_query_groups=2 .*tensor_model_parallel_size=4"):
        validate_layout(cfg, 4)


def test_layers_not_divisible_by_pp():
    cfg = _cfg(model=dict(num_layers=3), parallel=dict(pipeline_model_parallel_size=2),
               train=dict(micro_batch_size=1, global_batch_size=2))
    with pytest.raises(ConfigError, match=r"num_layers=3 .*pipeline_model_parallel_size\(2\).*= 2"):
        validate_layout(cfg, 2)


def test_layers_not_divisible_by_pp_times_vpp():
    cfg = _cfg(model=dict(num_layers=4),
               parallel=dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
               train=dict(micro_batch_size=1, global_batch_size=2))
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg, 2)
    assert "num_layers=4" in str(e.value) and "virtual_pipeline_model_parallel_size(4) = 8" in str(e.value)
    cfg.model = ModelConfig(num_layers=8)
    validate_layout(cfg, 2)  # 8 layers over 2 x 4 chunks is fine


def test_global_batch_not_divisible_by_micro_times_dp():
    cfg = _cfg(train=dict(micro_batch_size=2, global_batch_size=4))
    validate_layout(cfg, 2)  # DP=2: 2 x 2 = 4 divides 4
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg, 4)  # DP=4: 2 x 4 = 8
    msg = str(e.value)
    assert "global_batch_size=4" in msg and "micro_batch_size(2)" in msg and "data-parallel size(4)" in msg
    assert "= 8" in msg


def test_dp_accounts_for_model_parallel():
    # world 8 = TP 2 x PP 2 x DP 2; gbs 6 is not a multiple of mbs 2 x DP 2 = 4.
    cfg = _cfg(parallel=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
               train=dict(micro_batch_size=2, global_batch_size=6))
    with pytest.raises(ConfigError, match=r"data-parallel size\(2\) = 4"):
        validate_layout(cfg, 8)


def test_seq_length_vs_sequence_parallel():
    cfg = _cfg(parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True),
               data=dict(seq_length=255), train=dict(micro_batch_size=1, global_batch_size=1))
    with pytest.raises(ConfigError, match=r"seq_length=255 .*tensor_model_parallel_size=2.*sequence_parallel"):
        validate_layout(cfg, 2)
    cfg.parallel.sequence_parallel = False
    validate_layout(cfg, 2)  # without SP an odd length is fine
    cfg.parallel.sequence_parallel = True
    cfg.data = DataConfig(seq_length=256)
    validate_layout(cfg, 2)


def test_interleaved_pipeline_needs_microbatch_multiple_of_pp():
    cfg = _cfg(model=dict(num_layers=4),
               parallel=dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
               train=dict(micro_batch_size=1, global_batch_size=3))
    with pytest.raises(ConfigError, match=r"micro-batches per step \(3\)"):
        validate_layout(cfg, 2)


# ----------------------------------------------------------------------------- round trip + recipes


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, [
        "model.num_layers=4", "model.num_query_groups=2", "model.rotary_base=5e5",
        "model.untie_embeddings_and_output_weights=true", "model.position_embedding_type=learned_absolute",
        "model.max_position_embeddings=512", "data.data_path=/data/x", "data.split=90,10,0",
        "data.reset_position_ids=true", "train.lr=3e-4", "train.min_lr=3e-6", "train.exit_interval=9",
        "checkpoint.save=/runs/a", "checkpoint.finetune=true",
    ])
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    again = load_config(str(path))
    assert again == cfg
    assert again is not cfg and again.model.rotary_base == 5e5 and again.train.exit_interval == 9
    # and the defaults round-trip too (None fields, floats like 1e-5)
    dump_config(RunConfig(), path)
    assert load_config(str(path)) == RunConfig()


def test_section_types():
    cfg = RunConfig()
    assert isinstance(cfg.parallel, ParallelConfig) and isinstance(cfg.train, TrainConfig)
    assert {"model", "parallel", "data", "train", "checkpoint"} <= set(cfg.to_dict())


def test_every_section_round_trips_with_null_sections(tmp_path):
    # Optional sections (None by default) must come back as None, not as a default section.
    path = tmp_path / "config.yaml"
    cfg = RunConfig()
    dump_config(cfg, path)
    again = load_config(str(path))
    for f in dataclasses.fields(RunConfig):
        assert getattr(again, f.name) == getattr(cfg, f.name), f.name


def test_recipes_exist():
    assert len(RECIPES) >= 10, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.relpath(p, ROOT) for p in RECIPES])
def test_recipes_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    p = cfg.parallel
    # The smallest world the recipe's layout allows must validate (the recipe is consistent):
    # with expert parallelism, enough data-parallel ranks for EP to divide DP x CP.
    dp = p.expert_model_parallel_size // math.gcd(p.expert_model_parallel_size, p.context_parallel_size)
    validate_layout(cfg, p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size * dp)


def test_base_recipe_inheritance(tmp_path):
    _write(tmp_path, "model:\n  num_layers: 4\n  rotary_base: 10000\ntrain:\n  lr: 0.001\n", "a.yaml")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub", "base: ../a.yaml\nmodel:\n  rotary_base: 500000\n", "b.yaml")
    cfg = load_config(str(tmp_path / "sub" / "b.yaml"), ["train.lr=0.002"])
    assert (cfg.model.num_layers, cfg.model.rotary_base, cfg.train.lr) == (4, 500000.0, 0.002)
    _write(tmp_path, "base: d.yaml\n", "c.yaml")
    _write(tmp_path, "base: c.yaml\n", "d.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "c.yaml"))
    _write(tmp_path, "base: missing.yaml\n", "e.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "e.yaml"))


def test_paper_phase2_setups():
    """The paper's three theta setups x {KD, CE}: phase-2 theta and alpha as named."""
    for obj, alpha in (("kd", 1.0), ("ce", 0.0)):
        for setup, theta in (("10k_to_10k", 10000), ("500k_to_500k", 500000), ("10k_to_500k", 500000)):
            for scale in ("paper", "tiny"):
                cfg = load_config(os.path.join(ROOT, "examples", scale, f"phase2_{obj}_{setup}.yaml"))
                assert cfg.model.rotary_base == theta and cfg.kd.alpha == alpha
                assert cfg.checkpoint.finetune is True
    assert load_config(os.path.join(ROOT, "examples", "paper", "phase2_base.yaml")).data.seq_length == 131072
