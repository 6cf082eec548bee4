"""Sharded checkpoints with megatron-core ``dist_checkpointing``.

Layout (Megatron-LM's names)::

    <run>/checkpoints/iter_0000100/          one complete checkpoint
    <run>/checkpoints/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and the
``latest`` pointer is replaced atomically last, so a job killed mid-save leaves the previous
checkpoint as the latest one and never a half-written directory under a final name.

Model tensors are saved as ShardedTensors, so a checkpoint reloads under another TP/PP layout.
RNG states are per rank and only restored when the layout is unchanged (bit-for-bit resume).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_kd import platform

LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest(root) -> Optional[int]:
    """Iteration of the newest complete checkpoint under root, or None."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, got {text!r}")
    iteration = int(text)
    if not iteration_dir(root, iteration).is_dir():
        raise CheckpointError(f"{path} names iteration {iteration} but {iteration_dir(root, iteration)} is missing")
    return iteration


def resolve_load_dir(path) -> Path:
    """Accept a run dir, its checkpoints/ dir, or one iter_* dir; return an iter_* dir."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            return iteration_dir(root, read_latest(root))
    if (p / "metadata.json").is_file():
        return p
    raise CheckpointError(
        f"checkpoint.load={path}: no {LATEST} and not a checkpoint directory (expected a run dir, "
        "its checkpoints/ folder, or an iter_* folder)"
    )


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _optimizer_metadata(optimizer) -> dict:
    # Model-space layout (param-shaped exp_avg/exp_avg_sq) reloads under another DP/TP/PP layout.
    # megatron-core 0.16 removed ShardedTensor.flattened_range, which 'fully_sharded_model_space'
    # still builds (save fails with "flattened_range is not supported"); 'fully_reshardable' is
    # its replacement.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_sharded_state_dict(optimizer, state: dict, is_loading: bool):
    with _world_tensors_keep_bucket_padding(optimizer):
        return optimizer.sharded_state_dict(state, is_loading=is_loading,
                                            metadata=_optimizer_metadata(optimizer))


@contextlib.contextmanager
def _world_tensors_keep_bucket_padding(optimizer):
    """megatron-core 0.16.1 defect, on any device: the distributed optimizer's
    'fully_reshardable' state slices its gathered buffer-wide tensors with each parameter's index
    in the *padded* gradient buffer, but ``get_parameter_state_dp_zero`` concatenates the
    buckets *without* the padding between them. With one bucket (megatron's default without
    ``overlap_grad_reduce``) nothing shifts; with several (overlap, ``ddp_bucket_size``) every
    parameter after the first bucket saved another parameter's Adam moments and main weights
    (tests/multirank/test_layouts.py: a resumed run's loss jumped from 5.96 to 6.23). Here the
    gathered tensors are put back at the buckets' offsets for the duration of the call."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
               if isinstance(o, DistributedOptimizer)]
    for opt in patched:
        def padded(*args, _opt=opt, _gather=opt.get_parameter_state_dp_zero, **kwargs):
            state = _gather(*args, **kwargs)
            for gbuf_idx in range(len(_opt.gbuf_ranges) if state is not None else 0):
                buffer = _opt.buffers[gbuf_idx]
                for world in state[gbuf_idx].values():
                    for key in [k for k, v in world.items() if torch.is_tensor(v)]:
                        flat, out, at = world[key], torch.zeros(buffer.numel, dtype=world[key].dtype), 0
                        for bucket in buffer.buckets:
                            n = bucket.numel_unpadded
                            out[bucket.offset:bucket.offset + n] = flat[at:at + n]
                            at += n
                        assert at == flat.numel(), (at, flat.numel())
                        world[key] = out
            return state

        opt.get_parameter_state_dp_zero = padded  # this instance only, for this call
    try:
        yield
    finally:
        for opt in patched:
            del opt.get_parameter_state_dp_zero


def _rng_sharded(data=None):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch.distributed.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def save_checkpoint(root, iteration: int, model_chunks, optimizer, scheduler,
                    consumed_samples: int, extra: Optional[dict] = None) -> Path:
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a job killed mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
    torch.distributed.barrier()

    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:  # None: weights only (an imported HF checkpoint, interop/convert.py)
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, state, is_loading=False)
    state["rng_state"] = _rng_sharded(platform.rng_states())
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    state["layout"] = _layout()
    state["extra"] = extra or {}
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(f"{iteration}\n")
        os.replace(pointer, root / LATEST)
    torch.distributed.barrier()
    return final


def _init_empty_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh (never stepped) DistributedOptimizer the state Adam's first step would create.

    megatron-core 0.16 without Apex/TE (torch.optim.Adam/AdamW, the CPU case):
    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` first calls ``state_dict()``,
    which asserts that all parameters share one ``step`` and fails on an empty state (resume
    into a new process). Zeros and ``step = 0`` are exactly torch Adam's lazy initialisation,
    and the load then overwrites them.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(opt.optimizer, torch.optim.Adam):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, load_rng: bool = True) -> dict:
    """Load into the given model chunks (and optimizer/scheduler/RNG when given).

    Returns the checkpoint's common state: iteration, consumed_samples, layout, extra.
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_load_dir(path)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    state = _model_sharded_state_dict(model_chunks)
    model_keys = list(state)
    same_layout = common.get("layout") == _layout()
    if optimizer is not None:
        _init_empty_distributed_optimizer_state(optimizer)
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, state, is_loading=True)
    restore_rng = load_rng and same_layout
    if restore_rng:
        state["rng_state"] = _rng_sharded()
    loaded = dist_checkpointing.load(state, str(ckpt))
    for key, chunk in zip(model_keys, model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if restore_rng:
        platform.set_rng_states(loaded["rng_state"])
    return {k: common.get(k) for k in ("iteration", "consumed_samples", "layout", "extra")} | {
        "path": str(ckpt), "rng_restored": restore_rng}


def load_model_weights(path, model_chunks) -> dict:
    """Weights only (a teacher, or phase 2 starting from phase 1): no optimizer, scheduler, RNG."""
    return load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, load_rng=False)
