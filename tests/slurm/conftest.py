"""Fixtures for the launcher tests: a real two-node Slurm, a tiny KD recipe, its single-process run.

The Slurm tests FAIL (not skip) when the Slurm/munge binaries are missing: `tools/install.sh test`
installs them, so a missing binary there is a broken setup, not an optional feature.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from local_slurm import LocalSlurm, SlurmMissing

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600

# Student and a differently shaped teacher, both tiny; vocab 500 -> 512 padded at TP=1 and TP=2.
RECIPE = """\
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 128
  make_vocab_size_divisible_by: 128
teacher:
  load: {teacher}
{teacher_shape}
kd:
  alpha: 0.5
  temperature: 2.0
data:
  data_path: {prefix}
  tokenizer_model: {prefix}.tokenizer.model
  seq_length: 64
  split: "90,10,0"
train:
  micro_batch_size: 2
  global_batch_size: 8
  train_iters: {steps}
  lr: 0.003
  min_lr: 0.0003
  lr_warmup_iters: 1
  log_interval: 1
  eval_interval: 0
  eval_iters: 0
checkpoint:
  save_interval: 0
"""
TEACHER = {"num_layers": 2, "hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
           "ffn_hidden_size": 192, "rotary_base": 500000, "make_vocab_size_divisible_by": 128}
STEPS = 8
# 2 ranks run TP=2: a launcher that failed to form a 2-rank world cannot run this layout at all
# (validate_layout refuses TP=2 on 1 rank), so a passing run proves the ranks found each other.
LAYOUT = ["parallel.tensor_model_parallel_size=2"]
# fp32 CPU, TP=2 vs one rank: measured differences ~1e-7 relative (tests/multirank use 1e-5 too)
RTOL = 1e-5


def child_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MEGATRON_KD_FORCE_CPU="1", PYTHONPATH=os.pathsep.join(
                   [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env=None, timeout=TIMEOUT, expect_rc=0) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True,
                       timeout=timeout)
    if expect_rc is not None and p.returncode != expect_rc:
        pytest.fail(f"exit {p.returncode} (expected {expect_rc}): {' '.join(map(str, cmd))}\n"
                    f"{tail(p.stdout)}\n{tail(p.stderr)}")
    return p


def tail(text: str, n: int = 40) -> str:
    lines = [l for l in (text or "").splitlines() if "Warning" not in l and "warnings.warn" not in l]
    return "\n".join(lines[-n:])


def train_cmd(recipe, run_dir, *overrides, flags=("--overwrite",)) -> list:
    return [sys.executable, "-m", "megatron_kd.cli", "train", "--config", str(recipe), *flags,
            *overrides, f"checkpoint.save={run_dir}"]


def curve(run_dir, key: str = "loss") -> list[tuple[int, float]]:
    """(iteration, value) of every train record of <run>/logs/metrics.jsonl, in file order."""
    rows = [json.loads(l) for l in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines() if l]
    return [(r["iteration"], r[key]) for r in rows if r["split"] == "train"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running two-node Slurm (munged, slurmctld, a slurmd per node, the node names in
    /etc/hosts); stopped by PID and its hosts lines removed at the end, whatever happened."""
    root = tmp_path_factory.mktemp("slurm")
    cluster = LocalSlurm(root, nodes=2)
    try:
        cluster.start()
    except SlurmMissing as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kd_recipe(tmp_path_factory):
    """Tiny corpus + tokenizer, a teacher trained for 2 steps, and the KD recipe using it."""
    from megatron_kd.data import iter_offline_corpus, preprocess, write_jsonl

    root = tmp_path_factory.mktemp("kd_recipe")
    write_jsonl(iter_offline_corpus("hotpotqa", max_docs=300), root / "corpus.jsonl")
    preprocess([str(root / "corpus.jsonl")], str(root / "corpus"), train_tokenizer=500, workers=1,
               progress=False)
    teacher = root / "teacher"
    recipe = root / "kd.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).format(
        prefix=root / "corpus", steps=STEPS, teacher=teacher,
        teacher_shape="\n".join(f"  {k}: {v}" for k, v in TEACHER.items())))
    # the teacher: the same recipe as a plain model of the teacher's shape, CE only, 2 steps
    run(train_cmd(recipe, teacher, "kd.alpha=0", "train.train_iters=2",
                  *[f"model.{k}={v}" for k, v in TEACHER.items()]))
    return recipe


@pytest.fixture(scope="session")
def reference(kd_recipe, tmp_path_factory):
    """The KD recipe run directly, one process: the curve every launcher must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(train_cmd(kd_recipe, run_dir))
    rows = curve(run_dir)
    assert [it for it, _ in rows] == list(range(1, STEPS + 1))
    assert all(v == v and v > 0 for _, v in rows)
    return dict(rows)


@pytest.fixture(scope="session")
def uninterrupted(slurm, kd_recipe, tmp_path_factory):
    """phase2_kd.sbatch on one node, 2 ranks at TP=2: the run every 2-rank job must equal."""
    from jobs import finished, job_env, submit

    tmp = tmp_path_factory.mktemp("sbatch_plain")
    job, log = submit(slurm, tmp, "kd-plain", ["--config", str(kd_recipe), *LAYOUT], job_env(tmp / "run"))
    return finished(slurm, job, log) | {"run_dir": tmp / "run", "job": job}
