"""megatron_kd: logit knowledge distillation with long-context extension on megatron-core."""
__version__ = "0.1.0"
