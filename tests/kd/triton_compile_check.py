"""Run by test_triton_fused.py without TRITON_INTERPRET (a process of its own: the variable is read
when the kernels are decorated). Prints ``RESULT {json}``:

* ``cpu_error``: what ``triton_linear_kd_loss`` raises on CPU tensors without the interpreter, and
  ``config_error``: what the kd train spec's check raises for ``kd.fused_impl: triton`` on a CPU
  (both before any kernel runs);
* ``compiled``: both kernels compiled ahead of time for an H100 (sm_90) by Triton's own compiler
  and bundled ptxas -- no GPU needed -- in the configuration training uses (bf16, teacher hidden
  states, both gradients, the default tiles): the kernel code the interpreter checks is also valid
  GPU code. Per kernel: shared memory, wgmma (Hopper tensor-core) instructions, local-memory
  (register spill) loads in the PTX.
"""
from __future__ import annotations

import json
import os

os.environ.pop("TRITON_INTERPRET", None)
os.environ["MEGATRON_KD_FORCE_CPU"] = "1"  # platform.cuda_available() is False even on a GPU box

import torch  # noqa: E402

from megatron_kd.kd import triton_fused  # noqa: E402

COMMON = dict(hs_ptr="*bf16", ws_ptr="*bf16", ht_ptr="*bf16", wt_ptr="*bf16", zt_ptr="*bf16",
              labels_ptr="*i64", mask_ptr="*i8")
SIZES = dict(n="i32", v_local="i32", h_s="i32", h_t="i32", n_valid="i32", vocab_start="i32",
             temperature="fp32")
FLAGS = dict(USE_KD=True, USE_CE=True, TEACHER_LOGITS=False, REVERSE=False, UPCAST_S=False, UPCAST_T=False,
             BLOCK_M=triton_fused.DEFAULT_BLOCKS["block_m"], BLOCK_V=triton_fused.DEFAULT_BLOCKS["block_v"],
             BLOCK_K=triton_fused.DEFAULT_BLOCKS["block_k"])


def cpu_error() -> str:
    h = torch.randn(4, 16)
    w = torch.randn(32, 16, requires_grad=True)
    try:
        triton_fused.triton_linear_kd_loss(h, w, h, w.detach(), labels=torch.zeros(4, dtype=torch.long),
                                           loss_mask=torch.ones(4, dtype=torch.bool), alpha=0.5,
                                           tp_group=None, vocab_size=32)
    except RuntimeError as e:
        return str(e)
    return "no error"


def config_error() -> str:
    from megatron_kd.config import ConfigError, from_dict
    from megatron_kd.kd.train_spec import check_fused_impl

    cfg = from_dict({"kd": dict(alpha=0.5, loss_impl="fused", fused_impl="triton")})
    try:
        check_fused_impl(cfg)
    except ConfigError as e:
        return str(e)
    return "no error"


def compile_sm90(kernel, pointers: dict, scalars: dict, flags: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**COMMON, **pointers, **SIZES, **scalars, **{name: "constexpr" for name in flags}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=flags),
                              target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    return dict(cubin_bytes=len(compiled.asm["cubin"]), shared=compiled.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), local_loads=ptx.count("ld.local"))


def main():
    k = triton_fused._kernels()
    out = dict(interpreting=triton_fused.interpreting(), cpu_error=cpu_error(), config_error=config_error())
    out["compiled"] = {
        "kd_stats_kernel": compile_sm90(k.kd_stats_kernel, dict(stats_ptr="*fp32"), {}, FLAGS),
        "kd_grad_kernel": compile_sm90(
            k.kd_grad_kernel, dict(gstats_ptr="*fp32", kd_w_ptr="*fp32", ce_w_ptr="*fp32", grad_h_ptr="*fp32",
                                   grad_w_ptr="*fp32", div_out_ptr="*fp32"),
            dict(log_beta="fp32", log_1m_beta="fp32"),
            dict(FLAGS, JSD=False, NEED_GRAD_H=True, NEED_GRAD_W=True, DIV_ONLY=False)),
    }
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
