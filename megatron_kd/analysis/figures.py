"""PNGs in the layout of the paper's Figures 7-12 (our reading of the layout, see docs/analysis.md).

Perturbation (one column per masking regime, causal | document):
  fig7   Eq. 3 element distance to repeat 0 vs repeat, pre- and post-RoPE (mean over layers)
  fig8   cosine similarity to repeat 0 vs repeat, pre- and post-RoPE (mean over layers)
  fig9   the same per layer (post-RoPE solid, pre-RoPE dashed)
  fig10  top-10 tokens: rank of repeat 0's top-10 in each repeat, and probability masses
  audit  KL(repeat k || repeat 0) per numeric setting
Evolution:
  fig11  per-layer query change vs RoPE frequency index (wavelength on the top axis)
  fig12  per-layer query change vs position
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    from megatron_kd.plotting import pyplot

    return pyplot()


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return str(path)


def perturbation_figures(out_dir: Path, label: str, metrics: dict, setting: str) -> dict:
    plt = _plt()
    masks = list(metrics)
    paths = {}
    per = {m: metrics[m][setting] for m in masks if setting in metrics[m]}
    if not per:
        return paths
    for fig_id, key, ylabel in (("fig7", "distance", "mean |q_k - q_0| (Eq. 3)"),
                                ("fig8", "cosine", "cosine(q_k, q_0)")):
        fig, axes = plt.subplots(1, len(per), figsize=(4.2 * len(per), 3.2), squeeze=False, sharey=True)
        for ax, (mask, m) in zip(axes[0], per.items()):
            for phase, style in (("pre_rope", "--"), ("post_rope", "-")):
                y = m[f"{key}_{phase}"]["mean_over_layers"]
                ax.plot(range(len(y)), y, style, marker=".", label=phase.replace("_", "-"))
            ax.set_title(f"{label}: {mask} mask")
            ax.set_xlabel("repeat k")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
        paths[fig_id] = _save(fig, out_dir / f"{label}_{fig_id}_{key}.png")

    fig, axes = plt.subplots(1, len(per), figsize=(4.2 * len(per), 3.2), squeeze=False, sharey=True)
    for ax, (mask, m) in zip(axes[0], per.items()):
        post = np.asarray(m["cosine_post_rope"]["per_layer"])
        pre = np.asarray(m["cosine_pre_rope"]["per_layer"])
        for l in range(post.shape[0]):
            line, = ax.plot(post[l], "-", label=f"layer {l} post")
            ax.plot(pre[l], "--", color=line.get_color())
        ax.set_title(f"{label}: per layer, {mask} mask")
        ax.set_xlabel("repeat k")
        ax.set_ylabel("cosine(q_k, q_0)  (dashed: pre-RoPE)")
        ax.legend(fontsize=7)
    paths["fig9"] = _save(fig, out_dir / f"{label}_fig9_per_layer.png")

    fig, axes = plt.subplots(2, len(per), figsize=(4.2 * len(per), 5.6), squeeze=False)
    for col, (mask, m) in enumerate(per.items()):
        o = m["output"]
        ranks = np.asarray(o["first_top_ranks"]) + 1  # [R, 10], 1 = argmax
        ax = axes[0, col]
        for j in range(ranks.shape[1]):
            ax.plot(ranks[:, j], marker=".", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{label}: {mask} mask")
        ax.set_ylabel("rank of repeat 0's top-10 tokens")
        ax = axes[1, col]
        ax.plot(o["top_mass"], label="top-10 mass of repeat k")
        ax.plot(o["first_top_mass"], "--", label="mass of repeat 0's top-10")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("repeat k")
        ax.set_ylabel("probability mass")
        ax.legend(fontsize=7)
    paths["fig10"] = _save(fig, out_dir / f"{label}_fig10_top10.png")

    fig, axes = plt.subplots(1, len(masks), figsize=(4.2 * len(masks), 3.2), squeeze=False)
    for ax, mask in zip(axes[0], masks):
        for name, mm in metrics[mask].items():
            kl = np.asarray(mm["output"]["kl_to_first"][1:])
            ax.plot(range(1, len(kl) + 1), np.maximum(kl, 1e-18), marker=".", label=name)
        ax.set_yscale("log")
        ax.set_title(f"{label}: audit, {mask} mask")
        ax.set_xlabel("repeat k")
        ax.set_ylabel("KL(p_k || p_0)  (floored at 1e-18)")
        ax.legend(fontsize=7)
    paths["audit_png"] = _save(fig, out_dir / f"{label}_audit.png")
    return paths


def evolution_figures(out_dir: Path, label: str, ev: dict) -> dict:
    plt = _plt()
    paths = {}
    per_freq = np.asarray(ev["per_frequency"])  # [L, d/2]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for l in range(per_freq.shape[0]):
        ax.plot(per_freq[l], marker=".", label=f"layer {l}")
    ax.set_xlabel("RoPE frequency index i (high i = low frequency)")
    ax.set_ylabel("||q_after - q_before|| (pre-RoPE)")
    ax.set_title(f"{label}: query change by dimension pair")
    n = per_freq.shape[1]
    ticks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    wl = ev["wavelength_after"]
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks)
    top.set_xticklabels([f"{wl[t]:.3g}" for t in ticks], fontsize=7)
    top.set_xlabel(f"wavelength 2π/θ_i in tokens (base {ev['rotary_base_after']:g})", fontsize=8)
    ax.legend(fontsize=7)
    paths["fig11"] = _save(fig, out_dir / f"{label}_fig11_by_frequency.png")

    per_pos = np.asarray(ev["per_position"])  # [L, n]
    pos = ev["positions"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for l in range(per_pos.shape[0]):
        ax.plot(pos, per_pos[l], lw=0.8, label=f"layer {l}")
    ax.set_xlabel("position")
    ax.set_ylabel("||q_after - q_before|| (pre-RoPE)")
    ax.set_title(f"{label}: query change by position")
    ax.legend(fontsize=7)
    paths["fig12"] = _save(fig, out_dir / f"{label}_fig12_by_position.png")
    return paths
