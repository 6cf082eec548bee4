"""Word material for RULER's keys (niah) and word lists (cwe).

RULER draws both from the ``wonderwords`` package's noun / adjective / verb lists (niah keys are
``adjective-noun``). When wonderwords is importable those lists are used; otherwise (it is not a
dependency here) the distinct words of the Paul Graham essays stand in: keys are two essay words
joined by ``-``. The task format is unchanged; only the word pool differs (reported in results).
"""
from __future__ import annotations

import functools
import random
from typing import List, Tuple

from megatron_kd.eval.haystack import essay_vocabulary


@functools.lru_cache(maxsize=1)
def _wonderwords() -> Tuple[List[str], List[str], List[str]] | None:
    try:
        from wonderwords import random_word
    except ImportError:
        return None
    read = random_word._get_words_from_text_file  # what RULER calls
    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


def source() -> str:
    return "wonderwords" if _wonderwords() else "paul-graham-essays"


def random_key_word(rng: random.Random) -> str:
    ww = _wonderwords()
    if ww:
        nouns, adjs, _ = ww
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    vocab = essay_vocabulary()
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"


@functools.lru_cache(maxsize=4)
def common_word_pool(seed: int) -> List[str]:
    """RULER cwe: sorted distinct nouns + adjectives + verbs, shuffled with the task seed."""
    ww = _wonderwords()
    words = sorted(set(ww[0] + ww[1] + ww[2])) if ww else list(essay_vocabulary())
    random.Random(seed).shuffle(words)
    return words
