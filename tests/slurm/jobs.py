"""Submitting the real sbatch scripts to the local cluster, and what the tests check of a job."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, RTOL, STEPS, child_env, curve, tail

SBATCH = REPO / "slurm" / "phase2_kd.sbatch"
# sbatch options override the script's #SBATCH lines: one CPU node, 2 ranks
CI_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
# the same 2 ranks, one on each node of the cluster: TP=2 then spans the nodes
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
JOB_TIMEOUT = 900  # generous: a 2-core box shared with other jobs can be 10x slower than idle


def submit(slurm, tmp_path: Path, name: str, args=(), env=None, script=SBATCH, options=(),
           node=CI_NODE) -> tuple[int, Path]:
    log = tmp_path / f"{name}.out"
    p = slurm.cmd("sbatch", "--parsable", f"--job-name={name}", f"--output={log}", *node, *options,
                  str(script), *args, env=env, cwd=REPO)
    return int(p.stdout.strip().split(";")[0]), log


def job_env(run_dir: Path, **extra) -> dict:
    """The submitting environment: sbatch exports it to the job (what a user's shell would)."""
    return child_env(MKD_PYTHON=sys.executable, MKD_RUN_DIR=run_dir, **extra)


def finished(slurm, job_id: int, log: Path) -> dict:
    info = slurm.wait_job(job_id, JOB_TIMEOUT)
    text = log.read_text() if log.exists() else "(no job log)"
    return info | {"log": text}


def assert_completed(info: dict):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", \
        f"job {info.get('JobId')}: {info['JobState']} {info['ExitCode']}\n{tail(info['log'], 60)}"


def assert_matches_reference(run_dir: Path, reference: dict):
    rows = curve(run_dir)
    assert [it for it, _ in rows] == list(range(1, STEPS + 1)), rows  # every step exactly once
    for it, v in rows:
        assert math.isclose(v, reference[it], rel_tol=RTOL), (it, v, reference[it])


def rank_pids(job_id: int, conf: Path | None = None) -> list[int]:
    """PIDs of this job's training ranks: found by what they run and the job (and, given, the
    cluster's slurm.conf) their environment names, so only this job's processes are signalled."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # python -m megatron_kd.cli ... (not srun or torchrun, whose arguments also name it)
        if cmd[1:3] == [b"-m", b"megatron_kd.cli"] and f"SLURM_JOB_ID={job_id}".encode() in env \
                and (conf is None or f"SLURM_CONF={conf}".encode() in env):
            pids.append(int(d.name))
    parent = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}
    return sorted(pid for pid in pids if parent[pid] not in pids)  # not a rank's forked helper


def pending(pid: int) -> set[int]:
    """Signal numbers pending for a process (thread-directed SigPnd | process-wide ShdPnd)."""
    mask = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def wait_until(predicate, timeout: float, what: str, slurm=None, job=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    if slurm and job:
        slurm.cmd("scancel", str(job), check=False)
    pytest.fail(f"{what}: not reached in {timeout:.0f}s\n{tail(log.read_text() if log and log.exists() else '')}")
