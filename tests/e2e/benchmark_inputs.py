"""Builds, at toy size, the input that benchmarks/longred_retention.py and study_jobs.py take from a
``megatron-kd demo`` run, for test_benchmarks_toy.py (in one process: one megatron-core import).

    python tests/e2e/benchmark_inputs.py ROOT

ROOT/data: the demo's corpora (study/corpus.py at the reduced demo's sizes, teacher length 32 only:
the demo's BPE, whose passkey key words are single tokens, as the passkey evaluation requires);
ROOT/teacher/len0032: a 2-step teacher stage on its 32-token passkey documents (the demo's recipe,
LM loss) -- the "original" longred_retention.py extends."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
L = 32


def build(root: Path) -> Path:
    from megatron_kd.config import load_config
    from megatron_kd.demo import reduced
    from megatron_kd.run import train
    from megatron_kd.study.corpus import build_corpus

    c = reduced(0.01)
    corpus = build_corpus(root / "data", [L], {L: 64}, c.phase1_seq_length, c.phase1_docs,
                          c.phase2_doc_tokens, c.phase2_docs, c.passkey_fraction, log=lambda msg: None)
    original = root / "teacher" / f"len{L:04d}"
    cfg = load_config(str(REPO / "megatron_kd" / "recipes" / "demo_teacher.yaml"),
                      [f"data.data_path={corpus.root / f'teacher_{L}'}",
                       f"data.tokenizer_model={corpus.tokenizer}",
                       f"data.seq_length={L}", "train.train_iters=2", "train.micro_batch_size=2",
                       "train.global_batch_size=4", f"checkpoint.save={original}"])
    train(cfg, overwrite=True)
    return original


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
