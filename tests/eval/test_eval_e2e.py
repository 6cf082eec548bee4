"""End to end through ``megatron-kd eval``: a tiny model trained here with the project's own
``train()`` on single-needle NIAH documents (tests/eval/copy_task.py) must retrieve the key of
unseen prompts far above chance (1/16), the CLI writes results.json / summary.md / the heatmap /
the distance and perplexity plots, and bad input fails in one line before compute."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import copy_task
from megatron_kd import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multirank"))
from multirank_util import free_port, run as run_cmd  # noqa: E402  (torchrun launch helpers)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return copy_task.build(tmp_path_factory.mktemp("copy"), iters=copy_task.ITERS)


def _cli(capsys, *argv):
    rc = cli.main(["eval", *map(str, argv)])
    return rc, capsys.readouterr()


def test_trained_model_retrieves_and_cli_writes_outputs(run, capsys):
    length = copy_task.LENGTH
    rc, out = _cli(capsys, "--checkpoint", run, "--tasks", "niah_passkey,perplexity", "--lengths", length,
                   "--samples", 8, "--depths", 3, "--max-new-tokens", copy_task.NEW_TOKENS)
    assert rc == 0, out.err[-2000:]
    res = json.loads((run / "eval" / "results.json").read_text())
    score = res["summary"]["scores"]["niah_passkey"][str(length)]
    assert score >= 50.0, res["summary"]["scores"]  # chance: 100/16 = 6.25
    preds = [s for s in res["samples"] if s["task"] == "niah_passkey"]
    assert len(preds) == 24 and all(s["prompt_tokens"] + copy_task.NEW_TOKENS <= length for s in preds)
    assert all(0 < s["distance"] < length for s in preds)
    assert len(res["summary"]["niah_cells"]["niah_passkey"]) == 3
    for name in ("niah_passkey_heatmap.png", "needle_distance.png", "perplexity_by_position.png", "summary.md"):
        assert (run / "eval" / name).stat().st_size > 100, name
    assert "| niah_passkey |" in (run / "eval" / "summary.md").read_text()
    ppl = res["summary"]["perplexity"]
    assert len(ppl["per_position"]) == length and all(x > 0 for x in ppl["per_position"])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah,ruler:bogus"], "unknown task 'ruler:bogus'; expected a comma-separated list of niah"),
    (["--lengths", "4k"], "longer than the model's position limit 32"),
    (["--lengths", "12x"], "is not a token count"),
    (["--pp", "3"], "--pp 3: expected a divisor of the model's 2 layers"),
])
def test_bad_input_is_one_line(run, capsys, argv, message):
    args = {"--tasks": "niah", "--lengths": "32"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    before = sorted(p.name for p in run.rglob("*"))
    rc, out = _cli(capsys, "--checkpoint", run, *[x for kv in args.items() for x in kv])
    assert rc == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


def test_tokenizer_mismatch_is_one_line(run, capsys, tokenizer):
    rc, out = _cli(capsys, "--checkpoint", run, "--tasks", "niah", "--lengths", "32",
                   "--tokenizer", tokenizer.path)
    assert rc == 2 and "vocab size 2000" in out.err and "trained with" in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1


def test_pp2_eval_equals_one_rank(run, tmp_path, capsys):
    """``--pp 2`` (torchrun, one layer per stage): the same predictions and loss by position as
    one rank, through the CLI."""
    args = ["--checkpoint", run, "--tasks", "niah_passkey,perplexity", "--lengths", copy_task.LENGTH,
            "--samples", 2, "--depths", 2, "--max-new-tokens", copy_task.NEW_TOKENS]
    rc, out = _cli(capsys, *args, "--out-dir", tmp_path / "one")
    assert rc == 0, out.err[-2000:]
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
             "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_kd.cli", "eval",
             *map(str, args), "--pp", "2", "--out-dir", str(tmp_path / "pp2")])
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "pp2"))
    assert [s["pred"] for s in two["samples"]] == [s["pred"] for s in one["samples"]]
    assert len(one["samples"]) == 4
    a, b = one["summary"]["perplexity"]["per_position"], two["summary"]["perplexity"]["per_position"]
    assert len(a) == len(b) == copy_task.LENGTH
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(a)
