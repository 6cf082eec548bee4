"""One directory per run: resolved config, logs, TensorBoard events, checkpoints, results.

A directory that already holds a run is never silently reused: continuing needs ``--resume``
(and the same config), starting over needs ``--overwrite``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from megatron_kd.config import ConfigError, RunConfig, dump_config

CONFIG_NAME = "config.yaml"


def prepare_run_dir(path, cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Validate (and on rank 0 create) the run directory before any compute starts."""
    run = Path(path)
    existing = run / CONFIG_NAME
    if run.exists() and any(run.iterdir()):
        if overwrite:
            return run
        if not existing.is_file():
            raise ConfigError(f"checkpoint.save={run}: directory is not empty and holds no run "
                              f"({CONFIG_NAME} missing); choose another directory or pass --overwrite")
        if not resume:
            raise ConfigError(f"checkpoint.save={run}: already holds a run; pass --resume to "
                              "continue it or --overwrite to replace it")
        old = yaml.safe_load(existing.read_text())
        new = cfg.to_dict()
        diff = _diff(old, new)
        if diff:
            raise ConfigError(f"checkpoint.save={run}: --resume with a different config ({diff}); "
                              "use a new directory or --overwrite")
    return run


def create_run_dir(run: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Rank 0 only, after prepare_run_dir succeeded on every rank."""
    if overwrite and run.exists():
        shutil.rmtree(run)
    for sub in ("logs", "tensorboard", "checkpoints"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / CONFIG_NAME)


_RESUMABLE = {"train.train_iters", "train.eval_interval", "train.log_interval",
              "checkpoint.save_interval", "checkpoint.load", "train.exit_interval",
              # how checkpoints are checked and kept, not what is trained
              "checkpoint.keep_last", "checkpoint.verify", "checkpoint.load_strict",
              # what happens on a non-finite step: resuming a diverged run with skips allowed
              "train.check_for_nan_in_loss_and_grad", "train.skip_nonfinite_steps",
              "train.loss_spike_factor",
              # how long a silent peer is waited for (watchdog.py), not what is trained
              "parallel.distributed_timeout_minutes"}


def _diff(old: dict, new: dict) -> str:
    changed = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if a.get(key) != b.get(key) and name not in _RESUMABLE:
                changed.append(f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
