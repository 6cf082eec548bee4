"""``megatron-kd cache-teacher``: run a frozen teacher once over a packed dataset and store its
top-k log-probs (+ tail mass) for every token, so many students distil from it without a teacher.

Launch like training (torchrun / srun / mpirun): world = TP x DP. Every DP rank runs the teacher
(TP-sharded, top-k chosen shard-wise: kd/cache_topk.py) over its contiguous share of the windows
and its TP rank 0 writes that share as one shard (kd/cache_format.py). The windows are the packed
dataset's, in its sample order (GPTDataset's seeded indices: same data, split, seed, seq_length and
sample count give the same windows), so training maps sample index i to cache row block i.

Every input is checked before anything is written (one line, exit 2). A killed build is resumed by
running the same command again: finished shards are kept, unfinished ones continue after their
last committed batch of windows, and the files come out identical to an uninterrupted build.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from megatron_kd.config import ConfigError, DataConfig, ParallelConfig, RunConfig, load_config

# kd/cache_format.py (numpy, the data package) is imported where it is used.
BUILD, MANIFEST = "build.json", "manifest.json"

SPLITS = ("train", "valid")


def tokenizer_sha256(path) -> str:
    """sha256 of a tokenizer file (or of every file of a tokenizer directory, in name order)."""
    from megatron_kd.kd.cache_format import file_sha256

    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def model_config_dict(model_cfg) -> dict:
    """The teacher's shape as the manifest records it (a TeacherConfig's extras left out)."""
    from megatron_kd.config import ModelConfig

    return {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig)}


def config_sha256(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _run_config_of(ckpt: Path) -> Path:
    for run in (ckpt.parent.parent, ckpt.parent, ckpt):
        if (run / "config.yaml").is_file():
            return run / "config.yaml"
    raise ConfigError(f"--checkpoint {ckpt}: no config.yaml in its run directory (the teacher's shape "
                      "is read from it)")


@dataclasses.dataclass
class Plan:
    spec: dict
    out: Path
    run_cfg: RunConfig  # the teacher as `model`, the windows as `data`
    ckpt: Path
    tokenizer: object
    args: object


def prepare(args) -> Plan:
    """Every check before anything is written or torch.distributed starts."""
    from megatron_kd.data import DataError, check_data, load_tokenizer
    from megatron_kd.kd.cache_format import FORMAT, bytes_per_token, file_sha256
    from megatron_kd.training import checkpointing

    ckpt = checkpointing.resolve_load_dir(args.checkpoint)
    tcfg = load_config(str(_run_config_of(ckpt)))
    tok_path = args.tokenizer or tcfg.data.tokenizer_model
    if not tok_path:
        raise ConfigError("--tokenizer: required (the teacher run's config names no data.tokenizer_model)")
    try:
        tokenizer = load_tokenizer(tok_path)
    except DataError as e:
        raise DataError(f"--tokenizer: {e}") from None
    k, v = args.top_k, tokenizer.vocab_size
    if not 1 <= k <= v:
        raise ConfigError(f"--top-k {k}: expected 1..{v} (the vocabulary size of {tok_path})")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ConfigError(f"--top-p {args.top_p}: expected a mass in (0, 1]")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature {args.temperature}: expected > 0")
    for flag, n in (("--train-samples", args.train_samples), ("--valid-samples", args.valid_samples)):
        if n is not None and n < 0:
            raise ConfigError(f"{flag} {n}: expected >= 0")
    if args.micro_batch_size < 1 or args.tensor_model_parallel_size < 1:
        raise ConfigError("--micro-batch-size / --tensor-model-parallel-size: expected >= 1")
    data = DataConfig(data_path=args.data, tokenizer_model=str(tok_path),
                      seq_length=args.seq_length or tcfg.data.seq_length,
                      reset_position_ids=args.positions == "reset", split=args.split, seed=args.seed)
    prefix, _, _ = check_data(data, tokenizer)
    m = tcfg.model
    if m.num_attention_heads % args.tensor_model_parallel_size:
        raise ConfigError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: the teacher's "
                          f"{m.num_attention_heads} heads are not divisible by it")
    shape = model_config_dict(m)
    spec = {
        "format": FORMAT,
        "teacher": {"checkpoint": str(ckpt), "config": shape, "config_sha256": config_sha256(shape),
                    "rotary_base": m.rotary_base, "bf16": bool(args.bf16)},
        "tokenizer": {"path": str(tok_path), "sha256": tokenizer_sha256(tok_path), "vocab_size": v},
        "data": {"prefix": prefix, "idx_sha256": file_sha256(prefix + ".idx"), "seq_length": data.seq_length,
                 "split": data.split, "seed": data.seed, "positions": args.positions},
        "top_k": k, "top_p": args.top_p, "temperature": args.temperature,
        "record": {"ids": "int32", "logp": "float32", "tail": "float32", "bytes_per_token": bytes_per_token(k)},
        "samples": {"train": args.train_samples, "valid": args.valid_samples},
    }
    out = Path(args.output or f"{prefix}_teacher_top{k}")
    _check_output(out, spec, args.overwrite)
    run_cfg = RunConfig(model=m, parallel=ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size),
                        data=data)
    return Plan(spec, out, run_cfg, ckpt, tokenizer, args)


def first_difference(a: dict, b: dict, prefix: str = ""):
    """(dotted key, a's value, b's value) of the first leaf that differs, else None."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            d = first_difference(x, y, f"{prefix}{key}.")
            if d:
                return d
        elif x != y:
            return f"{prefix}{key}", x, y
    return None


def _check_output(out: Path, spec: dict, overwrite: bool) -> None:
    """Refuse to mix two builds in one directory; nothing is deleted without --overwrite."""
    if overwrite or not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--output {out}: exists and is not a directory")
    have = None
    for name in (MANIFEST, BUILD):
        if (out / name).is_file():
            try:
                have = json.loads((out / name).read_text())
            except ValueError:
                raise ConfigError(f"--output {out}: {name} is not valid JSON; pass --overwrite") from None
            break
    if have is None:
        if any(out.iterdir()):
            raise ConfigError(f"--output {out}: a non-empty directory that is not a teacher cache "
                              "(pass --overwrite to replace it)")
        return
    have = {key: val for key, val in have.items() if key in spec}
    diff = first_difference(have, spec)
    if diff:
        key, old, new = diff
        raise ConfigError(f"--output {out}: holds a cache built with {key}={old!r}, this command has "
                          f"{new!r} (another --output, or --overwrite to replace it)")


def run(args) -> int:
    plan = prepare(args)
    from megatron_kd import distributed

    distributed.init_distributed()
    try:
        build(plan)
    finally:
        distributed.destroy()
    return 0


def _say(msg: str) -> None:
    import torch

    if torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def build(plan: Plan) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_kd import distributed, platform
    from megatron_kd.config import validate_layout
    from megatron_kd.data import build_packed_datasets
    from megatron_kd.kd.cache_format import atomic_write_json, shard_ranges, shard_stem
    from megatron_kd.kd.pair import freeze
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    cfg, out, spec, args = plan.run_cfg, plan.out, plan.spec, plan.args
    world = torch.distributed.get_world_size()
    validate_layout(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=world,
                                                                        micro_batch_size=1)), world)
    tp = cfg.parallel.tensor_model_parallel_size
    # the layout decides which windows share a teacher batch (and so the last bits): a resume keeps it
    spec = {**spec, "layout": {"tensor_model_parallel_size": tp, "data_parallel_shards": world // tp,
                               "micro_batch_size": args.micro_batch_size}}
    if (out / MANIFEST).is_file() and not args.overwrite:
        have = json.loads((out / MANIFEST).read_text())
        if first_difference({k: have.get(k) for k in spec}, spec) is None:
            _say(f"cache-teacher: {out} is complete already")
            return
    if (out / BUILD).is_file() and not args.overwrite:
        diff = first_difference(json.loads((out / BUILD).read_text()), spec)
        if diff:  # another world size: its shards cover other windows
            raise ConfigError(f"--output {out}: built with {diff[0]}={diff[1]!r}, this launch has "
                              f"{diff[2]!r}; resume with the same layout, or --overwrite")

    distributed.init_model_parallel(cfg.parallel, seed=1234)
    vocab = plan.tokenizer.vocab_size
    model = build_model(cfg.model, cfg.parallel, vocab, cfg.data.seq_length, bf16=args.bf16)
    checkpointing.check_model_shapes(plan.ckpt, [model], "--checkpoint", exact=True)
    checkpointing.load_model_weights(plan.ckpt, [model])
    freeze(model)

    rank = torch.distributed.get_rank()
    torch.distributed.barrier()
    if rank == 0:  # the first write of this command
        if args.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / BUILD, spec)
    torch.distributed.barrier()

    want = spec["samples"]
    train_ds, valid_ds, _ = build_packed_datasets(
        cfg.data, plan.tokenizer, cache_dir=str(out / "data_cache"),
        num_samples=(want["train"], want["valid"] if want["valid"] != 0 else None, None))
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    splits = {}
    t0 = time.perf_counter()
    for split, ds in (("train", train_ds), ("valid", valid_ds)):
        if ds is None or (split == "valid" and want["valid"] == 0):
            continue
        n = len(ds) if want[split] is None else min(len(ds), want[split])  # the first n windows
        ranges = shard_ranges(n, dp)
        (out / split).mkdir(exist_ok=True)
        first, end = ranges[dp_rank]
        _cache_shard(model, ds, shard_stem(out / split, dp_rank, dp), first, end, cfg, spec, vocab,
                     args.micro_batch_size, platform.device())
        splits[split] = {"windows": n, "shards": [{"stem": shard_stem(Path(), d, dp).name, "first": a,
                                                   "windows": b - a} for d, (a, b) in enumerate(ranges)]}
        _say(f"cache-teacher: {split}: {n} windows x {cfg.data.seq_length} tokens cached in {dp} shard(s)")
    torch.distributed.barrier()
    if rank == 0:  # last: the cache is complete
        atomic_write_json(out / MANIFEST, {**spec, "splits": splits})
    torch.distributed.barrier()
    _say(f"cache-teacher: wrote {out} ({time.perf_counter() - t0:.1f} s)")


def _cache_shard(model, ds, stem: Path, first: int, end: int, cfg: RunConfig, spec: dict, vocab: int,
                 mbs: int, device) -> None:
    """This DP rank's windows [first, end): teacher forward, top-k, written by TP rank 0."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_kd.data import collate
    from megatron_kd.data.cp_layout import layout_batches
    from megatron_kd.kd.cache_format import ShardWriter, window_hash
    from megatron_kd.kd.cache_topk import teacher_top_k
    from megatron_kd.models.attention import attention_mask_for_batch
    from megatron_kd.training.objective import batch_to_device

    tp_group = ps.get_tensor_model_parallel_group()
    writer = ShardWriter(stem, spec["top_k"], cfg.data.seq_length, first, end - first)
    writes = ps.get_tensor_model_parallel_rank() == 0
    start = torch.zeros(1, dtype=torch.long)
    if writes:
        start[0] = end - first if writer.finished() else writer.open()
    # the TP ranks compute together: all start where the writer's files say
    torch.distributed.broadcast(start, ps.get_tensor_model_parallel_src_rank(), group=tp_group)
    done = int(start[0])
    if done == end - first:
        return
    if writes and done:
        print(f"cache-teacher: {stem.name}: resuming after {done} of {end - first} windows", flush=True)
    with torch.no_grad():
        for lo in range(first + done, end, mbs):
            idx = list(range(lo, min(lo + mbs, end)))
            batch = collate([ds[i] for i in idx])
            hashes = [window_hash(t.numpy()) for t in batch["tokens"]]
            batch = batch_to_device(next(iter(layout_batches(iter([batch]), cfg))), device)
            logits = model(batch["tokens"], batch["position_ids"], attention_mask_for_batch(batch))
            ids, logp, tail = teacher_top_k(logits, tp_group=tp_group, vocab_size=vocab, top_k=spec["top_k"],
                                            temperature=spec["temperature"], top_p=spec["top_p"])
            if writes:
                writer.write(ids.to(torch.int32).cpu().numpy(), logp.float().cpu().numpy(),
                             tail.float().cpu().numpy(), hashes)
    if writes:
        writer.close()
