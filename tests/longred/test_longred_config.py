"""LongReD bad input: one-line errors naming the key, before anything is written."""
import sys
from pathlib import Path

import pytest

from megatron_kd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "longred" / "tiny.yaml")
sys.path.insert(0, str(ROOT / "tests" / "multirank"))
import multirank_util as mr  # noqa: E402
sys.path.insert(0, str(Path(__file__).parent))
from longred_util import data_overrides  # noqa: E402


@pytest.fixture
def fake_ckpt(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    # enough for resolve_load_dir (megatron's three files, readable): the checks need no weights
    (d / "metadata.json").write_text("{}")
    (d / ".metadata").write_bytes(b"")
    import torch
    torch.save({}, d / "common.pt")
    return d


def _check(prefix, ckpt, *overrides, world=1):
    from megatron_kd.longred.trainer import check_longred_config

    cfg = load_config(TINY, data_overrides(prefix) + [f"teacher.load={ckpt}", f"checkpoint.load={ckpt}",
                                                      *overrides])
    return check_longred_config(cfg, world)


@pytest.mark.parametrize("override, needle", [
    ("longred.alpha_short=-1", "longred.alpha_short: expected >= 0"),
    ("longred.alpha_s2l=-0.5", "longred.alpha_s2l: expected >= 0"),
    ("longred.target_length=64", "longred.target_length=64 must be larger"),
    ("longred.middle_placement=gauss", "longred.middle_placement"),
    ("longred.stream_ratio=4,3", "longred.stream_ratio"),
    ("longred.selected_layers=three", "longred.selected_layers"),
    ("longred.schedule=[long,medium]", "longred.schedule"),
])
def test_config_section_checks(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(TINY, [override])


def test_valid_setup_counts(longred_data, fake_ckpt):
    assert _check(longred_data, fake_ckpt) == {"long": 4, "short": 3, "s2l": 1}


@pytest.mark.parametrize("overrides, needle", [
    (["data.seq_length=64"], "longred.target_length=64 (default data.seq_length) must be larger"),
    (["longred.selected_layers=[2,5]"], "layer 5 is out of range 1..4"),
    (["longred.selected_layers=[0]"], "layer 0 is out of range"),
    (["longred.num_selected_layers=9"], "longred.num_selected_layers=9 exceeds"),
    (["longred.short_data_path=null"], "longred.short_data_path: required"),
    (["longred.s2l_data_path=null"], "longred.s2l_data_path: required"),
    (["longred.short_seq_length=48"], "longred.short_seq_length=48 must divide data.seq_length=128"),
    (["train.global_batch_size=4"], "not a multiple of 8"),
    (["longred.schedule=[long,short]"], "expected one per micro-batch of a step: 8"),
    (["kd.alpha=0.5"], "kd.alpha=0.5"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["teacher.num_layers=2"], "same layers"),
    (["longred.s2l_head_length=40", "longred.s2l_tail_length=30"], "leave no middle"),
])
def test_setup_checks(longred_data, fake_ckpt, overrides, needle):
    from megatron_kd.data import DataError

    with pytest.raises((ConfigError, DataError)) as e:
        _check(longred_data, fake_ckpt, *overrides)
    assert needle in str(e.value), str(e.value)


def test_stream_too_short(longred_data, fake_ckpt, tmp_path):
    """A short-stream corpus smaller than one sample: the error names the stream's key."""
    from megatron_kd.data import DataError, preprocess, write_jsonl

    write_jsonl(["tiny document"] * 3, tmp_path / "small.jsonl")
    preprocess([str(tmp_path / "small.jsonl")], str(tmp_path / "small"),
               tokenizer_model=f"{longred_data}.tokenizer.model", workers=1, progress=False)
    with pytest.raises(DataError, match=r"longred.short_data_path: .*needs at least 33"):
        _check(longred_data, fake_ckpt, f"longred.short_data_path={tmp_path / 'small'}")


def test_missing_teacher(longred_data, fake_ckpt):
    with pytest.raises(ConfigError, match="teacher.load"):
        _check(longred_data, fake_ckpt, "teacher.load=null")


def test_cli_refuses_before_writing(longred_data, fake_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_kd.cli", "train", "--config", TINY, f"checkpoint.save={run_dir}",
           *data_overrides(longred_data), f"teacher.load={fake_ckpt}", f"checkpoint.load={fake_ckpt}",
           "longred.selected_layers=[7]"]
    p = mr.run(cmd, expect_rc=2)
    assert "longred.selected_layers: layer 7 is out of range 1..4" in p.stderr
    assert not run_dir.exists()
