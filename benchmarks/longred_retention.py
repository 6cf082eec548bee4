"""LongReD vs CE-only context extension at equal steps: short-text retention, measured in one run.

The original model is a `megatron-kd demo` teacher stage (RoPE theta 500k, trained on passkey
documents of exactly L tokens with an LM term; `--original <demo>/teacher/len00LL`). Both
students start from its weights with `--rotary-base` and train `--steps` steps on windows of
T = `--factor` x L tokens of the demo's packed paragraph corpus (data/phase1):

* CE only: every micro-batch a long window (examples/longred/tiny_ce.yaml's recipe shape);
* LongReD: 4:3:1 long / short (L/2-token samples of data/phase1) / s2l (the teacher's own
  L-token passkey documents at skipped positions simulating T), alpha 5 / 10, layers by attention KL.

Then, each model rebuilt in this process (positions 0..s-1, unpacked):
held-out short-text LM loss at L tokens (retention = ppl_original / ppl_model), passkey exact
match at L (a short-text task the original solves) and at T (distances past L), and held-out LM
loss at T (the project's teacher-forced probe, megatron_kd/eval/passkey.py).

Then the project's evaluation (`megatron-kd eval`'s code, megatron_kd/eval/runner.py, in this
process, as the demo calls it) on each of the three models: the generation-based NIAH grid with
the demo's passkey needle (`niah_passkey`, 3 depths, `--eval-samples` per cell) at L and T, and
RULER `niah_single_1` at T when T fits that task's smallest prompt (otherwise the column is left
out and the reason printed); greedy, `--eval-new-tokens` generated tokens, allow_longer (the
original was trained at L). Each model's results.json / summary.md / heatmap go to
`<out>/eval/<model>/`. Prints one table (scores 0-100) and writes `<out>/result.json`.
`--eval-only` reuses the trained runs under `--out`.

    PYTHONPATH=$PWD python benchmarks/longred_retention.py --original runs/demo/teacher/len0032 \
        --out runs/lr_bench32 --steps 40 --lr 2e-3 --samples 32
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_kd.eval.demo_eval import RULER_TASK, evaluate_run  # run with PYTHONPATH=$PWD

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipes(original: Path, out: Path, args) -> dict:
    cfg = yaml.safe_load((original / "config.yaml").read_text())
    data_dir = Path(cfg["data"]["data_path"]).parent
    L = int(cfg["data"]["seq_length"])
    T = L * args.factor
    model = dict(cfg["model"], rotary_base=args.rotary_base)
    base = {
        "model": model,
        "data": {"data_path": str(data_dir / "phase1"), "tokenizer_model": cfg["data"]["tokenizer_model"],
                 "seq_length": T, "split": "95,5,0"},
        "train": {"micro_batch_size": 1, "global_batch_size": 8, "train_iters": args.steps, "lr": args.lr,
                  "min_lr": args.lr / 10, "lr_warmup_iters": 2, "log_interval": 5, "eval_interval": 0,
                  "eval_iters": 0},
        "checkpoint": {"load": str(original), "finetune": True},
    }
    lr = dict(base, teacher=dict(cfg["model"]), longred={
        "short_data_path": str(data_dir / "phase1"), "short_seq_length": L // 2,
        "s2l_data_path": str(data_dir / f"teacher_{L}"), "s2l_seq_length": L,
        "num_selected_layers": 1, "middle_placement": "cream"})
    lr["teacher"]["load"] = str(original)
    return {"L": L, "T": T, "ce": _write(out / "ce.yaml", base), "longred": _write(out / "longred.yaml", lr),
            "data_dir": data_dir}


def train(recipe: Path, run: Path) -> float:
    t = time.time()
    cmd = [sys.executable, "-m", "megatron_kd.cli", "train", "--config", str(recipe),
           f"checkpoint.save={run}", "--overwrite"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (run.parent / f"{run.name}.log").write_text(p.stdout + p.stderr)
    if p.returncode:
        sys.exit(f"{run.name}: training failed\n{p.stderr[-3000:]}")
    return time.time() - t


def _valid_distance(tok, texts, length: int, distance: int) -> bool:
    from megatron_kd.eval import passkey

    try:
        passkey.PasskeyGenerator(tok, texts[:50], seed=0).passkey_doc(length, distance=distance)
        return True
    except ValueError:
        return False


def evaluate(runs: dict, L: int, T: int, samples: int) -> dict:
    from megatron_kd import distributed
    from megatron_kd.config import load_config
    from megatron_kd.data import iter_offline_corpus, load_tokenizer
    from megatron_kd.demo import KEY_LEN
    from megatron_kd.study.corpus import HELDOUT_PARAGRAPHS
    from megatron_kd.eval import passkey

    tok = load_tokenizer(load_config(str(Path(runs["original"]) / "config.yaml")).data.tokenizer_model)
    # the demo's held-out paragraphs (same shuffle), never in any training corpus
    paragraphs = [passkey.normalize_text(p) for p in iter_offline_corpus("hotpotqa")]
    random.Random(0).shuffle(paragraphs)
    heldout = paragraphs[:HELDOUT_PARAGRAPHS]
    out = {name: {} for name in runs}
    for length, tag in ((L, "short"), (T, "long")):
        gen = passkey.PasskeyGenerator(tok, heldout, seed=7, key_len=KEY_LEN)
        distances = [d for d in sorted({length // 4, length // 2, 3 * length // 4, length - 24})
                     if _valid_distance(tok, heldout, length, d)]
        eval_set = passkey.build_eval_set(gen, length, distances, samples)
        lm_ids = [tok.encode(gen.plain_doc(length)) for _ in range(samples)]
        own_ids = [gen.passkey_doc(length).ids for _ in range(samples)]
        distributed.init_distributed()
        try:
            for name, run in runs.items():
                model, _ = passkey.load_model(run, length)
                r = passkey.score_model(model, tok.vocab_size, eval_set, lm_ids)
                out[name][f"{tag} loss"] = r["heldout_loss"]
                out[name][f"{tag} passkey"] = sum(r["accuracy"].values()) / len(r["accuracy"])
                if tag == "short":  # the original's own domain: whole passkey documents of L tokens
                    own = passkey.score_model(model, tok.vocab_size, {}, own_ids)
                    out[name]["own loss"] = own["heldout_loss"]
                del model
        finally:
            distributed.destroy()
    for r in out.values():  # ppl_original / ppl_model: 1 = fully retained
        r["retention"] = math.exp(out["original"]["own loss"] - r["own loss"])
        r["plain retention"] = math.exp(out["original"]["short loss"] - r["short loss"])
    return out


def _eval_dir(name: str) -> str:
    return name.replace(" ", "_")


def long_context(runs: dict, out: Path, L: int, T: int, samples: int, new_tokens: int):
    """The project's evaluation (demo_eval.evaluate_run: runner.py, as `megatron-kd eval`) on every
    model: NIAH (passkey needle, 3 depths) at L and T, RULER niah_single_1 at T. Which cells fit is
    checked once with the shared tokenizer before any model is loaded; a length that does not fit
    is left out, with why. Returns ({model: {column: score 0-100}}, [columns], [skip reasons])."""
    from megatron_kd.config import ConfigError, load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.eval import ruler
    from megatron_kd.eval.niah import NiahBuilder, depth_percents

    tok = load_tokenizer(load_config(str(Path(runs["original"]) / "config.yaml")).data.tokenizer_model)
    niah_lengths, skipped = [], []
    for length in (L, T):
        try:
            NiahBuilder(tok, "passkey", new_tokens).grid([length], depth_percents(3), 1)
            niah_lengths.append(length)
        except ConfigError as e:
            skipped.append(f"niah_passkey@{length}: {e}")
    try:
        ruler.generate(RULER_TASK, tok, T, 1, max_new_tokens=new_tokens)
        ruler_fits = True
    except ConfigError as e:
        ruler_fits = False
        skipped.append(f"ruler:{RULER_TASK}@{T}: {e}")
    cols = [("niah_passkey", n) for n in niah_lengths] + ([(f"ruler:{RULER_TASK}", T)] if ruler_fits else [])
    rows = {}
    for name, run in runs.items():
        scores = evaluate_run(run, out / "eval" / _eval_dir(name), niah_lengths, T if ruler_fits else None,
                              samples, new_tokens, train_doc_tokens=L if name == "original" else T)
        rows[name] = {_col(t, n): scores.get(t, {}).get(str(n), float("nan")) for t, n in cols}
    return rows, [_col(t, n) for t, n in cols], skipped


def _col(task: str, length: int) -> str:
    return f"{'ruler' if task.startswith('ruler:') else 'niah'}@{length}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, help="a demo teacher stage run dir (teacher/len00LL)")
    ap.add_argument("--out", default="runs/longred_bench")
    ap.add_argument("--factor", type=int, default=4, help="T = factor x L")
    ap.add_argument("--rotary-base", type=float, default=2e6, help="the extended model's theta (ABF)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=48, help="eval sequences per measure")
    ap.add_argument("--eval-samples", type=int, default=8,
                    help="NIAH samples per (length, depth) cell, and RULER samples, of the long-context eval")
    ap.add_argument("--eval-new-tokens", type=int, default=8, help="generated tokens per eval prompt")
    ap.add_argument("--eval-only", action="store_true", help="reuse the trained runs under --out")
    args = ap.parse_args(argv)
    original, out = Path(args.original).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = recipes(original, out, args)
    if args.eval_only and (out / "result.json").is_file():
        secs = json.loads((out / "result.json").read_text())["train_seconds"]
    else:
        secs = {name: round(train(r[name], out / name), 1) for name in ("ce", "longred")}
    runs = {"original": original, "CE only": out / "ce", "LongReD": out / "longred"}
    res = evaluate(runs, r["L"], r["T"], args.samples)
    L, T = r["L"], r["T"]
    t = time.time()
    lc, lc_cols, skipped = long_context(runs, out, L, T, args.eval_samples, args.eval_new_tokens)
    lc_secs = round(time.time() - t, 1)
    for name, scores in lc.items():
        res[name].update(scores)
    print(f"\noriginal {original} (L={L}, theta 500k) -> T={T}, theta {args.rotary_base:g}, "
          f"{args.steps} steps, lr {args.lr}, 8 x {T} tokens per step; train seconds {secs}")
    print("own@L: LM loss on held-out passkey documents of L tokens (the original's own domain);"
          " plain@L: on held-out paragraphs; retention = ppl_original / ppl_model")
    ruler_note = f" / ruler@n: ruler:{RULER_TASK} ({args.eval_samples})" if f"ruler@{T}" in lc_cols else ""
    print(f"niah@n: megatron-kd eval's niah_passkey (3 depths x {args.eval_samples}){ruler_note}; greedy, "
          f"{args.eval_new_tokens} new tokens, score 0-100; eval seconds {lc_secs}; outputs under {out / 'eval'}")
    for why in skipped:
        print(f"left out: {why}")
    print(f"{'model':10s} {'own@'+str(L):>9s} {'retention':>9s} {'plain@'+str(L):>9s} {'retention':>9s} "
          f"{'passkey@'+str(L):>11s} {'passkey@'+str(T):>11s} {'plain@'+str(T):>9s}"
          + "".join(f" {c:>9s}" for c in lc_cols))
    for name, m in res.items():
        print(f"{name:10s} {m['own loss']:9.4f} {m['retention']:9.3f} {m['short loss']:9.4f} "
              f"{m['plain retention']:9.3f} {m['short passkey']:11.3f} {m['long passkey']:11.3f} "
              f"{m['long loss']:9.4f}" + "".join(f" {m[c]:9.1f}" for c in lc_cols))
    (out / "result.json").write_text(json.dumps({
        "args": vars(args), "L": L, "T": T, "train_seconds": secs,
        "long_context_eval": {"columns": lc_cols, "left_out": skipped, "seconds": lc_secs,
                              "dirs": {n: str(out / "eval" / _eval_dir(n)) for n in res}},
        "results": res}, indent=2))


if __name__ == "__main__":
    main()
