"""training/registry.py: which spec a config selects, what an unregistered spec says, and that an
explicit ``objective_factory`` or spec name beats the selection (no process group needed)."""
import os

import pytest

from megatron_kd.config import ConfigError, load_config
from megatron_kd.training import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = {"ce": "examples/tiny/phase1_theta10k.yaml", "kd": "examples/tiny/phase2_kd_10k_to_10k.yaml",
           "longred": "examples/longred/tiny.yaml"}


def cfg_for(kind, tmp_path, *overrides):
    return load_config(os.path.join(ROOT, RECIPES[kind]), [f"checkpoint.save={tmp_path / kind}", *overrides])


@pytest.fixture
def only_ce(monkeypatch):
    """The registry as training/ alone leaves it (kd/ and longred/ not registered)."""
    monkeypatch.setattr(registry, "_SPECS", {"ce": registry.CE_SPEC})


@pytest.fixture
def all_specs(monkeypatch):
    from megatron_kd.train_specs import register_all

    monkeypatch.setattr(registry, "_SPECS", {"ce": registry.CE_SPEC})
    register_all()
    register_all()  # idempotent


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_selection_follows_the_config(kind, tmp_path, all_specs):
    cfg = cfg_for(kind, tmp_path)
    assert registry.select_train_spec(cfg)[0] == kind
    assert registry.get_train_spec(cfg).name == kind


def test_kd_alpha_zero_is_ce(tmp_path, all_specs):
    assert registry.get_train_spec(cfg_for("kd", tmp_path, "kd.alpha=0")).name == "ce"


def test_teacher_cache_selects_kd_cache(tmp_path, all_specs):
    cfg = cfg_for("kd", tmp_path, "kd.teacher_source=cache", f"kd.teacher_cache={tmp_path}")
    assert registry.get_train_spec(cfg).name == "kd_cache"
    assert registry.get_train_spec(cfg_for("kd", tmp_path, "kd.alpha=0", "kd.teacher_source=cache",
                                           f"kd.teacher_cache={tmp_path}")).name == "ce"


def test_shipped_specs(all_specs):
    from megatron_kd.kd.train_spec import KD_SPEC, build_distillation_chunks, check_kd_config
    from megatron_kd.longred.train_spec import LONGRED_SPEC
    from megatron_kd.longred.trainer import LongReDTrainer

    from megatron_kd.kd.cached_train import CACHE_SPEC, CachedKDTrainer

    assert registry.registered_train_specs() == ["ce", "kd", "kd_cache", "longred"]
    assert CACHE_SPEC.build_model_chunks is None and CACHE_SPEC.trainer_cls is CachedKDTrainer  # no teacher
    assert KD_SPEC.build_model_chunks is build_distillation_chunks
    assert KD_SPEC.check_config is check_kd_config and KD_SPEC.trainer_cls is None
    assert LONGRED_SPEC.trainer_cls is LongReDTrainer
    assert registry.CE_SPEC.build_model_chunks is None and registry.CE_SPEC.trainer_cls is None


def test_unregistered_spec_is_one_clear_line(tmp_path, only_ce):
    with pytest.raises(ConfigError) as e:
        registry.get_train_spec(cfg_for("kd", tmp_path, "kd.alpha=0.5"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "'kd' (selected by kd.alpha=0.5)" in msg and "registered: ce" in msg
    assert "megatron_kd.run.train" in msg and "register_all()" in msg


def test_loop_train_refuses_before_any_setup(tmp_path, only_ce, monkeypatch):
    """training.loop.train on a KD config without the KD spec: the ConfigError, before the
    process group or the run directory."""
    from megatron_kd import distributed
    from megatron_kd.training.loop import train

    monkeypatch.setattr(distributed, "init_distributed", lambda: pytest.fail("initialised"))
    with pytest.raises(ConfigError, match="train spec 'longred'"):
        train(cfg_for("longred", tmp_path))
    assert not (tmp_path / "longred").exists()


def test_overrides_beat_the_selection(tmp_path, all_specs):
    from megatron_kd.kd.train_spec import KD_SPEC
    from megatron_kd.training.loop import Trainer

    cfg = cfg_for("kd", tmp_path)
    assert registry.get_train_spec(cfg, "ce") is registry.CE_SPEC

    def mine(cfg, device):
        return None

    t = Trainer(cfg, tmp_path / "run")
    assert t.spec is KD_SPEC and t.objective_factory is KD_SPEC.build_objective
    t = Trainer(cfg, tmp_path / "run", objective_factory=mine)
    assert t.spec is KD_SPEC and t.objective_factory is mine  # the demo's passkey teacher


def test_a_name_is_registered_once(all_specs):
    registry.register_train_spec(registry.CE_SPEC)  # the same spec again: fine
    with pytest.raises(ValueError, match="already registered"):
        registry.register_train_spec(registry.TrainSpec(name="kd", build_objective=lambda c, d: None))
