"""The paper's phase-1 and phase-2 layouts at several node counts, as the markdown tables in
docs/cluster.md: ``megatron-kd plan`` (megatron_kd/plan.py) run for each, nothing measured.

    .venv/bin/python tools/plan_tables.py            # 4, 16, 64 nodes x 8 H100
    .venv/bin/python tools/plan_tables.py --nodes 2,8 --gpus-per-node 4

A layout the planner refuses (e.g. a global batch that the data-parallel ranks do not divide)
is a row with the refusal, followed by the row for the smallest change that fits, named.
"""
from __future__ import annotations

import argparse

from megatron_kd.config import ConfigError, load_config
from megatron_kd.plan import GiB, make_plan

VOCAB = 202048  # Llama-4's tokenizer (the paper's student and teacher)
# (title, recipe, --doc-length, the overrides tried in order when the recipe does not fit)
RECIPES = [
    ("phase 1 (pre-training, 2,048 tokens)", "examples/paper/phase1_theta10k.yaml", None,
     [[], ["train.micro_batch_size=4"], ["train.micro_batch_size=2"], ["train.micro_batch_size=1"]]),
    ("phase 2 (KD, 131,072-token windows of ~2k-token documents)", "examples/paper/phase2_kd_10k_to_500k.yaml",
     2048, [[], ["train.global_batch_size=128"], ["train.global_batch_size=256"], ["train.global_batch_size=512"]]),
]


def row(recipe: str, nodes: int, gpn: int, doc, overrides) -> str:
    cfg = load_config(recipe, overrides)
    p = make_plan(cfg, nodes=nodes, gpus_per_node=gpn, vocab_size=VOCAB, doc_length=doc)
    L = p.layout
    where = ", ".join(f"{k} {g['size']}: {'NVLink' if g['link'].startswith('NVLink') else g['link'].split(' ')[0]}"
                      for k, g in p.placement.items() if g["size"] > 1) or "-"
    tps = next(v for k, v in p.throughput.items() if k.startswith("tokens/s, all"))
    return (f"| {nodes} | {L['world']} | TP{L['tp']} PP{L['pp']} CP{L['cp']} DP{L['dp']} | "
            f"{' '.join(overrides) or '-'} | {max(p.params_per_rank) / 1e6:,.0f}M | {p.bytes['total'] / GiB:.1f} | "
            f"{where} | {tps:,.0f} | {p.throughput['seconds per step']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="4,16,64")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    args = ap.parse_args()
    for title, recipe, doc, tries in RECIPES:
        print(f"\n**{title}**: `{recipe}`, vocab {VOCAB:,}"
              + (f", `--doc-length {doc}`" if doc else "") + "\n")
        print("| nodes | ranks | layout | changed | params/rank | GiB/rank | groups (size: link) | tokens/s | s/step |")
        print("|---|---|---|---|---|---|---|---|---|")
        for nodes in map(int, args.nodes.split(",")):
            for overrides in tries:
                try:
                    print(row(recipe, nodes, args.gpus_per_node, doc, overrides))
                    break
                except ConfigError as e:
                    if not overrides:
                        print(f"| {nodes} | {nodes * args.gpus_per_node} | refused | - | {e} | | | | |")


if __name__ == "__main__":
    main()
