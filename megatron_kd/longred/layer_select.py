"""Layer selection by attention drift, and the per-layer drift measurement it rests on.

LongReD distils the hidden states of the M layers whose attention distributions drift most when
the context is extended (KL between the original and the extended model's attention on short
text; the paper uses M=6 for 32k, 3 for 128k; its code hard-codes the layers). The measurement
runs the LongReD model's short stream with every layer selected and the attention probabilities
recomputed one document at a time (losses.attention_kl_by_document): per layer,
KL(p_original || p_extended) and the hidden-state cosine similarity.

Inside training the same pass runs through megatron-core's forward-only schedule, so it works
under TP/PP (LongReDTrainer.select_layers); ``measure_drift`` is the one-process version for
``megatron-kd drift``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch


def top_layers(kl: Dict[int, float], m: int) -> List[int]:
    """The m layers with the largest KL (ties: lower layer first), in ascending order."""
    ranked = sorted(kl, key=lambda layer: (-kl[layer], layer))
    return sorted(ranked[:m])


def format_kl_table(kl: Dict[int, float], selected: Iterable[int]) -> str:
    chosen = set(selected)
    lines = ["layer   attention KL(original || extended)   selected"]
    for layer in sorted(kl):
        lines.append(f"{layer:5d}   {kl[layer]:34.6e}   {'*' if layer in chosen else ''}")
    return "\n".join(lines)


@torch.no_grad()
def measure_drift(longred_model, batches: Iterable[dict]) -> Dict[int, Dict[str, float]]:
    """One process, whole models: {layer: {"attention_kl", "hidden_cos"}} averaged over batches.

    ``longred_model``: a LongReDModel (student = the model after, teacher = before), every layer
    selected. Batches are short-stream windows (``tokens``, ``position_ids``, ``document_ids``,
    ``teacher_position_ids``). Hidden cosine of the last layer is taken after the final norm.
    """
    from megatron_kd.longred.model import layer_report_name
    from megatron_kd.models.attention import attention_mask

    m = longred_model
    n = m.num_layers
    m.set_selected_layers(range(1, n + 1))
    m.eval()
    m.measure_attention = True
    m.reports.clear()
    device = next(m.student.parameters()).device
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        m(b["tokens"], b["position_ids"], attention_mask(b["document_ids"]), stream="short",
          teacher_position_ids=b.get("teacher_position_ids"), document_ids=b["document_ids"])
    out = {}
    for layer in range(1, n + 1):
        kl = m.reports[f"attention kl layer {layer}"]
        cos = m.reports[layer_report_name("short", layer)]
        out[layer] = {"attention_kl": float(kl[0] / kl[1]), "hidden_cos": float(1 - cos[0] / cos[1])}
    m.measure_attention = False
    m.reports.clear()
    return out
