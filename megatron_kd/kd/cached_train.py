"""The "kd_cache" train spec: distil from a teacher cache (kd.teacher_source=cache) instead of a
live teacher. No teacher is built; the model chunks are the plain student's.

* Input checks (before anything is written): the cache's manifest against the run -- tokenizer
  (sha256), data (.idx sha256, split, seed), window (data.seq_length), teacher positions mode, and,
  when the run still has a ``teacher`` section, the teacher's shape (teacher.rotary_base first);
  kd.top_k <= the cache's k; the tail-bin loss at the cache's temperature. Each error names the
  field and both values.
* Data: the run's packed datasets are built with the sample counts the cache was built with, so
  GPTDataset's seeded indices give the same windows in the same order, and each window i carries
  cache row block i (``teacher_ids`` / ``teacher_logp`` / ``teacher_tail``), its token hash checked
  on every read. The stream stays a pure function of consumed_samples: resume is bit-for-bit.
* Objective: the student's logits (last stage) -> kd/cached_loss.py + megatron's vocab-parallel CE.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from megatron_kd.config import ConfigError, RunConfig
from megatron_kd.kd.cache_format import TeacherCache, TeacherCacheError, window_hash
from megatron_kd.training.loop import Trainer
from megatron_kd.training.registry import TrainSpec, register_train_spec


def run_positions_mode(cfg: RunConfig) -> str:
    """The positions the live teacher would see in this run."""
    reset = cfg.data.reset_position_ids or (cfg.teacher is not None and cfg.teacher.reset_position_ids)
    return "reset" if reset else "global"


def check_cache_for_run(cfg: RunConfig, vocab_size: int) -> TeacherCache:
    """The manifest against the run; TeacherCacheError / ConfigError naming the field and both values."""
    from megatron_kd.data import check_data
    from megatron_kd.kd.cache_format import file_sha256
    from megatron_kd.kd.cache_teacher import first_difference, model_config_dict, tokenizer_sha256

    kd, where = cfg.kd, f"kd.teacher_cache {cfg.kd.teacher_cache}"
    cache = TeacherCache(kd.teacher_cache)
    man = cache.manifest

    def differ(field, run_value, cache_value, what=""):
        raise TeacherCacheError(f"{where}: {field}={run_value!r} in this run but {cache_value!r} in the "
                                f"cache{what}; rebuild the cache with megatron-kd cache-teacher for this run")

    tok = man["tokenizer"]
    run_sha = tokenizer_sha256(cfg.data.tokenizer_model)
    if run_sha != tok["sha256"]:
        differ("data.tokenizer_model", f"{cfg.data.tokenizer_model} (sha256 {run_sha[:12]})",
               f"{tok['path']} (sha256 {tok['sha256'][:12]})", " (another tokenizer)")
    prefix, _, _ = check_data(cfg.data)
    data = man["data"]
    idx_sha = file_sha256(prefix + ".idx")
    if idx_sha != data["idx_sha256"]:
        differ("data.data_path", f"{prefix} (.idx sha256 {idx_sha[:12]})",
               f"{data['prefix']} (.idx sha256 {data['idx_sha256'][:12]})", " (other documents)")
    if cfg.data.seq_length != data["seq_length"]:
        differ("data.seq_length", cfg.data.seq_length, data["seq_length"], " (the window size)")
    mode = run_positions_mode(cfg)
    if mode != data["positions"]:
        differ("positions mode (data.reset_position_ids / teacher.reset_position_ids)", mode, data["positions"])
    for key in ("split", "seed"):
        if getattr(cfg.data, key) != data[key]:
            differ(f"data.{key}", getattr(cfg.data, key), data[key], " (the sample order)")
    if cfg.teacher is not None:  # the run still describes its teacher: it must be the cached one
        shape = man["teacher"]["config"]
        if cfg.teacher.rotary_base != shape["rotary_base"]:
            differ("teacher.rotary_base", cfg.teacher.rotary_base, shape["rotary_base"], " (theta)")
        # how the teacher would run, not what it computes: not compared
        runtime = {k for k in shape if k.startswith("recompute_")} | {"moe_token_dispatcher_type"}
        diff = first_difference({k: v for k, v in model_config_dict(cfg.teacher).items() if k not in runtime},
                                {k: v for k, v in shape.items() if k not in runtime})
        if diff:
            differ(f"teacher.{diff[0]}", diff[1], diff[2])
    if tok["vocab_size"] != vocab_size:
        differ("vocab size", vocab_size, tok["vocab_size"])
    if kd.top_k is not None and kd.top_k > cache.k:
        raise ConfigError(f"kd.top_k={kd.top_k} is larger than the cache's k={cache.k} ({where})")
    if kd.cache_loss == "tail" and not math.isclose(kd.temperature, man["temperature"]):
        raise ConfigError(f"kd.temperature={kd.temperature} but {where} holds log-probs at temperature "
                          f"{man['temperature']}: the tail bin needs the same one (or kd.cache_loss=renormalized)")
    if kd.loss_impl == "fused":
        raise ConfigError("kd.loss_impl=fused: not with kd.teacher_source=cache (the cached loss takes the "
                          "student's logits; use auto or exact)")
    if cfg.parallel.context_parallel_size > 1:
        raise ConfigError("kd.teacher_source=cache with parallel.context_parallel_size > 1: not supported "
                          "(the cache rows are per whole window)")
    if cfg.train.eval_iters and cfg.train.eval_interval:
        need = cfg.train.eval_iters * cfg.train.global_batch_size
        if cache.windows("valid") < need:
            raise ConfigError(f"train.eval_iters={cfg.train.eval_iters} x train.global_batch_size="
                              f"{cfg.train.global_batch_size} = {need} valid windows, {where} holds "
                              f"{cache.windows('valid')} (rebuild with --valid-samples {need}, or set "
                              "train.eval_iters=0)")
    return cache


class CachedTeacherDataset(torch.utils.data.Dataset):
    """A PackedDataset whose window i also carries cache rows of window i (token hash checked)."""

    def __init__(self, dataset, cache: TeacherCache, split: str):
        if len(dataset) < cache.windows(split):
            raise TeacherCacheError(
                f"kd.teacher_cache {cache.path}: the run's {split} split has {len(dataset)} windows, the "
                f"cache {cache.windows(split)} (built from other data)")
        self.dataset, self.cache, self.split = dataset, cache, split

    def __len__(self) -> int:  # the cached windows: past them the sampler starts the next epoch
        return self.cache.windows(self.split)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        ids, logp, tail, h = self.cache.window(self.split, int(i))
        if window_hash(item["tokens"].numpy()) != h:
            raise TeacherCacheError(f"kd.teacher_cache {self.cache.path}: window {i} of the {self.split} "
                                    "split holds other tokens than the cache's row (data or sample order "
                                    "changed since it was built)")
        return {**item, "teacher_ids": torch.from_numpy(ids.astype("int64")),
                "teacher_logp": torch.from_numpy(logp.copy()), "teacher_tail": torch.from_numpy(tail.copy())}


class CachedKDTrainer(Trainer):
    def build_datasets(self):
        from megatron_kd.data import build_packed_datasets

        cache = TeacherCache(self.cfg.kd.teacher_cache)
        want = cache.manifest["samples"]
        valid_n = want["valid"] if cache.has("valid") else None
        train, valid, _ = build_packed_datasets(
            self.cfg.data, self.tokenizer, cache_dir=str(self.run_dir / "data_cache"),
            num_samples=(want["train"], valid_n, None))
        return (CachedTeacherDataset(train, cache, "train"),
                CachedTeacherDataset(valid, cache, "valid") if valid is not None and cache.has("valid") else None)


class CachedDistillationObjective:
    """alpha * KD (from the cache) + (1 - alpha) * CE per loss-masked token."""

    name = "loss"

    def __init__(self, cfg: RunConfig, device, vocab_size: int, cache_temperature: float):
        from megatron.core import parallel_state as ps

        self.kd, self.device, self.vocab_size = cfg.kd, device, vocab_size
        self.cache_temperature = cache_temperature
        self.tp_group = ps.get_tensor_model_parallel_group()

    def forward_step(self, data_iterator, model):
        from megatron_kd.models.attention import attention_mask_for_batch
        from megatron_kd.training.objective import batch_to_device

        batch = batch_to_device(next(data_iterator), self.device)
        output = model(batch["tokens"], batch["position_ids"], attention_mask_for_batch(batch))
        return output, partial(self.loss_func, batch)

    def loss_func(self, batch, logits):
        from megatron.core import tensor_parallel

        from megatron_kd.kd.cached_loss import cached_kd_loss
        from megatron_kd.kd.losses import kd_objective_loss
        from megatron_kd.training.objective import masked_sum_and_count

        k = self.kd
        kd = cached_kd_loss(logits, batch["teacher_ids"], batch["teacher_logp"], batch["teacher_tail"],
                            tp_group=self.tp_group, vocab_size=self.vocab_size, temperature=k.temperature,
                            scale_by_t_squared=k.scale_by_t_squared, divergence=k.divergence, beta=k.beta,
                            top_k=k.top_k, loss=k.cache_loss, cache_temperature=self.cache_temperature)
        if k.alpha < 1.0:  # megatron's vocab-parallel CE: [s, b, v] in, [s, b] out
            ce = tensor_parallel.vocab_parallel_cross_entropy(
                logits.transpose(0, 1).float().contiguous(), batch["labels"].transpose(0, 1).contiguous()
            ).transpose(0, 1)
        else:
            ce = torch.zeros_like(kd)
        loss_mask = batch["loss_mask"]
        loss_sum, count = kd_objective_loss(kd, ce, loss_mask, k.alpha)
        kd_sum, _ = masked_sum_and_count(kd.detach(), loss_mask)
        ce_sum, _ = masked_sum_and_count(ce.detach(), loss_mask)
        n = count.float()
        return loss_sum, count, {"loss": torch.stack([loss_sum.detach(), n]),
                                 "kd loss": torch.stack([kd_sum, n]), "lm loss": torch.stack([ce_sum, n])}


def _objective(cfg: RunConfig, device):
    cache = TeacherCache(cfg.kd.teacher_cache)
    return CachedDistillationObjective(cfg, device, cache.manifest["tokenizer"]["vocab_size"],
                                       float(cache.manifest["temperature"]))


CACHE_SPEC = TrainSpec(name="kd_cache", build_objective=_objective, trainer_cls=CachedKDTrainer,
                       check_config=lambda cfg, vocab: check_cache_for_run(cfg, vocab) and None)


def register() -> None:
    register_train_spec(CACHE_SPEC)
