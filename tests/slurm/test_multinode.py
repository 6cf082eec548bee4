"""slurm/phase2_kd.sbatch across two nodes of the local Slurm (conftest.py's LocalSlurm: one
slurmd per node, node names in /etc/hosts, each node its own loopback address).

One task per node and TP=2, so every tensor-parallel all-reduce crosses between the nodes, and
the 2-node jobs are compared with the one-node job of the same world size and layout
(conftest.py ``uninterrupted``): loss, KD loss, LM loss and grad norm equal **bit for bit**
(gloo on the CPU: where a rank runs does not change what it computes). The same for DP=2 (TP=1):
the gradient reduction crosses the nodes.

The lost node: rank 0 (node 1) is frozen after the job's first complete checkpoint, node 2 loses
its slurmd, its slurmstepd and its rank (SIGKILL, at once), and rank 0 continues: it must fail at
once with a line naming rank 1 and node 2 (its heartbeat in the job's store), the job must end
with nothing of it left on either node (the lost rank's watchdog, checkpoint writer and resource
tracker included: the test kills only what a lost node takes along for sure), and, once node 2
is back on its stale spool and the run holds a half-written newer checkpoint, the resubmitted
command must resume from the newest complete checkpoint and end on the uninterrupted curve.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import LAYOUT, STEPS, curve, tail
from jobs import CI_NODE, TWO_NODES, assert_completed, finished, job_env, rank_pids, submit, wait_until
from megatron_kd.config import ParallelConfig

KEYS = ("loss", "kd loss", "lm loss", "grad_norm")


def assert_bitwise(run_dir, reference_dir):
    for key in KEYS:
        got, want = curve(run_dir, key), curve(reference_dir, key)
        assert got == want, (key, got, want)


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_two_nodes_equal_one_node_bit_for_bit(slurm, kd_recipe, uninterrupted, launcher, tmp_path):
    assert_completed(uninterrupted)
    job, log = submit(slurm, tmp_path, f"kd-2n-{launcher}", ["--config", str(kd_recipe), *LAYOUT],
                      job_env(tmp_path / "run", MKD_LAUNCHER=launcher), node=TWO_NODES)
    info = finished(slurm, job, log)
    assert_completed(info)
    text = info["log"]
    n1, n2 = slurm.nodes
    assert f"on {slurm.nodelist}: 2 node(s), world size 2, launcher {launcher}, master {n1}:" in text, tail(text)
    if launcher == "srun":
        on_nodes = [f"0: [mkd] rank 0 of 2 on node {n1}", f"1: [mkd] rank 1 of 2 on node {n2}"]
    else:  # one torchrun per node, static rendezvous at node 1's address
        on_nodes = [f"0: [mkd] torchrun node rank 0 of 2 on node {n1}",
                    f"1: [mkd] torchrun node rank 1 of 2 on node {n2}", "torch.distributed.run"]
    for line in on_nodes:
        assert line in text, (line, tail(text))
    assert_bitwise(tmp_path / "run", uninterrupted["run_dir"])


def test_data_parallel_across_two_nodes_equals_one_node_bit_for_bit(slurm, kd_recipe, tmp_path):
    """TP=1, DP=2: the gradient all-reduce (and the distributed optimizer's gathers, when on)
    cross the nodes; the same layout on one node is the reference."""
    jobs = {nodes: submit(slurm, tmp_path, f"kd-dp-{nodes}n", ["--config", str(kd_recipe)],
                          job_env(tmp_path / f"run{nodes}"), node=CI_NODE if nodes == 1 else TWO_NODES)
            for nodes in (1, 2)}
    for nodes, (job, log) in jobs.items():
        info = finished(slurm, job, log)
        assert_completed(info)
        assert f"{nodes} node(s), world size 2, launcher srun" in info["log"], tail(info["log"])
    assert f"1: [mkd] rank 1 of 2 on node {slurm.nodes[1]}" in jobs[2][1].read_text()
    assert [it for it, _ in curve(tmp_path / "run2")] == list(range(1, STEPS + 1))
    assert_bitwise(tmp_path / "run2", tmp_path / "run1")


# ------------------------------------------------------------------ a node lost mid-run
SAVE_EVERY = 2


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def test_lost_node_is_named_nothing_outlives_the_job_and_resubmit_resumes(
        slurm, kd_recipe, uninterrupted, tmp_path, capsys):
    assert_completed(uninterrupted)
    n1, n2 = slurm.nodes
    run_dir = tmp_path / "run"
    args = ["--config", str(kd_recipe), *LAYOUT, f"checkpoint.save_interval={SAVE_EVERY}"]
    # --no-requeue: the lost node's fate is the script's and the resubmission's here; Slurm's own
    # NODE_FAIL requeue (docs/cluster.md) is not what this test measures
    # MKD_EXIT_GRACE_S: srun's wait for the lost task after rank 0 exited (60 s by default)
    job, log = submit(slurm, tmp_path, "kd-lost", args, job_env(run_dir, MKD_EXIT_GRACE_S=10),
                      node=TWO_NODES, options=["--no-requeue"])
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    # (the first step: every test after this one shares the cluster and needs node 2 back)
    wait_until(lambda: latest.exists() and latest.read_text().strip().isdigit(), 600,
               "first checkpoint", slurm, job, log)
    pid0 = next(p for p in rank_pids(job, slurm.conf) if f"SLURMD_NODENAME={n1}".encode() in
                open(f"/proc/{p}/environ", "rb").read().split(b"\0"))
    try:
        _lose_node_and_resume(slurm, uninterrupted, tmp_path, capsys, job, log, run_dir, args, pid0)
    finally:
        if slurm.procs[f"slurmd.{n2}"].poll() is not None:  # node 2 back for the tests after this one
            slurm.start_node(n2)
            wait_until(lambda: slurm.node_states().get(n2) == "idle", 120, f"{n2} back to idle")


def _lose_node_and_resume(slurm, uninterrupted, tmp_path, capsys, job, log, run_dir, args, pid0):
    n2 = slurm.nodes[1]
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    killed = slurm.node_processes(n2, job)
    assert len(killed) >= 3, killed  # slurmd, slurmstepd, the rank
    # what the rank started and the kill leaves behind: its watchdog (megatron-core's spawn
    # Manager for checkpoint results is no longer started: platform.py); all must go by themselves
    helpers = {p: cmdline(p) for p in slurm.job_pids(job, n2) if p not in killed}
    assert any("watchdog.py" in c for c in helpers.values()), helpers
    os.kill(pid0, signal.SIGSTOP)  # rank 0 cannot finish the run before node 2 is gone
    try:
        time.sleep(1.0)  # its peer is now blocked in a collective with rank 0
        slurm.kill_node(n2, killed)
        lost_at = time.monotonic()
    finally:
        os.kill(pid0, signal.SIGCONT)
    complete = int(latest.read_text())
    # rank 0 notices at once (the peer's sockets closed) and names the lost rank and node
    named = re.compile(rf"\[rank 0\] failed \(\w+\); heartbeats: rank 1 is silent: no heartbeat for "
                       rf"[\d.]+ s \(last at iteration \d+, pid \d+ on {n2}\)")
    wait_until(lambda: named.search(log.read_text()), 120, "rank 0 names rank 1 on node 2", slurm, job, log)
    detected = time.monotonic() - lost_at
    wait_until(lambda: not os.path.exists(f"/proc/{pid0}"), 120, "rank 0 exits", slurm, job, log)
    exited = time.monotonic() - lost_at
    limit = 60 * ParallelConfig().distributed_timeout_minutes + 30  # the recipe keeps the default
    assert exited < limit, (exited, limit)
    # the batch script (node 1) ends: srun gives the lost task MKD_EXIT_GRACE_S, then gives up
    wait_until(lambda: "training failed (exit" in log.read_text(), 300, "the script ends", slurm, job, log)
    script_done = time.monotonic() - lost_at
    # nothing of the job lives on: not on node 1 (the script, srun, rank 0, its helpers), not the
    # rank-1 helpers left on "node 2" (its watchdog, checkpoint writer, resource tracker)
    deadline = time.monotonic() + 60
    while slurm.job_pids(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = {p: (Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:2], cmdline(p))
            for p in slurm.job_pids(job)}
    assert not left, f"processes of job {job} left (pid: state, ppid, command): {left}"
    gone = time.monotonic() - lost_at
    text = log.read_text()
    assert "not requeued; resubmitting the same command resumes from checkpoint" in text, tail(text)

    assert not any(os.path.exists(f"/proc/{p}") for p in helpers), helpers

    # node 2 comes back with the spool it had (a stale step of the job in it), and the run holds a
    # half-written checkpoint newer than the newest complete one (a writer killed mid-save
    # leaves iter_N.tmp with some of the files): resubmit
    slurm.start_node(n2)
    wait_until(lambda: slurm.node_states().get(n2) == "idle", 120, f"{n2} back to idle")
    newest = int(latest.read_text())
    assert complete <= newest <= STEPS - SAVE_EVERY, (complete, newest)  # lost mid-run
    ckpts = run_dir / "checkpoints"
    half = ckpts / f"iter_{newest + SAVE_EVERY:07d}.tmp"
    if not half.exists():
        shutil.copytree(ckpts / f"iter_{newest:07d}", half)
        for f in sorted(half.iterdir())[::2]:
            f.unlink()
    job2, log2 = submit(slurm, tmp_path, "kd-lost-resume", args, job_env(run_dir), node=TWO_NODES)
    info = finished(slurm, job2, log2)
    assert_completed(info)
    text2 = info["log"]
    assert f"(latest checkpoint: {newest})" in text2 and f"at iteration {newest}" in text2, tail(text2)
    assert not half.exists() and (ckpts / f"iter_{newest + SAVE_EVERY:07d}").is_dir()  # replaced
    # the curve from the newest checkpoint on is the uninterrupted one; every step is there
    for key in KEYS:
        got = dict(curve(run_dir, key))
        assert sorted(got) == list(range(1, STEPS + 1)), (key, sorted(got))
        assert got == dict(curve(uninterrupted["run_dir"], key)), key
    with capsys.disabled():
        print(f"\nlost node {n2} (killed {len(killed)} processes at iteration >= {complete}; "
              f"{len(helpers)} helpers of its rank left to clean up after themselves): "
              f"rank 0 named it after {detected:.1f} s, exited after {exited:.1f} s; the script "
              f"ended after {script_done:.1f} s, the last process of the job after {gone:.1f} s; "
              f"resumed at iteration {newest} of {STEPS}; limit for the exit: collective timeout + 30 s = "
              f"{limit:.0f} s")
