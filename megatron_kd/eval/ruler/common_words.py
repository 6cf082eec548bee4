"""RULER's ``cwe``: a numbered list where 10 words repeat often and the rest rarely; the answer is
the 10 common words. Format of RULER's ``common_words_extraction.py`` (one worked example first;
repeat counts 30/3 from 4k tokens on, 6/1 below, as RULER)."""
from __future__ import annotations

import random

from megatron_kd.eval.ruler.config import prompt_template
from megatron_kd.eval.ruler.words import common_word_pool


class CommonWordsTask:
    kind = "common_words_extraction"

    def __init__(self, args: dict, length: int, seed: int):
        self.freq_cw, self.freq_ucw = int(args.get("freq_cw", 30)), int(args.get("freq_ucw", 3))
        self.num_cw = int(args.get("num_cw", 10))
        self.length, self.seed = length, seed

    def size_range(self, budget: int):
        return self.num_cw + 1, max(self.num_cw + 1, min(len(common_word_pool(self.seed)), budget // 2))

    def _example(self, rng, num_words, common_repeats, uncommon_repeats):
        chosen = rng.sample(common_word_pool(self.seed), num_words)
        common, uncommon = chosen[:self.num_cw], chosen[self.num_cw:]
        words = common * int(common_repeats) + uncommon * int(uncommon_repeats)
        random.Random(self.seed).shuffle(words)  # RULER: fixed-seed shuffle
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), common

    def build(self, n: int, rng: random.Random, index: int = 0):
        if self.length < 4096:
            ex_ctx, ex_ans = self._example(rng, 20, 3, 1)
            ctx, ans = self._example(rng, n, 6, 1)
        else:
            ex_ctx, ex_ans = self._example(rng, 40, 10, 3)
            ctx, ans = self._example(rng, n, self.freq_cw, self.freq_ucw)
        template = prompt_template("common_words_extraction")
        example = template.format(context=ex_ctx, query="") + " ".join(
            f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
        return example + "\n" + template.format(context=ctx, query=""), ans, [], {}
