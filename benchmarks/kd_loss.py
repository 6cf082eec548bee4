"""Peak extra memory and fwd+bwd time of the KD loss, from hidden states to gradients.

    python benchmarks/kd_loss.py                                   # CPU: 4,096 and 8,192 tokens
    python benchmarks/kd_loss.py --tokens 4096 --vocab 32000 --hidden 256 --chunks 128,512,2048
    python benchmarks/kd_loss.py --device cuda --dtype bfloat16 --tokens 8192,32768,131072 \
        --vocab 202048 --hidden 1280 --chunks 1024,4096          # H100 shapes (timings only)

Same inputs for every variant (student hidden [n, h] and output weight [V, h] requiring grad, a
frozen teacher's hidden [n, h_T] and weight [V, h_T]; TP=1); the loss is alpha * KD + (1-alpha) *
CE over the loss-masked tokens (default alpha=1: forward KL, T=1, as the peers compute):

* naive      full-vocab fp32 logits, log_softmax / KL / CE in plain torch, autograd
* exact      megatron_kd's vocab-parallel loss (kd/losses.py) on full logits, autograd
* fused/c    megatron_kd's fused chunked linear+KD loss (kd/fused.py), chunk of c tokens
* modelopt   NVIDIA ModelOpt's megatron ``LogitsKLLoss`` (if importable)
* liger/*    Liger-Kernel's ``LigerFusedLinearJSD`` and ``chunked_loss.LigerFusedLinearJSDLoss``,
             beta=0 (forward KL) (if importable)

Each variant runs in a fresh subprocess (so one variant's cached allocations cannot hide
another's), and reports:

* time: best of ``--repeats`` fwd+bwd runs (``platform.synchronize()`` around each);
* peak alloc (CPU): the peak of bytes allocated minus freed by the CPU allocator during one
  fwd+bwd, from the torch profiler's allocation events (tracemalloc does not see torch);
* peak RSS (CPU): process max RSS minus RSS just before the first fwd+bwd (a cross-check that
  includes allocator caching / fragmentation).

On ``--device cuda`` memory is not measured: it would need ``torch.cuda`` memory statistics,
and device access goes through megatron_kd.platform only (no such helper there yet).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS_BASE = ("naive", "exact")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,8192", help="comma-separated token counts n")
    ap.add_argument("--vocab", type=int, default=32000, help="true vocab size V")
    ap.add_argument("--vocab-pad", type=int, default=None, help="V_pad (default: V rounded up to 128)")
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size")
    ap.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    ap.add_argument("--chunks", default="128,512,2048", help="fused chunk sizes (tokens)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "variant:n"
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------- child process


def _problem(args, n, device):
    import torch

    dtype = getattr(torch, args.dtype)
    v_pad = args.vocab_pad or -(-args.vocab // 128) * 128
    h_t = args.teacher_hidden or args.hidden
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    p = dict(
        h_s=rand(n, args.hidden).requires_grad_(),
        w_s=rand(v_pad, args.hidden, scale=args.hidden ** -0.5).requires_grad_(),
        h_t=rand(n, h_t), w_t=rand(v_pad, h_t, scale=2 * h_t ** -0.5),
        labels=torch.randint(0, args.vocab, (n,), generator=g).to(device),
        mask=(torch.rand(n, generator=g) > 0.05).to(device),
    )
    return p, v_pad


def _variant_fn(name, args, p):
    """-> a closure running one fwd+bwd of variant ``name`` (or None if it is not importable)."""
    import torch
    import torch.nn.functional as F

    from megatron_kd.kd import kd_objective_loss, vocab_parallel_kd_loss
    from megatron_kd.kd.fused import fused_linear_kd_loss

    V, T, alpha = args.vocab, args.temperature, args.alpha
    kd_scale = T * T

    def naive():
        z_s = (p["h_s"] @ p["w_s"].t()).float()  # [n, V_pad] fp32
        with torch.no_grad():
            z_t = (p["h_t"] @ p["w_t"].t()).float()
        per_token = 0.0
        if alpha > 0:
            log_p = F.log_softmax(z_s[:, :V] / T, dim=-1)
            log_q = F.log_softmax(z_t[:, :V] / T, dim=-1)
            kd = (log_q.exp() * (log_q - log_p)).sum(-1) * kd_scale
            per_token = alpha * kd
        if alpha < 1:
            per_token = per_token + (1 - alpha) * F.cross_entropy(z_s, p["labels"], reduction="none")
        loss = torch.where(p["mask"], per_token, 0.0).sum()
        loss.backward()

    def exact():
        z_s = p["h_s"] @ p["w_s"].t()
        with torch.no_grad():
            z_t = p["h_t"] @ p["w_t"].t()
        kd = vocab_parallel_kd_loss(z_s, z_t, tp_group=None, vocab_size=V, temperature=T) if alpha > 0 else None
        ce = F.cross_entropy(z_s.float(), p["labels"], reduction="none") if alpha < 1 else None
        loss, _ = kd_objective_loss(kd, ce, p["mask"], alpha)
        loss.backward()

    if name in ("naive", "exact"):
        return {"naive": naive, "exact": exact}[name]
    if name.startswith("fused/"):
        chunk = int(name.split("/")[1])

        def fused():
            loss, _ = fused_linear_kd_loss(p["h_s"], p["w_s"], p["h_t"], p["w_t"], labels=p["labels"],
                                           loss_mask=p["mask"], alpha=alpha, tp_group=None, vocab_size=V,
                                           temperature=T, chunk_size=chunk)
            loss.backward()
        return fused
    if name == "modelopt":
        try:
            from modelopt.torch.distill.plugins.megatron import LogitsKLLoss  # noqa: F401
        except ImportError:
            return None
        return "installed, not wired here (needs megatron parallel_state + a TransformerConfig)"
    if name.startswith("liger/"):
        try:
            if name == "liger/fused_linear_jsd":
                from liger_kernel.transformers import LigerFusedLinearJSD
                loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
            else:
                from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
                loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1 - alpha, weight_soft_loss=alpha,
                                                  beta=0.0, temperature=T)
        except ImportError:
            return None

        def liger():
            if name == "liger/fused_linear_jsd":
                loss = loss_fn(p["h_s"], p["w_s"], p["h_t"], p["w_t"])
            else:
                loss = loss_fn(p["h_s"], p["w_s"], p["h_t"], p["w_t"], p["labels"])
            loss.backward()
        return liger
    raise ValueError(f"unknown variant {name!r}")


def _peak_allocated_bytes(fn) -> int:
    """Peak (allocated - freed) bytes of the CPU allocator while ``fn`` runs (profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    allocs = sorted((e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    running = peak = 0
    for e in allocs:
        running += e.typed[1].alloc_size
        peak = max(peak, running)
    return peak


def run_child(args):
    import psutil
    import torch

    from megatron_kd import platform

    if args.threads:
        torch.set_num_threads(args.threads)
    name, n = args.child.rsplit(":", 1)
    device = platform.device() if args.device == "cuda" else torch.device("cpu")
    p, v_pad = _problem(args, int(n), device)
    fn = _variant_fn(name, args, p)
    if fn is None or isinstance(fn, str):
        print("RESULT " + json.dumps({"status": fn or "not installed"}))
        return

    def step():
        p["h_s"].grad = p["w_s"].grad = None
        platform.synchronize()
        t0 = time.perf_counter()
        fn()
        platform.synchronize()
        return time.perf_counter() - t0

    rss_before = psutil.Process().memory_info().rss
    times = [step() for _ in range(args.repeats)]
    out = {"status": "ok", "time_s": min(times), "v_pad": v_pad}
    if device.type == "cpu":
        # ru_maxrss is in KiB on Linux: the process high-water mark since it started
        out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
        p["h_s"].grad = p["w_s"].grad = None
        out["alloc_bytes"] = _peak_allocated_bytes(fn)
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------- parent


def _fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.0f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    variants = list(VARIANTS_BASE) + [f"fused/{c}" for c in args.chunks.split(",")] + [
        "modelopt", "liger/fused_linear_jsd", "liger/chunked_jsd"]
    if args.variants:
        variants = [v for v in variants if v in args.variants.split(",")]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    print(f"# KD loss fwd+bwd, device={args.device}, dtype={args.dtype}, V={args.vocab}, h={args.hidden}, "
          f"alpha={args.alpha}, T={args.temperature}, TP=1, best of {args.repeats}, "
          f"threads={args.threads or 'torch default'}")
    for n in [int(t) for t in args.tokens.split(",")]:
        print(f"\n## n = {n:,} tokens  (one [n, V_pad] fp32 tensor = "
              f"{_fmt_bytes(n * (args.vocab_pad or -(-args.vocab // 128) * 128) * 4)})")
        header = f"{'variant':<24}{'time':>10}{'x naive':>9}{'peak alloc':>13}{'naive/this':>12}{'peak RSS':>12}"
        print(header)
        print("-" * len(header))
        naive = None
        for name in variants:
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--child", f"{name}:{n}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{name:<24}  failed (rc={proc.returncode}): {tail[:120]}")
                continue
            r = json.loads(lines[0][len("RESULT "):])
            if r["status"] != "ok":
                print(f"{name:<24}  {r['status']}")
                continue
            if name == "naive":
                naive = r
            t_ratio = f"{r['time_s'] / naive['time_s']:.2f}" if naive else "-"
            alloc = r.get("alloc_bytes")
            m_ratio = f"{naive['alloc_bytes'] / alloc:.1f}x" if naive and alloc and naive.get("alloc_bytes") else "-"
            print(f"{name:<24}{r['time_s'] * 1e3:>8.0f}ms{t_ratio:>9}{_fmt_bytes(alloc):>13}{m_ratio:>12}"
                  f"{_fmt_bytes(r.get('rss_bytes')):>12}", flush=True)


if __name__ == "__main__":
    main()
