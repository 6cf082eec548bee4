"""One rank signalled, every rank stops after the same step (torchrun, 2 ranks, TP=2).

Slurm signals the nodes of a job one after another, and torchrun forwards SIGTERM only to its
own workers, so ranks can see a stop signal at different steps. The flag all-reduced once per
step (training/preemption.py) must make all of them checkpoint after the same step and exit 75.
Here SIGUSR1 goes to rank 0 only; rank 1 (the logging rank) learns it through the all-reduce.
Without the agreement rank 1 would run on alone and the job would hang in its next collective.
The test freezes both ranks (SIGSTOP) around the signal so it lands between known steps.
"""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import multirank_util as mr

N = 12


def workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent:
            ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
            if ranks:
                out[int(ranks[0])] = int(d.name)
    return out


def test_signal_on_one_rank_stops_all_after_the_same_step(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    cmd = mr.train_cmd(tiny_recipe, run_dir, 2, [f"train.train_iters={N}", "train.eval_interval=0",
                                                 "checkpoint.save_interval=0",
                                                 "parallel.tensor_model_parallel_size=2"],
                       ["--overwrite", "--exit-signal-handler"])
    proc = mr.start(cmd, log=log)
    metrics = run_dir / "logs" / "metrics.jsonl"
    try:
        mr.wait_for(lambda: metrics.exists() and metrics.read_text().strip(), proc, mr.TIMEOUT,
                    "first step logged", log)
        ranks = workers(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        for pid in ranks.values():
            os.kill(pid, signal.SIGSTOP)
        os.kill(ranks[0], signal.SIGUSR1)
        for pid in ranks.values():
            os.kill(pid, signal.SIGCONT)
        proc.wait(timeout=mr.TIMEOUT)
    finally:
        mr.kill_group(proc)
    text = log.read_text()
    # torchrun reports its workers' exit codes (and exits 1 itself): the stop code is 75
    assert proc.returncode != 0 and "75" in re.findall(r"exitcode\s*:\s*(-?\d+)", text), mr.tail(text)
    stopped = [line for line in text.splitlines() if "received: stopping after iteration" in line]
    assert stopped and "SIGUSR1 received" in stopped[0], mr.tail(text)  # rank 0 prints
    k = int(stopped[0].rsplit(" ", 1)[1])
    assert 1 <= k < N
    # every rank stopped after step k: one complete checkpoint k, the logging rank logged k steps
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == str(k)
    assert (ckpts / f"iter_{k:07d}").is_dir() and not list(ckpts.glob("*.tmp"))
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l]
    assert [r["iteration"] for r in rows if r["split"] == "train"] == list(range(1, k + 1))
