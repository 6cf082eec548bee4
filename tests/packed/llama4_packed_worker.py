"""Worker for test_llama4_packed.py (torchrun; prints one JSON line on rank 0).

DESIGN.md §2 packed-window reference for the Llama-4 pieces that see *absolute* position (NoPE
temperature tuning, chunked attention on RoPE layers) plus MoE: every document of a packed
window (global positions) equals a separate pass of that document with positions starting at its
global offset, and the same document at offset 0 differs (the check can fail).
"""
import json

import torch


def main():
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_kd import distributed
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.models import build_model

    distributed.init_distributed()
    tp = torch.distributed.get_world_size()
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    distributed.init_model_parallel(parallel, seed=7)
    seq, vocab, eos = 64, 256, 1
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, make_vocab_size_divisible_by=64, no_rope_freq=2,
                      attn_temperature_tuning=True, attn_temperature_floor_scale=4, attn_temperature_scale=0.5,
                      attention_chunk_size=8, qk_l2_norm=True, num_moe_experts=4, moe_layer_freq=2,
                      moe_ffn_hidden_size=48, moe_shared_expert_intermediate_size=48)
    model = build_model(cfg, parallel, vocab_size=vocab, seq_length=seq).eval()
    lengths = [5, 19, 1, 27, 12]
    assert sum(lengths) == seq
    tokens = torch.randint(2, vocab, (1, seq), generator=torch.Generator().manual_seed(3))
    tokens[0, torch.tensor(lengths).cumsum(0) - 1] = eos
    doc_ids = document_ids_from_tokens(tokens, eos)
    positions = position_ids_from_document_ids(doc_ids, reset=False)

    def logits(tok, pos):
        mask = document_attention_mask(document_ids_from_tokens(tok, eos) if tok.shape[1] == seq
                                       else torch.zeros_like(tok))
        with torch.no_grad():
            return gather_from_tensor_model_parallel_region(model(tok, pos, mask))[..., :vocab]

    packed = logits(tokens, positions)
    report = {"tp": tp, "max_diff": 0.0, "wrong_offset_min_diff": None}
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
