"""The LongReD train spec ("longred", selected by a ``longred`` section): each pipeline chunk is
a LongReDModel (student + frozen original model of the same stage), the trainer is
LongReDTrainer (three streams, layer selection, per-stream reports), the objective
LongReDObjective. Registered by ``megatron_kd.train_specs.register_all()``
(training/registry.py); docs/longred.md.
"""
from __future__ import annotations

from megatron_kd.config import RunConfig
from megatron_kd.longred.trainer import LongReDTrainer
from megatron_kd.training.registry import TrainSpec, register_train_spec


def build_longred_chunks(cfg: RunConfig, vocab_size: int) -> list:
    """This rank's student chunks (kd.alpha = 0: plain), each paired with the original model's
    chunk of its stage; the selected layers are set after the selection (LongReDTrainer.setup)."""
    from megatron_kd.kd.teacher import build_teacher_chunks
    from megatron_kd.longred.model import LongReDModel
    from megatron_kd.training.loop import build_student_chunks

    students = build_student_chunks(cfg, vocab_size)
    teachers = build_teacher_chunks(cfg, vocab_size)
    lr = cfg.longred
    return [LongReDModel(s, t, lr.selected_layers or [], cfg.model.num_layers,
                         lr.alpha_short, lr.alpha_s2l) for s, t in zip(students, teachers)]


def longred_objective(cfg: RunConfig, device):
    from megatron_kd.longred.objective import LongReDObjective

    return LongReDObjective(device)


LONGRED_SPEC = TrainSpec(name="longred", build_objective=longred_objective,
                         build_model_chunks=build_longred_chunks, trainer_cls=LongReDTrainer)


def register() -> None:
    register_train_spec(LONGRED_SPEC)
