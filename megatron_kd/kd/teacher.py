"""Build the frozen teacher in the student's layout and load it from a project checkpoint."""
from __future__ import annotations

from pathlib import Path

import yaml

from megatron_kd.config import ConfigError, RunConfig


def check_teacher_config(cfg: RunConfig, student_vocab_size: int) -> None:
    """Checks that need no model: run before anything is written."""
    from megatron_kd.data import DataError, load_tokenizer
    from megatron_kd.models.builder import padded_vocab_size
    from megatron_kd.training import checkpointing

    if cfg.kd.alpha == 0:
        return
    t = cfg.teacher
    if t is None or not t.load:
        raise ConfigError(f"kd.alpha={cfg.kd.alpha} needs a teacher: set teacher.load (a checkpoint) "
                          "and the teacher's shape in the teacher section")
    ckpt = checkpointing.resolve_load_dir(t.load)
    teacher_tok, source = _teacher_tokenizer(t.tokenizer_model, ckpt)
    if teacher_tok:
        try:
            teacher_vocab = load_tokenizer(teacher_tok).vocab_size
        except DataError as e:
            raise DataError(f"{source.rstrip(':')}: {e}") from None
        if teacher_vocab != student_vocab_size:
            raise ConfigError(
                f"teacher vocab size {teacher_vocab} ({source} {teacher_tok}) differs from the student's "
                f"vocab size {student_vocab_size} (data.tokenizer_model {cfg.data.tokenizer_model}); "
                "teacher and student must share the tokenizer")
    tp = cfg.parallel.tensor_model_parallel_size
    ps = padded_vocab_size(student_vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
    pt = padded_vocab_size(student_vocab_size, t.make_vocab_size_divisible_by, tp)
    if ps != pt and tp > 1:
        raise ConfigError(
            f"teacher.make_vocab_size_divisible_by={t.make_vocab_size_divisible_by} pads the vocab to "
            f"{pt} but the student's ({cfg.model.make_vocab_size_divisible_by}) to {ps}; at "
            f"tensor_model_parallel_size={tp} their vocab shards must cover the same ids")
    stages = cfg.parallel.pipeline_model_parallel_size * (cfg.parallel.virtual_pipeline_model_parallel_size or 1)
    if t.num_layers % stages:
        raise ConfigError(
            f"teacher.num_layers={t.num_layers} cannot share the student's {stages} pipeline stages")
    if t.num_attention_heads % tp or (t.num_query_groups or t.num_attention_heads) % tp:
        raise ConfigError(
            f"teacher heads ({t.num_attention_heads}) / query groups ({t.num_query_groups}) are not "
            f"divisible by tensor_model_parallel_size={tp}")


def _teacher_tokenizer(tokenizer_model, ckpt: Path):
    """(path, where it is named) of the teacher's tokenizer: teacher.tokenizer_model, else the
    data.tokenizer_model in the config.yaml of the run the checkpoint belongs to (every run dir,
    converted ones included, has one). The padded embedding cannot tell: vocabularies of 280 and
    300 both pad to 320 rows and the teacher would score the wrong ids silently."""
    if tokenizer_model:
        return tokenizer_model, "teacher.tokenizer_model"
    for run in (ckpt.parent.parent, ckpt.parent, ckpt):
        config = run / "config.yaml"
        if config.is_file():
            try:
                tok = (yaml.safe_load(config.read_text()).get("data") or {}).get("tokenizer_model")
            except (yaml.YAMLError, AttributeError):
                return None, None
            if tok and Path(tok).exists():
                return tok, f"data.tokenizer_model in {config}:"
            return None, None
    return None, None


def check_checkpoint_shapes(teacher_chunks, path) -> None:
    """Name the first tensor whose shape in the checkpoint differs from the teacher config's."""
    from megatron_kd.training import checkpointing

    checkpointing.check_model_shapes(path, teacher_chunks, "teacher.load", section="teacher", exact=True)


def build_teacher_chunks(cfg: RunConfig, vocab_size: int) -> list:
    """Teacher chunks for this rank's stages, loaded and frozen (no optimizer ever sees them)."""
    from megatron_kd.kd.pair import freeze
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    t, vp = cfg.teacher, cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = [freeze(build_model(t, cfg.parallel, vocab_size, cfg.data.seq_length, bf16=t.bf16,
                                 vp_stage=stage if vp else None))
              for stage in range(vp or 1)]
    check_checkpoint_shapes(chunks, t.load)
    checkpointing.load_model_weights(t.load, chunks)
    return chunks
