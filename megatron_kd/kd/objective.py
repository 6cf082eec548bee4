"""The KD training objective: alpha * KD + (1 - alpha) * CE per loss-masked token."""
from __future__ import annotations

from functools import partial

import torch

from megatron_kd.kd.losses import kd_objective_loss
from megatron_kd.training.objective import batch_to_device, masked_sum_and_count
from megatron_kd.models.attention import attention_mask_for_batch


class DistillationObjective:
    """Forward step for a DistillationModel; reports the mixed loss, its KD and its CE parts."""

    name = "loss"

    def __init__(self, kd_cfg, device):
        self.alpha = kd_cfg.alpha
        self.device = device

    def forward_step(self, data_iterator, model):
        batch = batch_to_device(next(data_iterator), self.device)
        output = model(batch["tokens"], batch["position_ids"], attention_mask_for_batch(batch),
                       labels=batch["labels"], loss_mask=batch["loss_mask"],
                       teacher_position_ids=batch.get("teacher_position_ids"))  # the reset-position control
        return output, partial(self.loss_func, batch["loss_mask"])

    def loss_func(self, loss_mask, output):
        if output.dim() == 1:  # fused: [loss sum, token count] of the micro-batch, already masked
            loss_sum, n = output[0], output[1].detach()
            return loss_sum, n.to(torch.int), {"loss": torch.stack([loss_sum.detach(), n])}
        kd, ce = output[..., 0], output[..., 1]  # [b, s] each
        loss_sum, count = kd_objective_loss(kd, ce, loss_mask, self.alpha)
        kd_sum, _ = masked_sum_and_count(kd.detach(), loss_mask)
        ce_sum, _ = masked_sum_and_count(ce.detach(), loss_mask)
        n = count.float()
        return loss_sum, count, {
            "loss": torch.stack([loss_sum.detach(), n]),
            "kd loss": torch.stack([kd_sum, n]),
            "lm loss": torch.stack([ce_sum, n]),
        }
