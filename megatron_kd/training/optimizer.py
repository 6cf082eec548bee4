"""megatron-core DDP, optimizer (Adam, optionally distributed) and warmup+decay scheduler."""
from __future__ import annotations

import contextlib
from typing import List

import torch


def wrap_ddp(model_chunks: List[torch.nn.Module], parallel_cfg) -> list:
    """megatron-core DDP over every chunk; with overlap, set the schedule's hooks with
    :func:`set_sync_funcs` after this (the Trainer does)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    p = parallel_cfg
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # all-gathers of all pipeline stages dispatched together by the interleaved schedule
        # (param_sync_func); without virtual stages the forward pre-hooks dispatch them
        align_param_gather=p.overlap_param_gather and p.virtual_pipeline_model_parallel_size is not None,
        bucket_size=p.ddp_bucket_size,
        use_distributed_optimizer=p.use_distributed_optimizer,
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


def set_sync_funcs(config, model: list, parallel_cfg) -> None:
    """What megatron's schedules call to pause and start gradient / parameter communication
    (as Megatron-LM's training sets them): no_sync over all micro-batches but the last; with
    overlap, grad reduction started per chunk when its last backward ends (later pipeline
    stages reduce in the bubble), and with virtual stages all chunks' parameter all-gathers
    dispatched by the schedule (``align_param_gather``)."""
    def per_chunk(name):
        fns = [getattr(m, name) for m in model]
        return fns[0] if len(fns) == 1 else fns

    config.no_sync_func = per_chunk("no_sync")
    if parallel_cfg.overlap_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if model[0].ddp_config.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


@contextlib.contextmanager
def params_gathered(model: list):
    """Parameters complete on every rank for the duration (evaluation, checkpoints).

    With ``overlap_param_gather`` the distributed optimizer's step leaves the all-gather of the
    updated shards to the next forward's pre-hooks, so between steps each rank's parameters
    are fresh only in its own shard. Megatron-LM's disable/enable_forward_pre_hook: gather
    synchronously, run without hooks, hook again."""
    hooked = [m for m in model if m.use_forward_hook and m.remove_forward_pre_hook_handles]
    for m in hooked:
        m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for m in hooked:
            m.enable_forward_pre_hook()


def build_optimizer(model_chunks, train_cfg, parallel_cfg):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_kd.fused_kernels import check_megatron_adam

    check_megatron_adam()  # megatron picks apex's FusedAdam by import success alone

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
