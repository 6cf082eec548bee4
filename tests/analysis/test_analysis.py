"""Positional analysis tools (megatron_kd/analysis), end to end through ``megatron-kd analyze``.

A tiny 2-layer model with random weights is written as a training run directory
(make_tiny_run.py); the CLI reads it like any checkpoint. What must hold:

* pre-RoPE queries of layer 0 are bit-identical across repeats and post-RoPE ones are not;
* under the document mask with a float64 model (parameters, activations, RoPE angles) every
  repeat's outputs match to ~1e-12, while the fp32 default visibly does not (the check can fail);
* with Llama-4's position-dependent pieces (NoPE temperature tuning) the same float64 audit
  under the document mask shows real positional signal, growing with the offset, while the
  reset-positions control stays exactly 0 (what the audit is for);
* TP=2 and PP=2 captures equal the TP=1 capture (torchrun, 2 ranks);
* evolution of a checkpoint against itself is exactly zero, and against another is not;
* the RoPE frequency index of every query dimension matches what megatron-core's
  ``apply_rotary_pos_emb`` rotates, for half-split and interleaved layouts.
"""
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[1]
BLOCK, REPEATS = 16, 6


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONWARNINGS="ignore", MEGATRON_KD_FORCE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc=1, expect=0):
    cli = ["-m", "megatron_kd.cli", *args]
    cmd = [sys.executable, *cli] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_port()}", *cli]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == expect, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    out = {}
    for name, theta, seed, *extra in (("run_a", 10000, 1234), ("run_b", 500000, 99),
                                      ("run_l4", 10000, 99, "llama4")):
        proc = subprocess.run([sys.executable, str(HERE / "make_tiny_run.py"), str(root / name), str(theta),
                               str(seed), *extra], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = root / name
    return out


@functools.lru_cache(maxsize=None)
def _perturbation(run: str, tp: int = 1, pp: int = 1, settings: str = "", sp: bool = False) -> Path:
    out = Path(run).parent / f"pert_tp{tp}_pp{pp}{'_sp' if sp else ''}"
    args = ["analyze", "perturbation", "--checkpoint", run, "--block-tokens", str(BLOCK),
            "--repeats", str(REPEATS), "--out", str(out), "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp)] + (["--settings", settings] if settings else []) + (
                ["--sequence-parallel"] if sp else [])
    _run(args, nproc=tp * pp)
    return out


def test_perturbation_probe_and_audit(runs):
    out = _perturbation(str(runs["run_a"]))
    doc = json.loads((out / "run_a_perturbation.json").read_text())
    assert doc["meta"]["recorded_positions"] == [k * BLOCK + BLOCK - 2 for k in range(REPEATS)]
    for f in ("fig7_distance", "fig8_cosine", "fig9_per_layer", "fig10_top10", "audit"):
        assert (out / f"run_a_{f}.png").stat().st_size > 1000
    manifest = json.loads((out / "run_a_capture_document.json").read_text())["arrays"]
    assert manifest["query_pre_rope"]["shape"] == [2, 1, REPEATS, 4, 16]
    assert manifest["logits"]["axes"] == ["batch", "position", "vocab"]

    cap = np.load(out / "run_a_capture_document.npz")
    pre, post = cap["query_pre_rope"][0, 0], cap["query_post_rope"][0, 0]  # layer 0: [R, H, d]
    assert all(np.array_equal(pre[k], pre[0]) for k in range(REPEATS))
    diffs = [np.abs(post[k] - post[0]).max() for k in range(1, REPEATS)]
    assert min(diffs) > 1e-3 * np.abs(post[0]).max(), diffs
    assert cap["probs"].shape[-1] == cap["logits"].shape[-1] == 384

    doc_mask = doc["metrics"]["document"]
    f64, f32 = doc_mask["float64_model"], doc_mask["fp32_angles"]
    # exact arithmetic: RoPE under a document mask is offset-invariant
    assert max(f64["output"]["max_abs_logit_diff"]) < 1e-12
    assert max(abs(x) for x in f64["output"]["kl_to_first"]) < 1e-12
    assert max(max(layer) for layer in f64["distance_pre_rope"]["per_layer"]) < 1e-12
    # ... and the check can fail: fp32 rounding is visible, causal context even more so
    assert max(f32["output"]["max_abs_logit_diff"]) > 1e3 * max(max(f64["output"]["max_abs_logit_diff"]), 1e-16)
    assert min(doc["metrics"]["causal"]["fp32_angles"]["output"]["kl_to_first"][1:]) > 1e-8
    assert doc_mask["reset_position_ids"]["output"]["max_abs_logit_diff"] == [0.0] * REPEATS
    assert f32["distance_pre_rope"]["per_layer"][0] == [0.0] * REPEATS
    assert min(f32["distance_post_rope"]["per_layer"][0][1:]) > 0
    assert f32["cosine_pre_rope"]["per_layer"][0] == pytest.approx([1.0] * REPEATS, abs=1e-12)
    assert len(f32["output"]["first_top_ranks"]) == REPEATS and f32["output"]["first_top_ranks"][0] == list(range(10))


def test_audit_sees_llama4_position_signal(runs):
    """Temperature tuning scales q by log(floor((pos + 1) / 8) + 1) * 0.5 + 1 on the NoPE layer:
    under the document mask, in float64, repeat k differs from repeat 0 by far more than
    rounding, and more the further it sits; resetting positions per block removes it exactly."""
    out = Path(runs["run_l4"]).parent / "pert_l4"
    _run(["analyze", "perturbation", "--checkpoint", str(runs["run_l4"]), "--block-tokens", str(BLOCK),
          "--repeats", str(REPEATS), "--out", str(out)])
    doc = json.loads((out / "run_l4_perturbation.json").read_text())["metrics"]["document"]
    diff = doc["float64_model"]["output"]["max_abs_logit_diff"]
    assert diff[0] == 0.0 and min(diff[1:]) > 1e-6, diff  # RoPE-only models: < 1e-12 (above)
    assert diff[-1] > diff[1], diff  # the temperature grows with log(position)
    assert doc["reset_position_ids"]["output"]["max_abs_logit_diff"] == [0.0] * REPEATS


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (1, 2, False), (2, 1, True)])
def test_parallel_capture_equals_single_rank(runs, tp, pp, sp):
    """TP: heads and vocab gathered over the TP group; PP: each stage's layers merged on rank 0;
    SP: sequence-sharded rows (embeddings, layer outputs, final hidden) from the rank that owns them."""
    ref = np.load(_perturbation(str(runs["run_a"])) / "run_a_capture_causal.npz")
    par = np.load(_perturbation(str(runs["run_a"]), tp, pp, "fp32_angles", sp) / "run_a_capture_causal.npz")
    assert sorted(ref.files) == sorted(par.files)
    for key in ref.files:
        assert ref[key].shape == par[key].shape, key
        np.testing.assert_allclose(par[key], ref[key], rtol=1e-4, atol=2e-5, err_msg=key)
    # heads are gathered in megatron's global order: a swapped shard would not be close
    q = par["query_pre_rope"]
    assert np.abs(q[:, :, :, :2] - ref["query_pre_rope"][:, :, :, 2:]).max() > 1e-2


def test_evolution(runs):
    a, b = str(runs["run_a"]), str(runs["run_b"])
    root = runs["run_a"].parent
    _run(["analyze", "evolution", "--before", a, "--after", a, "--block-tokens", "64", "--repeats", "2",
          "--out", str(root / "ev_self")])
    ev = json.loads((root / "ev_self" / "evolution.json").read_text())
    assert np.all(np.asarray(ev["per_frequency"]) == 0) and np.all(np.asarray(ev["per_position"]) == 0)
    assert np.all(np.asarray(ev["post_rope"]["per_dimension"]) == 0)
    assert len(ev["positions"]) == 128 and np.asarray(ev["per_frequency"]).shape == (2, 8)

    proc = _run(["analyze", "evolution", "--before", a, "--after", b, "--block-tokens", "64", "--repeats", "2",
                 "--out", str(root / "ev_ab"), "--max-positions", "50"])
    assert "low-frequency pairs changed most" in proc.stdout
    ev = json.loads((root / "ev_ab" / "evolution.json").read_text())
    assert np.all(np.asarray(ev["per_frequency"]) > 0) and len(ev["positions"]) == 43  # stride 3
    assert ev["wavelength_before"][0] == pytest.approx(2 * np.pi)
    assert ev["wavelength_before"][-1] == pytest.approx(2 * np.pi * 10000 ** (14 / 16))
    assert ev["wavelength_after"][-1] == pytest.approx(2 * np.pi * 500000 ** (14 / 16))
    for f in ("fig11_by_frequency", "fig12_by_position"):
        assert (root / "ev_ab" / f"evolution_{f}.png").stat().st_size > 1000


def test_sizes_must_fit_seq_length(runs):
    proc = _run(["analyze", "perturbation", "--checkpoint", str(runs["run_a"]),
                 "--out", str(runs["run_a"].parent / "too_big")], expect=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        "megatron-kd analyze: error: --block-tokens 2048 x --repeats 64 = 131072 tokens exceeds the "
        "checkpoint's seq_length 128")
    assert not (runs["run_a"].parent / "too_big").exists()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_frequency_index_matches_megatron_rotation(interleaved, rotary_percent):
    """Rotate each unit vector e_j with megatron-core's apply_rotary_pos_emb: it must mix only
    with the other dimension of its pair, by the angle position x θ_i of the index we assign."""
    import types

    import torch
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_kd.analysis.evolution import rope_frequency_index, wavelengths
    from megatron_kd.models.positions import rotary_emb_from_positions

    d, base, pos = 16, 10000.0, 7
    rope = RotaryEmbedding(kv_channels=d, rotary_percent=rotary_percent, rotary_interleaved=interleaved,
                           rotary_base=base, use_cpu_initialization=True)
    inv_freq = rope.inv_freq.double()
    index = rope_frequency_index(d, interleaved, rotary_percent)
    assert np.allclose(wavelengths(base, d, rotary_percent), 2 * np.pi / inv_freq.numpy())
    freqs = rotary_emb_from_positions(inv_freq, torch.tensor([[pos]]), interleaved, dtype=torch.float64)
    config = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=interleaved,
                                   multi_latent_attention=False)
    eye = torch.eye(d, dtype=torch.float64).reshape(d, 1, 1, d)  # d "tokens", each e_j
    out = apply_rotary_pos_emb(eye, freqs.expand(d, 1, 1, -1), config=config,
                               cp_group=types.SimpleNamespace(size=lambda: 1)).reshape(d, d)
    for j in range(d):
        moved = set(torch.nonzero(out[j].abs() > 1e-12).flatten().tolist())
        if index[j] < 0:
            assert moved == {j} and out[j, j] == 1.0
            continue
        pair = set(np.flatnonzero(index == index[j]).tolist())
        assert len(pair) == 2 and moved <= pair
        angle = pos * inv_freq[index[j]].item()
        assert out[j, j].item() == pytest.approx(np.cos(angle), abs=1e-12)
        other = (pair - {j}).pop()
        assert abs(out[j, other].item()) == pytest.approx(abs(np.sin(angle)), abs=1e-12)
    if not interleaved and rotary_percent == 1.0:
        assert index.tolist() == list(range(8)) * 2
    if interleaved and rotary_percent == 1.0:
        assert index.tolist() == [i // 2 for i in range(16)]
