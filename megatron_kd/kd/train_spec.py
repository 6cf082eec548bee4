"""The KD train spec ("kd", selected by ``kd.alpha > 0``): each pipeline chunk is a
DistillationModel (the student chunk and the frozen teacher chunk of the same stage), the
objective is alpha * KD + (1 - alpha) * CE per loss-masked token, and the teacher's config is
checked with the loop's input checks, before anything is written. Registered by
``megatron_kd.train_specs.register_all()`` (training/registry.py).
"""
from __future__ import annotations

from megatron_kd.config import ConfigError, RunConfig
from megatron_kd.kd.teacher import check_teacher_config
from megatron_kd.training.registry import TrainSpec, register_train_spec


def use_fused_loss(cfg: RunConfig) -> bool:
    """kd.loss_impl, with 'auto' = fused from kd.fused_min_tokens tokens per micro-batch on."""
    if cfg.kd.loss_impl != "auto":
        return cfg.kd.loss_impl == "fused"
    return cfg.data.seq_length * cfg.train.micro_batch_size >= cfg.kd.fused_min_tokens


def check_fused_impl(cfg: RunConfig) -> None:
    """kd.fused_impl=triton, where the fused loss will run: what the Triton kernels cover, and a
    device they can run on (CUDA; on a CPU only Triton's interpreter, TRITON_INTERPRET=1)."""
    k = cfg.kd
    if k.fused_impl != "triton" or not use_fused_loss(cfg):
        return
    from megatron_kd import platform

    if k.alpha > 0 and k.top_k is not None:
        raise ConfigError(f"kd.fused_impl=triton has no kd.top_k (got {k.top_k}); use kd.fused_impl: torch")
    from megatron_kd.kd.triton_fused import check_available

    try:
        check_available(platform.cuda_available())
    except (ImportError, RuntimeError) as e:
        raise ConfigError(str(e)) from None


def check_kd_config(cfg: RunConfig, student_vocab_size: int) -> None:
    check_teacher_config(cfg, student_vocab_size)
    check_fused_impl(cfg)


def build_distillation_chunks(cfg: RunConfig, vocab_size: int) -> list:
    """This rank's student chunks (built first, as in a CE run), each paired with the teacher chunk
    of its stage (built and loaded after)."""
    from megatron.core import parallel_state as ps

    from megatron_kd.kd.distill_model import DistillationModel
    from megatron_kd.kd.teacher import build_teacher_chunks
    from megatron_kd.training.loop import build_student_chunks

    students = build_student_chunks(cfg, vocab_size)
    teachers = build_teacher_chunks(cfg, vocab_size)
    tp_group = ps.get_tensor_model_parallel_group()
    fused = use_fused_loss(cfg)
    return [DistillationModel(s, t, cfg.kd, vocab_size, tp_group, fused=fused)
            for s, t in zip(students, teachers)]


def distillation_objective(cfg: RunConfig, device):
    from megatron_kd.kd.objective import DistillationObjective

    return DistillationObjective(cfg.kd, device)


KD_SPEC = TrainSpec(name="kd", build_objective=distillation_objective,
                    build_model_chunks=build_distillation_chunks, check_config=check_kd_config)


def register() -> None:
    register_train_spec(KD_SPEC)
