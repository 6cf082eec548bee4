"""Triton fused linear + KD (+ CE) loss over a TP-sharded vocab (``kd.fused_impl: triton``).

Same inputs, semantics and result as ``kd.fused.fused_linear_kd_loss`` (forward / reverse KL, JSD, padding
excluded from the KD softmaxes, megatron's CE over the whole padded shard at T = 1, sums over
loss-masked tokens), but no ``[chunk, V/TP]`` tensor ever exists: the kernels of
``triton_kernels.py`` hold one ``[BLOCK_M, BLOCK_V]`` logit tile at a time.

Forward (one GEMM pass over the shard per model): ``kd_stats_kernel`` walks each token tile's
vocab tiles with online softmax statistics -- student z/T and teacher z/T (max, sum-exp, and the
KL numerator ``C`` kept relative to the running maxima), student z at T = 1 for CE (max, sum-exp,
target logit). Then the named steps of the torch path, on ``[*, n]`` vectors: all-reduce MAX of
the maxima, rescale each shard's sums to the global max, all-reduce SUM; per token
``KL = C / L_t + log L_s - log L_t`` and ``CE = log L_ce - (z_target - M_ce)``.

Backward (one more pass): ``kd_grad_kernel`` recomputes each logit tile, forms
``d loss / d z_S = w_kd * (p_S - q) + w_ce * (softmax - onehot)`` with
``log p = (z/T - M) - log L`` (the max subtracted first, issue 18 item 0a) and per-token weights
that hold the incoming gradient, the loss mask, alpha and ``T**2 / T``, and pushes the tile
through both gradient GEMMs at once: ``grad_hidden`` rows (owned by the program; fp32), the
weight rows by fp32 atomics -- straight into megatron's ``weight.main_grad`` when the weight has
one (gradient-accumulation fusion: the autograd weight gradient is then ``None``, or zeros under
megatron's DDP, whose hook wants one). Unlike the torch path the gradient pass runs in
backward, not forward: only there is the incoming gradient known, and ``main_grad`` must receive
the scaled gradient. ``grad_hidden`` is all-reduced (SUM, fp32) over ``tp_group`` (the hidden
state is replicated over TP). The weight gradient's atomics make it non-deterministic on a GPU at
fp32 rounding level (the summation order of token tiles varies).

Divergences: forward KL (the default); reverse KL (its gradient ``p * (log p - log q - KL)``
needs the token's KL: backward first recomputes it with the gradient's own arithmetic -- one more
GEMM pass -- so the difference cancels to round-off even for a one-hot student); JSD(beta) in
TRL's / Liger's convention (kd/losses.py): ``log m`` needs the global normalisers, so the forward
makes a second pass for ``KL(p || m)`` and ``KL(q || m)``. Not here (``NotImplementedError``; use
``kd.fused_impl: torch``): ``top_k``, gradients for the teacher.

Precision: GEMM tiles in the input dtype with fp32 accumulation; the logits stay fp32 (the torch
path rounds them to the input dtype first), so bf16 results differ from the torch path by bf16
rounding, not by semantics.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd import platform

from megatron_kd.kd.fused import _check_fused_args, _Options
from megatron_kd.kd.losses import VocabParallelKD, _group_rank

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# GPU tile sizes (H100); the CPU interpreter tests pass 16s.
DEFAULT_BLOCKS = dict(block_m=64, block_v=128, block_k=64)


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, imported on first use (Triton is optional: ``pip install triton``)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError("kd.fused_impl=triton needs Triton, which is not installed: pip install triton "
                          "(or use kd.fused_impl: torch)") from e
    from megatron_kd.kd import triton_kernels

    return triton_kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return type(_kernels().kd_stats_kernel).__name__ == "InterpretedFunction"


def check_available(device_is_cuda: bool) -> None:
    """Raise a one-line error when the Triton path cannot run here (before anything is built)."""
    _kernels()
    if not device_is_cuda and not interpreting():
        raise RuntimeError("kd.fused_impl=triton: the Triton kernels need a CUDA device; on a CPU use "
                           "kd.fused_impl: torch (or TRITON_INTERPRET=1, Triton's slow interpreter, "
                           "for tests)")


def _check_supported(o: _Options, student_hidden, student_weight, teacher_hidden, teacher_weight,
                     teacher_logits):
    if o.alpha > 0 and o.top_k is not None:
        raise NotImplementedError(f"kd.fused_impl=triton has no kd.top_k (got {o.top_k}); "
                                  "use kd.fused_impl: torch")
    if any(t is not None and t.requires_grad for t in (teacher_hidden, teacher_weight, teacher_logits)) \
            and torch.is_grad_enabled():
        raise NotImplementedError("kd.fused_impl=triton gives the teacher no gradient (its inputs require "
                                  "grad); freeze the teacher or use kd.fused_impl: torch")
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_logits", teacher_logits)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"kd.fused_impl=triton: {name} has dtype {t.dtype}; expected one of "
                             f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if student_weight.dtype != student_hidden.dtype:
        raise ValueError(f"kd.fused_impl=triton: student_hidden ({student_hidden.dtype}) and student_weight "
                         f"({student_weight.dtype}) must share a dtype (the GEMM tiles take both)")
    if teacher_hidden is not None and teacher_weight is not None \
            and teacher_hidden.dtype != teacher_weight.dtype:
        raise ValueError(f"kd.fused_impl=triton: teacher_hidden ({teacher_hidden.dtype}) and teacher_weight "
                         f"({teacher_weight.dtype}) must share a dtype")
    if not platform.is_cuda_device(student_hidden.device) and not interpreting():
        check_available(False)


class _Launch:
    """Everything both kernels take besides the per-pass buffers."""

    def __init__(self, hs, ws, ht, wt, zt, labels, mask, o: _Options, blocks: dict):
        k = _kernels()
        self.o, self.blocks = o, blocks
        self.n, self.v_local = hs.size(0), ws.size(0)
        self.vocab_start = _group_rank(o.tp_group) * self.v_local
        self.n_valid = max(0, min(self.v_local, o.vocab_size - self.vocab_start))  # unpadded ids here
        self.use_kd, self.use_ce = o.alpha > 0, o.alpha < 1
        divergence = VocabParallelKD._resolve(o.divergence, o.beta)
        self.reverse = self.use_kd and divergence == "reverse_kl"
        self.jsd = self.use_kd and divergence == "jsd"
        dummy = torch.zeros(1, dtype=hs.dtype, device=hs.device)  # for pointers a pass does not read
        self.hs, self.ws = hs.contiguous(), ws.contiguous()
        self.teacher_logits = zt is not None
        self.ht = ht.contiguous() if ht is not None else dummy
        self.wt = wt.contiguous() if wt is not None else dummy
        self.zt = zt.contiguous() if zt is not None else dummy
        self.labels = labels.contiguous() if labels is not None else torch.zeros(self.n, dtype=torch.long,
                                                                                 device=hs.device)
        self.mask = mask.contiguous().to(torch.int8)
        interp = interpreting()
        self.upcast_s = interp and hs.dtype == torch.bfloat16  # triton-lang/triton#11584
        self.upcast_t = interp and self.ht.dtype == torch.bfloat16
        self.h_t = self.ht.size(1) if ht is not None else 1
        self.grid = (-(-self.n // blocks["block_m"]),)
        self.kernels = k

    def common(self):
        return (self.n, self.v_local, self.hs.size(1), self.h_t, self.n_valid, self.vocab_start,
                self.o.temperature)

    def flags(self):
        return dict(USE_KD=self.use_kd, USE_CE=self.use_ce, TEACHER_LOGITS=self.teacher_logits,
                    REVERSE=self.reverse, UPCAST_S=self.upcast_s, UPCAST_T=self.upcast_t,
                    BLOCK_M=self.blocks["block_m"], BLOCK_V=self.blocks["block_v"],
                    BLOCK_K=self.blocks["block_k"])

    def grad_kernel(self, gstats, kd_w, ce_w, out_h=None, out_w=None, out_div=None):
        """kd_grad_kernel: the gradient pass into out_h / out_w, or (out_div [2, n]) the DIV_ONLY pass."""
        beta = min(max(self.o.beta, 1e-30), 1.0 - 1e-7)  # only read for JSD, where 0 < beta < 1
        dummy = torch.zeros(1, dtype=torch.float32, device=self.hs.device)
        self.kernels.kd_grad_kernel[self.grid](
            self.hs, self.ws, self.ht, self.wt, self.zt, self.labels, self.mask, gstats, kd_w, ce_w,
            dummy if out_h is None else out_h, dummy if out_w is None else out_w,
            dummy if out_div is None else out_div, *self.common(), math.log(beta), math.log1p(-beta),
            JSD=self.jsd, NEED_GRAD_H=out_h is not None, NEED_GRAD_W=out_w is not None,
            DIV_ONLY=out_div is not None, **self.flags())

    def divergence_sums(self, gstats) -> torch.Tensor:
        """[2, n]: the DIV_ONLY pass's sums (see kd_grad_kernel), all-reduced (SUM) over TP."""
        out = torch.zeros(2, self.n, dtype=torch.float32, device=self.hs.device)
        if self.n > 0:
            unused = torch.zeros(self.n, dtype=torch.float32, device=self.hs.device)
            self.grad_kernel(gstats.contiguous(), unused, unused, out_div=out)
        return VocabParallelKD.all_reduce(out, dist.ReduceOp.SUM, self.o.tp_group)


def _forward(launch: _Launch):
    """-> (loss_sum fp32 scalar, global stats [7, n] for backward), the TP-reduced statistics."""
    k, o, n = launch.kernels, launch.o, launch.n
    device = launch.hs.device
    stats = torch.empty(len(k.STATS), n, dtype=torch.float32, device=device)  # [8, n], shard-local
    if n > 0:
        k.kd_stats_kernel[launch.grid](launch.hs, launch.ws, launch.ht, launch.wt, launch.zt, launch.labels,
                                       launch.mask, stats, *launch.common(), **launch.flags())
    m_s, l_s, m_t, l_t, c_kl, m_ce, l_ce, z_tgt = stats.unbind(0)

    # all-reduce MAX: [student/T, teacher/T, CE] maxima
    maxes = VocabParallelKD.all_reduce(torch.stack([m_s, m_t, m_ce]), dist.ReduceOp.MAX, o.tp_group)  # [3, n]
    big_m_s, big_m_t, big_m_ce = maxes.unbind(0)

    def to_global(l, m, big_m):  # a shard-local sum relative to m -> relative to the global max
        return torch.where(l > 0, l * torch.exp(m - big_m), 0.0)

    # C re-referenced to the global maxima (see kd_stats_kernel), rescaled like L_t
    d_s, d_t = big_m_s - m_s, big_m_t - m_t  # how far each shard's max is below the global one
    if launch.reverse:  # C weighted by the student (KL(p || q)): the same with the roles swapped
        c_glob = torch.where(l_s > 0, torch.exp(-d_s) * (c_kl - (d_s - d_t) * l_s), 0.0)
    else:
        c_glob = torch.where(l_t > 0, torch.exp(-d_t) * (c_kl - (d_t - d_s) * l_t), 0.0)
    labels_local = launch.labels - launch.vocab_start
    on_shard = (labels_local >= 0) & (labels_local < launch.v_local)
    predicted = torch.where(on_shard, z_tgt - big_m_ce, 0.0)  # megatron: z[target] - max, owning shard
    # all-reduce SUM: [student sum-exp, teacher sum-exp, KL numerator, CE sum-exp, CE target logit]
    sums = torch.stack([to_global(l_s, m_s, big_m_s), to_global(l_t, m_t, big_m_t), c_glob,
                        to_global(l_ce, m_ce, big_m_ce), predicted])
    sums = VocabParallelKD.all_reduce(sums, dist.ReduceOp.SUM, o.tp_group)  # [5, n]
    sum_s, sum_t, c_sum, sum_ce, pred = sums.unbind(0)
    log_l_s, log_l_t, log_l_ce = sum_s.log(), sum_t.log(), sum_ce.log()

    per_token = torch.zeros(n, dtype=torch.float32, device=device)
    div = torch.zeros(n, dtype=torch.float32, device=device)
    if launch.use_kd:
        # KL(q || p) = C / L_t + log L_s - log L_t; KL(p || q) = C / L_s + log L_t - log L_s
        div = c_sum / sum_s + log_l_t - log_l_s if launch.reverse else c_sum / sum_t + log_l_s - log_l_t
    gstats = torch.stack([big_m_s, log_l_s, big_m_t, log_l_t, big_m_ce, log_l_ce, div])  # [7, n]
    if launch.jsd:
        # JSD needs log m with the global normalisers: one more pass, [KL(p || m), KL(q || m)]
        kl_p_m, kl_q_m = launch.divergence_sums(gstats).unbind(0)
        div = o.beta * kl_q_m + (1.0 - o.beta) * kl_p_m
        gstats[k.GLOBAL_STATS.index("div")] = kl_p_m  # what the gradient subtracts (its own arithmetic)
    if launch.use_kd:
        per_token += o.alpha * o.kd_scale * div
    if launch.use_ce:
        per_token += (1.0 - o.alpha) * (log_l_ce - pred)
    loss_sum = torch.where(launch.mask.bool(), per_token, 0.0).sum()  # where: masked garbage stays out
    return loss_sum, gstats


def _main_grad_target(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron's fp32 ``main_grad`` buffer of ``weight`` when the kernel can add into it directly."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None:
        return None
    if tuple(main_grad.shape) != tuple(weight.shape):
        raise ValueError(f"kd.fused_impl=triton: {tuple(main_grad.shape)} main_grad of a "
                         f"{tuple(weight.shape)} weight")
    return main_grad


def _backward(launch: _Launch, gstats: torch.Tensor, grad_output: torch.Tensor, need_h: bool,
              weight: Optional[torch.Tensor]):
    """-> (grad of student_hidden or None, grad of student_weight or None)."""
    k, o = launch.kernels, launch.o
    device = launch.hs.device
    scale = grad_output.to(torch.float32)
    mask = launch.mask.bool()
    kd_w = torch.where(mask, scale * (o.alpha * o.kd_scale / o.temperature), 0.0).contiguous()  # [n]
    ce_w = torch.where(mask, scale * (1.0 - o.alpha), 0.0).contiguous()  # [n]
    grad_h = torch.zeros(launch.hs.shape, dtype=torch.float32, device=device) if need_h else None
    main_grad = _main_grad_target(weight) if weight is not None else None
    if weight is None:
        grad_w = None
    elif main_grad is not None and main_grad.dtype == torch.float32 and main_grad.is_contiguous():
        grad_w = main_grad  # the kernel's atomics add the (scaled) gradient in place
    else:
        grad_w = torch.zeros(launch.ws.shape, dtype=torch.float32, device=device)
    if launch.n > 0 and (need_h or weight is not None):
        gstats = gstats.contiguous()
        if launch.reverse:  # KL(p || q) once more with G's own arithmetic (see kd_grad_kernel)
            gstats = gstats.clone()
            gstats[k.GLOBAL_STATS.index("div")] = launch.divergence_sums(gstats)[0]
        launch.grad_kernel(gstats, kd_w, ce_w, out_h=grad_h, out_w=grad_w)
    if grad_h is not None:
        # replicated input of a column-parallel layer: the full gradient is the sum over shards
        grad_h = VocabParallelKD.all_reduce(grad_h, dist.ReduceOp.SUM, o.tp_group).to(launch.hs.dtype)
    if weight is None:
        return grad_h, None
    if main_grad is None:
        return grad_h, grad_w.to(weight.dtype)
    if grad_w is not main_grad:
        main_grad.add_(grad_w)
    if hasattr(weight, "grad_added_to_main_grad"):
        # megatron's DDP: its hook asserts a grad under overlap_grad_reduce and adds param.grad to
        # main_grad unless grad_added_to_main_grad. Zeros, flag untouched: with tied embeddings
        # param.grad also holds the embedding's gradient, which must still be added (megatron's
        # own dummy-grad + flag would drop it).
        return grad_h, torch.zeros_like(weight)
    return grad_h, None


class _TritonLinearKDLoss(torch.autograd.Function):
    """Forward: statistics pass + loss. Backward: the gradient pass, scaled by the incoming grad."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                labels, loss_mask, options, blocks):
        launch = _Launch(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                         labels, loss_mask, options, blocks)
        loss_sum, gstats = _forward(launch)
        ctx.launch = launch  # holds the inputs (no copies) and the per-token stats [7, n]
        ctx.gstats = gstats
        ctx.weight = student_weight if ctx.needs_input_grad[1] else None
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = _backward(ctx.launch, ctx.gstats, grad_output, ctx.needs_input_grad[0], ctx.weight)
        ctx.launch = ctx.gstats = ctx.weight = None
        return grad_h, grad_w, None, None, None, None, None, None, None


def triton_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          teacher_hidden: Optional[torch.Tensor] = None,
                          teacher_weight: Optional[torch.Tensor] = None, *,
                          teacher_logits: Optional[torch.Tensor] = None,
                          labels: Optional[torch.Tensor] = None, loss_mask: torch.Tensor,
                          alpha: float, tp_group, vocab_size: int, temperature: float = 1.0,
                          scale_by_t_squared: bool = True, divergence: str = "forward_kl",
                          beta: float = 0.5, top_k: Optional[int] = None,
                          block_m: int = DEFAULT_BLOCKS["block_m"], block_v: int = DEFAULT_BLOCKS["block_v"],
                          block_k: int = DEFAULT_BLOCKS["block_k"]):
    """``alpha * KD + (1 - alpha) * CE`` over loss-masked tokens, Triton tiles; see the module doc.

    Arguments as ``kd.fused.fused_linear_kd_loss`` (without ``chunk_size`` / ``grad_accum_dtype``:
    one tile is the chunk, gradients accumulate in fp32), plus the tile sizes (powers of two,
    >= 16: tl.dot's minimum). Returns ``(loss_sum, num_tokens)``: fp32 scalar, replicated over TP,
    differentiable w.r.t. the student's hidden state and weight; int count.
    """
    o = _Options(tp_group=tp_group, vocab_size=int(vocab_size), alpha=float(alpha),
                 temperature=float(temperature),
                 kd_scale=float(temperature) ** 2 if scale_by_t_squared else 1.0,
                 divergence=divergence, beta=float(beta), top_k=top_k, chunk_size=1,
                 grad_accum_dtype=torch.float32)
    if not 0.0 <= o.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if o.alpha == 0:  # the CE baseline: the teacher is not run at all
        teacher_hidden = teacher_weight = teacher_logits = None
    blocks = dict(block_m=int(block_m), block_v=int(block_v), block_k=int(block_k))
    for name, b in blocks.items():
        if b < 16 or b & (b - 1):
            raise ValueError(f"kd.fused_impl=triton: {name}={b}; expected a power of two >= 16")
    _check_fused_args(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                      labels, loss_mask, o)
    _check_supported(o, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits)
    num_tokens = loss_mask.bool().sum().to(torch.int)
    with torch.no_grad():  # the teacher's tensors enter the kernels as plain data
        teacher = [t.detach() if t is not None else None
                   for t in (teacher_hidden, teacher_weight, teacher_logits)]
    loss = _TritonLinearKDLoss.apply(student_hidden, student_weight, *teacher, labels, loss_mask, o, blocks)
    return loss, num_tokens
