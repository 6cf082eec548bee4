"""A bf16 run without the distributed optimizer checkpoints and resumes on the CPU's local spec.

The local spec's torch norms used to be created in fp32 inside a bf16 model; megatron's bf16
optimizer maps only its bf16 groups into the sharded state, so the first save died with "Param id
... does not match any model sharded param" (models/norms.py now builds them in params_dtype)."""
from __future__ import annotations

import multirank_util as mr


def test_bf16_plain_optimizer_saves_and_resumes(tiny_recipe, tmp_path):
    run = tmp_path / "bf16"
    common = ["train.bf16=true", "checkpoint.save_interval=2", "train.eval_interval=2"]
    mr.train(tiny_recipe, run, 1, [*common, "train.train_iters=2"])
    assert (run / "checkpoints" / "iter_0000002").is_dir()
    p = mr.train(tiny_recipe, run, 1, [*common, "train.train_iters=4"], flags=["--resume"])
    assert "resumed from" in p.stdout and "at iteration 2" in p.stdout, mr.tail(p.stdout)
    assert [it for it, _ in mr.metrics(run)] == [1, 2, 3, 4]
