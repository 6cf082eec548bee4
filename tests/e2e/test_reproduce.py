"""`megatron-kd reproduce --quick` end to end (CPU, ~3-4 minutes): the pipeline, never the science.

Asserts: every arm (teacher curriculum, the positional teacher, phase 1 per theta x seed, the three
setups x {KD, CE} x seeds, each control's arms) trained and was evaluated; the table, the PNG and
the summary exist with the fixed keys and intervals that contain their estimates; the frozen
rotary rows really stayed at the phase-1 values (and others moved); a killed study reruns only
its unfinished runs; the in-distribution bar stops a study whose phase 1 is at chance, with the
measured numbers; bad flags fail in one line before anything is written.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("long_context_eval")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "multirank"))
from multirank_util import child_env, free_port  # noqa: E402

from megatron_kd.study.spec import BANDS, CONTROLS, SETUPS, preset  # noqa: E402


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "megatron_kd.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=child_env())


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce") / "study"
    p = _cli("reproduce", "--quick", "--run-dir", root)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return root, p.stdout


def _expected_runs(cfg):
    runs = [f"teacher/len{w:04d}" for w, _, _ in cfg.teacher_stages]
    runs += [f"teacher_positional/len{w:04d}" for w, _, _ in cfg.teacher_stages]
    for s in range(cfg.seeds):
        runs += [f"phase1_theta{t // 1000}k/seed{s}" for t in (10_000, 500_000)]
        runs += [f"{setup}/{arm}/seed{s}" for setup in SETUPS for arm in ("kd", "ce")]
        runs += [f"control_{c}/{arm}/seed{s}" for c, (_, arms) in CONTROLS.items() for arm in arms]
    return runs


def test_every_arm_trained_and_evaluated(study):
    root, _ = study
    cfg = preset("quick")
    for run in _expected_runs(cfg):
        done = root / run / "study_done.json"
        assert done.is_file(), run
        r = json.loads(done.read_text())
        assert (root / run / "checkpoints" / "latest_checkpointed_iteration.txt").is_file(), run
        if r["kind"] == "phase2" or run.endswith(f"len{cfg.teacher_length:04d}"):
            assert set(r["bands"]) == set(BANDS), run
            for band, per_d in r["bands"].items():
                assert sorted(map(int, per_d)) == sorted(cfg.distances[band]), (run, band)
                assert all(len(v) == cfg.samples_per_distance and set(v) <= {0, 1} for v in per_d.values())
    # the CE arms never built a teacher; KD arms logged their KD loss (exact path at this size)
    ce = (root / "10k_to_500k/ce/seed0/config.yaml").read_text()
    assert "alpha: 0.0" in ce
    kd_cfg = (root / "control_teacher_reset_positions/kd/seed0/config.yaml").read_text()
    assert "reset_position_ids: true" in kd_cfg


def test_table_png_summary_intervals(study):
    root, stdout = study
    cfg = preset("quick")
    s = json.loads((root / "reproduce_summary.json").read_text())
    assert (root / "reproduce.png").stat().st_size > 10_000
    assert "| 10k_to_500k/kd |" in (root / "reproduce.md").read_text()
    assert "passkey exact match" in stdout
    n = cfg.seeds * cfg.samples_per_distance * 4
    for model in ("teacher", "phase1", "kd", "ce"):
        for band in BANDS:
            c = s["retrieval"][model][band]
            assert 0.0 <= c["ci95"][0] <= c["exact_match"] <= c["ci95"][1] <= 1.0, (model, band, c)
            assert c["n"] == (cfg.samples_per_distance * 4 if model == "teacher" else n), (model, band, c)
    assert [r["seed"] for r in s["retrieval_per_seed"]] == list(range(cfg.seeds))
    assert set(s["kd_minus_ce"]) == {"main", *CONTROLS}
    for name, d in s["kd_minus_ce"].items():
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1], (name, d)
        assert name == "main" or d["verdict"], name
    assert set(s["arms"]) >= {f"{x}/{a}" for x in SETUPS for a in ("kd", "ce")}


def test_frozen_rotary_rows_kept_phase1_values(study):
    root, _ = study
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "freeze_check_worker.py"), str(root)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    r = json.loads(lines[-1][7:])
    assert r["spans"] == {"high": [[8, 16]], "low": [[0, 8]]}
    for name in ("high", "low"):
        assert r[name]["frozen_rows"] > 0
        assert r[name]["frozen_rows_max_change"] == 0.0, r  # bit-identical to phase 1
        assert r[name]["other_rows_min_layer_change"] > 0.0, r  # the rest trained
    assert r["free"]["frozen_rows_max_change"] > 0.0, r  # without the switch those rows move


def test_rerun_trains_only_unfinished_runs(study, tmp_path):
    root, _ = study
    copy = tmp_path / "study"
    shutil.copytree(root, copy, symlinks=True)
    victim = copy / "10k_to_500k/ce/seed1"
    (victim / "study_done.json").unlink()  # as if killed during its training
    shutil.rmtree(victim / "checkpoints")
    before = json.loads((copy / "reproduce_summary.json").read_text())
    # --jobs 2: the run goes to a worker process (study/worker.py), its log under logs/
    p = _cli("reproduce", "--quick", "--jobs", "2", "--run-dir", copy)
    assert p.returncode == 0, p.stderr[-3000:]
    trained = [line.split("train ", 1)[1] for line in p.stdout.splitlines() if "] train " in line]
    assert trained == ["10k_to_500k/ce/seed1"], trained
    assert (copy / "logs" / "10k_to_500k_ce_seed1.log").is_file()
    assert (victim / "study_done.json").is_file()
    after = json.loads((copy / "reproduce_summary.json").read_text())
    assert after["retrieval"]["kd"] == before["retrieval"]["kd"]  # untouched arms read back as they were


def test_bar_stops_a_study_at_chance(study, tmp_path):
    root, _ = study
    copy = tmp_path / "study"
    shutil.copytree(root, copy, symlinks=True)
    for d in copy.glob("*/*/seed*"):
        if d.parts[-3] not in ("phase1_theta10k", "phase1_theta500k"):
            shutil.rmtree(d)  # phase 2 not run yet
    p = _cli("reproduce", "--quick", "--in-distribution-bar", "0.8", "--run-dir", copy)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    err = p.stderr.strip().splitlines()[-1]
    assert "in-distribution bar 0.80" in err and "phase1_theta10k/seed0 0." in err and "--phase1-iters" in err
    assert not list(copy.glob("10k_to_500k/*/seed*/study_done.json"))  # nothing trained past phase 1


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], ["--seeds", ">= 1"]),
    (["--distances-beyond-document", "144,300"], ["--distances-beyond-document 300", "beyond the evaluated length"]),
    (["--distances-in-distribution", "24,200"], ["--distances-in-distribution 200"]),
    (["--controls", "teacher_rest_positions"], ["--controls", "unknown"]),
    (["--setups", "10k_to_10k", "--controls", "all"], ["--controls", "10k_to_500k"]),
])
def test_bad_flags_one_line_nothing_written(tmp_path, args, words):
    run = tmp_path / "never"
    p = _cli("reproduce", "--quick", "--run-dir", run, *args, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()
    assert len(line) == 1 and all(w in line[0] for w in words), p.stderr
    assert not run.exists()


def test_control_switch_without_teacher_names_both_keys(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "examples" / "reproduce" / "control_teacher_reset_positions.yaml"
    p = _cli("train", "--config", recipe, "kd.alpha=0", f"checkpoint.save={tmp_path / 'run'}",
             "data.tokenizer_model=/nonexistent.model", timeout=120)
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert "teacher.reset_position_ids" in line and "kd.alpha=0" in line, line
    assert not (tmp_path / "run").exists()


def test_other_settings_in_the_same_directory_refused(study):
    root, _ = study
    before = sorted(p.name for p in root.iterdir())
    p = _cli("reproduce", "--quick", "--seeds", "3", "--run-dir", root, timeout=120)
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert "holds a study with other settings (seeds: 2 there, 3 now)" in line, line
    assert sorted(p.name for p in root.iterdir()) == before
