"""RULER's synthetic tasks, generated offline to a target token length and scored like RULER.

:func:`generate` fits each task's size parameter by binary search
(:func:`megatron_kd.eval.haystack.largest_fitting`) so that prompt + ``tokens_to_generate`` <=
length and prompt + answer <= length, then builds ``num_samples`` samples (each shrinks its size
until it fits, as RULER does).
"""
from __future__ import annotations

import random
from typing import List, Optional

from megatron_kd.config import ConfigError
from megatron_kd.eval.ruler.common_words import CommonWordsTask
from megatron_kd.eval.ruler.config import task_configs, tokens_to_generate
from megatron_kd.eval.ruler.freq_words import FreqWordsTask
from megatron_kd.eval.ruler.niah import NiahTask
from megatron_kd.eval.ruler.qa import QATask
from megatron_kd.eval.ruler.variable_tracking import VariableTrackingTask
from megatron_kd.eval.sample import Sample

GENERATORS = {"niah": NiahTask, "variable_tracking": VariableTrackingTask,
              "common_words_extraction": CommonWordsTask, "freq_words_extraction": FreqWordsTask,
              "qa": QATask}
METRIC = {"niah": "all", "variable_tracking": "all", "common_words_extraction": "all",
          "freq_words_extraction": "all", "qa": "part"}


def task_names() -> List[str]:
    return list(task_configs())


def make_task(name: str, length: int, seed: int = 42):
    cfg = task_configs().get(name)
    if cfg is None:
        raise ConfigError(f"ruler task {name!r}: expected one of {', '.join(task_names())}")
    return GENERATORS[cfg["task"]](cfg["args"], length, seed)


def generate(name: str, tokenizer, length: int, num_samples: int, seed: int = 42,
             max_new_tokens: Optional[int] = None) -> List[Sample]:
    """``num_samples`` prompts of task ``name`` fitting ``length`` tokens under ``tokenizer``.

    ``max_new_tokens`` replaces RULER's ``tokens_to_generate`` (128 for niah) for short targets.
    """
    task = make_task(name, length, seed)
    ttg = int(max_new_tokens) if max_new_tokens else tokens_to_generate(task.kind)
    budget = length - ttg

    def n_tokens(text: str) -> int:
        return len(tokenizer.encode(text))

    def fits_text(text, answers) -> bool:
        return n_tokens(text) <= budget and n_tokens(text + " " + " ".join(answers)) <= length

    def answers_present(text, answers) -> bool:  # qa answers need not be verbatim (yes/no)
        return task.kind == "qa" or all(a in text for a in answers)

    if isinstance(task, VariableTrackingTask):  # RULER's one in-context example, sized first
        icl_fit = task.size_range(task.icl_budget)
        m = _fit(lambda k: n_tokens(" ".join(map(str, task.build_plain(k, random.Random(seed), True)))) + 1
                 <= task.icl_budget, *icl_fit)
        if m >= icl_fit[0]:
            task.icl = task.build_plain(m, random.Random(seed), is_icl=True)

    lo, hi = task.size_range(budget)
    n = _fit(lambda k: fits_text(*task.build(k, random.Random(seed), 0)[:2]), lo, hi)
    if n < lo:
        text = task.build(lo, random.Random(seed), 0)[0]
        raise ConfigError(f"--lengths {length}: too short for ruler:{name}: its smallest prompt is "
                          f"{n_tokens(text)} tokens + {ttg} generated tokens")
    samples = []
    for i in range(num_samples):
        m = n
        while True:
            rng = random.Random(f"{seed}/{name}/{length}/{i}/{m}")
            text, answers, needle_chars, meta = task.build(m, rng, i)
            if fits_text(text, answers) or m <= lo:
                break
            m = max(lo, m - max(1, m // 50))
        if not fits_text(text, answers):
            raise ConfigError(f"--lengths {length}: ruler:{name} sample {i} does not fit")
        assert answers_present(text, answers), f"ruler:{name}: an answer is missing from the prompt"
        samples.append(Sample(task=f"ruler:{name}", length=length, index=i, input=text,
                              outputs=[str(a) for a in answers], metric=METRIC[task.kind],
                              tokens_to_generate=ttg, needle_chars=needle_chars,
                              depth=(meta.get("depths") or [None])[0] if len(needle_chars) == 1 else None,
                              meta={"size": m, "icl": getattr(task, "icl", None) is not None, **meta}))
    return samples


def _fit(fits, lo, hi):
    from megatron_kd.eval.haystack import largest_fitting

    return largest_fitting(fits, lo, hi)
