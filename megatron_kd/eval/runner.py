"""``megatron-kd eval``: checks the request, builds every prompt, then loads the checkpoint and runs.

Order matters for bad input: task names, lengths against the model's position limit, the
tokenizer against the checkpoint's vocabulary, and every prompt (a length too short for a task)
are checked before torch.distributed starts or a weight is read, so each fails in one line
(``ConfigError`` / ``CheckpointError``) with nothing written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from megatron_kd.config import ConfigError

NIAH_TASKS = {"niah": "number", "niah_passkey": "passkey"}
PERPLEXITY = "perplexity"
NIAH_NEW_TOKENS = 8  # a 7-digit value or one colour word, plus the period


def valid_tasks() -> List[str]:
    from megatron_kd.eval import ruler

    return list(NIAH_TASKS) + ["ruler"] + [f"ruler:{t}" for t in ruler.task_names()] + [PERPLEXITY]


def parse_tasks(spec: str) -> List[str]:
    """"niah,ruler:vt,ruler" -> task names ("ruler" = all 13 RULER tasks), in order, no repeats."""
    from megatron_kd.eval import ruler

    valid = valid_tasks()
    out: List[str] = []
    for name in [t.strip() for t in spec.split(",") if t.strip()]:
        if name not in valid:
            raise ConfigError(f"--tasks: unknown task {name!r}; expected a comma-separated list of "
                              f"{', '.join(valid)}")
        for t in ([f"ruler:{r}" for r in ruler.task_names()] if name == "ruler" else [name]):
            if t not in out:
                out.append(t)
    if not out:
        raise ConfigError(f"--tasks: empty; expected some of {', '.join(valid)}")
    return out


def parse_lengths(spec: str) -> List[int]:
    """"4k,8k,512" -> [4096, 8192, 512] (k = 1024), sorted."""
    out = []
    for item in [x.strip().lower() for x in spec.split(",") if x.strip()]:
        try:
            n = int(float(item[:-1]) * 1024) if item.endswith("k") else int(item)
        except ValueError:
            raise ConfigError(f"--lengths: {item!r} is not a token count (e.g. 4k,8k,512)") from None
        if n <= 0:
            raise ConfigError(f"--lengths: {item!r} must be positive")
        out.append(n)
    if not out:
        raise ConfigError("--lengths: empty; expected token counts such as 4k,8k")
    return sorted(set(out))


@dataclass
class EvalRequest:
    checkpoint: Path
    tasks: List[str]
    lengths: List[int]
    samples: int = 4
    tp: int = 1
    pp: int = 1
    batch_size: int = 4
    max_new_tokens: Optional[int] = None  # None: RULER's per task, NIAH_NEW_TOKENS for niah
    depths: int = 5
    spacing: str = "linear"
    out_dir: Optional[Path] = None  # default <checkpoint>/eval
    tokenizer: Optional[str] = None  # default: the run config's data.tokenizer_model
    allow_longer: bool = False  # RoPE only: evaluate beyond the trained seq_length on purpose
    train_doc_tokens: Optional[int] = None  # longest training document, for the distance plot
    perplexity_windows: int = 4
    seed: int = 42
    progress: bool = True


@dataclass
class Prepared:
    cfg: object
    tokenizer: object
    samples: list
    limit: int
    ckpt_dir: Path
    out_dir: Path
    tasks: List[str] = field(default_factory=list)


def checkpoint_vocab_rows(ckpt_dir: Path) -> Optional[int]:
    """Rows of the word-embedding table in a dist checkpoint (V padded), from its metadata only."""
    from megatron.core import dist_checkpointing

    from megatron_kd import platform

    platform.setup()
    for key, t in dist_checkpointing.load_tensors_metadata(str(ckpt_dir)).items():
        if key.endswith("word_embeddings.weight"):
            return int(t.global_shape[0])
    return None


def prepare(req: EvalRequest) -> Prepared:
    from megatron_kd.config import load_config
    from megatron_kd.data import load_tokenizer
    from megatron_kd.eval import ruler
    from megatron_kd.eval.niah import NiahBuilder, depth_percents
    from megatron_kd.models.builder import padded_vocab_size
    from megatron_kd.training.checkpointing import resolve_load_dir

    run = Path(req.checkpoint)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"--checkpoint {run}: no config.yaml (expected a training run directory)")
    cfg = load_config(str(cfg_path))
    ckpt_dir = resolve_load_dir(run)
    if req.tp < 1:
        raise ConfigError(f"--tp {req.tp}: expected >= 1")
    if req.pp < 1 or cfg.model.num_layers % req.pp:
        raise ConfigError(f"--pp {req.pp}: expected a divisor of the model's {cfg.model.num_layers} "
                          f"layers (model.num_layers of {cfg_path})")
    if req.samples < 1:
        raise ConfigError(f"--samples {req.samples}: expected >= 1")
    tok_path = req.tokenizer or cfg.data.tokenizer_model
    if not tok_path:
        raise ConfigError(f"--checkpoint {run}: config.yaml has no data.tokenizer_model; pass --tokenizer")
    tok = load_tokenizer(tok_path)
    if req.tokenizer and cfg.data.tokenizer_model and Path(cfg.data.tokenizer_model).exists():
        trained = load_tokenizer(cfg.data.tokenizer_model)
        if trained.vocab_size != tok.vocab_size:  # padding may hide this from the row check below
            raise ConfigError(f"--tokenizer {tok_path}: vocab size {tok.vocab_size}, but the run was "
                              f"trained with {cfg.data.tokenizer_model} (vocab size {trained.vocab_size})")

    rows = checkpoint_vocab_rows(ckpt_dir)
    mult = cfg.model.make_vocab_size_divisible_by
    expect = padded_vocab_size(tok.vocab_size, mult, cfg.parallel.tensor_model_parallel_size)
    if rows is not None and rows != expect:
        raise ConfigError(
            f"tokenizer {tok_path}: vocab size {tok.vocab_size} (padded {expect}) does not match the "
            f"checkpoint {ckpt_dir}, whose embedding has {rows} rows")
    if cfg.parallel.tensor_model_parallel_size != req.tp and \
            padded_vocab_size(tok.vocab_size, mult, req.tp) != rows:
        raise ConfigError(f"--tp {req.tp}: the checkpoint's padded vocabulary ({rows} rows) is not "
                          f"divisible into {req.tp} shards of make_vocab_size_divisible_by={mult}")

    limit = cfg.model.max_position_embeddings or cfg.data.seq_length
    longest = max(req.lengths)
    if longest > limit:
        rope = cfg.model.position_embedding_type == "rope"
        if not (req.allow_longer and rope):
            hint = " (RoPE model: pass --allow-longer to evaluate beyond it on purpose)" if rope else ""
            raise ConfigError(f"--lengths {longest}: longer than the model's position limit {limit} "
                              f"(model.max_position_embeddings or data.seq_length of {cfg_path}){hint}")
        limit = longest

    samples = []
    niah_depths = depth_percents(req.depths, req.spacing)
    for task in req.tasks:
        if task in NIAH_TASKS:
            builder = NiahBuilder(tok, NIAH_TASKS[task], req.max_new_tokens or NIAH_NEW_TOKENS, req.seed)
            samples += builder.grid(req.lengths, niah_depths, req.samples)
        elif task.startswith("ruler:"):
            for L in req.lengths:
                samples += ruler.generate(task.split(":", 1)[1], tok, L, req.samples, req.seed,
                                          req.max_new_tokens)
    out_dir = Path(req.out_dir) if req.out_dir else run / "eval"
    return Prepared(cfg, tok, samples, limit, ckpt_dir, out_dir, list(req.tasks))


def load_model(prep: Prepared, tp: int, pp: int = 1):
    """Build this rank's part of the model at TP=``tp`` x PP=``pp`` (this process group) and load
    the checkpoint's weights (megatron dist_checkpointing reshards from whatever layout it was
    saved in)."""
    from megatron_kd import distributed
    from megatron_kd.config import ParallelConfig
    from megatron_kd.models import build_model
    from megatron_kd.training import checkpointing

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    distributed.init_model_parallel(parallel, prep.cfg.train.seed)
    model = build_model(prep.cfg.model, parallel, prep.tokenizer.vocab_size, prep.limit)
    checkpointing.load_model_weights(prep.ckpt_dir, [model])
    return model.eval()


def score_samples(model, prep: Prepared, batch_size: int, progress: bool) -> List[dict]:
    """Generate for every sample (grouped by task and length), score with RULER's metric."""
    from megatron_kd.eval.distance import needle_distance
    from megatron_kd.eval.generate import greedy_generate
    from megatron_kd.eval.scoring import METRICS, postprocess_pred

    tok = prep.tokenizer
    groups: Dict[tuple, list] = {}
    for s in prep.samples:
        groups.setdefault((s.task, s.length, s.tokens_to_generate), []).append(s)
    bar = _progress(len(prep.samples), progress)
    records = []
    for (task, length, ttg), group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            prompts = [tok.encode(s.input) for s in chunk]
            # NIAH answers are one line: stop at a newline; RULER generates its full budget
            stop = (lambda ids: "\n" in tok.decode(ids)) if task in NIAH_TASKS else None
            outs = greedy_generate(model, prompts, ttg, tok.vocab_size, eos_id=tok.eos_id, stop_text=stop,
                                   use_cache=True, batch_size=batch_size, max_length=prep.limit)
            for s, p, o in zip(chunk, prompts, outs):
                pred = postprocess_pred(tok.decode(o.ids))
                records.append({"task": s.task, "length": s.length, "index": s.index, "depth": s.depth,
                                "prompt_tokens": len(p), "distance": needle_distance(tok, s),
                                "outputs": s.outputs, "pred": pred, "stop": o.stop, "metric": s.metric,
                                "score": METRICS[s.metric](pred, s.outputs) * 100, "meta": s.meta})
            bar.update(len(chunk))
    bar.close()
    return records


def _progress(total: int, enabled: bool):
    try:
        import torch.distributed as dist
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
    except Exception:
        rank0 = True
    from tqdm import tqdm

    return tqdm(total=total, desc="eval samples", unit="sample", disable=not (enabled and rank0))


def run_eval(req: EvalRequest, prep: Optional[Prepared] = None, model=None) -> dict:
    """The whole evaluation; writes ``out_dir`` on rank 0 and returns the summary. ``model``: an
    already-built model (the demo reuses its process); otherwise distributed is started here."""
    import torch

    from megatron_kd import distributed
    from megatron_kd.eval import perplexity, report

    prep = prep or prepare(req)
    t0 = time.time()
    own = model is None
    if own:
        info = distributed.init_distributed()
        if info.world_size != req.tp * req.pp:
            raise ConfigError(f"--tp {req.tp} x --pp {req.pp} = {req.tp * req.pp}: launched with "
                              f"{info.world_size} ranks; eval runs one model replica, so launch "
                              "exactly TP x PP ranks (torchrun --nproc-per-node)")
    try:
        if own:
            model = load_model(prep, req.tp, req.pp)
        records = score_samples(model, prep, req.batch_size, req.progress)
        ppl = None
        if PERPLEXITY in prep.tasks:
            wins = perplexity.windows(prep.tokenizer, max(req.lengths), req.perplexity_windows)
            losses = perplexity.loss_by_position(model, wins, batch_size=req.batch_size)
            ppl = {"length": max(req.lengths), "windows": len(wins), "per_position": losses,
                   "buckets": perplexity.bucketed(losses)}
        summary = None
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            summary = report.write(prep.out_dir, req, prep, records, ppl, time.time() - t0)
    finally:
        if own:
            distributed.destroy()
    return summary
