"""`megatron-kd plan` as a command: prints the plan, JSON on request; bad input is one line and
exit 2 (the arithmetic itself is checked against built models in tests/multirank/test_plan.py)."""
from __future__ import annotations

import json

from megatron_kd.cli import main


def test_plan_prints_table_and_json(capsys):
    args = ["plan", "--vocab-size", "500", "--world", "4", "parallel.tensor_model_parallel_size=2",
            "parallel.context_parallel_size=2", "model.num_query_groups=2", "data.seq_length=128"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "TP 2 x PP 1 x CP 2 x DP 1" in out and "tokens/s" in out and "optimizer (plain)" in out
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["cp"] == 2 and plan["tokens_per_rank"] == 2 * 136 // 2  # capacity 136
    assert plan["bytes"]["total"] > plan["bytes"]["parameters"] > 0


def test_plan_bad_input_is_one_line(capsys):
    assert main(["plan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocabulary size" in err
    assert main(["plan", "--vocab-size", "500", "--world", "3", "parallel.tensor_model_parallel_size=2"]) == 2
    assert "world size 3" in capsys.readouterr().err
    assert main(["plan", "--config", "/nonexistent.yaml"]) == 2
    assert "/nonexistent.yaml" in capsys.readouterr().err
