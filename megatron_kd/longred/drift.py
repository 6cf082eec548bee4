"""``megatron-kd drift``: how far a model drifted from another on short text, layer by layer.

LongReD's distribution-drift measures (paper §2): per layer, the cosine similarity of the two
models' hidden states and the KL between their attention distributions, on the same short
windows at positions 0..s-1 (each model at its own rotary_base). Typical use: the original model
vs its context-extended copy (before/after LongReD or CE-only extension), or the original
weights at the old vs a new rotary_base (``--after-rotary-base``: the drift the extension starts
from). Writes ``drift.json`` and ``drift.png`` (when matplotlib is installed) under ``--out``.
One process, whole models, dense attention probabilities: meant for small inputs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

from megatron_kd.config import ConfigError, RunConfig, from_dict


def run_config_of(path) -> RunConfig:
    """The resolved config.yaml of the run a checkpoint path belongs to (run, checkpoints/ or iter_*)."""
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.yaml").is_file():
            return from_dict(yaml.safe_load((d / "config.yaml").read_text()), source=str(d / "config.yaml"))
    raise ConfigError(f"{path}: no config.yaml in the run directory (expected a run dir written by "
                      "megatron-kd train, its checkpoints/ or an iter_* folder)")


def _windows(data_path: str, tokenizer_model: str, seq_length: int, count: int, cache_dir: str) -> list:
    from megatron_kd.config import DataConfig
    from megatron_kd.data import build_packed_datasets

    cfg = DataConfig(data_path=data_path, tokenizer_model=tokenizer_model, seq_length=seq_length,
                     split="90,10,0")
    _, valid, _ = build_packed_datasets(cfg, cache_dir=cache_dir, num_samples=(None, None, None))
    n = min(count, len(valid))
    return [{k: v.unsqueeze(0) for k, v in valid[i].items()} for i in range(n)]


def _load(run_cfg: RunConfig, path, rotary_base: Optional[float], vocab_size: int, seq_length: int):
    import dataclasses

    from megatron_kd.config import ParallelConfig
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    model_cfg = run_cfg.model if rotary_base is None else dataclasses.replace(run_cfg.model, rotary_base=rotary_base)
    model = build_model(model_cfg, ParallelConfig(), vocab_size, seq_length)
    checkpointing.load_model_weights(path, [model])
    return model.eval(), model_cfg


def run_drift(before: str, after: str, out_dir: str, before_rotary_base: Optional[float] = None,
              after_rotary_base: Optional[float] = None, data_path: Optional[str] = None,
              tokenizer_model: Optional[str] = None, seq_length: Optional[int] = None,
              windows: int = 4) -> dict:
    from megatron_kd import distributed
    from megatron_kd.config import ParallelConfig
    from megatron_kd.data import load_tokenizer
    from megatron_kd.longred.layer_select import measure_drift
    from megatron_kd.longred.model import LongReDModel
    from megatron_kd.training import checkpointing

    cfg_b, cfg_a = run_config_of(before), run_config_of(after)
    for path in (before, after):
        checkpointing.resolve_load_dir(path)
    if (cfg_b.model.num_layers, cfg_b.model.hidden_size) != (cfg_a.model.num_layers, cfg_a.model.hidden_size):
        raise ConfigError(f"--before {before} and --after {after}: different layer counts or widths "
                          f"({cfg_b.model.num_layers}x{cfg_b.model.hidden_size} vs "
                          f"{cfg_a.model.num_layers}x{cfg_a.model.hidden_size}); nothing to compare per layer")
    data_path = data_path or cfg_b.data.data_path
    tokenizer_model = tokenizer_model or cfg_b.data.tokenizer_model
    seq_length = seq_length or cfg_b.data.seq_length
    if windows < 1:
        raise ConfigError(f"--windows: expected >= 1, got {windows}")
    tokenizer = load_tokenizer(tokenizer_model)
    out = Path(out_dir)
    distributed.init_distributed()
    try:
        distributed.init_model_parallel(ParallelConfig(), seed=1234)
        batches = _windows(data_path, tokenizer_model, seq_length, windows, str(out / "data_cache"))
        m_before, mc_b = _load(cfg_b, before, before_rotary_base, tokenizer.vocab_size, seq_length)
        m_after, mc_a = _load(cfg_a, after, after_rotary_base, tokenizer.vocab_size, seq_length)
        model = LongReDModel(m_after, m_before, [], mc_a.num_layers, 1.0, 1.0)
        table = measure_drift(model, batches)
    finally:
        distributed.destroy()
    result = {"before": str(before), "after": str(after), "before_rotary_base": mc_b.rotary_base,
              "after_rotary_base": mc_a.rotary_base, "seq_length": seq_length, "windows": len(batches),
              "data_path": str(data_path), "layers": {str(k): v for k, v in table.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(result, indent=2))
    print(format_drift(table))
    _plot(table, out / "drift.png", f"{Path(before).name} -> {Path(after).name}")
    print(f"wrote {out / 'drift.json'}")
    return result


def format_drift(table: dict) -> str:
    lines = ["layer   hidden cos   attention KL"]
    for layer, row in sorted(table.items()):
        lines.append(f"{layer:5d}   {row['hidden_cos']:10.6f}   {row['attention_kl']:12.4e}")
    return "\n".join(lines)


def _plot(table: dict, path: Path, title: str) -> None:
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    layers = sorted(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(layers, [table[i]["hidden_cos"] for i in layers], marker="o")
    axes[0].set_xticks(layers)
    axes[1].set_xticks(layers)
    axes[0].set_xlabel("layer (last: after final norm)")
    axes[0].set_ylabel("hidden-state cosine similarity")
    axes[1].bar(layers, [table[i]["attention_kl"] for i in layers])
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("attention KL(before || after)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
