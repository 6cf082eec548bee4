"""RULER's eight needle tasks (niah_single_1..3, niah_multikey_1..3, niah_multivalue,
niah_multiquery): the format of RULER's ``data/synthetic/niah.py``, re-implemented without its
import-time argparse and nltk (see docs/eval.md for what the tests compare).

Size parameter: essay words (``essay``), noise paragraphs (``repeat``) or distractor needles
(``needle``).
"""
from __future__ import annotations

import random
import uuid
from typing import List

import numpy as np

from megatron_kd.eval.haystack import _SENTENCE_END, essay_words
from megatron_kd.eval.ruler.config import prompt_template
from megatron_kd.eval.ruler.words import random_key_word

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: RULER's 40 needle depths (%), numpy rounding (half to even) as in RULER
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))  # 7 digits
    if kind == "words":
        return random_key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle type {kind!r}: expected numbers, words or uuids")


class NiahTask:
    kind = "niah"

    def __init__(self, args: dict, length: int, seed: int):
        self.seed = seed
        self.type_haystack = args["type_haystack"]
        self.type_k = args["type_needle_k"]
        self.type_v = args["type_needle_v"]
        self.num_q = int(args["num_needle_q"])
        self.num_k = max(int(args["num_needle_k"]), self.num_q)
        self.num_v = int(args["num_needle_v"])

    def size_range(self, budget: int):
        if self.type_haystack == "essay":
            return 1, min(len(essay_words()), budget)
        return 1, max(1, budget // 4)

    def build(self, n: int, rng: random.Random, index: int = 0):
        keys, values, needles = [], [], []
        for _ in range(self.num_k):
            keys.append(random_value(self.type_k, rng))
            vals = []
            for _ in range(self.num_v):
                vals.append(random_value(self.type_v, rng))
                needles.append(NEEDLE.format(type_needle_v=self.type_v, key=keys[-1], value=vals[-1]))
            values.append(vals)
        random.Random(self.seed).shuffle(needles)  # RULER shuffles with the fixed task seed

        depths = []
        if self.type_haystack == "essay":
            sents = [s for s in _SENTENCE_END.split(" ".join(essay_words()[:n]).strip()) if s]
            depths = sorted(rng.sample(DEPTHS, len(needles)))
            cuts = [0] + [int(len(sents) * (d / 100)) for d in depths] + [len(sents)]
            parts = []
            for i in range(1, len(cuts)):
                parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.type_haystack == "repeat":
                sentences = [REPEAT_NOISE] * n
            else:  # "needle": distractor needles with their own random keys and values
                sentences = [NEEDLE.format(type_needle_v=self.type_v, key=random_value(self.type_k, rng),
                                           value=random_value(self.type_v, rng)) for _ in range(n)]
            for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
                sentences.insert(i, needle)
            context = "\n".join(sentences)

        asked = rng.sample(range(self.num_k), self.num_q)
        queries = [keys[i] for i in asked]
        answers = [a for i in asked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, type_v = prompt_template("niah"), self.type_v
        if self.num_q * self.num_v == 1:  # RULER's singular rewrite, same order of replacements
            for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                template = template.replace(a, b)
            type_v = type_v[:-1]
        text = template.format(type_needle_v=type_v, context=context, query=query)
        asked_needles = [NEEDLE.format(type_needle_v=self.type_v, key=keys[i], value=v)
                         for i in asked for v in values[i]]
        needle_chars: List[int] = [text.find(nd) for nd in asked_needles]
        return text, answers, needle_chars, {"depths": depths}
