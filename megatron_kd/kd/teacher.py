"""Build the frozen teacher in the student's layout and load it from a project checkpoint."""
from __future__ import annotations

from megatron_kd.config import ConfigError, RunConfig


def check_teacher_config(cfg: RunConfig, student_vocab_size: int) -> None:
    """Checks that need no model: run before anything is written."""
    from megatron_kd.data import load_tokenizer
    from megatron_kd.models.builder import padded_vocab_size
    from megatron_kd.training import checkpointing

    if cfg.kd.alpha == 0:
        return
    t = cfg.teacher
    if t is None or not t.load:
        raise ConfigError(f"kd.alpha={cfg.kd.alpha} needs a teacher: set teacher.load (a checkpoint) "
                          "and the teacher's shape in the teacher section")
    checkpointing.resolve_load_dir(t.load)
    if t.tokenizer_model:
        teacher_vocab = load_tokenizer(t.tokenizer_model).vocab_size
        if teacher_vocab != student_vocab_size:
            raise ConfigError(
                f"teacher.tokenizer_model {t.tokenizer_model}: vocab size {teacher_vocab} differs from "
                f"the student's data.tokenizer_model vocab size {student_vocab_size}; teacher and "
                "student must share the tokenizer")
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


def check_checkpoint_shapes(teacher_chunks, path) -> None:
    """Name the first tensor whose shape in the checkpoint differs from the teacher config's."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_kd.training import checkpointing

    ckpt = checkpointing.resolve_load_dir(path)
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for chunk in teacher_chunks:
        for sh in nested_values(chunk.sharded_state_dict()):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in saved:
                raise ConfigError(f"teacher.load {ckpt}: tensor {sh.key} of the teacher config is missing "
                                  "from the checkpoint")
            got = tuple(saved[sh.key].global_shape)
            if got != tuple(sh.global_shape):
                raise ConfigError(f"teacher.load {ckpt}: tensor {sh.key} has shape {got} in the checkpoint "
                                  f"but {tuple(sh.global_shape)} from the teacher config")


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
