"""Worker for test_context_parallel.py (torchrun, gloo): ring attention fwd+bwd on this rank's CP
shard vs dense document-masked attention over the whole window (float64, autograd).

Rank 0 prints one ``RESULT [json per rank]`` line: max abs errors of the output and of dq/dk/dv on the
rank's real (non-padding) tokens, and how many tokens the rank held.
"""
import json
import sys

import torch


def dense_reference(q, k, v, doc, dout, scale):
    """q [s, b, np, d], k/v [s, b, ng, d], doc [b, s] -> out and grads (float64)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) * scale
    s = q.shape[0]
    allowed = (doc[:, :, None] == doc[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv)  # [s, b, np, d]
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def main():
    from megatron_kd.data.cp_layout import capacity, layout_indices
    from megatron_kd.models.ring_attention import ring_attention

    budget = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    torch.distributed.init_process_group("gloo")
    rank, cp = torch.distributed.get_rank(), torch.distributed.get_world_size()
    group = torch.distributed.new_group(list(range(cp)))
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    s, b, nq, ng, d = 48, 2, 4, 2, 8
    # two windows with different document cuts, a 1-token document included
    cuts = [[5, 11, 1, 19, 12], [30, 18]]
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(c)), torch.tensor(c)) for c in cuts])
    q = torch.randn(s, b, nq, d, generator=g)
    k = torch.randn(s, b, ng, d, generator=g)
    v = torch.randn(s, b, ng, d, generator=g)
    dout = torch.randn(s, b, nq, d, generator=g)
    scale = d ** -0.5
    ref_out, ref_dq, ref_dk, ref_dv = dense_reference(q, k, v, doc, dout, scale)

    cap = capacity(s, cp, padding=budget)
    idx = torch.stack([layout_indices(doc[i], cp, cap)[0][rank] for i in range(b)], dim=1)  # [l, b]
    real = idx >= 0
    safe = idx.clamp(min=0)
    bi = torch.arange(b)[None, :].expand_as(idx)

    def take(t):  # [s, b, ...] -> this rank's [l, b, ...] (padding slots get zeros)
        return t[safe, bi] * real[..., None, None]

    pad_index = s + rank * idx.shape[0] + torch.arange(idx.shape[0])[:, None]
    meta = torch.stack([torch.where(real, doc.T[safe, bi], torch.full_like(idx, -1)).T,
                        torch.where(real, idx, pad_index).T])  # [2, b, l]
    ql, kl, vl = (take(t).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, meta, scale, group, list(range(cp)))  # [l, b, nq*d]
    out.backward(take(dout).reshape(out.shape))

    def err(got, ref):
        return (got.double()[real] - ref[safe, bi][real]).abs().max().item()

    row = {
        "rank": rank, "real_tokens": int(real.sum()), "slots": int(real.numel()),
        "out": err(out.view(-1, b, nq, d), ref_out), "dq": err(ql.grad, ref_dq),
        "dk": err(kl.grad, ref_dk), "dv": err(vl.grad, ref_dv),
        "out_scale": ref_out.abs().max().item(), "grad_scale": ref_dk.abs().max().item(),
    }
    rows = [None] * cp  # one line from rank 0: lines printed by two ranks can interleave
    torch.distributed.all_gather_object(rows, row)
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
