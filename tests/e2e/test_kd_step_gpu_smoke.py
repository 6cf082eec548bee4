"""benchmarks/kd_step_gpu.py's refusals. Its toy-size run (``--smoke``: config overrides for one
device, model + frozen teacher + fused KD loss, full recompute, the schedule, the optimizer step,
the FLOP count) is step 2 of tools/device_check.sh's dry run, checked in
tests/e2e/test_device_check_dry_run.py."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kd_step_gpu.py"


def test_unknown_mode_refused_before_any_run():
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--modes", "ce_bf16,kd_fp9"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "--modes: unknown kd_fp9" in p.stderr and "tokens/s" not in p.stdout
