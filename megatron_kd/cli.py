"""``megatron-kd {demo,train,preprocess}``: parse, then hand over to one module per command."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence


def _train(args) -> int:
    from megatron_kd.config import load_config

    cfg = load_config(args.config, args.overrides)  # before torch/megatron-core: a typo fails in 0.1 s
    from megatron_kd.training.loop import train
    from megatron_kd.training.preemption import DEFAULT_SIGNALS, EXIT_PREEMPTED

    state = train(cfg, resume=args.resume, overwrite=args.overwrite,
                  exit_signals=DEFAULT_SIGNALS if args.exit_signal_handler else ())
    return EXIT_PREEMPTED if state.stopped_by else 0


def _demo(args) -> int:
    from megatron_kd.demo import run_demo

    run_demo(args.run_dir, overwrite=args.overwrite, train_iters=args.train_iters)
    return 0


def _preprocess(args, rest) -> int:
    from megatron_kd.data.preprocess import main as preprocess_main

    return preprocess_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-kd",
        description="Logit knowledge distillation with long-context extension on megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the paper pipeline, tiny, on the CPU: corpus -> tokenizer -> teacher -> "
                                    "student phase 1 -> phase 2 with KD and with CE -> passkey retrieval table")
    d.add_argument("--run-dir", default="runs/demo", help="where the run goes (default: runs/demo)")
    d.add_argument("--train-iters", type=int, default=None, help="override the demo's step count")
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo run directory")

    t = sub.add_parser("train", help="train from a YAML recipe (launch with torchrun, srun or mpirun "
                                     "for several ranks)")
    t.add_argument("--config", help="YAML recipe, e.g. examples/tiny/phase1_theta10k.yaml")
    t.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides applied after the recipe, e.g. train.lr=3e-4")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in checkpoint.save from its latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="replace whatever checkpoint.save holds")
    t.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGUSR1/SIGTERM: checkpoint after the current step and exit with code 75 "
                        "(what slurm/*.sbatch use to requeue; resume with --resume)")

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
                         ("megatron_kd.training.checkpointing", "CheckpointError")):
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
        return _preprocess(args, rest)
    except Exception as e:
        if not isinstance(e, _input_errors()):
            raise
        print(f"megatron-kd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
