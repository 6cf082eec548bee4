"""End to end through ``megatron-kd eval``: a tiny model trained here with the project's own
``train()`` on single-needle NIAH documents (tests/eval/copy_task.py) must retrieve the key of
unseen prompts far above chance (1/16), the CLI writes results.json / summary.md / the heatmap /
the distance and perplexity plots, and bad input fails in one line before compute."""
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
