"""benchmarks/kd_step.py at toy size, so it cannot rot unseen (it once died at import while its
``--help``, with lazy imports, still passed): every row and ratio it prints must be there."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kd_step_benchmark_runs_at_toy_size():
    env = {**os.environ, "MEGATRON_KD_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kd_step.py"), "--seq-length", "64",
                        "--micro-batch-size", "1", "--vocab", "512", "--repeats", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for row in ("CE step", "teacher forward", "KD step", "KD overhead beyond teacher"):
        assert re.search(rf"^{row}.*\d+\.\d ms", p.stdout, re.M), (row, p.stdout)
    assert "ratio KD / CE" in p.stdout and "ratio teacher / CE" in p.stdout
