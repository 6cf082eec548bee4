"""LongReD's forward step: one micro-batch of one stream through the LongReD model.

Reduction (the reference's, made explicit): every micro-batch returns its own weighted mean
loss ``w_k * l_m`` with a count of 1, so megatron-core's per-token normalisation
(``calculate_per_token_loss``; ``finalize_model_grads`` divides by the summed counts) divides by
the number of micro-batches in the global batch:

    L_step = (1 / M) * sum_m w_stream(m) * l_m,   w_long = 1, w_short = alpha_short, w_s2l = alpha_s2l

with l_m the micro-batch's mean CE (long), sum over selected layers of mean(1 - cos) (short), or
mean(1 - cos) of the last layer (s2l). This is what the reference's accelerate loop computes (it
divides each micro-batch's loss by the 16 accumulation steps), so with 8:6:2 micro-batches the
streams weigh 1/2, 3/8 * alpha_short and 1/8 * alpha_s2l. Under context parallelism each CP rank
returns its share of ``w_k * l_m`` (model.py) and only CP rank 0 counts the micro-batch, since
megatron sums the counts over DP x CP.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_kd.models.attention import attention_mask_for_batch


class LongReDObjective:
    name = "loss"

    def __init__(self, device):
        self.device = device

    def forward_step(self, data_iterator, model):
        raw = next(data_iterator)
        stream = raw.get("stream", "long")  # held-out windows of the long stream carry no mark
        batch = {k: v.to(self.device, non_blocking=True) for k, v in raw.items() if torch.is_tensor(v)}
        # the attention backend's mask (dense / CP ring metadata / TE THD), as in training/objective.py
        output = model(batch["tokens"], batch["position_ids"], attention_mask_for_batch(batch),
                       labels=batch["labels"], loss_mask=batch["loss_mask"], stream=stream,
                       teacher_position_ids=batch.get("teacher_position_ids"),
                       document_ids=batch["document_ids"], token_index=batch.get("token_index"))
        return output, partial(self.loss_func, stream)

    def loss_func(self, stream, output):
        from megatron_kd.longred.model import cp_share

        one = torch.full((), cp_share(), dtype=torch.float32, device=output.device)
        lm = output.detach().float() if stream == "long" else torch.zeros_like(one)
        return output, one.to(torch.int), {
            "loss": torch.stack([output.detach().float(), one]),
            "lm loss": torch.stack([lm, one if stream == "long" else torch.zeros_like(one)]),
        }
