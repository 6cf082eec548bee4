"""megatron-core DDP, optimizer (Adam, optionally distributed) and warmup+decay scheduler."""
from __future__ import annotations

from typing import List

import torch


def wrap_ddp(model_chunks: List[torch.nn.Module], parallel_cfg) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
        # Per-token loss: grads are summed over DP and divided once by the global token count.
        average_in_collective=False,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Megatron-LM: bucket only the first virtual chunk's grads.
            disable_bucketing=i > 0,
        ))
    return wrapped


def build_optimizer(model_chunks, train_cfg, parallel_cfg):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.adam_eps,
        clip_grad=train_cfg.clip_grad,
        bf16=train_cfg.bf16,
        params_dtype=torch.bfloat16 if train_cfg.bf16 else torch.float32,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optimizer, train_cfg):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    # Megatron-LM steps the scheduler in samples (increment=global_batch_size), so iteration
    # counts are converted to samples here.
    gbs = train_cfg.global_batch_size
    decay_iters = train_cfg.lr_decay_iters or train_cfg.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        lr_warmup_steps=train_cfg.lr_warmup_iters * gbs,
        lr_decay_steps=max(decay_iters, train_cfg.lr_warmup_iters + 1) * gbs,
        lr_decay_style=train_cfg.lr_decay_style,
        start_wd=train_cfg.weight_decay,
        end_wd=train_cfg.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
    )
