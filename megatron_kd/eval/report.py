"""Writes an evaluation into ``<run>/eval/``: ``results.json`` (every sample, every cell, the
summary), ``summary.md`` (task x length table), ``niah_heatmap*.png``, ``needle_distance.png`` and
``perplexity_by_position.png``. Each file is written under a temporary name and renamed, so an
interrupted run never leaves half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional


def summary_table(records: List[dict]) -> Dict[str, Dict[int, float]]:
    """{task: {length: mean score 0..100}}."""
    acc: Dict[str, Dict[int, List[float]]] = {}
    for r in records:
        acc.setdefault(r["task"], {}).setdefault(r["length"], []).append(r["score"])
    return {t: {L: round(sum(v) / len(v), 2) for L, v in sorted(by.items())} for t, by in acc.items()}


def markdown(table: Dict[str, Dict[int, float]], samples: int, title: str,
             distance: Optional[List[dict]] = None, ppl: Optional[dict] = None) -> str:
    lengths = sorted({L for by in table.values() for L in by})
    lines = [f"# {title}", "",
             f"Score (RULER's string match, 0-100) by task and context length; {samples} sample(s) "
             "per task, length (and NIAH depth).", ""]
    if table:
        lines += ["| task | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for task, by in table.items():
            cells = " | ".join(f"{by[L]:.1f}" if L in by else "-" for L in lengths)
            lines.append(f"| {task} | {cells} |")
    if distance:
        lines += ["", "Needle tasks by needle -> question distance (tokens):", "",
                  "| distance | n | accuracy |", "|---|---:|---:|"]
        lines += [f"| {b['lo'] + 1}-{b['hi']} | {b['n']} | {b['accuracy']:.2f} |" for b in distance]
    if ppl:
        lines += ["", f"Held-out loss by position ({ppl['windows']} windows of {ppl['length']} tokens):", "",
                  "| positions | loss |", "|---|---:|"]
        lines += [f"| {b['lo']}-{b['hi'] - 1} | {b['loss']:.3f} |" for b in ppl["buckets"]]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(out_dir: Path, req, prep, records: List[dict], ppl: Optional[dict], seconds: float) -> dict:
    from megatron_kd.eval import distance, niah, perplexity
    from megatron_kd.eval.ruler.words import source as word_source

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(records)
    pngs = {}
    for task in sorted({r["task"] for r in records if r["task"].startswith("niah")}):
        rs = [r for r in records if r["task"] == task]
        png = niah.plot_heatmap(rs, out_dir / f"{task}_heatmap.png",
                                f"{task}: {Path(req.checkpoint).name} ({req.samples} sample(s)/cell)")
        if png:
            pngs[f"{task}_heatmap"] = str(png)
    needle = [r for r in records if r.get("distance") is not None]
    dist_buckets = None
    if needle:
        edges = distance.bucket_edges(max(r["distance"] for r in needle), buckets=min(8, len(needle)))
        dist_buckets = distance.by_distance(needle, edges)
        per_task = {t: distance.by_distance([r for r in needle if r["task"] == t], edges)
                    for t in sorted({r["task"] for r in needle})}
        png = distance.plot({"all needle tasks": dist_buckets, **per_task}, out_dir / "needle_distance.png",
                            req.train_doc_tokens)
        if png:
            pngs["needle_distance"] = str(png)
    if ppl:
        png = perplexity.plot({Path(req.checkpoint).name: ppl["buckets"]},
                              out_dir / "perplexity_by_position.png", prep.cfg.data.seq_length)
        if png:
            pngs["perplexity_by_position"] = str(png)
    cells = {}
    for task in sorted({r["task"] for r in records if r["task"].startswith("niah")}):
        scores = niah.cell_scores([r for r in records if r["task"] == task])
        cells[task] = [{"length": L, "depth": d, "accuracy": a} for (L, d), a in sorted(scores.items())]
    summary = {
        "checkpoint": str(prep.ckpt_dir), "tokenizer": prep.tokenizer.path, "tp": req.tp,
        "lengths": req.lengths, "samples": req.samples, "tasks": prep.tasks,
        "ruler_word_source": word_source(),
        "scores": {t: {str(L): s for L, s in by.items()} for t, by in table.items()},
        "niah_cells": cells, "needle_distance": dist_buckets, "train_doc_tokens": req.train_doc_tokens,
        "perplexity": ppl, "pngs": pngs, "seconds": round(seconds, 1),
    }
    _atomic_write(out_dir / "results.json", json.dumps({"summary": summary, "samples": records}, indent=1))
    md = markdown(table, req.samples, f"Evaluation of {prep.ckpt_dir}", dist_buckets, ppl)
    _atomic_write(out_dir / "summary.md", md)
    summary["markdown"] = md
    return summary
