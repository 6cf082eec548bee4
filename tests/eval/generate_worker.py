"""Worker for test_generate.py: greedy decoding of a tiny model, printed as one JSON line.

``save DIR``: 1 rank, deterministic init, writes the model to DIR (megatron dist_checkpointing,
so another layout can load it), then decodes. ``load DIR [tp|pp]``: TP (default) or PP size =
world size, loads DIR and decodes. Decodes the same prompts with the KV cache (batched, left padding), without the
cache, and with the cache one prompt at a time.
"""
import json
import sys

import torch

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 8, 8], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [64]]
VOCAB = 300
NEW = 12


def main():
    from megatron.core import dist_checkpointing

    from megatron_kd import distributed
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.eval.generate import greedy_generate
    from megatron_kd.models import build_model

    mode, path = sys.argv[1], sys.argv[2]
    distributed.init_distributed()
    world = torch.distributed.get_world_size()
    layout = sys.argv[3] if len(sys.argv) > 3 else "tp"
    parallel = (ParallelConfig(pipeline_model_parallel_size=world) if layout == "pp"
                else ParallelConfig(tensor_model_parallel_size=world))
    distributed.init_model_parallel(parallel, seed=3)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, make_vocab_size_divisible_by=64, rotary_base=10000,
                      init_method_std=0.2)
    model = build_model(cfg, parallel, vocab_size=VOCAB, seq_length=64).eval()
    if mode == "save":
        import os
        os.makedirs(path, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), path)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), path))
    out = {}
    for name, kw in (("cache", dict(use_cache=True, batch_size=8)),
                     ("nocache", dict(use_cache=False, batch_size=8)),
                     ("cache_single", dict(use_cache=True, batch_size=1))):
        res = greedy_generate(model, PROMPTS, NEW, VOCAB, eos_id=None, **kw)
        out[name] = [r.ids for r in res]
    # stop ids: stop at the first token the unrestricted run produced at step 3 of prompt 0
    stop = out["cache"][0][3]
    res = greedy_generate(model, PROMPTS[:1], NEW, VOCAB, stop_ids=[stop])
    out["stopped"] = {"ids": res[0].ids, "stop": res[0].stop, "stop_id": stop}
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
