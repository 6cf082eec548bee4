"""``megatron-kd reproduce``: flags -> StudyConfig -> Study (docs/reproduce.md)."""
from __future__ import annotations

import dataclasses

from megatron_kd.config import ConfigError


def _ints(flag: str, spec: str):
    try:
        out = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated token distances, got {spec!r}") from None
    if not out:
        raise ConfigError(f"{flag}: empty")
    return out


def _names(flag: str, spec: str, every):
    if spec == "all":
        return tuple(every)
    if spec == "none":
        return ()
    return tuple(x.strip() for x in spec.split(",") if x.strip())


def add_parser(sub) -> None:
    r = sub.add_parser(
        "reproduce", help="the paper's Figure 4 at small scale on the CPU: one long-context teacher, students "
                          "for the three theta setups x {KD, CE} x seeds, the controls, passkey retrieval by "
                          "distance band with 95%% intervals (table + PNG); resumable")
    r.add_argument("--run-dir", default="runs/reproduce", help="the study directory (rerunning resumes it)")
    r.add_argument("--quick", action="store_true",
                   help="the whole pipeline at toy step counts (CI, ~4 min): checks plumbing, not science")
    r.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; --quick 2)")
    r.add_argument("--setups", default=None, help="comma-separated subset of 10k_to_10k,500k_to_500k,10k_to_500k")
    r.add_argument("--controls", default=None,
                   help="all (default), none, or a comma-separated subset of teacher_reset_positions,"
                        "positional_teacher,short_teacher,freeze_high_frequencies,freeze_low_frequencies")
    r.add_argument("--phase1-iters", type=int, default=None, help="phase-1 steps (default 2000)")
    r.add_argument("--phase2-iters", type=int, default=None, help="phase-2 steps (default 100)")
    r.add_argument("--samples-per-distance", type=int, default=None,
                   help="evaluation samples per distance and seed (default 24: 4 distances x 3 seeds = 288 per cell)")
    r.add_argument("--distances-in-distribution", default=None,
                   help="needle distances inside the longest phase-2 document (default 24,48,80,112)")
    r.add_argument("--distances-beyond-document", default=None,
                   help="distances beyond it, inside the phase-2 window (default 144,176,208,240)")
    r.add_argument("--distances-beyond-window", default=None,
                   help="distances beyond the window, in sequences twice as long (default 288,352,416,480)")
    r.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, each a process with cores/jobs threads (default 2; 1: all "
                        "in this process)")
    r.add_argument("--in-distribution-bar", type=float, default=None,
                   help="phase-1 students must reach this exact match in distribution before phase 2 "
                        "(default 0.8; --quick: 0, off)")


def config_from_args(args):
    from megatron_kd.study.spec import CONTROLS, SETUPS, preset

    cfg = preset("quick" if args.quick else "default")
    changes = {}
    for name in ("seeds", "phase1_iters", "phase2_iters", "samples_per_distance", "in_distribution_bar", "jobs"):
        v = getattr(args, name)
        if v is not None:
            changes[name] = v
    if args.setups is not None:
        changes["setups"] = _names("--setups", args.setups, SETUPS)
    if args.controls is not None:
        changes["controls"] = _names("--controls", args.controls, CONTROLS)
    distances = dict(cfg.distances)
    for band in distances:
        spec = getattr(args, f"distances_{band}")
        if spec is not None:
            distances[band] = _ints(f"--distances-{band.replace('_', '-')}", spec)
    changes["distances"] = distances
    return dataclasses.replace(cfg, **changes)


def run(args) -> int:
    from megatron_kd.study.runner import Study

    cfg = config_from_args(args)
    summary = Study(cfg, args.run_dir).run()  # validates everything before training
    print("\n== reproduce (" + cfg.preset + "): passkey exact match [95% interval], pooled over seeds x samples\n"
          + summary["text"])
    print(f"\n  written: {args.run_dir}/reproduce.md, reproduce_summary.json, reproduce.png "
          f"({summary['seconds']['total']:.0f} s)")
    return 0
