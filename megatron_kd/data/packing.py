"""Position handling for packed windows: THE place that decides documents, positions and masks.

A window is a concatenation of documents, each ending in EOS; a new document starts at the token
after an EOS, and the piece at the window start is its own document (DESIGN.md §2). Everything here
is vectorised over ``[..., s]`` (cumsum / cummax tricks), so it runs per micro-batch on device.
"""
from __future__ import annotations

import torch


def document_ids_from_tokens(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[..., s]`` token ids -> ``[..., s]`` int64 document index 0, 1, 2, ... within the window.

    Exclusive cumsum of the EOS indicator: the EOS itself belongs to the document it ends.
    """
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=-1) - is_eos


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """``[..., s]`` bool, True where a document starts (position 0 always does)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return starts


def position_ids_from_document_ids(document_ids: torch.Tensor, reset: bool) -> torch.Tensor:
    """``[..., s]`` -> ``[..., s]`` int64 positions.

    ``reset=False``: global positions 0..s-1 across document boundaries (the default, so a
    document's positions are its offset in the window). ``reset=True`` (Megatron's
    ``reset_position_ids``): restart at 0 at each document start.
    """
    s = document_ids.shape[-1]
    pos = torch.arange(s, device=document_ids.device, dtype=torch.long).expand(document_ids.shape)
    if not reset:
        return pos.clone()
    # index of the current document's first token = running max of start indices
    start_idx = torch.where(document_starts(document_ids), pos, torch.zeros_like(pos))
    return pos - torch.cummax(start_idx, dim=-1).values


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` (or ``[s]``) -> bool ``[b, 1, s, s]``, True = MASKED OUT (megatron convention).

    Query i may attend key j iff same document and j <= i. O(s²) memory: build it once per
    micro-batch and share it between teacher and student (and all layers).
    """
    if document_ids.dim() == 1:
        document_ids = document_ids.unsqueeze(0)
    s = document_ids.shape[-1]
    same_doc = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)  # [b, s(i), s(j)]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return (~(same_doc & causal)).unsqueeze(1)


def loss_mask_from_tokens(tokens: torch.Tensor, eos_id: int, eod_mask_loss: bool) -> torch.Tensor:
    """``[..., s]`` float32: 1, or 0 on EOS positions when ``eod_mask_loss`` (their label is the
    next document's first token, a prediction across documents)."""
    mask = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss:
        mask[tokens == eos_id] = 0.0
    return mask
