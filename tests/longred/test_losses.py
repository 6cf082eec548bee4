"""LongReD's loss helpers as pure functions (no megatron-core): the per-document attention KL
equals the dense one, whatever order the tokens arrive in (a CP rank's shard with gathered keys),
and the token weights make CP shards add up to the window's mean."""
import torch

from megatron_kd.data.cp_layout import PAD_DOCUMENT
from megatron_kd.longred.losses import (attention_kl, attention_kl_by_document, attention_probs,
                                        cosine_distance, token_weights)
from megatron_kd.models.attention import attention_mask

S, B, NP, NG, D = 24, 2, 4, 2, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = [(torch.randn(S, B, NP, D, generator=g, dtype=torch.float64),
           torch.randn(S, B, NG, D, generator=g, dtype=torch.float64)) for _ in range(2)]
    docs = torch.zeros(B, S, dtype=torch.long)
    docs[0, 7:] = 1
    docs[0, 15:] = 2
    docs[1, 20:] = 1
    return qk, docs


def test_by_document_equals_dense_kl():
    (student, teacher), docs = _inputs()
    mask, scale = attention_mask(docs), D ** -0.5
    dense = attention_kl(attention_probs(*teacher, mask, scale), attention_probs(*student, mask, scale))
    meta = torch.stack([docs, torch.arange(S).expand(B, S)])
    total, rows = attention_kl_by_document(student, teacher, meta, meta, scale)
    assert rows == B * NP * S
    assert dense.item() > 1e-3  # different q/k: the KL is not trivially 0
    # both compute in fp32 (as in training); a wrong mask or row count is off by > 1e-2
    assert abs(total.item() / rows - dense.item()) < 1e-5 * dense.item()


def test_by_document_order_free_and_skips_padding():
    """Queries of one CP rank (a subset, permuted) against every rank's keys (another order), with
    padding slots: the causality comes from the window index, not the tensor position."""
    (student, teacher), docs = _inputs(1)
    scale = D ** -0.5
    index = torch.arange(S).expand(B, S)
    full = attention_kl_by_document(student, teacher, torch.stack([docs, index]),
                                    torch.stack([docs, index]), scale)
    g = torch.Generator().manual_seed(2)
    kperm = torch.randperm(S, generator=g)
    kpad = torch.cat([kperm, kperm[:3]])  # 3 padding slots (doc -1) among the keys
    k_meta = torch.stack([docs[:, kpad], index[:, kpad]])
    k_meta[0, :, S:] = PAD_DOCUMENT
    totals, rows = 0.0, 0
    for part in torch.randperm(S, generator=g).chunk(2):  # two "CP ranks" of queries
        q_meta = torch.stack([docs[:, part], index[:, part]])
        s_qk = (student[0][part], student[1][kpad])
        t_qk = (teacher[0][part], teacher[1][kpad])
        t, r = attention_kl_by_document(s_qk, t_qk, q_meta, k_meta, scale)
        totals, rows = totals + t.item(), rows + r
    assert rows == full[1]
    assert abs(totals - full[0].item()) < 1e-5 * full[0].item()


def test_token_weights_split_like_cp():
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(S, B, 16, generator=g), torch.randn(S, B, 16, generator=g)
    docs = torch.zeros(B, S, dtype=torch.long)
    whole = cosine_distance(hs, ht)
    assert torch.allclose(cosine_distance(hs, ht, token_weights(docs)), whole, rtol=1e-6)
    # padding slots weigh nothing
    padded = torch.cat([docs, torch.full((B, 4), PAD_DOCUMENT)], 1)
    hs_p = torch.cat([hs, torch.randn(4, B, 16, generator=g)])
    ht_p = torch.cat([ht, torch.randn(4, B, 16, generator=g)])
    assert torch.allclose(cosine_distance(hs_p, ht_p, token_weights(padded)), whole, rtol=1e-6)
