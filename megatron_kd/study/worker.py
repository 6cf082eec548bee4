"""One study worker process: ``python -m megatron_kd.study.worker STUDY_DIR RUNS_JSON`` trains and
evaluates the given runs in order (runner.Study.execute), each leaving its study_done.json.
Started by runner.Study with OMP_NUM_THREADS = cores / jobs; exits non-zero on any failure."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv) -> int:
    import torch

    from megatron_kd.study.evaluate import load_eval_sets
    from megatron_kd.study.runner import EVAL_SETS, RunSpec, Study
    from megatron_kd.study.spec import StudyConfig

    root, runs = Path(argv[0]), [RunSpec(**r) for r in json.loads(argv[1])]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = StudyConfig.from_dict(json.loads((root / "study_config.json").read_text()))
    study = Study(cfg, root)
    sets = load_eval_sets(root / EVAL_SETS)  # written by the parent: the same for every run
    study.t0 = time.time()
    for spec in runs:
        study.execute(spec, sets)
    return 0


if __name__ == "__main__":  # the checkpoint writer may start a spawn-based process manager
    sys.exit(main(sys.argv[1:]))
