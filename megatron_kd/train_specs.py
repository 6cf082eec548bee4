"""Every train spec the package ships, registered in one call (training/registry.py).

training/ registers only "ce" (it may not import the layers above it); the others are registered
here: "kd" (kd/train_spec.py), "kd_cache" (kd/cached_train.py) and "longred" (longred/train_spec.py). Entry points call
``register_all()`` before training (``megatron_kd.run.train`` does); a new spec is a module with a
``register()`` function, added to the list below.
"""
from __future__ import annotations


def register_all() -> None:
    """Register every spec (idempotent)."""
    from megatron_kd.kd import cached_train as kd_cache
    from megatron_kd.kd import train_spec as kd
    from megatron_kd.longred import train_spec as longred

    for module in (kd, kd_cache, longred):
        module.register()
