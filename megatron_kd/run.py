"""``train(cfg)`` with every train spec registered: the entry point for launchers and scripts
(``megatron-kd train``, the demo, tests). Same signature as ``megatron_kd.training.loop.train``,
which only knows the specs registered so far (training/ registers only "ce"; train_specs.py the
rest). Call under a ``__main__`` guard: the checkpoint writer may start a spawn-based process
manager.
"""
from __future__ import annotations

from typing import Callable, Optional


def train(cfg, resume: bool = False, overwrite: bool = False,
          objective_factory: Optional[Callable] = None, exit_signals=(), spec: Optional[str] = None):
    from megatron_kd.train_specs import register_all
    from megatron_kd.training.loop import train as train_loop

    register_all()
    return train_loop(cfg, resume=resume, overwrite=overwrite, objective_factory=objective_factory,
                      exit_signals=exit_signals, spec=spec)
