"""Sharded checkpoints with megatron-core ``dist_checkpointing``.

Layout (Megatron-LM's names)::

    <run>/checkpoints/iter_0000100/          one complete checkpoint
    <run>/checkpoints/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and the
``latest`` pointer is replaced atomically last, so a job killed mid-save leaves the previous
checkpoint as the latest one and never a half-written directory under a final name. Before the
rename rank 0 adds a manifest of every file's size (and sha256 with ``checkpoint.verify``), so a
checkpoint damaged later is recognised (integrity.py): ``--resume`` loads the newest *complete*
checkpoint, warning about each damaged newer one and leaving it in place; an explicitly named
damaged checkpoint is a one-line CheckpointError. ``checkpoint.keep_last`` deletes older complete
checkpoints after a save, never damaged ones.

Model tensors are saved as ShardedTensors, so a checkpoint reloads under another TP/PP layout.
RNG states are per rank and only restored when the layout is unchanged (bit-for-bit resume).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_kd import platform
from megatron_kd.training import integrity
from megatron_kd.training.integrity import CheckpointError  # noqa: F401 -- where callers import it

LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_latest(root) -> Optional[int]:
    """Iteration the ``latest`` pointer names (the newest checkpoint written), or None."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def _warn(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def checkpoint_problem(ckpt, checksums: bool = False) -> Optional[str]:
    """integrity.problem; with checksums in a job of several ranks each rank hashes a share of the
    files (a collective then: every rank calls it, and all get the same answer)."""
    dist = torch.distributed
    if checksums and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, integrity.problem(ckpt, True, part=(dist.get_rank(), len(gathered))))
        return integrity.first_problem(gathered)
    return integrity.problem(ckpt, checksums)


def _newest_complete_hint(root: Path, besides: Path) -> str:
    for _, d in integrity.iteration_dirs(root):
        if d != besides and integrity.problem(d) is None:
            return f"; the newest complete one is {d}: name it to load it"
    return ""


def resolve_load_dir(path, checksums: bool = False) -> Path:
    """Accept a run dir, its checkpoints/ dir, or one iter_* dir; return a complete iter_* dir.

    A run dir means the checkpoint its ``latest`` pointer names (without a pointer: its newest
    iter_* dir). A damaged one is a CheckpointError, not a fallback: which weights a named run
    gives (a teacher, phase 1 for phase 2) must not depend on which files survived. ``--resume``,
    where falling back only costs recomputed steps, falls back instead (select_resume).
    """
    p = Path(path)
    ckpt = None
    for root in (p, p / "checkpoints"):
        latest, dirs = read_latest(root), integrity.iteration_dirs(root)
        if latest is not None or dirs:
            ckpt = iteration_dir(root, latest) if latest is not None else dirs[0][1]
            break
    if ckpt is None:
        if not integrity.looks_like_checkpoint(p):
            raise CheckpointError(
                f"checkpoint.load={path}: no {LATEST} and not a checkpoint directory (expected a run dir, "
                "its checkpoints/ folder, or an iter_* folder)")
        ckpt = p
    why = checkpoint_problem(ckpt, checksums)
    if why:
        raise CheckpointError(f"{ckpt}: damaged checkpoint ({why}){_newest_complete_hint(ckpt.parent, ckpt)}")
    return ckpt


def select_resume(root, checksums: bool = False, strict: bool = False) -> Optional[Path]:
    """The newest complete checkpoint under root for ``--resume`` (None: there is none, start at 0).

    Scans the iter_* dirs rather than trusting the ``latest`` pointer, which may name a damaged
    or deleted checkpoint. Each damaged newer one gets a warning naming it and the file, and is
    left in place (it may be repairable, e.g. a shard still being copied). ``strict``
    (``checkpoint.load_strict``): a damaged newest checkpoint is a CheckpointError instead. Only
    damaged checkpoints and no complete one is always an error: starting over would later
    replace them.
    """
    damaged = []
    for _, ckpt in integrity.iteration_dirs(root):
        why = checkpoint_problem(ckpt, checksums)
        if why is None:
            for bad, reason in damaged:
                _warn(f"checkpoint {bad} is damaged ({reason}); resuming from {ckpt.name} instead and "
                      "leaving it in place")
            return ckpt
        if strict:
            raise CheckpointError(f"checkpoint.load_strict: the newest checkpoint {ckpt} is damaged ({why}); "
                                  "set checkpoint.load_strict=false to resume from an older complete one")
        damaged.append((ckpt, why))
    if damaged:
        listed = "; ".join(f"{d.name}: {w}" for d, w in damaged[:3])
        raise CheckpointError(f"--resume: no complete checkpoint under {root} ({listed}); move the damaged "
                              "ones away to start over, or pass --overwrite")
    return None


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
                    consumed_samples: int, extra: Optional[dict] = None, checksums: bool = False,
                    keep_last: Optional[int] = None) -> Path:
    """Write iteration's checkpoint (collective). ``checksums``: record every file's sha256 in the
    manifest (the ranks share the hashing); ``keep_last``: then delete all but the newest N
    complete checkpoints (apply_keep_last)."""
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
    _write_manifest(tmp, iteration, checksums)
    if rank == 0:
        if final.exists():
            _replace_existing(final, checksums)
        os.replace(tmp, final)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(f"{iteration}\n")
        os.replace(pointer, root / LATEST)
        if keep_last is not None:
            apply_keep_last(root, keep_last)
    torch.distributed.barrier()
    return final


def _write_manifest(tmp: Path, iteration: int, checksums: bool) -> None:
    """Rank 0 writes the manifest once every rank's files are in tmp (after the barrier). With
    checksums each rank hashes names[rank::world], so the reading is shared like the writing."""
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    if not checksums and rank != 0:
        return
    names = integrity.list_files(tmp)
    records = integrity.file_records(tmp, names, checksums, part=(rank, world))
    if checksums and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, records)
        for part in parts:  # sizes from every part agree; each adds its share of the hashes
            for name, rec in part.items():
                records.setdefault(name, {}).update(rec)
    if rank == 0:
        integrity.write_manifest(tmp, iteration, records)


def _replace_existing(final: Path, checksums: bool) -> None:
    """A checkpoint of this iteration already exists: a complete one is replaced, a damaged one
    (resume fell back past it) is renamed ``.damaged`` and kept: deleting is for people. Judged
    by the standard resume used (checksums with ``checkpoint.verify``), or a checkpoint resume
    rejected for a bad checksum would be deleted here as complete."""
    why = integrity.problem(final, checksums)
    if why is None:
        doomed = final.with_name(final.name + ".deleting")
        os.replace(final, doomed)
        shutil.rmtree(doomed)
        return
    aside, n = final.with_name(final.name + ".damaged"), 1
    while aside.exists():
        aside, n = final.with_name(f"{final.name}.damaged{n}"), n + 1
    os.replace(final, aside)
    _warn(f"checkpoint {final} was damaged ({why}); kept as {aside.name}, replaced by the new one")


def apply_keep_last(root, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints older than the newest ``keep_last`` complete ones (rank 0,
    after the new checkpoint and the pointer are in place, so a kill at any point still leaves
    the newest complete checkpoint). Damaged ones are never deleted: each gets a warning. A
    checkpoint is renamed ``.deleting`` before its files go, so a kill mid-delete leaves no
    half-deleted ``iter_*`` dir; leftovers of such kills are removed here. Returns the deleted."""
    root = Path(root)
    for left in root.glob("iter_*.deleting"):
        shutil.rmtree(left, ignore_errors=True)
    complete, deleted = 0, []
    for _, ckpt in integrity.iteration_dirs(root):
        why = integrity.problem(ckpt)
        if why is not None:
            _warn(f"checkpoint.keep_last: leaving damaged checkpoint {ckpt} ({why}); delete it by hand")
            continue
        complete += 1
        if complete > keep_last:
            doomed = ckpt.with_name(ckpt.name + ".deleting")
            os.replace(ckpt, doomed)
            shutil.rmtree(doomed)
            deleted.append(ckpt)
    return deleted


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
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as e:  # noqa: BLE001 -- resolve_load_dir read it a moment ago; say which file
        raise CheckpointError(f"{ckpt / 'common.pt'}: unreadable ({type(e).__name__}: {e})") from e
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


_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def check_model_shapes(path, model_chunks, key: str, section: str = "model", exact: bool = False) -> None:
    """CheckpointError naming the first tensor of ``model_chunks`` (built from config ``section``)
    that the checkpoint at ``path`` (named by config key ``key``) lacks or holds in another
    shape. Reads only the checkpoint's metadata, so it runs before the run directory is written;
    megatron's load would fail later, deep inside torch.distributed.checkpoint, with a traceback.

    The embedding and output layer may differ in their padded vocab rows, as megatron's load
    allows (``allow_shape_mismatch``: another TP pads differently; extra rows load as zeros),
    unless ``exact`` (a frozen teacher: zero rows would add logits to its softmax)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ckpt = resolve_load_dir(path)
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for chunk in model_chunks:
        for sh in nested_values(_unwrap(chunk).sharded_state_dict()):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in saved:
                raise CheckpointError(f"{key} {ckpt}: tensor {sh.key} of the {section} config is "
                                      "missing from the checkpoint")
            got, want = tuple(saved[sh.key].global_shape), tuple(sh.global_shape)
            padding_only = len(got) == len(want) and got[1:] == want[1:] and sh.key.endswith(_VOCAB_ROWS)
            if got == want or (padding_only and sh.allow_shape_mismatch and not exact):
                continue
            why = (f": a padded vocab of {got[0]} rows in the checkpoint vs {want[0]} here (another "
                   "tokenizer or make_vocab_size_divisible_by)") if padding_only else ""
            raise CheckpointError(f"{key} {ckpt}: tensor {sh.key} has shape {got} in the checkpoint "
                                  f"but {want} from the {section} config{why}")
