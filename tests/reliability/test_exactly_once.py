"""Exactly-once data across kills: after 5 SIGKILL / ``--resume`` cycles the training steps that
counted consumed exactly the windows of an uninterrupted run, step by step (issue 19, item 5).

The data order is a pure function of ``consumed_samples`` (GPTDataset's shuffled indices walked
by data/sampler.py from the checkpoint's value), so a resume must neither skip the windows of the
steps lost with the kill nor consume any window twice. worker.py records, per rank and step, the
window indices the step read (``MKD_TEST_RECORD_IDS``); run A trains uninterrupted, run B is
killed at seeded points, each resumed: inside a checkpoint save (``MKD_TEST_HANG_AT_SAVE``: the
shards written, not yet renamed) or right after a finished step that no checkpoint holds yet
(``MKD_TEST_HANG_AT_STEP``). The hooks hold the process at the chosen point, so every kill lands
where the plan says and the test is reproducible.
"""
from __future__ import annotations

import random
import re

import ids_record
import multirank_util as mr

N = 12
SAVE_INTERVAL = 2
GBS = 8  # the tiny recipe's global batch: 8 windows per step
KILLS = 5
SEED = 19


def kill_plan(seed: int, kills: int = KILLS, n: int = N, interval: int = SAVE_INTERVAL) -> list:
    """[(kind, iteration, checkpoint the resume must load)] for ``kills`` cycles; kind "save"
    (killed inside that iteration's save) or "step" (after that step, before it is counted).
    Each kill lands past the previous resume point, so the run makes progress; one is mid-save."""
    rng = random.Random(seed)
    forced_save = rng.randrange(kills)
    plan, resumed = [], 0
    for i in range(kills):
        kind = "save" if i == forced_save else rng.choice(["save", "step"])
        if kind == "save":  # one of the next two saves after the resume point
            k = min(resumed + interval * rng.randint(1, 2), n)
        else:
            k = rng.randint(resumed + 1, min(resumed + 2 * interval, n))
        resumed = (k - 1) // interval * interval  # the newest checkpoint finished before the kill
        plan.append((kind, k, resumed))
    return plan


def test_kill_plan_is_seeded_and_progresses():
    plan = kill_plan(SEED)
    assert plan == kill_plan(SEED) and plan != kill_plan(SEED + 1)
    assert any(kind == "save" for kind, _, _ in plan) and any(kind == "step" for kind, _, _ in plan)
    assert all(prev[2] < k for prev, (_, k, _) in zip([("", 0, 0)] + plan, plan))


def test_five_kills_consume_each_window_exactly_once(tiny_recipe, tmp_path):
    overrides = [f"train.train_iters={N}", f"checkpoint.save_interval={SAVE_INTERVAL}",
                 "train.eval_iters=0", "model.hidden_dropout=0.1"]
    rec_a, rec_b = tmp_path / "ids_a", tmp_path / "ids_b"
    rec_a.mkdir()
    rec_b.mkdir()
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    # A runs beside B's kill cycles (2 cores; B's processes mostly start up or wait to be killed)
    proc_a = mr.start(mr.train_cmd(tiny_recipe, run_a, 1, overrides, ["--overwrite"]),
                      env=mr.child_env(MKD_TEST_RECORD_IDS=rec_a), log=tmp_path / "a.log")
    try:
        plan = kill_plan(SEED)
        for cycle, (kind, k, resumes_at) in enumerate(plan):
            hook = {"save": "MKD_TEST_HANG_AT_SAVE", "step": "MKD_TEST_HANG_AT_STEP"}[kind]
            marker = (run_b / "checkpoints" if kind == "save" else rec_b) / "hang.0"
            log = tmp_path / f"b{cycle}.log"
            proc = mr.start(mr.train_cmd(tiny_recipe, run_b, 1, overrides,
                                         ["--resume"] if cycle else ["--overwrite"]),
                            env=mr.child_env(MKD_TEST_RECORD_IDS=rec_b, **{hook: k}), log=log)
            try:
                mr.wait_for(marker.exists, proc, timeout=mr.TIMEOUT, log=log,
                            what=f"cycle {cycle}: B held {kind} {k}")
            finally:
                mr.kill_group(proc)
            marker.unlink()
            if kind == "save":
                assert (run_b / "checkpoints" / f"iter_{k:07d}.tmp").is_dir()
            p = log.read_text()
            if cycle:
                assert _resumed_at(p) == plan[cycle - 1][2], mr.tail(p)
        p = mr.train(tiny_recipe, run_b, 1, overrides, flags=["--resume"],
                     env=mr.child_env(MKD_TEST_RECORD_IDS=rec_b)).stdout
        assert _resumed_at(p) == plan[-1][2], mr.tail(p)
        assert proc_a.wait(timeout=mr.TIMEOUT) == 0, mr.tail((tmp_path / "a.log").read_text())
    finally:
        if proc_a.poll() is None:
            mr.kill_group(proc_a)

    a, b = ids_record.read(rec_a), ids_record.read(rec_b)
    assert sorted(a) == sorted(b) == [0]
    assert [it for it, _ in a[0]] == list(range(1, N + 1))  # A: one attempt per step
    # the windows of the uninterrupted run: N steps x 8 distinct ones (within one epoch)
    flat = [i for _, ids in a[0] for i in ids]
    assert len(flat) == len(set(flat)) == N * GBS
    r = ids_record.compare(b, a, N)
    assert r["wrong_steps"] == [], f"(rank, iteration) whose counted windows differ from A's: {r}"
    assert (r["lost"], r["duplicated"]) == (0, 0), r
    assert r["redo_differs"] == [], f"a killed attempt read other windows than its redo: {r}"
    # each kill lost the steps after its resume point, and they were redone
    assert r["redone"] == sum(k - at for _, k, at in plan), (r, plan)
    # and what was trained on them: every loss B logged (redone steps too) is A's, bit for bit
    a_loss = mr.curve(run_a)
    assert [(it, v) for it, v in mr.metrics(run_b) if v != a_loss[it]] == []
    assert mr.metrics(run_b)[-1] == (N, a_loss[N])


def _resumed_at(stdout: str) -> int:
    """The iteration a ``--resume`` loaded; 0 when it found no checkpoint and started afresh."""
    m = re.search(r"resumed from \S+ at iteration (\d+)", stdout)
    return int(m.group(1)) if m else 0
