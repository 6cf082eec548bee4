"""Teacher + student as one pipeline chunk: same micro-batch, same stages, hidden states together.

``DistillationModel`` wraps one student chunk and the teacher chunk of the same pipeline stage.
Both see the same tokens, position ids and document mask. On stages before the last, the output
is ``cat([student_hidden, teacher_hidden], -1)`` -- ``[s, b, h_S + h_T]`` -- so megatron-core's
p2p sends both in one tensor; the wrapper's ``config.hidden_size`` is ``h_S + h_T`` so the
schedules (1F1B and interleaved) allocate that shape. On the last stage it returns the per-token
``[b, s, 2]`` pair (KD, CE), reduced by the objective's loss function -- or, with the fused
loss, the ``[2]`` (loss sum, token count) of the whole micro-batch.

The teacher is frozen: ``requires_grad=False`` (so megatron DDP and the optimizer never see it),
kept in eval mode whatever ``train()`` is called with, run under ``torch.no_grad``, and left out
of the state dicts: a checkpoint of this wrapper is a plain student checkpoint.
"""
from __future__ import annotations

import copy

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_kd.kd.fused import fused_linear_kd_loss
from megatron_kd.kd.losses import vocab_parallel_kd_loss


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class DistillationModel(MegatronModule):
    def __init__(self, student, teacher, kd_cfg, vocab_size: int, tp_group, fused: bool = False):
        config = copy.copy(student.config)
        # Only the p2p buffers read this: both hidden states travel in one tensor.
        config.hidden_size = student.config.hidden_size + teacher.config.hidden_size
        super().__init__(config=config)
        # Named `module` so megatron-core's get_attr_wrapped_model (used by the schedules and
        # finalize_model_grads for model_type, pre_process, shared embeddings, ...) finds the
        # student's attributes through this wrapper, as it does through DDP.
        self.module = student
        self.teacher = freeze(teacher)
        self.kd_cfg = kd_cfg
        self.vocab_size = vocab_size
        self.tp_group = tp_group
        self.fused = fused
        self.student_hidden = student.config.hidden_size
        self.post_process = student.post_process

    @property
    def student(self):
        return self.module

    # -- pipeline hand-off ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.student.set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        h = self.student_hidden
        self.student.set_input_tensor(input_tensor[..., :h])  # [s, b, h_S], keeps the grad path
        self.teacher.set_input_tensor(input_tensor[..., h:].detach())  # [s, b, h_T]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None, **kwargs):
        if self.post_process and self.fused:
            return self._fused_loss(input_ids, position_ids, attention_mask, labels, loss_mask, **kwargs)
        student_out = self.student(input_ids, position_ids, attention_mask, **kwargs)
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask, **kwargs)
        if not self.post_process:
            return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)
        # last stage: logits [b, s, V_pad/TP] (vocab shards of the same padded vocab)
        kd = vocab_parallel_kd_loss(
            student_out, teacher_out, tp_group=self.tp_group, vocab_size=self.vocab_size,
            temperature=self.kd_cfg.temperature, scale_by_t_squared=self.kd_cfg.scale_by_t_squared,
            divergence=self.kd_cfg.divergence, beta=self.kd_cfg.beta, top_k=self.kd_cfg.top_k)
        if labels is None:
            return kd
        if self.kd_cfg.alpha < 1.0:
            # megatron's vocab-parallel CE on the same logits: [s, b, v] in, [s, b] out
            ce = tensor_parallel.vocab_parallel_cross_entropy(
                student_out.transpose(0, 1).float().contiguous(), labels.transpose(0, 1).contiguous()
            ).transpose(0, 1)
        else:
            ce = torch.zeros_like(kd)
        return torch.stack([kd, ce], dim=-1)  # [b, s, 2]

    def _fused_loss(self, input_ids, position_ids, attention_mask, labels, loss_mask, **kwargs):
        """Last stage, fused: final hidden states + output weights -> (loss sum, token count),
        chunk by chunk, never forming the [tokens, V/TP] logits (kd/fused.py)."""
        hs = self.student.forward_hidden(input_ids, position_ids, attention_mask, **kwargs)  # [s, b, h_S]
        with torch.no_grad():
            ht = self.teacher.forward_hidden(input_ids, position_ids, attention_mask, **kwargs)  # [s, b, h_T]
        k = self.kd_cfg
        # tokens in [s, b] order, like the hidden states
        loss_sum, count = fused_linear_kd_loss(
            hs.reshape(-1, hs.shape[-1]), self.student.output_weight(),
            ht.reshape(-1, ht.shape[-1]), self.teacher.output_weight(),
            labels=labels.transpose(0, 1).reshape(-1), loss_mask=loss_mask.transpose(0, 1).reshape(-1),
            alpha=k.alpha, tp_group=self.tp_group, vocab_size=self.vocab_size,
            temperature=k.temperature, scale_by_t_squared=k.scale_by_t_squared,
            divergence=k.divergence, beta=k.beta, top_k=k.top_k, chunk_size=k.fused_chunk_size)
        return torch.stack([loss_sum, count.to(loss_sum.dtype)])  # [2]: what the objective reduces

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # -- checkpoints hold the student only -------------------------------------------------------
    def sharded_state_dict(self, *args, **kwargs):
        return self.student.sharded_state_dict(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.student.load_state_dict(state_dict, strict=strict)
