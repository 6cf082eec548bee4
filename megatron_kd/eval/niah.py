"""Needle-in-a-Haystack grid (after gkamradt's LLMTest_NeedleInAHaystack): context lengths x needle
depths, Paul Graham essays as the haystack, one needle sentence inserted at a sentence boundary by
token position, the question and an answer prefix at the end; scored by substring match of the
needle's value (no LLM judge).

Depths are linear (``np.linspace``) or sigmoid-spaced (the original harness's logistic mapping,
which puts more cells near 0% and 100%). The haystack is whole sentences, as many as fit: the
largest count with prompt + generated tokens <= length (binary search on the token count).
Needle presets: ``number`` (a 7-digit value) and ``passkey`` (the demo's passkey sentence and
one-token colour keys, so the demo's small models can be read on the same grid).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_kd.config import ConfigError
from megatron_kd.eval.haystack import essay_words, largest_fitting
from megatron_kd.eval.sample import Sample


@dataclass(frozen=True)
class NeedlePreset:
    needle: str  # with {value}
    question: str
    answer_prefix: str
    sep: str  # between the haystack and the question
    values: Optional[Sequence[str]] = None  # None: 7-digit numbers


def _presets() -> Dict[str, NeedlePreset]:
    from megatron_kd.eval import passkey

    return {
        "number": NeedlePreset("The special magic number is: {value}.", "What is the special magic number?",
                               "The special magic number is", "\n"),
        "passkey": NeedlePreset(passkey.NEEDLE.replace("{key}", "{value}"), "What is the pass key?",
                                "The pass key is", " ", tuple(passkey.KEY_WORDS)),
    }


def depth_percents(n: int, spacing: str = "linear", lo: float = 0.0, hi: float = 100.0) -> List[float]:
    """``n`` needle depths in %: linear, or sigmoid (logistic L=100, x0=50, k=0.1 applied to a
    linear grid, as the original harness)."""
    xs = np.linspace(lo, hi, n)
    if spacing == "linear":
        return [round(float(x), 1) for x in xs]
    if spacing == "sigmoid":
        return [round(100 / (1 + math.exp(-0.1 * (float(x) - 50))), 1) if 0 < x < 100 else float(x)
                for x in xs]
    raise ConfigError(f"--niah-spacing {spacing!r}: expected linear or sigmoid")


class NiahBuilder:
    def __init__(self, tokenizer, preset: str = "number", max_new_tokens: int = 8, seed: int = 0):
        presets = _presets()
        if preset not in presets:
            raise ConfigError(f"niah preset {preset!r}: expected one of {', '.join(presets)}")
        self.tok, self.p, self.preset = tokenizer, presets[preset], preset
        self.gen, self.seed = max_new_tokens, seed
        self.words = essay_words()
        self._ntok: Dict[int, int] = {}

    def _n(self, i: int) -> int:
        """Tokens of word i (with its leading space): the depth's token position, approximately."""
        if i not in self._ntok:
            self._ntok[i] = len(self.tok.encode(" " + self.words[i % len(self.words)]))
        return self._ntok[i]

    def _value(self, rng: random.Random) -> str:
        return rng.choice(self.p.values) if self.p.values else str(rng.randint(10 ** 6, 10 ** 7 - 1))

    def _text(self, start: int, n: int, depth: float, value: str):
        idx = list(range(start, start + n))
        counts = [self._n(i) for i in idx]
        hay = [self.words[i % len(self.words)] for i in idx]
        total = sum(counts)
        if depth >= 100:
            k, acc = n, total
        else:
            target, k, acc, j, run = depth / 100 * total, 0, 0, 0, 0
            while j < n and run + counts[j] <= target:  # last sentence end at or before the target
                run += counts[j]
                j += 1
                if hay[j - 1][-1:] in ".!?":
                    k, acc = j, run
        needle = self.p.needle.format(value=value)
        body = " ".join(hay[:k] + [needle] + hay[k:])
        text = f"{body}{self.p.sep}{self.p.question} {self.p.answer_prefix}"
        return text, needle, (acc / total * 100 if total else 0.0)

    def sample(self, length: int, depth: float, index: int) -> Sample:
        rng = random.Random(f"{self.seed}/{length}/{depth}/{index}")
        value = self._value(rng)
        start = rng.randrange(len(self.words))

        def fits(n: int) -> bool:
            text = self._text(start, n, depth, value)[0]
            return (len(self.tok.encode(text)) + self.gen <= length
                    and len(self.tok.encode(text + " " + value)) <= length)

        n = largest_fitting(fits, 0, length)  # every word is at least one token
        if n < 0:
            raise ConfigError(f"--lengths {length}: too short for niah: needle + question + "
                              f"{self.gen} generated tokens do not fit")
        text, needle, actual = self._text(start, n, depth, value)
        return Sample(task="niah" if self.preset == "number" else f"niah_{self.preset}", length=length,
                      index=index, input=text, outputs=[value], metric="all", tokens_to_generate=self.gen,
                      needle_chars=[text.find(needle)], depth=depth,
                      meta={"haystack_words": n, "actual_depth": round(actual, 1)})

    def grid(self, lengths: Sequence[int], depths: Sequence[float], samples: int) -> List[Sample]:
        return [self.sample(L, d, i) for L in lengths for d in depths for i in range(samples)]


def cell_scores(records: Sequence[dict]) -> Dict[tuple, float]:
    """{(length, depth): mean score in [0, 1]} from scored sample records."""
    cells: Dict[tuple, List[float]] = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(r["score"] / 100)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def plot_heatmap(records: Sequence[dict], path: Path, title: str) -> Optional[Path]:
    """Depth (rows) x length (columns), the original figure's red-yellow-green scale, 0..1."""
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap

    cells = cell_scores(records)
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = np.array([[cells.get((L, d), np.nan) for L in lengths] for d in depths])
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
