"""HF interop against transformers (CPU, fp32): tiny random checkpoints of each supported family
are written by transformers' own ``save_pretrained``, converted to a run directory, loaded as a
KD teacher at TP=1 and TP=2 (real torchrun ranks), and must give transformers' logits; export
back to HF must reproduce every tensor bit for bit.

One conversion per family (at --tensor-model-parallel-size 2; its vocab padding equals TP=1's,
so the same checkpoint also checks loading under another layout) and one torchrun launch per TP
size keep the cost at two megatron-core imports per launch.
"""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "multirank"))
from multirank_util import child_env, free_port  # noqa: E402

FAMILIES = ["llama", "llama_tied", "qwen2", "qwen3", "llama4", "llama4_sparse"]
SEQ = 40  # longer than the Llama-4 fixture's attention chunk (8) and floor_scale (4)
TOL = 1e-5  # fp32; observed max |diff| ~3e-7 (summation order)


def _result(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    proc = subprocess.run([sys.executable, str(HERE / "convert_worker.py"), str(out),
                           *[f"{f}:2" for f in FAMILIES]],
                          capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO)
    return out, _result(proc)


@functools.lru_cache(maxsize=None)
def _parity(out: Path, tp: int) -> dict:
    cases = [{"name": f, "run": str(out / f"{f}_mcore"), "hf": str(out / f), "seq": SEQ} for f in FAMILIES]
    spec = out / f"cases_tp{tp}.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "parity_worker.py"), str(spec)]
    return _result(subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(converted, tp, family):
    out, _ = converted
    r = _parity(out, tp)[family]
    assert r["tp"] == tp and r["seq"] == SEQ
    assert r["max_abs_logit"] > 0.1, r  # the comparison is not between two near-zero tensors
    assert r["max_abs_diff"] < TOL, r
    assert r["argmax_agree"] == 1.0, r
    if family.startswith("llama4"):  # chunking and temperature tuning both change the logits here
        assert r["diff_without_chunk_size"] > 100 * TOL, r
        assert r["diff_without_temperature"] > 100 * TOL, r


def test_llama4_logits_equal_transformers_at_ep2(converted):
    """Expert parallelism (parallel.expert_model_parallel_size=2, TP=1, 2 ranks): each rank holds
    2 of the 4 experts (megatron's allgather dispatcher sends tokens to their owners); the
    converted teacher still gives transformers' logits."""
    out, _ = converted
    spec = out / "cases_ep2.json"
    spec.write_text(json.dumps([{"name": "llama4", "run": str(out / "llama4_mcore"), "hf": str(out / "llama4"),
                                 "seq": SEQ}]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "parity_worker.py"), str(spec), "ep"]
    r = _result(subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env(), cwd=REPO))["llama4"]
    assert r["ep"] == 2 and r["tp"] == 1
    assert r["max_abs_logit"] > 0.1 and r["max_abs_diff"] < TOL and r["argmax_agree"] == 1.0, r


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_is_bit_exact(converted, family):
    from safetensors.torch import load_file

    out, summaries = converted
    assert summaries[family]["tensor_model_parallel_size"] == 2
    a = load_file(str(out / family / "model.safetensors"))
    b = load_file(str(out / f"{family}_back" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    src = json.loads((out / family / "config.json").read_text())
    back = json.loads((out / f"{family}_back" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rope_parameters", "intermediate_size"):
        assert back.get(key) == src.get(key), key
    assert (out / f"{family}_back" / "tokenizer.json").is_file()
    for key, value in src.items():  # every field keeps its JSON type (transformers 5 validates them)
        if key in back and key not in ("dtype", "torch_dtype", "transformers_version"):
            assert type(back[key]) is type(value), (key, value, back[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_the_same_logits(converted, family):
    """The exported directory is what a user hands to transformers: it must load (strict config
    validation included) and compute the original model's logits."""
    import transformers

    out, _ = converted
    tokens = torch.randint(1, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name in (family, f"{family}_back"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    assert logits[family].abs().max() > 0.1
    assert torch.equal(logits[family], logits[f"{family}_back"])


def test_summary_counts_every_tensor(converted):
    out, summaries = converted
    s = summaries["llama"]
    # 2 layers x (2 norms + q,k,v,o + gate,up,down) + embed + final norm + lm_head
    assert s["tensors_hf"] == 2 * 9 + 3
    assert s["tensors_mcore"] == 2 * 6 + 3  # qkv fused, gate/up fused
    assert s["by_kind"] == {"embedding": 2, "norm": 5, "attention": 4, "mlp": 4}
    assert summaries["qwen2"]["by_kind"]["attention"] == 2 * 3  # + fused qkv bias
    assert summaries["qwen3"]["by_kind"]["norm"] == 2 * 4 + 1  # + q/k norms
