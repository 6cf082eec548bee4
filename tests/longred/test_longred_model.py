"""LongReD's model-level semantics on tiny megatron-core models (one subprocess, ~5 s CPU).

Each distillation loss is exactly zero when the student is the teacher at the same positions, and
not zero once the student's positions are skipped or its rotary base differs (so the zero is not
an artefact); the attention probabilities recomputed from q and k equal megatron-core's local
softmax output; the attention-KL selection picks a layer perturbed on purpose.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "multirank"))
import multirank_util as mr  # noqa: E402


@pytest.fixture(scope="module")
def result():
    p = mr.run([sys.executable, str(Path(__file__).with_name("model_worker.py"))])
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_losses_zero_when_student_is_teacher(result):
    assert result["short_same"] == 0.0 and result["s2l_same"] == 0.0


def test_losses_see_positions_and_theta(result):
    assert result["s2l_skipped"] > 1e-7
    assert result["short_theta"] > 1e-9


def test_attention_probs_match_local_softmax(result):
    assert result["probs_shape"] == [2, 4, 32, 32]
    assert result["probs_max_diff"] < 1e-6
    assert result["probs_row_sum_err"] < 1e-5
    assert result["probs_cross_doc"] == 0.0 and result["probs_future"] == 0.0


@pytest.mark.parametrize("target", ["2", "3"])
def test_selection_picks_perturbed_layer(result, target):
    r = result["selection"][target]
    assert r["picked"] == [int(target)], r
    # layers below the perturbed one are untouched: zero KL, cosine 1
    assert all(r["kl"][str(i)] == 0.0 for i in range(1, int(target)))
    assert r["below_cos"] == pytest.approx(1.0, abs=1e-6) and r["first_changed_cos"] < 0.9999
