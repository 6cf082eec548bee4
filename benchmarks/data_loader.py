"""Feeding the student: our packed-window loader vs a torch DataLoader with a worker vs an NVIDIA
DALI pipeline (issue 20 item 4: adopt DALI only if it feeds packed token windows faster).

    PYTHONPATH=/tmp/dali python benchmarks/data_loader.py [--shapes 131072x1,2048x64 --batches 8]

Writes a synthetic ``.bin/.idx`` (vocab 202,048 as int32 ids, documents of 200-6,500 tokens:
the paper's 154-4,955 words), builds the same ``PackedDataset`` training uses
(``build_packed_datasets``: megatron-core GPTDataset windows + ``packing.py`` document ids,
positions and loss mask), and times, per shape (``SEQxBATCH``) in one run:

- ``ours``: ``data.build_data_iterator`` -- what ``training/loop.py`` reads, in the main process;
- ``torch-dl``: ``torch.utils.data.DataLoader`` over the same dataset, 1 worker, prefetch 2;
- ``dali``: a DALI CPU pipeline (``device_id=None``; no GPU needed) whose parallel
  ``external_source`` (1 worker process) yields the same five arrays per window, handed to torch
  with ``nvidia.dali.plugin.pytorch.DALIGenericIterator``. DALI has no reader for megatron's
  indexed format and no operator for document ids / positions (a cumulative sum over EOS), so
  a DALI pipeline for this data is this callback plus DALI's batching.

Each loader produces every batch's ``[b, s]`` tokens, labels, loss mask, document ids and
position ids; every batch of each is checked equal to ours. Prints tokens/s of each and the
ratio to ours, and (``--plan``) the share of a paper training step the loader would take: our
loader's seconds per step against the planner's (``megatron-kd plan``) H100 step time for
``examples/paper/phase2_kd_10k_to_500k.yaml`` and ``phase1_theta10k.yaml``. DALI is optional: when
``nvidia.dali`` does not import, the reason is printed and the torch rows still run.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB, EOS = 202_048, 2
KEYS = ("tokens", "labels", "loss_mask", "document_ids", "position_ids")


class _Tok:
    """What the data pipeline reads of a tokenizer (no 202k-entry tokenizer file needed)."""
    vocab_size, eos_id, path = VOCAB, EOS, "synthetic"


def write_corpus(prefix: Path, tokens_needed: int, seed: int = 0) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    total = 0
    while total < tokens_needed:
        n = int(rng.integers(200, 6500))
        doc = rng.integers(3, VOCAB, n, dtype=np.int32)
        doc[-1] = EOS
        builder.add_document(torch.from_numpy(doc), [n])
        total += n
    builder.finalize(str(prefix) + ".idx")


def packed_dataset(prefix: Path, seq: int, windows: int, cache: Path):
    from megatron_kd.config import DataConfig
    from megatron_kd.data import build_packed_datasets

    cfg = DataConfig(data_path=str(prefix), seq_length=seq, split="100,0,0")
    return build_packed_datasets(cfg, _Tok(), cache_dir=str(cache), num_samples=(windows, None, None))[0]


def _collate(samples):  # a module-level function: DataLoader workers pickle it
    from megatron_kd.data.sampler import collate

    return collate(samples)


def iter_ours(ds, mbs):
    from megatron_kd.data import build_data_iterator

    return build_data_iterator(ds, 0, mbs, 0, 1)


def iter_torch_dl(ds, mbs):
    dl = torch.utils.data.DataLoader(ds, batch_size=mbs, shuffle=False, num_workers=1, prefetch_factor=2,
                                     collate_fn=_collate, multiprocessing_context="fork")
    return iter(dl)


class _Source:
    """DALI sample-mode callback: window ``idx_in_epoch`` as five numpy arrays."""

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.ds):
            raise StopIteration
        s = self.ds[info.idx_in_epoch]
        return tuple(s[k].numpy() for k in KEYS)


def iter_dali(ds, mbs):
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=mbs, num_threads=1, device_id=None, py_num_workers=1, py_start_method="fork",
                  prefetch_queue_depth=2)
    def pipe():
        return tuple(fn.external_source(source=_Source(ds), num_outputs=len(KEYS), batch=False, parallel=True))

    p = pipe()
    p.build()
    it = DALIGenericIterator(p, list(KEYS), auto_reset=False, last_batch_policy=LastBatchPolicy.DROP,
                             size=len(ds) // mbs * mbs)
    return ({k: v for k, v in batch[0].items()} for batch in it)


def timed(make, ds, mbs, batches):
    """(batches, start-up seconds to the first batch, steady seconds for the next ``batches``)."""
    t0 = time.perf_counter()
    it = make(ds, mbs)
    first = next(it)
    t1 = time.perf_counter()
    out = [first] + [next(it) for _ in range(batches)]
    t2 = time.perf_counter()
    del it
    return out, t1 - t0, t2 - t1


def plan_seconds_per_step(recipe: str) -> dict:
    from megatron_kd.config import load_config
    from megatron_kd.plan import make_plan

    cfg = load_config(str(REPO / recipe), ["data.tokenizer_model=null"])
    tp, pp, cp = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                  cfg.parallel.context_parallel_size)
    world = cfg.train.global_batch_size // cfg.train.micro_batch_size * tp * pp * cp
    plan = make_plan(cfg, world=world, vocab_size=VOCAB)
    tps_rank = plan.throughput["tokens/s per rank"]
    return {"recipe": recipe, "seq": cfg.data.seq_length, "world": world, "tokens/s per rank": tps_rank}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="131072x1,2048x64", help="SEQxMICRO_BATCH, comma-separated")
    ap.add_argument("--batches", type=int, default=8, help="batches timed per loader and shape")
    ap.add_argument("--no-plan", action="store_true", help="skip the share-of-a-step estimate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    try:
        import nvidia.dali as dali
        dali_ok, dali_why = True, f"nvidia-dali {dali.__version__}, CPU pipeline (device_id=None)"
    except Exception as e:  # noqa: BLE001 -- any import failure is the finding
        dali_ok, dali_why = False, f"nvidia.dali does not import ({type(e).__name__}: {e})"
    print(f"# DALI: {dali_why}", flush=True)

    from megatron_kd import distributed

    distributed.init_distributed()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    need = max(seq * mbs * (args.batches + 2) for seq, mbs in shapes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd-loader-") as tmp:
        prefix = Path(tmp) / "corpus"
        write_corpus(prefix, int(need * 1.1) + 10_000)
        for seq, mbs in shapes:
            ds = packed_dataset(prefix, seq, mbs * (args.batches + 2), Path(tmp) / f"cache{seq}")
            for i in range(len(ds)):  # page the memory map in once for everybody
                ds[i]
            loaders = [("ours", iter_ours), ("torch-dl", iter_torch_dl)] + ([("dali", iter_dali)] if dali_ok else [])
            ref = None
            for name, make in loaders:
                out, startup, sec = timed(make, ds, mbs, args.batches)
                if ref is None:
                    ref = out
                for k in KEYS:  # same windows, same packing
                    for a, b in zip(out, ref):
                        assert torch.equal(a[k].to(b[k].dtype), b[k]), (name, k)
                    assert tuple(out[-1][k].shape) == (mbs, seq), (name, k, out[-1][k].shape)
                rows.append({"shape": f"{seq}x{mbs}", "loader": name, "start-up s": startup, "seconds": sec,
                             "tokens/s": seq * mbs * args.batches / sec})
        base = {r["shape"]: r["tokens/s"] for r in rows if r["loader"] == "ours"}
        for r in rows:
            r["vs ours"] = r["tokens/s"] / base[r["shape"]]
    plans = []
    if not args.no_plan:
        for recipe in ("examples/paper/phase2_kd_10k_to_500k.yaml", "examples/paper/phase1_theta10k.yaml"):
            p = plan_seconds_per_step(recipe)
            ours = next((r for r in rows if r["loader"] == "ours" and r["shape"].startswith(f"{p['seq']}x")), None)
            if ours:
                p["loader tokens/s (ours, 1 thread)"] = ours["tokens/s"]
                p["loader share of a step"] = p["tokens/s per rank"] / ours["tokens/s"]
            plans.append(p)
    if args.json:
        print(json.dumps({"dali": dali_why, "rows": rows, "plan": plans}, indent=2))
        return
    print(f"{'shape':>12} {'loader':>9} {'start-up s':>10} {'seconds':>8} {'tokens/s':>12} {'vs ours':>8}")
    for r in rows:
        print(f"{r['shape']:>12} {r['loader']:>9} {r['start-up s']:10.3f} {r['seconds']:8.3f} {r['tokens/s']:12,.0f} "
              f"{r['vs ours']:8.3f}")
    for p in plans:
        if "loader share of a step" in p:
            print(f"# {p['recipe']}: planner {p['tokens/s per rank']:,.0f} tokens/s per H100 rank (MFU 0.45); "
                  f"our loader {p['loader tokens/s (ours, 1 thread)']:,.0f} tokens/s on one CPU thread here "
                  f"-> {100 * p['loader share of a step']:.2f}% of a step if not overlapped")


if __name__ == "__main__":
    sys.exit(main())
