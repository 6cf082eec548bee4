"""``megatron-kd plan``: per-rank memory and expected throughput of a recipe's layout.

So a user picks TP/PP/CP before queueing a job. Parameters are counted exactly the way
megatron-core allocates them (sharded linears, replicated norms, vocab-parallel embedding on the
first stage, an output weight on the last stage also when tied and PP > 1); a test checks the
counts against built models at TP=2/PP=2. Everything else is an estimate with its assumptions
stated:

- gradients: megatron DDP's fp32 buffer (``grad_reduce_in_fp32``), 4 B/param;
- optimizer: Adam moments (8 B/param) + fp32 main params with bf16 (4 B/param); the distributed
  optimizer shards that over data-parallel × context-parallel ranks;
- activations per layer and token (Korthikanti et al. 2022, "Reducing Activation Recomputation",
  adapted to GQA/SwiGLU): tensors saved for backward; TP divides the head/FFN parts, sequence
  parallelism also the norm/residual parts, CP the tokens. TE's fused attention keeps O(s)
  (q, k, v, output, lse); the local spec's dense attention adds the [heads, s, s] probabilities.
  Full recompute keeps each recompute unit's input plus one unit's activations during backward;
  the first pipeline stage holds PP micro-batches in flight (1F1B), × (1 + (PP−1)/(PP·VPP))
  interleaved;
- logits: full [tokens, V/TP] (bf16 logits + fp32 copy and gradient for CE, + the teacher's and
  the fp32 softmaxes for exact KD) vs the fused chunked KD loss (one chunk of fp32 logits);
- MoE layers (``num_moe_experts``, every ``moe_layer_freq``-th layer): the router, the local
  experts (``num_moe_experts / expert_model_parallel_size``, each split over TP) and the shared
  expert, counted exactly; FLOPs count the router, the top-k experts and the shared expert.
- throughput: model FLOPs per token (6·N + 12·L·h_q·s_att for the student's fwd+bwd, 2·N_T +
  4·L_T·h_q·s_att for the teacher forward; s_att = mean keys per query under the document
  mask, ≈ (doc_length + 1)/2), tokens/s = ranks × MFU × peak / FLOPs per token. Recompute costs
  time, not model FLOPs (hardware FLOPs are reported separately).
- placement: megatron-core orders ranks tp-cp-ep-dp-pp (TP fastest) and srun/torchrun fill a
  node with consecutive ranks, so a group of size n and rank stride k spans the nodes its members
  ``r0 + i·k`` fall on (``gpus_per_node`` ranks per node): within one node it runs over NVLink,
  otherwise over the network. A TP group across nodes (an all-reduce per layer over the network)
  is refused unless ``--allow-tp-across-nodes``;
- document length for attention FLOPs: ``--doc-length``, else the mean document of the recipe's
  data (``<data.data_path>.summary.json`` from ``megatron-kd preprocess``, + 1 for EOS, at most
  ``seq_length``: longer documents are split), else ``seq_length``;
- LongReD (a ``longred`` section): the frozen original model is a teacher (its parameters and
  one layer's no-grad activations count), run on the short and s2l micro-batches only (their
  share of ``longred.stream_ratio`` scales its FLOPs); the long stream's CE logits are the
  student's.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from megatron_kd.config import ConfigError, RunConfig, moe_layer_pattern, validate_layout
from megatron_kd.data.cp_layout import cp_capacity
from megatron_kd.models.builder import padded_vocab_size

GiB = 1024 ** 3
H100_BF16_DENSE_TFLOPS = 989.0


# ----------------------------------------------------------------------------- parameters


def _mlp_params(h: int, ffn: int, glu: int, bias: bool, tp: int) -> int:
    """A (SwiGLU) MLP on one TP rank: column-parallel fc1, row-parallel fc2 (bias not sharded)."""
    return h * ffn * glu // tp + (ffn * glu // tp if bias else 0) + ffn * h // tp + (h if bias else 0)


def layer_params(m, tp: int, moe: bool = False, ep: int = 1, active: bool = False) -> int:
    """Parameters of one transformer layer on one TP (x EP) rank. ``moe``: the layer is a
    megatron-core MoE layer (router replicated, num_moe_experts / EP local experts split over TP,
    shared expert split over TP). ``active``: per token instead (top-k experts), for FLOPs."""
    h, a = m.hidden_size, m.num_attention_heads
    kv = m.kv_channels or h // a
    g = m.num_query_groups or a
    ffn = m.ffn_hidden_size or 4 * h
    glu = 2 if m.swiglu else 1
    bias = m.add_bias_linear
    norm = h if m.normalization == "RMSNorm" else 2 * h
    qkv = h * kv * (a + 2 * g) // tp + (kv * (a + 2 * g) // tp if bias or m.add_qkv_bias else 0)
    proj = a * kv * h // tp + (h if bias else 0)  # row-parallel bias is not sharded
    qk_norm = 2 * kv * (1 if m.normalization == "RMSNorm" else 2) if m.qk_layernorm else 0
    if not moe:
        return qkv + proj + qk_norm + _mlp_params(h, ffn, glu, bias, tp) + 2 * norm
    e_ffn = m.moe_ffn_hidden_size or ffn
    experts = m.moe_router_topk if active else m.num_moe_experts // ep
    mlp = h * m.num_moe_experts + experts * _mlp_params(h, e_ffn, glu, bias, tp)  # router + experts
    if m.moe_shared_expert_intermediate_size:
        mlp += _mlp_params(h, m.moe_shared_expert_intermediate_size, glu, bias, tp)
    return qkv + proj + qk_norm + mlp + 2 * norm


def _is_moe(m, i: int) -> bool:
    """0-based layer index -> MoE layer (models/llama4.py's interleave)."""
    return bool(moe_layer_pattern(m)[i])


def params_per_rank(m, parallel, vocab_size: int, seq_length: int) -> List[int]:
    """Parameters held by each pipeline rank (equal over TP/CP/DP ranks), index = PP rank."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    ep = parallel.expert_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    v = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    h = m.hidden_size
    norm = h if m.normalization == "RMSNorm" else 2 * h
    per_chunk = m.num_layers // (pp * vpp)
    out = []
    for rank in range(pp):
        # virtual chunk c of rank r holds layers [(c * pp + r) * per_chunk, ... + per_chunk)
        layers = [(c * pp + rank) * per_chunk + j for c in range(vpp) for j in range(per_chunk)]
        n = sum(layer_params(m, tp, _is_moe(m, i), ep) for i in layers)
        if rank == 0:
            n += v // tp * h
            if m.position_embedding_type == "learned_absolute":
                n += (m.max_position_embeddings or seq_length) * h
        if rank == pp - 1:
            n += norm
            if m.untie_embeddings_and_output_weights or pp > 1:
                n += v // tp * h  # the output layer (a synced copy of the embedding when tied)
        out.append(n)
    return out


def flops_per_token(m, vocab_size: int, attended: float, backward: bool) -> float:
    """Model FLOPs per token: 2 per multiply-add, ×3 with backward; MoE layers count the router,
    the top-k experts a token is routed to and the shared expert."""
    h, a = m.hidden_size, m.num_attention_heads
    kv = m.kv_channels or h // a
    dense = sum(layer_params(m, 1, _is_moe(m, i), active=True) for i in range(m.num_layers))
    dense += h * vocab_size  # output projection
    attn = 4 * m.num_layers * a * kv * attended  # QK^T and PV
    return (3 if backward else 1) * (2 * dense + attn)


# ----------------------------------------------------------------------------- activations


def activation_elems_per_token(m, tp: int, sp: bool, attention: str, keys: int) -> Dict[str, float]:
    """Elements saved for backward per token and layer, by part (see module docstring)."""
    h, a = m.hidden_size, m.num_attention_heads
    kv = m.kv_channels or h // a
    g = m.num_query_groups or a
    ffn = m.ffn_hidden_size or 4 * h
    glu = 2 if m.swiglu else 1
    rep = tp if sp else 1
    parts = {
        "norms+inputs": 4 * h / rep,  # input/pre-MLP norm inputs and the linears' inputs
        "qkv+context": (2 * a * kv + 2 * g * kv) / tp,  # q, k, v, attention output
        "mlp": (glu * ffn + ffn) / tp,  # fc1 output(s), activation output (fc2 input)
    }
    if attention == "local":
        parts["attention probs"] = a * keys / tp  # [heads, s, s] softmax output
    return parts  # (hidden-dropout masks, 1 byte per element each, are left out)


@dataclass
class Plan:
    layout: Dict[str, int]
    tokens_per_rank: int
    params_per_rank: List[int]
    bytes: Dict[str, float] = field(default_factory=dict)  # worst rank (PP rank 0 for activations)
    activation_per_layer: Dict[str, float] = field(default_factory=dict)
    throughput: Dict[str, float] = field(default_factory=dict)
    saved_after_forward: float = 0.0  # one micro-batch, worst stage: saved activations + logits
    placement: Dict[str, Dict] = field(default_factory=dict)  # group -> size, nodes spanned, link
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        L = self.layout
        lines = [f"layout: world {L['world']} = TP {L['tp']} x PP {L['pp']} x CP {L['cp']} x DP {L['dp']}"
                 f" (VPP {L['vpp']}, EP {L.get('ep', 1)}), micro-batch {L['micro_batch']} x {L['capacity']} tokens"
                 f" ({self.tokens_per_rank} per rank), {L['microbatches']} micro-batches/step",
                 f"parameters per rank (PP rank 0..): {', '.join(f'{p / 1e6:,.1f}M' for p in self.params_per_rank)}",
                 "", f"{'memory per rank (worst stage)':<44}{'GiB':>10}"]
        for k, v in self.bytes.items():
            lines.append(f"  {k:<42}{v / GiB:>10.2f}")
        lines += ["", "activations per layer (GiB, one micro-batch):"]
        for k, v in self.activation_per_layer.items():
            lines.append(f"  {k:<42}{v / GiB:>10.3f}")
        if self.placement:
            lines += ["", f"parallel groups ({L['nodes']} node(s) x {L['gpus_per_node']} ranks):"]
            for k, g in self.placement.items():
                lines.append(f"  {k:<4} size {g['size']:>4}, spans {g['nodes']:>3} node(s): {g['link']}")
        lines += ["", "throughput (assumed MFU x peak):"]
        for k, v in self.throughput.items():
            lines.append(f"  {k:<42}{v:>14,.1f}")
        return "\n".join(lines + [""] + [f"note: {n}" for n in self.notes])


def group_placement(tp: int, cp: int, ep: int, dp: int, pp: int, gpus_per_node: int) -> Dict[str, Dict]:
    """Nodes each kind of parallel group spans (megatron-core's tp-cp-ep-dp-pp order, consecutive
    ranks per node). EP splits the DP ranks of the expert layers (same stride as DP)."""
    out = {}
    for name, size, stride in (("TP", tp, 1), ("CP", cp, tp), ("EP", ep, tp * cp), ("DP", dp, tp * cp),
                               ("PP", pp, tp * cp * dp)):
        if name == "EP" and ep == 1:
            continue
        nodes = len({i * stride // gpus_per_node for i in range(size)})
        link = "none (size 1)" if size == 1 else "NVLink (one node)" if nodes == 1 else "network"
        out[name] = dict(size=size, nodes=nodes, link=link)
    return out


def summary_doc_length(cfg: RunConfig) -> Optional[tuple]:
    """(mean document tokens incl. EOS, at most seq_length; the summary's path) of the recipe's
    data, from preprocess's <data.data_path>.summary.json; None when there is none."""
    prefix = cfg.data.data_path
    path = f"{prefix}.summary.json" if prefix else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            mean = float(json.load(f)["doc_tokens"]["mean"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"plan: {path}: no doc_tokens.mean in it ({type(e).__name__}); "
                          "rerun megatron-kd preprocess or pass --doc-length") from None
    return min(cfg.data.seq_length, max(1, round(mean + 1))), path


def make_plan(cfg: RunConfig, world: Optional[int] = None, vocab_size: Optional[int] = None,
              mfu: float = 0.45, peak_tflops: float = H100_BF16_DENSE_TFLOPS,
              doc_length: Optional[int] = None, attention: str = "te", nodes: Optional[int] = None,
              gpus_per_node: int = 8, allow_tp_across_nodes: bool = False) -> Plan:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    if gpus_per_node < 1:
        raise ConfigError(f"plan --gpus-per-node: expected a positive number of ranks per node, got {gpus_per_node}")
    if nodes is not None:
        if nodes < 1:
            raise ConfigError(f"plan --nodes: expected a positive number of nodes, got {nodes}")
        if world is not None and world != nodes * gpus_per_node:
            raise ConfigError(f"plan: --world {world} but --nodes {nodes} x --gpus-per-node {gpus_per_node} "
                              f"= {nodes * gpus_per_node}; give one of them")
        world = nodes * gpus_per_node
        try:
            validate_layout(cfg, world)
        except ConfigError as e:
            raise ConfigError(f"plan --nodes {nodes} x --gpus-per-node {gpus_per_node} = world size {world}: "
                              f"{e}") from None
    world = world or tp * pp * cp
    validate_layout(cfg, world)
    n_nodes = nodes or -(-world // gpus_per_node)
    if vocab_size is None:
        raise ConfigError("plan: the vocabulary size is needed (data.tokenizer_model, or --vocab-size)")
    if attention not in ("te", "local"):
        raise ConfigError(f"plan --attention: expected te|local, got {attention!r}")
    dp = world // (tp * pp * cp)
    placement = group_placement(tp, cp, p.expert_model_parallel_size, dp, pp, gpus_per_node) if n_nodes > 1 else {}
    if placement and placement["TP"]["nodes"] > 1 and not allow_tp_across_nodes:
        raise ConfigError(
            f"plan: parallel.tensor_model_parallel_size={tp} with {gpus_per_node} ranks per node: each TP group "
            f"spans {placement['TP']['nodes']} nodes (its all-reduces, several per layer, would cross the "
            "network); use a TP that divides the ranks per node, or pass --allow-tp-across-nodes to plan it anyway")
    seq = cfg.data.seq_length
    cap = cp_capacity(cfg)
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    T = t.micro_batch_size * cap // cp  # tokens per rank per micro-batch
    v_pad = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    bf16 = t.bf16
    act_b = 2 if bf16 else 4
    params = params_per_rank(m, p, vocab_size, seq)
    worst = max(params)
    plan = Plan(layout=dict(world=world, tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp, ep=p.expert_model_parallel_size,
                            micro_batch=t.micro_batch_size, nodes=n_nodes, gpus_per_node=gpus_per_node,
                            capacity=cap, microbatches=micro), tokens_per_rank=T, params_per_rank=params,
                placement=placement)
    if placement and placement["TP"]["nodes"] > 1:
        plan.notes.append(f"TP groups span {placement['TP']['nodes']} nodes (--allow-tp-across-nodes): the "
                          "tokens/s below assume NVLink-speed all-reduces and are optimistic")
    b = plan.bytes
    b["parameters"] = worst * act_b
    b["gradients (fp32 DDP buffer)"] = worst * 4
    opt = worst * ((4 if bf16 else 0) + 8)
    shard = dp * cp if p.use_distributed_optimizer else 1
    b[f"optimizer ({'distributed /' + str(shard) if shard > 1 else 'plain'})"] = opt / shard
    if m.num_moe_experts or (cfg.teacher is not None and cfg.teacher.num_moe_experts):
        plan.notes.append("MoE: parameters count the local experts (num_moe_experts / EP, each split over "
                          "TP) exactly; activations are modelled as a dense FFN of ffn_hidden_size, and the "
                          "distributed optimizer's expert shards (over DP x CP / EP) as dense ones")

    doc_source = "--doc-length"
    if doc_length is None:
        found = summary_doc_length(cfg)
        doc_length, doc_source = found if found else (seq, "seq_length: no data summary")
        if found:
            doc_source = f"mean of {doc_source}"
    doc = doc_length
    keys = cap // cp if attention == "local" else 0  # local dense attention: keys of the layout
    parts = activation_elems_per_token(m, tp, p.sequence_parallel, attention, keys * cp)
    per_layer = sum(parts.values()) * T * act_b
    plan.activation_per_layer = {k: v * T * act_b for k, v in parts.items()}
    plan.activation_per_layer["total"] = per_layer
    layer_input = T * m.hidden_size / (tp if p.sequence_parallel else 1) * act_b
    plan.activation_per_layer["layer input (kept under full recompute)"] = layer_input
    stage_layers = m.num_layers // pp
    transient = 0.0  # one recompute unit's activations, rebuilt during backward
    if m.recompute_granularity == "full":
        n = m.recompute_num_layers
        if m.recompute_method == "uniform":
            stage_act, transient = math.ceil(stage_layers / n) * layer_input, n * per_layer
        else:
            n = min(n, stage_layers)
            stage_act, transient = n * layer_input + (stage_layers - n) * per_layer, per_layer
    elif m.recompute_granularity == "selective" and "attention probs" in parts:
        stage_act = stage_layers * (per_layer - plan.activation_per_layer["attention probs"])
    else:
        stage_act = stage_layers * per_layer
    in_flight = min(pp, micro) * (1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1)
    b["activations (layers, in flight)"] = stage_act * in_flight + transient

    fused = cfg.kd.loss_impl == "fused" or (cfg.kd.loss_impl == "auto" and
                                            seq * t.micro_batch_size >= cfg.kd.fused_min_tokens)
    kd = cfg.kd.alpha > 0
    longred = getattr(cfg, "longred", None)
    if longred is not None:  # the original model runs on the short / s2l micro-batches
        ratio = longred.stream_counts()
        teacher_share = (ratio["short"] + ratio["s2l"]) / sum(ratio.values())
    else:
        teacher_share = 1.0 if kd else 0.0
    if kd and fused:
        chunk = cfg.kd.fused_chunk_size or max(128, (1 << 22) // (v_pad // tp))  # kd/fused.py's default
        b["logits (fused KD loss, one chunk)"] = min(chunk, T) * v_pad / tp * 4 * 3 + T * m.hidden_size * 4
    else:
        per = act_b + 4 + 4  # logits, fp32 copy, gradient
        if kd:
            per += (2 if cfg.teacher.bf16 else 4) + 2 * 4  # teacher logits, fp32 softmaxes
        b[f"logits ({'exact KD' if kd else 'CE'}, full [tokens, V/TP])"] = T * v_pad / tp * per

    plan.saved_after_forward = stage_act + sum(v for k, v in b.items() if k.startswith("logits"))
    if teacher_share > 0:
        tm = cfg.teacher
        tb = 2 if tm.bf16 else 4
        tparams = max(params_per_rank(tm, p, vocab_size, seq))
        b["teacher parameters"] = tparams * tb
        tparts = activation_elems_per_token(tm, tp, p.sequence_parallel, attention, keys * cp)
        b["teacher activations (one layer, no grad)"] = sum(tparts.values()) * T * tb
    b["total"] = sum(v for k, v in b.items())

    attended = (doc + 1) / 2
    student = flops_per_token(m, v_pad, attended, backward=True)
    teacher = (teacher_share * flops_per_token(cfg.teacher, v_pad, attended, backward=False)
               if teacher_share > 0 else 0.0)
    per_token = student + teacher
    recompute_extra = flops_per_token(m, v_pad, attended, False) if m.recompute_granularity == "full" else 0.0
    tps = world * mfu * peak_tflops * 1e12 / per_token
    plan.throughput = {
        "student fwd+bwd GFLOP/token": student / 1e9,
        "teacher fwd GFLOP/token": teacher / 1e9,
        "hardware GFLOP/token (with recompute)": (per_token + recompute_extra) / 1e9,
        f"tokens/s, all {world} ranks (MFU {mfu:.2f})": tps,
        "tokens/s per rank": tps / world,
        "seconds per step": t.global_batch_size * seq / tps,
    }
    plan.notes += [f"peak {peak_tflops:g} TFLOP/s per rank (H100 SXM bf16 dense: 989); MFU is an assumption",
                   f"attention FLOPs for documents of {doc} tokens ({doc_source}; document mask): "
                   f"{attended:.0f} keys/query",
                   f"activations assume the {'TE fused (O(s))' if attention == 'te' else 'local dense (O(s^2))'} attention"]
    return plan


def plan_main(args) -> int:
    """CLI body of ``megatron-kd plan`` (args from cli.py's subparser)."""
    from megatron_kd.config import load_config

    cfg = load_config(args.config, args.overrides)
    vocab = args.vocab_size
    if vocab is None and cfg.data.tokenizer_model:
        from megatron_kd.data import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer_model).vocab_size
    plan = make_plan(cfg, world=args.world, vocab_size=vocab, mfu=args.mfu, peak_tflops=args.peak_tflops,
                     doc_length=args.doc_length, attention=args.attention, nodes=args.nodes,
                     gpus_per_node=args.gpus_per_node, allow_tp_across_nodes=args.allow_tp_across_nodes)
    print(plan.to_json() if args.json else plan.table())
    return 0
