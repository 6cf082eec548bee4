"""Context parallelism with real processes (torchrun, gloo, CPU, fp32).

1. The ring attention (models/ring_attention.py) on 2 CP ranks equals dense document-masked
   attention over the whole window, forward and backward (float64 reference).
2. Training at CP=2, CP=2 x TP=2 (with full recompute), CP=2 x PP=2 (the p2p buffers hold a CP
   rank's share of the window) and CP=2 with the distributed optimizer (sharded over DP x CP)
   follows the CP=1 run on the same packed windows: train loss, grad norm and valid loss per
   step, and every weight after the last step.
3. KD at CP=2 (teacher and student share the CP layout) follows KD at CP=1.

Every run fine-tunes from one checkpoint (weights are not layout-invariant at random init); the
KD teacher is the CP=1 CE run's result, so the KD term is not zero.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import multirank_util as mr

STEPS = 3
# per-document padding budget: capacity 80 for 64-token windows, so documents get padded
PAD = ["parallel.context_parallel_padding=16"]
# full recompute in the CP x TP run: the ring attention's forward re-runs (with its p2p) in backward
RECOMPUTE = ["model.recompute_granularity=full", "model.recompute_method=uniform",
             "model.recompute_num_layers=2"]
TEACHER = ["teacher.num_layers=4", "teacher.hidden_size=64", "teacher.num_attention_heads=4",
           "teacher.num_query_groups=2", "teacher.ffn_hidden_size=128",
           "teacher.make_vocab_size_divisible_by=128", "teacher.rotary_base=500000"]
# fp32. Measured max relative difference to CP=1 (loss / grad norm / valid loss): ~1e-7
# (blockwise softmax sums in another order). A token on the wrong rank, a wrong mask across a
# block boundary, a count reduced over DP only, or dK/dV not returned to their owner moves the
# loss by > 1e-3.
RTOL = 1e-5
# The KD term alone is a KL between two close models (~0.03), a difference of nearly equal sums:
# block-wise summation order moved it by up to 1.7e-5 relative (~5e-7 absolute) in one run.
ATOL = 2e-6


def test_ring_attention_matches_dense_attention():
    worker = Path(__file__).with_name("ring_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(mr.free_port()), str(worker), "8"]
    p = mr.run(cmd)
    rows = [r for l in p.stdout.splitlines() if l.startswith("RESULT ") for r in json.loads(l[len("RESULT "):])]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert sum(r["real_tokens"] for r in rows) == 2 * 48  # every token of both windows, once
    for r in rows:
        assert r["slots"] == 56  # capacity (48 + 8) / 2 ranks x 2 windows
        for key in ("out", "dq", "dk", "dv"):
            assert r[key] < 1e-5, (key, r)
        assert r["out_scale"] > 0.5 and r["grad_scale"] > 0.1  # the comparison is not of zeros


@pytest.fixture(scope="module")
def cp_runs(tiny_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    out = {"init": root / "init"}
    mr.train(tiny_recipe, out["init"], 1, ["train.train_iters=2"])
    common = [f"checkpoint.load={out['init']}", "checkpoint.finetune=true", f"train.train_iters={STEPS}"]
    kd = [*TEACHER, "kd.alpha=0.5", "kd.temperature=2.0"]
    for name, nproc, extra in (
            ("cp1", 1, []),
            ("cp2", 2, ["parallel.context_parallel_size=2", *PAD]),
            ("cp2_tp2_sp", 4, ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                               "parallel.sequence_parallel=true",
                               *PAD, *RECOMPUTE]),
            ("cp2_pp2", 4, ["parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                            *PAD]),
            ("cp2_distopt", 2, ["parallel.context_parallel_size=2", "parallel.use_distributed_optimizer=true",
                                *PAD]),
            ("kd_cp1", 1, kd),
            ("kd_cp2", 2, kd + ["parallel.context_parallel_size=2", *PAD])):
        out[name] = root / name
        # the teacher: the CP=1 CE run's final weights (the init's near-uniform attention would
        # make any same-shape teacher agree with the student)
        teacher = [f"teacher.load={out['cp1']}"] if name.startswith("kd") else []
        mr.train(tiny_recipe, out[name], nproc, common + extra + teacher)
    return out


def _close(ref: dict, got: dict, what: str):
    assert sorted(got) == sorted(ref) and ref, what
    diffs = {it: abs(got[it] - ref[it]) for it in ref}
    assert all(diffs[it] <= RTOL * abs(ref[it]) + ATOL for it in ref), \
        f"{what}: absolute diffs per iteration {diffs}, values {ref}"


@pytest.mark.parametrize("name, ref, key", [("cp2", "cp1", "lm loss"), ("cp2_tp2_sp", "cp1", "lm loss"),
                                            ("cp2_pp2", "cp1", "lm loss"), ("cp2_distopt", "cp1", "lm loss"),
                                            ("kd_cp2", "kd_cp1", "loss"), ("kd_cp2", "kd_cp1", "kd loss"),
                                            ("kd_cp2", "kd_cp1", "lm loss")])
def test_cp_curves_match_cp1(cp_runs, name, ref, key):
    for split, k in (("train", key), ("valid", key), ("train", "grad_norm")):
        r = dict(mr.metrics(cp_runs[ref], split, k))
        g = dict(mr.metrics(cp_runs[name], split, k))
        assert len(r) == STEPS, (split, k)
        _close(r, g, f"{name} vs {ref}: {split} {k}")
    train = dict(mr.metrics(cp_runs[ref], "train", key))
    assert train[STEPS] < train[1] - 0.01  # the weights move


@pytest.mark.parametrize("name, ref", [("cp2", "cp1"), ("cp2_tp2_sp", "cp1"), ("cp2_pp2", "cp1"),
                                       ("cp2_distopt", "cp1"), ("kd_cp2", "kd_cp1")])
def test_cp_weights_after_training_match_cp1(cp_runs, name, ref, tmp_path):
    a, b = mr.checkpoint_weights(cp_runs[name], STEPS, tmp_path), mr.checkpoint_weights(cp_runs[ref], STEPS, tmp_path)
    assert sorted(a) == sorted(b) and len(a) >= 8
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k].float() - b[k].float()).abs().max().item() < 1e-5, k


def test_kd_term_active_under_cp(cp_runs):
    kd = dict(mr.metrics(cp_runs["kd_cp2"], "train", "kd loss"))
    assert all(v > 1e-3 for v in kd.values()), kd
