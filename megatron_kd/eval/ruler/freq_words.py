"""RULER's ``fwe``: coded 6-letter words with Zipf(alpha) counts, the most frequent one replaced by
``...`` (noise); the answer is the next three. Format of RULER's ``freq_words_extraction.py``
(vocabulary of length // 50 coded words)."""
from __future__ import annotations

import random
import string

from megatron_kd.eval.ruler.config import prompt_template


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta for alpha > 1 (partial sum + integral tail; scipy's ``zeta`` in RULER)."""
    return sum(k ** -alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


class FreqWordsTask:
    kind = "freq_words_extraction"

    def __init__(self, args: dict, length: int, seed: int):
        self.alpha = float(args.get("alpha", 2.0))
        self.wordlen = int(args.get("coded_wordlen", 6))
        size = int(args.get("vocab_size", -1))
        self.vocab_size = max(4, length // 50) if size == -1 else size
        self.seed = seed
        self._zeta = zeta(self.alpha)

    def size_range(self, budget: int):
        # from the smallest n at which the 3 answer words (ranks 2-4) occur at least once
        lo = int(-(-(4 ** self.alpha) * self._zeta // 1))
        return lo, max(lo, budget)

    def build(self, n: int, rng: random.Random, index: int = 0):
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=self.wordlen)) for _ in range(self.vocab_size)]
        while len(set(vocab)) < self.vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=self.wordlen)))
        vocab = sorted(set(vocab))
        random.Random(self.seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        counts = [int(n * (k ** -self.alpha) / self._zeta) for k in range(1, len(vocab) + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(self.seed).shuffle(words)
        text = prompt_template("freq_words_extraction").format(context=" ".join(words), query="")
        return text, vocab[1:4], [], {"num_words": n}
