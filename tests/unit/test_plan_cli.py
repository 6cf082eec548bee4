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


def test_plan_doc_length_defaults_to_the_data_summary(tmp_path, capsys):
    """The attention FLOPs are priced for the recipe's documents (preprocess's summary), not for a
    window-long document: mean 99 tokens + EOS -> 100 tokens, (100 + 1) / 2 keys per query."""
    (tmp_path / "docs.summary.json").write_text(json.dumps({"doc_tokens": {"mean": 99.0}}))
    base = ["plan", "--vocab-size", "500", "--json", "data.seq_length=1024"]
    assert main(base) == 0
    window = json.loads(capsys.readouterr().out)
    assert main(base + [f"data.data_path={tmp_path}/docs"]) == 0
    docs = json.loads(capsys.readouterr().out)
    assert any("documents of 1024 tokens (seq_length: no data summary" in n for n in window["notes"])
    assert any(f"documents of 100 tokens (mean of {tmp_path}/docs.summary.json" in n and "50 keys/query" in n
               for n in docs["notes"]), docs["notes"]
    assert docs["throughput"]["student fwd+bwd GFLOP/token"] < window["throughput"]["student fwd+bwd GFLOP/token"]
    assert main(base + [f"data.data_path={tmp_path}/docs", "--doc-length", "1024"]) == 0
    assert json.loads(capsys.readouterr().out)["throughput"] == window["throughput"]  # the flag wins
    (tmp_path / "bad.summary.json").write_text("{}")
    assert main(base + [f"data.data_path={tmp_path}/bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.summary.json: no doc_tokens.mean" in err


def test_plan_places_groups_on_nodes_and_refuses_tp_across_nodes(capsys):
    base = ["plan", "--vocab-size", "500", "--json", "model.num_attention_heads=8", "model.num_query_groups=8"]
    # 4 nodes x 2 ranks, TP=2 CP=2 DP=2: TP in a node, CP and DP across nodes
    assert main(base + ["parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2",
                        "data.seq_length=128", "--nodes", "4", "--gpus-per-node", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"]["world"] == 8 and plan["layout"]["nodes"] == 4
    assert {k: (g["size"], g["nodes"], g["link"]) for k, g in plan["placement"].items()} == {
        "TP": (2, 1, "NVLink (one node)"), "CP": (2, 2, "network"), "DP": (2, 2, "network"),
        "PP": (1, 1, "none (size 1)")}
    tp4 = base + ["parallel.tensor_model_parallel_size=4", "--nodes", "2", "--gpus-per-node", "2"]
    assert main(tp4) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "each TP group spans 2 nodes" in err and "--allow-tp-across-nodes" in err
    assert main(tp4 + ["--allow-tp-across-nodes"]) == 0
    assert any("TP groups span 2 nodes" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_plan_nodes_that_do_not_fit_the_layout(capsys):
    assert main(["plan", "--vocab-size", "500", "parallel.tensor_model_parallel_size=2", "--nodes", "3",
                 "--gpus-per-node", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nodes 3 x --gpus-per-node 1 = world size 3" in err
    assert "not divisible by tensor_model_parallel_size(2)" in err
    assert main(["plan", "--vocab-size", "500", "--nodes", "2", "--world", "8"]) == 2
    assert "--world 8 but --nodes 2 x --gpus-per-node 8 = 16" in capsys.readouterr().err
