"""Record activations of chosen token positions with forward hooks on megatron-core modules.

Hook points (megatron-core 0.16.1; nothing of megatron's is copied, modules are only observed):

================  ==============================================  =========================
record            where                                           local shape
================  ==============================================  =========================
token_ids         GPTModel forward pre-hook (input_ids)           [b, s]
embeddings        ``model.embedding`` output                      [s(/tp), b, h]
query_pre_rope    ``SelfAttention.get_query_key_value_tensors``   [s, b, heads/tp, d]
                  (per-instance wrapper; after q_layernorm)
query_post_rope   ``core_attention`` forward pre-hook, arg 0      [s, b, heads/tp, d]
                  (SelfAttention applies RoPE right before it)
layer_output      ``TransformerLayer`` output[0] (after the MLP)  [s(/tp), b, h]
final_hidden      ``output_layer`` forward pre-hook (after the    [s(/tp), b, h]
                  final norm)
logits            ``output_layer`` output[0]                      [s, b, V_pad/tp]
================  ==============================================  =========================

``s(/tp)``: sharded along the sequence under sequence parallelism. Each hook first selects the
recorded positions (``index_select`` on the sequence axis), so only ``n_positions`` rows are ever
communicated: heads and vocabulary are all-gathered over the TP group, sequence-parallel rows
are summed over it (each position lives on one rank). Pipeline stages record their own layers
(global layer numbers) and rank 0 merges everything with one ``gather_object``.

Result layout (numpy, on global rank 0; other ranks get None): ``token_ids [b, n]``,
``positions [n]``, ``embeddings [b, n, h]``, ``query_pre_rope``/``query_post_rope``
``[L, b, n, heads, d]``, ``layer_output [L, b, n, h]``, ``final_hidden [b, n, h]``,
``logits [b, n, V]`` (true vocab; fp32, or float64 for a float64 model), ``probs [b, n, V]`` (softmax in float64).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

AXES = {
    "token_ids": ["batch", "position"],
    "positions": ["position"],
    "embeddings": ["batch", "position", "hidden"],
    "query_pre_rope": ["layer", "batch", "position", "head", "head_dim"],
    "query_post_rope": ["layer", "batch", "position", "head", "head_dim"],
    "layer_output": ["layer", "batch", "position", "hidden"],
    "final_hidden": ["batch", "position", "hidden"],
    "logits": ["batch", "position", "vocab"],
    "probs": ["batch", "position", "vocab"],
}
LAYER_KEYS = ("query_pre_rope", "query_post_rope", "layer_output")


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class ActivationCapture:
    """Context manager: ``with ActivationCapture(chunks, positions, vocab_size) as cap: forward(...)``
    then ``cap.result()`` (collective: every rank calls it)."""

    def __init__(self, model_chunks, positions: Sequence[int], vocab_size: int):
        from megatron.core import parallel_state as ps

        self.chunks = [_unwrap(c) for c in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks])]
        self.positions = [int(p) for p in positions]
        self.vocab_size = int(vocab_size)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.sequence_parallel = bool(self.chunks[0].config.sequence_parallel)
        self.local: Dict[str, object] = {k: {} for k in LAYER_KEYS}
        self._handles: List = []
        self._wrapped: List = []

    # ------------------------------------------------------------------ position selection
    def _index(self, device) -> torch.Tensor:
        return torch.tensor(self.positions, dtype=torch.long, device=device)

    def _rows(self, t: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        """``t`` [s(/tp), ...] -> [n, ...] of the recorded positions, complete on every TP rank."""
        t = t.detach()
        if not (seq_sharded and self.sequence_parallel and self.tp_size > 1):
            return t.index_select(0, self._index(t.device))
        local = t.shape[0]
        lo = self.tp_rank * local
        out = torch.zeros((len(self.positions),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        mine = [i for i, p in enumerate(self.positions) if lo <= p < lo + local]
        if mine:
            idx = torch.tensor(mine, device=t.device)
            out[idx] = t.index_select(0, torch.tensor([self.positions[i] - lo for i in mine], device=t.device))
        torch.distributed.all_reduce(out, group=self.tp_group)  # each row is non-zero on one rank
        return out

    def _gather_last(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """All-gather a TP-split axis (heads, vocab) of an already position-selected tensor."""
        if self.tp_size == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        torch.distributed.all_gather(parts, t.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu()
        return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()

    # ------------------------------------------------------------------ hooks
    def _record(self, key, value, layer=None):
        if layer is None:
            self.local[key] = value
        else:
            self.local[key][layer] = value

    def __enter__(self):
        for model in self.chunks:
            self._handles.append(model.register_forward_pre_hook(self._on_model_input, with_kwargs=True))
            if getattr(model, "pre_process", False):
                self._handles.append(model.embedding.register_forward_hook(self._on_embedding))
            for layer in model.decoder.layers:
                self._hook_layer(layer)
            if getattr(model, "post_process", False):
                self._handles.append(model.output_layer.register_forward_pre_hook(self._on_final_hidden))
                self._handles.append(model.output_layer.register_forward_hook(self._on_logits))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        for attn in self._wrapped:
            del attn.get_query_key_value_tensors  # back to the class method
        self._handles, self._wrapped = [], []
        return False

    def _on_model_input(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and getattr(module, "pre_process", False):
            self._record("token_ids", self._np(ids.detach()[:, self._index(ids.device)]))

    def _on_embedding(self, module, args, output):
        rows = self._rows(output, seq_sharded=True)  # [n, b, h]
        self._record("embeddings", self._np(rows.transpose(0, 1)))

    def _hook_layer(self, layer):
        index = layer.layer_number - 1  # megatron numbers layers globally (PP offsets included), 1-based
        attn = layer.self_attention
        original = attn.get_query_key_value_tensors

        def qkv_wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if isinstance(out, tuple) and len(out) >= 3:  # split q, k, v (the fused-RoPE path is off)
                self._record("query_pre_rope", self._queries(out[0]), index)
            return out

        attn.get_query_key_value_tensors = qkv_wrapper
        self._wrapped.append(attn)

        def on_core_attention(module, args, kwargs):
            query = args[0] if args else kwargs["query"]
            self._record("query_post_rope", self._queries(query), index)

        def on_layer(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._record("layer_output", self._np(self._rows(hidden, seq_sharded=True).transpose(0, 1)), index)

        self._handles.append(attn.core_attention.register_forward_pre_hook(on_core_attention, with_kwargs=True))
        self._handles.append(layer.register_forward_hook(on_layer))

    def _queries(self, query: torch.Tensor) -> np.ndarray:
        rows = self._rows(query, seq_sharded=False)  # [n, b, heads/tp, d]
        return self._np(self._gather_last(rows, dim=2).transpose(0, 1))  # [b, n, heads, d]

    def _on_final_hidden(self, module, args):
        self._record("final_hidden", self._np(self._rows(args[0], seq_sharded=True).transpose(0, 1)))

    def _on_logits(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output  # [s, b, V_pad/tp]
        rows = self._gather_last(self._rows(logits, seq_sharded=False), dim=-1)[..., :self.vocab_size]
        self._record("logits", self._np(rows.transpose(0, 1)))  # float64 stays float64

    # ------------------------------------------------------------------ merge
    def result(self) -> Optional[Dict[str, np.ndarray]]:
        """Merge the stages' records on global rank 0 (collective)."""
        mine = self.local if (self.tp_rank == 0 and self.dp_rank == 0) else None
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            gathered = [None] * world if torch.distributed.get_rank() == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0)
            if torch.distributed.get_rank() != 0:
                return None
        else:
            gathered = [mine]
        merged: Dict[str, object] = {k: {} for k in LAYER_KEYS}
        for part in gathered:
            if not part:
                continue
            for key, value in part.items():
                if key in LAYER_KEYS:
                    merged[key].update(value)
                else:
                    merged[key] = value
        out = {"positions": np.asarray(self.positions, dtype=np.int64)}
        for key, value in merged.items():
            if key in LAYER_KEYS:
                if value:
                    out[key] = np.stack([value[i] for i in sorted(value)])
            else:
                out[key] = value
        if "logits" in out:
            logits = torch.from_numpy(out["logits"]).double()
            out["probs"] = torch.softmax(logits, dim=-1).numpy()
        return out


def forward(model_chunks, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor):
    """One forward pass (no grad) of ``[b, s]`` tokens through this rank's model chunks.

    One stage: a direct call. Several stages: megatron's pipeline schedule with
    ``forward_only=True`` (it moves activations between stages); the loss function returns a dummy,
    the hooks are what records.
    """
    from megatron.core import parallel_state as ps

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1 and len(chunks) == 1:
            return chunks[0](tokens, position_ids, attention_mask)
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            out = model(batch[0], batch[1], batch[2])
            return out, lambda output: (torch.zeros((), device=tokens.device), {})

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([(tokens, position_ids, attention_mask)]) for _ in chunks]
            if len(chunks) > 1 else iter([(tokens, position_ids, attention_mask)]),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
        return None


def capture(model_chunks, tokens, position_ids, attention_mask, positions, vocab_size):
    """Run one forward and return the merged records (numpy dict on rank 0, None elsewhere)."""
    with ActivationCapture(model_chunks, positions, vocab_size) as cap:
        forward(model_chunks, tokens, position_ids, attention_mask)
    return cap.result()


def save(result: Dict[str, np.ndarray], path, meta: Optional[dict] = None) -> Path:
    """``<path>.npz`` + ``<path>.json`` manifest (shape, dtype and axis names of every array)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".npz"), **result)
    manifest = {"arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "axes": AXES.get(k)}
                           for k, v in result.items()},
                "meta": meta or {}}
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2))
    return path.with_suffix(".npz")
