"""Max |logit difference| against transformers, per supported family and for SmolLM2, in one run:

    python benchmarks/hf_logit_parity.py [--tp 1] [--seq 40] [--skip-smollm2] [--families llama,qwen2]

Tiny random checkpoints of every family (tests/interop/hf_fixtures.py, written by transformers'
save_pretrained) and SmolLM2-135M (GGUF -> HF) are converted, loaded as KD teachers at the given
TP (torchrun ranks) and compared with transformers' fp32 logits on the same tokens (random
tokens for the tiny models, an essay snippet of 64 tokens for SmolLM2).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests" / "interop"
FAMILIES = ["llama", "llama_tied", "qwen2", "qwen3", "llama4"]


def _run(cmd, env):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=40)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated tiny families to compare (default: all of {','.join(FAMILIES)})")
    args = ap.parse_args()
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        ap.error(f"--families: unknown {','.join(unknown) or 'none given'}; "
                 f"expected some of {','.join(FAMILIES)}")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _run([sys.executable, str(TESTS / "convert_worker.py"), str(tmp),
              *[f"{f}:{args.tp}" for f in families]], env)
        cases = [{"name": f, "run": str(tmp / f"{f}_mcore"), "hf": str(tmp / f), "seq": args.seq}
                 for f in families]
        if not args.skip_smollm2:
            sys.path.insert(0, str(REPO))
            from tokenizers import Tokenizer

            from megatron_kd.data.corpora import iter_offline_corpus
            subprocess.run([sys.executable, "-c", "import sys; from megatron_kd.interop.gguf_to_hf import "
                            "write_smollm2_hf; write_smollm2_hf(sys.argv[1])", str(tmp / "smol")],
                           check=True, env=env, cwd=REPO, capture_output=True)
            subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "hf-to-mcore",
                            str(tmp / "smol"), str(tmp / "smol_mcore"), "--quiet"], check=True, env=env,
                           cwd=REPO, capture_output=True)
            text = next(iter_offline_corpus("paulgrahamessays"))
            ids = Tokenizer.from_file(str(tmp / "smol" / "tokenizer.json")).encode(text).ids[:64]
            cases.append({"name": "smollm2", "run": str(tmp / "smol_mcore"), "hf": str(tmp / "smol"),
                          "seq": 64, "tokens": ids})
        spec = tmp / "cases.json"
        spec.write_text(json.dumps(cases))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tp}",
               "--master-addr=127.0.0.1", "--master-port=29561", str(TESTS / "parity_worker.py"), str(spec)]
        results = _run(cmd, env)
    print(f"TP={args.tp}, fp32, CPU")
    print(f"{'model':<12}{'tokens':>8}{'max |logit|':>14}{'max |diff|':>14}{'argmax agree':>14}")
    for name, r in results.items():
        print(f"{name:<12}{r['seq']:>8}{r['max_abs_logit']:>14.3f}{r['max_abs_diff']:>14.2e}{r['argmax_agree']:>14.3f}")


if __name__ == "__main__":
    main()
