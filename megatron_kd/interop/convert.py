"""``megatron-kd convert``: HF Llama-family checkpoints <-> project run directories.

Import (``hf-to-mcore``) builds the model once at TP=1/PP=1 in this process, streams every HF
tensor from the safetensors shards into it (one tensor in hand at a time), and saves it through
``training/checkpointing.py`` -- a megatron-core distributed checkpoint, which reloads under any
TP/PP layout -- next to a ``config.yaml`` whose model section came from ``config.json`` and a
copy of the tokenizer. The output then works as ``teacher.load`` / ``checkpoint.load``.

Export (``mcore-to-hf``) goes back: load at TP=1 (dist_checkpointing reshards), un-fuse, write
safetensors shards + ``config.json`` + the tokenizer.

Everything checkable is checked before the model is built: architecture, shards, every tensor's
shape against the config, the target layout, the tokenizer, the output directory.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_kd.config import (CheckpointConfig, ConfigError, DataConfig, ModelConfig, ParallelConfig,
                                RunConfig, dump_config, load_config, validate_layout)
from megatron_kd.interop import hf_config as hfc
from megatron_kd.interop.hf_files import (ShardReader, ShardWriter, copy_tokenizer, read_hf_config,
                                          tokenizer_file)
from megatron_kd.interop.hf_weights import Layout, rules, split_expert_name
from megatron_kd.training.checkpointing import CheckpointError

HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, for export and for the record
SUMMARY = "conversion.json"
IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out}: already exists and is not empty; choose another output or pass --overwrite")
    tmp = out.with_name(out.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish_out(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def _single_process_model_parallel() -> None:
    from megatron_kd import distributed

    info = distributed.init_distributed()
    if info.world_size != 1:
        raise ConfigError(f"convert runs in one process (got world size {info.world_size}); the "
                          "checkpoint it writes loads under any TP/PP layout")
    distributed.init_model_parallel(ParallelConfig(), seed=1234)


def _check_layout(m: ModelConfig, tp: int, pp: int) -> None:
    run = RunConfig(model=m, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                     pipeline_model_parallel_size=pp),
                    train=dataclasses.replace(RunConfig().train, micro_batch_size=1, global_batch_size=1))
    validate_layout(run, world_size=tp * pp)
    sizes = {"ffn_hidden_size": m.ffn_hidden_size}
    if m.num_moe_experts:
        sizes.update(moe_ffn_hidden_size=m.moe_ffn_hidden_size,
                     moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size)
    for key, value in sizes.items():
        if value and value % tp:
            raise ConfigError(f"model.{key}={value} is not divisible by --tensor-model-parallel-size={tp} "
                              "(experts are split over TP)")


def _check_tensors(reader: ShardReader, rule_list, tied: bool) -> None:
    """Every tensor the config implies exists with the implied shape; nothing else is left over."""
    expected = set()
    for rule in rule_list:
        for name, shape in zip(rule.hf, rule.shapes):
            base, idx = split_expert_name(name)
            expected.add(base)
            if base not in reader:
                raise CheckpointError(f"{reader.dir}: tensor {base} (needed for {rule.mcore}) is missing")
            got = reader.shape(base)
            if idx >= 0:
                got = got[1:] if got and got[0] > idx else ("expert", idx, "of", got)
            if tuple(got) != tuple(shape):
                raise CheckpointError(f"{reader.dir}: tensor {base} has shape {tuple(reader.shape(base))} but "
                                      f"config.json implies {tuple(shape) if idx < 0 else ('E',) + tuple(shape)}")
    extra = [n for n in reader.names() if n not in expected and not n.endswith(IGNORED_HF)
             and not (tied and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{reader.dir}: tensor {extra[0]} is not part of the model config.json "
                              f"describes ({len(extra)} unexpected tensors)")


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def import_hf(hf_dir, out_dir, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
              tokenizer: Optional[str] = None, overwrite: bool = False,
              make_vocab_size_divisible_by: int = 128, progress: bool = True) -> dict:
    """HF directory -> run directory (config.yaml, checkpoints/iter_0000000, tokenizer, summary)."""
    from megatron_kd.data import load_tokenizer
    from megatron_kd.models.builder import padded_vocab_size

    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out_dir)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    hf = read_hf_config(hf_dir)
    family = hfc.family_of(hf, str(hf_dir / "config.json"))
    model_cfg = ModelConfig(**hfc.model_section(hf, str(hf_dir / "config.json")),
                            make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _check_layout(model_cfg, tp, pp)
    tok_path = Path(tokenizer) if tokenizer else tokenizer_file(hf_dir)
    vocab = load_tokenizer(tok_path).vocab_size
    hf_rows = int(hf["vocab_size"])
    if vocab > hf_rows:
        raise ConfigError(f"tokenizer {tok_path}: vocab size {vocab} exceeds the model's vocab_size={hf_rows} "
                          "in config.json")
    padded = padded_vocab_size(vocab, make_vocab_size_divisible_by, tp)
    layout = Layout(model_cfg, vocab, padded, family)
    rule_list = rules(layout, hf_rows)
    reader = ShardReader(hf_dir)
    _check_tensors(reader, rule_list, tied=not model_cfg.untie_embeddings_and_output_weights)
    tmp = _prepare_out(out, overwrite)
    try:
        summary = _import_weights(reader, rule_list, model_cfg, vocab, tp, tmp, progress)
        tok_dst = copy_tokenizer(tok_path.parent, tmp / "tokenizer", tok_path)
        final_tok = out.resolve() / "tokenizer" / tok_dst.name
        run = RunConfig(model=model_cfg,
                        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
                        data=DataConfig(tokenizer_model=str(final_tok)),
                        checkpoint=CheckpointConfig(load=str(out.resolve()), finetune=True))
        dump_config(run, tmp / "config.yaml")
        (tmp / HF_CONFIG_COPY).write_text(json.dumps(hf, indent=2))
        seconds = time.perf_counter() - t0
        summary.update(source=str(hf_dir), architecture=(hf.get("architectures") or [family])[0],
                       family=family, vocab_size=vocab, hf_vocab_rows=hf_rows, padded_vocab_size=padded,
                       dropped_vocab_rows=max(0, hf_rows - vocab),
                       tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       bytes_read=reader.bytes_read, seconds=round(seconds, 3),
                       mb_per_s=round(reader.bytes_read / 1e6 / max(seconds, 1e-9), 1))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _build_tp1(model_cfg: ModelConfig, vocab: int, tp: int):
    """The whole model in this process; vocab padded as the target TP pads it (so the saved
    global embedding shape is the one a TP=tp run builds)."""
    from megatron_kd.models import build_model

    _single_process_model_parallel()
    cfg = dataclasses.replace(model_cfg, make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by * tp)
    return build_model(cfg, ParallelConfig(), vocab, seq_length=16).eval()


def _import_weights(reader, rule_list, model_cfg, vocab, tp, tmp: Path, progress: bool) -> dict:
    from megatron_kd.training import checkpointing

    model = _build_tp1(model_cfg, vocab, tp)
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    kinds: dict = {}
    done = set()
    with torch.no_grad():
        for rule in _progress(rule_list, "hf -> mcore", progress):
            if rule.mcore not in params:
                raise CheckpointError(f"internal: {rule.mcore} is not a parameter of the built model")
            ts = [reader.get(*split_expert_name(n)) for n in rule.hf]
            t = rule.to_mcore(ts)
            p = params[rule.mcore]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"tensor {rule.hf[0]} maps to {rule.mcore} with shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
            done.add(rule.mcore)
            kinds[rule.kind] = kinds.get(rule.kind, 0) + 1
    left = sorted(set(params) - done)
    if left:
        raise CheckpointError(f"internal: model tensor {left[0]} has no HF source ({len(left)} unmapped)")
    checkpointing.save_checkpoint(tmp / "checkpoints", 0, [model], None, None, consumed_samples=0,
                                  extra={"source": "hf-import"})
    return {"tensors_hf": sum(len(r.hf) for r in rule_list), "tensors_mcore": len(done), "by_kind": kinds,
            "parameters": int(sum(p.numel() for p in params.values()))}


def export_hf(run_dir, out_dir, overwrite: bool = False, dtype: Optional[str] = None,
              progress: bool = True, max_shard_bytes: int = 2 << 30) -> dict:
    """Run directory (or a converted one) -> HF directory (safetensors shards, config.json, tokenizer)."""
    from megatron_kd.data import load_tokenizer
    from megatron_kd.kd.teacher import check_checkpoint_shapes
    from megatron_kd.models.builder import padded_vocab_size
    from megatron_kd.training import checkpointing

    t0 = time.perf_counter()
    run, out = Path(run_dir), Path(out_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: config.yaml not found (expected a run directory)")
    cfg = load_config(str(run / "config.yaml"))
    m = cfg.model
    if not cfg.data.tokenizer_model:
        raise ConfigError(f"{run}/config.yaml: data.tokenizer_model is not set; the tokenizer travels with "
                          "the exported checkpoint")
    tok = load_tokenizer(cfg.data.tokenizer_model)
    base = json.loads((run / HF_CONFIG_COPY).read_text()) if (run / HF_CONFIG_COPY).is_file() else None
    family = hfc.family_of(base, str(run / HF_CONFIG_COPY)) if base else hfc.family_of_model(m)
    hf = hfc.hf_config(m, tok.vocab_size, family, base)
    checkpointing.resolve_load_dir(run)
    tp = cfg.parallel.tensor_model_parallel_size
    padded = padded_vocab_size(tok.vocab_size, m.make_vocab_size_divisible_by, tp)
    out_dtype = _dtype(dtype or (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32")
    tmp = _prepare_out(out, overwrite)
    try:
        model = _build_tp1(m, tok.vocab_size, tp)
        check_checkpoint_shapes([model], run)
        checkpointing.load_model_weights(run, [model])
        params = model.state_dict()
        layout = Layout(m, tok.vocab_size, padded, family)
        writer = ShardWriter(tmp, max_shard_bytes)
        stacked: dict = {}
        n = 0
        for rule in _progress(rules(layout, int(hf["vocab_size"])), "mcore -> hf", progress):
            for name, t in zip(rule.hf, rule.to_hf(params[rule.mcore])):
                base_name, idx = split_expert_name(name)
                t = t.to(out_dtype)
                if idx < 0:
                    writer.add(name, t)
                    n += 1
                    continue
                buf = stacked.setdefault(base_name, [])
                buf.append(t)
                if len(buf) == m.num_moe_experts:
                    writer.add(base_name, torch.stack(buf))
                    del stacked[base_name]
                    n += 1
        writer.close()
        hf["dtype"] = str(out_dtype).replace("torch.", "")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        tok_path = Path(cfg.data.tokenizer_model)
        copy_tokenizer(tok_path.parent, tmp, tok_path)
        seconds = time.perf_counter() - t0
        summary = {"source": str(run), "architecture": hf["architectures"][0], "tensors_hf": n,
                   "bytes_written": writer.bytes_written, "seconds": round(seconds, 3),
                   "mb_per_s": round(writer.bytes_written / 1e6 / max(seconds, 1e-9), 1)}
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"--dtype: expected one of {', '.join(table)}, got {name!r}")
    return table[name]
