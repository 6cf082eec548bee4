"""Greedy decoding: KV cache == no cache == one prompt at a time (left padding and per-prompt
positions are invisible), and TP=2 == PP=2 == TP=1 on the same weights (real torchrun ranks)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multirank"))
from multirank_util import free_port, run  # noqa: E402  (torchrun launch helpers)

WORKER = Path(__file__).with_name("generate_worker.py")


def _result(proc) -> dict:
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_cache_equals_no_cache_and_tp2_equals_tp1(tmp_path):
    ckpt = tmp_path / "model"
    one = _result(run([sys.executable, str(WORKER), "save", str(ckpt)]))
    assert one["cache"] == one["nocache"] == one["cache_single"]
    assert len({tuple(x) for x in one["cache"]}) == len(one["cache"])  # prompts differ -> outputs differ
    assert all(len(x) == 12 for x in one["cache"])  # no stop ids: max_new_tokens each
    stopped = one["stopped"]
    assert stopped["stop"] == "stop_id" and stopped["ids"] == one["cache"][0][:3]
    two = _result(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                       str(WORKER), "load", str(ckpt)]))
    assert two["cache"] == two["nocache"] == one["cache"]


def test_pp2_equals_tp1(tmp_path):
    """Two pipeline stages (one layer each): activations through megatron's schedule at every
    step, each stage's own KV cache, the last stage's tokens broadcast to the first."""
    ckpt = tmp_path / "model"
    one = _result(run([sys.executable, str(WORKER), "save", str(ckpt)]))
    two = _result(run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                       str(WORKER), "load", str(ckpt), "pp"]))
    assert two["cache"] == two["nocache"] == two["cache_single"] == one["cache"]
    assert two["stopped"] == one["stopped"]
