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


def evaluate_demo_runs(runs: Dict[str, Path], out_root: Path, samples: int = 2,
                       train_doc_tokens: Optional[int] = None) -> str:
    from megatron_kd.eval import ruler
    from megatron_kd.eval.runner import EvalRequest, prepare, run_eval

    rows = {}
    for name, run in runs.items():
        req = EvalRequest(checkpoint=Path(run), tasks=["niah_passkey"], lengths=list(NIAH_LENGTHS),
                          samples=samples, depths=3, max_new_tokens=NEW_TOKENS, allow_longer=True,
                          out_dir=Path(out_root) / name.replace(" ", "_"), progress=False,
                          train_doc_tokens=train_doc_tokens)
        prep = prepare(req)
        prep.samples += ruler.generate(RULER_TASK, prep.tokenizer, RULER_LENGTH, samples,
                                       max_new_tokens=NEW_TOKENS)
        prep.tasks.append(f"ruler:{RULER_TASK}")
        rows[name] = run_eval(req, prep)["scores"]
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
