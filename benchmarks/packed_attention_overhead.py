"""What packing costs on the CPU backend: document mask + explicit global RoPE positions vs
megatron-core's plain causal attention with implicit 0..S-1 positions, same model and tokens.

    python benchmarks/packed_attention_overhead.py [--seq-length 1024 --layers 2 --hidden 256]

Prints the median fwd+bwd step time of each variant and the ratio packed / plain, measured in
one run on this machine (single process, fp32, local spec).
"""
import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from megatron_kd import distributed
    from megatron_kd.config import ModelConfig, ParallelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.models import build_model

    distributed.init_distributed()
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=0)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=3 * args.hidden)
    model = build_model(cfg, parallel, vocab_size=args.vocab, seq_length=args.seq_length)
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (b, s), generator=g)
    tokens[torch.rand(b, s, generator=g) < 1 / 200] = 2  # EOS: ~200-token documents
    labels = torch.roll(tokens, -1, dims=1)

    def packed():
        doc = document_ids_from_tokens(tokens, 2)
        return model(tokens, position_ids_from_document_ids(doc, reset=False),
                     document_attention_mask(doc), labels=labels)

    def plain():
        # stock megatron-core GPTModel behaviour: causal mask built in the softmax, 0..S-1 RoPE
        return model(tokens, None, None, labels=labels)

    def timed(fn):
        times = []
        for i in range(args.repeats + 2):
            t0 = time.perf_counter()
            fn().float().mean().backward()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_plain, t_packed = timed(plain), timed(packed)
    t_plain2 = timed(plain)  # re-measure the baseline to show the noise floor
    print(f"seq_length={s} micro_batch={b} layers={args.layers} hidden={args.hidden} "
          f"threads={torch.get_num_threads()}")
    print(f"plain causal (mcore implicit positions) : {t_plain * 1e3:8.1f} ms / step "
          f"(re-run {t_plain2 * 1e3:.1f} ms)")
    print(f"packed (document mask + global RoPE ids): {t_packed * 1e3:8.1f} ms / step")
    print(f"ratio packed / plain                    : {t_packed / t_plain:8.3f}")
    distributed.destroy()


if __name__ == "__main__":
    main()
