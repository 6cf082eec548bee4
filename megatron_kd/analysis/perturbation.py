"""§4 perturbation tracing and the position-dependence audit.

For the probe of :mod:`probe` (one block repeated R times) the recorded token of repeat k is the
last content token before its EOS. Against repeat 0, per layer l:

* **Eq. 3 distance** (our reading): ``D_l(k) = mean_e |q_k[e] - q_0[e]|``, the element-wise absolute
  difference of the layer's query state, averaged over all its elements e (heads x head_dim);
  the headline curve averages D_l over layers. Computed before and after RoPE.
* **cosine similarity** of the full query state (heads x head_dim flattened) with repeat 0's,
  before and after RoPE; also for the layer outputs (after the MLP).
* **output distribution**: top-10 tokens and their probability mass per repeat, the rank of
  repeat 0's top-10 tokens in repeat k and their mass there, and ``KL(p_k || p_0)`` (float64).

Pre-RoPE queries of repeat k differ from repeat 0's only through the context below the layer;
post-RoPE ones also through the rotation by the absolute position. Under the document mask the
first layer's pre-RoPE queries are identical (same token, same block), and in exact arithmetic so
is everything downstream of attention (RoPE scores are offset-invariant): the audit measures how
far real arithmetic is from that, per numeric setting (:mod:`numerics`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from megatron_kd.analysis import capture as cap
from megatron_kd.analysis.numerics import DEFAULT_SETTINGS, SETTINGS, numeric_setting
from megatron_kd.analysis.probe import MASKS, Probe

TOP_K = 10
FIGURE_SETTING = "fp32_angles"  # the figures show the training default


# ---------------------------------------------------------------------------- metrics
def _flat(q: np.ndarray) -> np.ndarray:
    """[L, 1, R, ...] -> [L, R, E] float64."""
    return q[:, 0].reshape(q.shape[0], q.shape[2], -1).astype(np.float64)


def element_distance(q: np.ndarray) -> np.ndarray:
    """Eq. 3 per layer and repeat: [L, R] mean |q_k - q_0| over the state's elements."""
    f = _flat(q)
    return np.abs(f - f[:, :1]).mean(-1)


def cosine_to_first(q: np.ndarray) -> np.ndarray:
    """[L, R] cosine similarity of each repeat's full state with repeat 0's."""
    f = _flat(q)
    num = (f * f[:, :1]).sum(-1)
    den = np.linalg.norm(f, axis=-1) * np.linalg.norm(f[:, :1], axis=-1)
    return num / np.maximum(den, 1e-300)


def output_metrics(logits: np.ndarray, k: int = TOP_K) -> dict:
    """``logits [1, R, V]`` -> per-repeat KL to repeat 0, top-k tokens, ranks and masses."""
    lp = torch.log_softmax(torch.from_numpy(logits[0]).double(), dim=-1)  # [R, V]
    p = lp.exp()
    kl = (p * (lp - lp[:1])).sum(-1)  # KL(p_k || p_0)
    top_p, top_i = p.topk(k, dim=-1)  # [R, k]
    ref = top_i[0]  # repeat 0's top-k tokens
    order = p.argsort(dim=-1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(p.shape[1]).expand_as(order))  # rank of every token
    return {
        "kl_to_first": kl.tolist(),
        "max_abs_logit_diff": (torch.from_numpy(logits[0]).double() - torch.from_numpy(logits[0, :1]).double())
        .abs().amax(-1).tolist(),
        "top_tokens": top_i.tolist(),
        "top_probs": top_p.tolist(),
        "top_mass": top_p.sum(-1).tolist(),
        "first_top_tokens": ref.tolist(),
        "first_top_ranks": ranks[:, ref].tolist(),  # [R, k]: rank (0 = argmax) of repeat 0's top-k
        "first_top_mass": p[:, ref].sum(-1).tolist(),
    }


def probe_metrics(result: Dict[str, np.ndarray]) -> dict:
    out = {}
    for name, key in (("pre_rope", "query_pre_rope"), ("post_rope", "query_post_rope")):
        d, c = element_distance(result[key]), cosine_to_first(result[key])
        out[f"distance_{name}"] = {"per_layer": d.tolist(), "mean_over_layers": d.mean(0).tolist()}
        out[f"cosine_{name}"] = {"per_layer": c.tolist(), "mean_over_layers": c.mean(0).tolist()}
    c = cosine_to_first(result["layer_output"])
    out["cosine_layer_output"] = {"per_layer": c.tolist(), "mean_over_layers": c.mean(0).tolist()}
    out["output"] = output_metrics(result["logits"])
    return out


# ---------------------------------------------------------------------------- running
def run_probe(chunks, probe: Probe, vocab_size: int, masks: Sequence[str] = MASKS,
              settings: Iterable[str] = DEFAULT_SETTINGS, device=None, keep_captures: bool = True):
    """{mask: {setting: metrics}} on rank 0 (None elsewhere), plus the raw captures of
    ``FIGURE_SETTING`` when ``keep_captures`` ({mask: result})."""
    metrics: dict = {}
    captures: dict = {}
    for mask in masks:
        metrics[mask] = {}
        for name in settings:
            setting = SETTINGS[name]
            tokens, positions, attn = probe.inputs(mask, setting.reset_position_ids, device)
            with numeric_setting(chunks, setting):
                result = cap.capture(chunks, tokens, positions, attn, probe.recorded_positions(), vocab_size)
            if result is None:
                continue
            metrics[mask][name] = probe_metrics(result)
            if keep_captures and name == FIGURE_SETTING:
                captures[mask] = result
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None, None
    return metrics, captures


def audit_table(metrics: dict, repeats: Optional[Sequence[int]] = None) -> str:
    """KL(repeat k || repeat 0) and max |logit_k - logit_0| per numeric setting, per mask.

    KL is computed in float64 from the recorded logits; below ~1e-16 it is rounding noise (it can
    come out slightly negative), which is why the logit difference is shown too."""
    lines = []
    for mask, per_setting in metrics.items():
        r = len(next(iter(per_setting.values()))["output"]["kl_to_first"])
        ks = [k for k in (repeats or sorted({1, 2, r // 4, r // 2, r - 1})) if 0 < k < r]
        for key, title in (("kl_to_first", "KL(repeat k || repeat 0)"),
                           ("max_abs_logit_diff", "max |logit_k - logit_0|")):
            lines.append(f"{title}, {mask} mask")
            lines.append("setting".ljust(20) + "".join(f"k={k}".rjust(11) for k in ks) + "max_k |.|".rjust(11))
            for n, m in per_setting.items():
                v = m["output"][key]
                lines.append(n.ljust(20) + "".join(f"{v[k]:11.2e}" for k in ks) + f"{max(map(abs, v[1:])):11.2e}")
            lines.append("")
    return "\n".join(lines).rstrip()


def write_perturbation(out_dir: Path, label: str, metrics: dict, captures: dict, probe: Probe,
                       meta: dict) -> dict:
    """JSON of every number, the captures (.npz + manifest) and the figures; returns the paths."""
    from megatron_kd.analysis import figures

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {**meta, "block_tokens": probe.block_tokens, "repeats": probe.repeats,
                    "recorded_positions": probe.recorded_positions(),
                    "settings": {n: SETTINGS[n].meaning for n in next(iter(metrics.values()))},
                    "figure_setting": FIGURE_SETTING},
           "metrics": metrics}
    paths = {"json": str(out_dir / f"{label}_perturbation.json")}
    Path(paths["json"]).write_text(json.dumps(doc))
    (out_dir / f"{label}_audit.txt").write_text(audit_table(metrics) + "\n")
    paths["audit"] = str(out_dir / f"{label}_audit.txt")
    for mask, result in captures.items():
        paths[f"capture_{mask}"] = str(cap.save(result, out_dir / f"{label}_capture_{mask}",
                                                {**meta, "mask": mask, "setting": FIGURE_SETTING}))
    paths.update(figures.perturbation_figures(out_dir, label, metrics, FIGURE_SETTING))
    return paths


def analyze_checkpoint(run_dir, out_dir, block_tokens: int, repeats: int, text: Optional[str] = None,
                       masks: Sequence[str] = MASKS, settings: Sequence[str] = DEFAULT_SETTINGS,
                       label: Optional[str] = None, parallel_cfg=None, text_source: str = "--text") -> Optional[dict]:
    """Everything for one checkpoint, inside an initialised torch.distributed process group."""
    from megatron_kd import distributed, platform
    from megatron_kd.analysis.probe import build_probe
    from megatron_kd.analysis.runs import load_chunks, read_run
    from megatron_kd.config import ParallelConfig

    parallel_cfg = parallel_cfg or ParallelConfig()
    run = read_run(run_dir)
    probe = build_probe(run.tokenizer, block_tokens, repeats, run.cfg.data.seq_length, text, text_source)
    distributed.init_model_parallel(parallel_cfg, run.cfg.train.seed)
    t = time.time()
    load_chunks(run, parallel_cfg)
    metrics, captures = run_probe(run.chunks, probe, run.vocab_size, masks, settings, platform.device())
    if metrics is None:
        return None
    meta = {"checkpoint": str(run.path), "rotary_base": run.rotary_base,
            "seq_length": run.cfg.data.seq_length, "vocab_size": run.vocab_size,
            "layout": {"tensor_model_parallel_size": parallel_cfg.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": parallel_cfg.pipeline_model_parallel_size}}
    paths = write_perturbation(Path(out_dir), label or run.path.name, metrics, captures, probe, meta)
    return {"paths": paths, "metrics": metrics, "seconds": round(time.time() - t, 2),
            "table": audit_table(metrics)}
