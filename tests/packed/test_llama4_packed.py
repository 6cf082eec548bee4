"""Packed windows with the Llama-4 position-dependent pieces (temperature tuning on NoPE layers,
chunked attention on RoPE layers, MoE), TP=2 and CP=2: documents equal separate passes at their
global offset, and a wrong offset is detected (see llama4_packed_worker.py); under CP the ring
attention's chunk masking gives the one-rank logits."""
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "multirank"))
from multirank_util import child_env, free_port  # noqa: E402

TOL = 2e-5


def _run(nproc, *args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "llama4_packed_worker.py"), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    return json.loads(lines[-1][7:])


def test_llama4_packed_documents_equal_separate_passes_at_global_offset():
    r = _run(2, "tp")
    assert r["tp"] == 2
    assert r["max_diff"] < TOL, r
    assert r["wrong_offset_min_diff"] > 100 * TOL, r


def test_llama4_context_parallel_equals_one_rank(tmp_path):
    """CP=2 (ring attention; chunk boundaries folded into the document ids, temperature from the
    shard's own position ids) gives the one-rank packed logits, and the per-document reference
    holds under CP too; with chunking off the CP logits move (the chunk mask is exercised)."""
    ref = _run(1, "ref", tmp_path)
    assert ref["max_diff"] < TOL and ref["wrong_offset_min_diff"] > 100 * TOL, ref
    r = _run(2, "cp", tmp_path)
    assert r["cp"] == 2
    assert r["cp_vs_one_rank"] < TOL, r
    assert r["cp_no_chunks_vs_one_rank"] > 100 * TOL, r
    assert r["max_diff"] < TOL and r["wrong_offset_min_diff"] > 100 * TOL, r
