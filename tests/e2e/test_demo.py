"""The demo pipeline end to end at a reduced size (CPU, one process, ~1-2 minutes on 2 cores).

Checks properties of the run, not numbers of a tiny training: every stage's run directory and
checkpoint exist; the summary holds an accuracy in [0, 1] for every model and distance; phase 2
starts from the phase-1 weights; the KD run logs its KD loss and the CE run never builds a teacher;
the teacher's parameters are bit-identical after the KD run and its checkpoint is untouched.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("long_context_eval")

from megatron_kd.demo import EVAL_DISTANCES, TEACHER_STAGES, run_demo  # noqa: E402


def _hash_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, request):
    import megatron_kd.kd.teacher as teacher_mod

    root = tmp_path_factory.mktemp("demo") / "run"
    built = []  # one entry per build_teacher_chunks call: (chunks, params snapshot, ckpt hash)
    original = teacher_mod.build_teacher_chunks

    def spy(cfg, vocab_size):
        chunks = original(cfg, vocab_size)
        snap = [{k: v.detach().clone() for k, v in c.state_dict().items() if torch.is_tensor(v)}
                for c in chunks]
        ckpt = Path(cfg.teacher.load) / "checkpoints"
        built.append((chunks, snap, ckpt, _hash_dir(ckpt)))
        return chunks

    mp = pytest.MonkeyPatch()
    mp.setattr(teacher_mod, "build_teacher_chunks", spy)
    try:
        summary = run_demo(str(root), scale=0.05, eval_samples=8, log_interval=1)
    finally:
        mp.undo()
    return root, summary, built


def test_run_dirs_and_checkpoints_exist(demo):
    root, summary, _ = demo
    runs = [root / "teacher" / f"len{w:04d}" for w, _, _ in TEACHER_STAGES]
    runs += [root / "phase1", root / "phase2_kd", root / "phase2_ce"]
    for run in runs:
        assert (run / "config.yaml").is_file(), run
        latest = run / "checkpoints" / "latest_checkpointed_iteration.txt"
        assert latest.is_file(), run
        it = int(latest.read_text())
        assert (run / "checkpoints" / f"iter_{it:07d}" / "metadata.json").is_file(), run
    for name in [f"teacher_{w}" for w, _, _ in TEACHER_STAGES] + ["phase1", "phase2"]:
        assert (root / "data" / f"{name}.bin").is_file()
    assert (root / "eval" / "passkey.json").is_file()


def test_summary_accuracy_for_every_model_and_distance(demo):
    root, summary, _ = demo
    on_disk = json.loads((root / "demo_summary.json").read_text())
    results = on_disk["eval"]["results"]
    assert {"teacher", "KD student", "CE student"} <= set(results)
    for name, r in results.items():
        assert set(r["accuracy"]) == {str(d) for d in EVAL_DISTANCES}, name
        for d, acc in r["accuracy"].items():
            assert 0.0 <= acc <= 1.0, (name, d, acc)
        assert 0 < r["heldout_loss"] < 20, name
    # every probe distance is longer than any phase-2 training document
    assert min(EVAL_DISTANCES) > on_disk["eval"]["longest_phase2_document_tokens"]


def test_phase2_starts_from_phase1_weights(demo):
    root, summary, _ = demo
    p1 = [m["lm loss"] for m in _metrics(root / "phase1") if m["split"] == "train"]
    for run in ("phase2_kd", "phase2_ce"):
        p2 = [m["lm loss"] for m in _metrics(root / run) if m["split"] == "train"]
        # a fresh model starts near ln(V); the loaded phase-1 weights start well below it
        assert p2[0] < p1[0] - 0.5, (run, p1[0], p2[0])
        cfg = (root / run / "config.yaml").read_text()
        assert "finetune: true" in cfg and str(root / "phase1") in cfg


def test_kd_logs_kd_loss_and_ce_builds_no_teacher(demo):
    root, _, built = demo
    kd = [m for m in _metrics(root / "phase2_kd") if m["split"] == "train"]
    ce = [m for m in _metrics(root / "phase2_ce") if m["split"] == "train"]
    assert kd and all("kd loss" in m and m["kd loss"] >= 0 for m in kd)
    assert ce and not any("kd loss" in m for m in ce)
    assert len(built) == 1  # the teacher was built once: for the KD run, never for the CE run


def test_teacher_unchanged_by_kd(demo):
    _, _, built = demo
    chunks, snapshot, ckpt, ckpt_hash = built[0]
    for chunk, snap in zip(chunks, snapshot):
        now = {k: v for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
        assert set(now) == set(snap)
        for k in snap:
            assert torch.equal(now[k], snap[k]), k
        assert not any(p.requires_grad for p in chunk.parameters())
    assert _hash_dir(ckpt) == ckpt_hash
