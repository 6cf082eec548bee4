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
per-layer attention KL (losses.attention_kl via pre-hooks on core attention).
"""
from __future__ import annotations

import torch

from megatron_kd.kd.pair import StudentTeacherPair
from megatron_kd.longred.losses import AttachLoss, attention_kl, attention_probs, cosine_distance


def layer_report_name(stream: str, layer: int) -> str:
    return f"{stream} cos-loss layer {layer}"


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
        self._probs = None
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
            if self._probs is not None:
                query, key, _, mask = args[:4]
                with torch.no_grad():
                    self._probs[who][number] = attention_probs(query, key, mask, attn.softmax_scale)
        return hook

    def _record(self, name: str, value, count: float = 1.0):
        """Accumulate [sum, count] on the value's device (no host sync per micro-batch)."""
        v = torch.as_tensor(value).detach().to(torch.float64).reshape(())
        entry = torch.stack([v, torch.full_like(v, count)])
        self.reports[name] = self.reports[name] + entry if name in self.reports else entry

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                stream: str = "long", teacher_position_ids=None):
        if stream == "long":
            return self._long(input_ids, position_ids, attention_mask, labels, loss_mask)
        if teacher_position_ids is None:
            teacher_position_ids = position_ids
        capture = stream == "short"
        self._capture = {"student": {}, "teacher": {}} if capture else None
        measure = capture and self.measure_attention
        self._probs = {"student": {}, "teacher": {}} if measure else None
        try:
            run = self.student.forward_hidden if self.post_process else self.student
            hs = run(input_ids, position_ids, attention_mask)  # [s, b, h_S]
            with torch.no_grad():
                trun = self.teacher.forward_hidden if self.post_process else self.teacher
                ht = trun(input_ids, teacher_position_ids, attention_mask)  # [s, b, h_T]
            captured, probs = self._capture, self._probs
        finally:
            self._capture, self._probs = None, None
        alpha = self.alpha[stream]
        terms = []
        if capture:
            for number in self.selected:
                if number in captured["student"]:
                    d = cosine_distance(captured["student"][number], captured["teacher"][number])
                    self._record(layer_report_name(stream, number), d.detach())
                    terms.append(d)
        if measure:
            for number, p_s in probs["student"].items():
                self._record(f"attention kl layer {number}", attention_kl(probs["teacher"][number], p_s))
        if self.post_process:
            d = cosine_distance(hs, ht)
            self._record(layer_report_name(stream, self.num_layers), d.detach())
            terms.append(d)
            total = torch.stack(terms).sum()
            # counted once per micro-batch, here; earlier stages add their layers with count 0
            self._record(f"{stream} loss", total.detach(), 1.0)
            return alpha * total  # scalar: this micro-batch's (weighted) loss on this stage
        local = torch.stack(terms).sum() if terms else None
        if local is not None:
            self._record(f"{stream} loss", local.detach(), 0.0)  # the last stage counts the micro-batch
            if torch.is_grad_enabled() and hs.requires_grad:
                hs = AttachLoss.apply(hs, alpha * local)
        return torch.cat([hs, ht.to(hs.dtype)], dim=-1)

    def _long(self, input_ids, position_ids, attention_mask, labels, loss_mask):
        if self.post_process:
            ce = self.student(input_ids, position_ids, attention_mask, labels=labels)  # [b, s]
            mask = loss_mask.float()
            mean = (ce.float() * mask).sum() / mask.sum().clamp(min=1)  # the micro-batch's mean CE
            self._record("long lm loss", mean.detach())
            return mean
        hs = self.student(input_ids, position_ids, attention_mask)
        zeros = hs.new_zeros(hs.shape[:-1] + (self.teacher.config.hidden_size,))
        return torch.cat([hs, zeros], dim=-1)
