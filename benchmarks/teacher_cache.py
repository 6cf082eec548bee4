"""Offline teacher cache: a KD step from the cache vs one with the live teacher, and the cache's size.

    python benchmarks/teacher_cache.py [--seq-length 512 --micro-batch-size 4 --top-k 64 --repeats 5]

Measures, in one run on this machine (single rank; CPU here, the GPU when platform.py finds one),
with kd_step.py's shapes (student 4 x 256, teacher 8 x 384, vocab 8,192):
  CE step        student fwd+bwd, megatron's vocab-parallel CE                  (the alpha=0 baseline)
  live KD step   DistillationModel: teacher fwd + student fwd+bwd + top-k KD + CE (alpha=0.5)
  cache KD step  the window's rows read from a cache written with kd/cache_format.py (memory-mapped),
                 student fwd+bwd + kd/cached_loss.py + CE (alpha=0.5), no teacher
and prints median times with the ratios cache/live and cache/CE. Then, for k = 8, 64, 256, it
writes the same windows' top-k entries to a cache shard and prints the bytes per token of the files
written (.bin + .idx), against the full logits a logit cache would hold (bf16, the paper's vocab).
"""
import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

PAPER_VOCAB = 202_048


def main():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--sizes", default="8,64,256", help="k values whose bytes/token are measured")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_kd import distributed, platform
    from megatron_kd.config import KDConfig, ModelConfig, ParallelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.kd.cache_format import ShardWriter, record_dtype, window_hash
    from megatron_kd.kd.cache_topk import teacher_top_k
    from megatron_kd.kd.cached_loss import cached_kd_loss
    from megatron_kd.kd.distill_model import DistillationModel
    from megatron_kd.kd.losses import kd_objective_loss
    from megatron_kd.kd.pair import freeze
    from megatron_kd.models import build_model

    distributed.init_distributed()
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=0)
    tp_group = ps.get_tensor_model_parallel_group()
    s, b, k, V = args.seq_length, args.micro_batch_size, args.top_k, args.vocab
    student_cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=768)
    teacher_cfg = ModelConfig(num_layers=8, hidden_size=384, num_attention_heads=6, num_query_groups=2,
                              ffn_hidden_size=1152)
    student = build_model(student_cfg, parallel, V, s)
    teacher = freeze(build_model(teacher_cfg, parallel, V, s))
    kd_cfg = KDConfig(alpha=0.5, temperature=1.0, top_k=k)
    live = DistillationModel(student, teacher, kd_cfg, V, tp_group)
    dev = platform.device()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, V, (b, s), generator=g)
    tokens[torch.rand(b, s, generator=g) < 1 / 128] = 2
    doc = document_ids_from_tokens(tokens, 2)
    pos = position_ids_from_document_ids(doc, reset=False)
    labels = torch.roll(tokens, -1, 1)
    hashes = [window_hash(t.numpy()) for t in tokens]
    tokens, pos, labels, mask = (t.to(dev) for t in (tokens, pos, labels, document_attention_mask(doc)))
    loss_mask = torch.ones(b, s, device=dev)

    tmp = Path(tempfile.mkdtemp(prefix="teacher_cache_bench_"))
    with torch.no_grad():
        t_logits = teacher(tokens, pos, mask)  # [b, s, V_pad]

    def write_cache(kk: int) -> Path:
        ids, logp, tail = teacher_top_k(t_logits, tp_group=tp_group, vocab_size=V, top_k=kk)
        w = ShardWriter(tmp / f"k{kk}", kk, s, 0, b)
        w.open()
        w.write(ids.to(torch.int32).cpu().numpy(), logp.cpu().numpy(), tail.cpu().numpy(), hashes)
        w.close()
        return tmp / f"k{kk}"

    stem = write_cache(k)
    import numpy as np

    records = np.memmap(f"{stem}.bin", dtype=record_dtype(k), mode="r")

    def ce_step():
        student(tokens, pos, mask, labels=labels).mean().backward()

    def live_step():
        out = live(tokens, pos, mask, labels=labels, loss_mask=loss_mask)
        loss, _ = kd_objective_loss(out[..., 0], out[..., 1], loss_mask, 0.5)
        loss.backward()

    def cache_step():
        rows = records[: b * s]  # the micro-batch's windows, as the dataset reads them
        ids = torch.from_numpy(rows["ids"].astype("int64")).view(b, s, k).to(dev)
        logp = torch.from_numpy(rows["logp"].copy()).view(b, s, k).to(dev)
        tail = torch.from_numpy(rows["tail"].copy()).view(b, s).to(dev)
        logits = student(tokens, pos, mask)
        kd = cached_kd_loss(logits, ids, logp, tail, tp_group=tp_group, vocab_size=V, top_k=k,
                            loss="renormalized")
        ce = tensor_parallel.vocab_parallel_cross_entropy(
            logits.transpose(0, 1).float().contiguous(), labels.transpose(0, 1).contiguous()).transpose(0, 1)
        loss, _ = kd_objective_loss(kd, ce, loss_mask, 0.5)
        loss.backward()

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            student.zero_grad(set_to_none=True)
            platform.synchronize()
            t0 = time.perf_counter()
            fn()
            platform.synchronize()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    # interleaved so that drift in the machine's load hits every variant alike
    times = {"ce": [], "live": [], "cache": []}
    for _ in range(2):
        for name, fn in (("ce", ce_step), ("live", live_step), ("cache", cache_step)):
            times[name].append(timed(fn))
    t = {name: min(v) for name, v in times.items()}
    print(f"device: {dev}; student {sum(p.numel() for p in student.parameters()):,} params, teacher "
          f"{sum(p.numel() for p in teacher.parameters()):,}; {b} x {s} tokens, vocab {V}, k={k}")
    print(f"CE step            {t['ce'] * 1e3:9.1f} ms")
    print(f"KD step, live      {t['live'] * 1e3:9.1f} ms  ({t['live'] / t['ce']:.2f}x CE)")
    print(f"KD step, cache     {t['cache'] * 1e3:9.1f} ms  ({t['cache'] / t['ce']:.2f}x CE)")
    print(f"cache / live       {t['cache'] / t['live']:.3f}  (live / cache = {t['live'] / t['cache']:.2f}x faster)")

    full = 2 * PAPER_VOCAB  # bytes per token of full bf16 logits at the paper's vocab
    print(f"\ncache size, from the files written ({b} windows x {s} tokens; full bf16 logits at vocab "
          f"{PAPER_VOCAB:,}: {full:,} B/token):")
    print(f"{'k':>5} {'.bin B':>10} {'.idx B':>8} {'B/token':>9} {'full / cache':>13} {'TB per 10B tokens':>18}")
    for kk in (int(x) for x in args.sizes.split(",")):
        if kk > V:
            continue
        st = write_cache(kk)
        nb, ni = Path(f"{st}.bin").stat().st_size, Path(f"{st}.idx").stat().st_size
        per = (nb + ni) / (b * s)
        print(f"{kk:>5} {nb:>10,} {ni:>8,} {per:>9.2f} {full / per:>12.0f}x {per * 1e10 / 1e12:>18.2f}")
    shutil.rmtree(tmp)
    distributed.destroy()


if __name__ == "__main__":
    main()
