"""Numeric settings of the position-dependence audit.

Under a document mask, RoPE attention depends only on relative positions, so in exact arithmetic
every repeat of a block produces the same outputs wherever it sits in the window. What is left is
rounding: the angle ``position x inv_freq`` (fp32 loses absolute precision as positions grow) and
the activations (bf16). Each setting changes one of them; ``reset_position_ids`` (positions
restart per block, so every repeat has identical inputs) is the control.

Parameters are cast in place and restored afterwards; buffers are left alone on purpose: the
rotary ``inv_freq`` buffer must keep its fp32 values, or a bf16 cast would change the model's
frequencies rather than its rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class NumericSetting:
    name: str
    angle_dtype: torch.dtype = torch.float32
    param_dtype: Optional[torch.dtype] = None  # None: as loaded
    reset_position_ids: bool = False
    meaning: str = ""


SETTINGS = {s.name: s for s in (
    NumericSetting("float64_model", torch.float64, torch.float64,
                   meaning="float64 parameters, activations and RoPE angles: the exact reference"),
    NumericSetting("float64_angles", torch.float64,
                   meaning="RoPE angles in float64, cos/sin rounded to the fp32 activations"),
    NumericSetting("fp32_angles", torch.float32,
                   meaning="the training default: fp32 angles and activations"),
    NumericSetting("bf16_activations", torch.float32, torch.bfloat16,
                   meaning="bf16 parameters and activations, fp32 angles"),
    NumericSetting("reset_position_ids", torch.float32, reset_position_ids=True,
                   meaning="control: positions restart per block, every repeat has identical inputs"),
)}
DEFAULT_SETTINGS = ("float64_model", "float64_angles", "fp32_angles", "bf16_activations", "reset_position_ids")


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


@contextlib.contextmanager
def numeric_setting(model_chunks, setting: NumericSetting):
    """Apply ``setting`` to the model chunks for the duration of the block."""
    chunks = [_unwrap(c) for c in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks])]
    saved_params, saved_cfg = [], []
    try:
        for model in chunks:
            model.rotary_angle_dtype = setting.angle_dtype
            if setting.param_dtype is not None:
                saved_cfg.append((model.config, model.config.pipeline_dtype))
                model.config.pipeline_dtype = setting.param_dtype  # p2p buffers between stages
                for p in model.parameters():
                    saved_params.append((p, p.data))
                    p.data = p.data.to(setting.param_dtype)
        yield setting
    finally:
        for model in chunks:
            model.__dict__.pop("rotary_angle_dtype", None)  # back to the class default
        for p, data in saved_params:
            p.data = data
        for cfg, dtype in saved_cfg:
            cfg.pipeline_dtype = dtype
