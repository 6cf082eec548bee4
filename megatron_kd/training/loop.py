"""The training loop: megatron-core's forward/backward schedule, DDP, optimizer, checkpoints.

``train(cfg)`` is the whole run: set up (all input checked before compute), optionally resume,
step, evaluate, checkpoint, log. What differs between CE, KD and LongReD (model chunks, objective,
trainer subclass, extra input checks) comes from the train spec the config selects
(training/registry.py); the schedule, reductions, checkpoints and logging are shared by every spec.
This module imports nothing from kd/ or longred/: they register their specs
(megatron_kd/train_specs.py), and ``megatron_kd.run.train`` is the entry point that does so.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_kd import distributed, fused_kernels, platform, watchdog
from megatron_kd.config import ConfigError, RunConfig, validate_layout, validate_training
from megatron_kd.data.cp_layout import cp_capacity, layout_batches
from megatron_kd.training import checkpointing
from megatron_kd.training.metrics import MetricsLogger
from megatron_kd.training.nonfinite import DIVERGED_MARKER, LossSpikeMonitor, NonFiniteError, StepCheck
from megatron_kd.training.optimizer import (build_optimizer, build_scheduler, params_gathered,
                                             set_sync_funcs, wrap_ddp)
from megatron_kd.training.preemption import StopOnSignal
from megatron_kd.training.registry import TrainSpec, get_train_spec
from megatron_kd.training.run_dir import create_run_dir, prepare_run_dir


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    history: list = field(default_factory=list)  # (iteration, train loss) on the logging rank
    valid_history: list = field(default_factory=list)  # (iteration, {name: held-out loss})
    stopped_by: Optional[str] = None  # the signal that ended the run early (preemption.py)


def build_student_chunks(cfg: RunConfig, vocab_size: int) -> list:
    """The student's pipeline chunks this rank holds (several with virtual pipeline stages): the
    model of a CE run; the KD and LongReD specs wrap each with the teacher chunk of its stage."""
    from megatron_kd.models import build_model

    vp = cfg.parallel.virtual_pipeline_model_parallel_size
    return [build_model(cfg.model, cfg.parallel, vocab_size, cfg.data.seq_length,
                        bf16=cfg.train.bf16, vp_stage=stage if vp else None)
            for stage in range(vp or 1)]


def _num_microbatches(cfg: RunConfig) -> int:
    from megatron.core import parallel_state as ps

    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * ps.get_data_parallel_world_size())


def _is_logging_rank() -> bool:
    # Megatron's print_rank_last: the last rank holds the last pipeline stage.
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def reduce_losses(losses: list) -> Optional[dict]:
    """Per-micro-batch {name: [sum, count]} reports -> {name: global mean over loss tokens}.

    None off the last pipeline stage (only it computes losses).
    """
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not losses:
        return None
    names = list(losses[0])
    total = torch.zeros(len(names), 2, dtype=torch.float64)
    for report in losses:
        for i, name in enumerate(names):
            total[i] += report[name].to(torch.float64).cpu()
    total = total.to(platform.device())
    # CP ranks hold disjoint tokens of the same windows: their sums and counts add up too.
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return {name: (total[i, 0] / total[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


class Trainer:
    """The shared loop; ``spec`` (default: the registered one the config selects) supplies the
    model chunks, the objective (unless ``objective_factory`` overrides it) and extra checks."""

    def __init__(self, cfg: RunConfig, run_dir: Path, objective_factory: Optional[Callable] = None,
                 spec: Optional[TrainSpec] = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.spec = spec or get_train_spec(cfg)
        self.objective_factory = objective_factory or self.spec.build_objective
        self.stop = StopOnSignal()  # train() swaps in one with signals (preemption.py)

    # ----------------------------------------------------------------- setup
    def setup(self, resume: bool, overwrite: bool):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads

        from megatron_kd.data import DataError, check_data, load_tokenizer

        cfg = self.cfg
        # Every input is checked before anything is written or computed.
        validate_layout(cfg, torch.distributed.get_world_size())
        validate_training(cfg)
        if not cfg.data.tokenizer_model:
            raise ConfigError("data.tokenizer_model: required (a sentencepiece .model or HF tokenizer.json)")
        try:
            self.tokenizer = load_tokenizer(cfg.data.tokenizer_model)
        except DataError as e:  # the message names the file; say which key named it
            raise DataError(f"data.tokenizer_model: {e}") from None
        check_data(cfg.data, self.tokenizer)
        if self.spec.check_config is not None:  # e.g. the teacher's (kd/teacher.py)
            self.spec.check_config(cfg, self.tokenizer.vocab_size)
        if cfg.checkpoint.load:  # damaged: one line now, not a traceback after the model is built
            checkpointing.resolve_load_dir(cfg.checkpoint.load, checksums=cfg.checkpoint.verify)
        prepare_run_dir(self.run_dir, cfg, resume=resume, overwrite=overwrite)
        # the newest *complete* checkpoint; damaged newer ones warned about and left in place
        resume_from = checkpointing.select_resume(
            self.run_dir / "checkpoints", checksums=cfg.checkpoint.verify,
            strict=cfg.checkpoint.load_strict) if resume else None

        distributed.init_model_parallel(cfg.parallel, cfg.train.seed)
        self.device = platform.device()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.num_microbatches = _num_microbatches(cfg)

        # Building reads the teacher checkpoint (and checks its shapes): still before any write.
        chunks = self.build_model_chunks(self.tokenizer.vocab_size)
        if cfg.checkpoint.load and resume_from is None:  # another model's checkpoint: one line, now
            checkpointing.check_model_shapes(cfg.checkpoint.load, chunks, "checkpoint.load")
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            create_run_dir(self.run_dir, cfg, overwrite=overwrite and not resume)
        torch.distributed.barrier()
        config = chunks[0].config
        # Before wrap_ddp: DDP picks its gradient scaling at construction (1/DP unless per-token
        # loss, where finalize_model_grads divides by the global token count instead).
        for chunk in chunks:
            chunk.config.calculate_per_token_loss = True
        self.model = wrap_ddp(chunks, cfg.parallel)
        named = [(n, q) for c in chunks for n, q in c.named_parameters()]

        def count(trainable: bool) -> str:  # routed experts by name (not shared_experts)
            ps_ = [(n, q) for n, q in named if q.requires_grad == trainable]
            experts = sum(q.numel() for n, q in ps_ if ".experts." in n)
            return f"{sum(q.numel() for _, q in ps_):,} parameters ({experts:,} in MoE experts)"
        p = cfg.parallel
        self._print(f"layout: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x CP "
                    f"{p.context_parallel_size} x DP {self.dp_size} (EP {p.expert_model_parallel_size}); "
                    f"rank 0 trains {count(True)}; frozen teacher {count(False)}")
        buckets = sum(len(b.buckets) for m in self.model for b in m.buffers + m.expert_parallel_buffers)
        overlap = [name for name, on in (("grad reduce", p.overlap_grad_reduce),
                                         ("param gather", p.overlap_param_gather)) if on]
        self._print(f"DDP: {buckets} gradient buckets; overlapped: {', '.join(overlap) or 'none'}")
        self._print(fused_kernels.startup_line(cfg.model.normalization))
        config.finalize_model_grads_func = finalize_model_grads
        config.batch_p2p_comm = platform.batch_p2p_comm()
        set_sync_funcs(config, self.model, cfg.parallel)
        self.optimizer = build_optimizer(self.model, cfg.train, cfg.parallel)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        # the optimizer step with the per-step agreement (stop signal, non-finite loss/grad norm)
        self.step_check = StepCheck(self.stop, cfg.train.check_for_nan_in_loss_and_grad)
        self.objective = self.objective_factory(cfg, self.device)

        self.state = TrainState()
        if resume_from is not None:
            info = checkpointing.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
            self.state.iteration = info["iteration"]
            self.state.consumed_samples = info["consumed_samples"]
            self._print(f"resumed from {info['path']} at iteration {self.state.iteration}"
                        f"{'' if info['rng_restored'] else ' (new layout: RNG not restored)'}")
        elif cfg.checkpoint.load:
            finetune = cfg.checkpoint.finetune
            info = checkpointing.load_checkpoint(
                cfg.checkpoint.load, self.model,
                None if finetune else self.optimizer, None if finetune else self.scheduler,
                load_rng=not finetune)
            if not finetune:
                self.state.iteration = info["iteration"]
                self.state.consumed_samples = info["consumed_samples"]
            self._print(f"loaded {'weights' if finetune else 'checkpoint'} from {info['path']}")

        # after any load: the frozen rows keep the loaded (phase-1) values (models/rotary_freeze.py)
        self.rotary_freeze = None
        if cfg.train.freeze_rotary_frequencies:
            from megatron_kd.config import parse_frequency_spans
            from megatron_kd.models.rotary_freeze import RotaryFreeze

            self.rotary_freeze = RotaryFreeze(self.model, cfg.model,
                                              parse_frequency_spans(cfg.train.freeze_rotary_frequencies),
                                              tp=cfg.parallel.tensor_model_parallel_size)

        self.train_ds, self.valid_ds = self.build_datasets()
        self.metrics = MetricsLogger(self.run_dir, enabled=_is_logging_rank())
        return self

    def build_datasets(self):
        """Hook: the (train, valid) packed datasets (kd_cache: the cache's windows, with its rows)."""
        from megatron_kd.data import build_packed_datasets

        cfg = self.cfg
        total = cfg.train.train_iters * cfg.train.global_batch_size
        eval_windows = cfg.train.eval_iters * cfg.train.global_batch_size
        train_ds, valid_ds, _ = build_packed_datasets(
            cfg.data, self.tokenizer, cache_dir=str(self.run_dir / "data_cache"),
            num_samples=(total, eval_windows if cfg.train.eval_iters else None, None))
        return train_ds, valid_ds

    def build_model_chunks(self, vocab_size: int) -> list:
        """The spec's chunks (student + teacher wrappers for KD and LongReD), else the student's."""
        return (self.spec.build_model_chunks or build_student_chunks)(self.cfg, vocab_size)

    def train_iterator(self):
        """Hook: the training micro-batch stream, resumed at the current state."""
        return self._iterators(self.train_ds, self.state.consumed_samples)

    def _print(self, msg: str, file=None):
        if torch.distributed.get_rank() == 0:
            print(msg, file=file, flush=True)

    def _iterators(self, dataset, consumed: int):
        from megatron_kd.data import build_data_iterator

        n = len(self.model)
        # Every pipeline stage and virtual chunk reads the same windows in the same order: the
        # middle stages need positions and document ids for RoPE and the attention mask.
        its = [build_data_iterator(dataset, consumed, self.cfg.train.micro_batch_size,
                                   self.dp_rank, self.dp_size) for _ in range(n)]
        # CP shards and/or TE THD metadata (data/cp_layout.py); unchanged on the CPU at CP = 1
        its = [layout_batches(i, self.cfg) for i in its]
        return its if n > 1 else its[0]

    def _forward_backward(self, data_iterator, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=self.objective.forward_step,
            data_iterator=data_iterator,
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_microbatches,
            # the CP layout's window length (megatron divides it by CP for the p2p shapes)
            seq_length=cp_capacity(self.cfg),
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    # ----------------------------------------------------------------- steps
    def train_step(self, data_iterator):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(data_iterator, forward_only=False)
        if self.rotary_freeze is not None:
            self.rotary_freeze.mask_grads()
        # collective: decides (all ranks alike) between the grad norm and the update
        update_ok, grad_norm = self.step_check.step(self.optimizer, losses)
        if self.rotary_freeze is not None:
            self.rotary_freeze.restore()
        if update_ok:
            self.scheduler.step(increment=self.cfg.train.global_batch_size)
        return reduce_losses(losses), grad_norm, update_ok

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Held-out loss over the same first eval_iters global batches of the valid split."""
        if self.valid_ds is None or not self.cfg.train.eval_iters:
            return None
        for chunk in self.model:
            chunk.eval()
        it = self._iterators(self.valid_ds, 0)
        losses = []
        with params_gathered(self.model):
            for _ in range(self.cfg.train.eval_iters):
                losses += self._forward_backward(it, forward_only=True)
        for chunk in self.model:
            chunk.train()
        return reduce_losses(losses)

    def save(self):
        with params_gathered(self.model):
            checkpointing.save_checkpoint(self.run_dir / "checkpoints", self.state.iteration, self.model,
                                          self.optimizer, self.scheduler, self.state.consumed_samples,
                                          checksums=self.cfg.checkpoint.verify,
                                          keep_last=self.cfg.checkpoint.keep_last)
        self._print(f"saved checkpoint at iteration {self.state.iteration}")

    def train(self) -> TrainState:
        cfg, st = self.cfg, self.state
        it = self.train_iterator()
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
        save_interval = cfg.checkpoint.save_interval
        last_saved = st.iteration if st.iteration else None
        skipped = 0  # steps not applied since the last logged one (Megatron-LM's count)
        refused = 0  # non-finite steps in this run segment (nonfinite.py)
        spikes = LossSpikeMonitor(cfg.train.loss_spike_factor) if cfg.train.loss_spike_factor else None
        while st.iteration < cfg.train.train_iters:
            t0 = time.perf_counter()
            reports, grad_norm, update_ok = self.train_step(it)
            verdict = self.step_check.verdict  # what every rank agreed on in this step
            platform.synchronize()
            dt = time.perf_counter() - t0
            st.iteration += 1
            watchdog.progress(st.iteration)  # published with the rank's heartbeat
            st.consumed_samples += cfg.train.global_batch_size
            skipped += int(not update_ok)
            diverged = None
            if verdict.nonfinite:
                refused += 1
                what = f"non-finite {self.step_check.describe()}"  # collective
                if refused > cfg.train.skip_nonfinite_steps:
                    diverged = (f"training diverged at iteration {st.iteration}: {what}; update not "
                                f"applied, nothing saved (latest checkpoint: "
                                f"{last_saved if last_saved is not None else 'none'}); lower train.lr "
                                f"or allow train.skip_nonfinite_steps")
                else:
                    self._print(f"skipped iteration {st.iteration}: {what}; update not applied ({refused} "
                                f"of train.skip_nonfinite_steps={cfg.train.skip_nonfinite_steps})",
                                file=sys.stderr)
            if reports is not None:
                st.history.append((st.iteration, reports[self.objective.name]))
            if reports is not None and (st.iteration % cfg.train.log_interval == 0 or diverged):
                self.metrics.log(st.iteration, {
                    **reports,
                    "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    "tokens_per_s": tokens_per_step / dt,
                    "skipped": skipped,
                })
                skipped = 0
                spike = spikes.observe(st.iteration, reports[self.objective.name]) if spikes else None
                if spike and self.metrics.enabled:
                    print(spike, file=sys.stderr, flush=True)
            if diverged:
                self._diverged(diverged)
            if cfg.train.eval_interval and st.iteration % cfg.train.eval_interval == 0:
                val = self.evaluate()
                if val is not None:
                    st.valid_history.append((st.iteration, val))
                    ppl = {"lm ppl": math.exp(min(val["lm loss"], 50))} if "lm loss" in val else {}
                    self.metrics.log(st.iteration, {**val, **ppl}, prefix="valid")
            # not at a refused step: every checkpoint follows an applied, finite update
            if save_interval and st.iteration % save_interval == 0 and not verdict.nonfinite:
                self.save()
                last_saved = st.iteration
            if verdict.stop:  # agreed in the step (StepCheck); checkpoint below
                st.stopped_by = self.stop.describe()
                self._print(f"{st.stopped_by} received: stopping after iteration {st.iteration}")
                break
            if cfg.train.exit_interval and st.iteration % cfg.train.exit_interval == 0:
                break
        if last_saved != st.iteration:
            self.save()
        self.metrics.close()
        # Logs flushed everywhere before the first rank exits (launchers end the remaining ranks
        # soon after the first one exits, e.g. with 75 after a signal).
        torch.distributed.barrier()
        return st

    def _diverged(self, message: str):
        """End the run on every rank without saving: logs flushed, ``logs/diverged.txt`` for
        launchers that hide exit codes (slurm/common.sh), then NonFiniteError (exit 65, cli.py)."""
        self.metrics.close()
        rank = torch.distributed.get_rank()
        if rank == 0:
            (self.run_dir / "logs" / DIVERGED_MARKER).write_text(message + "\n")
        torch.distributed.barrier()
        raise NonFiniteError(message, self.state.iteration, rank)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          objective_factory: Optional[Callable] = None, exit_signals=(),
          spec: Optional[str] = None) -> TrainState:
    """The whole run with the registered spec the config selects (or the one named ``spec``);
    launchers call ``megatron_kd.run.train``, which registers every spec first. Call under a
    ``__main__`` guard: the checkpoint writer may start a spawn-based process manager.

    ``objective_factory(cfg, device)`` replaces the spec's objective (the demo's passkey
    teacher). ``exit_signals`` (e.g. ``("SIGUSR1", "SIGTERM")``): on any of them, checkpoint
    after the current step and return with ``stopped_by`` set (preemption.py).
    """
    if not cfg.checkpoint.save:
        raise ConfigError("checkpoint.save: required (the run directory)")
    train_spec = get_train_spec(cfg, spec)  # before init: an unregistered spec fails in 0.1 s
    trainer_cls = train_spec.trainer_cls or Trainer
    with StopOnSignal(exit_signals) as stop:  # before init: a signal during setup is kept too
        distributed.init_distributed(cfg.parallel.distributed_timeout_minutes)
        try:
            trainer = trainer_cls(cfg, Path(cfg.checkpoint.save), objective_factory, spec=train_spec)
            trainer.stop = stop
            return trainer.setup(resume, overwrite).train()
        finally:
            distributed.destroy()
