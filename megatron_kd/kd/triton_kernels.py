"""Triton kernels of the fused linear + forward-KL (+ CE) loss; driven by ``kd/triton_fused.py``.

Imported only from there, lazily: this module imports ``triton`` at the top. Under
``TRITON_INTERPRET=1`` (read by ``triton.jit`` when this module is imported) the kernels run in
Triton's CPU interpreter, which is how CI checks them.

Layout: ``x [n, k]`` row-major hidden states, ``w [v/tp, k]`` row-major weight shard, so a logit
tile is ``x[rows] @ w[cols]^T``. One program per ``BLOCK_M`` tokens walks the shard in
``BLOCK_V`` columns; a ``[BLOCK_M, BLOCK_V]`` fp32 tile is the largest thing it holds.
"""
from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))

# Rows of the per-token statistics written by ``kd_stats_kernel`` ([N_STATS, n] fp32): local to
# this shard, each sum relative to its own row's running max.
STATS = ("m_s", "l_s", "m_t", "l_t", "c_kl", "m_ce", "l_ce", "z_tgt")
M_S, L_S, M_T, L_T, C_KL, M_CE, L_CE, Z_TGT = (tl.constexpr(i) for i in range(len(STATS)))
# Rows of the global statistics ``kd_grad_kernel`` reads ([6, n] fp32): maxima and log sum-exps.
GLOBAL_STATS = ("m_s", "log_l_s", "m_t", "log_l_t", "m_ce", "log_l_ce", "div")
G_M_S, G_LOG_L_S, G_M_T, G_LOG_L_T, G_M_CE, G_LOG_L_CE, G_DIV = (
    tl.constexpr(i) for i in range(len(GLOBAL_STATS)))


@triton.jit
def _logit_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, K,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 = x[rows, :] @ w[cols, :]^T; input-dtype tiles, fp32 accumulation.

    UPCAST: operands to fp32 before tl.dot -- the interpreter's bf16 dot multiplies raw bit
    patterns (triton-lang/triton#11584). A bf16 x bf16 product is exact in fp32, so this only
    changes the summation order."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return acc


@triton.jit
def _teacher_tile(ht_ptr, wt_ptr, zt_ptr, rows, row_ok, cols, col_ok, h_t, v_local,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, TEACHER_LOGITS: tl.constexpr):
    """The teacher's fp32 [BLOCK_M, BLOCK_V] logit tile: read from given logits, or formed from
    its hidden states and weight shard like the student's."""
    if TEACHER_LOGITS:
        z = tl.load(zt_ptr + rows[:, None] * v_local + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    else:
        z = _logit_tile(ht_ptr, wt_ptr, rows, row_ok, cols, col_ok, h_t, BLOCK_M, BLOCK_V, BLOCK_K, UPCAST)
    return z


@triton.jit
def _online(m, l, x):
    """Online softmax step: running max ``m`` / sum ``l`` [BLOCK_M] with tile ``x`` (excluded
    entries -inf). Returns the new max, the new sum, the factor the old sum was rescaled by, and
    exp(x - new max). A row with nothing seen yet keeps m = -inf, l = 0 (no nan)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    rescale = tl.exp(m - m_safe)  # m = -inf -> 0
    e = tl.exp(x - m_safe[:, None])
    return m_new, l * rescale + tl.sum(e, axis=1), rescale, e, m_safe


@triton.jit
def kd_stats_kernel(hs_ptr, ws_ptr, ht_ptr, wt_ptr, zt_ptr, labels_ptr, mask_ptr, stats_ptr,
                    n, v_local, h_s, h_t, n_valid, vocab_start, temperature,
                    USE_KD: tl.constexpr, USE_CE: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
                    REVERSE: tl.constexpr, UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward: this shard's per-token statistics in one pass over the vocab, -> stats [8, n].

    Student s = z/T and teacher t = z/T over the unpadded ids (cols < n_valid): running max and
    sum-exp; forward KL: C = sum_j e^(t_j - m_t) * ((t_j - m_t) - (s_j - m_s)), so that after the
    TP reduction KL(q || p) = C / L_t + log L_s - log L_t, every difference taken next to its max;
    REVERSE (KL(p || q)): s and t swap roles. CE over
    the whole padded shard at T = 1: max, sum-exp, and the raw target logit (0 off this shard).
    Loss-masked tokens load zero hidden states: finite whatever their inputs hold.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n = rows < n
    row_ok = in_n & (tl.load(mask_ptr + rows, mask=in_n, other=0) != 0)
    rows64 = rows.to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=in_n, other=-1).to(tl.int64) - vocab_start
    m_s = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    c_kl = tl.zeros((BLOCK_M,), tl.float32)
    m_ce = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_ce = tl.zeros((BLOCK_M,), tl.float32)
    z_tgt = tl.zeros((BLOCK_M,), tl.float32)
    for v0 in range(0, v_local, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_local
        z_s = _logit_tile(hs_ptr, ws_ptr, rows64, row_ok, cols, col_ok, h_s,
                          BLOCK_M, BLOCK_V, BLOCK_K, UPCAST_S)  # [BM, BV] fp32
        if USE_KD:
            valid = (cols < n_valid)[None, :]
            z_t = _teacher_tile(ht_ptr, wt_ptr, zt_ptr, rows64, row_ok, cols, col_ok, h_t, v_local,
                                BLOCK_M, BLOCK_V, BLOCK_K, UPCAST_T, TEACHER_LOGITS)
            s = tl.where(valid, z_s / temperature, 0.0)  # finite everywhere: no inf - inf below
            t = tl.where(valid, z_t / temperature, 0.0)
            seen = l_t > 0  # same support for student and teacher: both maxima finite or both -inf
            m_s_old = m_s
            m_t_old = m_t
            l_t_old = l_t
            l_s_old = l_s
            m_s, l_s, rescale_s, e_s, m_s_safe = _online(m_s, l_s, tl.where(valid, s, NEG_INF))
            m_t, l_t, rescale_t, e_t, m_t_safe = _online(m_t, l_t, tl.where(valid, t, NEG_INF))
            d_s = m_s_safe - tl.where(seen, m_s_old, m_s_safe)  # how far each max moved (0 at start)
            d_t = m_t_safe - tl.where(seen, m_t_old, m_t_safe)
            # re-reference the old C to the new maxima (each of its terms moves by -(d_a - d_b)),
            # then add this tile's terms; e = 0 off the support
            if REVERSE:
                c_kl = rescale_s * (c_kl - (d_s - d_t) * l_s_old)
                c_kl += tl.sum(e_s * ((s - m_s_safe[:, None]) - (t - m_t_safe[:, None])), axis=1)
            else:
                c_kl = rescale_t * (c_kl - (d_t - d_s) * l_t_old)
                c_kl += tl.sum(e_t * ((t - m_t_safe[:, None]) - (s - m_s_safe[:, None])), axis=1)
        if USE_CE:
            m_ce, l_ce, _, _, _ = _online(m_ce, l_ce, tl.where(col_ok[None, :], z_s, NEG_INF))
            hit = (cols[None, :] == label[:, None]) & col_ok[None, :]
            z_tgt += tl.sum(tl.where(hit, z_s, 0.0), axis=1)
    out = stats_ptr + rows
    tl.store(out + M_S * n, m_s, mask=in_n)
    tl.store(out + L_S * n, l_s, mask=in_n)
    tl.store(out + M_T * n, m_t, mask=in_n)
    tl.store(out + L_T * n, l_t, mask=in_n)
    tl.store(out + C_KL * n, c_kl, mask=in_n)
    tl.store(out + M_CE * n, m_ce, mask=in_n)
    tl.store(out + L_CE * n, l_ce, mask=in_n)
    tl.store(out + Z_TGT * n, z_tgt, mask=in_n)


@triton.jit
def kd_grad_kernel(hs_ptr, ws_ptr, ht_ptr, wt_ptr, zt_ptr, labels_ptr, mask_ptr, gstats_ptr,
                   kd_w_ptr, ce_w_ptr, grad_h_ptr, grad_w_ptr, div_out_ptr,
                   n, v_local, h_s, h_t, n_valid, vocab_start, temperature, log_beta, log_1m_beta,
                   USE_KD: tl.constexpr, USE_CE: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
                   REVERSE: tl.constexpr, JSD: tl.constexpr, UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
                   NEED_GRAD_H: tl.constexpr, NEED_GRAD_W: tl.constexpr, DIV_ONLY: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Backward: recompute each logit tile, form d loss / d z_S, push it through both GEMMs.

    G = kd_w * (p_S - q) + ce_w * (softmax(z_S) - onehot(label)), [BM, BV] (REVERSE: kd_w * p_S *
    (log p_S - log q - KL(p_S || q)), the softmax Jacobian applied to dKL/dp; JSD(beta), with
    m = beta q + (1 - beta) p_S: kd_w * (1 - beta) * p_S * (log p_S - log m - KL(p_S || m))), with the global
    statistics (log p = (s - M_s) - log L_s) and per-token weights that already hold the loss mask,
    alpha, T and the incoming gradient. grad_h[rows] += G @ w[cols] (fp32, this program owns the
    rows: plain read-add-write); grad_w[cols] += G^T @ x[rows] (fp32 atomics: every token tile
    adds to every vocab row). G goes into the GEMMs in the input dtype, as the torch path does.

    DIV_ONLY (a pass of its own, no GEMM for gradients): this shard's share of the divergence's
    sums -> div_out [2, n]: reverse KL: [sum p (log p - log q), 0]; JSD: [sum p (log p - log m),
    sum q (log q - log m)] (its value needs the global normalisers, so the forward runs this pass).
    Computed with exactly the arithmetic G uses, so that G's ``log p - log q - KL`` cancels to
    round-off even where the log-ratios are ~1e4 (a one-hot student at logit std 1,000, T = 0.5:
    the forward's online KL differs from this sum by ~1e-3).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_n = rows < n
    row_ok = in_n & (tl.load(mask_ptr + rows, mask=in_n, other=0) != 0)
    rows64 = rows.to(tl.int64)
    label = tl.load(labels_ptr + rows, mask=in_n, other=-1).to(tl.int64) - vocab_start
    g_row = gstats_ptr + rows
    if USE_KD:
        M_s = tl.load(g_row + G_M_S * n, mask=row_ok, other=0.0)
        log_l_s = tl.load(g_row + G_LOG_L_S * n, mask=row_ok, other=0.0)
        M_t = tl.load(g_row + G_M_T * n, mask=row_ok, other=0.0)
        log_l_t = tl.load(g_row + G_LOG_L_T * n, mask=row_ok, other=0.0)
        kd_w = tl.load(kd_w_ptr + rows, mask=row_ok, other=0.0)
        if REVERSE or JSD:
            div = tl.load(g_row + G_DIV * n, mask=row_ok, other=0.0)
    if USE_CE:
        M_ce = tl.load(g_row + G_M_CE * n, mask=row_ok, other=0.0)
        log_l_ce = tl.load(g_row + G_LOG_L_CE * n, mask=row_ok, other=0.0)
        ce_w = tl.load(ce_w_ptr + rows, mask=row_ok, other=0.0)
    div_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    div_acc_q = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(0, v_local, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_local
        z_s = _logit_tile(hs_ptr, ws_ptr, rows64, row_ok, cols, col_ok, h_s,
                          BLOCK_M, BLOCK_V, BLOCK_K, UPCAST_S)
        g = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        if USE_KD:
            valid = (cols < n_valid)[None, :]
            z_t = _teacher_tile(ht_ptr, wt_ptr, zt_ptr, rows64, row_ok, cols, col_ok, h_t, v_local,
                                BLOCK_M, BLOCK_V, BLOCK_K, UPCAST_T, TEACHER_LOGITS)
            # padding at 0 before the differences (its logits may be large: no inf - inf), then out
            log_p = (tl.where(valid, z_s / temperature, 0.0) - M_s[:, None]) - log_l_s[:, None]
            log_q = (tl.where(valid, z_t / temperature, 0.0) - M_t[:, None]) - log_l_t[:, None]
            p = tl.where(valid, tl.exp(log_p), 0.0)
            if JSD:  # log m = logaddexp(log q + log beta, log p + log(1 - beta))
                a = log_q + log_beta
                b = log_p + log_1m_beta
                top = tl.maximum(a, b)
                log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
                if DIV_ONLY:
                    div_acc += tl.sum(p * (log_p - log_m), axis=1)  # p = q = 0 off the support
                    div_acc_q += tl.sum(tl.where(valid, tl.exp(log_q), 0.0) * (log_q - log_m), axis=1)
                else:
                    g += (kd_w[:, None] * tl.exp(log_1m_beta)) * p * ((log_p - log_m) - div[:, None])
            elif DIV_ONLY:
                div_acc += tl.sum(p * (log_p - log_q), axis=1)  # p = 0 off the support
            elif REVERSE:
                g += kd_w[:, None] * p * ((log_p - log_q) - div[:, None])
            else:
                g += kd_w[:, None] * (p - tl.where(valid, tl.exp(log_q), 0.0))
        if USE_CE and not DIV_ONLY:
            softmax = tl.exp((z_s - M_ce[:, None]) - log_l_ce[:, None])
            onehot = tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
            g += ce_w[:, None] * (softmax - onehot)
        if not DIV_ONLY:  # G through both gradient GEMMs, h in BLOCK_K slices
            g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
            g_in = g.to(hs_ptr.dtype.element_ty)
            if UPCAST_S:
                g_in = g_in.to(tl.float32)
            for k0 in range(0, h_s, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < h_s
                if NEED_GRAD_H:
                    w = tl.load(ws_ptr + cols[:, None] * h_s + ks[None, :],
                                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST_S:
                        w = w.to(tl.float32)
                    gh_ptrs = grad_h_ptr + rows64[:, None] * h_s + ks[None, :]
                    gh_mask = in_n[:, None] & k_ok[None, :]
                    gh = tl.load(gh_ptrs, mask=gh_mask, other=0.0)
                    gh = tl.dot(g_in, w, gh, input_precision="ieee")  # [BM, BK]
                    tl.store(gh_ptrs, gh, mask=gh_mask)
                if NEED_GRAD_W:
                    x = tl.load(hs_ptr + rows64[:, None] * h_s + ks[None, :],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    if UPCAST_S:
                        x = x.to(tl.float32)
                    gw = tl.dot(tl.trans(g_in), x, input_precision="ieee")  # [BV, BK] fp32
                    tl.atomic_add(grad_w_ptr + cols[:, None].to(tl.int64) * h_s + ks[None, :], gw,
                                  mask=col_ok[:, None] & k_ok[None, :])
    if DIV_ONLY:
        tl.store(div_out_ptr + rows, div_acc, mask=in_n)
        tl.store(div_out_ptr + n + rows, div_acc_q, mask=in_n)
