"""Knowledge-distillation losses (vocab-parallel, explicit TP group)."""
from megatron_kd.kd.losses import DIVERGENCES, VocabParallelKD, kd_objective_loss, vocab_parallel_kd_loss

__all__ = ["DIVERGENCES", "VocabParallelKD", "kd_objective_loss", "vocab_parallel_kd_loss"]
