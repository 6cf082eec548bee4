"""Resharding is lossless: TP=2 -> TP=1 x DP=2 -> TP=2 leaves every parameter and every piece of
optimizer state bitwise equal (issue 19, item 5).

A TP=2 run (bf16, distributed optimizer) trains 3 steps, so Adam's moments are non-zero and the
fp32 main parameters differ from the bf16 weights. Its checkpoint is loaded at TP=1 x DP=2, where
the distributed optimizer shards the state over the two DP ranks instead of the TP split, and
saved again without a step (worker.py's MKD_TEST_SAVE_AT_START with train_iters = the loaded
iteration); that checkpoint is loaded back at TP=2 and saved once more. The three checkpoints are
compared as global tensors (dcp_to_torch_save): weights, fp32 main params, exp_avg, exp_avg_sq,
and the common state (Adam's step, iteration, consumed samples, scheduler). Only the per-rank RNG
state may differ: it is restored on an unchanged layout only (checkpointing.py).
"""
from __future__ import annotations

import torch

import multirank_util as mr

STEPS = 3
COMMON = ["train.eval_iters=0", "train.bf16=true", "parallel.use_distributed_optimizer=true"]
TP2 = ["parallel.tensor_model_parallel_size=2"]


def _tensors(run_dir, tmp) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run_dir.name}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"iter_{STEPS:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _common(run_dir) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(run_dir / "checkpoints" / f"iter_{STEPS:07d}"))


def test_tp2_dp2_tp2_round_trip_is_bitwise(tiny_recipe, tmp_path):
    runs = {name: tmp_path / name for name in ("tp2", "dp2", "back")}
    mr.train(tiny_recipe, runs["tp2"], 2, [*COMMON, *TP2, f"train.train_iters={STEPS}"])
    env = mr.child_env(MKD_TEST_SAVE_AT_START=1)
    for src, dst, layout in (("tp2", "dp2", []), ("dp2", "back", TP2)):
        p = mr.train(tiny_recipe, runs[dst], 2,
                     [*COMMON, *layout, f"train.train_iters={STEPS}", f"checkpoint.load={runs[src]}"], env=env)
        assert "loaded checkpoint from" in p.stdout, mr.tail(p.stdout)
        assert p.stdout.count(f"saved checkpoint at iteration {STEPS}") == 1, mr.tail(p.stdout)
        assert "[train] iter" not in p.stdout, "a step ran: the comparison would not be of a pure reshard"
    layouts = {n: _common(r)["layout"] for n, r in runs.items()}
    assert layouts["dp2"]["tensor_model_parallel_size"] == 1
    assert layouts["tp2"] == layouts["back"] and layouts["tp2"]["tensor_model_parallel_size"] == 2

    ref = _tensors(runs["tp2"], tmp_path)
    kinds = {k.split(".")[2] for k in ref if k.startswith("optimizer.state.")}
    assert kinds == {"param", "exp_avg", "exp_avg_sq"}, kinds
    emb = "embedding.word_embeddings.weight"
    # not a comparison of zeros or of copies: moments are non-zero, main params are fp32 and
    # differ from the bf16 weights by more than rounding would leave after 3 steps
    assert ref[f"optimizer.state.exp_avg.{emb}"].abs().max() > 0
    assert ref[emb].dtype == torch.bfloat16 and ref[f"optimizer.state.param.{emb}"].dtype == torch.float32
    assert not torch.equal(ref[emb].float(), ref[f"optimizer.state.param.{emb}"])
    for name in ("dp2", "back"):
        got = _tensors(runs[name], tmp_path)
        assert sorted(got) == sorted(ref), name
        differ = [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
        assert differ == [], f"{name}: not bitwise equal to the TP=2 original: {differ}"

    a = _common(runs["tp2"])
    for name in ("dp2", "back"):
        b = _common(runs[name])
        for key in ("iteration", "consumed_samples", "scheduler"):
            assert b[key] == a[key], (name, key)
        # the distributed optimizer keeps Adam's step (and lr, betas, ...) in its param groups
        strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]  # noqa: E731
        ga, gb = strip(a["optimizer"]["optimizer"]["param_groups"]), strip(b["optimizer"]["optimizer"]["param_groups"])
        assert gb == ga and {g["step"] for g in ga} == {STEPS}, name
