"""The demo's long-context evaluation: the same code as ``megatron-kd eval`` (runner.py) on each
demo checkpoint, at the demo's sizes: NIAH with the demo's passkey needle at 128 / 256 tokens
(3 depths) and RULER niah_single_1 at 256 tokens, a few samples each, so it adds seconds, not
minutes. Writes ``<run>/eval/<model>/`` (results.json, summary.md, heatmap, needle distance) and
``<run>/eval/long_context.md`` (one table, every model)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

NIAH_LENGTHS = (128, 256)
RULER_TASK, RULER_LENGTH = "niah_single_1", 256
NEW_TOKENS = 8


def evaluate_run(run: Path, out_dir: Path, niah_lengths, ruler_length: Optional[int], samples: int,
                 new_tokens: int = NEW_TOKENS, train_doc_tokens: Optional[int] = None) -> dict:
    """``megatron-kd eval``'s runner on one run: niah_passkey (3 depths) at ``niah_lengths`` and,
    unless ``ruler_length`` is None, RULER niah_single_1 there. Returns {task: {length: score}}."""
    from megatron_kd.eval import ruler
    from megatron_kd.eval.runner import EvalRequest, prepare, run_eval

    niah_lengths = list(niah_lengths)
    req = EvalRequest(checkpoint=Path(run), tasks=["niah_passkey"] if niah_lengths else [],
                      lengths=niah_lengths or [ruler_length], samples=samples, depths=3,
                      max_new_tokens=new_tokens, allow_longer=True, out_dir=Path(out_dir), progress=False,
                      train_doc_tokens=train_doc_tokens)
    prep = prepare(req)
    if ruler_length is not None:
        prep.samples += ruler.generate(RULER_TASK, prep.tokenizer, ruler_length, samples,
                                       max_new_tokens=new_tokens)
        prep.tasks.append(f"ruler:{RULER_TASK}")
    return run_eval(req, prep)["scores"]


def evaluate_demo_runs(runs: Dict[str, Path], out_root: Path, samples: int = 2,
                       train_doc_tokens: Optional[int] = None) -> str:
    rows = {name: evaluate_run(run, Path(out_root) / name.replace(" ", "_"), NIAH_LENGTHS, RULER_LENGTH,
                               samples, train_doc_tokens=train_doc_tokens)
            for name, run in runs.items()}
    cols = [("niah_passkey", L) for L in NIAH_LENGTHS] + [(f"ruler:{RULER_TASK}", RULER_LENGTH)]
    lines = ["| model | " + " | ".join(f"{t} @{L}" for t, L in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(t, {}).get(str(L), float('nan')):.1f}"
                                                 for t, L in cols) + " |")
    table = "\n".join(lines)
    (Path(out_root) / "long_context.md").write_text(
        f"# Demo long-context evaluation\n\nScore 0-100 (RULER string match), {samples} sample(s) per "
        f"cell (NIAH: x 3 depths); per-model heatmaps in the subfolders.\n\n{table}\n")
    return table
