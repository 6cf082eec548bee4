"""Worker for test_reproduce.py: compares linear_qkv rows of a phase-1 student with the phase-2
students trained from it, with and without train.freeze_rotary_frequencies. Prints one RESULT line.

argv: STUDY_DIR"""
import json
import sys
from pathlib import Path


def main():
    from megatron_kd import distributed
    from megatron_kd.config import parse_frequency_spans
    from megatron_kd.eval.passkey import load_model
    from megatron_kd.models.rotary_freeze import frozen_head_dims, qkv_frozen_rows

    root = Path(sys.argv[1])
    distributed.init_distributed()
    runs = {"phase1": root / "phase1_theta10k/seed0", "free": root / "10k_to_500k/kd/seed0",
            "high": root / "control_freeze_high_frequencies/kd/seed0",
            "low": root / "control_freeze_low_frequencies/ce/seed0"}
    weights = {}
    for name, run in runs.items():
        model, cfg = load_model(run, 64)
        weights[name] = [layer.self_attention.linear_qkv.weight.detach().clone() for layer in model.decoder.layers]
        if name in ("high", "low"):
            m = cfg.model
            hd = m.hidden_size // m.num_attention_heads
            spans = parse_frequency_spans(cfg.train.freeze_rotary_frequencies)
            weights[name + "_mask"] = qkv_frozen_rows(m.num_attention_heads, m.num_query_groups, hd,
                                                      frozen_head_dims(spans, hd))
            weights[name + "_spans"] = spans
    out = {}
    for name in ("free", "high", "low"):
        mask = weights.get(name + "_mask", weights.get("high_mask"))
        frozen = max((w[mask] - p[mask]).abs().max().item() for w, p in zip(weights[name], weights["phase1"]))
        rest = min((w[~mask] - p[~mask]).abs().max().item() for w, p in zip(weights[name], weights["phase1"]))
        out[name] = {"frozen_rows_max_change": frozen, "other_rows_min_layer_change": rest,
                     "frozen_rows": int(mask.sum())}
    out["spans"] = {"high": weights["high_spans"], "low": weights["low_spans"]}
    print("RESULT " + json.dumps(out), flush=True)
    distributed.destroy()


if __name__ == "__main__":
    main()
