"""platform: the one module that knows CPU vs CUDA.

The CPU mapping patches torch and megatron-core process-wide (and only once), so each scenario
runs in a fresh ``python -c`` subprocess that prints a JSON dict of observations; the tests
assert on those. Two subprocesses in all (~10 s together).
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_kd"


def _run(script: str, **env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_KD_FORCE_CPU"}
    env.update(PYTHONWARNINGS="ignore", **env_overrides)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- (a) CUDA present

CUDA_PRESENT = r"""
import json, torch
torch.cuda.is_available = lambda: True  # pretend a GPU exists
from megatron.core.tensor_parallel import random as mpu_random
from megatron.core.optimizer import clip_grads, optimizer as mopt
watched = {
    "torch.empty": (torch, "empty"), "torch.zeros": (torch, "zeros"), "torch.tensor": (torch, "tensor"),
    "torch.randn": (torch, "randn"), "torch.arange": (torch, "arange"),
    "Tensor.cuda": (torch.Tensor, "cuda"), "Tensor.to": (torch.Tensor, "to"),
    "Module.cuda": (torch.nn.Module, "cuda"),
    "cuda.current_device": (torch.cuda, "current_device"), "cuda.set_device": (torch.cuda, "set_device"),
    "cuda.Stream": (torch.cuda, "Stream"), "cuda.Event": (torch.cuda, "Event"),
    "cuda.synchronize": (torch.cuda, "synchronize"), "cuda.get_rng_state": (torch.cuda, "get_rng_state"),
    "cuda.set_rng_state": (torch.cuda, "set_rng_state"), "cuda.manual_seed": (torch.cuda, "manual_seed"),
    "mpu._get_cuda_rng_state": (mpu_random, "_get_cuda_rng_state"),
    "mpu._set_cuda_rng_state": (mpu_random, "_set_cuda_rng_state"),
    "clip_grads.get_grad_norm_fp32": (clip_grads, "get_grad_norm_fp32"),
    "optimizer.clip_grad_by_total_norm_fp32": (mopt, "clip_grad_by_total_norm_fp32"),
}
before = {k: getattr(o, a) for k, (o, a) in watched.items()}
from megatron_kd import platform
platform.setup()
platform.setup()
changed = sorted(k for k, (o, a) in watched.items() if getattr(o, a) is not before[k])
print(json.dumps({"changed": changed, "active": platform.cpu_mapping_active(),
                  "backend": platform.backend(), "cuda_available": platform.cuda_available()}))
"""


@pytest.fixture(scope="module")
def cuda_present():
    return _run(CUDA_PRESENT)


def test_cuda_present_patches_nothing(cuda_present):
    assert cuda_present["changed"] == []
    assert cuda_present["active"] is False


def test_cuda_present_uses_nccl(cuda_present):
    assert cuda_present["cuda_available"] is True
    assert cuda_present["backend"] == "nccl"


# ----------------------------------------------------------------------------- (b, d) CPU mapping

CPU_MAPPING = r"""
import json, torch
from megatron_kd import platform
out = {"active_before": platform.cpu_mapping_active()}
platform.setup()
empty_after_first = torch.empty
platform.setup()  # idempotent: no double wrapping
out["idempotent"] = torch.empty is empty_after_first
out["active"] = platform.cpu_mapping_active()
out["backend"] = platform.backend()
out["device"] = str(platform.device())

# ---- allocation and moves
dev = {}
dev["empty_cuda_str"] = torch.empty(2, device="cuda").device.type
dev["zeros_cuda_0"] = torch.zeros(2, device="cuda:0").device.type
dev["ones_torch_device"] = torch.ones(2, device=torch.device("cuda")).device.type
dev["arange_ordinal"] = torch.arange(3, device=torch.cuda.current_device()).device.type
dev["full_like"] = torch.full_like(torch.zeros(2), 1.0, device="cuda").device.type
dev["tensor_cuda"] = torch.zeros(1).cuda().device.type
dev["tensor_to_str"] = torch.zeros(1).to("cuda").device.type
dev["tensor_to_kw"] = torch.zeros(1).to(device="cuda:0").device.type
dev["tensor_to_dtype"] = str(torch.zeros(1).to(torch.float64).dtype)
dev["module_cuda"] = next(torch.nn.Linear(2, 2).cuda().parameters()).device.type
out["devices"] = dev
out["current_device"] = torch.cuda.current_device()
# torch's device context still reaches the wrapped factories (transformers builds on "meta")
with torch.device("meta"):
    out["meta_context"] = [torch.arange(3).device.type, torch.empty(2).device.type,
                           torch.zeros(2, device="cuda").device.type]

# ---- streams and events are no-ops
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    x = torch.ones(3) * 2
torch.cuda.current_stream().wait_stream(s)
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record(); e1.record(); e1.synchronize(); torch.cuda.synchronize()
out["streams"] = {"value": x.tolist(), "query": e1.query(), "elapsed": e0.elapsed_time(e1)}

# ---- megatron's model-parallel RNG tracker over the CPU generator
from megatron.core import tensor_parallel
tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
tracker = tensor_parallel.get_cuda_rng_tracker()
torch.manual_seed(0)
plain = [torch.rand(4).tolist() for _ in range(2)]
torch.manual_seed(0)
outer1 = torch.rand(4).tolist()
with tracker.fork():
    forked1 = torch.rand(4).tolist()
outer2 = torch.rand(4).tolist()
with tracker.fork():
    forked2 = torch.rand(4).tolist()
tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
with tracker.fork():
    forked1_again = torch.rand(4).tolist()
tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)
with tracker.fork():
    forked_tp1 = torch.rand(4).tolist()
out["rng"] = dict(plain=plain, outer=[outer1, outer2], forked1=forked1, forked2=forked2,
                  forked1_again=forked1_again, forked_tp1=forked_tp1)

# ---- rng_states round trip
st = platform.rng_states()
a = torch.rand(3).tolist()
with tracker.fork():
    ta = torch.rand(3).tolist()
platform.set_rng_states(st)
b = torch.rand(3).tolist()
with tracker.fork():
    tb = torch.rand(3).tolist()
out["rng_states"] = {"equal": a == b, "tracker_equal": ta == tb, "keys": sorted(st)}

# ---- grad clipping (single process, no group) vs torch.nn.utils.clip_grad_norm_
from megatron.core.optimizer import clip_grads, optimizer as mopt
g = torch.Generator().manual_seed(7)
def make():
    ps = [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(5, 3), (7,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps
clip = {}
for norm_type in (2.0, 1.0, float("inf")):
    for max_norm in (0.5, 1e6):
        ps = make()
        ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        for r, p in zip(ref, ps):
            r.grad = p.grad.clone()
        total = clip_grads.get_grad_norm_fp32([p.grad for p in ps], norm_type=norm_type)
        clip_grads.clip_grad_by_total_norm_fp32(ps, max_norm, total)
        ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=norm_type).item()
        clip[f"{norm_type}/{max_norm}"] = dict(
            total=float(total), ref_total=ref_total,
            max_grad_diff=max((p.grad - r.grad).abs().max().item() for p, r in zip(ps, ref)),
            clipped_norm=torch.norm(torch.stack([torch.norm(p.grad, norm_type) for p in ps]), norm_type).item())
out["clip"] = clip
out["optimizer_uses_cpu_clip"] = (mopt.get_grad_norm_fp32 is clip_grads.get_grad_norm_fp32 and
                                  mopt.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cpu():
    # MEGATRON_KD_FORCE_CPU makes the same checks meaningful on a GPU machine.
    return _run(CPU_MAPPING, MEGATRON_KD_FORCE_CPU="1")


def test_cpu_mapping_active_and_idempotent(cpu):
    assert cpu["active_before"] is False
    assert cpu["active"] is True and cpu["idempotent"] is True
    assert cpu["backend"] == "gloo" and cpu["device"] == "cpu"


def test_cuda_device_requests_land_on_cpu(cpu):
    assert cpu["devices"].pop("tensor_to_dtype") == "torch.float64"  # .to(dtype) still works
    assert cpu["devices"] == {k: "cpu" for k in cpu["devices"]}
    assert len(cpu["devices"]) == 9
    assert cpu["current_device"] == 0


def test_device_context_survives_the_mapping(cpu):
    """Built after the patch, torch's factory set would hold the wrappers and ``with
    torch.device("meta")`` would silently allocate real CPU memory (it corrupted the RoPE buffers
    of transformers models loaded after setup)."""
    assert cpu["meta_context"] == ["meta", "meta", "cpu"]


def test_streams_and_events_are_noops(cpu):
    assert cpu["streams"] == {"value": [2.0, 2.0, 2.0], "query": True, "elapsed": 0.0}


def test_rng_fork_restores_outer_stream(cpu):
    rng = cpu["rng"]
    # drawing inside a fork does not disturb the outer sequence
    assert rng["outer"] == rng["plain"]
    # the fork has its own stream: different numbers, and it advances between forks
    assert rng["forked1"] not in rng["plain"]
    assert rng["forked1"] != rng["forked2"]
    # reseeding reproduces it; another TP rank gets another stream
    assert rng["forked1_again"] == rng["forked1"]
    assert rng["forked_tp1"] != rng["forked1"]


def test_rng_states_round_trip(cpu):
    # the tracker's states (dropout inside the TP region) are part of a bit-for-bit resume
    assert cpu["rng_states"] == {"equal": True, "tracker_equal": True,
                                 "keys": ["numpy", "python", "torch", "tracker"]}


@pytest.mark.parametrize("norm_type", ["2.0", "1.0", "inf"])
@pytest.mark.parametrize("max_norm", ["0.5", "1000000.0"])
def test_cpu_grad_clipping_matches_torch(cpu, norm_type, max_norm):
    c = cpu["clip"][f"{norm_type}/{max_norm}"]
    assert c["total"] == pytest.approx(c["ref_total"], rel=1e-5)
    assert c["max_grad_diff"] < 1e-5
    if float(max_norm) < c["total"]:
        assert c["clipped_norm"] == pytest.approx(float(max_norm), rel=1e-4)
    else:
        assert c["clipped_norm"] == pytest.approx(c["total"], rel=1e-5)


def test_optimizer_module_uses_cpu_clipping(cpu):
    assert cpu["optimizer_uses_cpu_clip"] is True


# ----------------------------------------------------------------------------- (c) source scan


def _cuda_uses(source: str) -> list:
    """(line, what) for `.cuda` attributes, `import torch.cuda`, and 'cuda' device strings.
    Docstrings and comments do not count (comments are not in the AST)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            hits.append((node.lineno, f"{ast.unparse(node)}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and (n == "cuda" or n.startswith("torch.cuda")) for n in names):
                hits.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings):
            v = node.value.strip().lower()
            if v == "cuda" or v.startswith("cuda:"):
                hits.append((node.lineno, repr(node.value)))
    return hits


def test_scan_catches_what_it_should():
    src = '''"""Docstring mentioning torch.cuda and 'cuda' is fine."""
import torch
# comment: torch.cuda.synchronize() is fine
x = torch.cuda.is_available()
y = torch.zeros(1, device="cuda")
z = t.cuda()
w = f"cuda:{rank}"
from torch import cuda
'''
    assert sorted(line for line, _ in _cuda_uses(src)) == [4, 5, 6, 7, 8]


def test_no_cuda_outside_platform():
    files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "platform.py" or p.parent != PACKAGE)
    assert len(files) > 5
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}: {what}"
                 for p in files for line, what in _cuda_uses(p.read_text())]
    assert not offenders, "CPU/GPU branching belongs in megatron_kd/platform.py:\n" + "\n".join(offenders)



_KEEP_MEMORY_PROBE = """
import gc, psutil, torch
from megatron_kd import platform
platform.setup()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
rss_full = psutil.Process().memory_info().rss
del x
gc.collect()
print(psutil.Process().memory_info().rss > rss_full - 16 * 2**20)
"""


@pytest.mark.parametrize("keep", ["1", "0"])
def test_cpu_setup_keeps_freed_memory_in_the_process(keep):
    """glibc would unmap a freed 64 MiB block at once (and page-fault the next one in anew); after
    platform.setup() on the CPU it stays in the process, unless MEGATRON_KD_CPU_KEEP_MEMORY=0."""
    env = {**os.environ, "MEGATRON_KD_FORCE_CPU": "1", "MEGATRON_KD_CPU_KEEP_MEMORY": keep,
           "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", _KEEP_MEMORY_PROBE], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == ("True" if keep == "1" else "False"), p.stdout
