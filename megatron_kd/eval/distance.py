"""Needle-distance view: accuracy as a function of the token distance between the needle and the
question (the end of the prompt), pooled over every needle task and length.

This is the axis on which a student trained on short packed documents should be read: positions
up to the window length were seen in training, but attention only ever spanned one document, so
a distance beyond the longest training document is out of distribution whatever the context
length. ``train_doc_tokens`` draws that line on the plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def needle_distance(tokenizer, sample) -> Optional[int]:
    """Tokens from the farthest asked-for needle's first token to the end of the prompt."""
    chars = [c for c in sample.needle_chars if c >= 0]
    if not chars:
        return None
    total = len(tokenizer.encode(sample.input))
    return total - len(tokenizer.encode(sample.input[:min(chars)].rstrip()))


def bucket_edges(max_distance: int, buckets: int = 8) -> List[int]:
    step = max(1, -(-max_distance // buckets))
    return [i * step for i in range(buckets + 1)]


def by_distance(records: Sequence[dict], edges: Sequence[int]) -> List[dict]:
    """[{lo, hi, n, accuracy}] over records with a "distance" (scores are 0..100)."""
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rs = [r for r in records if r.get("distance") is not None and lo < r["distance"] <= hi]
        if rs:
            acc = sum(r["score"] for r in rs) / len(rs) / 100
            out.append({"lo": lo, "hi": hi, "n": len(rs), "accuracy": acc})
    return out


def plot(buckets: Dict[str, List[dict]], path: Path,
         train_doc_tokens: Optional[int] = None) -> Optional[Path]:
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, bs in buckets.items():
        ax.plot([(b["lo"] + b["hi"]) / 2 for b in bs], [b["accuracy"] for b in bs], marker="o", label=name)
    if train_doc_tokens:
        ax.axvline(train_doc_tokens, color="gray", ls="--",
                   label=f"longest training document ({train_doc_tokens})")
    ax.set_xlabel("needle -> question distance (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
