"""The training loop for LongReD: the shared Trainer with three streams and a teacher.

Only what differs is overridden: input checks (before anything is written), the stream datasets
and their schedule, the layer selection, and the step's reports (per stream, per layer, reduced
over every rank, since selected layers live on every pipeline stage). The model wrapper (student +
frozen original model per pipeline chunk) and the objective come with the spec
(longred/train_spec.py). Schedule, DDP, optimizer, checkpoints and logging are training/loop.py's.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch

from megatron_kd.config import LONGRED_STREAMS, ConfigError
from megatron_kd.longred.layer_select import format_kl_table, top_layers
from megatron_kd.longred.model import layer_report_name
from megatron_kd.longred.streams import PackedSamples, mixed_iterator, per_step_counts, step_schedule
from megatron_kd.data.cp_layout import cp_capacity, layout_batches
from megatron_kd.training.loop import Trainer


SELECTION_FILE = "longred_selection.json"  # in the run dir: the layers picked at the start


def stream_lengths(cfg) -> dict:
    lr = cfg.longred
    return {"long": cfg.data.seq_length, "short": lr.short_seq_length, "s2l": lr.s2l_seq_length}


def stream_data_config(cfg, stream: str):
    """The DataConfig a stream's samples are cut with (path, sample length; the rest shared)."""
    lr = cfg.longred
    path = {"long": cfg.data.data_path, "short": lr.short_data_path, "s2l": lr.s2l_data_path}[stream]
    return dataclasses.replace(cfg.data, data_path=path, seq_length=stream_lengths(cfg)[stream])


def check_longred_config(cfg, world_size: int) -> dict:
    """Every LongReD input check that needs no model; returns the per-step stream counts."""
    from megatron_kd.data import DataError, check_data
    from megatron_kd.training import checkpointing

    lr, m, T = cfg.longred, cfg.model, cfg.data.seq_length
    if cfg.kd.alpha > 0:
        raise ConfigError(f"kd.alpha={cfg.kd.alpha}: LongReD distils hidden states, not logits; "
                          "expected kd.alpha=0 with a longred section")
    if cfg.teacher is None or not cfg.teacher.load:
        raise ConfigError("longred: needs the original model as teacher: set teacher.load (the "
                          "checkpoint the student starts from) and its shape and rotary_base")
    checkpointing.resolve_load_dir(cfg.teacher.load)
    t = cfg.teacher
    if (t.num_layers, t.hidden_size) != (m.num_layers, m.hidden_size):
        raise ConfigError(f"longred: teacher (num_layers={t.num_layers}, hidden_size={t.hidden_size}) "
                          f"and student (model.num_layers={m.num_layers}, model.hidden_size="
                          f"{m.hidden_size}) must have the same layers to compare hidden states")
    if cfg.parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: not supported with longred yet (the hidden-"
                          "state cosine assumes replicated hidden states); expected false")
    target = lr.target_length or T
    if target <= lr.s2l_seq_length:
        raise ConfigError(f"longred.target_length={target} (default data.seq_length) must be larger "
                          f"than the original length longred.s2l_seq_length={lr.s2l_seq_length}")
    for layer in lr.selected_layers or []:
        if not 1 <= layer <= m.num_layers:
            raise ConfigError(f"longred.selected_layers: layer {layer} is out of range 1..{m.num_layers} "
                              f"(model.num_layers={m.num_layers})")
    if lr.selected_layers is None and lr.num_selected_layers > m.num_layers:
        raise ConfigError(f"longred.num_selected_layers={lr.num_selected_layers} exceeds "
                          f"model.num_layers={m.num_layers}")
    ratio = lr.stream_counts()
    p = cfg.parallel
    dp = world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
    microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
    if lr.schedule is not None:
        if len(lr.schedule) != microbatches:
            raise ConfigError(f"longred.schedule has {len(lr.schedule)} entries; expected one per "
                              f"micro-batch of a step: {microbatches}")
        counts = {s: lr.schedule.count(s) for s in LONGRED_STREAMS}
    else:
        counts = per_step_counts(ratio, microbatches)
    for stream in ("short", "s2l"):
        if not counts[stream] and not (stream == "short" and lr.selected_layers is None):
            continue
        key = f"longred.{stream}_data_path"
        if not getattr(lr, f"{stream}_data_path"):
            raise ConfigError(f"{key}: required (the {stream} stream has micro-batches in the schedule)")
        length = stream_lengths(cfg)[stream]
        if T % length:
            raise ConfigError(f"longred.{stream}_seq_length={length} must divide data.seq_length={T}: "
                              "each micro-batch packs whole samples into one window")
        try:
            check_data(stream_data_config(cfg, stream))
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
    head, tail = lr.s2l_head_length, lr.s2l_tail_length
    if head is not None and tail is not None and head + tail >= lr.s2l_seq_length:
        raise ConfigError(f"longred.s2l_head_length={head} + s2l_tail_length={tail} leave no middle "
                          f"in longred.s2l_seq_length={lr.s2l_seq_length}")
    return counts


def reduce_reports(chunks, names: list) -> dict:
    """Sum every chunk's {name: [sum, count]} over this rank's chunks and over all ranks.

    All ranks, because selected layers sit on every pipeline stage and data-parallel ranks see
    other data; tensor-parallel replicas add identical sums and counts (ratios unchanged), or, for
    the attention KL, their own heads' means (the ratio is then the mean over all heads).
    """
    from megatron_kd import platform

    total = torch.zeros(len(names), 2, dtype=torch.float64, device=platform.device())
    for chunk in chunks:
        for i, name in enumerate(names):
            if name in chunk.reports:
                total[i] += chunk.reports[name].to(total.device)
    torch.distributed.all_reduce(total)
    return {n: (total[i, 0] / total[i, 1]).item() for i, n in enumerate(names) if total[i, 1] > 0} | {
        "_sums": {n: (total[i, 0].item(), total[i, 1].item()) for i, n in enumerate(names)}}


class LongReDTrainer(Trainer):
    # ----------------------------------------------------------------- setup
    def setup(self, resume: bool, overwrite: bool):
        cfg = self.cfg
        self.step_counts = check_longred_config(cfg, torch.distributed.get_world_size())
        super().setup(resume, overwrite)
        lr = cfg.longred
        n = cfg.model.num_layers
        self.report_names = (["long lm loss", "short loss", "s2l loss"]
                             + [layer_report_name("short", i) for i in range(1, n + 1)]
                             + [layer_report_name("s2l", n)]
                             + [f"attention kl layer {i}" for i in range(1, n + 1)])
        self.schedule = lr.schedule or step_schedule(self.step_counts)
        self.stream_ds = {"long": self.train_ds}
        T = cfg.data.seq_length
        target = lr.target_length or T
        for stream in ("short", "s2l"):
            if not (self.step_counts[stream] or (stream == "short" and lr.selected_layers is None)):
                continue
            length = stream_lengths(cfg)[stream]
            per_window = T // length
            windows = max(self.step_counts[stream], 1) * cfg.train.global_batch_size // self.num_microbatches
            need = (cfg.train.train_iters * windows + lr.selection_windows * cfg.train.micro_batch_size
                    * self.dp_size) * per_window
            samples = self._stream_samples(stream, need)
            self.stream_ds[stream] = PackedSamples(
                samples, per_window, target=target if stream == "s2l" else None,
                placement=lr.middle_placement, seed=lr.seed, head=lr.s2l_head_length,
                tail=lr.s2l_tail_length)
        self._print(f"longred: per step {self.num_microbatches} micro-batches of {T} tokens: "
                    + ", ".join(f"{s} {self.step_counts[s]}" for s in LONGRED_STREAMS)
                    + f"; order {' '.join(self.schedule)}")
        saved = self.run_dir / SELECTION_FILE
        if lr.selected_layers is not None:
            layers = list(lr.selected_layers)
            self._print(f"longred: selected layers {layers} (config) + the final output (layer {n})")
        elif resume and saved.is_file():
            # the selection belongs to the run: re-measuring on the trained student would pick anew
            layers = json.loads(saved.read_text())["selected_layers"]
            self._print(f"longred: selected layers {layers} (from {saved}) + the final output (layer {n})")
        else:
            layers = self.select_layers()
            if torch.distributed.get_rank() == 0:
                saved.write_text(json.dumps({"selected_layers": layers, "attention_kl": self.attention_kl}))
        for chunk in self.model:
            chunk.module.set_selected_layers(layers)
        self.selected_layers = layers
        return self

    def _stream_samples(self, stream: str, need: int):
        from megatron_kd.data import build_packed_datasets

        train, _, _ = build_packed_datasets(
            stream_data_config(self.cfg, stream), self.tokenizer,
            cache_dir=str(self.run_dir / "data_cache" / stream), num_samples=(need, None, None))
        return train

    # ----------------------------------------------------------------- data
    def _stream_iterators(self, consumed_steps: int) -> list:
        from megatron_kd.data import build_data_iterator

        mbs = self.cfg.train.micro_batch_size
        its = []
        for _ in self.model:  # one identical stream per virtual chunk
            # a stream's position is a function of the step count (build_data_iterator wraps epochs)
            per = {s: build_data_iterator(self.stream_ds[s], consumed_steps * self.step_counts[s] * mbs
                                          * self.dp_size, mbs, self.dp_rank, self.dp_size)
                   for s in LONGRED_STREAMS if self.step_counts[s]}
            # every stream in the attention backend's layout: CP shards (teacher positions travel
            # with their tokens) and/or TE THD metadata, as the shared Trainer's iterators
            its.append(layout_batches(mixed_iterator(per, self.schedule), self.cfg))
        return its if len(its) > 1 else its[0]

    def train_iterator(self):
        return self._stream_iterators(self.state.iteration)

    # ----------------------------------------------------------------- layer selection
    @torch.no_grad()
    def select_layers(self) -> list:
        """Top-M layers by attention KL(original || extended) on short-stream windows."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_kd.data import build_data_iterator

        lr, n = self.cfg.longred, self.cfg.model.num_layers
        chunks = [c.module for c in self.model]
        for c in chunks:
            c.eval()
            c.measure_attention = True
            c.reports.clear()
        its = [layout_batches(mixed_iterator({"short": build_data_iterator(
                   self.stream_ds["short"], 0, self.cfg.train.micro_batch_size, self.dp_rank, self.dp_size)},
                   ["short"]), self.cfg) for _ in chunks]
        get_forward_backward_func()(
            forward_step_func=self.objective.forward_step, data_iterator=its if len(its) > 1 else its[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=lr.selection_windows, seq_length=cp_capacity(self.cfg),
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
        names = [f"attention kl layer {i}" for i in range(1, n + 1)]
        kl = reduce_reports(chunks, names)
        table = {i: kl[f"attention kl layer {i}"] for i in range(1, n + 1)}
        for c in chunks:
            c.measure_attention = False
            c.reports.clear()
            c.train()
        self.attention_kl = {str(k): v for k, v in table.items()}
        layers = top_layers(table, lr.num_selected_layers)
        self._print(format_kl_table(table, layers))
        self._print(f"longred: selected layers {layers} (top {lr.num_selected_layers} by attention KL) "
                    f"+ the final output (layer {n})")
        return layers

    # ----------------------------------------------------------------- steps
    def train_step(self, data_iterator):
        chunks = [c.module for c in self.model]
        for c in chunks:
            c.reports.clear()
        _, grad_norm, update_ok = super().train_step(data_iterator)
        reports = reduce_reports(chunks, self.report_names)
        sums = reports.pop("_sums")
        lr = self.cfg.longred
        weights = {"long lm loss": 1.0, "short loss": lr.alpha_short, "s2l loss": lr.alpha_s2l}
        microbatches = sum(sums[k][1] for k in weights)
        reports = {"loss": sum(w * sums[k][0] for k, w in weights.items()) / microbatches, **reports}
        for c in chunks:
            c.reports.clear()
        return reports, grad_norm, update_ok

    def evaluate(self) -> Optional[dict]:
        out = super().evaluate()
        for c in self.model:
            c.module.reports.clear()
        return out
