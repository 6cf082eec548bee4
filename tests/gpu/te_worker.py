"""GPU worker for tests/gpu (torchrun, NCCL, transformer-engine). NOT RUN in the session that
wrote it (no GPU there). Prints one ``RESULT {json}`` line per rank.

    te_worker.py packed       # 1 rank: DESIGN.md per-document reference on the TE THD path
    te_worker.py cp_vs_ring   # 2 ranks: TE's CP (p2p) attention vs models/ring_attention.py
    te_worker.py generate     # 1 rank: KV-cache decoding and loss by position on the TE spec
    te_worker.py llama4_thd   # 1 rank: Llama-4 pieces (chunks as THD sequences) vs the dense mask
"""
import json
import sys

import torch


def packed_reference():
    """Every document of a packed window (TE THD, global positions) equals its own forward at its
    global offset; a learned-absolute model proves that a wrong offset fails."""
    from megatron_kd import distributed, platform
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.cp_layout import thd_cu_seqlens
    from megatron_kd.data.packing import document_ids_from_tokens, position_ids_from_document_ids
    from megatron_kd.models import build_model

    distributed.init_distributed()
    assert platform.layer_spec_kind() == "te", "needs CUDA + transformer-engine"
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=7)
    seq, vocab, eos = 256, 250, 1
    lengths = [17, 63, 1, 90, 40, 45]
    assert sum(lengths) == seq
    out = {}
    for pos_type in ("rope", "learned_absolute"):
        cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=256, make_vocab_size_divisible_by=64, kv_channels=32,
                          position_embedding_type=pos_type, max_position_embeddings=seq)
        model = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq, bf16=True).eval()
        if pos_type == "learned_absolute":
            with torch.no_grad():
                model.embedding.position_embeddings.weight.normal_(0, 1.0)
        g = torch.Generator().manual_seed(3)
        tokens = torch.randint(2, vocab, (1, seq), generator=g)
        ends = torch.cumsum(torch.tensor(lengths), 0) - 1
        tokens[0, ends] = eos
        doc = document_ids_from_tokens(tokens, eos)
        pos = position_ids_from_document_ids(doc, reset=False)
        dev = platform.device()
        with torch.no_grad():
            packed = model(tokens.to(dev), pos.to(dev), thd_cu_seqlens(doc, 1, seq).to(dev)).float()
            applied_ok = torch.equal(model.applied_position_ids.cpu(), pos)
            worst, wrong_min, start = 0.0, float("inf"), 0
            for n in lengths:
                t = tokens[:, start:start + n].to(dev)
                one = torch.zeros(1, n, dtype=torch.long)
                alone = model(t, torch.arange(start, start + n)[None].to(dev),
                              thd_cu_seqlens(one, 1, n).to(dev)).float()
                ref = packed[:, start:start + n]
                worst = max(worst, ((alone - ref).abs().max() / ref.abs().max()).item())
                if start > 0:
                    wrong = model(t, torch.arange(n)[None].to(dev), thd_cu_seqlens(one, 1, n).to(dev)).float()
                    wrong_min = min(wrong_min, ((wrong - ref).abs().max() / ref.abs().max()).item())
                start += n
        out[pos_type] = {"max_rel_diff": worst, "wrong_offset_min_rel_diff": wrong_min,
                         "positions_applied": applied_ok}
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


def cp_vs_ring():
    """Same q/k/v on 2 CP ranks: TE's THD attention with cp_comm_type p2p vs our ring attention
    (fp32 reference, NCCL), forward and backward, on this rank's tokens."""
    from megatron.core import parallel_state as ps

    from megatron_kd import distributed, platform
    from megatron_kd.config import load_config
    from megatron_kd.data.cp_layout import capacity, layout_indices, thd_cu_seqlens
    from megatron_kd.models.builder import transformer_config
    from megatron_kd.models.ring_attention import ring_attention
    from megatron_kd.models.te_thd import thd_core_attention_class

    distributed.init_distributed()
    cfg = load_config(None, ["parallel.context_parallel_size=2", "model.num_attention_heads=8",
                             "model.num_query_groups=2", "model.hidden_size=512", "train.bf16=true"])
    distributed.init_model_parallel(cfg.parallel, seed=1)
    rank, cp = ps.get_context_parallel_rank(), 2
    dev = platform.device()
    tc = transformer_config(cfg.model, cfg.parallel, bf16=True)
    from megatron.core.transformer.enums import AttnMaskType

    attn = thd_core_attention_class()(tc, layer_number=1, attn_mask_type=AttnMaskType.padding_causal,
                                      attention_type="self", cp_comm_type="p2p").to(dev)
    s, nq, ng, d = 1024, 8, 2, 64
    lengths = [100, 300, 7, 417, 200]
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    cap = capacity(s, cp, padding=64)
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(cap, 1, nq, d, generator=g) for _ in range(2))
    k, v = (torch.randn(cap, 1, ng, d, generator=g) for _ in range(2))
    idx = layout_indices(doc[0], cp, cap)[0]  # [cp, cap/cp] window index per slot (-1 padding)
    # the full tensors are in padded-layout slot order; each rank takes its slots
    mine = torch.arange(cap).view(cp, -1)[rank]
    pick = lambda t: t[mine].to(dev).to(torch.bfloat16).requires_grad_()  # noqa: E731
    ql, kl, vl = pick(q), pick(k), pick(v)
    te_out = attn(ql, kl, vl, thd_cu_seqlens(doc, cp, cap).to(dev))
    te_out.backward(dout[mine].to(dev).to(torch.bfloat16).reshape(te_out.shape))
    real = idx[rank] >= 0
    pad_index = s + torch.arange(cap).view(cp, -1)[rank]
    meta = torch.stack([torch.where(real, doc[0][idx[rank].clamp(min=0)], torch.full_like(idx[rank], -1)),
                        torch.where(real, idx[rank], pad_index)])[:, None].to(dev)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (ql, kl, vl))
    ref = ring_attention(qr, kr, vr, meta, d ** -0.5, ps.get_context_parallel_group(),
                         list(ps.get_context_parallel_global_ranks()))
    ref.backward(dout[mine].to(dev).reshape(ref.shape))
    r = real.to(dev)

    def err(a, b):
        return ((a.float()[r] - b.float()[r]).abs().max() / b.float()[r].abs().max()).item()

    row = {"rank": rank, "out": err(te_out.view(cap // cp, 1, -1), ref),
           "dq": err(ql.grad, qr.grad), "dk": err(kl.grad, kr.grad), "dv": err(vl.grad, vr.grad)}
    rows = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)  # rank 0 prints all: ranks' lines would interleave
    if rank == 0:
        for row in rows:
            print("RESULT " + json.dumps(row), flush=True)
    distributed.destroy()


def generate():
    """The TE spec outside packed windows (THDCoreAttention's sbhd fallback): greedy decoding
    with megatron's static KV cache equals decoding without it, and the loss by position of an
    unpacked window equals the THD forward's (the same window as one document)."""
    import torch.nn.functional as F

    from megatron_kd import distributed, platform
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.cp_layout import thd_cu_seqlens
    from megatron_kd.eval.generate import greedy_generate
    from megatron_kd.eval.perplexity import loss_by_position
    from megatron_kd.models import build_model

    distributed.init_distributed()
    assert platform.layer_spec_kind() == "te", "needs CUDA + transformer-engine"
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=7)
    vocab, seq = 250, 128
    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, make_vocab_size_divisible_by=64, kv_channels=32,
                      init_method_std=0.2)
    # fp32 for decoding (TE's unfused sbhd kernel: cache and no-cache round alike); bf16 for the
    # THD comparison (TE's fused THD kernels need 16-bit inputs)
    model = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq, bf16=False).eval()
    model16 = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq, bf16=True).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, vocab, (12,), generator=g).tolist() for _ in range(3)]
    cached = [r.ids for r in greedy_generate(model, prompts, 16, vocab, use_cache=True)]
    plain = [r.ids for r in greedy_generate(model, prompts, 16, vocab, use_cache=False)]
    window = torch.randint(2, vocab, (1, seq + 1), generator=g)
    by_pos = torch.tensor(loss_by_position(model16, window.tolist(), batch_size=1))
    dev = platform.device()
    tokens, labels = window[:, :-1].to(dev), window[:, 1:].to(dev)
    with torch.no_grad():
        logits = model16(tokens, torch.arange(seq)[None].to(dev),
                       thd_cu_seqlens(torch.zeros(1, seq, dtype=torch.long), 1, seq).to(dev)).float()
    thd = F.cross_entropy(logits[0, :, :vocab], labels[0], reduction="none").cpu()
    print("RESULT " + json.dumps({"cache_equals_no_cache": cached == plain, "generated": cached,
                                  "loss_max_diff": (by_pos - thd).abs().max().item()}), flush=True)
    distributed.destroy()


def llama4_thd():
    """A Llama-4 config (MoE, NoPE + temperature, chunked attention, QK L2 norm) on the TE spec:
    a packed window through THD (chunks cut into sequences: te_thd.chunked_cu_seqlens) equals
    the same window with the dense document|chunk mask (TE's arbitrary-mask kernel)."""
    from megatron_kd import distributed, platform
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.cp_layout import thd_cu_seqlens
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.models import build_model

    distributed.init_distributed()
    assert platform.layer_spec_kind() == "te", "needs CUDA + transformer-engine"
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=7)
    seq, vocab, eos = 256, 250, 1
    cfg = ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, make_vocab_size_divisible_by=64, kv_channels=32,
                      no_rope_freq=2, attn_temperature_tuning=True, attn_temperature_floor_scale=16,
                      attn_temperature_scale=0.5, attention_chunk_size=32, qk_l2_norm=True,
                      num_moe_experts=4, moe_layer_freq=2, moe_ffn_hidden_size=128,
                      moe_shared_expert_intermediate_size=128)
    model = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq, bf16=True).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(2, vocab, (1, seq), generator=g)
    tokens[0, torch.tensor([17, 63, 64, 150, 200, 255]) - 1] = eos
    doc = document_ids_from_tokens(tokens, eos)
    pos = position_ids_from_document_ids(doc, reset=False)
    dev = platform.device()
    with torch.no_grad():
        thd = model(tokens.to(dev), pos.to(dev), thd_cu_seqlens(doc, 1, seq).to(dev)).float()
        dense = model(tokens.to(dev), pos.to(dev), document_attention_mask(doc).to(dev)).float()
    rel = ((thd - dense).abs().max() / dense.abs().max()).item()
    print("RESULT " + json.dumps({"thd_vs_dense_rel": rel}), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    {"packed": packed_reference, "cp_vs_ring": cp_vs_ring, "generate": generate,
     "llama4_thd": llama4_thd}[sys.argv[1]]()
