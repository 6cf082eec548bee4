"""megatron-core GPTModel whose RoPE follows the position ids it is given.

Subclass of ``megatron.core.models.gpt.GPTModel`` (written against megatron-core 0.16.1): only
``_preprocess`` is extended, replacing the implicit 0..S-1 rotary table with one gathered from
``position_ids``. Everything else (embedding, decoder, output layer, pipeline hand-off) is
megatron-core's own. Every pipeline stage receives ``position_ids``, so stages after the first
rotate with the same positions as the first.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_kd.models.positions import rotary_emb_from_positions


class PositionIdGPTModel(GPTModel):
    #: position ids the last forward actually rotated with ([b, s]); kept so tests can check
    #: what each token received after packing and pipeline hand-off. A reference, not a copy.
    applied_position_ids = None
    _return_hidden = False
    #: dtype of the RoPE angle computation (position x inverse frequency); the analysis audit
    #: sets float64 on an instance to measure what fp32 angles cost.
    rotary_angle_dtype = torch.float32

    def forward_hidden(self, *args, **kwargs):
        """Final hidden states ``[s, b, h]`` (after the final norm) instead of logits, for losses
        that apply the output layer themselves (kd/fused.py) and never form [tokens, V/TP]."""
        self._return_hidden = True
        try:
            return self.forward(*args, **kwargs)
        finally:
            self._return_hidden = False

    def forward_logits(self, *args, **kwargs):
        """Last stage: logits ``[s, b, V/TP]`` in the output layer's own layout.

        megatron's ``_postprocess`` returns ``logits.transpose(0, 1).contiguous()`` ([b, s]): a
        whole-logits copy, and its gradient then reaches the output layer's backward transposed,
        where megatron copies it twice more to make it contiguous. A loss that is per token either
        way (the KD loss) skips all three. Multi-token prediction keeps megatron's path.
        """
        if not self.post_process or self.config.mtp_num_layers is not None:
            return self.forward(*args, **kwargs).transpose(0, 1)
        hidden = self.forward_hidden(*args, **kwargs)  # [s, b, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return logits

    def output_weight(self):
        """The output layer's weight shard ``[V_pad/TP, h]`` (the embedding when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self._return_hidden:
            return hidden_states
        return super()._postprocess(hidden_states, *args, **kwargs)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        if (
            self.position_embedding_type == "rope"
            and position_ids is not None
            and out[1] is not None  # rotary_pos_emb slot; None under flash-decode inference
        ):
            out[1] = rotary_emb_from_positions(
                self.rotary_pos_emb.inv_freq, position_ids, self.rotary_pos_emb.rotary_interleaved,
                dtype=self.rotary_angle_dtype,
            )
            self.applied_position_ids = position_ids
        return tuple(out)
