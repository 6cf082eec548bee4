"""Scoring a study's checkpoints: passkey exact match per sample in each distance band, held-out
LM loss, and the phase-2 training loss from the run's own log."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List


@dataclass
class EvalSets:
    bands: Dict[str, Dict[int, list]]  # band -> distance -> [PasskeyDoc]
    phase1_probe: Dict[int, list]  # phase-1 in-distribution probe (phase-1 document length)
    heldout_ids: List[List[int]]  # unpacked plain-text sequences (phase-2 window)
    vocab_size: int
    max_length: int


def build_eval_sets(cfg, corpus) -> EvalSets:
    """Held-out filler only (never in a training corpus); seeded, so every model sees the same."""
    from megatron_kd.data import load_tokenizer
    from megatron_kd.eval import passkey

    tok = load_tokenizer(corpus.tokenizer)
    gen = passkey.PasskeyGenerator(tok, corpus.heldout, seed=7, key_len=1)
    bands = {b: passkey.build_eval_set(gen, cfg.band_length(b), cfg.distances[b], cfg.samples_per_distance)
             for b in cfg.distances}
    probe = passkey.build_eval_set(gen, cfg.phase1_seq_length - 1, cfg.phase1_distances, cfg.samples_per_distance)
    lm = [tok.encode(gen.plain_doc(cfg.phase2_seq_length)) for _ in range(cfg.heldout_lm_seqs)]
    return EvalSets(bands, probe, lm, tok.vocab_size, 2 * cfg.phase2_seq_length)


def save_eval_sets(sets: EvalSets, path: Path) -> None:
    """The sets as JSON (token ids and positions; the text is not needed to score), so a worker
    process reads them instead of re-reading the corpus and regenerating them."""
    def docs(per_d):
        return {str(d): [[x.ids, x.key, x.needle_pos, x.answer_pos, x.key_len] for x in v] for d, v in per_d.items()}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({"bands": {b: docs(v) for b, v in sets.bands.items()},
                               "phase1_probe": docs(sets.phase1_probe), "heldout_ids": sets.heldout_ids,
                               "vocab_size": sets.vocab_size, "max_length": sets.max_length}))
    tmp.replace(path)


def load_eval_sets(path: Path) -> EvalSets:
    from megatron_kd.eval.passkey import PasskeyDoc

    raw = json.loads(Path(path).read_text())

    def docs(per_d):
        return {int(d): [PasskeyDoc("", ids, key, n, a, k) for ids, key, n, a, k in v] for d, v in per_d.items()}
    return EvalSets({b: docs(v) for b, v in raw["bands"].items()}, docs(raw["phase1_probe"]), raw["heldout_ids"],
                    raw["vocab_size"], raw["max_length"])


def _last_logged(run: Path, key: str, n: int = 3):
    path = Path(run) / "logs" / "metrics.jsonl"
    if not path.exists():
        return None
    vals = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if key in rec and not any(k.startswith("valid") for k in rec):
            vals.append(rec[key])
    return sum(vals[-n:]) / len(vals[-n:]) if vals else None


def evaluate_run(run: Path, sets: EvalSets, bands: bool = True, probe: bool = False) -> dict:
    """{"bands": {band: {distance: [0/1 per sample]}}, "phase1_probe": ..., "heldout_loss",
    "train_lm_loss"} of a run's latest checkpoint (single rank, in this process)."""
    from megatron_kd import distributed
    from megatron_kd.eval import passkey

    out: dict = {}
    distributed.init_distributed()
    try:
        model, cfg = passkey.load_model(run, sets.max_length)
        if bands:
            out["bands"] = {b: {str(d): passkey.score_samples(model, sets.vocab_size, docs)
                                for d, docs in per_d.items()} for b, per_d in sets.bands.items()}
            out["heldout_loss"] = passkey.heldout_loss(model, sets.vocab_size, sets.heldout_ids)
        if probe:
            out["phase1_probe"] = {str(d): passkey.score_samples(model, sets.vocab_size, docs)
                                   for d, docs in sets.phase1_probe.items()}
        out["rotary_base"] = cfg.model.rotary_base
        del model
    finally:
        distributed.destroy()
    out["train_lm_loss"] = _last_logged(run, "lm loss")
    return out


def accuracy(per_distance: Dict[str, list]) -> float:
    hits = [x for v in per_distance.values() for x in v]
    return sum(hits) / max(len(hits), 1)
