"""Distillation runs with real processes: layout parity, a frozen teacher, student-only checkpoints,
and the KD bad-input checks.

A small teacher (other shape than the student) is trained for a few steps; every KD run then
starts from the same student checkpoint and distils from it with alpha=0.5, T=2, so the KD and
CE parts both move the loss.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import multirank_util as mr

TEACHER = ["teacher.num_layers=4", "teacher.hidden_size=96", "teacher.num_attention_heads=4",
           "teacher.num_query_groups=2", "teacher.ffn_hidden_size=192",
           "teacher.make_vocab_size_divisible_by=128", "teacher.rotary_base=500000"]
STEPS = 3
KD = ["kd.alpha=0.5", "kd.temperature=2.0", f"train.train_iters={STEPS}"]
# fp32; measured max relative difference to the TP=1 curve: ~3e-7 (tp2, pp2). A teacher on the
# wrong stage, a mis-sliced hidden hand-off or a wrong TP reduction moves the loss by > 1e-3.
RTOL = 1e-5


def as_model(overrides):
    """teacher.x=... -> model.x=... (to train the teacher as a plain model)."""
    return [o.replace("teacher.", "model.", 1) for o in overrides]


@pytest.fixture(scope="module")
def kd_runs(tiny_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    out = {"teacher": root / "teacher", "init": root / "init"}
    mr.train(tiny_recipe, out["teacher"], 1, as_model(TEACHER) + ["train.train_iters=3"])
    mr.train(tiny_recipe, out["init"], 1, ["train.train_iters=2"])
    common = [f"checkpoint.load={out['init']}", "checkpoint.finetune=true",
              f"teacher.load={out['teacher']}", *TEACHER, *KD]
    for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, ["parallel.tensor_model_parallel_size=2"]),
                               ("pp2", 2, ["parallel.pipeline_model_parallel_size=2"]),
                               ("dp2", 2, []),
                               # interleaved schedule: both models split into 2 x 2 chunks
                               ("pp2_vp2", 2, ["parallel.pipeline_model_parallel_size=2",
                                               "parallel.virtual_pipeline_model_parallel_size=2"]),
                               # the chunked fused loss (kd/fused.py) in the training path
                               ("tp2_fused", 2, ["parallel.tensor_model_parallel_size=2",
                                                 "kd.loss_impl=fused", "kd.fused_chunk_size=37"]),
                               # sequence parallel: the fused loss gathers the [s/TP] hidden states
                               ("tp2_sp", 2, ["parallel.tensor_model_parallel_size=2",
                                              "parallel.sequence_parallel=true"]),
                               ("tp2_sp_fused", 2, ["parallel.tensor_model_parallel_size=2",
                                                    "parallel.sequence_parallel=true",
                                                    "kd.loss_impl=fused", "kd.fused_chunk_size=37"])):
        out[name] = root / name
        mr.train(tiny_recipe, out[name], nproc, common + extra)
    out["ce"] = root / "ce"
    mr.train(tiny_recipe, out["ce"], 1, [f"checkpoint.load={out['init']}", "checkpoint.finetune=true",
                                         f"train.train_iters={STEPS}", "kd.alpha=0.0"])
    out["common"] = common
    return out


@pytest.mark.parametrize("name, key", [(n, k) for n in ("tp2", "pp2", "dp2", "pp2_vp2") for k in ("loss", "kd loss", "lm loss")]
                         + [(n, "loss") for n in ("tp2_fused", "tp2_sp", "tp2_sp_fused")])
def test_kd_curve_matches_single_rank(kd_runs, name, key):
    ref = dict(mr.metrics(kd_runs["tp1"], "train", key))
    got = dict(mr.metrics(kd_runs[name], "train", key))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for it in ref:
        assert math.isclose(got[it], ref[it], rel_tol=RTOL), (name, key, it, got[it], ref[it])
    vref, vgot = mr.metrics(kd_runs["tp1"], "valid", key), mr.metrics(kd_runs[name], "valid", key)
    assert len(vgot) == len(vref) > 0
    for (i, a), (j, b) in zip(vgot, vref):
        assert i == j and math.isclose(a, b, rel_tol=RTOL)


def test_kd_is_active_and_mixed(kd_runs):
    rows = {k: dict(mr.metrics(kd_runs["tp1"], "train", k)) for k in ("loss", "kd loss", "lm loss")}
    for it in rows["loss"]:
        assert rows["kd loss"][it] > 1e-3  # a different teacher: the KD term is not trivially zero
        assert math.isclose(rows["loss"][it], 0.5 * rows["kd loss"][it] + 0.5 * rows["lm loss"][it],
                            rel_tol=1e-5)
    # the CE baseline builds no teacher: no KD term is logged at all
    ce_rows = [json.loads(l) for l in (kd_runs["ce"] / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert ce_rows and all("kd loss" not in r for r in ce_rows)


def _tensor_keys(run_dir: Path):
    from megatron.core import dist_checkpointing

    from megatron_kd.training.checkpointing import resolve_load_dir

    meta = dist_checkpointing.load_tensors_metadata(str(resolve_load_dir(run_dir)))
    return {k: tuple(v.global_shape) for k, v in meta.items()}


def test_teacher_absent_from_student_checkpoint(kd_runs):
    kd_keys = {k: v for k, v in _tensor_keys(kd_runs["tp1"]).items() if not k.startswith("optimizer.")}
    ce_keys = {k: v for k, v in _tensor_keys(kd_runs["ce"]).items() if not k.startswith("optimizer.")}
    assert kd_keys == ce_keys  # exactly the student's tensors, shapes included
    assert all(shape[-1] != 96 for shape in kd_keys.values())  # nothing of the teacher's width


def test_teacher_frozen_in_process(kd_runs, tiny_recipe, tmp_path):
    worker = Path(__file__).with_name("kd_frozen_worker.py")
    p = mr.run([sys.executable, str(worker), str(tiny_recipe), str(tmp_path / "frozen"),
                *kd_runs["common"]])
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r == {"teacher_unchanged": True, "student_changed": True, "teacher_requires_grad": False,
                 "teacher_in_optimizer": False, "teacher_training_mode": False,
                 "student_training_mode": True, "teacher_grads": False}, r


# ----------------------------------------------------------------------------- bad input


def _error(tiny_recipe, tmp_path, overrides, nproc=1):
    run_dir = tmp_path / "bad"
    p = mr.train(tiny_recipe, run_dir, nproc, overrides, expect_rc=None)
    assert p.returncode != 0
    assert not run_dir.exists(), "a refused run must not write its run directory"
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert lines, mr.tail(p.stderr)
    return lines[0]


def test_kd_without_teacher_is_refused(tiny_recipe, tmp_path):
    assert "teacher.load" in _error(tiny_recipe, tmp_path, ["kd.alpha=0.5"])


@pytest.mark.parametrize("override, needle", [("kd.alpha=1.5", "kd.alpha"),
                                              ("kd.temperature=0", "kd.temperature")])
def test_kd_value_checks(tiny_recipe, tmp_path, override, needle):
    assert needle in _error(tiny_recipe, tmp_path, [override])


def test_triton_fused_loss_refused_on_cpu(kd_runs, tiny_recipe, tmp_path):
    """kd.fused_impl=triton needs CUDA (kd/triton_fused.py): refused before anything is written."""
    line = _error(tiny_recipe, tmp_path, kd_runs["common"] + ["kd.loss_impl=fused", "kd.fused_impl=triton"])
    assert "kd.fused_impl" in line and "CUDA" in line, line


def test_teacher_shape_mismatch_names_tensor(kd_runs, tiny_recipe, tmp_path):
    bad = [o if not o.startswith("teacher.hidden_size") else "teacher.hidden_size=64"
           for o in kd_runs["common"]]
    line = _error(tiny_recipe, tmp_path, bad)
    assert "teacher.load" in line and "embedding.word_embeddings.weight" in line and "96" in line, line


def test_teacher_tokenizer_vocab_mismatch(kd_runs, tiny_recipe, tiny_data, tmp_path):
    from megatron_kd.data import iter_offline_corpus, train_sentencepiece

    other = train_sentencepiece(list(iter_offline_corpus("hotpotqa", max_docs=200)), 400,
                                str(tmp_path / "other"))
    line = _error(tiny_recipe, tmp_path, kd_runs["common"] + [f"teacher.tokenizer_model={other}"])
    assert "400" in line and "500" in line, line


def test_teacher_layers_cannot_share_pipeline(kd_runs, tiny_recipe, tmp_path):
    bad = [o if not o.startswith("teacher.num_layers") else "teacher.num_layers=3" for o in kd_runs["common"]]
    line = _error(tiny_recipe, tmp_path, bad + ["parallel.pipeline_model_parallel_size=2"], nproc=2)
    assert "teacher.num_layers=3" in line, line
