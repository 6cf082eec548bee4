"""What one micro-batch computes: the pluggable part of the training step.

An objective turns (batch, model) into megatron's forward-step contract: an output tensor and a
loss function returning ``(loss_sum, num_tokens, report)``. Returning sums and counts (not means)
makes the reduction "sum over loss-masked tokens / global count of them", whatever the
micro-batch, data-parallel or pipeline split, because megatron-core adds the counts up
(``calculate_per_token_loss``) and divides the gradients once in ``finalize_model_grads``.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_kd.models.attention import attention_mask_for_batch


def batch_to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def masked_sum_and_count(per_token: torch.Tensor, loss_mask: torch.Tensor):
    """[b, s] per-token values -> (sum over masked tokens (fp32), count (int))."""
    mask = loss_mask.to(torch.float32)
    return (per_token.float() * mask).sum(), mask.sum().to(torch.int)


class CrossEntropyObjective:
    """Next-token cross-entropy (the phase-1 objective and the KD baseline, alpha = 0).

    megatron-core computes vocab-parallel CE itself when given labels, so no logits are
    gathered across TP.
    """

    name = "lm loss"

    def __init__(self, device):
        self.device = device

    def forward_step(self, data_iterator, model):
        batch = batch_to_device(next(data_iterator), self.device)
        output = model(
            batch["tokens"],
            batch["position_ids"],
            attention_mask_for_batch(batch),
            labels=batch["labels"],
        )
        return output, partial(self.loss_func, batch["loss_mask"])

    def loss_func(self, loss_mask, output):
        loss_sum, count = masked_sum_and_count(output, loss_mask)
        return loss_sum, count, {self.name: torch.stack([loss_sum.detach(), count.float()])}
