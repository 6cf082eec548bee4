"""Every script under benchmarks/ runs in CI at toy size, so none can rot unseen (issue 18 item 1:
``python benchmarks/kd_step.py`` once died at import while its ``--help``, the imports being lazy,
still passed).

Each script here runs as a user runs it (a subprocess; CPU forced, one thread per process) at the
smallest size that still goes through all of its measuring code, and every row and ratio it prints
must be there with a number: a script that stops measuring fails, not only one that crashes.
Timings are not asserted. All of them run on a CPU (none needs a GPU). What a script takes from an
earlier step is built here, small:

- longred_retention.py: a demo teacher stage as ``--original`` (tests/e2e/benchmark_inputs.py: the
  demo's corpora at the reduced demo's sizes, 2 steps at L = 32), T = 2L, 2 steps per arm;
- study_jobs.py: that same demo data directory as ``--study``, 2 steps per run;
- convert_speed.py: ``--hf-dir`` a tiny random Llama (tests/interop/hf_fixtures.py), not the
  538 MB SmolLM2 it converts by default; hf_logit_parity.py: ``--families llama --skip-smollm2``.

The scripts run two at a time (CI's box has two cores; each process is one thread), longest first.
``test_every_benchmark_has_a_toy_run``: TOY and COVERED_ELSEWHERE together name every
benchmarks/*.py, so a new benchmark without a toy run fails CI."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
ENV = {**os.environ, "MEGATRON_KD_FORCE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
N = r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?"  # a printed number (never nan / inf)

# benchmarks whose toy run lives in another test file (the meta-test checks that file names it)
COVERED_ELSEWHERE = {
    "kd_loss.py": "tests/e2e/test_kd_loss_toy.py",
    "kd_step.py": "tests/e2e/test_kd_step_toy.py",
    "kd_step_gpu.py": "tests/e2e/test_device_check_dry_run.py",
    "fault_stress.py": "tests/reliability/test_fault_stress.py",
}


def _script(name: str, *args, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / name), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


class Inputs:
    """What the scripts take from an earlier step, each built once (by the first job needing it)."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._built: dict = {}

    def _once(self, key: str, build):
        with self._lock:
            if key not in self._built:
                try:
                    self._built[key] = (build(), None)
                except Exception as e:  # noqa: BLE001 -- every job needing it reports it
                    self._built[key] = (None, e)
        value, error = self._built[key]
        if error is not None:
            raise RuntimeError(f"building the {key} input failed") from error
        return value

    def demo(self) -> Path:
        """ROOT of a toy demo run: data/ and teacher/len0032 (tests/e2e/benchmark_inputs.py)."""
        def build():
            root = self.root / "demo"
            worker = Path(__file__).with_name("benchmark_inputs.py")
            p = subprocess.run([sys.executable, str(worker), str(root)], cwd=REPO, env=ENV,
                               capture_output=True, text=True, timeout=420)
            assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
            return root
        return self._once("demo", build)

    def hf_llama(self) -> Path:
        def build():
            import torch

            path = REPO / "tests" / "interop" / "hf_fixtures.py"
            spec = importlib.util.spec_from_file_location("hf_fixtures", path)
            fixtures = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(fixtures)
            with torch.random.fork_rng():  # make_hf_model seeds the global generator
                fixtures.make_hf_model("llama", self.root / "hf_llama")
            return self.root / "hf_llama"
        return self._once("hf_llama", build)


# script -> (run it at toy size given the Inputs, the rows it must print); dict order = start order
TOY = {
    "longred_retention.py": (
        lambda i: _script("longred_retention.py", "--original", i.demo() / "teacher" / "len0032",
                          "--out", i.root / "longred", "--factor", 2, "--steps", 2, "--samples", 2,
                          "--eval-samples", 1, "--eval-new-tokens", 2),
        [rf"train seconds \{{'ce': {N}, 'longred': {N}\}}",
         r"^model\s+own@32\s+retention\s+plain@32\s+retention\s+passkey@32\s+passkey@64\s+plain@64"
         r"\s+niah@32\s+niah@64$",
         *(rf"^{m}\s+(?:{N}\s+){{8}}{N}$" for m in ("original", "CE only", "LongReD"))]),
    "hf_logit_parity.py": (
        lambda i: _script("hf_logit_parity.py", "--families", "llama", "--skip-smollm2", "--seq", 8),
        [r"^TP=1, fp32, CPU$", rf"^llama\s+8\s+{N}\s+{N}\s+{N}$"]),
    "convert_speed.py": (
        lambda i: _script("convert_speed.py", "--hf-dir", i.hf_llama()),
        [rf"^checkpoint: LlamaForCausalLM {N}M parameters, {N} MB safetensors$",
         *(rf"^{stage}\s+{N}\s+{N}$" for stage in ("read only", "import", "export")),
         rf"^import / read-only time: {N}x$"]),
    "study_jobs.py": (
        lambda i: _script("study_jobs.py", "--study", i.demo(), "--steps", 2),
        [rf"^\s+\(a\) one after the other, \d+ threads each:\s+{N} s$",
         rf"^\s+\(b\) at once, \d+ thread\(s\) each:\s+{N} s$",
         rf"^\s+throughput \(b\) / \(a\): {N}x$"]),
    "teacher_cache.py": (
        lambda i: _script("teacher_cache.py", "--seq-length", 64, "--micro-batch-size", 1, "--vocab", 512,
                          "--top-k", 8, "--sizes", "8,64", "--repeats", 1),
        [rf"^CE step\s+{N} ms$", rf"^KD step, live\s+{N} ms\s+\({N}x CE\)$",
         rf"^KD step, cache\s+{N} ms\s+\({N}x CE\)$",
         rf"^cache / live\s+{N}\s+\(live / cache = {N}x faster\)$",
         *(rf"^\s+{k}\s+{N}\s+{N}\s+{N}\s+{N}x\s+{N}$" for k in (8, 64))]),
    "packed_attention_overhead.py": (
        lambda i: _script("packed_attention_overhead.py", "--seq-length", 64, "--micro-batch-size", 1,
                          "--layers", 1, "--hidden", 64, "--vocab", 512, "--repeats", 1),
        [rf"^plain causal \(mcore implicit positions\) :\s+{N} ms / step \(re-run {N} ms\)$",
         rf"^packed \(document mask \+ global RoPE ids\):\s+{N} ms / step$",
         rf"^ratio packed / plain\s+:\s+{N}$"]),
    # 2048 tokens: the phase-1 recipe's window, so the share-of-a-step line prints too
    "data_loader.py": (
        lambda i: _script("data_loader.py", "--shapes", "2048x1", "--batches", 2),
        [r"^# DALI: ", *(rf"^\s+2048x1\s+{loader}(?:\s+{N}){{4}}$" for loader in ("ours", "torch-dl")),
         rf"^# examples/paper/phase1_theta10k.yaml: planner {N} tokens/s per H100 rank .* -> {N}% of a step"
         ]),
}


class ToyRuns:
    """The selected scripts' toy runs on two threads, started at once; ``result`` waits for one."""

    def __init__(self, names, root: Path):
        self.inputs = Inputs(root)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-toy")
        self._futures = {n: self._pool.submit(TOY[n][0], self.inputs) for n in TOY if n in names}

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self._futures[name].result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def toy_runs(request, tmp_path_factory):
    selected = {item.callspec.params["script"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "script" in item.callspec.params}
    runs = ToyRuns(selected, tmp_path_factory.mktemp("bench_toy"))
    yield runs
    runs.close()


@pytest.mark.parametrize("script", list(TOY))
def test_benchmark_runs_at_toy_size(script, toy_runs):
    p = toy_runs.result(script)
    assert p.returncode == 0, f"{script} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    missing = [row for row in TOY[script][1] if not re.search(row, p.stdout, re.M)]
    assert not missing, f"{script} no longer prints {missing}:\n{p.stdout[-4000:]}"
    if script == "data_loader.py" and "# DALI: nvidia-dali" in p.stdout:  # DALI installed: its row too
        assert re.search(rf"^\s+2048x1\s+dali(?:\s+{N}){{4}}$", p.stdout, re.M), p.stdout


def test_every_benchmark_has_a_toy_run():
    scripts = {p.name for p in BENCH.glob("*.py")}
    both = set(TOY) & set(COVERED_ELSEWHERE)
    assert not both, f"listed twice: {sorted(both)}"
    uncovered = scripts - set(TOY) - set(COVERED_ELSEWHERE)
    assert not uncovered, (f"benchmarks without a toy run in CI: {sorted(uncovered)}; add one to TOY in "
                           f"{Path(__file__).relative_to(REPO)} (or name the test that runs it in "
                           "COVERED_ELSEWHERE)")
    gone = (set(TOY) | set(COVERED_ELSEWHERE)) - scripts
    assert not gone, f"listed but not under benchmarks/: {sorted(gone)}"
    for script, test in COVERED_ELSEWHERE.items():
        path = REPO / test
        assert path.is_file(), f"{script}: its toy run {test} does not exist"
        assert script in path.read_text(), f"{test} does not run benchmarks/{script}"
