"""A student chunk and the frozen teacher chunk of the same pipeline stage, as one module.

Shared by logit KD (kd/distill_model.py) and LongReD (longred/model.py). On stages before the
last, both hidden states travel in one p2p tensor ``cat([student, teacher], -1)``, so the
wrapper's ``config.hidden_size`` is ``h_S + h_T`` and the schedules (1F1B, interleaved) allocate
that shape. The teacher is frozen: ``requires_grad=False`` (megatron DDP and the optimizer never
see it), kept in eval mode whatever ``train()`` is called with, and left out of the state dicts,
so a checkpoint of the pair is a plain student checkpoint.
"""
from __future__ import annotations

import copy

import torch
from megatron.core.transformer.module import MegatronModule


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class StudentTeacherPair(MegatronModule):
    def __init__(self, student, teacher):
        config = copy.copy(student.config)
        # Only the p2p buffers read this: both hidden states travel in one tensor.
        config.hidden_size = student.config.hidden_size + teacher.config.hidden_size
        super().__init__(config=config)
        # Named `module` so megatron-core's get_attr_wrapped_model (used by the schedules and
        # finalize_model_grads for model_type, pre_process, shared embeddings, ...) finds the
        # student's attributes through this wrapper, as it does through DDP.
        self.module = student
        self.teacher = freeze(teacher)
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

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # -- checkpoints hold the student only ---------------------------------------------------
    def sharded_state_dict(self, *args, **kwargs):
        return self.student.sharded_state_dict(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.student.load_state_dict(state_dict, strict=strict)
