"""The real slurm/phase2_kd.sbatch on one node of the local Slurm (conftest.py's LocalSlurm).

The script is submitted unchanged; only what a user may change from outside is changed:
sbatch command-line options (they override the #SBATCH lines: 1 node, 2 tasks, no GPUs) and
MKD_* environment variables (interpreter, run directory, launch mode). Each job trains the tiny
KD recipe at TP=2 on 2 ranks (gloo) and is compared with the direct single-process run.

Preemption: once the job has logged its first step, the test freezes both ranks (SIGSTOP), sends
the pre-timeout signal the way Slurm does for ``--signal=B:USR1@...`` (``scancel --batch
--signal=USR1``: the batch shell only; the script forwards it to the ranks), waits until SIGUSR1
is pending in both ranks (/proc/<pid>/status), and lets them continue. The freeze only makes the
test deterministic: without it the 8 tiny steps may end before the signal arrives.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from conftest import LAYOUT, REPO, STEPS, curve, tail
from jobs import (CI_NODE, JOB_TIMEOUT, TWO_NODES, assert_completed, assert_matches_reference, finished,
                  job_env, pending, rank_pids, submit, wait_until)


# ------------------------------------------------------------------ the uninterrupted job
def test_phase2_kd_sbatch_matches_single_process(uninterrupted, reference):
    assert_completed(uninterrupted)
    assert uninterrupted["Restarts"] == "0"
    log = uninterrupted["log"]
    assert "world size 2, launcher srun" in log and "training finished" in log, tail(log)
    assert_matches_reference(uninterrupted["run_dir"], reference)
    # the run directory lists the job's log
    link = uninterrupted["run_dir"] / "logs" / f"slurm-{uninterrupted['job']}.out"
    assert link.is_symlink() and link.resolve().read_text() == log


# ------------------------------------------------------------------ preemption
@pytest.mark.parametrize("nodes", [1, 2])
def test_preempted_job_checkpoints_requeues_and_resumes_bit_for_bit(slurm, kd_recipe, uninterrupted, tmp_path,
                                                                    nodes):
    """nodes=2: one rank per node; the warning reaches the rank on the other node too (scancel
    --signal from the batch shell on node 1), both stop after the same step."""
    assert_completed(uninterrupted)
    job, log = submit(slurm, tmp_path, "kd-preempt", ["--config", str(kd_recipe), *LAYOUT],
                      job_env(tmp_path / "run"), node=CI_NODE if nodes == 1 else TWO_NODES)
    run_dir = tmp_path / "run"
    metrics = run_dir / "logs" / "metrics.jsonl"
    # the ranks' handlers are installed before their first step; freeze both after it
    wait_until(lambda: metrics.exists() and metrics.read_text().strip(), JOB_TIMEOUT,
               "first step logged", slurm, job, log)
    pids = rank_pids(job, slurm.conf)
    assert len(pids) == 2, pids
    on = {e.split(b"=", 1)[1].decode() for pid in pids
          for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if e.startswith(b"SLURMD_NODENAME=")}
    assert len(on) == nodes, on  # 2 nodes: one rank on each
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        slurm.cmd("scancel", "--batch", "--signal=USR1", str(job))
        wait_until(lambda: all(signal.SIGUSR1 in pending(pid) for pid in pids), 60,
                   "SIGUSR1 forwarded to both ranks", slurm, job, log)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    info = finished(slurm, job, log)
    assert_completed(info)
    text = info["log"]
    stopped = re.search(r"SIGUSR1 received: stopping after iteration (\d+)", text)
    assert stopped, tail(text, 60)
    k = int(stopped.group(1))
    assert 1 <= k < STEPS
    assert info["Restarts"] == "1", tail(text, 60)
    for line in (f"saved checkpoint at iteration {k}", f"stopped at checkpoint {k}",
                 f"requeueing job {job}", f"job {job} (restart 1)", f"(latest checkpoint: {k})",
                 f"at iteration {k}", "training finished"):
        assert line in text, (line, tail(text, 60))
    # no step lost or repeated, and the loss curve is the uninterrupted job's, bit for bit
    rows = curve(run_dir)
    assert [it for it, _ in rows] == list(range(1, STEPS + 1)), rows
    assert rows == curve(uninterrupted["run_dir"]), (rows, curve(uninterrupted["run_dir"]))
    for key in ("kd loss", "lm loss", "grad_norm"):
        assert curve(run_dir, key) == curve(uninterrupted["run_dir"], key), key


# ------------------------------------------------------------------ torchrun per node
def test_torchrun_mode_matches_single_process(slurm, kd_recipe, reference, tmp_path):
    job, log = submit(slurm, tmp_path, "kd-torchrun", ["--config", str(kd_recipe), *LAYOUT],
                      job_env(tmp_path / "run", MKD_LAUNCHER="torchrun"))
    info = finished(slurm, job, log)
    assert_completed(info)
    assert "world size 2, launcher torchrun" in info["log"] and "torch.distributed.run" in info["log"]
    assert_matches_reference(tmp_path / "run", reference)


# ------------------------------------------------------------------ bad input
def test_bad_input_fails_fast_with_a_clear_message(slurm, kd_recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory\n")
    jobs = {
        "no_config": submit(slurm, tmp_path, "no-config", [*LAYOUT], job_env(tmp_path / "r1")),
        "unwritable": submit(slurm, tmp_path, "unwritable", ["--config", str(kd_recipe)],
                             job_env(blocker / "run")),
        # 2 ranks cannot hold TP=4 (a model that TP=4 divides: the model's own divisibility is
        # checked first): the arithmetic reaches the job log from the ranks
        "layout": submit(slurm, tmp_path, "layout", ["--config", str(kd_recipe),
                                                     "parallel.tensor_model_parallel_size=4",
                                                     "model.num_query_groups=4"],
                         job_env(tmp_path / "r3")),
        "eval_no_checkpoint": submit(slurm, tmp_path, "eval", ["--tasks", "passkey"], job_env(tmp_path / "r4"),
                                     script=REPO / "slurm" / "eval.sbatch"),
    }
    expected = {
        "no_config": "error: no recipe given: set MKD_CONFIG",
        "unwritable": f"error: run directory {blocker}/run: cannot create it",
        "layout": "world size 2 is not divisible by tensor_model_parallel_size(4) x "
                  "pipeline_model_parallel_size(1) x context_parallel_size(1) = 4",
        "eval_no_checkpoint": "error: no checkpoint given: pass --checkpoint DIR",
    }
    for name, (job, log) in jobs.items():
        info = finished(slurm, job, log)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (name, info["ExitCode"], tail(info["log"]))
        assert expected[name] in info["log"], (name, tail(info["log"]))
        assert info["Restarts"] == "0"
    assert "bad input (the error is above); not requeued" in jobs["layout"][1].read_text()
    assert not (tmp_path / "r1").exists()  # nothing was created for a job that could not start
    assert blocker.read_text() == "not a directory\n"
