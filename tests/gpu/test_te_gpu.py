"""The H100 path's checks (CUDA + transformer-engine only; `bash tools/gpu_checks.sh` runs them).
NOT RUN in the session that wrote them: no GPU was available there. The same features are tested
on the CPU (tests/unit/test_cp_layout.py, tests/multirank/test_context_parallel.py,
tests/packed): these add the TE kernels.

1. our CP token layout == TE's ``thd_get_partitioned_indices`` (so the CPU ring and TE's ring
   see the same tokens on the same rank);
2. DESIGN.md's reference test on the TE THD path: each document of a packed window equals its
   own forward at its global offset (bf16), positions applied checked, and a learned-absolute
   model shows that a wrong offset fails;
3. (2 GPUs) TE's CP attention (p2p) == the reference ring attention, forward and backward;
4. the TE spec outside packed windows: KV-cache decoding == no-cache decoding, and the loss by
   position (dense mask -> TE sbhd) == the THD forward of the same window;
5. the Llama-4 pieces on TE: THD with chunks cut into sequences == the dense document|chunk mask.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multirank"))
import multirank_util as mr  # noqa: E402

from megatron_kd import platform  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (platform.cuda_available() and platform.transformer_engine_available()),
    reason="needs CUDA + transformer-engine (run: bash tools/gpu_checks.sh on a GPU node)")

WORKER = Path(__file__).with_name("te_worker.py")


def _gpu_count() -> int:
    return platform.device_count()


def _run(mode: str, nproc: int) -> list:
    env = mr.child_env()
    env.pop("MEGATRON_KD_FORCE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(mr.free_port()), str(WORKER), mode]
    p = mr.run(cmd, env=env)
    return [json.loads(l[len("RESULT "):]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]


@pytest.mark.parametrize("cp", [2, 4])
def test_layout_equals_te_partitioning(cp):
    import torch

    from megatron_kd.data.cp_layout import capacity
    from megatron_kd.models.te_thd import check_layout_indices_match_te

    for lengths in ([7, 23, 1, 30, 12, 23], [96], [50, 46]):
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        assert check_layout_indices_match_te(doc, cp, capacity(96, cp, padding=48)), (cp, lengths)


def test_packed_reference_on_te_thd():
    (r,) = _run("packed", 1)
    for pos_type, v in r.items():
        assert v["positions_applied"], pos_type
        assert v["max_rel_diff"] < 2e-2, (pos_type, v)  # bf16 kernels, different tile orders
    # discriminative: absolute positions make a wrong offset visible far above the bf16 noise
    assert r["learned_absolute"]["wrong_offset_min_rel_diff"] > 0.1, r


@pytest.mark.skipif(_gpu_count() < 2,
                    reason="TE context parallelism needs 2 GPUs (one rank per GPU)")
def test_te_cp_attention_equals_ring_attention():
    rows = _run("cp_vs_ring", 2)
    assert len(rows) == 2
    for r in rows:
        for key in ("out", "dq", "dk", "dv"):
            assert r[key] < 3e-2, (key, r)  # TE bf16 vs fp32 reference


def test_generation_and_loss_by_position_on_te():
    (r,) = _run("generate", 1)
    assert r["cache_equals_no_cache"], r
    assert all(len(x) == 16 for x in r["generated"])
    assert r["loss_max_diff"] < 5e-2, r  # bf16: TE's unfused (arbitrary mask) vs fused THD kernel


def test_llama4_chunks_as_thd_sequences_on_te():
    (r,) = _run("llama4_thd", 1)
    assert r["thd_vs_dense_rel"] < 2e-2, r  # bf16, two TE kernels
