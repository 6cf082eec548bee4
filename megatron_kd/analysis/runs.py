"""Load a training run's latest checkpoint as this rank's model chunk, under any TP/PP layout.

A run directory holds the resolved ``config.yaml`` (model shape, rotary base, seq_length,
tokenizer) next to ``checkpoints/``; the sharded checkpoint reloads under another layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_kd.config import ConfigError


@dataclass
class Run:
    path: Path
    cfg: object  # RunConfig
    tokenizer: object
    chunks: list = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def rotary_base(self) -> float:
        return float(self.cfg.model.rotary_base)


def read_run(path, flag: str = "--checkpoint") -> Run:
    """Config + tokenizer of a run directory; one-line errors before anything is built."""
    from megatron_kd.config import load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.training.checkpointing import resolve_load_dir

    p = Path(path)
    if p.name == "checkpoints" or p.name.startswith("iter_"):
        p = p.parent if p.name == "checkpoints" else p.parent.parent
    if not (p / "config.yaml").is_file():
        raise ConfigError(f"{flag} {path}: expected a training run directory with config.yaml and checkpoints/")
    cfg = load_config(str(p / "config.yaml"))
    resolve_load_dir(p / "checkpoints")  # CheckpointError when there is none
    if not cfg.data.tokenizer_model:
        raise ConfigError(f"{flag} {path}: its config.yaml has no data.tokenizer_model")
    return Run(p, cfg, load_tokenizer(cfg.data.tokenizer_model))


def load_chunks(run: Run, parallel_cfg) -> Run:
    """Build this rank's chunk for ``parallel_cfg`` and load the run's weights (eval mode).
    Model parallel state must already be initialised for ``parallel_cfg``."""
    from megatron_kd import platform
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    model = build_model(run.cfg.model, parallel_cfg, run.vocab_size, run.cfg.data.seq_length)
    model.config.batch_p2p_comm = platform.batch_p2p_comm()  # as the training loop (gloo: unbatched)
    checkpointing.load_model_weights(run.path / "checkpoints", [model])
    model.eval()
    run.chunks = [model]
    return run
