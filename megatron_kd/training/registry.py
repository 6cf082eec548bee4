"""Train specs: what the shared training loop runs, registered by the layer that defines it.

A :class:`TrainSpec` names how to build this rank's model chunks, the objective (what a
micro-batch computes, training/objective.py's contract) and, where setup or the step differs,
a :class:`~megatron_kd.training.loop.Trainer` subclass. The loop asks the registry for the spec
the config selects and never imports an objective's package, so training/ stays below kd/ and
longred/ (tests/unit/test_layering.py) and a new objective is a new module, not an ``if`` in the
loop (torchtitan's ``TrainSpec`` / ``register_train_spec``).

training/ registers only ``"ce"``; ``megatron_kd.train_specs.register_all()`` registers
``"kd"`` (kd/train_spec.py) and ``"longred"`` (longred/train_spec.py), and
``megatron_kd.run.train`` calls it first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_kd.config import ConfigError, RunConfig
from megatron_kd.training.objective import CrossEntropyObjective


@dataclass(frozen=True)
class TrainSpec:
    name: str
    # (cfg, device) -> objective with .name and .forward_step (training/objective.py)
    build_objective: Callable[[RunConfig, Any], Any]
    # (cfg, vocab_size) -> this rank's pipeline chunks; None: the plain student chunks
    # (training.loop.build_student_chunks), which a spec's builder may wrap
    build_model_chunks: Optional[Callable[[RunConfig, int], list]] = None
    # the Trainer subclass; None: training.loop.Trainer
    trainer_cls: Optional[type] = None
    # (cfg, vocab_size) -> None, raising ConfigError: checks that need no model, run with the
    # loop's own input checks, before anything is written
    check_config: Optional[Callable[[RunConfig, int], None]] = None


_SPECS: dict = {}


def register_train_spec(spec: TrainSpec) -> None:
    """Add ``spec`` under its name; registering the same spec again is a no-op."""
    have = _SPECS.get(spec.name)
    if have is not None and have is not spec:
        raise ValueError(f"train spec {spec.name!r} is already registered ({have}); "
                         "pick another name")
    _SPECS[spec.name] = spec


def registered_train_specs() -> list:
    return sorted(_SPECS)


def select_train_spec(cfg: RunConfig) -> tuple:
    """(spec name, the config setting that selects it): LongReD with a ``longred`` section, KD with
    ``kd.alpha > 0`` (from a teacher cache with ``kd.teacher_source=cache``), else CE (phase 1 and the alpha = 0 baseline: no teacher is built or run)."""
    if cfg.longred is not None:
        return "longred", "a longred section"
    if cfg.kd.alpha > 0 and cfg.kd.teacher_source == "cache":
        return "kd_cache", f"kd.alpha={cfg.kd.alpha} and kd.teacher_source=cache"
    if cfg.kd.alpha > 0:
        return "kd", f"kd.alpha={cfg.kd.alpha}"
    return "ce", f"kd.alpha={cfg.kd.alpha} and no longred section"


def get_train_spec(cfg: RunConfig, name: Optional[str] = None) -> TrainSpec:
    """The spec named ``name``, else the one the config selects; a clear ConfigError if it is not
    registered (the caller skipped ``megatron_kd.train_specs.register_all()``)."""
    why = "asked for by name"
    if name is None:
        name, setting = select_train_spec(cfg)
        why = f"selected by {setting}"
    if name not in _SPECS:
        raise ConfigError(f"train spec {name!r} ({why}) is not registered (registered: "
                          f"{', '.join(registered_train_specs()) or 'none'}): train through "
                          "megatron_kd.run.train, or call megatron_kd.train_specs.register_all() first")
    return _SPECS[name]


def _cross_entropy(cfg: RunConfig, device):
    return CrossEntropyObjective(device)


CE_SPEC = TrainSpec(name="ce", build_objective=_cross_entropy)
register_train_spec(CE_SPEC)
