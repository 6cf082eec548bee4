"""`megatron-kd train --engine deepspeed` bad input: one line naming the flag and the fix, exit 2,
before torch.distributed or DeepSpeed start, nothing written. (The engine itself: one KD step of
SmolLM2-135M on 2 ranks under ZeRO-3 against the megatron-core path, tests/interop/test_smollm2.py.)"""
import json

import pytest
import yaml


@pytest.fixture()
def dirs(tmp_path):
    """A HF-looking student and teacher, and a megatron-core run directory (structure only: the
    engine refuses it by its layout before reading any tensor)."""
    for who in ("student", "teacher"):
        (tmp_path / who).mkdir()
        (tmp_path / who / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (tmp_path / who / "model.safetensors").write_bytes(b"")
    run = tmp_path / "teacher_mcore"
    (run / "checkpoints" / "iter_0000000").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("0")
    (run / "checkpoints" / "iter_0000000" / "common.pt").write_bytes(b"")
    recipe = {"data": {"data_path": str(tmp_path / "none"), "seq_length": 64},
              "train": {"micro_batch_size": 1, "global_batch_size": 2},
              "kd": {"alpha": 0.5}, "checkpoint": {"load": str(tmp_path / "student")},
              "teacher": {"load": str(tmp_path / "teacher")}}
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path


def _train(capsys, d, *overrides):
    from megatron_kd.cli import main

    capsys.readouterr()
    rc = main(["train", "--engine", "deepspeed", "--config", str(d / "hf.yaml"), f"checkpoint.save={d / 'out'}",
               *overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("megatron-kd train: error: ") and "\n" not in err, err
    assert not (d / "out").exists()  # nothing written
    return err


@pytest.mark.parametrize("key, sub", [("checkpoint.load", ""), ("teacher.load", "checkpoints"),
                                      ("teacher.load", "checkpoints/iter_0000000")])
def test_megatron_checkpoint_names_the_converter(capsys, dirs, key, sub):
    run = dirs / "teacher_mcore"
    err = _train(capsys, dirs, f"{key}={run / sub if sub else run}")
    assert f"{key}=" in err and "a megatron-core checkpoint; --engine deepspeed reads Hugging Face" in err
    assert f"`megatron-kd convert mcore-to-hf {run} {run}_hf` and set {key}={run}_hf" in err


@pytest.mark.parametrize("override, needle", [
    ("parallel.tensor_model_parallel_size=2", "parallel.tensor_model_parallel_size=2: --engine deepspeed runs "
                                              "data parallel only"),
    ("parallel.zero_stage=4", "parallel.zero_stage: expected 0, 1, 2 or 3, got 4"),
    ("kd.loss_impl=fused", "kd.loss_impl=fused: --engine deepspeed computes the exact loss"),
    ("checkpoint.load=/nonexistent/student", "checkpoint.load=/nonexistent/student: no config.json"),
])
def test_bad_layout_and_keys(capsys, dirs, override, needle):
    assert needle in _train(capsys, dirs, override)
