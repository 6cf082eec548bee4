"""Bit-for-bit resume after SIGKILL (single rank and TP=2), with real processes.

Run A trains N=8 steps uninterrupted (checkpoint every 2). Run B is the same recipe in another
directory; it is SIGKILLed (its whole process group: torchrun and every rank) while it writes the
iteration-4 checkpoint, i.e. after the iteration-2 checkpoint is complete and ``latest`` says 2,
with ``iter_0000004.tmp`` half-finished on disk (worker.py's MKD_TEST_HANG_AT_SAVE hook only
holds the process inside that save so the kill lands there every time). B is then continued
with ``--resume``. On the CPU every logged loss of B (including iterations 3 and 4, which run
twice) must equal A's exactly: model, optimizer, scheduler, RNG and data position are restored.
"""
from __future__ import annotations

import pytest

import multirank_util as mr

N = 8
SAVE_INTERVAL = 2
HANG_AT = 4  # the save during which B is killed; the latest complete checkpoint is then 2

VARIANTS = {"tp1": (1, []), "tp2": (2, ["parallel.tensor_model_parallel_size=2"])}


def latest(run_dir) -> int | None:
    p = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    try:
        text = p.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_after_kill_is_bit_for_bit(tiny_recipe, tmp_path, variant):
    nproc, layout = VARIANTS[variant]
    overrides = [f"train.train_iters={N}", f"checkpoint.save_interval={SAVE_INTERVAL}",
                 "train.eval_interval=4", *layout,
                 # dropout on, so the RNG state is part of what must be restored
                 "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]

    run_a = tmp_path / "a"
    mr.train(tiny_recipe, run_a, nproc, overrides)
    assert latest(run_a) == N

    run_b = tmp_path / "b"
    log = tmp_path / "b_first.log"
    proc = mr.start(mr.train_cmd(tiny_recipe, run_b, nproc, overrides, ["--overwrite"]),
                    env=mr.child_env(MKD_TEST_HANG_AT_SAVE=HANG_AT), log=log)
    ckpts = run_b / "checkpoints"
    try:
        mr.wait_for(lambda: (latest(run_b) or 0) >= SAVE_INTERVAL
                    and all((ckpts / f"hang.{r}").exists() for r in range(nproc)),
                    proc, timeout=mr.TIMEOUT, what="B: checkpoint 2 complete and B inside save 4", log=log)
    finally:
        mr.kill_group(proc)
    assert proc.returncode != 0
    # killed mid-save: the pointer still names the complete checkpoint, the partial one is .tmp
    assert latest(run_b) == SAVE_INTERVAL
    assert (ckpts / f"iter_{HANG_AT:07d}.tmp").is_dir()
    assert not (ckpts / f"iter_{HANG_AT:07d}").exists()
    first = mr.metrics(run_b)
    assert max(it for it, _ in first) < N

    p = mr.train(tiny_recipe, run_b, nproc, overrides, flags=["--resume"])
    assert f"at iteration {SAVE_INTERVAL}" in p.stdout and "resumed from" in p.stdout, mr.tail(p.stdout)
    assert "RNG not restored" not in p.stdout
    assert latest(run_b) == N
    assert not list(ckpts.glob("*.tmp")), "a .tmp checkpoint survived the resumed run"
    assert not list(ckpts.glob("*.txt.tmp"))

    a_train = mr.curve(run_a)
    b_train = mr.metrics(run_b)  # iterations 3 and 4 appear twice (before the kill, after resume)
    assert sorted({it for it, _ in b_train}) == list(range(1, N + 1))
    assert len(b_train) > N, "nothing was recomputed after the resume"
    mismatches = [(it, v, a_train[it]) for it, v in b_train if v != a_train[it]]
    assert not mismatches, f"{variant}: (iteration, B loss, A loss) not bit-identical: {mismatches}"
    for key in ("grad_norm", "lr"):
        a = dict(mr.metrics(run_a, key=key))
        assert all(v == a[it] for it, v in mr.metrics(run_b, key=key)), key
    a_valid = mr.curve(run_a, "valid")
    b_valid = mr.metrics(run_b, "valid")
    assert sorted(a_valid) == [4, 8] and {it for it, _ in b_valid} == {4, 8}
    assert all(v == a_valid[it] for it, v in b_valid), (b_valid, a_valid)
