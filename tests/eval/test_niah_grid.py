"""NIAH grid: prompts fit each length, the needle sits at a sentence boundary near its depth, the
question + answer prefix close the prompt; depth spacings; the heatmap is written."""
from __future__ import annotations

import pytest

from megatron_kd.config import ConfigError
from megatron_kd.eval.niah import NiahBuilder, cell_scores, depth_percents, plot_heatmap


def test_depths():
    assert depth_percents(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
    sig = depth_percents(5, "sigmoid")
    assert sig[0] == 0.0 and sig[-1] == 100.0 and sig[2] == 50.0 and sig[1] < 25.0 and sig[3] > 75.0
    with pytest.raises(ConfigError, match="linear or sigmoid"):
        depth_percents(3, "log")


@pytest.mark.parametrize("preset", ["number", "passkey"])
def test_grid_prompts(tokenizer, preset):
    b = NiahBuilder(tokenizer, preset, max_new_tokens=8)
    lengths, depths = [128, 512], depth_percents(5)
    samples = b.grid(lengths, depths, 2)
    assert len(samples) == 2 * 5 * 2
    for s in samples:
        n = len(tokenizer.encode(s.input))
        assert n + 8 <= s.length and len(tokenizer.encode(s.input + " " + s.outputs[0])) <= s.length
        assert n > s.length - 8 - 30  # haystack filled to within a few words of the budget
        c = s.needle_chars[0]
        needle = b.p.needle.format(value=s.outputs[0])
        assert s.input[c:c + len(needle)] == needle and s.input.count(s.outputs[0]) == 1
        assert s.input.endswith(f"{b.p.question} {b.p.answer_prefix}")
        before = s.input[:c].rstrip()
        assert before == "" or before[-1] in ".!?" or s.depth == 100  # a sentence boundary
        if s.length == 512 and 0 < s.depth < 100:
            assert abs(s.meta["actual_depth"] - s.depth) < 25
    assert [s.meta["actual_depth"] for s in samples if s.depth == 0] == [0.0] * 4
    with pytest.raises(ConfigError, match="too short for niah"):
        b.sample(12, 50, 0)


def test_heatmap(tmp_path):
    records = [{"length": L, "depth": d, "score": 100.0 * (d < 50)} for L in (128, 256) for d in (0, 50, 100)]
    assert cell_scores(records)[(128, 0)] == 1.0 and cell_scores(records)[(256, 100)] == 0.0
    png = plot_heatmap(records, tmp_path / "h.png", "t")
    assert png is not None and png.stat().st_size > 1000
