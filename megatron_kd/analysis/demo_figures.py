"""The demo's analysis step: perturbation figures + audit for teacher and students, and the §5
query evolution phase 1 -> phase 2, into ``<run>/analysis``. Sized for the demo's 256-token models
(8 repeats of a 32-token block; evolution on one 256-token block), a few seconds on a CPU."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Tuple

BLOCK_TOKENS, REPEATS = 32, 8
EVOLUTION_BLOCK = 256


def write_demo_analysis(root: Path, runs: Dict[str, Path], evolutions: Dict[str, Tuple[Path, Path]]) -> dict:
    """``runs``: {label: run dir} for the perturbation probe; ``evolutions``: {label: (before, after)}.
    Returns {"perturbation": {label: paths}, "evolution": {label: paths + summary}, "audit": text}."""
    from megatron_kd import distributed
    from megatron_kd.analysis.evolution import analyze_evolution
    from megatron_kd.analysis.perturbation import analyze_checkpoint

    out = Path(root) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    summary: dict = {"perturbation": {}, "evolution": {}, "audit": {}}
    distributed.init_distributed()
    try:
        for label, run in runs.items():
            res = analyze_checkpoint(run, out, BLOCK_TOKENS, REPEATS, label=label)
            summary["perturbation"][label] = res["paths"]
            summary["audit"][label] = res["table"]
        for label, (before, after) in evolutions.items():
            res = analyze_evolution(before, after, out, EVOLUTION_BLOCK, 1, label=label)
            summary["evolution"][label] = {**res["paths"], "summary": res["summary"]}
    finally:
        distributed.destroy()
    summary["seconds"] = round(time.time() - t, 1)
    (out / "analysis_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
