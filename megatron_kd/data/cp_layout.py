"""Context-parallel layout of packed windows: which tokens each CP rank holds, in which order.

The layout is TE's THD/CP one (``thd_get_partitioned_indices``), so the CPU ring attention and
TE's ``cp_comm_type: p2p`` see the same tokens on the same rank: every *segment* (a document)
is padded to a multiple of ``2·CP`` and cut into ``2·CP`` equal chunks; CP rank ``r`` takes
chunks ``r`` and ``2·CP−1−r`` of every segment (the early, cheap causal chunk with the late,
expensive one, so each rank does the same attention work). A rank's tokens are its chunk pairs
of segment 0, 1, ... concatenated.

A window has a fixed *capacity* ``C = seq_length + padding`` so every rank's length ``C/CP`` is
the same for every micro-batch (pipeline p2p buffers are fixed-shape). Per-document padding
costs up to ``2·CP−1`` slots per document; if a window's documents need more than the budget,
its last segments are merged (from the tail) until they fit — one segment of the whole window
needs no padding, so every window fits. Merging only changes load balance on the local ring
attention (masks come from document ids, not segments); TE's THD masks by segment, so the TE
path refuses a merged window (raise the budget).

Everything that describes a token travels with it: tokens, labels, loss mask, position ids
(GLOBAL positions: a document keeps its offset in the window) and document ids, plus
``token_index`` (the token's index in the original window), which the ring attention uses for
causality. Padding slots get token/label/position 0, loss mask 0, document id −1 and a
``token_index`` of ``seq_length + slot`` (unique, so a padding query attends at least itself
and never a real token).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

PAD_DOCUMENT = -1


def capacity(seq_length: int, cp_size: int, tp_size: int = 1, padding: Optional[int] = None) -> int:
    """Tokens per window in the CP layout (all ranks together), a multiple of ``2·CP·TP`` so each
    rank's ``C/CP`` also splits over TP under sequence parallelism.

    ``padding`` (``parallel.context_parallel_padding``): slots for per-document padding; None =
    seq_length/16 (at 128k tokens of ~2k-token documents, CP=8: 64 documents need ≤ 960 of the
    8,192 slots).
    """
    if cp_size == 1:
        return seq_length
    unit = 2 * cp_size * tp_size
    pad = seq_length // 16 if padding is None else padding
    return -(-(seq_length + pad) // unit) * unit


def segment_lengths(document_ids: torch.Tensor) -> List[int]:
    """``[s]`` document ids -> lengths of the consecutive documents, in order."""
    _, counts = torch.unique_consecutive(document_ids, return_counts=True)
    return counts.tolist()


def plan_segments(doc_lengths: List[int], cp_size: int, cap: int) -> Tuple[List[int], List[int]]:
    """Documents -> (segment lengths, padded segment lengths summing to ``cap``).

    Per-document padding to a multiple of 2·CP; over budget, the last two segments merge until
    the padded total fits; the leftover capacity pads the last segment."""
    unit = 2 * cp_size
    segs = list(doc_lengths)
    padded = lambda n: -(-n // unit) * unit  # noqa: E731
    while sum(padded(n) for n in segs) > cap:
        if len(segs) == 1:
            raise ValueError(f"window of {segs[0]} tokens does not fit a CP capacity of {cap}")
        segs[-2:] = [segs[-2] + segs[-1]]
    sizes = [padded(n) for n in segs]
    sizes[-1] += cap - sum(sizes)
    return segs, sizes


def layout_indices(document_ids: torch.Tensor, cp_size: int, cap: int) -> Tuple[torch.Tensor, int]:
    """``[s]`` document ids -> (``[cp, cap/cp]`` window index of every slot, −1 = padding;
    number of segments). Row ``r`` is CP rank ``r``'s tokens in its local order."""
    segs, sizes = plan_segments(segment_lengths(document_ids), cp_size, cap)
    unit = 2 * cp_size
    rows: List[List[torch.Tensor]] = [[] for _ in range(cp_size)]
    start = 0
    for n, size in zip(segs, sizes):
        chunk = size // unit
        slots = torch.arange(size)
        index = torch.where(slots < n, start + slots, torch.full_like(slots, -1))  # [size]
        chunks = index.view(unit, chunk)
        for r in range(cp_size):
            rows[r] += [chunks[r], chunks[unit - 1 - r]]
        start += n
    return torch.stack([torch.cat(r) for r in rows]), len(segs)


def shard_batch(batch: Dict[str, torch.Tensor], cp_size: int, cp_rank: int, cap: int) -> Dict[str, torch.Tensor]:
    """A micro-batch of whole windows (``[b, s]`` per key) -> this CP rank's ``[b, cap/cp]``
    tokens with everything that describes them (every other ``[b, s]`` tensor too, padded with 0),
    plus ``token_index``."""
    tokens = batch["tokens"]
    b, s = tokens.shape
    local = cap // cp_size
    pad_index = s + cp_rank * local + torch.arange(local)  # unique per slot of the whole layout
    fill = {"tokens": 0, "labels": 0, "loss_mask": 0.0, "position_ids": 0, "document_ids": PAD_DOCUMENT}
    out = {k: [] for k in (*fill, "token_index")}
    rows = []
    for i in range(b):
        index = layout_indices(batch["document_ids"][i], cp_size, cap)[0][cp_rank]  # [local]
        real = index >= 0
        safe = index.clamp(min=0)
        rows.append((real, safe))
        for key, value in fill.items():
            row = batch[key][i]
            out[key].append(torch.where(real, row[safe], torch.full_like(row[safe], value)))
        out["token_index"].append(torch.where(real, index, pad_index))
    # any other per-token tensor (e.g. LongReD's teacher_position_ids) travels with its tokens
    for key, value in batch.items():
        if key not in out and torch.is_tensor(value) and tuple(value.shape) == (b, s):
            out[key] = [torch.where(real_i, row[safe_i], torch.zeros_like(row[safe_i]))
                        for row, (real_i, safe_i) in zip(value, rows)]
    extra = {k: v for k, v in batch.items() if k not in out}
    return {**extra, **{k: torch.stack(v) for k, v in out.items()}}


def unshard(values: List[torch.Tensor], document_ids: torch.Tensor, cp_size: int, cap: int) -> torch.Tensor:
    """Inverse of the layout for one window: ``cp`` tensors ``[cap/cp, ...]`` (rank order) ->
    ``[s, ...]`` in window order (padding dropped). For tests and debugging."""
    index = layout_indices(document_ids, cp_size, cap)[0].reshape(-1)
    flat = torch.cat(values)
    real = index >= 0
    out = torch.empty((document_ids.shape[0],) + flat.shape[1:], dtype=flat.dtype)
    out[index[real]] = flat[real]
    return out


def cp_capacity(cfg) -> int:
    """The run's CP window capacity (``seq_length`` when CP = 1)."""
    p = cfg.parallel
    return capacity(cfg.data.seq_length, p.context_parallel_size,
                    p.tensor_model_parallel_size if p.sequence_parallel else 1,
                    p.context_parallel_padding)


def thd_cu_seqlens(document_ids: torch.Tensor, cp_size: int, cap: int) -> torch.Tensor:
    """``[b, s]`` whole-window document ids -> int32 ``[2, n+1]``: (``cu_seqlens``,
    ``cu_seqlens_padded``) of TE's THD format over the micro-batch's windows flattened
    window-major, one sequence per document. Refuses a window whose per-document padding does not
    fit the budget (TE masks by sequence, so merged segments would attend across documents)."""
    from megatron_kd.data.errors import DataError

    real, padded = [0], [0]
    for row in document_ids:
        docs = segment_lengths(row)
        segs, sizes = plan_segments(docs, cp_size, cap) if cp_size > 1 else (docs, docs)
        if len(segs) != len(docs):
            raise DataError(
                f"a window has {len(docs)} documents whose padding to multiples of 2 x CP = "
                f"{2 * cp_size} exceeds parallel.context_parallel_padding (capacity {cap}); raise it")
        for n, size in zip(segs, sizes):
            real.append(real[-1] + n)  # cumulative real lengths
            padded.append(padded[-1] + size)  # offsets in the (padded) token tensor
    return torch.tensor([real, padded], dtype=torch.int32)


def layout_batches(batches, cfg):
    """The run's micro-batch iterator in the attention backend's layout: this CP rank's shard
    when CP > 1 (every CP rank of a data-parallel replica reads the same windows: megatron's DP
    rank excludes CP), and TE's THD ``cu_seqlens`` on the TE spec. Unchanged otherwise."""
    from megatron_kd import platform

    if cfg.teacher is not None and cfg.teacher.reset_position_ids and cfg.kd.alpha > 0:
        batches = with_teacher_positions(batches)
    cp = cfg.parallel.context_parallel_size
    te = platform.layer_spec_kind() == "te"
    if cp == 1 and not te:
        return batches
    return _layout(batches, cfg, cp, te)


def with_teacher_positions(batches):
    """Add ``teacher_position_ids``: per-document (reset) positions of the whole window, for the
    position-invariant teacher control (teacher.reset_position_ids). Formed before any CP shard is
    cut, so every shard carries its tokens' own (shard_batch moves every [b, s] tensor)."""
    from megatron_kd.data.packing import position_ids_from_document_ids

    for batch in batches:
        yield {**batch, "teacher_position_ids": position_ids_from_document_ids(batch["document_ids"], reset=True)}


def _layout(batches, cfg, cp, te):
    from megatron.core import parallel_state as ps

    rank = ps.get_context_parallel_rank() if cp > 1 else 0
    cap = cp_capacity(cfg)
    for batch in batches:
        cu = thd_cu_seqlens(batch["document_ids"], cp, cap) if te else None
        if cp > 1:
            batch = shard_batch(batch, cp, rank, cap)
        if cu is not None:
            batch = {**batch, "thd_cu_seqlens": cu}
        yield batch
