"""benchmarks/kd_step_gpu.py at toy size on whatever device is here (the CPU's local spec in CI).

The benchmark is the H100 path's measurement and no GPU has run it yet; this keeps its wiring
(config overrides for one device, model + frozen teacher + fused KD loss, full recompute, the
schedule, the optimizer step, the FLOP count) from rotting unseen. Timings are not asserted."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kd_step_gpu.py"


def test_smoke_runs_kd_and_ce_steps(tmp_path):
    out = tmp_path / "rows.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json-out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"kd_bf16", "ce_bf16"}
    kd, ce = rows["kd_bf16"], rows["ce_bf16"]
    # an untrained model's LM loss is about ln(vocab) (smoke vocab 2,048)
    assert abs(ce["last_step"]["lm loss"] - math.log(2048)) < 0.5
    # KD of a random student against a random teacher: a small positive divergence, real gradients
    assert 0 < kd["last_step"]["loss"] < 1 and kd["last_step"]["grad_norm"] > 0
    # the KD step's FLOPs add the teacher's forward to the student's forward + backward
    assert kd["model_gflop_per_token"] > ce["model_gflop_per_token"] > 0
    for r in (kd, ce):
        assert math.isclose(r["mfu"], r["tokens_per_s"] * r["model_gflop_per_token"] * 1e9 / 989e12,
                            rel_tol=1e-9)
    assert "kd_bf16" in p.stdout and "vs CE bf16" in p.stdout and "measure nothing" in p.stdout


def test_unknown_mode_refused_before_any_run():
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--modes", "ce_bf16,kd_fp9"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "--modes: unknown kd_fp9" in p.stderr and "tokens/s" not in p.stdout
