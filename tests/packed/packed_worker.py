"""Worker for test_packed_reference.py (run under torchrun; prints one JSON line on rank 0).

Every document of a packed window must produce the same logits as a separate forward pass of
that document alone, with position ids starting at its global offset in the window (or at 0
with reset_position_ids). Run at the given TP size with the local (dense document mask) backend.
"""
import json

import torch


def main():
    from megatron_kd import distributed
    from megatron_kd.config import ParallelConfig

    distributed.init_distributed()
    tp = torch.distributed.get_world_size()
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    distributed.init_model_parallel(parallel, seed=7)
    results = {}
    for pos_type in ("rope", "learned_absolute"):
        for mode in ("global", "reset"):
            results[f"{pos_type}/{mode}"] = check(parallel, pos_type, mode == "reset")
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    distributed.destroy()


def check(parallel, pos_type, reset):
    from megatron_kd.config import ModelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.models import build_model

    tp = parallel.tensor_model_parallel_size
    seq, vocab, eos = 96, 250, 1
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, make_vocab_size_divisible_by=64,
                            position_embedding_type=pos_type, max_position_embeddings=seq,
                            rotary_base=10000)
    model = build_model(model_cfg, parallel, vocab_size=vocab, seq_length=seq).eval()
    if pos_type == "learned_absolute":
        # mcore zero-initialises nothing here, but make the table clearly position-dependent.
        with torch.no_grad():
            model.embedding.position_embeddings.weight.normal_(0, 1.0)

    g = torch.Generator().manual_seed(3)
    lengths = [7, 23, 1, 30, 12, 23]  # sums to seq; includes a 1-token document
    assert sum(lengths) == seq
    tokens = torch.randint(2, vocab, (1, seq), generator=g)
    ends = torch.tensor(lengths).cumsum(0) - 1
    tokens[0, ends] = eos
    doc_ids = document_ids_from_tokens(tokens, eos)
    positions = position_ids_from_document_ids(doc_ids, reset=reset)

    with torch.no_grad():
        packed = model(tokens, positions, document_attention_mask(doc_ids))  # [1, s, V/tp]
        received = model.applied_position_ids.clone() if pos_type == "rope" else positions
        report = {"max_diff": 0.0, "wrong_offset_min_diff": None, "positions_ok": True}
        start = 0
        for n in lengths:
            doc = tokens[:, start:start + n]
            offset = 0 if reset else start
            pos = torch.arange(n).unsqueeze(0) + offset
            alone = model(doc, pos, document_attention_mask(torch.zeros_like(doc)))
            diff = (alone - packed[:, start:start + n]).abs().max().item()
            report["max_diff"] = max(report["max_diff"], diff)
            if not torch.equal(received[:, start:start + n], pos):
                report["positions_ok"] = False
            if offset > 0:
                # The same document at offset 0 must differ when the model sees absolute
                # position: proves the comparison above could fail.
                wrong = model(doc, torch.arange(n).unsqueeze(0), document_attention_mask(torch.zeros_like(doc)))
                d = (wrong - packed[:, start:start + n]).abs().max().item()
                prev = report["wrong_offset_min_diff"]
                report["wrong_offset_min_diff"] = d if prev is None else min(prev, d)
            start += n
    report["received_positions"] = received[0].tolist()
    report["tp"] = tp
    # max over TP ranks (each holds a vocab shard of the logits)
    t = torch.tensor([report["max_diff"]], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    report["max_diff"] = t.item()
    return report


if __name__ == "__main__":
    main()
