"""Cases for test_fused.py, and its worker under ``torchrun --nproc-per-node TP`` (gloo, CPU).

Every rank builds the same full problem from a seed -- hidden states, full ``[V_pad, h]`` output
weights, labels, loss mask -- and runs two things:

* the fused loss on its own vocab shard of the weights, with the TP group;
* the exact path, unsharded (``tp_group=None``) and through autograd: full logits formed by
  matmul, ``vocab_parallel_kd_loss`` + ``F.cross_entropy`` on the full padded logits (megatron's
  vocab-parallel CE has the same semantics: padded ids are in its softmax), combined by
  ``kd_objective_loss``.

It compares the loss, the hidden-state gradients (the full gradient: a missing or doubled TP
all-reduce fails) and this rank's slice of the weight gradients. Under torchrun, megatron-core's
TP getters raise, and at TP=4 the world is also split into two TP=2 groups holding different data
(a reduction over the wrong group fails). Errors are max-reduced; rank 0 prints ``RESULT {json}``.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from megatron_kd.kd import kd_objective_loss, vocab_parallel_kd_loss
from megatron_kd.kd.fused import fused_linear_kd_loss

N = 23             # tokens; 7 does not divide it
V_PAD = 24         # TP=4: shards of 6 -> ids 18..23 one whole padded shard, 12..17 half padding
V = 17             # true vocab
H_S, H_T = 8, 12   # student and teacher hidden sizes differ
CHUNKS = (1, 7, N, N + 17)
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
UPSTREAM = 0.37    # d(objective)/d(loss_sum): backward must scale by it


def make_problem(seed: int, dtype=torch.float32, ties: bool = False):
    """Full-vocab inputs. Padded weight rows are 4x larger: padded logits then often dominate, so
    a padding leak into the KD softmaxes would show."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, H_S, generator=g)
    h_t = torch.randn(N, H_T, generator=g)
    w_s = torch.randn(V_PAD, H_S, generator=g) * (2.0 / math.sqrt(H_S))
    w_t = torch.randn(V_PAD, H_T, generator=g) * (3.0 / math.sqrt(H_T))
    w_s[V:] *= 4.0
    w_t[V:] *= 4.0
    if ties:  # integer-valued teacher logits: exact ties at the top-k threshold
        h_t = torch.randint(-1, 2, (N, H_T), generator=g).float()
        w_t = torch.randint(-1, 2, (V_PAD, H_T), generator=g).float()
    labels = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    mask[0] = True
    labels[~mask] = -100  # megatron-style ignore label on masked tokens: must not matter
    cast = lambda x: x.to(dtype)  # noqa: E731
    return dict(h_s=cast(h_s), w_s=cast(w_s), h_t=cast(h_t), w_t=cast(w_t), labels=labels, mask=mask)


def shard_slice(rank: int, tp: int) -> slice:
    n = V_PAD // tp
    return slice(rank * n, (rank + 1) * n)


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| (see kd_cases.rel_err)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def grid():
    """(name, kwargs) for every case."""
    cases = []
    base = dict(divergence="forward_kl", temperature=2.0, teacher_grad=True)
    for chunk, alpha in itertools.product(CHUNKS, (0.0, 0.5, 1.0)):
        cases.append((f"fp32/chunk{chunk}/a{alpha}", dict(base, chunk_size=chunk, alpha=alpha)))
    for ((div, beta), top_k, temp), chunk in zip(
            itertools.product(DIVERGENCES, (None, 3, 9), (1.0, 2.0)), itertools.cycle((7, 1, N + 17))):
        cases.append((f"fp32/{div}/b{beta}/k{top_k}/T{temp}/chunk{chunk}",
                      dict(divergence=div, beta=beta, top_k=top_k, temperature=temp, chunk_size=chunk,
                           alpha=0.5, teacher_grad=top_k != 3)))
    for (div, beta), chunk in itertools.product(DIVERGENCES, (1, 7, N + 17)):
        cases.append((f"fp32/teacher_logits/{div}/b{beta}/chunk{chunk}",
                      dict(divergence=div, beta=beta, temperature=2.0, chunk_size=chunk, alpha=0.5,
                           teacher_logits=True, teacher_grad=chunk != 7)))
    cases.append(("fp32/noscale/T2", dict(temperature=2.0, scale_by_t_squared=False, chunk_size=7,
                                           alpha=0.5, teacher_grad=True)))
    cases.append(("fp32/ties/jsd/k3", dict(divergence="jsd", top_k=3, ties=True, chunk_size=7, alpha=1.0,
                                            teacher_grad=True)))
    cases.append(("fp32/ties/forward_kl/k9/teacher_logits",
                  dict(top_k=9, ties=True, chunk_size=5, alpha=0.7, teacher_logits=True)))
    cases.append(("fp32/all_masked", dict(chunk_size=7, alpha=0.5, all_masked=True, teacher_grad=True)))
    cases.append(("fp32/student_weight_frozen", dict(chunk_size=7, alpha=0.5, weight_grad=False)))
    for div, beta in DIVERGENCES[:3]:
        cases.append((f"bf16/{div}/T2", dict(divergence=div, beta=beta, temperature=2.0, chunk_size=7,
                                             alpha=0.5, teacher_grad=True, dtype=torch.bfloat16)))
    return cases


def run_case(case: dict, tp_group, rank: int, tp: int, seed: int = 0) -> dict:
    """Fused loss on this rank's shard vs the unsharded exact path -> {metric: relative error}."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    teacher_grad = case.pop("teacher_grad", False)
    use_teacher_logits = case.pop("teacher_logits", False)
    weight_grad = case.pop("weight_grad", True)
    all_masked = case.pop("all_masked", False)
    chunk_size = case.pop("chunk_size")
    alpha = case.pop("alpha")
    prob = make_problem(seed, dtype, case.pop("ties", False))
    if all_masked:
        prob["mask"][:] = False
    cut = shard_slice(rank, tp)
    kd_kw = dict(vocab_size=V, **case)
    with torch.no_grad():
        teacher_logits_full = prob["h_t"] @ prob["w_t"].t()  # [n, V_pad]

    # -- fused, sharded
    h_s = prob["h_s"].clone().requires_grad_()
    w_s = prob["w_s"][cut].clone().requires_grad_(weight_grad)
    h_t = prob["h_t"].clone().requires_grad_(teacher_grad)
    w_t = prob["w_t"][cut].clone().requires_grad_(teacher_grad)
    t_logits = teacher_logits_full[:, cut].clone().requires_grad_(teacher_grad)
    teacher = dict(teacher_logits=t_logits) if use_teacher_logits else dict(teacher_hidden=h_t,
                                                                            teacher_weight=w_t)
    loss_sum, count = fused_linear_kd_loss(h_s, w_s, **teacher, labels=prob["labels"],
                                           loss_mask=prob["mask"], alpha=alpha, tp_group=tp_group,
                                           chunk_size=chunk_size, **kd_kw)
    assert loss_sum.dtype == torch.float32 and loss_sum.shape == (), (loss_sum.dtype, loss_sum.shape)
    (loss_sum * UPSTREAM).backward()

    # -- exact path, unsharded, autograd
    r_h_s = prob["h_s"].clone().requires_grad_()
    r_w_s = prob["w_s"].clone().requires_grad_()
    r_h_t = prob["h_t"].clone().requires_grad_(teacher_grad)
    r_w_t = prob["w_t"].clone().requires_grad_(teacher_grad)
    r_t_logits = teacher_logits_full.clone().requires_grad_(teacher_grad)
    z_s = r_h_s @ r_w_s.t()  # [n, V_pad] in the input dtype
    z_t = r_t_logits if use_teacher_logits else r_h_t @ r_w_t.t()
    kd = vocab_parallel_kd_loss(z_s, z_t, tp_group=None, **kd_kw) if alpha > 0 else None
    ce = F.cross_entropy(z_s.float(), prob["labels"], reduction="none") if alpha < 1 else None
    ref_sum, ref_count = kd_objective_loss(kd, ce, prob["mask"], alpha)
    (ref_sum * UPSTREAM).backward()

    out = {"count_error": abs(int(count) - int(ref_count))}
    if all_masked:  # nothing to be relative to: everything must be exactly zero
        out["loss_abs"] = loss_sum.abs().item()
        out["grad_student_hidden_abs"] = h_s.grad.abs().max().item()
        out["grad_student_weight_abs"] = w_s.grad.abs().max().item()
        return out
    out["loss"] = rel_err(loss_sum, ref_sum)
    out["grad_student_hidden"] = rel_err(h_s.grad, r_h_s.grad)
    if weight_grad:
        out["grad_student_weight"] = rel_err(w_s.grad, r_w_s.grad[cut])
    else:
        assert w_s.grad is None
    for t in (h_s.grad, w_s.grad):
        assert t is None or t.dtype == dtype
    if alpha == 1.0:  # no CE: padded vocab rows get exactly no gradient
        padding = torch.arange(V_PAD)[cut] >= V
        out["padding_grad_abs"] = w_s.grad[padding].abs().max().item() if padding.any() else 0.0
    if teacher_grad and alpha > 0:
        if use_teacher_logits:
            out["grad_teacher_logits"] = rel_err(t_logits.grad, r_t_logits.grad[:, cut])
        else:
            out["grad_teacher_hidden"] = rel_err(h_t.grad, r_h_t.grad)
            out["grad_teacher_weight"] = rel_err(w_t.grad, r_w_t.grad[cut])
    else:
        assert h_t.grad is None and w_t.grad is None and t_logits.grad is None
    return out


def run_all(tp_group, rank: int, tp: int) -> dict:
    return {name: run_case(case, tp_group, rank, tp) for name, case in grid()}


SUBGROUP_CASES = [
    ("forward_kl/chunk7", dict(temperature=2.0, chunk_size=7, alpha=0.5, teacher_grad=True)),
    ("jsd/k3/chunk1", dict(divergence="jsd", top_k=3, chunk_size=1, alpha=0.5, teacher_grad=True)),
    ("ce_only/chunk5", dict(chunk_size=5, alpha=0.0)),
]


def main():
    import torch.distributed as dist

    import kd_cases

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kd_cases.forbid_parallel_state_getters(setattr)
    tp_group = dist.new_group(list(range(world)))  # explicit, not the default group object

    results = run_all(tp_group, rank, world)
    if world == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
        pair = rank // 2
        for name, case in SUBGROUP_CASES:
            results[f"subgroup/{name}"] = run_case(case, pairs[pair], rank % 2, 2, seed=10 + pair)

    kd_cases.print_worst(results, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
