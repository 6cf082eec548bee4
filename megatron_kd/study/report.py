"""The study's report: a table (mean exact match with 95% intervals per arm x band), a PNG in the
style of the paper's Figure 4 (accuracy vs needle distance, one line per theta setup x loss), the
controls' KD - CE differences with a sentence each, and ``reproduce_summary.json`` with the
figures under fixed keys (``retrieval.<model>.<band>.{exact_match, ci95, n}``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from megatron_kd.study.spec import BANDS, CONTROLS, MAIN_SETUP, SETUPS, phase1_arm
from megatron_kd.study.stats import cell_summary, difference

CHANCE = 1 / 16


def _band_outcomes(result: dict, band: str) -> List[int]:
    return [x for v in result["bands"][band].values() for x in v]


def _groups(results: Dict[str, dict]) -> Dict[str, List[dict]]:
    """arm name -> its runs sorted by seed: "teacher", "phase1_theta10k", "10k_to_500k/kd",
    "control_short_teacher/kd", ..."""
    out: Dict[str, List[dict]] = {}
    for r in results.values():
        if r["kind"] == "teacher":
            if "bands" not in r:
                continue
            key = r["name"].split("/")[0]
        elif r["kind"] == "phase1":
            key = r["name"].split("/")[0]
        else:
            key = f"{r['meta']['group']}/{r['meta']['arm']}"
        out.setdefault(key, []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r.get("meta", {}).get("seed", 0))
    return out


def retrieval_table(groups: Dict[str, List[dict]]) -> Dict[str, Dict[str, dict]]:
    """arm -> band -> cell summary (pooled over seeds x samples)."""
    return {arm: {b: cell_summary([_band_outcomes(r, b) for r in runs]) for b in BANDS}
            for arm, runs in groups.items()}


def model_arms(setup: str = MAIN_SETUP) -> Dict[str, str]:
    """The fixed summary keys (teacher, phase1, kd, ce) -> the arms of ``setup`` they name."""
    return {"teacher": "teacher", "phase1": phase1_arm(SETUPS[setup][0]),
            "kd": f"{setup}/kd", "ce": f"{setup}/ce"}


_FIXED = ("exact_match", "ci95", "n")


def fixed_keys(groups: Dict[str, List[dict]], table: Dict[str, Dict[str, dict]], setup: str = MAIN_SETUP) -> dict:
    """``{"pooled": {model: {band: cell}}, "per_seed": [{"seed": s, model: {band: cell}}]}`` for
    model in teacher / phase1 / kd / ce (the one teacher appears in every seed); ``table`` is
    retrieval_table(groups), whose pooled cells are reused."""
    arms = {k: a for k, a in model_arms(setup).items() if a in groups}

    def fixed(cell):
        return {key: cell[key] for key in _FIXED}

    seeds = sorted({r["meta"]["seed"] for a in arms.values() for r in groups[a] if "seed" in r.get("meta", {})})
    per_seed = []
    for sd in seeds:
        row = {"seed": sd}
        for k, a in arms.items():
            runs = [r for r in groups[a] if r.get("meta", {}).get("seed", sd) == sd]
            row[k] = {b: fixed(cell_summary([_band_outcomes(r, b) for r in runs])) for b in BANDS}
        per_seed.append(row)
    pooled = {k: {b: fixed(table[a][b]) for b in BANDS} for k, a in arms.items()}
    return {"pooled": pooled, "per_seed": per_seed}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt_cell(c: dict) -> str:
    return f"{c['exact_match']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"


def _verdict(name: str, ctrl: dict, main: Optional[dict]) -> str:
    """One sentence: which hypothesis this control's KD - CE (beyond the document) supports.
    "supports" needs an interval that excludes 0; an interval that includes it is "consistent
    with", never proof."""
    lo, hi = ctrl["ci95"]
    if main is None:
        return "no main-setup comparison"
    if not main["ci95"][0] > 0:
        return ("the main KD - CE difference beyond the document is not distinguishable from 0, so this "
                f"control cannot separate the hypotheses (here KD - CE = {ctrl['difference']:+.3f}, interval "
                f"{'excludes' if lo > 0 or hi < 0 else 'includes'} 0)")
    if name == "teacher_reset_positions":
        return ("KD still beats CE with position-invariant targets: the advantage does not come from "
                "absolute-position content in the targets -- supports 'KD is a better LM that generalizes in "
                "length'" if lo > 0 else
                "without absolute positions in the targets KD - CE is not distinguishable from 0 -- consistent "
                "with 'positional transfer'")
    if name == "short_teacher":
        return ("a teacher that never saw context beyond the student's documents still gives KD > CE -- "
                "supports 'KD is a better LM that generalizes in length'" if lo > 0 else
                "with a short-context teacher KD - CE is not distinguishable from 0: what helps comes from the "
                "teacher's long-context training, not from any better LM -- consistent with a transfer of "
                "long-context behaviour")
    if name == "positional_teacher":
        if lo > main["ci95"][1]:
            return ("a teacher whose logits carry absolute position gives a larger KD advantage than the "
                    "RoPE-only teacher -- supports 'positional transfer' when the teacher has positional content")
        return ("absolute-position content in the teacher's logits adds nothing measurable over the RoPE-only "
                "teacher (whose targets are offset-invariant): the main advantage needs no positional channel")
    return ("KD still beats CE with these rotary rows frozen: the advantage does not need them to adapt"
            if lo > 0 else
            "with these rotary rows frozen KD - CE is not distinguishable from 0: the advantage goes through them")


def main_verdict(main: Optional[dict]) -> str:
    if main is None:
        return ""
    lo, hi = main["ci95"]
    if lo > 0:
        return "KD beats CE beyond the document length (the interval excludes 0)."
    if hi < 0:
        return "CE beats KD beyond the document length (the interval excludes 0)."
    return "KD and CE are not distinguishable beyond the document length (the interval includes 0)."


def controls_table(groups: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per comparison: KD - CE beyond the document length (paired by seed), with its verdict."""
    def diff(kd_key, ce_key):
        kd, ce = groups.get(kd_key), groups.get(ce_key)
        if not kd or not ce:
            return None
        out = difference([_band_outcomes(r, "beyond_document") for r in kd],
                         [_band_outcomes(r, "beyond_document") for r in ce])
        out["beyond_window"] = difference([_band_outcomes(r, "beyond_window") for r in kd],
                                          [_band_outcomes(r, "beyond_window") for r in ce])
        return out

    out = {}
    main = diff(f"{MAIN_SETUP}/kd", f"{MAIN_SETUP}/ce")
    if main:
        out["main"] = {**main, "what": f"{MAIN_SETUP}: KD vs CE (RoPE-only teacher at the phase-2 window)",
                       "verdict": main_verdict(main)}
    for name, (what, arms) in CONTROLS.items():
        ce_key = f"control_{name}/ce" if "ce" in arms else f"{MAIN_SETUP}/ce"
        d = diff(f"control_{name}/kd", ce_key)
        if d is not None:
            out[name] = {**d, "what": what, "ce_arm": ce_key, "verdict": _verdict(name, d, main)}
    return out


def _plot(groups, cfg, path: Path) -> Path:
    from megatron_kd.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"10k_to_10k": "tab:blue", "500k_to_500k": "tab:green", "10k_to_500k": "tab:red"}
    for arm, runs in groups.items():
        setup, _, loss = arm.partition("/")
        if setup not in colors and arm != "teacher":
            continue
        ds, ys = [], []
        for b in BANDS:
            for d in cfg.distances[b]:
                hits = [x for r in runs for x in r["bands"][b][str(d)]]
                ds.append(d)
                ys.append(sum(hits) / max(len(hits), 1))
        if arm == "teacher":
            ax.plot(ds, ys, color="black", ls=":", marker=".", label="teacher")
        else:
            ax.plot(ds, ys, color=colors[setup], ls="-" if loss == "kd" else "--", marker="o",
                    label=f"{setup.replace('_to_', '→')} {loss.upper()}")
    doc = cfg.phase2_doc_tokens[1]
    ax.axvline(doc, color="gray", lw=0.8)
    ax.axvline(cfg.phase2_seq_length, color="gray", lw=0.8, ls="-.")
    ax.text(doc, 1.03, " longest document", fontsize=7, color="gray")
    ax.text(cfg.phase2_seq_length, 1.03, " window", fontsize=7, color="gray")
    ax.axhline(CHANCE, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("needle → question distance (tokens)")
    ax.set_ylabel("passkey exact match")
    ax.set_ylim(-0.02, 1.08)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(table: Dict[str, Dict[str, dict]], extra: Dict[str, dict], cfg) -> str:
    heads = [f"in document (<{cfg.phase2_doc_tokens[1]})", f"beyond document (to {cfg.phase2_seq_length})",
             f"beyond window (to {2 * cfg.phase2_seq_length})"]
    lines = ["| arm | " + " | ".join(heads) + " | held-out LM | phase-2 LM | n/cell |",
             "|---|" + "---:|" * (len(heads) + 3)]
    for arm, cells in table.items():
        e = extra[arm]
        lm = f"{e['heldout_loss']:.3f}" if e["heldout_loss"] is not None else "-"
        tr = f"{e['train_lm_loss']:.3f}" if e["train_lm_loss"] is not None else "-"
        lines.append(f"| {arm} | " + " | ".join(_fmt_cell(cells[b]) for b in BANDS)
                     + f" | {lm} | {tr} | {cells[BANDS[0]]['n']} |")
    return "\n".join(lines)


def write_report(root: Path, cfg, results: Dict[str, dict], corpus, timings: dict,
                 replaced: Optional[Dict[str, float]] = None) -> dict:
    """``replaced``: phase-1 runs below the in-distribution bar (replaced by spare seeds): listed,
    left out of the arms."""
    replaced = replaced or {}
    groups = _groups({k: v for k, v in results.items() if k not in replaced})
    table = retrieval_table(groups)
    extra = {arm: {"heldout_loss": _mean([r.get("heldout_loss") for r in runs]),
                   "train_lm_loss": _mean([r.get("train_lm_loss") for r in runs]) if runs[0]["kind"] == "phase2" else None}
             for arm, runs in groups.items()}
    controls = controls_table(groups)
    md = format_table(table, extra, cfg)
    lines = [md, "", "KD - CE exact match beyond the document length (paired bootstrap over seeds x samples; "
             "the verdicts read this band):"]
    for name, d in controls.items():
        verdict = d.get("verdict") or main_verdict(d)
        w = d["beyond_window"]
        lines.append(f"- {name}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] -- {verdict} "
                     f"(beyond the window: {w['difference']:+.3f} [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}])")
    if replaced:
        lines.append("Phase-1 runs below the in-distribution bar, replaced by spare seeds (both arms): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in replaced.items()))
    text = "\n".join(lines)
    png = _plot(groups, cfg, root / "reproduce.png")
    fixed = fixed_keys(groups, table)
    summary = {
        "preset": cfg.preset, "config": cfg.to_dict(), "chance": CHANCE,
        "longest_phase2_document_tokens": corpus.longest_phase2_document,
        "bands": {b: {"sequence_tokens": cfg.band_length(b), "distances": list(cfg.distances[b])} for b in BANDS},
        "retrieval": fixed["pooled"], "retrieval_per_seed": fixed["per_seed"], "arms": table, "lm": extra,
        "kd_minus_ce": controls,
        "phase1_in_distribution": {r["name"]: sum(x for v in r["phase1_probe"].values() for x in v)
                                   / max(sum(len(v) for v in r["phase1_probe"].values()), 1)
                                   for r in results.values() if r["kind"] == "phase1"},
        "phase1_below_bar_replaced": replaced,
        "runs": len(results), "seconds": timings, "png": str(png), "table_markdown": md,
    }
    (root / "reproduce_summary.json").write_text(json.dumps(summary, indent=2))
    (root / "reproduce.md").write_text("# Reproduction study\n\n" + text + "\n")
    return summary | {"text": text}
