"""LongReD: restoration distillation while extending the context window (docs/longred.md).

positions (skipped position ids), losses, model (student + frozen original per pipeline chunk),
streams (three data streams as equal-shape micro-batches), objective, layer_select, trainer,
drift (``megatron-kd drift``).
"""
