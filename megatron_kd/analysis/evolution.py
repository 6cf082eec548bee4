"""§5 query-state evolution between two checkpoints, mapped onto RoPE frequencies.

Both checkpoints read the same probe; for every layer we take the pre-RoPE query states
(``[positions, heads, head_dim]``; pre-RoPE so that a change of θ between the checkpoints does not
count as a change of the weights; the post-RoPE numbers are in the JSON too) and measure
``Δ = q_after - q_before``:

* per head dimension j: ``||Δ[:, :, j]||_2`` over positions and heads, then per frequency index i
  combining the two dimensions RoPE rotates together: ``sqrt(Δ_j1² + Δ_j2²)``;
* per position: ``||Δ[p]||_2`` over heads and dimensions.

Megatron's rotary layout decides which dimensions form a pair (``rope_frequency_index``):
``rotary_interleaved=False`` (the default) rotates half-split pairs (j, j + r/2) with frequency
index j; ``True`` rotates adjacent pairs (2i, 2i+1). ``θ_i = base^(-2i/r)`` over the r rotated
dimensions (``rotary_percent`` x head_dim); dimensions beyond r are not rotated (index -1).
High i = low frequency = long wavelength ``2π/θ_i``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_kd.config import ConfigError


def rotary_dim(head_dim: int, rotary_percent: float = 1.0) -> int:
    """Megatron's RotaryEmbedding: ``int(kv_channels * rotary_percent)`` rotated dimensions."""
    return int(head_dim * rotary_percent) if rotary_percent < 1.0 else head_dim


def rope_frequency_index(head_dim: int, interleaved: bool, rotary_percent: float = 1.0) -> np.ndarray:
    """``[head_dim]`` frequency index of every query dimension (-1: not rotated)."""
    r = rotary_dim(head_dim, rotary_percent)
    j = np.arange(head_dim)
    idx = j // 2 if interleaved else np.where(j < r // 2, j, j - r // 2)
    return np.where(j < r, idx, -1)


def wavelengths(rotary_base: float, head_dim: int, rotary_percent: float = 1.0) -> np.ndarray:
    """``[r/2]`` wavelength 2π/θ_i in tokens, θ_i = base^(-2i/r)."""
    r = rotary_dim(head_dim, rotary_percent)
    return 2 * math.pi * float(rotary_base) ** (np.arange(0, r, 2) / r)


def per_frequency(per_dim: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``[..., head_dim]`` Euclidean norms per dimension -> ``[..., r/2]`` norms per frequency pair."""
    n = int(index.max()) + 1
    out = np.zeros(per_dim.shape[:-1] + (n,))
    for j, i in enumerate(index):
        if i >= 0:
            out[..., i] += per_dim[..., j] ** 2
    return np.sqrt(out)


def query_change(q_before: np.ndarray, q_after: np.ndarray, index: np.ndarray) -> dict:
    """``[L, 1, n, H, d]`` query states of both checkpoints -> per-dimension / frequency / position."""
    delta = (q_after[:, 0].astype(np.float64) - q_before[:, 0].astype(np.float64))  # [L, n, H, d]
    per_dim = np.sqrt((delta ** 2).sum(axis=(1, 2)))  # [L, d]
    return {"per_dimension": per_dim, "per_frequency": per_frequency(per_dim, index),
            "per_position": np.sqrt((delta ** 2).sum(axis=(2, 3)))}  # [L, n]


def summarize(per_freq: np.ndarray, spans: int = 4) -> dict:
    """Which quarter of the frequency indices changed most, and is it the low-frequency end."""
    total = per_freq.mean(0)  # mean over layers, [r/2]
    n = len(total)
    edges = np.linspace(0, n, spans + 1).round().astype(int)
    span = [{"indices": [int(a), int(b) - 1], "mean_change": float(total[a:b].mean()),
             "share_of_squared_change": float((total[a:b] ** 2).sum() / max((total ** 2).sum(), 1e-300))}
            for a, b in zip(edges[:-1], edges[1:]) if b > a]
    most = max(span, key=lambda s: s["mean_change"])
    low, high = total[: n // 2].mean(), total[n // 2:].mean()
    return {"spans": span, "most_changed_span": most["indices"],
            "high_index_half_mean": float(high), "low_index_half_mean": float(low),
            "low_frequency_changed_most": bool(high > low),
            "top_indices": np.argsort(-total)[: max(1, n // 8)].tolist()}


def _capture_run(run, probe, positions, mask, parallel_cfg, device):
    from megatron_kd import distributed
    from megatron_kd.analysis import capture as cap
    from megatron_kd.analysis.runs import load_chunks

    distributed.init_model_parallel(parallel_cfg, run.cfg.train.seed)
    load_chunks(run, parallel_cfg)
    cfg = run.chunks[0].config
    layout = {"interleaved": bool(cfg.rotary_interleaved), "head_dim": int(cfg.kv_channels),
              "rotary_percent": float(run.cfg.model.rotary_percent)}
    tokens, pos, attn = probe.inputs(mask, device=device)
    result = cap.capture(run.chunks, tokens, pos, attn, positions, run.vocab_size)
    run.chunks = None
    return result, layout


def analyze_evolution(before_dir, after_dir, out_dir, block_tokens: int, repeats: int = 1,
                      text: Optional[str] = None, mask: str = "causal", parallel_cfg=None,
                      max_positions: int = 4096, label: str = "evolution",
                      text_source: str = "--text") -> Optional[dict]:
    """Both checkpoints on one probe; JSON + Figures 11-12 on rank 0 (None elsewhere)."""
    import torch

    from megatron_kd import platform
    from megatron_kd.analysis import figures
    from megatron_kd.analysis.probe import build_probe
    from megatron_kd.analysis.runs import read_run
    from megatron_kd.config import ParallelConfig

    parallel_cfg = parallel_cfg or ParallelConfig()
    before, after = read_run(before_dir, "--before"), read_run(after_dir, "--after")
    if before.vocab_size != after.vocab_size:
        raise ConfigError(f"--before {before_dir} has vocab size {before.vocab_size}, --after {after_dir} "
                          f"has {after.vocab_size}: the checkpoints must share the tokenizer")
    mb, ma = before.cfg.model, after.cfg.model
    shape = ("num_layers", "num_attention_heads", "kv_channels", "hidden_size")
    if any(getattr(mb, k) != getattr(ma, k) for k in shape):
        diff = {k: (getattr(mb, k), getattr(ma, k)) for k in shape if getattr(mb, k) != getattr(ma, k)}
        raise ConfigError(f"--before/--after: query states are not comparable, shapes differ {diff}")
    probe = build_probe(after.tokenizer, block_tokens, repeats, after.cfg.data.seq_length, text,
                        text_source, min_repeats=1)
    stride = max(1, math.ceil(probe.length / max_positions))
    positions = list(range(0, probe.length, stride))
    t = time.time()
    device = platform.device()
    res_b, lay_b = _capture_run(before, probe, positions, mask, parallel_cfg, device)
    res_a, lay_a = _capture_run(after, probe, positions, mask, parallel_cfg, device)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    if lay_a != lay_b:
        raise ConfigError(f"--before/--after: rotary layouts differ ({lay_b} vs {lay_a})")
    index = rope_frequency_index(lay_a["head_dim"], lay_a["interleaved"], lay_a["rotary_percent"])
    pre = query_change(res_b["query_pre_rope"], res_a["query_pre_rope"], index)
    post = query_change(res_b["query_post_rope"], res_a["query_post_rope"], index)
    ev = {
        "before": str(before.path), "after": str(after.path),
        "rotary_base_before": before.rotary_base, "rotary_base_after": after.rotary_base,
        "rotary_interleaved": lay_a["interleaved"], "head_dim": lay_a["head_dim"],
        "frequency_index_of_dimension": index.tolist(),
        "wavelength_before": wavelengths(before.rotary_base, lay_a["head_dim"], lay_a["rotary_percent"]).tolist(),
        "wavelength_after": wavelengths(after.rotary_base, lay_a["head_dim"], lay_a["rotary_percent"]).tolist(),
        "positions": positions, "mask": mask, "block_tokens": probe.block_tokens, "repeats": probe.repeats,
        "per_dimension": pre["per_dimension"].tolist(), "per_frequency": pre["per_frequency"].tolist(),
        "per_position": pre["per_position"].tolist(),
        "post_rope": {k: v.tolist() for k, v in post.items()},
        "summary": summarize(pre["per_frequency"]),
        "summary_post_rope": summarize(post["per_frequency"]),
        "seconds": round(time.time() - t, 2),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{label}.json"
    path.write_text(json.dumps(ev))
    paths = {"json": str(path), **figures.evolution_figures(out, label, ev)}
    return {"paths": paths, "summary": ev["summary"], "evolution": ev}
