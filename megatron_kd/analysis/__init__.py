"""Positional analysis tools (the paper's §4 perturbation tracing and §5 query-state evolution).

capture.py       forward hooks that record chosen token positions (TP/PP aware) -> .npz + manifest
probe.py         the repeated-block probe: tokens, positions, both masking regimes
numerics.py      numeric settings for the audit (RoPE angle dtype, parameter/activation dtype)
runs.py          load a training run's checkpoint as model chunks for the current layout
perturbation.py  §4 metrics (Eq. 3 distance, cosine, top-10 ranks) + the position-dependence audit
evolution.py     §5 per-dimension query change between two checkpoints, RoPE frequency mapping
figures.py       PNGs in the layout of the paper's Figures 7-12
"""
