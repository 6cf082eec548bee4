"""Packed windows with the Llama-4 position-dependent pieces (temperature tuning on NoPE layers,
chunked attention on RoPE layers, MoE), TP=2: documents equal separate passes at their global
offset, and a wrong offset is detected (see llama4_packed_worker.py)."""
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "multirank"))
from multirank_util import child_env, free_port  # noqa: E402

TOL = 2e-5


def test_llama4_packed_documents_equal_separate_passes_at_global_offset():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "llama4_packed_worker.py")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    r = json.loads(lines[-1][7:])
    assert r["tp"] == 2
    assert r["max_diff"] < TOL, r
    assert r["wrong_offset_min_diff"] > 100 * TOL, r
