"""Shared by test_kd_losses.py (TP=1, in process) and kd_worker.py (TP=2/4 under torchrun).

A naive float64 full-vocab reference, written plainly (softmax over the unpadded vocab, top-k by
``torch.topk`` on the full teacher row), and a runner that checks ``vocab_parallel_kd_loss`` on
this rank's vocab shard against it. Every rank builds the same full logits from a seed, so the
test compares its own shard of the gradient with the matching slice of the reference gradient:
nothing is gathered, and the loss never sees more than its shard.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from megatron_kd.kd import kd_objective_loss, vocab_parallel_kd_loss

TOKENS = (5, 3)  # [s, b]
V_PAD = 24       # TP=4: shards of 6 -> ids 12..17 half padding, 18..23 all padding; TP=2: 12
V = 17           # true vocab: not a multiple of any shard size
GARBAGE = (1.0e4, -3.0e3)  # student / teacher values written into padded ids: a leak dominates

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0),
               ("jsd", 0.2)]
TOP_KS = [None, 3, 9, V]  # 3 < every shard; 9 > a TP=4 shard (6); 17 > a TP=2 shard (12)


def make_logits(seed: int, dtype=torch.float32, ties: bool = False):
    """Full ``[s, b, V_pad]`` student and teacher logits (padding filled with garbage), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*TOKENS, V_PAD, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(*TOKENS, V_PAD, generator=g, dtype=torch.float64) * 3.0
    if ties:  # integer teacher logits: many exact ties at the top-k threshold
        teacher = torch.randint(-3, 4, (*TOKENS, V_PAD), generator=g).double()
    student[..., V:] = GARBAGE[0]
    teacher[..., V:] = GARBAGE[1]
    upstream = torch.randn(*TOKENS, generator=g, dtype=torch.float64)  # d(objective)/d(loss)
    return student.to(dtype), teacher.to(dtype), upstream


def _log_or_inf(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


def reference_kd(student, teacher, *, vocab_size, temperature=1.0, scale_by_t_squared=True,
                 divergence="forward_kl", beta=0.5, top_k=None):
    """float64, full vocab, no sharding: the definitions of megatron_kd/kd/losses.py, plainly."""
    s = student[..., :vocab_size].double() / temperature
    t = teacher[..., :vocab_size].double() / temperature
    log_p = F.log_softmax(s, dim=-1)
    p = log_p.exp()
    if top_k is None:
        support = torch.ones_like(t, dtype=torch.bool)
    else:
        kth = torch.topk(teacher[..., :vocab_size].double(), top_k, dim=-1).values[..., -1:]
        support = teacher[..., :vocab_size].double() >= kth
    log_q = F.log_softmax(t.masked_fill(~support, -math.inf), dim=-1)
    log_q = torch.where(support, log_q, 0.0)  # finite outside K so autograd stays nan-free
    q = torch.where(support, log_q.exp(), 0.0)
    if divergence == "jsd" and beta in (0.0, 1.0):  # TRL / Liger: the ends are the two KLs
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        d = q * (log_q - log_p)
    elif divergence == "reverse_kl":
        d = p * (log_p - log_q)
    else:
        # log m by logaddexp: m = beta q + (1 - beta) p underflows to 0 in float64 at |z/T| ~ 1e3
        log_m = torch.logaddexp(log_q + _log_or_inf(beta), log_p + _log_or_inf(1 - beta))
        log_m = torch.where(support, log_m, 0.0)
        d = beta * q * (log_q - log_m) + (1 - beta) * p * (log_p - log_m)
    loss = torch.where(support, d, 0.0).sum(-1)
    return loss * (temperature ** 2 if scale_by_t_squared else 1.0)


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| over the whole tensor (elementwise relative error is meaningless
    for gradient entries that are ~0)."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def grid():
    """(name, kwargs) for every fp32 / bf16 case."""
    cases = []
    for (div, beta), top_k, temp, teacher_grad in itertools.product(
            DIVERGENCES, TOP_KS, [1.0, 2.0], [False, True]):
        name = f"fp32/{div}/b{beta}/k{top_k}/T{temp}/tg{int(teacher_grad)}"
        cases.append((name, dict(divergence=div, beta=beta, top_k=top_k, temperature=temp,
                                 teacher_grad=teacher_grad, dtype=torch.float32)))
    cases.append(("fp32/forward_kl/noscale/T2", dict(divergence="forward_kl", temperature=2.0,
                                                      scale_by_t_squared=False, teacher_grad=True)))
    cases.append(("fp32/jsd/b0.5/ties/k3", dict(divergence="jsd", top_k=3, ties=True, teacher_grad=True)))
    cases.append(("fp32/forward_kl/ties/k9", dict(divergence="forward_kl", top_k=9, ties=True)))
    for (div, beta), top_k in itertools.product(DIVERGENCES[:3], [None, 9]):
        cases.append((f"bf16/{div}/k{top_k}/T2", dict(divergence=div, beta=beta, top_k=top_k,
                                                      temperature=2.0, teacher_grad=True,
                                                      dtype=torch.bfloat16)))
    return cases


def shard_slice(rank: int, tp: int):
    n = V_PAD // tp
    return slice(rank * n, (rank + 1) * n)


def run_case(case: dict, tp_group, rank: int, tp: int, seed: int = 0) -> dict:
    """Loss and gradients of this rank's shard vs the float64 reference -> {metric: rel. error}."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    teacher_grad = case.pop("teacher_grad", False)
    ties = case.pop("ties", False)
    s_full, t_full, upstream = make_logits(seed, dtype, ties)
    cut = shard_slice(rank, tp)

    student = s_full[..., cut].clone().requires_grad_()
    teacher = t_full[..., cut].clone().requires_grad_(teacher_grad)
    loss = vocab_parallel_kd_loss(student, teacher, tp_group=tp_group, vocab_size=V, **case)
    assert loss.dtype == torch.float32 and loss.shape == TOKENS, (loss.dtype, loss.shape)
    (loss * upstream.float()).sum().backward()

    s_ref = s_full.double().requires_grad_()
    t_ref = t_full.double().requires_grad_()
    ref = reference_kd(s_ref, t_ref, vocab_size=V, **case)
    (ref * upstream).sum().backward()

    out = {"loss": rel_err(loss, ref), "grad_student": rel_err(student.grad, s_ref.grad[..., cut])}
    padding = torch.arange(V_PAD)[cut] >= V  # this shard's padded ids: gradient must be exactly 0
    out["padding_grad_abs"] = student.grad[..., padding].abs().max().item() if padding.any() else 0.0
    if teacher_grad:
        out["grad_teacher"] = rel_err(teacher.grad, t_ref.grad[..., cut])
    else:
        assert teacher.grad is None
    return out


def run_objective_case(tp_group, rank: int, tp: int, alpha: float = 0.7, seed: int = 1) -> dict:
    """alpha*KD + (1-alpha)*CE over loss-masked tokens: sum, count and gradients vs the reference.

    The per-token CE is a stand-in leaf tensor (megatron-core's CE is tested upstream); masked
    tokens hold inf there, so a mask applied by multiplication would show up as nan.
    """
    s_full, t_full, _ = make_logits(seed)
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(*TOKENS, generator=g) > 0.4
    ce = torch.rand(*TOKENS, generator=g).masked_fill(~mask, math.inf).requires_grad_()
    cut = shard_slice(rank, tp)
    student = s_full[..., cut].clone().requires_grad_()
    kd = vocab_parallel_kd_loss(student, t_full[..., cut], tp_group=tp_group, vocab_size=V,
                                temperature=2.0)
    loss_sum, count = kd_objective_loss(kd, ce, mask, alpha)
    loss_sum.backward()

    s_ref = s_full.double().requires_grad_()
    kd_ref = reference_kd(s_ref, t_full, vocab_size=V, temperature=2.0)
    ce_ref = torch.where(mask, ce.detach().double(), 0.0)
    ref_sum = (alpha * kd_ref + (1 - alpha) * ce_ref)[mask].sum()
    ref_sum.backward()
    return {
        "loss": rel_err(loss_sum, ref_sum),
        "grad_student": rel_err(student.grad, s_ref.grad[..., cut]),
        "grad_ce": rel_err(ce.grad, (1 - alpha) * mask.double()),
        "count_error": abs(int(count) - int(mask.sum())),
    }


def run_jsd_limits(tp_group, rank: int, tp: int) -> dict:
    """JSD(beta=0) == forward KL and JSD(beta=1) == reverse KL (special-cased, as TRL and Liger do),
    while their weighting tends to 0 next to the ends: JSD(1e-4), JSD(1 - 1e-4) << either KL."""
    s_full, t_full, _ = make_logits(2)
    cut = shard_slice(rank, tp)
    s, t = s_full[..., cut], t_full[..., cut]

    def kd(div, beta=0.5):
        return vocab_parallel_kd_loss(s, t, tp_group=tp_group, vocab_size=V, temperature=2.0,
                                      divergence=div, beta=beta)

    fwd, rev = kd("forward_kl"), kd("reverse_kl")
    return {
        "beta0_vs_forward": rel_err(kd("jsd", 0.0), fwd.double()),
        "beta1_vs_reverse": rel_err(kd("jsd", 1.0), rev.double()),
        "beta1e-4_over_forward": (kd("jsd", 1e-4).abs().max() / fwd.abs().max()).item(),
        "beta1-1e-4_over_reverse": (kd("jsd", 1 - 1e-4).abs().max() / rev.abs().max()).item(),
        "forward_vs_reverse": rel_err(fwd, rev.double()),  # sanity: they do differ
    }


def run_all(tp_group, rank: int, tp: int) -> dict:
    results = {name: run_case(case, tp_group, rank, tp) for name, case in grid()}
    results["objective"] = run_objective_case(tp_group, rank, tp)
    results["jsd_limits"] = run_jsd_limits(tp_group, rank, tp)
    return results


def forbid_parallel_state_getters(patch) -> None:
    """Make megatron-core's global TP getters raise, wherever they were imported by name."""
    import megatron.core.parallel_state as ps
    import megatron.core.tensor_parallel.cross_entropy as ce
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.utils as mutils

    def boom(*args, **kwargs):
        raise AssertionError("the KD loss must use the tp_group it is given, not parallel_state")

    for module in (ps, ce, mappings, mutils):
        for name in ("get_tensor_model_parallel_group", "get_tensor_model_parallel_rank",
                     "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group_if_none"):
            if hasattr(module, name):
                patch(module, name, boom)


def launch_worker(worker, tp: int) -> dict:
    """Run ``worker`` under torchrun with ``tp`` gloo ranks; its RESULT line's ``cases``."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
           "--master-addr=127.0.0.1", f"--master-port={port}", str(worker)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(str(worker)))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(lines[0][len("RESULT "):])
    assert out["tp"] == tp
    return out["cases"]


def print_worst(results: dict, rank: int, world: int) -> None:
    """Max of every {case: {metric: value}} over all ranks; rank 0 prints the RESULT line."""
    import json

    import torch.distributed as dist

    keys = sorted((case, metric) for case, metrics in results.items() for metric in metrics)
    worst = torch.tensor([float(results[c][m]) for c, m in keys], dtype=torch.float64)
    worst = torch.nan_to_num(worst, nan=math.inf)  # a nan must not vanish in the MAX
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = {}
        for (case, metric), value in zip(keys, worst.tolist()):
            out.setdefault(case, {})[metric] = value
        print("RESULT " + json.dumps({"tp": world, "cases": out}), flush=True)
