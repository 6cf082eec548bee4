"""Student (extended) + frozen teacher (original) as one pipeline chunk, for LongReD's 3 streams.

Like kd/distill_model.py's DistillationModel: both chunks of the same stage live together, and on
stages before the last the output is ``cat([student_hidden, teacher_hidden], -1)`` so one p2p
tensor carries both (``config.hidden_size = h_S + h_T``). What a micro-batch computes depends on
its stream:

* ``long``: the student alone (the teacher half of the hand-off is zeros); the last stage
  returns the per-token CE ``[b, s]``.
* ``short``: both models at the same position ids; 1 - cos on the outputs of the selected layers
  this stage owns (forward hooks on ``decoder.layers``) and, on the last stage, on the final
  hidden states **after the final norm** (the reference compares HF ``hidden_states[-1]``, which
  HF Llama takes after its final norm).
* ``s2l``: the student at the skipped positions, the teacher at 0..L-1 (``teacher_position_ids``);
  last-stage output only.

Each stage computes its own layers' loss; before the last stage it is attached to the output
(losses.AttachLoss) so megatron-core's backward includes it. The last stage returns the scalar
``alpha * (its layer terms + final term)``. Per-layer values go to ``self.reports`` ({name:
[sum, count]}), which the trainer reduces over the pipeline and data-parallel groups.
With ``measure_attention=True`` (the layer selection), short micro-batches also record the
per-layer attention KL (losses.attention_kl_by_document via pre-hooks on core attention: the
student's rotated q/k are kept until the teacher's same layer runs).

Context parallelism: a CP rank holds part of every window (data/cp_layout.py). Its losses are
its tokens' sums divided by the CP group's token count (losses.token_weights), and only CP rank
0 counts the micro-batch (in reports and in the count megatron divides by), so CP ranks add up to
the whole window's mean exactly once.
"""
from __future__ import annotations

import torch

from megatron_kd.kd.pair import StudentTeacherPair
from megatron_kd.longred.losses import AttachLoss, attention_kl_by_document, cosine_distance, token_weights


def layer_report_name(stream: str, layer: int) -> str:
    return f"{stream} cos-loss layer {layer}"


def context_parallel():
    """(CP group, CP rank), or (None, 0) without CP (also outside megatron's parallel state)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_context_parallel_world_size() > 1:
        return ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    return None, 0


def cp_share() -> float:
    """1 on CP rank 0, else 0: the count a per-micro-batch value carries, so the CP ranks' shares
    of a window's mean are counted once (in the reports and in the count megatron divides by)."""
    return 1.0 if context_parallel()[1] == 0 else 0.0


def gather_over(group, t: torch.Tensor, dim: int) -> torch.Tensor:
    """All-gather ``t`` over ``group`` and concatenate along ``dim`` (rank order; no grad)."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class LongReDModel(StudentTeacherPair):
    def __init__(self, student, teacher, selected_layers, num_layers: int,
                 alpha_short: float, alpha_s2l: float):
        super().__init__(student, teacher)
        self.num_layers = num_layers
        # layer numbers (1-based, global) whose raw output is compared; num_layers = the final
        # (normed) output, handled on the last stage
        self.set_selected_layers(selected_layers)
        self.alpha = {"short": alpha_short, "s2l": alpha_s2l}
        self.reports = {}  # {name: [sum, count]} since the last clear()
        self.measure_attention = False
        self._capture = None  # {"student": {layer: h}, "teacher": {...}} during a short forward
        self._qk = None  # {layer: student (q, k)} while measuring attention
        self._meta = None  # (q_meta, k_meta) [2, b, s] (document id, window index) while measuring
        for name, model in (("student", student), ("teacher", self.teacher)):
            for layer in model.decoder.layers:
                number = layer.layer_number
                layer.register_forward_hook(self._layer_hook(name, number))
                attn = getattr(layer.self_attention, "core_attention", None)
                if attn is not None:
                    attn.register_forward_pre_hook(self._attention_hook(name, number, attn))

    def set_selected_layers(self, layers):
        self.selected = sorted(set(int(x) for x in layers) - {self.num_layers})

    def local_layer_numbers(self):
        return [layer.layer_number for layer in self.student.decoder.layers]

    # -- hooks ----------------------------------------------------------------------------------
    def _layer_hook(self, who, number):
        def hook(module, args, output):
            if self._capture is not None and number in self.selected:
                self._capture[who][number] = output[0] if isinstance(output, tuple) else output
        return hook

    def _attention_hook(self, who, number, attn):
        def hook(module, args):
            if self._qk is None:
                return
            query, key = args[0].detach(), args[1].detach()
            group, _ = context_parallel()
            if group is not None:  # a query may attend keys held by the other CP ranks
                key = gather_over(group, key, 0)
            if who == "student":  # runs first; the teacher's same layer computes the KL
                self._qk[number] = (query, key)
                return
            with torch.no_grad():
                kl, rows = attention_kl_by_document(self._qk.pop(number), (query, key), *self._meta,
                                                    attn.softmax_scale)
            self._record(f"attention kl layer {number}", kl, rows)
        return hook

    def _record(self, name: str, value, count: float = 1.0):
        """Accumulate [sum, count] on the value's device (no host sync per micro-batch).
        Callers pass ``self._share`` as the count of a per-micro-batch value (see module doc)."""
        v = torch.as_tensor(value).detach().to(torch.float64).reshape(())
        entry = torch.stack([v, torch.full_like(v, count)])
        self.reports[name] = self.reports[name] + entry if name in self.reports else entry

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                stream: str = "long", teacher_position_ids=None, document_ids=None, token_index=None):
        """``document_ids`` / ``token_index`` ``[b, s]``: what each token is (data/cp_layout.py);
        without them every token is real and ``token_index`` is 0..s-1 (whole windows)."""
        group, _ = context_parallel()
        self._share = cp_share()
        if document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        if stream == "long":
            return self._long(input_ids, position_ids, attention_mask, labels, loss_mask, group)
        if teacher_position_ids is None:
            teacher_position_ids = position_ids
        capture = stream == "short"
        self._capture = {"student": {}, "teacher": {}} if capture else None
        if capture and self.measure_attention:
            if token_index is None:
                token_index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            q_meta = torch.stack([document_ids, token_index])
            self._meta = (q_meta, gather_over(group, q_meta, 2) if group is not None else q_meta)
            self._qk = {}
        weights = token_weights(document_ids, group)
        try:
            run = self.student.forward_hidden if self.post_process else self.student
            hs = run(input_ids, position_ids, attention_mask)  # [s, b, h_S]
            with torch.no_grad():
                trun = self.teacher.forward_hidden if self.post_process else self.teacher
                ht = trun(input_ids, teacher_position_ids, attention_mask)  # [s, b, h_T]
            captured = self._capture
        finally:
            self._capture, self._qk, self._meta = None, None, None
        alpha = self.alpha[stream]
        terms = []
        if capture:
            for number in self.selected:
                if number in captured["student"]:
                    d = cosine_distance(captured["student"][number], captured["teacher"][number], weights)
                    self._record(layer_report_name(stream, number), d.detach(), self._share)
                    terms.append(d)
        if self.post_process:
            d = cosine_distance(hs, ht, weights)
            self._record(layer_report_name(stream, self.num_layers), d.detach(), self._share)
            terms.append(d)
            total = torch.stack(terms).sum()
            # counted once per micro-batch, here; earlier stages add their layers with count 0
            self._record(f"{stream} loss", total.detach(), self._share)
            return alpha * total  # scalar: this micro-batch's (weighted) loss on this stage
        local = torch.stack(terms).sum() if terms else None
        if local is not None:
            self._record(f"{stream} loss", local.detach(), 0.0)  # the last stage counts the micro-batch
            if torch.is_grad_enabled() and hs.requires_grad:
                hs = AttachLoss.apply(hs, alpha * local)
        return torch.cat([hs, ht.to(hs.dtype)], dim=-1)

    def _long(self, input_ids, position_ids, attention_mask, labels, loss_mask, group):
        if self.post_process:
            ce = self.student(input_ids, position_ids, attention_mask, labels=labels)  # [b, s]
            mask = loss_mask.float()
            count = mask.sum()
            if group is not None:  # the whole window's count (CP ranks hold parts of it)
                torch.distributed.all_reduce(count, group=group)
            mean = (ce.float() * mask).sum() / count.clamp(min=1)  # the micro-batch's mean CE
            self._record("long lm loss", mean.detach(), self._share)
            return mean
        hs = self.student(input_ids, position_ids, attention_mask)
        zeros = hs.new_zeros(hs.shape[:-1] + (self.teacher.config.hidden_size,))
        return torch.cat([hs, zeros], dim=-1)
