"""Scoring: RULER's definitions on hand-written cases, and equality with NVIDIA's own functions
(``long_context_eval.eval.synthetic.constants``, importable offline) on the same inputs."""
from __future__ import annotations

import random

import pytest

from megatron_kd.eval.scoring import corpus_score, match_all, match_part, per_sample, postprocess_pred


def test_hand_written_cases():
    # all: fraction of references found, case-insensitive substring
    assert match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert match_all("ANSWER: Paris", ["paris"]) == 1.0
    assert match_all("", ["x"]) == 0.0
    assert match_all("12345", ["123456"]) == 0.0  # a reference longer than the prediction
    # part: any reference found
    assert match_part("It was in France.", ["france", "Paris"]) == 1.0
    assert match_part("It was in Spain.", ["france", "Paris"]) == 0.0
    # corpus: mean x 100, 2 decimals
    assert corpus_score("all", ["a b", "c"], [["a", "b", "z"], ["c"]]) == round((2 / 3 + 1) / 2 * 100, 2)
    assert corpus_score("part", ["a", "q"], [["a", "b"], ["c"]]) == 50.0
    assert postprocess_pred("  1234\x00567\t\n") == "1234\n567"


def test_matches_nvidia_scoring_functions():
    nv = pytest.importorskip("long_context_eval.eval.synthetic.constants")
    rng = random.Random(0)
    vocab = ["Paris", "paris", "1234567", "7654321", "blue-whale", "VAR ABCDE", "yes", "no", "x"]
    preds, refs = [], []
    for _ in range(300):
        preds.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 5))))
        refs.append([rng.choice(vocab) for _ in range(rng.randint(1, 4))])
    assert corpus_score("all", preds, refs) == nv.string_match_all(preds, refs)
    assert corpus_score("part", preds, refs) == nv.string_match_part(preds, refs)
    assert per_sample("all", preds, refs) == nv.string_match_all_per_sample(preds, refs)
    assert per_sample("part", preds, refs) == nv.string_match_part_per_sample(preds, refs)
    assert nv.TASKS["qa"]["metric_fn"] is nv.string_match_part
    for kind in ("niah", "variable_tracking", "common_words_extraction", "freq_words_extraction"):
        assert nv.TASKS[kind]["metric_fn"] is nv.string_match_all
    from megatron_kd.eval.ruler import METRIC

    assert {k: ("part" if v is nv.string_match_part else "all") for k, v in
            ((k, t["metric_fn"]) for k, t in nv.TASKS.items())} == METRIC
