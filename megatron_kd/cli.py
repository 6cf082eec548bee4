"""``megatron-kd <command>``: parse, then hand over to one module per command (see ``--help``)."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence


def _train(args) -> int:
    from megatron_kd.config import load_config

    cfg = load_config(args.config, args.overrides)  # before torch/megatron-core: a typo fails in 0.1 s
    if args.engine == "deepspeed":
        from megatron_kd import deepspeed_kd

        deepspeed_kd.check(cfg)  # HF directories, layout: one line before anything starts
        deepspeed_kd.train(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    from megatron_kd.run import train
    from megatron_kd.training.nonfinite import EXIT_NONFINITE, NonFiniteError
    from megatron_kd.training.preemption import DEFAULT_SIGNALS, EXIT_PREEMPTED

    try:
        state = train(cfg, resume=args.resume, overwrite=args.overwrite,
                      exit_signals=DEFAULT_SIGNALS if args.exit_signal_handler else ())
    except NonFiniteError as e:  # every rank exits 65; one line (rank 0), no traceback
        if e.rank == 0:
            print(f"megatron-kd train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    return EXIT_PREEMPTED if state.stopped_by else 0


def _demo(args) -> int:
    from megatron_kd.demo import main as demo_main

    return demo_main(args.run_dir, overwrite=args.overwrite, train_iters=args.train_iters)


def _eval(args) -> int:
    from megatron_kd.eval.runner import EvalRequest, parse_lengths, parse_tasks, prepare, run_eval

    req = EvalRequest(checkpoint=args.checkpoint, tasks=parse_tasks(args.tasks),
                      lengths=parse_lengths(args.lengths), samples=args.samples, tp=args.tp, pp=args.pp,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      depths=args.depths, spacing=args.spacing, out_dir=args.out_dir,
                      tokenizer=args.tokenizer, allow_longer=args.allow_longer,
                      train_doc_tokens=args.train_doc_tokens, seed=args.seed)
    prep = prepare(req)  # every input check and every prompt before torch.distributed starts
    summary = run_eval(req, prep)
    if summary:
        print(summary["markdown"])
        print(f"written: {prep.out_dir}")
    return 0


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="long-context evaluation of a run's checkpoint: NIAH grid, RULER tasks, "
                                    "needle distance, loss by position (launch --tp ranks with torchrun)")
    e.add_argument("--checkpoint", required=True, help="training run directory (config.yaml + checkpoints/)")
    e.add_argument("--tasks", default="niah", help="comma-separated: niah, niah_passkey, ruler (all 13), "
                                                   "ruler:<task>, perplexity (default: niah)")
    e.add_argument("--lengths", default="4k", help="context lengths in tokens, e.g. 4k,8k,512 (default: 4k)")
    e.add_argument("--samples", type=int, default=4, help="samples per task x length (x NIAH depth)")
    e.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    e.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size (launch TP x PP ranks; default 1)")
    e.add_argument("--batch-size", type=int, default=4, help="prompts decoded together")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens per prompt (default: RULER's per task; 8 for niah)")
    e.add_argument("--depths", type=int, default=5, help="NIAH needle depths (default 5)")
    e.add_argument("--spacing", choices=("linear", "sigmoid"), default="linear", help="NIAH depth spacing")
    e.add_argument("--out-dir", default=None, help="where results go (default: <checkpoint>/eval)")
    e.add_argument("--tokenizer", default=None, help="override the run config's data.tokenizer_model")
    e.add_argument("--allow-longer", action="store_true",
                   help="RoPE models: allow lengths beyond the trained seq_length (length generalization)")
    e.add_argument("--train-doc-tokens", type=int, default=None,
                   help="longest training document (tokens), marked on the needle-distance plot")
    e.add_argument("--seed", type=int, default=42)


def _preprocess(args, rest) -> int:
    from megatron_kd.data.preprocess import main as preprocess_main

    return preprocess_main(rest)


def _analyze(args) -> int:
    from megatron_kd.analysis import commands

    return commands.run(args)


def _add_analyze_parser(sub) -> None:
    from megatron_kd.analysis.commands import add_parser

    add_parser(sub)


def _drift(args) -> int:
    from megatron_kd.longred.drift import run_drift

    run_drift(args.before, args.after, args.out, before_rotary_base=args.before_rotary_base,
              after_rotary_base=args.after_rotary_base, data_path=args.data,
              tokenizer_model=args.tokenizer, seq_length=args.seq_length, windows=args.windows)
    return 0


def _add_drift_parser(sub) -> None:
    d = sub.add_parser("drift", help="per-layer hidden cosine and attention KL between two checkpoints "
                                     "on short text (LongReD's drift measures), JSON + PNG")
    d.add_argument("--before", required=True, help="run dir / checkpoint of the original model")
    d.add_argument("--after", required=True, help="run dir / checkpoint of the changed model")
    d.add_argument("--before-rotary-base", type=float, default=None, help="override its RoPE base")
    d.add_argument("--after-rotary-base", type=float, default=None, help="override its RoPE base")
    d.add_argument("--data", default=None, help="<prefix> of .bin/.idx (default: the before run's)")
    d.add_argument("--tokenizer", default=None, help="tokenizer model (default: the before run's)")
    d.add_argument("--seq-length", type=int, default=None, help="window length (default: the before run's)")
    d.add_argument("--windows", type=int, default=4, help="held-out windows to average over")
    d.add_argument("--out", default="runs/drift", help="where drift.json / drift.png go")


def _add_reproduce_parser(sub) -> None:
    from megatron_kd.study.commands import add_parser

    add_parser(sub)


def _reproduce(args) -> int:
    from megatron_kd.study.commands import run

    return run(args)


def _convert(args) -> int:
    from megatron_kd.interop.convert import export_hf, import_hf

    if args.direction == "hf-to-mcore":
        summary = import_hf(args.src, args.dst, args.tensor_model_parallel_size,
                            args.pipeline_model_parallel_size, tokenizer=args.tokenizer,
                            overwrite=args.overwrite, progress=not args.quiet)
    else:
        summary = export_hf(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype,
                            progress=not args.quiet)
    import json

    print(json.dumps(summary, indent=2))
    return 0


def _add_convert_parser(sub) -> None:
    c = sub.add_parser("convert", help="HF Llama/Qwen2/Qwen3/Llama-4 checkpoints <-> project run directories "
                                       "(docs/interop.md)")
    c.add_argument("direction", choices=("hf-to-mcore", "mcore-to-hf"))
    c.add_argument("src", help="HF model directory (hf-to-mcore) or run directory (mcore-to-hf)")
    c.add_argument("dst", help="output run directory (hf-to-mcore) or HF directory (mcore-to-hf)")
    c.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="target TP the run will use (checked against heads/FFN; sets vocab padding)")
    c.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target PP (checked)")
    c.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model if not in the HF directory")
    c.add_argument("--dtype", help="export dtype (default: the imported checkpoint's, else float32)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-rank memory (parameters, gradients, optimizer, activations, "
                                    "logits, teacher) and expected tokens/s of a recipe's layout")
    p.add_argument("--config", help="YAML recipe, e.g. examples/paper/phase2_kd_10k_to_500k.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. parallel.context_parallel_size=8")
    p.add_argument("--world", type=int, default=None, help="number of ranks (default TP x PP x CP, or "
                                                          "--nodes x --gpus-per-node)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (world = nodes x --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (8)")
    p.add_argument("--allow-tp-across-nodes", action="store_true",
                   help="plan a layout whose TP groups span nodes (refused by default)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size (default: from data.tokenizer_model)")
    p.add_argument("--mfu", type=float, default=0.45, help="assumed model-FLOPs utilisation (0.45)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak TFLOP/s per rank (H100 SXM bf16 dense: 989)")
    p.add_argument("--doc-length", type=int, default=None,
                   help="mean packed-document length for attention FLOPs (default: the mean document "
                        "of <data.data_path>.summary.json, else seq_length)")
    p.add_argument("--attention", default="te", choices=("te", "local"),
                   help="te: fused O(s) attention (GPU); local: dense O(s^2) (CPU)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args) -> int:
    from megatron_kd.plan import plan_main

    return plan_main(args)


def _add_cache_teacher_parser(sub) -> None:
    from megatron_kd.config import DataConfig as _DataConfig  # (the kd package would import torch)

    c = sub.add_parser(
        "cache-teacher",
        help="run a teacher once over a packed dataset and store its top-k log-probs + tail mass per "
             "token (offline KD: kd.teacher_source=cache); launch TP x DP ranks like train",
        epilog="writes <output>/{build.json, train/, valid/, manifest.json}; rerun the same command to "
               "resume a killed build. Train from it with kd.teacher_source=cache kd.teacher_cache=<output>.")
    c.add_argument("--checkpoint", required=True, help="the teacher: a run directory (config.yaml + "
                                                       "checkpoints/), its checkpoints/ or one iter_* dir")
    c.add_argument("--data", required=True, help="<prefix> of the student's <prefix>.bin/.idx")
    c.add_argument("--top-k", type=int, required=True, help="entries kept per token (1..vocab size)")
    c.add_argument("--top-p", type=float, default=None,
                   help="keep only the smallest prefix of the top-k whose mass reaches P (padded to k)")
    c.add_argument("--output", default=None, help="cache directory (default: <prefix>_teacher_top<K>)")
    c.add_argument("--tokenizer", default=None, help="default: the teacher run's data.tokenizer_model")
    c.add_argument("--seq-length", type=int, default=None,
                   help="window length = the student's data.seq_length (default: the teacher run's)")
    c.add_argument("--split", default=_DataConfig.split, help="data.split of the student runs "
                                                             f"(default {_DataConfig.split!r})")
    c.add_argument("--seed", type=int, default=_DataConfig.seed, help="data.seed of the student runs")
    c.add_argument("--positions", choices=("global", "reset"), default="global",
                   help="teacher position ids: global (default) or reset per document "
                        "(data.reset_position_ids / teacher.reset_position_ids in the run)")
    c.add_argument("--temperature", type=float, default=1.0, help="log-probs of softmax(z / T) (default 1)")
    c.add_argument("--train-samples", type=int, default=None,
                   help="cache the first N train windows of the sample order: train.train_iters x "
                        "train.global_batch_size of the student runs (a longer run repeats them); "
                        "default: one epoch of the train split")
    c.add_argument("--valid-samples", type=int, default=None,
                   help="the first N valid windows (>= train.eval_iters x train.global_batch_size); "
                        "default: one epoch of the valid split; 0: none")
    c.add_argument("--tensor-model-parallel-size", type=int, default=1, help="teacher TP (world = TP x DP)")
    c.add_argument("--micro-batch-size", type=int, default=4, help="windows per teacher forward")
    c.add_argument("--bf16", action="store_true", help="teacher forward in bf16 (log-probs stored in fp32)")
    c.add_argument("--overwrite", action="store_true", help="replace what --output holds")


def _cache_teacher(args) -> int:
    from megatron_kd.kd.cache_teacher import run

    return run(args)


def _add_checkpoint_parser(sub) -> None:
    from megatron_kd.training.integrity import add_parser

    add_parser(sub)


def _checkpoint(args) -> int:
    from megatron_kd.training.integrity import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-kd",
        description="Logit knowledge distillation with long-context extension on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the paper pipeline, tiny, on the CPU (~7 min): corpus -> tokenizer -> "
                                    "teacher -> student phase 1 -> phase 2 with KD and with CE -> passkey "
                                    "retrieval by distance band (in / beyond the document / beyond the window) "
                                    "with 95%% intervals; one seed of `reproduce`")
    d.add_argument("--run-dir", default="runs/demo", help="where the run goes (default: runs/demo)")
    d.add_argument("--train-iters", type=int, default=None,
                   help="replace every stage's step count (below ~2,000 phase-1 steps the students stay at "
                        "chance and the demo stops after phase 1, saying so)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo run directory")

    t = sub.add_parser("train", help="train from a YAML recipe (launch with torchrun, srun or mpirun "
                                     "for several ranks)",
                       epilog="exit status: 0 done; 2 bad input (nothing written); 65 diverged: a "
                              "non-finite loss or grad norm (train.check_for_nan_in_loss_and_grad), "
                              "nothing saved after it; 75 stopped by a signal after a checkpoint "
                              "(--exit-signal-handler)")
    t.add_argument("--config", help="YAML recipe, e.g. examples/tiny/phase1_theta10k.yaml")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides applied after the recipe, e.g. train.lr=3e-4")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in checkpoint.save from its newest complete checkpoint "
                        "(damaged newer ones are warned about and left in place)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace whatever checkpoint.save holds")
    t.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGUSR1/SIGTERM: checkpoint after the current step and exit with code 75 "
                        "(what slurm/*.sbatch use to requeue; resume with --resume)")
    t.add_argument("--engine", choices=("megatron", "deepspeed"), default="megatron",
                   help="megatron (default): megatron-core models from run directories; deepspeed: a "
                        "Hugging Face student (checkpoint.load) distilled from a Hugging Face teacher "
                        "(teacher.load) under ZeRO parallel.zero_stage, no conversion (docs/deepspeed.md)")

    _add_analyze_parser(sub)

    _add_drift_parser(sub)
    _add_reproduce_parser(sub)
    _add_convert_parser(sub)
    _add_plan_parser(sub)
    add_eval_parser(sub)
    _add_checkpoint_parser(sub)
    _add_cache_teacher_parser(sub)

    sub.add_parser("preprocess", add_help=False,
                   help="JSONL/text -> tokenizer -> megatron .bin/.idx (see `preprocess --help`)")
    return parser


def _input_errors() -> tuple:
    """Exception types that mean bad input: one line on stderr, exit 2, no traceback.

    Looked up after the fact, so that importing them does not pull in torch (the data package)
    or megatron-core (checkpointing) before the config is read; a type whose module was never
    imported cannot have been raised.
    """
    from megatron_kd.config import ConfigError

    types = [ConfigError]
    for module, name in (("megatron_kd.data.errors", "DataError"),
                         ("megatron_kd.training.checkpointing", "CheckpointError"),
                         ("megatron_kd.study.runner", "StudyError"),
                         ("megatron_kd.training.integrity", "CheckpointError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # megatron-core warns at import that TE/apex are absent; on the CPU that is the expected state
    # (platform.layer_spec_kind() says which spec is used), so keep the console readable.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "preprocess":
        args, rest = parser.parse_args(argv[:1]), argv[1:]
    else:
        args, rest = parser.parse_args(argv), []
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "drift":
            return _drift(args)
        if args.command == "convert":
            return _convert(args)
        if args.command == "reproduce":
            return _reproduce(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "checkpoint":
            return _checkpoint(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "cache-teacher":
            return _cache_teacher(args)
        return _preprocess(args, rest)
    except Exception as e:
        if not isinstance(e, _input_errors()):
            raise
        print(f"megatron-kd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
