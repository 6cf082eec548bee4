"""The demo pipeline end to end at a reduced size (CPU, one process, ~2 minutes on 2 cores).

Checks properties of the run, not numbers of a tiny training: every stage's run directory and
checkpoint exist; demo_summary.json holds ``retrieval.<model>.<band>.{exact_match, ci95, n}`` for
every model and band; phase 2 starts from the phase-1 weights; the KD run logs its KD loss and
the CE run never builds a teacher; the teacher's parameters are bit-identical after the KD run and
its checkpoint is untouched; the teacher stages train on the answer-token objective; the answer
mask marks exactly the answer keys. Whether anything retrieves is not asserted: at this scale
phase 1 runs a few dozen steps (the in-distribution bar is off); the full demo's numbers are in the
README.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("long_context_eval")

from megatron_kd.demo import MODELS, reduced, run_demo  # noqa: E402
from megatron_kd.study.spec import BANDS  # noqa: E402

PHASE1, KD, CE = "phase1_theta10k/seed0", "10k_to_500k/kd/seed0", "10k_to_500k/ce/seed0"


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
        study = reduced(0.03, samples=4)
        summary = run_demo(str(root), study=study)
    finally:
        mp.undo()
    return root, summary, built, study


def test_run_dirs_and_checkpoints_exist(demo):
    root, summary, _, study = demo
    runs = [root / "teacher" / f"len{w:04d}" for w, _, _ in study.teacher_stages]
    runs += [root / PHASE1, root / KD, root / CE]
    for run in runs:
        assert (run / "config.yaml").is_file(), run
        latest = run / "checkpoints" / "latest_checkpointed_iteration.txt"
        assert latest.is_file(), run
        it = int(latest.read_text())
        assert (run / "checkpoints" / f"iter_{it:07d}" / "metadata.json").is_file(), run
    for name in [f"teacher_{w}" for w, _, _ in study.teacher_stages] + ["phase1", "phase2"]:
        assert (root / "data" / f"{name}.bin").is_file()
    assert (root / "reproduce.png").is_file() and (root / "eval" / "long_context.md").is_file()
    assert (root / "analysis" / "analysis_summary.json").is_file()


def test_summary_fixed_keys_for_every_model_and_band(demo):
    root, summary, _, study = demo
    on_disk = json.loads((root / "demo_summary.json").read_text())
    for model in MODELS:
        for band in BANDS:
            c = on_disk["retrieval"][model][band]
            assert set(c) == {"exact_match", "ci95", "n"}, (model, band)
            assert 0.0 <= c["ci95"][0] <= c["exact_match"] <= c["ci95"][1] <= 1.0, (model, band, c)
            assert c["n"] == 4 * study.samples_per_distance
        assert 0 < on_disk["lm"][model]["heldout_loss"] < 20, model
    d = on_disk["kd_minus_ce_beyond_document"]
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    # the bands: inside the longest phase-2 document, beyond it, beyond the window
    bands = on_disk["bands"]
    longest = on_disk["longest_phase2_document_tokens"]
    assert max(bands["in_distribution"]["distances"]) < longest <= min(bands["beyond_document"]["distances"])
    assert max(bands["beyond_document"]["distances"]) < study.phase2_seq_length <= min(bands["beyond_window"]["distances"])


def test_phase2_starts_from_phase1_weights(demo):
    root, summary, _, _ = demo
    p1 = [m["lm loss"] for m in _metrics(root / PHASE1) if m["split"] == "train"]
    for run in (KD, CE):
        p2 = [m["lm loss"] for m in _metrics(root / run) if m["split"] == "train"]
        # a fresh model starts near ln(V); the loaded phase-1 weights start well below it
        assert p2[0] < p1[0] - 0.5, (run, p1[0], p2[0])
        cfg = (root / run / "config.yaml").read_text()
        assert "finetune: true" in cfg and str(root / PHASE1) in cfg


def test_kd_logs_kd_loss_and_ce_builds_no_teacher(demo):
    root, _, built, _ = demo
    kd = [m for m in _metrics(root / KD) if m["split"] == "train"]
    ce = [m for m in _metrics(root / CE) if m["split"] == "train"]
    assert kd and all("kd loss" in m and m["kd loss"] >= 0 for m in kd)
    assert ce and not any("kd loss" in m for m in ce)
    assert len(built) == 1  # the teacher was built once: for the KD run, never for the CE run


def test_teacher_unchanged_by_kd(demo):
    _, _, built, _ = demo
    chunks, snapshot, ckpt, ckpt_hash = built[0]
    for chunk, snap in zip(chunks, snapshot):
        now = {k: v for k, v in chunk.state_dict().items() if torch.is_tensor(v)}
        assert set(now) == set(snap)
        for k in snap:
            assert torch.equal(now[k], snap[k]), k
        assert not any(p.requires_grad for p in chunk.parameters())
    assert _hash_dir(ckpt) == ckpt_hash


def test_answer_mask_marks_only_the_answer_key():
    """The teacher objective's loss mask: the label positions of the key after each question,
    never the needle's key (same "The pass key is" prefix, no question before it)."""
    from megatron_kd.eval.passkey import answer_mask

    q = [7, 8, 9]  # question ids; key tokens follow
    tokens = torch.tensor([[1, 8, 9, 40, 7, 8, 9, 41, 42, 7, 8, 9, 43, 7, 8],
                           [7, 8, 9, 44, 45, 3, 3, 3, 3, 3, 3, 3, 3, 7, 8]])
    # label at position p is tokens[p + 1]: the key follows the question's last token
    m1 = answer_mask(tokens, q, key_len=1)
    assert m1[0].nonzero().flatten().tolist() == [6, 11]
    assert m1[1].nonzero().flatten().tolist() == [2]
    m2 = answer_mask(tokens, q, key_len=2)
    assert m2[0].nonzero().flatten().tolist() == [6, 7, 11, 12]
    assert m2[1].nonzero().flatten().tolist() == [2, 3]


def test_answer_mask_on_demo_passkey_documents(demo):
    """On real passkey documents under the demo's tokenizer: one marked position per question,
    each predicting a key token, the first at the scored answer; the needle is not marked."""
    from megatron_kd.data import load_tokenizer
    from megatron_kd.eval.passkey import PasskeyGenerator, answer_mask

    _, summary, _, _ = demo
    tok = load_tokenizer(summary["tokenizer"])
    filler = ["The river flows north through the valley and the town was founded in the year of the flood."]
    gen = PasskeyGenerator(tok, filler, seed=3)
    for questions in (1, 3):
        doc = gen.passkey_doc(120, questions=questions)
        ids = torch.tensor([doc.ids])
        marked = answer_mask(ids, gen.question_ids(), gen.key_len)[0].nonzero().flatten().tolist()
        assert len(marked) == questions * gen.key_len
        assert marked[0] == doc.answer_pos - 1 and doc.needle_pos - 1 not in marked
        assert all(doc.ids[p + 1] == doc.ids[doc.answer_pos] for p in marked)


def test_teacher_stages_use_the_answer_objective(demo):
    root, summary, _, study = demo
    stages = summary["teacher_stages"]
    assert [Path(st).name for st in stages] == [f"len{w:04d}" for w, _, _ in study.teacher_stages]
    for st in stages:
        train = [m for m in _metrics(Path(st)) if m["split"] == "train"]
        assert train and all("answer loss" in m and "lm loss" in m for m in train), st


def test_analysis_figures_written(demo):
    """docs/analysis.md: the demo writes the perturbation figures + audit for teacher and students
    and the phase 1 -> phase 2 query evolution (Figures 7-12) into <run>/analysis."""
    root, summary, _, _ = demo
    out = root / "analysis"
    for label in ("teacher", "kd_student", "ce_student"):
        for f in ("fig7_distance.png", "fig8_cosine.png", "fig9_per_layer.png", "fig10_top10.png",
                  "audit.png", "audit.txt", "perturbation.json"):
            assert (out / f"{label}_{f}").is_file(), f"{label}_{f}"
        doc = json.loads((out / f"{label}_perturbation.json").read_text())
        assert set(doc["metrics"]) == {"causal", "document"}
    for label in ("evolution_kd", "evolution_ce"):
        ev = json.loads((out / f"{label}.json").read_text())
        assert ev["rotary_base_before"] == 10000 and ev["rotary_base_after"] == 500000
        assert (out / f"{label}_fig11_by_frequency.png").is_file()
    assert summary["analysis"] == str(out / "analysis_summary.json")


def test_long_context_eval_written(demo):
    """The demo runs the `megatron-kd eval` code on every model: NIAH heatmap + RULER per model."""
    root, summary, _, _ = demo
    assert "| KD student |" in (root / "eval" / "long_context.md").read_text()
    for name in ("teacher", "phase1_student", "KD_student", "CE_student"):
        res = json.loads((root / "eval" / name / "results.json").read_text())
        assert set(res["summary"]["scores"]) == {"niah_passkey", "ruler:niah_single_1"}
        assert (root / "eval" / name / "niah_passkey_heatmap.png").is_file()
    assert summary["seconds"]["long_context_eval"] > 0
