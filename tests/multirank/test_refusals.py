"""Run-directory refusals: one-line errors, exit status 2, the existing run untouched."""
from __future__ import annotations

import pytest

import multirank_util as mr


@pytest.fixture(scope="module")
def existing_run(tiny_recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("refusals") / "run"
    mr.train(tiny_recipe, run, 1, ["train.train_iters=1", "train.eval_interval=0"])
    assert (run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    return run


def error_lines(p) -> list[str]:
    return [l for l in p.stderr.splitlines() if l.strip()]


def test_resume_with_changed_model_config_is_refused(tiny_recipe, existing_run):
    before = mr.snapshot(existing_run)
    p = mr.train(tiny_recipe, existing_run, 1,
                 ["train.train_iters=1", "train.eval_interval=0", "model.hidden_size=32"],
                 flags=["--resume"], expect_rc=2)
    lines = error_lines(p)
    assert len(lines) == 1, p.stderr
    assert "checkpoint.save=" in lines[0] and "model.hidden_size" in lines[0], lines[0]
    assert "64 -> 32" in lines[0], lines[0]
    assert mr.snapshot(existing_run) == before


def test_existing_run_without_resume_or_overwrite_is_refused(tiny_recipe, existing_run):
    before = mr.snapshot(existing_run)
    p = mr.train(tiny_recipe, existing_run, 1, ["train.train_iters=1", "train.eval_interval=0"],
                 flags=[], expect_rc=2)
    lines = error_lines(p)
    assert len(lines) == 1, p.stderr
    assert "checkpoint.save=" in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0], lines[0]
    assert mr.snapshot(existing_run) == before


def test_moe_student_under_tp_without_sp_refused_before_anything_is_written(tiny_recipe, existing_run):
    """megatron-core would raise in the first training forward; the trainer says it up front."""
    before = mr.snapshot(existing_run)
    p = mr.train(tiny_recipe, existing_run, 2,
                 ["train.train_iters=1", "model.num_moe_experts=4", "parallel.tensor_model_parallel_size=2"],
                 flags=["--overwrite"], expect_rc=None)
    assert p.returncode != 0  # each rank exits 2; torchrun reports 1
    assert "megatron-kd train: error: model.num_moe_experts=4 with parallel.tensor_model_parallel_size=2 " \
           "needs parallel.sequence_parallel=true" in p.stderr, mr.tail(p.stderr)
    assert mr.snapshot(existing_run) == before
