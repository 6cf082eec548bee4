"""Tokenize text corpora into megatron-core ``<prefix>.bin`` / ``<prefix>.idx`` files.

Every document ends in EOS (packing finds document boundaries by it). All outputs are written
under temporary names and renamed at the very end, so any failure leaves existing files untouched
and nothing half-written. ``main(argv)`` is the ``megatron-kd preprocess`` / tools entry point.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_kd.data.errors import DataError
from megatron_kd.data.tokenizer import load_tokenizer, train_sentencepiece

PERCENTILES = (10, 50, 90, 99)
_PARAGRAPH_SPLIT = re.compile(r"\n[ \t\r\f\v]*\n")


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------
def iter_documents(inputs: Sequence[str], json_key: str = "text",
                   split_paragraphs: bool = False) -> Iterator[str]:
    """Yield document texts: one per JSONL line (``.jsonl``/``.json``), or per ``.txt`` file (or
    per blank-line-separated paragraph with ``split_paragraphs``). Whitespace-only documents are
    yielded too; the caller skips them."""
    for path in inputs:
        p = Path(path)
        if p.suffix in (".jsonl", ".json"):
            yield from _iter_jsonl(p, json_key)
        else:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"--input {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if split_paragraphs:
                yield from (para.strip() for para in _PARAGRAPH_SPLIT.split(text))
            else:
                yield text


def _iter_jsonl(p: Path, key: str) -> Iterator[str]:
    with open(p, encoding="utf-8", errors="strict") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"--input {p}:{lineno + 1}: not UTF-8 text") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"--input {p}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                raise DataError(f"--input {p}:{lineno}: no key {key!r} (set --json-key)")
            if not isinstance(obj[key], str):
                raise DataError(f"--input {p}:{lineno}: {key!r} is {type(obj[key]).__name__}, expected a string")
            yield obj[key]


# ---------------------------------------------------------------------------------------------
# Tokenizing (optionally in a process pool)
# ---------------------------------------------------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _encode(text: str) -> Tuple[np.ndarray, int]:
    """text -> (ids with EOS appended, word count)."""
    tok = _WORKER_TOKENIZER
    ids = tok.encode(text)
    ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int64), len(text.split())


def _percentiles(values: List[int]) -> Dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}


def output_paths(output_prefix: str) -> Dict[str, str]:
    return {k: f"{output_prefix}.{k}" for k in ("bin", "idx", "summary.json")} | {
        "tokenizer": f"{output_prefix}.tokenizer.model"}


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_model: Optional[str] = None,
               train_tokenizer: Optional[int] = None, json_key: str = "text",
               split_paragraphs: bool = False, workers: int = 1, overwrite: bool = False,
               chunk_size: int = 64, progress: bool = True) -> Dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx``; return (and write) the summary.

    Whitespace-only documents are skipped (counted in ``skipped_empty_docs``).
    Summary: ``docs``, ``tokens`` (in the .bin, EOS included), ``tokens_per_second``, and
    document-length percentiles ``doc_tokens`` (EOS excluded) and ``doc_words`` (whitespace
    split), as in the paper's Table 2.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    # ---- validate everything cheap before any work -------------------------------------------
    if not inputs:
        raise DataError("--input: expected at least one .jsonl or .txt file")
    for path in inputs:
        if not Path(path).is_file():
            raise DataError(f"--input {path}: file not found (expected a .jsonl or .txt file)")
    if (tokenizer_model is None) == (train_tokenizer is None):
        raise DataError("--tokenizer-model / --train-tokenizer: expected exactly one of them")
    if tokenizer_model is not None and not Path(tokenizer_model).exists():
        raise DataError(f"--tokenizer-model {tokenizer_model}: file not found")
    if workers < 1 or chunk_size < 1:
        raise DataError(f"--workers / --chunk-size: expected >= 1, got {workers} / {chunk_size}")
    out = output_paths(output_prefix)
    guarded = ["bin", "idx"] + (["tokenizer"] if train_tokenizer is not None else [])
    existing = [out[k] for k in guarded if os.path.exists(out[k])]
    if existing and not overwrite:
        raise DataError(f"--output-prefix {output_prefix}: already exists: {', '.join(existing)}; pass --overwrite to replace")
    out_dir = Path(output_prefix).parent
    created = next((d for d in reversed([out_dir, *out_dir.parents]) if not d.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)  # removed again below if this run fails

    tmp = {k: f"{v}.tmp{os.getpid()}" for k, v in out.items() if k != "tokenizer"}
    tmp_tok_prefix = f"{output_prefix}.tokenizer.tmp{os.getpid()}"
    if train_tokenizer is not None:
        tmp["tokenizer"], tmp["tokenizer_vocab"] = tmp_tok_prefix + ".model", tmp_tok_prefix + ".vocab"
    builder = None
    try:
        # ---- tokenizer ------------------------------------------------------------------------
        if train_tokenizer is not None:
            docs = (d for d in iter_documents(inputs, json_key, split_paragraphs) if d.strip())
            tok_path = train_sentencepiece(docs, train_tokenizer, tmp_tok_prefix)
        else:
            tok_path = tokenizer_model
        tokenizer = load_tokenizer(tok_path)
        dtype = np.int32 if tokenizer.vocab_size > 65500 else np.uint16

        # ---- tokenize -----------------------------------------------------------------------------
        builder = IndexedDatasetBuilder(tmp["bin"], dtype=dtype)
        skipped = [0]

        def _non_empty(texts):
            for text in texts:
                if text.strip():
                    yield text
                else:
                    skipped[0] += 1

        docs = _non_empty(iter_documents(inputs, json_key, split_paragraphs))
        doc_tokens: List[int] = []
        doc_words: List[int] = []
        t0 = time.perf_counter()
        with _encoder(tok_path, workers) as encode_many, tqdm(
                desc="tokenizing", unit="tok", unit_scale=True, disable=not progress) as bar:
            for ids, words in encode_many(docs, chunk_size):  # in document order
                builder.add_document(ids, [len(ids)])
                doc_tokens.append(len(ids) - 1)
                doc_words.append(words)
                bar.update(len(ids))
        seconds = time.perf_counter() - t0
        if not doc_tokens:
            raise DataError(f"--input {', '.join(map(str, inputs))}: no non-empty document (check --json-key)")
        builder.finalize(tmp["idx"])
        builder = None

        total = int(sum(doc_tokens) + len(doc_tokens))
        summary = {
            "output_prefix": str(output_prefix),
            "inputs": [str(p) for p in inputs],
            "tokenizer": str(out["tokenizer"] if train_tokenizer is not None else tokenizer_model),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": np.dtype(dtype).name,
            "docs": len(doc_tokens),
            "skipped_empty_docs": skipped[0],
            "tokens": total,
            "seconds": seconds,
            "tokens_per_second": total / max(seconds, 1e-9),
            "doc_tokens": _percentiles(doc_tokens) | {"mean": float(np.mean(doc_tokens)), "max": int(max(doc_tokens))},
            "doc_words": _percentiles(doc_words) | {"mean": float(np.mean(doc_words)), "max": int(max(doc_words))},
        }
        with open(tmp["summary.json"], "w") as f:
            json.dump(summary, f, indent=2)

        # ---- commit: rename everything into place -------------------------------------------------
        finals = dict(out, tokenizer_vocab=f"{output_prefix}.tokenizer.vocab")
        for key in ("tokenizer", "tokenizer_vocab", "bin", "idx", "summary.json"):
            if key in tmp:
                os.replace(tmp[key], finals[key])
        return summary
    finally:
        if builder is not None:
            builder.data_file.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if created is not None and not os.path.exists(out["idx"]):  # failed: leave no empty dirs
            for d in [out_dir, *out_dir.parents]:
                if d == created.parent or any(d.iterdir()):
                    break
                d.rmdir()


class _encoder:
    """Context manager giving ``encode_many(texts, chunk) -> iterator of (ids, words)``, in order;
    a process pool when ``workers > 1``. Texts are read in the main process (so input errors are
    raised here, with file:line) and fed to the pool in bounded slices."""

    def __init__(self, tokenizer_path: str, workers: int):
        self.path, self.workers, self.pool = tokenizer_path, workers, None

    def __enter__(self):
        if self.workers > 1:
            ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.path,))
        else:
            _init_worker(self.path)
        return self.encode_many

    def encode_many(self, texts, chunk_size: int):
        if self.pool is None:
            yield from map(_encode, texts)
            return
        texts = iter(texts)
        while True:
            block = list(itertools.islice(texts, chunk_size * self.workers * 8))
            if not block:
                return
            yield from self.pool.imap(_encode, block, chunksize=chunk_size)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _print_summary(s: Dict) -> None:
    def row(name, d):
        return f"  {name:<12}" + "  ".join(f"{k}={d[k]:.0f}" for k in ("p10", "p50", "p90", "p99")) + f"  mean={d['mean']:.1f}  max={d['max']}"

    print(f"wrote {s['output_prefix']}.bin/.idx ({s['dtype']}), tokenizer {s['tokenizer']} (vocab {s['vocab_size']}, eos {s['eos_id']})")
    print(f"  docs={s['docs']:,}  tokens={s['tokens']:,}  {s['tokens_per_second']:,.0f} tokens/s in {s['seconds']:.1f}s")
    print("  doc length")
    print(row("tokens", s["doc_tokens"]))
    print(row("words", s["doc_words"]))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megatron-kd preprocess", description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", required=True, help=".jsonl (one JSON object per line) or .txt files")
    ap.add_argument("--json-key", default="text", help="JSONL field holding the document text")
    ap.add_argument("--split-paragraphs", action="store_true", help=".txt: each blank-line-separated paragraph is a document")
    tok = ap.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", help="sentencepiece .model or HF tokenizer.json")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a BPE sentencepiece tokenizer of this size -> <prefix>.tokenizer.model")
    ap.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, <prefix>.idx, <prefix>.summary.json")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    ap.add_argument("--overwrite", action="store_true", help="replace existing <prefix>.bin/.idx")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (2 with a one-line message on bad input, as
    every ``megatron-kd`` command and argparse itself)."""
    a = build_parser().parse_args(argv)
    try:
        summary = preprocess(a.input, a.output_prefix, a.tokenizer_model, a.train_tokenizer,
                             a.json_key, a.split_paragraphs, a.workers, a.overwrite,
                             a.chunk_size, progress=not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_summary(summary)
    return 0
