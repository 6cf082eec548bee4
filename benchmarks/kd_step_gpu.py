"""One KD training step on one GPU at the paper's phase-2 shape, side by side with a CE-only step.

Never run on a GPU yet (no device lent so far); run it with ``bash tools/device_check.sh`` (a
lent machine, no network) or ``bash tools/gpu_checks.sh`` (a machine that can install TE).

Student: the paper's (examples/paper: 30 layers, hidden 1280, 20 heads, 4 KV groups, FFN 6144,
vocab 202,048, tied embeddings, ~1.08B). Teacher: a dense stand-in with the same vocabulary that
fits next to it (default: examples/paper/phase2_base.yaml's 32 x 4096 GQA teacher, bf16, frozen,
random weights — speed does not depend on them). One 131,072-token window per step of packed
documents of ~2k tokens (uniform 1,024-3,072), TE fused attention on THD with global positions,
the fused chunked KD loss, full recompute (uniform, 1 layer), bf16, and FP8 (delayed and current
scaling) in the modes that say so. Every mode runs in its own process (fresh FP8 state, memory).

Reported per mode: tokens/s, MFU over *model* FLOPs (student fwd+bwd + teacher fwd, attention
counted for the document mask; recompute excluded, as Megatron counts it) against
``--peak-tflops`` (H100 SXM bf16 dense 989; FP8 MFU is still quoted against the bf16 peak), peak
memory, and the ratio to the CE-only bf16 step measured in the same run.

    python benchmarks/kd_step_gpu.py                       # all modes, prints the table
    python benchmarks/kd_step_gpu.py --modes kd_bf16,ce_bf16 --steps 5 --json-out out.json
    python benchmarks/kd_step_gpu.py --smoke               # tiny shapes, any device: is it wired?
    python benchmarks/kd_step_gpu.py --allow-local-spec --seq 8192 --modes kd_bf16,ce_bf16
                                                           # a GPU without TE (tools/device_check.sh)

``--smoke`` runs the same code at toy size (2-layer student and teacher, vocab 2,048, 512-token
windows), on the CPU's local spec too; CI runs it (tests/e2e/test_kd_step_gpu_smoke.py) so the
script cannot rot while no GPU is around. Its numbers measure nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "examples" / "paper" / "phase2_kd_10k_to_500k.yaml"
MODES = {  # name -> (kd, fp8 format, fp8 recipe)
    "kd_bf16": (True, None, None),
    "kd_fp8_delayed": (True, "hybrid", "delayed"),
    "kd_fp8_current": (True, "hybrid", "tensorwise"),
    "ce_bf16": (False, None, None),
    "ce_fp8_delayed": (False, "hybrid", "delayed"),
}
VOCAB = 202_048
SMOKE = {  # toy shapes for --smoke (argparse defaults they replace)
    "seq": 512, "doc_min": 48, "doc_max": 160, "steps": 1, "warmup": 1, "vocab": 2048,
    "teacher_layers": 2, "teacher_hidden": 128, "teacher_ffn": 256,
}
SMOKE_STUDENT = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                 "model.num_query_groups=2", "model.ffn_hidden_size=128", "teacher.num_attention_heads=4",
                 "teacher.num_query_groups=2", "kd.fused_chunk_size=128"]


def overrides(args, mode: str) -> list:
    kd, fp8, recipe = MODES[mode]
    # one GPU: the recipe's CP=8 / distributed optimizer / DP overlap layout does not apply
    o = [f"data.seq_length={args.seq}", "train.micro_batch_size=1", "train.global_batch_size=1",
         "parallel.context_parallel_size=1", "parallel.use_distributed_optimizer=false",
         "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
         "train.bf16=true", "model.recompute_granularity=full", "model.recompute_method=uniform",
         "model.recompute_num_layers=1", "kd.loss_impl=fused", f"kd.alpha={1.0 if kd else 0.0}",
         f"teacher.num_layers={args.teacher_layers}", f"teacher.hidden_size={args.teacher_hidden}",
         f"teacher.ffn_hidden_size={args.teacher_ffn}", "teacher.bf16=true"]
    if fp8:
        o += [f"model.fp8={fp8}", f"model.fp8_recipe={recipe}"]
        if kd:
            o += [f"teacher.fp8={fp8}", f"teacher.fp8_recipe={recipe}"]
    return o + (SMOKE_STUDENT if args.smoke else [])


def synthetic_windows(seq: int, vocab: int, eos: int, doc_min: int, doc_max: int, seed: int):
    """Endless [1, seq] micro-batches of packed random-token documents (global positions)."""
    import torch

    from megatron_kd.data.packing import (document_ids_from_tokens, loss_mask_from_tokens,
                                          position_ids_from_document_ids)

    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(3, vocab, (1, seq + 1), generator=g)
        at = 0
        while True:
            at += int(torch.randint(doc_min, doc_max + 1, (1,), generator=g))
            if at >= seq:
                break
            tokens[0, at - 1] = eos
        t, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        doc = document_ids_from_tokens(t, eos)
        yield {"tokens": t, "labels": labels, "loss_mask": loss_mask_from_tokens(t, eos, True),
               "document_ids": doc, "position_ids": position_ids_from_document_ids(doc, reset=False)}


def attended_keys(doc_min: int, doc_max: int) -> float:
    """Mean keys per query under the document mask for lengths uniform in [doc_min, doc_max]."""
    ns = range(doc_min, doc_max + 1)
    return sum(n * (n + 1) / 2 for n in ns) / sum(ns)


def run_mode(args, mode: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_kd import distributed, platform
    from megatron_kd.config import load_config, validate_layout
    from megatron_kd.data.cp_layout import cp_capacity, layout_batches
    from megatron_kd.kd.distill_model import DistillationModel
    from megatron_kd.kd.objective import DistillationObjective
    from megatron_kd.kd.pair import freeze
    from megatron_kd.models import build_model
    from megatron_kd.plan import flops_per_token
    from megatron_kd.training.loop import reduce_losses
    from megatron_kd.training.objective import CrossEntropyObjective
    from megatron_kd.training.optimizer import build_optimizer, wrap_ddp

    if platform.layer_spec_kind() != "te" and not (args.smoke or args.allow_local_spec):
        raise SystemExit("kd_step_gpu.py needs CUDA + transformer-engine (the TE spec); "
                         "--allow-local-spec runs megatron-core's local spec (keep --seq small), "
                         "--smoke toy shapes anywhere")
    vocab = args.vocab
    cfg = load_config(str(RECIPE), overrides(args, mode))
    validate_layout(cfg, 1)
    distributed.init_distributed()
    distributed.init_model_parallel(cfg.parallel, cfg.train.seed)
    from megatron.core import parallel_state as ps

    student = build_model(cfg.model, cfg.parallel, vocab, cfg.data.seq_length, bf16=True)
    kd = cfg.kd.alpha > 0
    if kd:
        teacher = freeze(build_model(cfg.teacher, cfg.parallel, vocab, cfg.data.seq_length, bf16=True))
        chunk = DistillationModel(student, teacher, cfg.kd, vocab, ps.get_tensor_model_parallel_group(),
                                  fused=True)
    else:
        chunk = student
    chunk.config.calculate_per_token_loss = True
    model = wrap_ddp([chunk], cfg.parallel)
    from megatron.core.distributed import finalize_model_grads

    chunk.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(model, cfg.train, cfg.parallel)
    device = platform.device()
    objective = DistillationObjective(cfg.kd, device) if kd else CrossEntropyObjective(device)
    data = layout_batches(synthetic_windows(args.seq, vocab, 2, args.doc_min, args.doc_max, seed=0), cfg)
    fb = get_forward_backward_func()

    def step():
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(forward_step_func=objective.forward_step, data_iterator=data, model=model[0],
                    num_microbatches=1, seq_length=cp_capacity(cfg), micro_batch_size=1,
                    forward_only=False)
        _, grad_norm, _ = optimizer.step()
        return {**reduce_losses(losses), "grad_norm": float(grad_norm)}

    for _ in range(args.warmup):
        step()
    platform.synchronize()
    platform.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    platform.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    keys = attended_keys(args.doc_min, args.doc_max)
    flops = flops_per_token(cfg.model, vocab, keys, backward=True)
    if kd:
        flops += flops_per_token(cfg.teacher, vocab, keys, backward=False)
    tps = args.seq / dt
    out = {"mode": mode, "seconds_per_step": dt, "tokens_per_s": tps,
           "mfu": tps * flops / (args.peak_tflops * 1e12), "model_gflop_per_token": flops / 1e9,
           "peak_memory_gib": platform.peak_memory_bytes() / 2 ** 30, "device": platform.device_name(),
           "spec": platform.layer_spec_kind(), "last_step": last}
    distributed.destroy()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=None, help=f"comma-separated, of {','.join(MODES)} "
                    "(default: all; with --smoke kd_bf16,ce_bf16)")
    ap.add_argument("--smoke", action="store_true",
                    help="toy shapes, local spec allowed: checks the wiring, measures nothing")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--seq", type=int, default=131072)
    ap.add_argument("--doc-min", type=int, default=1024)
    ap.add_argument("--doc-max", type=int, default=3072)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--teacher-layers", type=int, default=32)
    ap.add_argument("--teacher-hidden", type=int, default=4096)
    ap.add_argument("--teacher-ffn", type=int, default=14336)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--allow-local-spec", action="store_true",
                    help="without transformer-engine, run megatron-core's local spec (its attention "
                         "materialises the [s, s] document mask: use --seq 8192 or so)")
    ap.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.smoke:  # toy shapes unless given explicitly
        given = {a.split("=")[0] for a in sys.argv[1:]}
        for k, v in SMOKE.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.modes = args.modes or ("kd_bf16,ce_bf16" if args.smoke else ",".join(MODES))
    if args.one_mode:
        print("RESULT " + json.dumps(run_mode(args, args.one_mode)), flush=True)
        return
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:  # before any mode runs
        raise SystemExit(f"--modes: unknown {','.join(bad)}; expected some of {','.join(MODES)}")
    rows = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--one-mode", mode] + [a for a in sys.argv[1:]]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + len(rows))}
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not lines:
            rows.append({"mode": mode, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    base = next((r for r in rows if r.get("mode") == "ce_bf16" and "error" not in r), None)
    print(f"{'mode':<18}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'s/step':>9}{'vs CE bf16':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<18} failed: {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['mode']:<18}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}{r['peak_memory_gib']:>10.1f}"
              f"{r['seconds_per_step']:>9.2f}{ratio:>12.2f}")
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(f"device: {ok[0]['device']} ({ok[0]['spec']} spec); {args.seq} tokens/step, documents "
              f"{args.doc_min}-{args.doc_max}; last step: " + "; ".join(
                  f"{r['mode']} " + ", ".join(f"{k} {v:.4g}" for k, v in r["last_step"].items()) for r in ok))
    if args.smoke:
        print("smoke run: toy shapes, the numbers above measure nothing")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if len(ok) < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
