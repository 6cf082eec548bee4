"""benchmarks/kd_loss.py at toy size, so it cannot rot unseen, and its refusals of bad shapes.

Every row it prints must carry a time (or say why it did not run: a peer not installed, Triton
without CUDA); a TP the vocab cannot shard and a shape that cannot fit in memory are refused with
the arithmetic before any variant starts (no OOM trace)."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kd_loss.py"
ENV = {**os.environ, "MEGATRON_KD_FORCE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_variants_report_at_toy_size_under_tp_alpha_and_t():
    """The rows tools/device_check.sh's dry run does not print (tests/e2e/test_device_check_dry_run.py
    covers gemm, fused/auto, triton and the peers): exact, an explicit chunk, --tp, CE mixed in."""
    p = run("--tokens", "96", "--vocab", "1000", "--hidden", "32", "--chunks", "40", "--repeats", "1",
            "--tp", "2", "--alpha", "0.5", "--temperature", "2", "--variants", "naive,exact,fused/40,modelopt")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "TP=2 (rank 0's shard of 512 ids" in p.stdout, p.stdout
    for name in ("naive", "exact", "fused/40"):  # time, ratio, memory, memory ratio
        assert re.search(rf"^{re.escape(name)}\s+\d+ms\s+\d+\.\d\d\s+[\d,.]+ [MG]iB\s+[\d.]+x", p.stdout, re.M), \
            (name, p.stdout)
    row = re.search(r"^modelopt\s+(.*)$", p.stdout, re.M)
    assert row and ("not installed" in row.group(1) or "installed, not wired" in row.group(1)), p.stdout


def test_bad_shapes_are_refused_before_any_variant():
    p = run("--tp", "64", "--vocab", "4000")
    assert p.returncode != 0 and "--tp 64 with --vocab 4000" in p.stderr and "at most --tp 32" in p.stderr, p.stderr
    assert "variant" not in p.stdout
    p = run("--chunks", "auto,0")
    assert p.returncode != 0 and "--chunks 'auto,0'" in p.stderr, p.stderr


def test_a_shape_that_cannot_fit_is_skipped_with_the_estimate():
    p = run("--tokens", "300000", "--vocab", "128000", "--hidden", "32", "--variants", "naive,exact",
            "--repeats", "1", timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("naive", "exact"):
        assert re.search(rf"^{name}\s+skipped: needs ~[\d,.]+ [GT]iB \(estimate\), [\d,.]+ [MG]iB available",
                         p.stdout, re.M), p.stdout
