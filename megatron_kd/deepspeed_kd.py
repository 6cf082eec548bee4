"""``megatron-kd train --engine deepspeed``: distil a Hugging Face student from a Hugging Face
teacher under DeepSpeed ZeRO, with no conversion to megatron-core.

Why a second engine: the LongReD reference recipe, and most published students, are HF models
trained with DeepSpeed; converting every candidate student to megatron-core costs a
conversion each way. What stays the same as the megatron-core path: the data pipeline
(``build_packed_datasets`` windows, ``build_data_iterator`` order and DP sharding, document
mask + global position ids), the objective (``kd/losses.py``'s ``vocab_parallel_kd_loss`` called
with ``tp_group=None`` -- TP=1 -- and ``kd_objective_loss``), the reduction (sum over loss-masked
tokens / the global token count of the step), the run directory (``config.yaml``,
``logs/metrics.jsonl`` with the same keys, ``checkpoints/iter_XXXXXXX``). What differs: the
student is ``checkpoint.load`` (a HF directory) under ZeRO ``parallel.zero_stage``; the teacher is
``teacher.load`` (a HF directory) under ZeRO-3 inference partitioning (its weights sharded over
the DP ranks, gathered layer by layer in the forward); the ``model`` / ``teacher`` shape keys are
not used (``config.json`` is the shape); TP/PP/CP stay 1 (DeepSpeed's data parallelism only).

On the CPU DeepSpeed runs its ``cpu`` accelerator over gloo (``DS_ACCELERATOR=cpu``, set here
when CUDA is absent); neither oneCCL nor intel-extension-for-pytorch is needed for ZeRO 0-3.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Tuple

from megatron_kd.config import ConfigError, RunConfig

CONVERT_HINT = "megatron-kd convert mcore-to-hf {run} {run}_hf"


def _hf_dir(path: Optional[str], key: str) -> Path:
    """A HF model directory (config.json + safetensors), or a one-line error naming the converter
    when it is a megatron-core run directory / checkpoint."""
    if not path:
        raise ConfigError(f"{key}: required with --engine deepspeed (a Hugging Face model directory)")
    p = Path(path)
    megatron = ((p / "config.yaml").is_file() or (p / "latest_checkpointed_iteration.txt").is_file()
                or (p / "common.pt").is_file())  # a run directory, its checkpoints/, or one iter_* in it
    if megatron and not (p / "config.json").is_file():
        run = next((q for q in (p, p.parent, p.parent.parent) if (q / "config.yaml").is_file()), p)
        raise ConfigError(f"{key}={path}: a megatron-core checkpoint; --engine deepspeed reads Hugging Face "
                          f"directories: convert it with `{CONVERT_HINT.format(run=run)}` and set "
                          f"{key}={run}_hf")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}={path}: no config.json (expected a Hugging Face model directory)")
    if not any(p.glob("*.safetensors")):
        raise ConfigError(f"{key}={path}: no *.safetensors weights (expected a Hugging Face model directory)")
    return p


def check(cfg: RunConfig, world_size: Optional[int] = None) -> Tuple[Path, Optional[Path]]:
    """Everything checkable before torch.distributed and DeepSpeed start: (student, teacher) dirs."""
    p = cfg.parallel
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                "expert_model_parallel_size"):
        if getattr(p, key) != 1:
            raise ConfigError(f"parallel.{key}={getattr(p, key)}: --engine deepspeed runs data parallel only "
                              "(ZeRO); use the megatron engine for model parallelism")
    if cfg.kd.teacher_source != "live":
        raise ConfigError("kd.teacher_source=cache: --engine deepspeed runs the teacher live")
    if cfg.kd.loss_impl == "fused":
        raise ConfigError("kd.loss_impl=fused: --engine deepspeed computes the exact loss (kd/losses.py) "
                          "from the HF models' logits")
    if not cfg.checkpoint.save:
        raise ConfigError("checkpoint.save: required (the run directory)")
    student = _hf_dir(cfg.checkpoint.load, "checkpoint.load")
    teacher = None
    if cfg.kd.alpha > 0:
        if cfg.teacher is None:
            raise ConfigError(f"kd.alpha={cfg.kd.alpha} > 0 needs a teacher: set teacher.load to a Hugging "
                              "Face model directory")
        teacher = _hf_dir(cfg.teacher.load, "teacher.load")
    t = cfg.train
    if world_size is not None and t.global_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} x {world_size} data-parallel ranks")
    return student, teacher


def require_deepspeed():
    """Import DeepSpeed on the accelerator this machine has (cpu when CUDA is absent)."""
    from megatron_kd import platform

    if not platform.cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"--engine deepspeed needs the deepspeed package ({e}); pip install deepspeed "
                          "(tools/install.sh test installs it)") from None
    return deepspeed


def _vocab(tokenizer, path: Path, key: str) -> int:
    rows = json.loads((path / "config.json").read_text()).get("vocab_size")
    if rows is not None and tokenizer.vocab_size > rows:
        raise ConfigError(f"{key}={path}: vocab_size={rows} in config.json is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} (data.tokenizer_model)")
    return tokenizer.vocab_size


def additive_document_mask(document_ids, dtype):
    """``[b, s]`` -> ``[b, 1, s, s]`` additive mask (0 = attend, dtype min = masked): the packed
    window's document-causal mask in the form transformers passes through unchanged (a 4-D mask
    is taken as already prepared, for eager and SDPA attention alike)."""
    import torch

    from megatron_kd.data.packing import document_attention_mask

    masked = document_attention_mask(document_ids)  # True = masked out
    return torch.zeros(masked.shape, dtype=dtype).masked_fill(masked, torch.finfo(dtype).min)


def per_token_losses(student, teacher, batch: dict, kd_cfg, vocab: int):
    """Per-token KD and CE ``[b, s]`` of one micro-batch, the same functions as the megatron path."""
    import torch
    import torch.nn.functional as F

    from megatron_kd.kd.losses import vocab_parallel_kd_loss

    tokens, pos = batch["tokens"], batch["position_ids"]
    dtype = next(student.parameters()).dtype
    mask = additive_document_mask(batch["document_ids"], dtype).to(tokens.device)
    logits = student(input_ids=tokens, position_ids=pos, attention_mask=mask, use_cache=False).logits[..., :vocab]
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
    kd = None
    if teacher is not None:
        with torch.no_grad():
            t_logits = teacher(input_ids=tokens, position_ids=batch.get("teacher_position_ids", pos),
                               attention_mask=mask, use_cache=False).logits[..., :vocab]
        kd = vocab_parallel_kd_loss(logits, t_logits, tp_group=None, vocab_size=vocab,
                                    temperature=kd_cfg.temperature, scale_by_t_squared=kd_cfg.scale_by_t_squared,
                                    divergence=kd_cfg.divergence, beta=kd_cfg.beta, top_k=kd_cfg.top_k)
    return kd, ce.view_as(tokens)


def lr_lambda(t):
    """megatron's OptimizerParamScheduler shape: linear warmup from 0, then cosine/linear/constant
    decay to min_lr at lr_decay_iters (as a multiplier of lr, for torch's LambdaLR)."""
    decay = t.lr_decay_iters or t.train_iters

    def f(step: int) -> float:
        if t.lr_warmup_iters and step <= t.lr_warmup_iters:
            return step / t.lr_warmup_iters
        if step > decay or t.lr_decay_style == "constant":
            return (t.min_lr if step > decay else t.lr) / t.lr
        frac = (step - t.lr_warmup_iters) / max(1, decay - t.lr_warmup_iters)
        coeff = 0.5 * (math.cos(math.pi * frac) + 1.0) if t.lr_decay_style == "cosine" else 1.0 - frac
        return (t.min_lr + coeff * (t.lr - t.min_lr)) / t.lr
    return f


def ds_config(cfg: RunConfig, dp: int, teacher: bool = False) -> dict:
    t = cfg.train
    out = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "steps_per_print": 1 << 30,
           "bf16": {"enabled": bool(t.bf16)}, "wall_clock_breakdown": False}
    if teacher:  # ZeRO-3 inference: parameters partitioned over the ranks, no optimizer
        out["train_batch_size"] = t.micro_batch_size * dp
        out["zero_optimization"] = {"stage": 3}
        return out
    out.update(train_batch_size=t.global_batch_size,
               gradient_accumulation_steps=t.global_batch_size // (t.micro_batch_size * dp),
               gradient_clipping=t.clip_grad,
               zero_optimization={"stage": cfg.parallel.zero_stage},
               optimizer={"type": "AdamW", "params": {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2],
                                                      "eps": t.adam_eps, "weight_decay": t.weight_decay,
                                                      "torch_adam": True}})
    return out


class DeepSpeedKDTrainer:
    """Setup (checks first), steps, logging and checkpoints of the DeepSpeed engine."""

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False):
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite

    def setup(self):
        import torch

        from megatron_kd import distributed
        from megatron_kd.data import build_packed_datasets, load_tokenizer
        from megatron_kd.training.metrics import MetricsLogger
        from megatron_kd.training.run_dir import create_run_dir, prepare_run_dir

        cfg = self.cfg
        student_dir, teacher_dir = check(cfg)
        tok = load_tokenizer(cfg.data.tokenizer_model) if cfg.data.tokenizer_model else None
        if tok is None:
            raise ConfigError("data.tokenizer_model: required (the tokenizer student and teacher share)")
        self.vocab = _vocab(tok, student_dir, "checkpoint.load")
        if teacher_dir is not None:
            _vocab(tok, teacher_dir, "teacher.load")
        run = prepare_run_dir(cfg.checkpoint.save, cfg, resume=self.resume, overwrite=self.overwrite)
        deepspeed = require_deepspeed()
        info = distributed.init_distributed(cfg.parallel.distributed_timeout_minutes)
        self.rank, self.dp = info.rank, info.world_size
        check(cfg, self.dp)
        # DeepSpeed reads these (its launcher or torchrun set them; srun / mpirun / one process do not)
        for key, value in (("LOCAL_RANK", info.local_rank), ("RANK", info.rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        if self.rank == 0 and not (self.resume and (run / "config.yaml").is_file()):
            create_run_dir(run, cfg, self.overwrite)
        torch.distributed.barrier()
        self.run_dir = run
        torch.manual_seed(cfg.train.seed)
        import transformers

        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype,
                                                                    attn_implementation="sdpa")
        student.train()
        optim_sched = torch.optim.lr_scheduler.LambdaLR
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=student, model_parameters=[q for q in student.parameters() if q.requires_grad],
            config=ds_config(cfg, self.dp), lr_scheduler=lambda opt: optim_sched(opt, lr_lambda(cfg.train)))
        self.teacher = None
        if teacher_dir is not None:
            teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype,
                                                                        attn_implementation="sdpa")
            teacher.requires_grad_(False)
            self.teacher = deepspeed.initialize(model=teacher, config=ds_config(cfg, self.dp, teacher=True))[0]
            self.teacher.eval()
        self.iteration, self.consumed = 0, 0
        if self.resume and (run / "checkpoints" / "latest").is_file():
            _, client = self.engine.load_checkpoint(str(run / "checkpoints"))
            self.iteration, self.consumed = client["iteration"], client["consumed_samples"]
            if self.rank == 0:
                print(f"resumed from {run / 'checkpoints'} at iteration {self.iteration}", flush=True)
        total = cfg.train.train_iters * cfg.train.global_batch_size
        self.train_ds = build_packed_datasets(cfg.data, tok, cache_dir=str(run / "data_cache"),
                                              num_samples=(total, None, None))[0]
        self.metrics = MetricsLogger(run, enabled=self.rank == 0)
        if self.rank == 0:
            print(f"engine: deepspeed {deepspeed.__version__} ({os.environ.get('DS_ACCELERATOR', 'auto')} "
                  f"accelerator, {torch.distributed.get_backend()}); student {student_dir} under ZeRO-"
                  f"{cfg.parallel.zero_stage}, teacher {teacher_dir} under ZeRO-3 inference; DP {self.dp}",
                  flush=True)
        return self

    def train_step(self, it) -> dict:
        import torch

        gas = self.engine.gradient_accumulation_steps()
        micro = [next(it) for _ in range(gas)]
        count = torch.tensor(float(sum(b["loss_mask"].sum() for b in micro)))
        torch.distributed.all_reduce(count)  # the step's global loss-masked token count
        sums = torch.zeros(3)  # loss, kd, ce (sums over this rank's tokens)
        from megatron_kd.kd.losses import kd_objective_loss

        for batch in micro:
            kd, ce = per_token_losses(self.engine, self.teacher, batch, self.cfg.kd, self.vocab)
            loss_sum, _ = kd_objective_loss(kd, ce, batch["loss_mask"], self.cfg.kd.alpha)
            # DeepSpeed divides by gas and averages over DP: this makes the gradient sum / count
            self.engine.backward(loss_sum * (gas * self.dp) / count)
            self.engine.step()
            m = batch["loss_mask"].bool()
            sums += torch.stack([loss_sum.detach(), (kd.detach()[m].sum() if kd is not None else torch.tensor(0.)),
                                 ce.detach()[m].sum()])
        torch.distributed.all_reduce(sums)
        out = {"loss": (sums[0] / count).item()}
        if self.teacher is not None:
            out.update({"kd loss": (sums[1] / count).item(), "lm loss": (sums[2] / count).item()})
        norm = self.engine.get_global_grad_norm()
        out.update({"grad_norm": float(norm) if norm is not None else float("nan"),
                    "lr": self.engine.get_lr()[0] if self.engine.get_lr() else 0.0})
        return out

    def save(self):
        tag = f"iter_{self.iteration:07d}"
        self.engine.save_checkpoint(str(self.run_dir / "checkpoints"), tag=tag,
                                    client_state={"iteration": self.iteration, "consumed_samples": self.consumed})
        if self.rank == 0:
            print(f"saved checkpoint at iteration {self.iteration}", flush=True)

    def train(self) -> dict:
        from megatron_kd.data import build_data_iterator

        t = self.cfg.train
        it = build_data_iterator(self.train_ds, self.consumed, t.micro_batch_size, self.rank, self.dp)
        every = self.cfg.checkpoint.save_interval
        while self.iteration < t.train_iters:
            t0 = time.perf_counter()
            out = self.train_step(it)
            self.iteration += 1
            self.consumed += t.global_batch_size
            out["step time s"] = time.perf_counter() - t0
            if self.iteration % t.log_interval == 0:
                self.metrics.log(self.iteration, out)
            if t.exit_interval and self.iteration % t.exit_interval == 0 and self.iteration < t.train_iters:
                break  # Megatron's --exit-interval: the final save below, then exit
            if every and self.iteration % every == 0 and self.iteration < t.train_iters:
                self.save()
        self.save()
        self.metrics.close()
        return {"iteration": self.iteration}


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    from megatron_kd import distributed

    trainer = DeepSpeedKDTrainer(cfg, resume, overwrite).setup()
    try:
        return trainer.train()
    finally:
        distributed.destroy()
