"""Teacher + student as one pipeline chunk: same micro-batch, same stages, hidden states together.

``DistillationModel`` wraps one student chunk and the teacher chunk of the same pipeline stage.
Both see the same tokens, position ids and document mask (unless ``teacher_position_ids`` are
given: the position-invariant teacher control, teacher.reset_position_ids). On stages before the last, the output
is ``cat([student_hidden, teacher_hidden], -1)`` -- ``[s, b, h_S + h_T]`` -- so megatron-core's
p2p sends both in one tensor; the wrapper's ``config.hidden_size`` is ``h_S + h_T`` so the
schedules (1F1B and interleaved) allocate that shape. On the last stage it returns the per-token
``[b, s, 2]`` pair (KD, CE), reduced by the objective's loss function -- or, with the fused
loss, the ``[2]`` (loss sum, token count) of the whole micro-batch.

The teacher is frozen and left out of checkpoints (kd/pair.py, shared with LongReD) and runs
under ``torch.no_grad``.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from megatron_kd.kd.fused import fused_linear_kd_loss
from megatron_kd.kd.losses import vocab_parallel_kd_loss
from megatron_kd.kd.pair import StudentTeacherPair


class DistillationModel(StudentTeacherPair):
    def __init__(self, student, teacher, kd_cfg, vocab_size: int, tp_group, fused: bool = False):
        super().__init__(student, teacher)
        self.kd_cfg = kd_cfg
        self.vocab_size = vocab_size
        self.tp_group = tp_group
        self.fused = fused

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                teacher_position_ids=None, **kwargs):
        tpos = position_ids if teacher_position_ids is None else teacher_position_ids
        if self.post_process and self.fused:
            return self._fused_loss(input_ids, position_ids, attention_mask, labels, loss_mask, tpos, **kwargs)
        if not self.post_process:
            student_out = self.student(input_ids, position_ids, attention_mask, **kwargs)
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, tpos, attention_mask, **kwargs)
            return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)
        # last stage: logits [s, b, V_pad/TP] (vocab shards of the same padded vocab), in the
        # output layer's layout: the losses are per token, so no [b, s] copy (forward_logits)
        student_out = self.student.forward_logits(input_ids, position_ids, attention_mask, **kwargs)
        with torch.no_grad():
            teacher_out = self.teacher.forward_logits(input_ids, tpos, attention_mask, **kwargs)
        kd = vocab_parallel_kd_loss(
            student_out, teacher_out, tp_group=self.tp_group, vocab_size=self.vocab_size,
            temperature=self.kd_cfg.temperature, scale_by_t_squared=self.kd_cfg.scale_by_t_squared,
            divergence=self.kd_cfg.divergence, beta=self.kd_cfg.beta, top_k=self.kd_cfg.top_k)
        if labels is None:
            return kd.transpose(0, 1)  # [b, s]
        if self.kd_cfg.alpha < 1.0:
            # megatron's vocab-parallel CE on the same [s, b, v] logits, as megatron's own GPTModel
            # computes it (with fp32 logits, in their storage: the KD loss kept what it needs)
            ce = tensor_parallel.vocab_parallel_cross_entropy(student_out.float(),
                                                              labels.transpose(0, 1).contiguous())
        else:
            ce = torch.zeros_like(kd)
        return torch.stack([kd, ce], dim=-1).transpose(0, 1)  # [b, s, 2]

    def _fused_loss(self, input_ids, position_ids, attention_mask, labels, loss_mask, teacher_position_ids,
                    **kwargs):
        """Last stage, fused: final hidden states + output weights -> (loss sum, token count),
        chunk by chunk, never forming the [tokens, V/TP] logits (kd/fused.py)."""
        hs = self.student.forward_hidden(input_ids, position_ids, attention_mask, **kwargs)  # [s, b, h_S]
        with torch.no_grad():
            ht = self.teacher.forward_hidden(input_ids, teacher_position_ids, attention_mask, **kwargs)  # [s, b, h_T]
        if self.student.config.sequence_parallel:
            # [s/TP, b, h] slices -> the whole sequence on every TP rank (what the output layer
            # would gather). Backward keeps this rank's slice of the gradient: the fused loss
            # already sums its vocab shards' contributions over TP.
            hs = tensor_parallel.gather_from_sequence_parallel_region(
                hs, tensor_parallel_output_grad=False, group=self.tp_group)
            with torch.no_grad():
                ht = tensor_parallel.gather_from_sequence_parallel_region(
                    ht, tensor_parallel_output_grad=False, group=self.tp_group)
        k = self.kd_cfg
        if k.fused_impl == "triton":  # kd/triton_fused.py: Triton tiles, CUDA
            from megatron_kd.kd.triton_fused import triton_linear_kd_loss as loss_fn
            impl_kwargs = {}
        else:
            loss_fn, impl_kwargs = fused_linear_kd_loss, dict(chunk_size=k.fused_chunk_size)
        # tokens in [s, b] order, like the hidden states
        loss_sum, count = loss_fn(
            hs.reshape(-1, hs.shape[-1]), self.student.output_weight(),
            ht.reshape(-1, ht.shape[-1]), self.teacher.output_weight(),
            labels=labels.transpose(0, 1).reshape(-1), loss_mask=loss_mask.transpose(0, 1).reshape(-1),
            alpha=k.alpha, tp_group=self.tp_group, vocab_size=self.vocab_size,
            temperature=k.temperature, scale_by_t_squared=k.scale_by_t_squared,
            divergence=k.divergence, beta=k.beta, top_k=k.top_k, **impl_kwargs)
        return torch.stack([loss_sum, count.to(loss_sum.dtype)])  # [2]: what the objective reduces
