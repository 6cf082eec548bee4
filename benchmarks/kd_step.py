"""KD step vs CE step on the same student: what distillation costs per training step.

    python benchmarks/kd_step.py [--seq-length 512 --micro-batch-size 4 --repeats 5]
    python benchmarks/kd_step.py --demo     # the demo's phase-2 student and teacher, its batch

Default shapes: a 4-layer h256 student, an 8-layer h384 teacher, vocab 8,192, T=2. ``--demo``:
``megatron-kd demo``'s phase 2 (megatron_kd/recipes/demo_phase2.yaml: 2-layer h128 student and
teacher, vocab 1,024, 256-token windows, micro-batch 8, its kd.alpha and temperature).

Measures, in one run on this machine (single rank; CPU here, the GPU when platform.py finds one):
  CE step     student fwd+bwd with megatron's vocab-parallel CE            (the alpha=0 baseline)
  teacher fwd the frozen teacher's forward alone (no grad)
  KD step     DistillationModel: teacher fwd + student fwd+bwd + KD loss + CE (alpha=0.5)
and prints median times (the steps interleaved round robin) with the ratios KD/CE, teacher/CE and KD / (CE + teacher): what the loss
and its glue add beyond running the teacher (issue 18's target: <= 1.10).
"""
import argparse
import statistics
import time
import warnings

import torch


def main():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--demo", action="store_true", help="the demo's phase-2 shapes (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron.core import parallel_state as ps

    from megatron_kd import distributed, platform
    from megatron_kd.config import KDConfig, ModelConfig, ParallelConfig
    from megatron_kd.data.packing import (document_attention_mask, document_ids_from_tokens,
                                          position_ids_from_document_ids)
    from megatron_kd.kd.distill_model import DistillationModel
    from megatron_kd.kd.pair import freeze
    from megatron_kd.models import build_model

    distributed.init_distributed()
    parallel = ParallelConfig()
    distributed.init_model_parallel(parallel, seed=0)
    if args.demo:
        from pathlib import Path

        import megatron_kd
        from megatron_kd.config import load_config

        cfg = load_config(str(Path(megatron_kd.__file__).parent / "recipes" / "demo_phase2.yaml"))
        student_cfg, teacher_cfg, kd_cfg = cfg.model, cfg.teacher, cfg.kd
        args.vocab, args.seq_length, args.micro_batch_size = 1024, cfg.data.seq_length, cfg.train.micro_batch_size
    else:
        student_cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                                  ffn_hidden_size=768)
        teacher_cfg = ModelConfig(num_layers=8, hidden_size=384, num_attention_heads=6, num_query_groups=2,
                                  ffn_hidden_size=1152)
        kd_cfg = KDConfig(alpha=0.5, temperature=2.0)
    s, b = args.seq_length, args.micro_batch_size
    student = build_model(student_cfg, parallel, args.vocab, s)
    teacher = freeze(build_model(teacher_cfg, parallel, args.vocab, s))
    kd = DistillationModel(student, teacher, kd_cfg, args.vocab, ps.get_tensor_model_parallel_group())
    dev = platform.device()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab, (b, s), generator=g)
    tokens[torch.rand(b, s, generator=g) < 1 / 128] = 2
    doc = document_ids_from_tokens(tokens, 2)
    pos = position_ids_from_document_ids(doc, reset=False)
    labels = torch.roll(tokens, -1, 1)
    tokens, pos, labels, mask = (t.to(dev) for t in (tokens, pos, labels, document_attention_mask(doc)))

    def ce_step():
        student(tokens, pos, mask, labels=labels).mean().backward()

    @torch.no_grad()
    def teacher_fwd():
        teacher(tokens, pos, mask)

    alpha = kd_cfg.alpha

    def kd_step():
        out = kd(tokens, pos, mask, labels=labels)  # [b, s, 2]: KD, CE per token
        (alpha * out[..., 0] + (1 - alpha) * out[..., 1]).mean().backward()

    def once(fn):
        platform.synchronize()
        t0 = time.perf_counter()
        fn()
        platform.synchronize()
        student.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    # Round robin (CE, teacher, KD, CE again) after one warm-up round: a drift of the machine's
    # speed during the run (other load, frequency) then hits every measurement alike, instead of
    # whichever ran in that stretch (back-to-back blocks differed by 25% on the quiet 2-core box).
    fns = (ce_step, teacher_fwd, kd_step, ce_step)
    for fn in fns:
        once(fn)
    times = [[] for _ in fns]
    for _ in range(args.repeats):
        for i, fn in enumerate(fns):
            times[i].append(once(fn))
    t_ce, t_teacher, t_kd, t_ce2 = (statistics.median(t) for t in times)
    # the target ratio per round, then its median: what drifts between rounds cancels inside one
    round_ratios = [k / (c + t) for c, t, k in zip(times[0], times[1], times[2])]
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    print(f"device={dev} tokens/step={b * s} vocab={args.vocab} student={n_s / 1e6:.2f}M "
          f"teacher={n_t / 1e6:.2f}M params T={kd_cfg.temperature} alpha={alpha}"
          f"{' (demo shapes)' if args.demo else ''} threads={torch.get_num_threads()}")
    print(f"CE step (student fwd+bwd)   : {t_ce * 1e3:8.1f} ms (re-run {t_ce2 * 1e3:.1f} ms)")
    print(f"teacher forward             : {t_teacher * 1e3:8.1f} ms   ratio teacher / CE = {t_teacher / t_ce:.2f}")
    print(f"KD step (teacher + student) : {t_kd * 1e3:8.1f} ms   ratio KD / CE      = {t_kd / t_ce:.2f}")
    print(f"KD overhead beyond teacher  : {(t_kd - t_ce - t_teacher) * 1e3:8.1f} ms "
          f"({(t_kd - t_ce - t_teacher) / t_ce:.2f} x CE)")
    q = statistics.quantiles(round_ratios, n=4) if len(round_ratios) > 1 else round_ratios * 3
    print(f"ratio KD / (CE + teacher)   : {statistics.median(round_ratios):.3f} (median over {len(round_ratios)} "
          f"rounds; quartiles {q[0]:.3f} - {q[2]:.3f}; of the medians above {t_kd / (t_ce + t_teacher):.3f})")
    distributed.destroy()


if __name__ == "__main__":
    main()
