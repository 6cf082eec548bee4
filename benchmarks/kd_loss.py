"""Peak extra memory and fwd+bwd time of the KD loss, from hidden states to gradients.

    python benchmarks/kd_loss.py                                   # CPU: 4,096 and 8,192 tokens
    python benchmarks/kd_loss.py --tokens 4096 --vocab 32000 --hidden 256 --chunks 128,512,2048
    python benchmarks/kd_loss.py --device cuda --dtype bfloat16 --tokens 8192,32768,131072 \
        --vocab 202048 --hidden 1280 --chunks 1024,4096          # H100 shapes (timings only)

Same inputs for every variant (student hidden [n, h] and output weight [V, h] requiring grad, a
frozen teacher's hidden [n, h_T] and weight [V, h_T]; TP=1); the loss is alpha * KD + (1-alpha) *
CE over the loss-masked tokens (default alpha=1: forward KL, T=1, as the peers compute):

* gemm       the four GEMMs every variant does (student logits and its two gradient GEMMs, the
             teacher's logits) and nothing else: the floor
* naive      full-vocab fp32 logits, log_softmax / KL / CE in plain torch, autograd
* exact      megatron_kd's vocab-parallel loss (kd/losses.py) on full logits, autograd
* fused/c    megatron_kd's fused chunked linear+KD loss (kd/fused.py), chunk of c tokens
             (``fused/auto``: its default chunk)
* triton     megatron_kd's Triton kernels (kd/triton_fused.py; CUDA, or TRITON_INTERPRET=1)
* modelopt   NVIDIA ModelOpt's megatron ``LogitsKLLoss`` (if importable)
* liger/*    Liger-Kernel's ``LigerFusedLinearJSD`` and ``chunked_loss.LigerFusedLinearJSDLoss``,
             beta=0 (forward KL) (if importable)

``--tp N`` times one rank's share of TP=N: rank 0's vocab shard ``V_pad / N`` (V_pad padded to a
multiple of 128 * N, as megatron pads it), collectives excluded (one process).

Before a variant starts, its peak memory is estimated (whole-logits variants: ~7 fp32 ``[n, V/TP]``
tensors, measured; the fused ones a few chunk-sized ones plus the gradients) and a variant that
would not fit in the memory available is skipped with the estimate, not run into an OOM.

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
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,8192", help="comma-separated token counts n")
    ap.add_argument("--vocab", type=int, default=32000, help="true vocab size V")
    ap.add_argument("--vocab-pad", type=int, default=None, help="V_pad (default: V rounded up to 128)")
    ap.add_argument("--hidden", type=int, default=256, help="student hidden size")
    ap.add_argument("--teacher-hidden", type=int, default=None, help="default: --hidden")
    ap.add_argument("--chunks", default="auto,512", help="fused chunk sizes (tokens, or auto)")
    ap.add_argument("--tp", type=int, default=1, help="time one rank's vocab shard of TP=N")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "variant:n"
    return ap.parse_args(argv)


PEERS = {"modelopt": "modelopt", "liger": "liger_kernel"}  # variant prefix -> importable package

# ------------------------------------------------------------------------------- child process


def padded_vocab(args) -> int:
    """V_pad as megatron pads it: a multiple of 128 * TP (or --vocab-pad)."""
    return args.vocab_pad or -(-args.vocab // (128 * args.tp)) * 128 * args.tp


def check_args(args) -> None:
    """One-line errors for shapes no rank layout can run, before any variant starts."""
    if args.tp < 1:
        raise SystemExit(f"kd_loss.py: --tp {args.tp}: expected >= 1")
    v_pad = padded_vocab(args)
    if v_pad % args.tp or v_pad < args.vocab:
        raise SystemExit(f"kd_loss.py: --vocab-pad {v_pad} must be >= --vocab {args.vocab} and divisible "
                         f"by --tp {args.tp}")
    shard = v_pad // args.tp
    if (args.tp - 1) * shard >= args.vocab:
        largest = max(t for t in range(1, args.tp) if (t - 1) * (-(-args.vocab // (128 * t)) * 128) < args.vocab)
        raise SystemExit(f"kd_loss.py: --tp {args.tp} with --vocab {args.vocab}: V_pad {v_pad} gives shards of "
                         f"{shard} ids and the last rank's would hold only padding; at most --tp {largest}")
    for name in ("tokens", "chunks"):
        for item in getattr(args, name).split(","):
            if not (item == "auto" and name == "chunks") and not (item.isdigit() and int(item) > 0):
                raise SystemExit(f"kd_loss.py: --{name} {getattr(args, name)!r}: expected comma-separated "
                                 f"positive integers{' or auto' if name == 'chunks' else ''}")


def estimated_peak_bytes(name: str, args, n: int) -> int:
    """A variant's peak extra memory: ~7 whole fp32 [n, V/TP] tensors for the unfused ones (the
    naive loss measured 3.42 GiB at 4,096 x 32,000 = 6.9 such tensors), a few chunk-sized ones
    plus the fp32 gradients for the fused ones; inputs on top."""
    shard = padded_vocab(args) // args.tp
    h = max(args.hidden, args.teacher_hidden or args.hidden)
    elt = 2 if args.dtype == "bfloat16" else 4
    inputs = (2 * n * h + 2 * shard * h) * elt
    if name in ("naive", "exact", "modelopt"):
        return 7 * n * shard * 4 + inputs
    if name == "gemm":
        return 3 * n * shard * 4 + inputs
    grads = 4 * (n * h + shard * h)
    if name.startswith("fused/"):
        chunk = _chunk(name, args)
        return 12 * min(chunk, n) * shard * 4 + grads + inputs
    return 4 * 2 ** 20 * 4 + grads + inputs  # triton / liger: tile-sized, assume a 16 MiB pad


def _chunk(name: str, args) -> int:
    c = name.split("/")[1]
    if c == "auto":
        from megatron_kd.kd.fused import DEFAULT_CHUNK_LOGITS, MIN_CHUNK_TOKENS
        return max(MIN_CHUNK_TOKENS, DEFAULT_CHUNK_LOGITS // (padded_vocab(args) // args.tp))
    return int(c)


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch
        free, _ = torch.cuda.mem_get_info()
        return free
    import psutil
    return psutil.virtual_memory().available


def _problem(args, n, device):
    import torch

    dtype = getattr(torch, args.dtype)
    v_pad = padded_vocab(args) // args.tp  # rank 0's shard: all of it real vocab (check_args)
    h_t = args.teacher_hidden or args.hidden
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    p = dict(
        h_s=rand(n, args.hidden).requires_grad_(),
        w_s=rand(v_pad, args.hidden, scale=args.hidden ** -0.5).requires_grad_(),
        h_t=rand(n, h_t), w_t=rand(v_pad, h_t, scale=2 * h_t ** -0.5),
        labels=torch.randint(0, min(args.vocab, v_pad), (n,), generator=g).to(device),
        mask=(torch.rand(n, generator=g) > 0.05).to(device),
    )
    return p, v_pad


def _variant_fn(name, args, p):
    """-> a closure running one fwd+bwd of variant ``name`` (or None if it is not importable)."""
    import torch
    import torch.nn.functional as F

    from megatron_kd.kd import kd_objective_loss, vocab_parallel_kd_loss
    from megatron_kd.kd.fused import fused_linear_kd_loss

    V, T, alpha = min(args.vocab, padded_vocab(args) // args.tp), args.temperature, args.alpha
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

    def gemm():
        z_s = p["h_s"].detach() @ p["w_s"].detach().t()
        with torch.no_grad():
            p["h_t"] @ p["w_t"].t()
        z_s @ p["w_s"].detach()
        z_s.t() @ p["h_s"].detach()

    if name in ("naive", "exact", "gemm"):
        return {"naive": naive, "exact": exact, "gemm": gemm}[name]
    if name == "triton":
        try:
            from megatron_kd.kd import triton_fused
            triton_fused.check_available(p["h_s"].is_cuda)
        except (ImportError, RuntimeError) as e:
            return f"not run: {str(e).splitlines()[0][:110]}"

        def triton_loss():
            loss, _ = triton_fused.triton_linear_kd_loss(
                p["h_s"], p["w_s"], p["h_t"], p["w_t"], labels=p["labels"], loss_mask=p["mask"],
                alpha=alpha, tp_group=None, vocab_size=V, temperature=T)
            loss.backward()
        return triton_loss
    if name.startswith("fused/"):
        chunk = _chunk(name, args)

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
    if name == "gemm" and device.type == "cpu":  # time only: no autograd, nothing to trace
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print("RESULT " + json.dumps({"status": "ok", "time_s": min(times), "v_pad": v_pad}))
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
    check_args(args)
    if args.child:
        return run_child(args)
    variants = ["naive", "gemm", "exact"] + [f"fused/{c}" for c in args.chunks.split(",")] + [
        "triton", "modelopt", "liger/fused_linear_jsd", "liger/chunked_jsd"]
    if args.variants:
        variants = [v for v in variants if v in args.variants.split(",")]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, PYTHONWARNINGS="ignore")

    shard = padded_vocab(args) // args.tp
    tp = "1" if args.tp == 1 else f"{args.tp} (rank 0's shard of {shard:,} ids; collectives excluded)"
    print(f"# KD loss fwd+bwd, device={args.device}, dtype={args.dtype}, V={args.vocab}, h={args.hidden}, "
          f"alpha={args.alpha}, T={args.temperature}, TP={tp}, best of {args.repeats}, "
          f"threads={args.threads or 'torch default'}")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("kd_loss.py: --device cuda, but torch sees no CUDA device")
    avail = available_bytes(args.device)
    for n in [int(t) for t in args.tokens.split(",")]:
        print(f"\n## n = {n:,} tokens  (one [n, V_pad/TP] fp32 tensor = {_fmt_bytes(n * shard * 4)})")
        header = f"{'variant':<24}{'time':>10}{'x naive':>9}{'peak alloc':>13}{'naive/this':>12}{'peak RSS':>12}"
        print(header)
        print("-" * len(header))
        naive = None
        for name in variants:
            peer = PEERS.get(name.split("/")[0])
            if peer and importlib.util.find_spec(peer) is None:  # no subprocess for a missing peer
                print(f"{name:<24}  not installed ({peer})")
                continue
            need = estimated_peak_bytes(name, args, n)
            if need > 0.9 * avail:
                print(f"{name:<24}  skipped: needs ~{_fmt_bytes(need)} (estimate), {_fmt_bytes(avail)} available")
                continue
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
