"""Worker for test_llama4_packed.py (torchrun; prints one JSON line on rank 0).

DESIGN.md §2 packed-window reference for the Llama-4 pieces that see *absolute* position (NoPE
temperature tuning, chunked attention on RoPE layers) plus MoE: every document of a packed
window (global positions) equals a separate pass of that document with positions starting at its
global offset, and the same document at offset 0 differs (the check can fail).

argv: ``tp`` (default; world = TP), ``ref OUT`` (one rank: also saves the weights and the packed
window's logits to OUT) or ``cp OUT`` (world = CP: loads OUT's weights, runs every window through
the CP layout and the ring attention, gathers the logits back into window order, and compares
them with OUT's one-rank logits, also with chunking switched off to show it matters).
"""
import json
import sys
from pathlib import Path

import torch


def main():
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_kd import distributed
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.models import build_model

    mode = sys.argv[1] if len(sys.argv) > 1 else "tp"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    distributed.init_distributed()
    world = torch.distributed.get_world_size()
    tp, cp = (1, world) if mode == "cp" else (world, 1)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
    distributed.init_model_parallel(parallel, seed=7)
    seq, vocab, eos = 64, 256, 1
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, make_vocab_size_divisible_by=64, no_rope_freq=2,
                      attn_temperature_tuning=True, attn_temperature_floor_scale=4, attn_temperature_scale=0.5,
                      attention_chunk_size=8, qk_l2_norm=True, num_moe_experts=4, moe_layer_freq=2,
                      moe_ffn_hidden_size=48, moe_shared_expert_intermediate_size=48)
    model = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq).eval()
    if mode == "cp":
        model.load_state_dict(torch.load(out_dir / "weights.pt"))
    lengths = [5, 19, 1, 27, 12]
    assert sum(lengths) == seq
    tokens = torch.randint(2, vocab, (1, seq), generator=torch.Generator().manual_seed(3))
    tokens[0, torch.tensor(lengths).cumsum(0) - 1] = eos
    doc_ids = document_ids_from_tokens(tokens, eos)
    positions = position_ids_from_document_ids(doc_ids, reset=False)

    def logits(tok, pos):
        docs = document_ids_from_tokens(tok, eos) if tok.shape[1] == seq else torch.zeros_like(tok)
        if cp > 1:
            return cp_logits(tok, pos, docs)
        with torch.no_grad():
            out = model(tok, pos, document_attention_mask(docs))
            return gather_from_tensor_model_parallel_region(out)[..., :vocab]

    def cp_logits(tok, pos, docs):
        """This rank's shard of the window through the model; every rank's logits gathered and
        put back in window order (data/cp_layout.py)."""
        from megatron.core import parallel_state as ps

        from megatron_kd.data.cp_layout import capacity, shard_batch, unshard
        from megatron_kd.models.attention import attention_mask_for_batch

        cap = capacity(tok.shape[1], cp, padding=16)
        batch = {"tokens": tok, "labels": tok, "loss_mask": torch.ones(tok.shape), "position_ids": pos,
                 "document_ids": docs}
        shard = shard_batch(batch, cp, ps.get_context_parallel_rank(), cap)
        with torch.no_grad():
            out = model(shard["tokens"], shard["position_ids"], attention_mask_for_batch(shard))[0]
        parts = [torch.empty_like(out) for _ in range(cp)]
        torch.distributed.all_gather(parts, out.contiguous(), group=ps.get_context_parallel_group())
        return unshard(parts, docs[0], cp, cap)[None, ..., :vocab]

    packed = logits(tokens, positions)
    report = {"tp": tp, "cp": cp, "max_diff": 0.0, "wrong_offset_min_diff": None}
    if mode == "ref" and torch.distributed.get_rank() == 0:
        torch.save(model.state_dict(), out_dir / "weights.pt")
        torch.save(packed, out_dir / "packed.pt")
    if mode == "cp":
        ref = torch.load(out_dir / "packed.pt")
        report["cp_vs_one_rank"] = (packed - ref).abs().max().item()
        for m in model.modules():  # chunked attention off: the comparison must then fail
            if getattr(m, "chunk_size", None):
                m.chunk_size = None
        report["cp_no_chunks_vs_one_rank"] = (logits(tokens, positions) - ref).abs().max().item()
        for m in model.modules():
            if hasattr(m, "chunk_size") and hasattr(m, "temperature") and m.temperature is None:
                m.chunk_size = cfg.attention_chunk_size
    start = 0
    for n in lengths:
        doc = tokens[:, start:start + n]
        alone = logits(doc, torch.arange(n).unsqueeze(0) + start)
        report["max_diff"] = max(report["max_diff"], (alone - packed[:, start:start + n]).abs().max().item())
        if start > 0 and n > 1:  # one token attends to itself alone: no position can matter
            wrong = logits(doc, torch.arange(n).unsqueeze(0))
            d = (wrong - packed[:, start:start + n]).abs().max().item()
            prev = report["wrong_offset_min_diff"]
            report["wrong_offset_min_diff"] = d if prev is None else min(prev, d)
        start += n
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
