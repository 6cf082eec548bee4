"""Held-out loss by token position over long windows: a cheap long-context signal (a model that
uses long context keeps lowering its loss with position; one that breaks past its trained length
shows a rise). Windows are consecutive Paul Graham essay text, unpacked, positions 0..L-1; the
per-token loss is megatron-core's vocab-parallel cross-entropy (the model's own ``labels`` path),
so it is TP-aware without gathering logits; under PP the windows go through megatron's schedule
(generate.pipeline_forward) and the last stage's sums are broadcast."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from megatron_kd.eval.haystack import essay_words


def windows(tokenizer, length: int, count: int) -> List[List[int]]:
    """``count`` windows of ``length`` + 1 tokens (inputs and shifted labels) from the essays."""
    words, out, start = essay_words(), [], 0
    need = length + 1
    while len(out) < count:
        ids: List[int] = []
        step = max(64, need)
        while len(ids) < need:
            ids = tokenizer.encode(" ".join(words[start:start + step]))
            step *= 2
        out.append(ids[:need])
        start += step // 2
        if start >= len(words):
            start = 0
    return out


@torch.no_grad()
def loss_by_position(model, token_windows: List[List[int]], batch_size: int = 4) -> List[float]:
    """Mean next-token loss at every position 0..L-1 (nats)."""
    from megatron_kd import platform
    from megatron_kd.models.attention import attention_mask

    from megatron_kd.eval.generate import pipeline_forward, pipeline_group

    pp = pipeline_group()
    total = torch.zeros(len(token_windows[0]) - 1, dtype=torch.float32, device=platform.device())
    for i in range(0, len(token_windows), batch_size):
        chunk = torch.tensor(token_windows[i:i + batch_size], dtype=torch.long, device=platform.device())
        tokens, labels = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s).contiguous()
        kwargs = dict(position_ids=positions, attention_mask=attention_mask(torch.zeros_like(tokens)),
                      labels=labels)

        def add(loss):  # [b, s] per-token loss (on the last pipeline stage)
            total.add_(loss.float().sum(0))
        if pp is None:
            add(model(tokens, **kwargs))
        else:
            pipeline_forward(model, tokens, add, **kwargs)
    if pp is not None:  # the last stage holds the sums; every rank returns them
        torch.distributed.broadcast(total, src=pp[1], group=pp[0])
    return (total / len(token_windows)).tolist()


def bucketed(losses: List[float], buckets: int = 16) -> List[dict]:
    n = len(losses)
    step = max(1, -(-n // buckets))
    return [{"lo": lo, "hi": min(n, lo + step), "loss": sum(losses[lo:lo + step]) / len(losses[lo:lo + step])}
            for lo in range(0, n, step)]


def plot(curves: dict, path: Path, trained_length: Optional[int] = None) -> Optional[Path]:
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, bs in curves.items():
        ax.plot([(b["lo"] + b["hi"]) / 2 for b in bs], [b["loss"] for b in bs], marker=".", label=name)
    if trained_length:
        ax.axvline(trained_length, color="gray", ls="--", label=f"training seq_length ({trained_length})")
    ax.set_xlabel("token position")
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
