"""Issue 19: bad input to the real CLI is refused the same way every time: exit status 2 before
any compute, exactly one non-warning line on stderr naming the key or file and what was
expected, no traceback, and nothing already written touched (no run directory created; a
pre-existing run's files byte-identical, mtimes included).

Every case is its own process running ``megatron_kd.cli.main`` on its argv, forked from a server
that imported torch and megatron-core once (cli_forkserver.py): a separate ``python -m
megatron_kd.cli`` would spend ~5 s of CPU importing them, most of what a refused command costs
(30 cases: ~125 s of CPU as separate interpreters). tests/unit/test_cli_errors.py covers the
``python -m`` entry itself. The cases run two at a time from one module fixture, in three
rounds next to the jobs that make what later rounds read (the datasets, with the CLI's
preprocess; one tiny training run for the checkpoint, teacher and --resume cases); the test then
checks each case's result.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import multirank_util as mr

WORDS = "the a cat dog runs over under big small red blue house tree river city sings eats".split()
TRACKER = "latest_checkpointed_iteration.txt"

# Tiny: vocab 300 (student data) / 280 (the other tokenizer), both padded to 320 rows.
RECIPE = """\
model:
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  num_query_groups: 2
  ffn_hidden_size: 64
  make_vocab_size_divisible_by: 64
data:
  data_path: {data}
  tokenizer_model: {tok}
  seq_length: 32
  split: "90,10,0"
train:
  micro_batch_size: 2
  global_batch_size: 4
  train_iters: 1
  lr: 0.003
  min_lr: 0.0003
  lr_warmup_iters: 0
  eval_interval: 0
  eval_iters: 0
"""
TEACHER = ["kd.alpha=0.5", "teacher.load={trained}", "teacher.hidden_size=32", "teacher.num_query_groups=2",
           "teacher.ffn_hidden_size=64", "teacher.make_vocab_size_divisible_by=64"]
TRAIN = ["train", "--config", "{recipe}", "checkpoint.save={out}"]

# case -> (argv, substrings of the one error line, what it may not touch). {out} is the case's
# run directory (or preprocess's output directory): "fresh" = must not exist afterwards;
# "existing" = a copy of the trained run that must stay byte-identical. Three groups by what
# they need to exist: nothing but the tokenizer; the datasets; the trained run.
FIRST = {
    # --- the recipe and overrides (fail in load_config, before torch)
    "unknown_key": (TRAIN + ["model.hiden_size=64"], ["'model.hiden_size'", "did you mean 'model.hidden_size'"], "fresh"),
    "wrong_type": (TRAIN + ["train.micro_batch_size=two"], ["train.micro_batch_size", "expected an integer", "'two'"], "fresh"),
    "negative_size": (TRAIN + ["model.hidden_size=-32"], ["model.hidden_size", "expected a positive number", "-32"], "fresh"),
    "zero_size": (TRAIN + ["data.seq_length=0"], ["data.seq_length", "expected a positive number", "got 0"], "fresh"),
    "bad_split": (TRAIN + ["data.split=90,10"], ["data.split", "three non-negative weights", "'90,10'"], "fresh"),
    "unknown_lr_decay_style": (TRAIN + ["train.lr_decay_style=exponential"],
                               ["train.lr_decay_style", "cosine|linear|constant", "'exponential'"], "fresh"),
    "min_lr_above_lr": (TRAIN + ["train.min_lr=0.1"], ["train.min_lr=0.1", "train.lr=0.003"], "fresh"),
    "yaml_not_a_mapping": (["train", "--config", "{tmp}/list.yaml", "checkpoint.save={out}"],
                           ["--config {tmp}/list.yaml", "expected a mapping"], "fresh"),
    "yaml_invalid": (["train", "--config", "{tmp}/broken.yaml", "checkpoint.save={out}"],
                     ["--config {tmp}/broken.yaml", "not valid YAML"], "fresh"),
    "recipe_missing": (["train", "--config", "{tmp}/no_such.yaml", "checkpoint.save={out}"],
                       ["--config {tmp}/no_such.yaml", "file not found"], "fresh"),
    # --- preprocess
    "preprocess_empty_jsonl": (["preprocess", "--input", "{tmp}/empty.jsonl", "--tokenizer-model", "{tok}",
                                "--output-prefix", "{out}/data", "--no-progress"],
                               ["--input {tmp}/empty.jsonl", "no non-empty document"], "fresh"),
    "preprocess_garbage_jsonl": (["preprocess", "--input", "{tmp}/garbage.jsonl", "--tokenizer-model", "{tok}",
                                  "--output-prefix", "{out}/data", "--no-progress"],
                                 ["--input {tmp}/garbage.jsonl:2", "invalid JSON"], "fresh"),
}
SECOND = {
    # --- layout (checked before torch.distributed's model-parallel init; one process suffices)
    "tp_not_dividing_heads": (TRAIN + ["parallel.tensor_model_parallel_size=3"],
                              ["model.num_attention_heads=4", "parallel.tensor_model_parallel_size=3"], "fresh"),
    "pp_not_dividing_layers": (TRAIN + ["parallel.pipeline_model_parallel_size=3"],
                               ["model.num_layers=2", "pipeline_model_parallel_size(3)"], "fresh"),
    "micro_batch_not_dividing_global": (TRAIN + ["train.global_batch_size=5"],
                                        ["train.global_batch_size=5", "train.micro_batch_size(2)"], "fresh"),
    # --- tokenizer and data files
    "tokenizer_missing": (TRAIN + ["data.tokenizer_model={tmp}/no_such.model"],
                          ["data.tokenizer_model", "{tmp}/no_such.model", "file not found"], "fresh"),
    "tokenizer_not_a_tokenizer": (TRAIN + ["data.tokenizer_model={tmp}/garbage.model"],
                                  ["data.tokenizer_model", "{tmp}/garbage.model", "not a readable sentencepiece model"],
                                  "fresh"),
    "data_missing": (TRAIN + ["data.data_path={tmp}/no_such_prefix"],
                     ["data.data_path", "{tmp}/no_such_prefix.bin not found"], "fresh"),
    "bin_truncated": (TRAIN + ["data.data_path={tmp}/trunc/data"],
                      ["{tmp}/trunc/data.bin is {trunc_bin} bytes but {tmp}/trunc/data.idx promises {bin_size}",
                       "megatron-kd preprocess --input {tmp}/corpus.jsonl --tokenizer-model {tok} "
                       "--output-prefix {tmp}/trunc/data --overwrite"], "fresh"),
    "idx_half_written": (TRAIN + ["data.data_path={tmp}/half/data"],
                         ["{tmp}/half/data.idx is {half_idx} bytes but its header promises {idx_size}",
                          "megatron-kd preprocess"], "fresh"),
    "summary_json_cut_short": (TRAIN + ["data.data_path={tmp}/badsum/data"],
                               ["{tmp}/badsum/data.summary.json is not preprocess's JSON summary",
                                "--output-prefix {tmp}/badsum/data"], "fresh"),
    "data_from_another_tokenizer": (TRAIN + ["data.data_path={data2}"],
                                    ["data.tokenizer_model {tok}", "vocab_size=300", "vocab_size=280", "{data2}"],
                                    "fresh"),
    "seq_length_beyond_data": (TRAIN + ["data.seq_length=100000"],
                               ["data.seq_length=100000 needs at least 100001", "data.split="], "fresh"),
}
THIRD = {
    # --- checkpoints and teachers (read the trained run)
    "teacher_vocab_mismatch": (TRAIN + ["data.data_path={data2}", "data.tokenizer_model={tok2}"] + TEACHER,
                               ["vocab size 300", "{trained}/config.yaml", "{tok}",
                                "student's vocab size 280", "data.tokenizer_model {tok2}"], "fresh"),
    "teacher_missing": (TRAIN + TEACHER[:1] + ["teacher.load={tmp}/no_such_run"] + TEACHER[2:],
                        ["{tmp}/no_such_run", TRACKER], "fresh"),
    "checkpoint_of_another_shape": (TRAIN + ["model.hidden_size=64", "checkpoint.load={trained}"],
                                    ["checkpoint.load {trained}", "embedding.word_embeddings.weight",
                                     "(320, 32) in the checkpoint but (320, 64)"], "fresh"),
    "tracker_empty": (TRAIN + ["checkpoint.load={tmp}/tracker_empty"],
                      ["{tmp}/tracker_empty/checkpoints/" + TRACKER, "expected an iteration number, got ''"], "fresh"),
    "tracker_garbage": (TRAIN + ["checkpoint.load={tmp}/tracker_garbage"],
                        ["{tmp}/tracker_garbage/checkpoints/" + TRACKER, "got 'garbage'"], "fresh"),
    # --- an existing run (a copy of the trained one per case)
    "resume_with_changed_config": (TRAIN + ["model.hidden_size=64", "--resume"],
                                   ["checkpoint.save={out}", "--resume with a different config",
                                    "model.hidden_size: 32 -> 64"], "existing"),
    "resume_with_bad_tokenizer": (TRAIN + ["data.tokenizer_model={tmp}/garbage.model", "--resume"],
                                  ["data.tokenizer_model", "{tmp}/garbage.model"], "existing"),
    "existing_run_without_resume": (TRAIN, ["checkpoint.save={out}", "--resume", "--overwrite"], "existing"),
}
CASES = FIRST | SECOND | THIRD
assert len(CASES) >= 20, "issue 19 asks for at least 20 distinct bad inputs"

def _error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines()
            if line.strip() and not re.search(r"Warning\b|^\s*warnings\.warn\(", line)]


def _tree(root: Path, skip=()) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not str(p.relative_to(root)).startswith(tuple(skip))}


FORKSERVER = Path(__file__).with_name("cli_forkserver.py")


class _Server:
    """cli_forkserver.py: each job its own process, torch and megatron-core imported once."""

    def __init__(self, out: Path, cwd: Path):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "MEGATRON_KD_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                  "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
            env.pop(k, None)
        self.out, self.cwd, self.names = out, cwd, []
        out.mkdir()
        self.proc = subprocess.Popen([sys.executable, str(FORKSERVER), str(out)], cwd=mr.REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, jobs: dict) -> None:
        for name, argv in jobs.items():
            self.proc.stdin.write(json.dumps({"name": name, "argv": argv, "cwd": str(self.cwd)}) + "\n")
            self.names.append(name)
        self.proc.stdin.flush()

    def wait(self) -> None:
        self.proc.stdin.write("wait\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "done", "the fork server died"

    def check(self, *names) -> None:
        """The harness's own jobs (after wait) succeeded."""
        for n in names:
            rc = (self.out / f"{n}.rc").read_text()
            assert rc == "0", f"{n} exited {rc}:\n" + mr.tail((self.out / f"{n}.err").read_text())

    def close(self) -> dict:
        """{name: {rc, stdout, stderr}} of every job."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=600) == 0
        return {n: dict(rc=int((self.out / f"{n}.rc").read_text()), stdout=(self.out / f"{n}.out").read_text(),
                        stderr=(self.out / f"{n}.err").read_text()) for n in self.names}


def _inputs(tmp: Path) -> dict:
    """Corpus, tokenizers (sentencepiece, in-process: no torch), bad files, the recipe."""
    from megatron_kd.data.tokenizer import train_sentencepiece

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(120)]
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_sentencepiece(docs, 300, tmp / "tok" / "tok")
    tok2 = train_sentencepiece(docs, 280, tmp / "tok2" / "tok")
    (tmp / "garbage.model").write_text("not a sentencepiece model\n")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    (tmp / "broken.yaml").write_text("model: [num_layers: 2\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "garbage.jsonl").write_text('{"text": "fine"}\nthis is not json\n')
    data, data2 = tmp / "data" / "data", tmp / "data2" / "data"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(data=data, tok=tok)))
    return dict(tmp=tmp, tok=tok, tok2=tok2, data=data, data2=data2, recipe=recipe, trained=tmp / "trained")


def _damaged_copies(fill: dict) -> None:
    """<tmp>/trunc: the .bin cut to half (a copy cut short); <tmp>/half: the .idx cut to half (a
    writer killed half-way), preprocess's summary.json kept next to them; <tmp>/badsum: the
    summary.json cut short."""
    tmp, data = fill["tmp"], fill["data"]
    fill["bin_size"], fill["idx_size"] = os.path.getsize(f"{data}.bin"), os.path.getsize(f"{data}.idx")
    fill["trunc_bin"], fill["half_idx"] = fill["bin_size"] // 2, fill["idx_size"] // 2
    for name in ("trunc", "half", "badsum"):
        (tmp / name).mkdir()
        for ext in (".bin", ".idx", ".summary.json"):
            shutil.copy(f"{data}{ext}", tmp / name / f"data{ext}")
    os.truncate(tmp / "trunc" / "data.bin", fill["trunc_bin"])
    os.truncate(tmp / "half" / "data.idx", fill["half_idx"])
    (tmp / "badsum" / "data.summary.json").write_text('{"vocab_size": 30')  # cut short


def _copy_run(src: Path, dst: Path) -> None:
    """The trained run under another path, its config.yaml saying so (else --resume sees a change)."""
    shutil.copytree(src, dst)
    config = dst / "config.yaml"
    config.write_text(config.read_text().replace(str(src), str(dst)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    fill = _inputs(tmp)
    (tmp / "runs").mkdir()
    cwd = tmp / "cwd"  # nothing may be written next to the process either
    cwd.mkdir()
    trained = fill["trained"]
    skip = ("data", "trained", "results")  # written by the harness's own jobs, next to the cases
    before = _tree(tmp, skip)

    def argv(c):
        return [a.format(**fill, out=tmp / "runs" / c) for a in CASES[c][0]]

    server = _Server(tmp / "results", cwd)
    try:
        # 1: the datasets (with the CLI), next to the cases that need neither
        server.start({f"_{d.parent.name}": ["preprocess", "--input", str(tmp / "corpus.jsonl"), "--tokenizer-model",
                                            str(t), "--output-prefix", str(d), "--no-progress"]
                      for d, t in ((fill["data"], fill["tok"]), (fill["data2"], fill["tok2"]))})
        server.start({c: argv(c) for c in FIRST})
        server.wait()
        server.check("_data", "_data2")
        _damaged_copies(fill)
        before |= _tree(tmp, skip)
        read_before = {d: mr.snapshot(d) for d in (fill["data"].parent, fill["data2"].parent)}
        # 2: the run the checkpoint cases read, next to the cases that read the datasets
        server.start({"_train": TRAIN[:2] + [str(fill["recipe"]), f"checkpoint.save={trained}"]})
        server.start({c: argv(c) for c in SECOND})
        server.wait()
        server.check("_train")
        # 3: its damaged copies, one copy per case that must leave an existing run alone, those cases
        for name, text in (("tracker_empty", ""), ("tracker_garbage", "garbage\n")):
            shutil.copytree(trained, tmp / name)
            (tmp / name / "checkpoints" / TRACKER).write_text(text)
        snapshots = {}
        for c in THIRD:
            if CASES[c][2] == "existing":
                _copy_run(trained, tmp / "runs" / c)
                snapshots[c] = mr.snapshot(tmp / "runs" / c)
        before |= _tree(tmp, skip)
        read_before[trained] = mr.snapshot(trained)
        server.start({c: argv(c) for c in THIRD})
    finally:
        out = server.close()
    after = _tree(tmp, skip)
    for c, (_, needles, kind) in CASES.items():
        out[c]["needles"] = [n.format(**fill, out=tmp / "runs" / c) for n in needles]
        # what this case could have written: its own run dir, or anything outside runs/
        out[c]["new_paths"] = sorted(p for p in after - before
                                     if p.startswith(f"runs/{c}") or not p.startswith("runs/"))
        out[c]["run_dir"] = tmp / "runs" / c
        out[c]["kind"] = kind
        if kind == "existing":
            out[c]["unchanged"] = mr.snapshot(tmp / "runs" / c) == snapshots[c]
    # read by the cases, written by none (GPTDataset would put an index cache next to the data)
    out["_inputs_unchanged"] = all(mr.snapshot(d) == snap for d, snap in read_before.items())
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_refused_in_one_line(results, case):
    r = results[case]
    lines = _error_lines(r["stderr"])
    assert r["rc"] == 2, f"exit {r['rc']}\n" + "\n".join(lines[-40:])
    assert "Traceback" not in r["stderr"] and "Exception ignored" not in r["stderr"], r["stderr"][-3000:]
    assert len(lines) == 1, "\n".join(lines[-40:])
    prefix = "error: " if CASES[case][0][0] == "preprocess" else "megatron-kd train: error: "
    assert lines[0].startswith(prefix), lines[0]
    for needle in r["needles"]:
        assert needle in lines[0], (needle, lines[0])
    # nothing written, nothing already written touched
    assert r["new_paths"] == [], r["new_paths"]
    if r["kind"] == "fresh":
        assert not r["run_dir"].exists()
    else:
        assert r["unchanged"], "the existing run directory changed"
    assert results["_inputs_unchanged"], "a case changed the run or the dataset it only reads"
