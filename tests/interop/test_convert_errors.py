"""Bad input to `megatron-kd convert`: one line on stderr, exit 2, before any model is built,
and nothing already in the output directory is touched."""
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hf_fixtures import make_hf_model  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_model("llama", d)
    return d


def _copy(hf_dir, tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(hf_dir, d)
    return d


def _convert(capsys, *args):
    from megatron_kd.cli import main

    capsys.readouterr()  # drop what fixtures printed
    rc = main(["convert", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(rc, err):
    assert rc == 2, err
    assert err.startswith("megatron-kd convert: error: ") and "\n" not in err, err
    return err


def test_unsupported_architecture_lists_supported(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    err = _one_line(*_convert(capsys, "hf-to-mcore", d, tmp_path / "out"))
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Qwen3ForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_missing_shard(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    err = _one_line(*_convert(capsys, "hf-to-mcore", d, tmp_path / "out"))
    assert "model-00002-of-00002.safetensors" in err and "missing" in err


def test_shape_mismatch_names_the_tensor(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    err = _one_line(*_convert(capsys, "hf-to-mcore", d, tmp_path / "out"))
    assert "model.layers.0.mlp.gate_proj.weight" in err and "(96, 64)" in err and "(100, 64)" in err


def test_tp_must_divide_heads(hf_dir, tmp_path, capsys):
    err = _one_line(*_convert(capsys, "hf-to-mcore", hf_dir, tmp_path / "out",
                              "--tensor-model-parallel-size", "3"))
    assert "num_attention_heads=4" in err and "tensor_model_parallel_size=3" in err


def test_tp_must_divide_expert_ffn(tmp_path, capsys):
    d = tmp_path / "l4"
    make_hf_model("llama4", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 47  # routed/shared expert FFN: cannot be split over 2 TP ranks
    (d / "config.json").write_text(json.dumps(cfg))
    err = _one_line(*_convert(capsys, "hf-to-mcore", d, tmp_path / "out", "--tensor-model-parallel-size", "2"))
    assert "moe_ffn_hidden_size=47" in err and "--tensor-model-parallel-size=2" in err


def test_tokenizer_missing(hf_dir, tmp_path, capsys):
    d = _copy(hf_dir, tmp_path)
    (d / "tokenizer.json").unlink()
    err = _one_line(*_convert(capsys, "hf-to-mcore", d, tmp_path / "out"))
    assert "tokenizer.json" in err and "tokenizer.model" in err


def test_existing_output_is_left_alone(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _one_line(*_convert(capsys, "hf-to-mcore", hf_dir, out))
    assert "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
