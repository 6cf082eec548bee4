"""Damaged checkpoints (issue 19, item 3): resume falls back to the newest complete one and says
why, explicit loads and ``checkpoint.load_strict`` refuse in one line, ``keep_last`` never deletes
a damaged or the newest complete checkpoint, ``megatron-kd checkpoint verify`` tells which is which.

One tiny single-rank run (checkpoints at 2, 4, 6, with checksums) is copied per case; the cases
that only concern which checkpoint counts as complete call integrity/checkpointing in-process.
"""
from __future__ import annotations

import json
import shutil

import pytest

import multirank_util as mr
from megatron_kd.training import checkpointing, integrity

BASE = ["train.train_iters=6", "checkpoint.save_interval=2", "train.eval_interval=0",
        "checkpoint.verify=true"]


@pytest.fixture(scope="module")
def base_run(tiny_recipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt_integrity") / "base"
    mr.train(tiny_recipe, run, 1, BASE)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["iter_0000002", "iter_0000004", "iter_0000006", checkpointing.LATEST], ckpts
    return run


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the base run (config.yaml names the copy, so --resume accepts it)."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    cfg = dst / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(base_run), str(dst)))
    return dst


def ckpt(run, it):
    return run / "checkpoints" / f"iter_{it:07d}"


def error_lines(p) -> list[str]:
    return [l for l in p.stderr.splitlines() if l.strip()]


def test_manifest_records_every_file_with_size_and_checksum(base_run):
    d = ckpt(base_run, 6)
    files = json.loads((d / integrity.MANIFEST).read_text())["files"]
    assert sorted(files) == integrity.list_files(d)
    assert {"metadata.json", "common.pt", ".metadata"} <= set(files)
    assert any(n.endswith(".distcp") for n in files)
    for name, rec in files.items():
        assert rec["size"] == (d / name).stat().st_size
        assert rec["sha256"] == integrity.sha256(d / name)


def test_resume_falls_back_past_missing_shard_bit_for_bit_and_keep_last(tiny_recipe, base_run, run):
    """(a) + (g): iter 6 loses a shard; --resume loads 4 (warning names the file), steps 5 and 6
    equal the uninterrupted run's exactly; the new iter 6 sets the damaged one aside instead of
    deleting it, and keep_last=1 then leaves exactly that newest complete checkpoint."""
    bad = ckpt(run, 6)
    shard = sorted(bad.glob("*.distcp"))[-1]
    shard.unlink()
    kept = mr.snapshot(bad)
    (run / "logs" / "metrics.jsonl").write_text("")  # only the resumed run's steps below

    p = mr.train(tiny_recipe, run, 1, BASE + ["checkpoint.keep_last=1"], flags=["--resume"])
    assert f"resumed from {ckpt(run, 4)} at iteration 4" in p.stdout, mr.tail(p.stdout)
    warnings = [l for l in p.stderr.splitlines() if l.startswith("warning:")]
    assert any(str(bad) in l and f"{shard.name} missing" in l and "iter_0000004" in l for l in warnings), \
        p.stderr
    base = mr.curve(base_run)
    assert mr.curve(run) == {5: base[5], 6: base[6]}

    aside = bad.with_name(bad.name + ".damaged")
    assert mr.snapshot(aside) == kept, "the damaged checkpoint was changed or deleted"
    assert any(aside.name in l for l in warnings), p.stderr
    left = sorted(d.name for _, d in integrity.iteration_dirs(run / "checkpoints"))
    assert left == ["iter_0000006"]
    assert integrity.problem(ckpt(run, 6), checksums=True) is None
    assert checkpointing.read_latest(run / "checkpoints") == 6


@pytest.mark.parametrize("remove, reason", [
    ("common.pt", "common.pt missing"),  # (b) megatron: AttributeError inside its error path
    ("metadata.json", "metadata.json missing"),  # (c)
    (integrity.MANIFEST, None),  # no manifest: an older checkpoint, complete by megatron's files
])
def test_resume_choice_with_a_file_missing(run, capsys, remove, reason):
    (ckpt(run, 6) / remove).unlink()
    picked = checkpointing.select_resume(run / "checkpoints", checksums=True)
    err = capsys.readouterr().err
    if reason is None:
        assert picked == ckpt(run, 6) and not err
        return
    assert picked == ckpt(run, 4)
    assert f"checkpoint {ckpt(run, 6)} is damaged ({reason})" in err, err
    assert ckpt(run, 6).is_dir()


def flip_byte(path, at=1000):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_mismatch_is_only_seen_with_verify(run, capsys):
    """(d) same size, one byte flipped: sizes pass, the recorded sha256 does not."""
    shard = sorted(ckpt(run, 6).glob("*.distcp"))[0]
    flip_byte(shard)
    root = run / "checkpoints"
    assert checkpointing.select_resume(root, checksums=False) == ckpt(run, 6)
    assert checkpointing.select_resume(root, checksums=True) == ckpt(run, 4)
    assert f"{shard.name} fails its sha256 checksum" in capsys.readouterr().err
    with pytest.raises(checkpointing.CheckpointError, match="fails its sha256"):
        checkpointing.resolve_load_dir(run, checksums=True)
    # the resumed run's save of iteration 6 sets it aside rather than replacing it as complete
    kept = mr.snapshot(ckpt(run, 6))
    checkpointing._replace_existing(ckpt(run, 6), checksums=True)
    assert not ckpt(run, 6).exists() and mr.snapshot(root / "iter_0000006.damaged") == kept


def test_load_strict_refuses_in_one_line_touching_nothing(tiny_recipe, run):
    """(e)"""
    (ckpt(run, 6) / "common.pt").unlink()
    before = mr.snapshot(run)
    p = mr.train(tiny_recipe, run, 1, BASE + ["checkpoint.load_strict=true"], flags=["--resume"], expect_rc=2)
    lines = error_lines(p)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("megatron-kd train: error: checkpoint.load_strict:"), lines[0]
    assert f"{ckpt(run, 6)} is damaged (common.pt missing)" in lines[0], lines[0]
    assert mr.snapshot(run) == before


def test_damaged_explicit_load_refuses_in_one_line_before_writing(tiny_recipe, run, tmp_path):
    shard = sorted(ckpt(run, 6).glob("*.distcp"))[0]
    shard.unlink()
    new = tmp_path / "phase2"
    p = mr.train(tiny_recipe, new, 1, ["train.train_iters=1", f"checkpoint.load={run}",
                                       "checkpoint.finetune=true"], flags=[], expect_rc=2)
    lines = error_lines(p)
    assert len(lines) == 1, p.stderr
    assert f"{ckpt(run, 6)}: damaged checkpoint ({shard.name} missing)" in lines[0], lines[0]
    assert f"the newest complete one is {ckpt(run, 4)}" in lines[0], lines[0]
    assert not new.exists()


def test_garbage_common_pt_without_manifest_names_the_file(run):
    d = ckpt(run, 6)
    (d / integrity.MANIFEST).unlink()
    (d / "common.pt").write_bytes(b"not a pickle" * 100)
    with pytest.raises(checkpointing.CheckpointError, match=r"iter_0000006: damaged checkpoint "
                                                            r"\(common.pt unreadable"):
        checkpointing.resolve_load_dir(d)


def test_keep_last_never_deletes_damaged_or_newest_complete(run, capsys):
    root = run / "checkpoints"
    (ckpt(run, 4) / "metadata.json").unlink()
    (root / "iter_0000003.deleting").mkdir()  # left by a kill mid-delete
    # the damaged one is not counted: the two newest *complete* ones are 6 and 2
    assert checkpointing.apply_keep_last(root, 2) == []
    assert not (root / "iter_0000003.deleting").exists()
    assert checkpointing.apply_keep_last(root, 1) == [ckpt(run, 2)]
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000006", checkpointing.LATEST]
    assert f"leaving damaged checkpoint {ckpt(run, 4)} (metadata.json missing" in capsys.readouterr().err


def verify(path, *flags, capsys):
    from megatron_kd.cli import main

    rc = main(["checkpoint", "verify", str(path), *flags])
    return rc, capsys.readouterr().out


def test_verify_command(run, capsys):
    """(f) exit 0: newest complete; 1: resume falls back (which one, and why); 2: none complete."""
    rc, out = verify(run, capsys=capsys)
    assert rc == 0 and "iter_0000006  complete" in out and out.count("resume loads this") == 1, out

    flip_byte(sorted(ckpt(run, 6).glob("*.distcp"))[0])
    assert verify(run, capsys=capsys)[0] == 0  # sizes only
    rc, out = verify(run / "checkpoints", "--checksums", capsys=capsys)
    assert rc == 1, out
    assert "iter_0000006  DAMAGED:" in out and "fails its sha256 checksum" in out, out
    assert "iter_0000004  complete  [5 files, sizes and sha256]   <- resume loads this" in out, out
    assert "falls back from iteration 6 to 4" in out, out

    rc, out = verify(ckpt(run, 6), "--checksums", capsys=capsys)  # one iter dir
    assert rc == 2 and "iter_0000006  DAMAGED" in out and "iter_0000004" not in out, out

    for it in (2, 4):
        (ckpt(run, it) / "common.pt").unlink()
    rc, out = verify(run, "--checksums", capsys=capsys)
    assert rc == 2 and "no complete checkpoint" in out, out

    from megatron_kd.cli import main
    assert main(["checkpoint", "verify", str(run / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_no_complete_checkpoint_refuses_resume(run):
    for it in (2, 4, 6):
        (ckpt(run, it) / "common.pt").unlink()
    with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint"):
        checkpointing.select_resume(run / "checkpoints")
