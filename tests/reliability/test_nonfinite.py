"""Issue 19, item 1: a non-finite loss or grad norm (training/nonfinite.py).

The fault: ``train.lr=1e6`` makes the tiny recipe's grad norm NaN at iteration ~4 and its loss
NaN after; before the check the run applied the NaN updates, wrote checkpoints of NaN weights
(``latest`` moved onto them) and exited 0. The promise: the step is refused before the optimizer
applies it, on every rank alike; up to ``train.skip_nonfinite_steps`` refused steps are skipped
(not applied, scheduler not advanced, counted in ``skipped``), the next one ends the run with
exit 65 on every rank, one stderr line naming the iteration, the quantity and the ranks, and no
checkpoint at or after it. Real processes (worker.py's ``MKD_TEST_NAN_AT`` poisons one rank's
loss at given iterations, so skips and the TP=2 agreement are exact), plus one-process checks
of the spike warning, the config keys, the per-step collective and slurm/common.sh's verdict.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import multirank_util as mr

REPO = Path(__file__).resolve().parents[2]
QUIET = ["train.eval_interval=0", "checkpoint.save_interval=1"]


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines if line.strip()]
    return {r["iteration"]: r for r in out if r["split"] == "train"}


def checkpoints(run_dir: Path) -> tuple[list[str], str]:
    root = run_dir / "checkpoints"
    return (sorted(p.name for p in root.iterdir() if p.name.startswith("iter_")),
            (root / "latest_checkpointed_iteration.txt").read_text().strip())


def one_line(text: str, marker: str) -> str:
    lines = [line for line in text.splitlines() if marker in line]
    assert len(lines) == 1, f"expected one line with {marker!r}:\n{mr.tail(text)}"
    return lines[0]


def test_diverging_lr_exits_65_and_keeps_the_last_finite_checkpoint(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    p = mr.train(tiny_recipe, run, 1, ["train.lr=1e6", "train.train_iters=6", *QUIET], expect_rc=65)
    line = one_line(p.stderr, "training diverged")
    assert line.startswith("megatron-kd train: error: training diverged at iteration ") and "Traceback" not in p.stderr
    k = int(re.search(r"at iteration (\d+)", line).group(1))
    assert 2 <= k <= 6 and re.search(r"non-finite (loss|grad norm) (nan|-?inf) on rank 0", line), line
    # nothing written at or after k; latest still names the last finite step
    assert checkpoints(run) == ([f"iter_{i:07d}" for i in range(1, k)], str(k - 1))
    assert f"latest checkpoint: {k - 1}" in line
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert (run / "logs" / "diverged.txt").read_text().strip() == line.split("error: ", 1)[1]
    log = rows(run)
    assert sorted(log) == list(range(1, k + 1)) and log[k]["skipped"] == 1
    assert not (math.isfinite(log[k]["grad_norm"]) and math.isfinite(log[k]["lm loss"]))
    assert all(math.isfinite(log[i]["grad_norm"]) and log[i]["skipped"] == 0 for i in range(1, k))


def run_ranks(args: list, n: int, **env) -> list[subprocess.CompletedProcess]:
    """``n`` ranks started side by side with a launcher's environment (RANK, WORLD_SIZE, ...):
    unlike torchrun, which SIGTERMs the other ranks once the first one exits, every rank's own
    exit status is seen (as srun and mpirun report it)."""
    port = mr.free_port()
    procs = [subprocess.Popen([sys.executable, str(mr.WORKER), *args], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                              env=mr.child_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=n, MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=port, **env))
             for r in range(n)]
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=mr.TIMEOUT)
            out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                mr.kill_group(proc)
    return out


def test_tp2_one_rank_poisoned_skip_then_every_rank_exits_65(tiny_recipe, tmp_path):
    """Rank 0's loss is NaN at iterations 2 and 3; rank 1 (the logging rank) sees a finite loss
    and only the NaN grad norm: both refuse both steps, skip the first, both exit 65 on the
    second (without the agreement one rank would go on and hang in its next collective)."""
    run = tmp_path / "run"
    ranks = run_ranks(["train", "--config", str(tiny_recipe), f"checkpoint.save={run}",
                       "parallel.tensor_model_parallel_size=2", "train.train_iters=4",
                       "train.skip_nonfinite_steps=1", *QUIET, "--overwrite"], 2, MKD_TEST_NAN_AT="2,3@0")
    text = "".join(p.stdout + p.stderr for p in ranks)
    assert [p.returncode for p in ranks] == [65, 65], mr.tail(text)
    skip = one_line(text, "skipped iteration")  # printed by rank 0 only, once
    assert skip.startswith("skipped iteration 2: non-finite loss nan on rank 0; grad norm nan on all 2 ranks")
    assert "1 of train.skip_nonfinite_steps=1" in skip
    line = one_line(text, "training diverged")
    assert "at iteration 3: non-finite loss nan on rank 0; grad norm nan on all 2 ranks" in line
    assert "Traceback" not in text
    # no checkpoint at the skipped step 2 nor at the failing step 3
    assert checkpoints(run) == (["iter_0000001"], "1")
    log = rows(run)
    assert sorted(log) == [1, 2, 3] and [log[i]["skipped"] for i in (1, 2, 3)] == [0, 1, 1]
    assert log[2]["lr"] == log[1]["lr"]  # the skipped step did not advance the scheduler


def test_transient_nan_is_skipped_and_the_checked_step_equals_megatrons(tiny_recipe, tmp_path):
    """NaN at iteration 3 with one skip allowed: the run finishes (exit 0) with finite losses
    after the skip. A run with the check off (plain ``optimizer.step()``) stopped after 2 steps
    gives the same loss and grad norm bit for bit at iterations 1-2: the checked, split step
    (clipping on: clip_grad below the grad norm) applies exactly megatron's update."""
    common = ["train.train_iters=4", "train.clip_grad=0.3", "train.eval_interval=0"]
    run = tmp_path / "skip"
    p = mr.train(tiny_recipe, run, 1, [*common, "checkpoint.save_interval=1", "train.skip_nonfinite_steps=1"],
                 env=mr.child_env(MKD_TEST_NAN_AT="3"))
    assert one_line(p.stderr, "skipped iteration").startswith("skipped iteration 3: non-finite loss nan on rank 0")
    log = rows(run)
    assert [log[i]["skipped"] for i in (1, 2, 3, 4)] == [0, 0, 1, 0]
    assert log[3]["lr"] == log[2]["lr"] and log[4]["lr"] < log[3]["lr"]
    assert math.isfinite(log[4]["lm loss"]) and math.isfinite(log[4]["grad_norm"])
    assert log[1]["grad_norm"] > 0.3  # the clip was active in update 1
    assert checkpoints(run) == (["iter_0000001", "iter_0000002", "iter_0000004"], "4")
    assert not (run / "logs" / "diverged.txt").exists()

    ref = tmp_path / "plain"
    mr.train(tiny_recipe, ref, 1, [*common, "train.check_for_nan_in_loss_and_grad=false",
                                   "train.exit_interval=2"])
    plain = rows(ref)
    assert sorted(plain) == [1, 2]
    for i in (1, 2):
        assert (plain[i]["lm loss"], plain[i]["grad_norm"]) == (log[i]["lm loss"], log[i]["grad_norm"])


# ---------------------------------------------------------------- one process
def test_loss_spike_warns_once_with_iteration_loss_and_median():
    from megatron_kd.training.nonfinite import LossSpikeMonitor

    mon = LossSpikeMonitor(3.0)
    losses = [6.0, 5.0, 4.0, 4.2, 3.9, 4.1, float("nan"), 13.0, 3.8, 3.7]
    warnings = [(i, w) for i, loss in enumerate(losses, 1) if (w := mon.observe(i, loss))]
    assert len(warnings) == 1, warnings
    i, w = warnings[0]
    assert i == 8 and "iteration 8" in w and "loss 13.0000" in w and "median 4.1500" in w
    assert LossSpikeMonitor(3.0).observe(1, 1e9) is None  # no history yet: no baseline


@pytest.mark.parametrize("override, message", [
    ("train.skip_nonfinite_steps=-1", "train.skip_nonfinite_steps: expected an integer >= 0"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor: expected 0 (off) or a factor > 1"),
])
def test_config_keys_are_checked(override, message):
    from megatron_kd.config import ConfigError, TrainConfig

    key, value = override.split("=")
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**{key.split(".")[1]: float(value) if "." in value else int(value)})


class _World:
    """A fake 2-rank world that records collectives (StepCheck only needs these three)."""

    def __init__(self, monkeypatch, remote=(0, 0, 0)):
        import torch

        self.calls = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)

        def all_reduce(t, op=None, group=None):
            self.calls.append((t.dtype, tuple(t.shape), group))
            t.copy_(torch.maximum(t, torch.tensor(remote, dtype=t.dtype)))
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


def test_one_collective_per_step_and_none_when_off(monkeypatch):
    import torch

    from megatron_kd.training.nonfinite import StepCheck, Verdict
    from megatron_kd.training.preemption import StopOnSignal

    world = _World(monkeypatch, remote=(1, 0, 0))  # the other rank was signalled
    off = StepCheck(StopOnSignal(), check=False)
    assert off.agree() == Verdict() and not world.calls  # check off, no signals: silent
    signals_only = StepCheck(StopOnSignal(["SIGUSR1"]), check=False).agree()
    assert signals_only.stop and not signals_only.nonfinite
    checked = StepCheck(StopOnSignal(), check=True).agree(loss_bad=True)
    assert checked.stop and checked.loss and not checked.grad_norm
    # one int32[3] MAX all-reduce over the world group per agreement
    assert world.calls == [(torch.int32, (3,), None)] * 2


# ---------------------------------------------------------------- slurm/common.sh
FAKE_RANK = """#!/bin/bash
# stands in for `python -m megatron_kd.cli train ... checkpoint.save=DIR`
run_dir=${@: -1}; run_dir=${run_dir#checkpoint.save=}
[ "$FAKE_USR1" = 1 ] && kill -USR1 "$MKD_TEST_SHELL_PID" && sleep 0.5
[ "$FAKE_MARKER" = 1 ] && mkdir -p "$run_dir/logs" && echo "training diverged at iteration 7: x" > "$run_dir/logs/diverged.txt"
exit "$FAKE_RC"
"""
STUBS = r"""
srun() { while [ $# -gt 0 ] && [[ $1 == -* ]]; do shift; done; "$@"; }
scontrol() { case "$1" in show) [ "$2" = hostnames ] && echo localhost ;;
                          requeue) echo requeued >> "$STUB_LOG" ;; esac; return 0; }
scancel() { return 0; }
"""


@pytest.mark.parametrize("case, rc, marker, expect", [
    ("srun passes 65 after a warning signal", 65, 0, 65),
    ("torchrun hides 65, the marker tells", 1, 1, 65),
    ("control: 75 after the warning requeues", 75, 0, 0),
])
def test_sbatch_never_requeues_a_diverged_run(tmp_path, case, rc, marker, expect):
    fake = tmp_path / "fake_rank"
    fake.write_text(FAKE_RANK)
    fake.chmod(0o755)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    stub_log = tmp_path / "stub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MKD_"))}
    env.update(SLURM_JOB_ID="123", SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NTASKS="1",
               MKD_PYTHON=str(fake), MKD_RUN_DIR=str(tmp_path / "run"), STUB_LOG=str(stub_log),
               FAKE_RC=str(rc), FAKE_MARKER=str(marker), FAKE_USR1="1")
    script = (f"source {REPO}/slurm/common.sh\n{STUBS}\nexport MKD_TEST_SHELL_PID=$$\n"
              f"mkd_train --config {tmp_path}/recipe.yaml\n")
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    requeued = stub_log.exists() and "requeued" in stub_log.read_text()
    assert p.returncode == expect, f"{case}: exit {p.returncode}\n{out}"
    if expect == 65:
        assert not requeued and "training diverged" in out and "not requeued" in out, out
        if marker:
            assert "training diverged at iteration 7" in out, out
    else:
        assert requeued, out
