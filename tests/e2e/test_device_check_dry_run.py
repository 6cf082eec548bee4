"""tools/device_check.sh --dry-run: the lent-GPU checks through the same code paths at toy size on
the CPU, so the script a device session runs once (15 device-minutes per task) cannot rot unseen.

Asserted: every step reports and passes, each prints its result rows as it finishes (kd_loss
rows with a time or the reason it did not run; the KD step's table and JSON), the TE steps say why
they were skipped, and bad options are refused. The KD step's JSON is checked as
benchmarks/kd_step_gpu.py's own smoke test used to (its wiring: teacher FLOPs added, MFU formula,
losses of an untrained model). Timings are not asserted."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "device_check.sh"


def test_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "dc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    log = p.stdout
    assert re.search(r"^== device_check: machine: CPU \| torch .* \| spec local$", log, re.M), log[:500]
    for name in ("kd_loss_short", "kd_loss_long", "kd_step_local"):
        assert re.search(rf"^== device_check: {name}: ok after \d+ s$", log, re.M), (name, log)
        assert (out / f"{name}.txt").read_text().strip(), name
    assert "tests_gpu, kd_step_te: skipped (no transformer-engine" in log
    assert "== device_check: done (exit 0)" in log
    short = (out / "kd_loss_short.txt").read_text()
    for name in ("naive", "gemm", "fused/auto"):
        assert re.search(rf"^{re.escape(name)}\s+\d+ms\s+\d+\.\d\d", short, re.M), (name, short)
    for name in ("triton", "liger/fused_linear_jsd", "liger/chunked_jsd"):
        row = re.search(rf"^{re.escape(name)}\s+(.*)$", short, re.M)
        assert row and (re.match(r"\d+ms", row.group(1)) or "not installed" in row.group(1)
                        or "not run" in row.group(1)), (name, short)
    rows = {r["mode"]: r for r in json.loads((out / "kd_step_local.json").read_text())}
    assert set(rows) == {"kd_bf16", "ce_bf16"}
    kd, ce = rows["kd_bf16"], rows["ce_bf16"]
    assert abs(ce["last_step"]["lm loss"] - math.log(2048)) < 0.5  # untrained: ~ln(vocab)
    assert 0 < kd["last_step"]["loss"] < 1 and kd["last_step"]["grad_norm"] > 0
    assert kd["model_gflop_per_token"] > ce["model_gflop_per_token"] > 0  # + the teacher's forward
    for r in (kd, ce):
        assert math.isclose(r["mfu"], r["tokens_per_s"] * r["model_gflop_per_token"] * 1e9 / 989e12,
                            rel_tol=1e-9)
    assert "measure nothing" in (out / "kd_step_local.txt").read_text()


def test_missing_wheels_are_named_before_any_step(tmp_path):
    env = {**os.environ, "PYTHON": "/usr/bin/env -i python3 -S"}  # an interpreter without megatron
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--fill-wheels" in p.stderr and "megatron.core" in p.stderr, p.stderr


def test_bad_option_is_refused(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "--dryrun"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown option --dryrun" in p.stderr, p.stderr


def test_without_a_gpu_the_real_run_stops_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_KD_FORCE_CPU"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "x")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "no CUDA device here" in p.stderr, p.stdout + p.stderr
    assert "kd_loss_short" not in p.stdout
