"""End to end through ``megatron-kd eval``: a tiny model trained here with the project's own
``train()`` on RULER niah_single_1 documents (tests/eval/copy_task.py) must retrieve the 7-digit
value of unseen prompts far above chance (an exact 7-digit match by guessing: ~1e-7), the CLI
writes results.json / summary.md / the heatmap, and bad input fails in one line before compute."""
from __future__ import annotations

import json

import pytest

import copy_task
from megatron_kd import cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return copy_task.build(tmp_path_factory.mktemp("copy"), iters=copy_task.ITERS)


def _cli(capsys, *argv):
    rc = cli.main(["eval", *map(str, argv)])
    return rc, capsys.readouterr()


def test_trained_model_retrieves_and_cli_writes_outputs(run, capsys):
    length = copy_task.LENGTH
    rc, out = _cli(capsys, "--checkpoint", run, "--tasks", "ruler:niah_single_1,niah,perplexity",
                   "--lengths", length, "--samples", 12, "--max-new-tokens", copy_task.NEW_TOKENS,
                   "--depths", 2)
    assert rc == 0, out.err[-2000:]
    res = json.loads((run / "eval" / "results.json").read_text())
    scores = res["summary"]["scores"]
    # the model was trained on this task (other samples): it must retrieve well above chance
    assert scores["ruler:niah_single_1"][str(length)] >= 50.0, scores
    preds = [s for s in res["samples"] if s["task"] == "ruler:niah_single_1"]
    assert len(preds) == 12 and all(s["prompt_tokens"] + copy_task.NEW_TOKENS <= length for s in preds)
    assert all(s["distance"] and 0 < s["distance"] < length for s in preds)
    for name in ("niah_heatmap.png", "needle_distance.png", "perplexity_by_position.png", "summary.md"):
        assert (run / "eval" / name).stat().st_size > 100, name
    assert "| ruler:niah_single_1 |" in (run / "eval" / "summary.md").read_text()
    ppl = res["summary"]["perplexity"]
    assert len(ppl["per_position"]) == length and all(x > 0 for x in ppl["per_position"])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "niah,ruler:bogus"], "unknown task 'ruler:bogus'; expected a comma-separated list of niah"),
    (["--lengths", "4k"], "longer than the model's position limit 160"),
    (["--lengths", "12x"], "is not a token count"),
])
def test_bad_input_is_one_line(run, capsys, argv, message):
    args = {"--tasks": "niah", "--lengths": "128"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    before = sorted(p.name for p in run.rglob("*"))
    rc, out = _cli(capsys, "--checkpoint", run, *[x for kv in args.items() for x in kv])
    assert rc == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written


def test_tokenizer_mismatch_is_one_line(run, capsys, tokenizer):
    rc, out = _cli(capsys, "--checkpoint", run, "--tasks", "niah", "--lengths", "128",
                   "--tokenizer", tokenizer.path)
    assert rc == 2 and "vocab size 2000" in out.err and "vocab size 1000" in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1
