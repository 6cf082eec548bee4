"""Greedy decoding from a megatron-core model, with megatron-core's static KV cache.

Why megatron-core's ``StaticInferenceContext`` and not a hand-written cache: the cache lives inside
megatron's ``Attention`` (``_adjust_key_value_for_inference``), so TP-sharded heads, GQA and the
local/TE layer specs are handled by megatron itself. Two things are ours (written against
megatron-core 0.16.1):

* **Positions.** Our ``PositionIdGPTModel`` builds RoPE angles from explicit ``position_ids``;
  megatron's static cache slices the angle table as ``q[offset:offset+s]`` and ``k[:offset+s]``,
  so every step passes the position ids of the *whole* sequence so far (``[b, offset+s]``) while
  feeding only the new tokens. That is what lets each prompt of a left-padded batch count its
  positions from 0 at its own first token.
* **Padding.** Prompts are left-padded to one length; the explicit attention mask hides the pad
  keys from every query at prefill and at every decode step (the local spec's softmax applies the
  explicit mask whatever the mask type; under TE the decode step drops the mask, so batches are
  split into equal-length prompts there - see :func:`_batches`).

Logits are vocab-parallel (``[s, b, V_pad/TP]`` per TP rank); the forward is asked to gather
them over the TP group (megatron's ``runtime_gather_output=True``, which its inference path
requires), and only the last position is materialized with a cache, so every rank takes the argmax
of the same ``[b, V]`` and picks the same token.

**Pipeline parallelism.** Every prefill and decode step is one forward-only pass through
megatron-core's pipeline schedule (it moves the ``[q_len, b, h]`` activations between stages;
each stage's layers keep their own part of the static cache); the last stage takes the argmax
and broadcasts the ``[b]`` new tokens over the pipeline group, so every stage feeds the same
tokens, positions and mask to the next step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


class GenerationError(ValueError):
    """Bad generation request (layout, lengths); cli.py prints it as one line."""


@dataclass
class GenerationResult:
    ids: List[int]  # generated ids, the stop token excluded
    stop: str  # "eos" | "stop_id" | "stop_text" | "max_tokens"


def pipeline_group():
    """(pipeline group, global rank of its last stage) when the model spans stages, else None."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        return ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
    return None


def pipeline_forward(model, tokens, on_last_stage, **kwargs) -> None:
    """One forward-only pass of ``[b, s]`` tokens through megatron-core's pipeline schedule;
    ``on_last_stage(output)`` sees the last stage's output. ``kwargs`` go to the model."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, m):
        next(data_iterator)
        out = m(tokens, **kwargs)

        def loss_func(output):
            on_last_stage(output)
            return torch.zeros((), device=output.device), {}
        return out, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                model=model, num_microbatches=1, seq_length=tokens.shape[1],
                                micro_batch_size=tokens.shape[0], forward_only=True)


def _batches(prompts: Sequence[Sequence[int]], batch_size: int, equal_lengths: bool):
    """Index batches; sorted by length so left padding stays small."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batch: List[int] = []
    for i in order:
        new_length = equal_lengths and len(prompts[i]) != len(prompts[batch[0]]) if batch else False
        if batch and (len(batch) == batch_size or new_length):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """valid [b, k] (False at left padding) -> [b, 1, q_len, k] True = masked: causal over the
    last q_len query positions, pad keys hidden."""
    b, k = valid.shape
    q_pos = torch.arange(k - q_len, k, device=valid.device)[:, None]
    causal = torch.arange(k, device=valid.device)[None, :] > q_pos  # [q, k]
    return (causal[None] | ~valid[:, None, :])[:, None]


def _next_tokens(model, tokens, positions, mask, context, vocab_size) -> torch.Tensor:
    """The greedy next token of every row, ``[b]``, identical on every rank."""
    def argmax(out):  # [b, s', V_pad] gathered over TP (s' = 1 with a cache: the last position)
        return out[:, -1].float()[:, :vocab_size].argmax(-1)

    kwargs = dict(position_ids=positions, attention_mask=mask, inference_context=context,
                  runtime_gather_output=True)
    pp = pipeline_group()
    if pp is None:
        return argmax(model(tokens, **kwargs))
    nxt = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    pipeline_forward(model, tokens, lambda out: nxt.copy_(argmax(out)), **kwargs)
    group, last = pp
    torch.distributed.broadcast(nxt, src=last, group=group)
    return nxt


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
                    eos_id: Optional[int] = None, stop_ids: Sequence[int] = (),
                    stop_text: Optional[Callable[[List[int]], bool]] = None,
                    use_cache: bool = True, batch_size: int = 8,
                    max_length: Optional[int] = None) -> List[GenerationResult]:
    """Greedy continuation of each prompt (token ids, no padding).

    Stops a prompt at ``eos_id``, at any of ``stop_ids`` (e.g. the newline pieces), when
    ``stop_text(generated_ids)`` is true (e.g. the decoded text contains a newline), or after
    ``max_new_tokens``. ``max_length`` (the model's position limit) is checked for every prompt
    before anything runs. ``use_cache=False`` re-runs the whole sequence each step (the reference
    the cache is tested against).
    """
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_kd import platform

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise GenerationError("generation: empty prompt")
    if max_length is not None:
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > max_length:
            raise GenerationError(f"generation: prompt + {max_new_tokens} new tokens = {longest} tokens "
                                  f"exceeds the model's position limit {max_length}")
    device = platform.device()
    stops = set(int(s) for s in stop_ids) | ({int(eos_id)} if eos_id is not None else set())
    results: List[Optional[GenerationResult]] = [None] * len(prompts)
    model.eval()
    equal = platform.layer_spec_kind() == "te"
    for idx in _batches(prompts, batch_size, equal_lengths=equal):
        b = len(idx)
        lens = [len(prompts[i]) for i in idx]
        L = max(lens)
        tokens = torch.zeros(b, L, dtype=torch.long, device=device)
        valid = torch.zeros(b, L, dtype=torch.bool, device=device)
        positions = torch.zeros(b, L, dtype=torch.long, device=device)
        for r, i in enumerate(idx):
            n = lens[r]
            tokens[r, L - n:] = torch.tensor(list(prompts[i]), dtype=torch.long, device=device)
            valid[r, L - n:] = True
            positions[r, L - n:] = torch.arange(n, device=device)
        context = StaticInferenceContext(b, L + max_new_tokens) if use_cache else None
        generated: List[List[int]] = [[] for _ in idx]
        done: List[Optional[str]] = [None] * b
        step_tokens = tokens
        for step in range(max_new_tokens):
            if use_cache:
                q_len = step_tokens.shape[1]
                nxt = _next_tokens(model, step_tokens, positions, _mask(valid, q_len), context, vocab_size)
                context.sequence_len_offset += q_len
            else:
                nxt = _next_tokens(model, tokens, positions, _mask(valid, tokens.shape[1]), None, vocab_size)
            for r in range(b):
                if done[r]:
                    continue
                t = int(nxt[r])
                if t in stops:
                    done[r] = "eos" if t == eos_id else "stop_id"
                    continue
                generated[r].append(t)
                if stop_text is not None and stop_text(generated[r]):
                    done[r] = "stop_text"
            if all(done):
                break
            step_tokens = nxt[:, None]
            tokens = torch.cat([tokens, step_tokens], dim=1)
            valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        for r, i in enumerate(idx):
            results[i] = GenerationResult(generated[r], done[r] or "max_tokens")
    return results  # type: ignore[return-value]
