"""Launch helpers for the multi-rank tests: real processes (torchrun + gloo on the CPU)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MKL_NUM_THREADS="1",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="0", MEGATRON_KD_FORCE_CPU="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_cmd(config: Path, run_dir: Path, nproc: int = 1, overrides=(), flags=()) -> list:
    args = ["train", "--config", str(config), f"checkpoint.save={run_dir}", *overrides, *flags]
    if nproc == 1:
        return [sys.executable, str(WORKER), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), *args]


def tail(text: str, n: int = 60) -> str:
    lines = [l for l in (text or "").splitlines() if "Warning" not in l and "warnings.warn" not in l]
    return "\n".join(lines[-n:])


def run(cmd: list, expect_rc: int | None = 0, timeout: int = TIMEOUT, env=None):
    """Run to completion; on an unexpected exit status fail with the child's output tail. On a
    timeout the whole process group (torchrun and its ranks) is killed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\nstdout:\n{tail(out)}\nstderr:\n{tail(err)}")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if expect_rc is not None and p.returncode != expect_rc:
        pytest.fail(f"exit {p.returncode} (expected {expect_rc}): {' '.join(cmd)}\n"
                    f"stdout:\n{tail(p.stdout)}\nstderr:\n{tail(p.stderr)}")
    return p


def train(config, run_dir, nproc=1, overrides=(), flags=("--overwrite",), **kw):
    return run(train_cmd(config, run_dir, nproc, overrides, flags), **kw)


def start(cmd: list, env=None, log: Path | None = None) -> subprocess.Popen:
    """Start in its own process group (so torchrun and all its ranks can be killed together)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every descendant: torchrun may put its ranks in
    sessions of their own, and an orphaned rank would hang on its peers forever."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    status = proc.poll()
    kill_group(proc)
    text = log.read_text() if log and log.exists() else ""
    pytest.fail(f"{what}: not reached (process exit status {status})\noutput:\n{tail(text)}")


def metrics(run_dir: Path, split: str = "train", key: str = "lm loss") -> list[tuple[int, float]]:
    """(iteration, value) in file order, from <run>/logs/metrics.jsonl."""
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["iteration"], r[key]) for r in rows if r["split"] == split]


def curve(run_dir: Path, split: str = "train") -> dict[int, float]:
    out: dict[int, float] = {}
    for it, v in metrics(run_dir, split):
        assert it not in out, f"{run_dir}: iteration {it} logged twice ({split})"
        out[it] = v
    return out


def checkpoint_weights(run_dir: Path, iteration: int, tmp: Path) -> dict:
    """The model tensors of a run's dist checkpoint, gathered into one dict (any layout; the
    optimizer's state, plain or EP's "chained_N.optimizer...", left out)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(tmp) / f"{Path(run_dir).name}_{iteration}.pt"
    dcp_to_torch_save(str(Path(run_dir) / "checkpoints" / f"iter_{iteration:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and "optimizer" not in k}


def snapshot(root: Path) -> dict:
    """path -> (size, mtime_ns, bytes) of every file under root (to prove nothing changed)."""
    snap = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
        else:
            snap[str(p.relative_to(root))] = "dir"
    return snap
