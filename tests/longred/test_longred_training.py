"""LongReD training with real processes: 1 rank vs TP=2, PP=2 and CP=2 (torchrun + gloo), the objective's
arithmetic, the per-stream reports, and a student-only checkpoint.

The tiny original model (examples/longred/tiny_original.yaml, 64 tokens, theta 10k) is extended
to 128 tokens / theta 40k with examples/longred/tiny.yaml: 8 micro-batches per step (4 long, 3
short, 1 s2l), 2 layers picked by attention KL at setup. Under PP=2 the selected layers sit on
both stages (the first stage's loss is attached to its output), so the curves only match if
every stage's loss reaches the gradients and the reports exactly once.
"""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "multirank"))
import multirank_util as mr  # noqa: E402
sys.path.insert(0, str(Path(__file__).parent))
from longred_util import data_overrides  # noqa: E402

EX = ROOT / "examples" / "longred"
STEPS = 4
KEYS = ["loss", "long lm loss", "short loss", "s2l loss", "s2l cos-loss layer 4", "short cos-loss layer 4"]
# fp32; a stage's loss counted twice or lost, or a wrong TP reduction, moves these by > 1e-3
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(longred_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("longred")
    out = {"orig": root / "orig"}
    mr.train(EX / "tiny_original.yaml", out["orig"], 1, data_overrides(longred_data)[:2] + ["train.train_iters=4"])
    common = data_overrides(longred_data) + [f"checkpoint.load={out['orig']}", f"teacher.load={out['orig']}",
                                             f"train.train_iters={STEPS}", "train.lr=0.003"]
    out["stdout"] = {}
    for name, nproc, extra in (("tp1", 1, []), ("pp2", 2, ["parallel.pipeline_model_parallel_size=2"]),
                               ("tp2", 2, ["parallel.tensor_model_parallel_size=2"]),
                               ("cp2", 2, ["parallel.context_parallel_size=2"])):
        out[name] = root / name
        out["stdout"][name] = mr.train(EX / "tiny.yaml", out[name], nproc, common + extra).stdout
    # stop after 2 steps, then --resume: every stream continues where it stopped
    out["resumed"] = root / "resumed"
    first = mr.train(EX / "tiny.yaml", out["resumed"], 1, common + ["train.exit_interval=2"]).stdout
    second = mr.train(EX / "tiny.yaml", out["resumed"], 1, common, flags=("--resume",)).stdout
    out["stdout"]["resumed"] = (first, second)
    return out


def _rows(run_dir, split="train"):
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.mark.parametrize("name", ["pp2", "tp2", "cp2"])
def test_two_ranks_match_one(runs, name):
    """cp2: each rank holds half of every window (teacher positions travel with their tokens, the
    ring attention masks by document); losses are shares of the window's mean counted once."""
    ref, got = _rows(runs["tp1"]), _rows(runs[name])
    assert [r["iteration"] for r in got] == [r["iteration"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(got, ref):
        for key in KEYS + [k for k in b if k.startswith("short cos-loss layer")]:
            assert math.isclose(a[key], b[key], rel_tol=RTOL, abs_tol=1e-9), (name, key, a[key], b[key])
    vref, vgot = _rows(runs["tp1"], "valid"), _rows(runs[name], "valid")
    assert len(vgot) == len(vref) == 2
    for a, b in zip(vgot, vref):
        assert math.isclose(a["loss"], b["loss"], rel_tol=RTOL)


def _selection(stdout):
    return [l for l in stdout.splitlines() if l.startswith("longred: selected layers")]


def test_same_selection_and_schedule(runs):
    sel = {n: _selection(s) for n, s in runs["stdout"].items() if n != "resumed"}
    assert sel["tp1"] and sel["tp1"] == sel["pp2"] == sel["tp2"] == sel["cp2"], sel
    assert "longred: per step 8 micro-batches of 128 tokens: long 4, short 3, s2l 1" in runs["stdout"]["tp1"]


@pytest.mark.parametrize("name", ["pp2", "tp2", "cp2"])
def test_attention_kl_table_matches_one_rank(runs, name):
    """The per-layer attention KL behind the selection (TP: heads split; CP: queries split, keys
    gathered; PP: layers split) equals one rank's; fp32 noise on KLs of ~1e-5 is ~1e-4 relative."""
    ref = json.loads((runs["tp1"] / "longred_selection.json").read_text())
    got = json.loads((runs[name] / "longred_selection.json").read_text())
    assert got["selected_layers"] == ref["selected_layers"]
    assert ref["attention_kl"].keys() == got["attention_kl"].keys() and len(ref["attention_kl"]) == 4
    for layer, kl in ref["attention_kl"].items():
        assert kl > 0 and math.isclose(got["attention_kl"][layer], kl, rel_tol=1e-3), (name, layer)


def test_objective_arithmetic(runs):
    """loss = (sum_long l + 5 sum_short l + 10 sum_s2l l) / 8 micro-batches; short = sum of its layers."""
    line = _selection(runs["stdout"]["tp1"])[0]
    selected = set(json.loads(line.split("selected layers ")[1].split("]")[0] + "]")) | {4}
    for r in _rows(runs["tp1"]):
        expected = (4 * r["long lm loss"] + 3 * 5.0 * r["short loss"] + 1 * 10.0 * r["s2l loss"]) / 8
        assert math.isclose(r["loss"], expected, rel_tol=1e-6), r
        layers = [v for k, v in r.items() if k.startswith("short cos-loss layer")]
        assert len(layers) == len(selected)  # the 2 picked by attention KL + the final output
        assert math.isclose(r["short loss"], sum(layers), rel_tol=1e-6)
        assert r["s2l loss"] == r["s2l cos-loss layer 4"]
    # the distillation terms are live: the student drifts from the teacher as it trains
    rows = _rows(runs["tp1"])
    assert rows[-1]["short loss"] > 1e-6 and rows[-1]["s2l loss"] > 1e-6


def test_checkpoint_is_student_only(runs):
    from megatron.core import dist_checkpointing

    from megatron_kd.training.checkpointing import resolve_load_dir

    def keys(run):
        meta = dist_checkpointing.load_tensors_metadata(str(resolve_load_dir(run)))
        return {k: tuple(v.global_shape) for k, v in meta.items() if not k.startswith("optimizer.")}

    assert keys(runs["tp1"]) == keys(runs["orig"])


def test_drift_command(runs, tmp_path):
    """`megatron-kd drift` between the original and the LongReD student: per-layer table, JSON, PNG."""
    out = tmp_path / "drift"
    mr.run([sys.executable, "-m", "megatron_kd.cli", "drift", "--before", str(runs["orig"]),
            "--after", str(runs["tp1"]), "--windows", "2", "--out", str(out)])
    result = json.loads((out / "drift.json").read_text())
    assert result["before_rotary_base"] == 10000 and result["after_rotary_base"] == 40000
    layers = result["layers"]
    assert sorted(layers) == ["1", "2", "3", "4"]
    for row in layers.values():  # trained a few steps away: close to the original, not identical
        assert 0.5 < row["hidden_cos"] < 1.0 and row["attention_kl"] > 0
    assert (out / "drift.png").stat().st_size > 1000


def test_drift_refuses_non_run(tmp_path):
    from megatron_kd.longred.drift import run_config_of

    with pytest.raises(Exception, match="no config.yaml"):
        run_config_of(tmp_path)


def test_resume_continues_streams_and_selection(runs):
    """Steps 3-4 after a stop at 2 equal the uninterrupted run; the selection is reused, not redone
    (re-measuring on the trained student would pick other layers)."""
    first, second = runs["stdout"]["resumed"]
    assert _selection(first) == _selection(runs["stdout"]["tp1"])
    picked = _selection(first)[0].split(" (")[0]
    assert [l.split(" (")[0] for l in _selection(second)] == [picked] and "(from " in _selection(second)[0]
    ref = {r["iteration"]: r for r in _rows(runs["tp1"])}
    got = _rows(runs["resumed"])
    assert [r["iteration"] for r in got] == list(range(1, STEPS + 1))
    for r in got:
        for key in KEYS:
            assert math.isclose(r[key], ref[r["iteration"]][key], rel_tol=1e-6, abs_tol=1e-12), (r, key)
