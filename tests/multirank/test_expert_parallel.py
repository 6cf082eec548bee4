"""Expert parallelism with real processes (torchrun, gloo, CPU, fp32): a Llama-4-style MoE student
(4 routed experts + a shared expert, top-1 sigmoid routing, megatron-core's allgather dispatcher)
trained at EP=2 follows the EP=1 run on the same data (both DP=2): loss, grad norm and valid loss
per step, and every weight after the last step (dist_checkpointing reassembles the experts).
The paper's case, a dense student distilled from a frozen MoE teacher split over EP=2, follows
EP=1 too, and so does the MoE student at TP=2 with sequence parallelism (each expert's FFN
split over TP; measured: losses identical, grad norm within 1.0e-7). Teacher-side logits against
transformers at EP=2: tests/interop/test_hf_parity.py.

Both runs fine-tune from one checkpoint: megatron seeds expert initialisation per EP rank.
"""
from __future__ import annotations

import pytest

import multirank_util as mr

STEPS = 3
MOE = ["model.num_moe_experts=4", "model.moe_layer_freq=1", "model.moe_ffn_hidden_size=64",
       "model.moe_shared_expert_intermediate_size=64", "model.moe_router_topk=1",
       "model.moe_router_score_function=sigmoid"]
# measured: loss identical, grad norm within 5e-8 relative (expert grads reduced over other groups)
RTOL = 1e-5


@pytest.fixture(scope="module")
def ep_runs(tiny_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    out = {"init": root / "init"}
    mr.train(tiny_recipe, out["init"], 1, MOE + ["train.train_iters=1"])
    common = MOE + [f"checkpoint.load={out['init']}", "checkpoint.finetune=true", f"train.train_iters={STEPS}"]
    for name, extra in (("ep1", []), ("ep2", ["parallel.expert_model_parallel_size=2"]),
                        # experts split over TP (megatron trains MoE under TP only with SP)
                        ("tp2_sp", ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])):
        out[name] = root / name
        out[f"{name}_stdout"] = mr.train(tiny_recipe, out[name], 2, common + extra).stdout
    return out


def _expert_params(stdout: str, which: str = "trains") -> int:
    """Routed-expert parameters on rank 0 from the startup line: "trains" or "frozen teacher"."""
    line = next(l for l in stdout.splitlines() if l.startswith("layout: "))
    part = line.split(which, 1)[1]
    return int(part.split("(", 1)[1].split(" in MoE experts")[0].replace(",", ""))


def test_ep2_really_splits_the_experts(ep_runs):
    """Rank 0 holds half of the routed experts' parameters at EP=2 (the comparison below would
    also pass if EP were silently ignored)."""
    one, two = _expert_params(ep_runs["ep1_stdout"]), _expert_params(ep_runs["ep2_stdout"])
    assert one > 0 and two * 2 == one, (one, two)
    assert "(EP 2)" in ep_runs["ep2_stdout"]


@pytest.mark.parametrize("name", ["ep2", "tp2_sp"])
@pytest.mark.parametrize("split, key", [("train", "lm loss"), ("train", "grad_norm"), ("valid", "lm loss")])
def test_ep2_curve_matches_ep1(ep_runs, name, split, key):
    ref, got = dict(mr.metrics(ep_runs["ep1"], split, key)), dict(mr.metrics(ep_runs[name], split, key))
    assert sorted(got) == sorted(ref) and ref, (split, key)
    for it in ref:
        assert abs(got[it] - ref[it]) <= RTOL * abs(ref[it]), (split, key, it, got[it], ref[it])


def test_ep2_weights_match_ep1(ep_runs, tmp_path):
    a, b = (mr.checkpoint_weights(ep_runs[n], STEPS, tmp_path) for n in ("ep2", "ep1"))
    assert sorted(a) == sorted(b)
    # the routed experts, stacked [layers, experts, out, in] (both EP ranks' halves reassembled)
    experts = [k for k in a if "experts" in k and "shared" not in k]
    assert experts and all(a[k].shape[:2] == (4, 4) for k in experts), {k: a[k].shape for k in experts}
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert (a[k].float() - b[k].float()).abs().max().item() < 1e-6, k


def test_ep_layout_refused_before_start(tiny_recipe, tmp_path):
    """3 experts cannot be split over EP=2: each rank exits 2 with one line (torchrun then exits
    1), before a run directory exists."""
    run = tmp_path / "bad"
    p = mr.run(mr.train_cmd(tiny_recipe, run, 2, [*MOE[1:], "model.num_moe_experts=3",
                                                  "parallel.expert_model_parallel_size=2"], ("--overwrite",)),
               expect_rc=None)
    assert p.returncode != 0
    assert "error: model.num_moe_experts=3 is not divisible by parallel.expert_model_parallel_size=2" in p.stderr
    assert not run.exists()


TEACHER = ["teacher.num_layers=4", "teacher.hidden_size=64", "teacher.num_attention_heads=4",
           "teacher.num_query_groups=2", "teacher.ffn_hidden_size=128", "teacher.make_vocab_size_divisible_by=128",
           *[m.replace("model.", "teacher.") for m in MOE]]


@pytest.fixture(scope="module")
def kd_runs(ep_runs, tiny_recipe, tmp_path_factory):
    """A dense student, KD (alpha 0.5, T 2) from the trained MoE student of ep_runs as teacher."""
    root = tmp_path_factory.mktemp("ep_kd")
    common = TEACHER + [f"teacher.load={ep_runs['ep1']}", "kd.alpha=0.5", "kd.temperature=2.0",
                        f"train.train_iters={STEPS}"]
    out = {}
    for name, ep in (("kd_ep1", 1), ("kd_ep2", 2)):
        out[name] = root / name
        out[f"{name}_stdout"] = mr.train(tiny_recipe, out[name], 2,
                                         common + [f"parallel.expert_model_parallel_size={ep}"]).stdout
    return out


@pytest.mark.parametrize("key", ["loss", "kd loss", "grad_norm"])
def test_kd_from_moe_teacher_at_ep2_matches_ep1(kd_runs, key):
    ref, got = dict(mr.metrics(kd_runs["kd_ep1"], "train", key)), dict(mr.metrics(kd_runs["kd_ep2"], "train", key))
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    if key == "kd loss":
        assert min(ref.values()) > 1e-4  # the teacher is not the student: the KD term is not zero
    for it in ref:
        assert abs(got[it] - ref[it]) <= RTOL * abs(ref[it]), (key, it, got[it], ref[it])
    one = _expert_params(kd_runs["kd_ep1_stdout"], "frozen teacher")
    two = _expert_params(kd_runs["kd_ep2_stdout"], "frozen teacher")
    assert one > 0 and two * 2 == one, (one, two)  # the teacher's experts really are split
