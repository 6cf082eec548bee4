"""Run configuration: typed sections, YAML recipes, dotted CLI overrides.

Keys follow Megatron-LM flag names (``--tensor-model-parallel-size`` ->
``parallel.tensor_model_parallel_size``) so a Megatron user can read a recipe without a
glossary. Each section validates itself in ``__post_init__``; checks that need several
sections or the world size live in :func:`validate_layout`. Every error names the key (or the
file) and what was expected, in one line, before any compute starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what was expected."""


@dataclass
class ModelConfig:
    """Decoder-only transformer shape (megatron-core GPTModel)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None = MHA
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / heads
    position_embedding_type: str = "rope"  # or learned_absolute (sees absolute position)
    max_position_embeddings: Optional[int] = None  # learned_absolute table size; None = seq_length
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    no_rope_freq: Optional[int] = None  # every N-th layer has no RoPE (Llama-4 iRoPE's NoPE layers)
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    add_bias_linear: bool = False
    # --- HF-family options (docs/interop.md); defaults leave the model above unchanged ---
    add_qkv_bias: bool = False  # Qwen2: bias on the Q/K/V projections only
    qk_layernorm: bool = False  # Qwen3: RMSNorm over each head's q and k (before RoPE)
    # Llama-3 RoPE frequency scaling (Megatron's --use-rope-scaling; HF rope_type "llama3")
    use_rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position_embeddings: int = 8192
    # Llama-4 iRoPE pieces (models/llama4.py); the NoPE layers are the no_rope_freq ones
    qk_l2_norm: bool = False  # parameter-free L2 norm of q and k, RoPE layers only
    attention_chunk_size: Optional[int] = None  # local attention in chunks of absolute positions, RoPE layers
    attn_temperature_tuning: bool = False  # NoPE layers: q *= log(floor((pos+1)/floor_scale)+1)*scale+1
    attn_temperature_floor_scale: float = 8192.0
    attn_temperature_scale: float = 0.1
    # Mixture of experts (megatron-core MoE; Llama-4: top-1 sigmoid routing + a shared expert)
    num_moe_experts: Optional[int] = None
    # every N-th layer is MoE (the others dense), or a per-layer 0/1 list (megatron-core's and
    # Megatron-LM's --moe-layer-freq accept both; a HF Llama-4 moe_layers pattern maps to the list)
    moe_layer_freq: Union[int, List[int]] = 1
    moe_ffn_hidden_size: Optional[int] = None  # routed expert FFN size; None = ffn_hidden_size
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_topk: int = 1
    moe_router_score_function: str = "sigmoid"  # softmax | sigmoid
    moe_apply_probs_on_input: bool = True  # Llama-4 scales the expert input by the router score
    moe_token_dispatcher_type: str = "allgather"  # allgather works on CPU/gloo; alltoall on GPUs
    # activation recompute (Megatron-LM's --recompute-*; megatron-core TransformerConfig):
    # granularity full|selective, method uniform|block (full only), layers per unit / per stage,
    # modules for selective as "core_attn,mlp,layernorm" (None = megatron's ["core_attn"])
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[str] = None
    # FP8 through transformer-engine (Megatron-LM's --fp8-format/--fp8-recipe/...): format
    # e4m3|hybrid (None = off), recipe delayed (amax history) | tensorwise (current scaling)
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0

    def __post_init__(self):
        n = _SECTION_NAMES.get(type(self).__name__, "model")  # model / teacher
        _check_hf_family_options(self, n)
        _positive(self, "num_layers", "hidden_size", "num_attention_heads", "rotary_base")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ConfigError(
                f"{n}.normalization: expected 'RMSNorm' or 'LayerNorm', got {self.normalization!r}"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{n}.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"{n}.num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{n}.hidden_size={self.hidden_size} is not divisible by "
                f"{n}.num_attention_heads={self.num_attention_heads} (set {n}.kv_channels)"
            )
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ConfigError(
                f"{n}.position_embedding_type: expected 'rope' or 'learned_absolute', got "
                f"{self.position_embedding_type!r}"
            )
        if self.no_rope_freq is not None and (self.no_rope_freq < 1 or self.num_layers % self.no_rope_freq):
            raise ConfigError(
                f"{n}.no_rope_freq={self.no_rope_freq}: expected a positive divisor of "
                f"num_layers={self.num_layers}"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"{n}.rotary_percent: expected (0, 1], got {self.rotary_percent}")
        _check_recompute(self, n)
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ConfigError(f"{n}.fp8: expected e4m3|hybrid (or null = off), got {self.fp8!r}")
        if self.fp8_recipe not in ("delayed", "tensorwise"):
            raise ConfigError(f"{n}.fp8_recipe: expected delayed|tensorwise (current scaling), "
                              f"got {self.fp8_recipe!r}")
        if self.fp8_amax_compute_algo not in ("max", "most_recent"):
            raise ConfigError(f"{n}.fp8_amax_compute_algo: expected max|most_recent, "
                              f"got {self.fp8_amax_compute_algo!r}")


_RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe_act", "moe", "shared_experts", "mla_up_proj")


def _check_recompute(m, n: str) -> None:
    """Megatron-LM's rules for the --recompute-* flags, as one-line errors before any build."""
    g, method, layers = m.recompute_granularity, m.recompute_method, m.recompute_num_layers
    if g is None:
        if method is not None or layers is not None:
            raise ConfigError(f"{n}.recompute_method / {n}.recompute_num_layers need "
                              f"{n}.recompute_granularity (full or selective)")
        return
    if g not in ("full", "selective"):
        raise ConfigError(f"{n}.recompute_granularity: expected full|selective, got {g!r}")
    if g == "full":
        if method not in ("uniform", "block"):
            raise ConfigError(f"{n}.recompute_method: expected uniform|block with "
                              f"recompute_granularity=full, got {method!r}")
        if layers is None or not 1 <= layers <= m.num_layers:
            raise ConfigError(f"{n}.recompute_num_layers: expected 1..num_layers({m.num_layers}) "
                              f"with recompute_granularity=full, got {layers!r}")
    else:
        if method is not None or layers is not None:
            raise ConfigError(f"{n}.recompute_method / {n}.recompute_num_layers: must be unset with "
                              "recompute_granularity=selective (it recomputes modules in every layer)")
    if m.recompute_modules is not None:
        bad = [x for x in m.recompute_modules.split(",") if x.strip() not in _RECOMPUTE_MODULES]
        if bad:
            raise ConfigError(f"{n}.recompute_modules: unknown {bad}; expected a comma-separated "
                              f"subset of {','.join(_RECOMPUTE_MODULES)}")


def _check_hf_family_options(m, n: str) -> None:
    if m.attention_chunk_size is not None and m.attention_chunk_size < 1:
        raise ConfigError(f"{n}.attention_chunk_size: expected >= 1 or null, got {m.attention_chunk_size}")
    if m.attn_temperature_tuning and m.no_rope_freq is None:
        raise ConfigError(f"{n}.attn_temperature_tuning applies to NoPE layers: set {n}.no_rope_freq")
    if m.num_moe_experts is not None:
        if m.num_moe_experts < 1:
            raise ConfigError(f"{n}.num_moe_experts: expected >= 1 or null, got {m.num_moe_experts}")
        if not 1 <= m.moe_router_topk <= m.num_moe_experts:
            raise ConfigError(f"{n}.moe_router_topk={m.moe_router_topk}: expected 1..num_moe_experts"
                              f"={m.num_moe_experts}")
        if isinstance(m.moe_layer_freq, list):
            if len(m.moe_layer_freq) != m.num_layers or any(v not in (0, 1) for v in m.moe_layer_freq):
                raise ConfigError(f"{n}.moe_layer_freq={m.moe_layer_freq}: expected a 0/1 list with one entry "
                                  f"per layer (num_layers={m.num_layers})")
        elif m.moe_layer_freq < 1 or m.num_layers % m.moe_layer_freq:
            raise ConfigError(f"{n}.moe_layer_freq={m.moe_layer_freq}: expected a positive divisor of "
                              f"num_layers={m.num_layers} or a 0/1 list with one entry per layer")
        if m.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ConfigError(f"{n}.moe_router_score_function: expected softmax|sigmoid, got "
                              f"{m.moe_router_score_function!r}")
        if m.moe_token_dispatcher_type not in ("allgather", "alltoall"):
            raise ConfigError(f"{n}.moe_token_dispatcher_type: expected allgather|alltoall, got "
                              f"{m.moe_token_dispatcher_type!r}")


def moe_layer_pattern(m) -> List[int]:
    """Per-layer 1 (MoE) / 0 (dense) of a model section, from either form of moe_layer_freq."""
    if not m.num_moe_experts:
        return [0] * m.num_layers
    if isinstance(m.moe_layer_freq, list):
        return [int(v) for v in m.moe_layer_freq]
    return [int((i + 1) % m.moe_layer_freq == 0) for i in range(m.num_layers)]


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    # MoE experts split over this many data-parallel (x CP) ranks (Megatron-LM's
    # --expert-model-parallel-size); each expert's FFN is split over TP as well
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Megatron-LM's --overlap-grad-reduce / --overlap-param-gather / --ddp-bucket-size: gradient
    # reduce-scatter (all-reduce) per bucket during backward, parameter all-gather per bucket in
    # the next forward (distributed optimizer only); bucket size in elements (None = megatron's)
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None
    # context parallelism (data/cp_layout.py): token slots per window for per-document padding
    # to multiples of 2 x CP (None = seq_length / 16); Megatron-LM's --cp-comm-type
    context_parallel_padding: Optional[int] = None
    cp_comm_type: str = "p2p"
    # Megatron-LM's --distributed-timeout-minutes: how long a collective waits for a silent peer
    # before it fails (every process group); a rank frozen for this long + 5 s is killed by its
    # watchdog (megatron_kd/watchdog.py). Fractions allowed (tests use 0.25).
    distributed_timeout_minutes: float = 10.0
    # `train --engine deepspeed` only (megatron_kd/deepspeed_kd.py; Megatron-DeepSpeed's
    # --zero-stage): the HF student's ZeRO stage 0-3 (the teacher always runs ZeRO-3 inference)
    zero_stage: int = 1

    def __post_init__(self):
        _positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "context_parallel_size", "expert_model_parallel_size")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage!r}")
        t = self.distributed_timeout_minutes
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"parallel.distributed_timeout_minutes: expected a number of minutes > 0, "
                              f"got {t!r}")
        if self.virtual_pipeline_model_parallel_size is not None:
            if self.virtual_pipeline_model_parallel_size < 1:
                raise ConfigError("parallel.virtual_pipeline_model_parallel_size: expected >= 1")
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    "parallel.virtual_pipeline_model_parallel_size needs "
                    "parallel.pipeline_model_parallel_size >= 2"
                )
        if self.context_parallel_padding is not None and self.context_parallel_padding < 0:
            raise ConfigError("parallel.context_parallel_padding: expected >= 0 (token slots per "
                              f"window for per-document CP padding), got {self.context_parallel_padding}")
        if self.overlap_param_gather and not (self.use_distributed_optimizer and self.overlap_grad_reduce):
            raise ConfigError("parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
                              "and parallel.overlap_grad_reduce=true (Megatron-LM's rule: the all-gather "
                              "of updated parameter shards exists only with the distributed optimizer)")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"parallel.ddp_bucket_size: expected a positive number of elements or null, "
                              f"got {self.ddp_bucket_size}")
        if self.cp_comm_type != "p2p":
            raise ConfigError(f"parallel.cp_comm_type: expected 'p2p' (the ring; the one TE supports "
                              f"with THD in every 2.x), got {self.cp_comm_type!r}")


@dataclass
class DataConfig:
    data_path: Optional[str] = None  # prefix of <prefix>.bin/.idx written by preprocess
    tokenizer_model: Optional[str] = None  # sentencepiece .model or HF tokenizer.json
    seq_length: int = 256
    reset_position_ids: bool = False  # False = global positions across packed documents
    eod_mask_loss: bool = True  # do not train EOS -> first token of the next document
    split: str = "98,2,0"  # train,valid,test weights, Megatron's --split
    seed: int = 1234

    def __post_init__(self):
        _positive(self, "seq_length")
        parts = self.split.split(",")
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            weights = []
        if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.split: expected three non-negative weights 'a,b,c', got {self.split!r}")


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_iters: int = 20
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 2
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None = train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 10
    eval_iters: int = 2  # held-out micro-batch groups per evaluation (same windows every time)
    exit_interval: Optional[int] = None  # Megatron's --exit-interval: stop after iter % N == 0
    # control: keep the query/key weight rows of these rotary frequency indices (of
    # rotary_dim / 2, half-open spans "a:b", comma-separated) at their initial (loaded) values in
    # every RoPE layer (models/rotary_freeze.py)
    freeze_rotary_frequencies: Optional[str] = None
    # Megatron-LM's flag: refuse a step whose loss or grad norm is not finite, before the update
    # (training/nonfinite.py); the run then ends with exit 65 and no checkpoint after that step
    check_for_nan_in_loss_and_grad: bool = True
    # skip up to N such steps per run segment (update not applied, counted in `skipped`) first
    skip_nonfinite_steps: int = 0
    # warn when a logged loss > factor x the median of the last 50 logged losses; 0 = off.
    # 3: a diverging LM loss climbs from its 2-4 nats toward ln V (10-12 nats) before it
    # overflows, 3-5x; 10 would fire only at the overflow the check above already stops, and
    # below ~2 step-to-step noise of small batches would trigger it
    loss_spike_factor: float = 3.0

    def __post_init__(self):
        _positive(self, "micro_batch_size", "global_batch_size", "train_iters", "lr")
        if not isinstance(self.skip_nonfinite_steps, int) or self.skip_nonfinite_steps < 0:
            raise ConfigError(f"train.skip_nonfinite_steps: expected an integer >= 0, got "
                              f"{self.skip_nonfinite_steps!r}")
        if not (self.loss_spike_factor == 0 or self.loss_spike_factor > 1):
            raise ConfigError(f"train.loss_spike_factor: expected 0 (off) or a factor > 1, got "
                              f"{self.loss_spike_factor!r}")
        if self.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.lr_decay_style: expected cosine|linear|constant, got {self.lr_decay_style!r}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is larger than train.lr={self.lr}")
        if self.lr_warmup_iters < 0:
            raise ConfigError("train.lr_warmup_iters: expected >= 0")
        if self.freeze_rotary_frequencies is not None:
            parse_frequency_spans(self.freeze_rotary_frequencies)


def parse_frequency_spans(spec: str) -> list:
    """``"8:16,0:2"`` -> [(8, 16), (0, 2)] (half-open rotary frequency index spans)."""
    spans = []
    for part in str(spec).split(","):
        try:
            a, b = (int(x) for x in part.strip().split(":"))
        except ValueError:
            a = b = -1
        if not 0 <= a < b:
            raise ConfigError(f"train.freeze_rotary_frequencies: expected spans 'a:b' with 0 <= a < b, "
                              f"comma-separated (frequency indices), got {spec!r}")
        spans.append((a, b))
    return spans


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # run directory; checkpoints go to <save>/checkpoints
    load: Optional[str] = None  # checkpoint directory (or run dir) to initialise from
    save_interval: Optional[int] = None  # None = only at the end
    finetune: bool = False  # load weights only (new optimizer/scheduler/data position)
    # sha256 of every file recorded at save and checked on resume/load (size alone misses bit rot)
    verify: bool = False
    load_strict: bool = False  # --resume: a damaged newest checkpoint is an error, not a fallback
    keep_last: Optional[int] = None  # None = keep all; else the newest N complete checkpoints

    def __post_init__(self):
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last: expected >= 1 (or null: keep all), got {self.keep_last}")


@dataclass
class TeacherConfig(ModelConfig):
    """The frozen teacher: any shape the student builder supports, loaded from a checkpoint."""

    load: Optional[str] = None  # project checkpoint (run dir, checkpoints/ or iter_* dir)
    tokenizer_model: Optional[str] = None  # must have the student's true vocab size
    bf16: bool = False  # the teacher's own precision (forward only)
    # control: the teacher sees per-document (reset) positions while the student keeps
    # data.reset_position_ids' ones, so its targets carry no absolute-position content
    reset_position_ids: bool = False


@dataclass
class KDConfig:
    """Objective alpha * KD + (1 - alpha) * CE; alpha = 0 is the CE baseline (no teacher run)."""

    alpha: float = 0.0
    temperature: float = 1.0
    scale_by_t_squared: bool = True  # Hinton's T^2 gradient-scale correction
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    beta: float = 0.5  # jsd weight: 0 = forward KL, 1 = reverse KL
    top_k: Optional[int] = None  # distil on the teacher's global top-k only
    # exact: logits formed by the output layer (kd/losses.py); fused: chunked linear + loss that
    # never materialises [tokens, V/TP] (kd/fused.py); auto: fused from fused_min_tokens tokens
    # per micro-batch (seq_length x micro_batch_size) on.
    loss_impl: str = "auto"
    fused_min_tokens: int = 8192
    fused_chunk_size: Optional[int] = None  # tokens per chunk; None = max(128, 4M logits / (V/TP))
    # the fused loss's implementation: torch (kd/fused.py, any device) or triton (kd/triton_fused.py:
    # CUDA, no top_k; one [64, 128] logit tile at a time)
    fused_impl: str = "torch"
    # live: run the teacher every step; cache: read its top-k entries from kd.teacher_cache (a
    # `megatron-kd cache-teacher` directory; no teacher is built). cache_loss: tail = KL over the
    # k cached ids + one tail bin; renormalized = the live kd.top_k loss (kd/cached_loss.py)
    teacher_source: str = "live"
    teacher_cache: Optional[str] = None
    cache_loss: str = "tail"

    def __post_init__(self):
        if self.teacher_source not in ("live", "cache"):
            raise ConfigError(f"kd.teacher_source: expected live|cache, got {self.teacher_source!r}")
        if self.teacher_source == "cache" and not self.teacher_cache:
            raise ConfigError("kd.teacher_source=cache needs kd.teacher_cache (a directory written by "
                              "megatron-kd cache-teacher)")
        if self.cache_loss not in ("tail", "renormalized"):
            raise ConfigError(f"kd.cache_loss: expected tail|renormalized, got {self.cache_loss!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"kd.alpha: expected a value in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature: expected > 0, got {self.temperature}")
        if self.divergence not in ("forward_kl", "reverse_kl", "jsd"):
            raise ConfigError(
                f"kd.divergence: expected forward_kl|reverse_kl|jsd, got {self.divergence!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"kd.beta: expected a value in [0, 1], got {self.beta}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"kd.top_k: expected >= 1, got {self.top_k}")
        if self.loss_impl not in ("auto", "exact", "fused"):
            raise ConfigError(f"kd.loss_impl: expected auto|exact|fused, got {self.loss_impl!r}")
        if self.fused_impl not in ("torch", "triton"):
            raise ConfigError(f"kd.fused_impl: expected torch|triton, got {self.fused_impl!r}")
        if self.fused_chunk_size is not None and self.fused_chunk_size < 1:
            raise ConfigError(f"kd.fused_chunk_size: expected >= 1, got {self.fused_chunk_size}")


@dataclass
class LongReDConfig:
    """LongReD restoration distillation (arXiv 2502.07365); see docs/longred.md.

    The frozen teacher is the original model (``teacher:`` section, its own rotary_base), the
    student its context-extended copy (``model:`` with the new rotary_base, ``checkpoint.load``
    of the same weights). Per optimizer step: L = L_long + alpha_short * L_short +
    alpha_s2l * L_s2l over three data streams: ``data.data_path`` (long windows of
    ``data.seq_length``), ``short_data_path`` and ``s2l_data_path``.
    """

    alpha_short: float = 5.0
    alpha_s2l: float = 10.0
    # micro-batches per step of the long, short and short-to-long streams (the reference's
    # 16-micro-batch cycle is 8:6:2); every micro-batch holds data.seq_length tokens
    stream_ratio: str = "4,3,1"
    schedule: Optional[list] = None  # explicit per-step order, e.g. [long, s2l, long, short, ...]
    short_data_path: Optional[str] = None
    short_seq_length: int = 1024
    s2l_data_path: Optional[str] = None
    s2l_seq_length: int = 8192  # the teacher's original window L
    target_length: Optional[int] = None  # the extended window T simulated by s2l; None = data.seq_length
    middle_placement: str = "cream"  # cream (truncated Gaussian) | uniform
    s2l_head_length: Optional[int] = None  # None: CREAM's rule (L/3 or 4*T/L, chosen at random)
    s2l_tail_length: Optional[int] = None
    selected_layers: Optional[list] = None  # layer numbers 1..num_layers; overrides the selection
    num_selected_layers: int = 6  # M layers picked by attention KL when selected_layers is null
    selection_windows: int = 2  # short-stream windows the attention-KL selection reads
    seed: int = 1234

    def __post_init__(self):
        for name in ("alpha_short", "alpha_s2l"):
            if getattr(self, name) < 0:
                raise ConfigError(f"longred.{name}: expected >= 0, got {getattr(self, name)}")
        self.stream_counts()
        _positive(self, "short_seq_length", "s2l_seq_length", "selection_windows")
        if self.num_selected_layers < 0:
            raise ConfigError(f"longred.num_selected_layers: expected >= 0, got {self.num_selected_layers}")
        if self.middle_placement not in ("cream", "uniform"):
            raise ConfigError(
                f"longred.middle_placement: expected cream|uniform, got {self.middle_placement!r}")
        if self.target_length is not None and self.target_length <= self.s2l_seq_length:
            raise ConfigError(
                f"longred.target_length={self.target_length} must be larger than the original "
                f"length longred.s2l_seq_length={self.s2l_seq_length}")
        for name in ("s2l_head_length", "s2l_tail_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"longred.{name}: expected >= 1, got {v}")
        if self.selected_layers is not None:
            if not isinstance(self.selected_layers, list) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in self.selected_layers):
                raise ConfigError(
                    f"longred.selected_layers: expected a list of layer numbers, got {self.selected_layers!r}")
        if self.schedule is not None:
            if not isinstance(self.schedule, list) or not self.schedule or any(
                    s not in LONGRED_STREAMS for s in self.schedule):
                raise ConfigError(f"longred.schedule: expected a list of {'|'.join(LONGRED_STREAMS)}, "
                                  f"got {self.schedule!r}")

    def stream_counts(self) -> dict:
        """``stream_ratio`` -> {long: a, short: b, s2l: c} (non-negative integers, sum > 0)."""
        try:
            parts = [int(p) for p in str(self.stream_ratio).split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) == 0:
            raise ConfigError(f"longred.stream_ratio: expected three non-negative integers "
                              f"'long,short,s2l', got {self.stream_ratio!r}")
        return dict(zip(LONGRED_STREAMS, parts))


LONGRED_STREAMS = ("long", "short", "s2l")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    teacher: Optional[TeacherConfig] = None
    longred: Optional[LongReDConfig] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(section, *names):
    prefix = _SECTION_NAMES.get(type(section).__name__, type(section).__name__)
    for name in names:
        value = getattr(section, name)
        if value is None or value <= 0:
            raise ConfigError(f"{prefix}.{name}: expected a positive number, got {value!r}")


_SECTION_NAMES = {
    "ModelConfig": "model",
    "ParallelConfig": "parallel",
    "DataConfig": "data",
    "TrainConfig": "train",
    "CheckpointConfig": "checkpoint",
    "KDConfig": "kd",
    "TeacherConfig": "teacher",
    "LongReDConfig": "longred",
}


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against a dataclass field annotation (strings from the CLI)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and isinstance(value, list):  # Union[int, List[int]]
        listed = [a for a in args if typing.get_origin(a) is list]
        if listed:
            return [_coerce(v, typing.get_args(listed[0])[0], key) for v in value]
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `key=1` arrives YAML-parsed as an int
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(key, "an integer", value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _bad(key, what, value):
    raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _build_section(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown(f"{prefix}.{key}", [f"{prefix}.{n}" for n in names]))
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


# Names users bring from HF/other trainers; a typo of one still points at our key.
_ALIASES = {
    "learning_rate": "train.lr",
    "batch_size": "train.micro_batch_size",
    "max_seq_length": "data.seq_length",
    "rope_theta": "model.rotary_base",
}


def _unknown(key: str, known: list[str]) -> str:
    hint = _suggest(key, known)
    hint = f" (did you mean {hint!r}?)" if hint else ""
    return f"unknown config key {key!r}{hint}"


def _suggest(key: str, known: list[str]) -> Optional[str]:
    """Closest key. For ``section.name`` compare the names alone, across every section (a key
    put in the wrong section, ``train.seq_length``, points at ``data.seq_length``), preferring
    ``known`` (the key's own section) on equal names; the shared ``section.`` prefix would
    otherwise make any key of the section look close (``train.lerning_rate`` -> ``train.min_lr``)."""
    if "." not in key:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        return close[0] if close else None
    name = key.split(".", 1)[1]
    candidates = {}
    for full in _all_keys():
        candidates.setdefault(full.split(".", 1)[1], full)
    candidates.update(_ALIASES)
    candidates.update({k.split(".", 1)[1]: k for k in known if "." in k})
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def _all_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        cls = _section_class(typing.get_type_hints(RunConfig)[f.name])
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(cls)]
    return keys


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=3e-4", "model.swiglu=false"]`` -> nested dict (values parsed as YAML scalars)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(_unknown(key, _all_keys()) if len(parts) == 1 else
                              f"override {key!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _section_class(hint):
    """Optional[TeacherConfig] -> TeacherConfig."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union else hint


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(RunConfig)
    sections = {}
    for name, values in raw.items():
        if name not in hints:
            raise ConfigError(_unknown(name, list(hints)) + f" in {source}")
        if values is None:
            if _section_class(hints[name]) is not hints[name]:  # optional section (teacher): null = none
                sections[name] = None
                continue
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {values!r}")
        sections[name] = _build_section(_section_class(hints[name]), values, name)
    return RunConfig(**sections)


def _read_recipe(path: Path, chain: tuple = ()) -> dict:
    """One YAML recipe, with its ``base:`` recipe (a path relative to it) merged underneath.

    Recipes derive from one another (torchtitan's debug-model habit) instead of being copied.
    """
    if not path.is_file():
        what = f"base {path} of {chain[-1]}" if chain else f"--config {path}"
        raise ConfigError(f"{what}: file not found")
    if path.resolve() in chain:
        raise ConfigError(f"--config {path}: 'base' recipes form a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections at top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"--config {path}: 'base' must be a path to another recipe, got {base!r}")
    return _merge(_read_recipe(path.parent / base, chain + (path.resolve(),)), raw)


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML recipe (optional, with ``base:`` inheritance) and apply dotted overrides."""
    raw: dict = _read_recipe(Path(path)) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    return from_dict(raw, source=str(path) if path else "overrides")


def dump_config(cfg: RunConfig, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate_training(cfg: RunConfig) -> None:
    """Checks for training the student (conversion, evaluation and frozen teachers are exempt)."""
    m, p = cfg.model, cfg.parallel
    if cfg.teacher is not None and cfg.teacher.reset_position_ids and cfg.kd.alpha == 0 and cfg.longred is None:
        raise ConfigError("teacher.reset_position_ids=true with kd.alpha=0: no teacher is run at kd.alpha=0 "
                          "(the control needs KD: set kd.alpha > 0, or drop teacher.reset_position_ids)")
    if cfg.train.freeze_rotary_frequencies is not None:
        if m.position_embedding_type != "rope":
            raise ConfigError(f"train.freeze_rotary_frequencies needs model.position_embedding_type=rope, got "
                              f"{m.position_embedding_type!r}")
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        n_freq = int(head_dim * m.rotary_percent) // 2
        for a, b in parse_frequency_spans(cfg.train.freeze_rotary_frequencies):
            if b > n_freq:
                raise ConfigError(f"train.freeze_rotary_frequencies={cfg.train.freeze_rotary_frequencies!r}: "
                                  f"span {a}:{b} beyond the {n_freq} rotary frequencies (head dim {head_dim} x "
                                  f"rotary_percent {m.rotary_percent} / 2)")
    if m.num_moe_experts and p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        # megatron-core's MoE layer raises this in the first training forward; say it up front
        raise ConfigError(f"model.num_moe_experts={m.num_moe_experts} with parallel.tensor_model_parallel_size="
                          f"{p.tensor_model_parallel_size} needs parallel.sequence_parallel=true "
                          "(megatron-core trains MoE layers under TP only with sequence parallelism)")


def validate_layout(cfg: RunConfig, world_size: int) -> None:
    """Checks that need the world size or several sections; arithmetic in the message."""
    p, m, t, d = cfg.parallel, cfg.model, cfg.train, cfg.data
    # the model's own divisibility first: it holds at any world size (a 1-process run reports it)
    if m.num_attention_heads % p.tensor_model_parallel_size:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if groups % p.tensor_model_parallel_size:
        raise ConfigError(
            f"model.num_query_groups={groups} is not divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}"
        )
    stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    if m.num_layers % stages:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by pipeline stages "
            f"pipeline_model_parallel_size({p.pipeline_model_parallel_size}) x "
            f"virtual_pipeline_model_parallel_size({p.virtual_pipeline_model_parallel_size or 1}) = {stages}"
        )
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel layout: world size {world_size} is not divisible by tensor_model_parallel_size"
            f"({p.tensor_model_parallel_size}) x pipeline_model_parallel_size"
            f"({p.pipeline_model_parallel_size}) x context_parallel_size({p.context_parallel_size})"
            f" = {model_parallel}"
        )
    dp = world_size // model_parallel
    ep = p.expert_model_parallel_size
    if ep > 1:
        if (dp * p.context_parallel_size) % ep:
            raise ConfigError(
                f"parallel.expert_model_parallel_size={ep} must divide data-parallel size({dp}) x "
                f"context_parallel_size({p.context_parallel_size}) = {dp * p.context_parallel_size} "
                f"(world size {world_size} / (TP x PP) = {world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)})")
        for name, mc in (("model", m), ("teacher", cfg.teacher)):
            if mc is not None and mc.num_moe_experts and mc.num_moe_experts % ep:
                raise ConfigError(f"{name}.num_moe_experts={mc.num_moe_experts} is not divisible by "
                                  f"parallel.expert_model_parallel_size={ep}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size({t.micro_batch_size}) x data-parallel size({dp}) = "
            f"{t.micro_batch_size * dp}"
        )
    if p.sequence_parallel and d.seq_length % p.tensor_model_parallel_size:
        raise ConfigError(
            f"data.seq_length={d.seq_length} is not divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} (sequence_parallel)"
        )
    cp_chunks = 2 * p.context_parallel_size if p.context_parallel_size > 1 else 1
    if d.seq_length % cp_chunks:
        raise ConfigError(
            f"data.seq_length={d.seq_length} is not divisible by 2 x context_parallel_size = {cp_chunks}"
        )
    if m.fp8 and not t.bf16:
        raise ConfigError(f"model.fp8={m.fp8} needs train.bf16=true (FP8 GEMMs with bf16 elsewhere)")
    if cfg.teacher is not None and cfg.teacher.fp8 and not cfg.teacher.bf16:
        raise ConfigError(f"teacher.fp8={cfg.teacher.fp8} needs teacher.bf16=true")
    if p.context_parallel_size > 1:
        if m.attention_dropout:  # (the teacher runs in eval mode: no dropout either way)
            raise ConfigError(
                f"model.attention_dropout={m.attention_dropout}: the context-parallel ring attention "
                f"(parallel.context_parallel_size={p.context_parallel_size}) has no attention "
                "dropout; expected 0")
    if p.virtual_pipeline_model_parallel_size and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline_model_parallel_size:
        raise ConfigError(
            "interleaved pipeline: micro-batches per step "
            f"({t.global_batch_size // (t.micro_batch_size * dp)}) must be a multiple of "
            f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size}"
        )
