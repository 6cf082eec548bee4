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


def test_plan_counts_the_longred_teacher(capsys):
    """LongReD's frozen original model is a teacher: its parameters count, and its forward FLOPs
    scale with the short + s2l share of the stream ratio (4:3:1 -> 1/2)."""
    base = ["plan", "--vocab-size", "500", "--json", "--config", "examples/longred/tiny_ce.yaml"]
    assert main(base) == 0
    ce = json.loads(capsys.readouterr().out)
    assert main(base[:-1] + ["examples/longred/tiny.yaml"]) == 0
    lr = json.loads(capsys.readouterr().out)
    assert "teacher parameters" not in ce["bytes"] and lr["bytes"]["teacher parameters"] > 0
    t = lr["throughput"]
    assert ce["throughput"]["teacher fwd GFLOP/token"] == 0
    # same shape as the student: teacher fwd = half of (2N + attention) of the student's 6N + ...
    assert 0.5 * t["student fwd+bwd GFLOP/token"] / 3 * 0.9 < t["teacher fwd GFLOP/token"] < \
        0.5 * t["student fwd+bwd GFLOP/token"] / 3 * 1.1
