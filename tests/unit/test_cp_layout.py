"""The context-parallel layout (data/cp_layout.py) against a python-loop reference of TE's
THD/CP partitioning: each document padded to 2·CP, chunks r and 2·CP−1−r on rank r."""
from __future__ import annotations

import pytest
import torch

from megatron_kd.data.cp_layout import (capacity, layout_indices, plan_segments, shard_batch,
                                         thd_cu_seqlens, unshard)
from megatron_kd.data.packing import (document_ids_from_tokens, loss_mask_from_tokens,
                                      position_ids_from_document_ids)


def reference_rank_indices(doc_lengths, cp, cap, rank):
    """Straight loops: per document, padded length, chunk size, chunks r and 2cp-1-r."""
    unit = 2 * cp
    padded = [-(-n // unit) * unit for n in doc_lengths]
    padded[-1] += cap - sum(padded)
    out, start = [], 0
    for n, size in zip(doc_lengths, padded):
        c = size // unit
        for chunk in (rank, unit - 1 - rank):
            for j in range(chunk * c, (chunk + 1) * c):
                out.append(start + j if j < n else -1)
        start += n
    return out


@pytest.mark.parametrize("cp", [2, 4])
def test_layout_matches_reference_partitioning(cp):
    lengths = [7, 23, 1, 30, 12, 23]  # 96 tokens, a 1-token document
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    cap = capacity(96, cp, padding=48)
    index, n_segments = layout_indices(doc, cp, cap)
    assert n_segments == len(lengths)  # the budget suffices: one segment per document
    assert index.shape == (cp, cap // cp)
    for r in range(cp):
        assert index[r].tolist() == reference_rank_indices(lengths, cp, cap, r)
    real = index[index >= 0]
    assert sorted(real.tolist()) == list(range(96))  # every token exactly once


def test_over_budget_merges_tail_segments():
    lengths = [3, 5, 3, 5, 3, 5]  # each document needs padding at CP=2
    segs, sizes = plan_segments(lengths, 2, 24)  # no padding budget at all
    assert sum(sizes) == 24 and all(s % 4 == 0 for s in sizes)
    assert sum(segs) == 24 and len(segs) < len(lengths)
    assert segs[:-1] == lengths[: len(segs) - 1]  # only tail documents merged
    # one segment for the whole window always fits
    assert plan_segments([24], 2, 24) == ([24], [24])


def test_shard_batch_carries_everything_and_unshards():
    torch.manual_seed(0)
    s, eos, cp = 64, 1, 2
    tokens = torch.randint(2, 50, (2, s))
    tokens[0, [9, 10, 30, 41]] = eos
    tokens[1, [62]] = eos
    doc = document_ids_from_tokens(tokens, eos)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": loss_mask_from_tokens(tokens, eos, True), "document_ids": doc,
             "position_ids": position_ids_from_document_ids(doc, reset=False),
             # an extra per-token tensor (LongReD's teacher positions) and a non-tensor mark
             "teacher_position_ids": position_ids_from_document_ids(doc, reset=True), "stream": "s2l"}
    cap = capacity(s, cp, padding=8)
    shards = [shard_batch(batch, cp, r, cap) for r in range(cp)]
    for sh in shards:
        assert sh.pop("stream") == "s2l"
        assert all(v.shape == (2, cap // cp) for v in sh.values())
        pad = sh["document_ids"] == -1
        assert (sh["loss_mask"][pad] == 0).all()
        # global positions travel with the tokens: position == window index for real tokens
        assert torch.equal(sh["position_ids"][~pad], sh["token_index"][~pad])
        assert (sh["token_index"][pad] >= s).all()
    # token_index is unique across the whole layout (padding too)
    all_index = torch.cat([sh["token_index"] for sh in shards], dim=1)
    assert all(len(set(row.tolist())) == row.numel() for row in all_index)
    for i in range(2):
        for key in ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "teacher_position_ids"):
            back = unshard([sh[key][i] for sh in shards], doc[i], cp, cap)
            assert torch.equal(back, batch[key][i]), key


def test_capacity_rounding():
    assert capacity(64, 1) == 64
    assert capacity(64, 2, padding=0) == 64
    assert capacity(64, 2, padding=5) == 72  # multiple of 2*CP
    assert capacity(64, 2, tp_size=2, padding=1) == 72  # multiple of 2*CP*TP (sequence parallel)
    assert capacity(131072, 8) == 131072 + 8192


def test_thd_cu_seqlens_for_te():
    from megatron_kd.data.cp_layout import thd_cu_seqlens
    from megatron_kd.data.errors import DataError

    lengths = [[7, 23, 1, 33], [64]]
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(c)), torch.tensor(c)) for c in lengths])
    # no CP: one sequence per document, no padding, windows flattened window-major
    cu = thd_cu_seqlens(doc, 1, 64)
    assert cu.dtype == torch.int32
    assert cu[0].tolist() == cu[1].tolist() == [0, 7, 30, 31, 64, 128]
    # CP=2: padded to multiples of 4; the last sequence of a window absorbs the tail capacity
    cu = thd_cu_seqlens(doc, 2, 80)
    assert cu[0].tolist() == [0, 7, 30, 31, 64, 128]
    assert cu[1].tolist() == [0, 8, 32, 36, 80, 160]
    assert all((b - a) % 4 == 0 for a, b in zip(cu[1].tolist(), cu[1].tolist()[1:]))
    with pytest.raises(DataError, match="parallel.context_parallel_padding"):
        thd_cu_seqlens(doc, 2, 64)  # no room for per-document padding: TE would mix documents


@pytest.mark.parametrize("reset", [False, True])
def test_chunked_cu_seqlens_equal_the_dense_chunk_mask(reset):
    """Llama-4 chunked attention on TE's THD path: the documents cut at chunk starts give exactly
    the local spec's mask (same document, same pos // C, causal) -- global or reset positions."""
    from megatron_kd.data.packing import document_attention_mask
    from megatron_kd.models.te_thd import chunked_cu_seqlens

    torch.manual_seed(1)
    b, s, C = 2, 64, 8
    doc = torch.zeros(b, s, dtype=torch.long)
    for row, cuts in zip(doc, ([5, 19, 20, 47], [30])):  # documents of 5, 14, 1, 27, 17 / 30, 34
        for c in cuts:
            row[c:] += 1
    pos = position_ids_from_document_ids(doc, reset=reset)
    cu = chunked_cu_seqlens(thd_cu_seqlens(doc, 1, s), pos, C)
    seg = torch.zeros(b * s, dtype=torch.long)
    seg[cu[0, 1:-1].long()] = 1
    seg = seg.cumsum(0).view(b, s)  # THD sequence id of every token
    chunk = pos // C
    want = document_attention_mask(doc) | (chunk[:, None, :, None] != chunk[:, None, None, :])
    assert torch.equal(document_attention_mask(seg), want)
    assert len(cu[0]) - 1 > 7  # chunks really cut documents (7 documents in all)
    with pytest.raises(ValueError, match="unpadded"):
        chunked_cu_seqlens(thd_cu_seqlens(doc, 2, capacity(s, 2, padding=16)), pos, C)
