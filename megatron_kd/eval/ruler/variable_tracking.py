"""RULER's ``vt``: chains ``VAR X = 12345``, ``VAR Y = VAR X`` hidden in repeated noise; the answer
is every variable of the chain. Format of RULER's ``variable_tracking.py``, including its one
in-context example (a smaller instance with 3-letter names, prepended), whose size here is
min(500, length // 4) tokens (RULER: 500) so short targets keep room for the task itself."""
from __future__ import annotations

import random
import string

from megatron_kd.eval.ruler.config import prompt_template

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


class VariableTrackingTask:
    kind = "variable_tracking"

    def __init__(self, args: dict, length: int, seed: int):
        self.num_chains = int(args.get("num_chains", 1))
        self.num_hops = int(args.get("num_hops", 4))
        self.seed = seed
        self.icl_budget = min(500, length // 4)
        self.icl = None  # (text, answers) of the in-context example, built by the driver

    def size_range(self, budget: int):
        return 1, max(1, budget // 4)

    def _chains(self, rng, is_icl):
        k = 3 if is_icl else 5
        hops = min(10, self.num_hops) if is_icl else self.num_hops
        names = ["".join(rng.choices(string.ascii_uppercase, k=k))
                 for _ in range((hops + 1) * self.num_chains)]
        while len(set(names)) < self.num_chains * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
        names = list(dict.fromkeys(names))
        out_vars, chains = [], []
        for i in range(0, len(names), hops + 1):
            v = names[i:i + hops + 1]
            out_vars.append(v)
            chain = [f"VAR {v[0]} = {rng.randint(10000, 99998)}"]
            chain += [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)]
            chains.append(chain)
        return out_vars, chains

    def build_plain(self, n: int, rng: random.Random, is_icl: bool = False):
        out_vars, chains = self._chains(rng, is_icl)
        sentences = [NOISE] * n
        if len(sentences) <= len(chains[0]):
            sentences = [s + "." if s.strip() else s for noise in sentences for s in noise.split(".")]
            if len(sentences) <= len(chains[0]):
                chains = [c[:len(sentences) - 1] for c in chains]
        for chain in chains:
            positions = sorted(rng.sample(range(len(sentences)), len(chain)))
            for j, p in enumerate(positions):
                sentences.insert(p + j, chain[j])
        context = " ".join(sentences).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        hops = min(10, self.num_hops) if is_icl else self.num_hops
        text = prompt_template("variable_tracking").format(context=context, query=value, num_v=hops + 1)
        return text, out_vars[0]

    def build(self, n: int, rng: random.Random, index: int = 0):
        text, answers = self.build_plain(n, rng)
        if self.icl is not None:
            example_text, ex_answers = self.icl
            example = example_text + " " + " ".join(ex_answers) + "\n\n"
            for name in ex_answers:  # RULER's randomize_icl: fresh names in each copy
                example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
            text = " " + example + "\n\n" + text
        return text, answers, [], {}
