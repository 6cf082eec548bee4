"""RULER's scoring, restated: case-insensitive substring match of the references in the prediction.

``string_match_all`` (niah, vt, cwe, fwe): the fraction of a sample's references found;
``string_match_part`` (qa): 1 if any reference is found. Corpus scores are the mean x 100,
rounded to 2 decimals, as in ``long_context_eval.eval.synthetic.constants`` (tests compare the two
on the same inputs). Restated rather than imported so scoring does not depend on the package's
module layout; :func:`postprocess_pred` is RULER's clean-up of a raw prediction.
"""
from __future__ import annotations

import re
from typing import List, Sequence

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess_pred(pred: str) -> str:
    """Strip, then control characters -> newline, strip again (RULER's evaluate.postprocess_pred)."""
    return _NON_PRINTABLE.sub("\n", (pred or "").strip()).strip()


def match_all(pred: str, refs: Sequence[str]) -> float:
    """Fraction of ``refs`` that occur in ``pred`` (case-insensitive), in [0, 1]."""
    p = pred.lower()
    return sum(r.lower() in p for r in refs) / len(refs)


def match_part(pred: str, refs: Sequence[str]) -> float:
    """1.0 if any of ``refs`` occurs in ``pred`` (case-insensitive), else 0.0."""
    p = pred.lower()
    return float(any(r.lower() in p for r in refs))


METRICS = {"all": match_all, "part": match_part}


def per_sample(metric: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> List[float]:
    """Per-sample scores x 100 (RULER's ``*_per_sample``)."""
    fn = METRICS[metric]
    return [fn(p, r) * 100 for p, r in zip(preds, refs)]


def corpus_score(metric: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean x 100, 2 decimals (RULER's ``string_match_all`` / ``string_match_part``)."""
    fn = METRICS[metric]
    return round(sum(fn(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)
