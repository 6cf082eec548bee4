"""megatron-core GPTModel whose RoPE follows the position ids it is given.

Subclass of ``megatron.core.models.gpt.GPTModel`` (written against megatron-core 0.16.1): only
``_preprocess`` is extended, replacing the implicit 0..S-1 rotary table with one gathered from
``position_ids``. Everything else (embedding, decoder, output layer, pipeline hand-off) is
megatron-core's own. Every pipeline stage receives ``position_ids``, so stages after the first
rotate with the same positions as the first.
"""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_kd.models.positions import rotary_emb_from_positions


class PositionIdGPTModel(GPTModel):
    #: position ids the last forward actually rotated with ([b, s]); kept so tests can check
    #: what each token received after packing and pipeline hand-off. A reference, not a copy.
    applied_position_ids = None

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        if (
            self.position_embedding_type == "rope"
            and position_ids is not None
            and out[1] is not None  # rotary_pos_emb slot; None under flash-decode inference
        ):
            out[1] = rotary_emb_from_positions(
                self.rotary_pos_emb.inv_freq, position_ids, self.rotary_pos_emb.rotary_interleaved
            )
            self.applied_position_ids = position_ids
        return tuple(out)
