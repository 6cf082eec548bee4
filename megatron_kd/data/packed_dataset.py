"""Packed windows of ``seq_length`` tokens from a ``<prefix>.bin/.idx`` IndexedDataset.

megatron-core's GPTDataset builds the document / sample / shuffle indices (train/valid/test from
``split``, deterministic from the seed, cached as .npy under ``cache_dir``). We ask it for the raw
window only (no masks, global positions) and derive documents, positions and the loss mask with
:mod:`megatron_kd.data.packing`, so every module agrees on where documents start.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_kd.data.errors import DataError
from megatron_kd.data.packing import (document_ids_from_tokens, loss_mask_from_tokens,
                                      position_ids_from_document_ids)
from megatron_kd.data.tokenizer import Tokenizer, load_tokenizer

SPLIT_NAMES = ("train", "valid", "test")
_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset _INDEX_HEADER


class MegatronTokenizerAdapter:
    """What GPTDataset reads of a tokenizer: ``eod``/``eos``, ``vocab_size`` and
    ``unique_identifiers`` (json-dumped into the index-cache hash). No ``pad`` attribute: GPTDataset
    then pads with -1, an id that cannot collide with real tokens.

    GPTDataset's cache key includes the data *path*, not its content; ``data_fingerprint`` (a hash
    of the .idx, i.e. of the document lengths the indices depend on) makes a re-preprocessed corpus
    at the same path miss a stale cache instead of silently reading wrong windows.
    """

    def __init__(self, tokenizer: Tokenizer, data_fingerprint: str):
        self.eod = self.eos = tokenizer.eos_id
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = {"class": type(tokenizer).__name__, "vocab_size": self.vocab_size,
                                   "eod": self.eod, "data_fingerprint": data_fingerprint}


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed windows; every value has shape ``[seq_length]``:
    ``tokens``/``labels`` (next token) int64, ``loss_mask`` float32, ``document_ids`` and
    ``position_ids`` int64. Index order is GPTDataset's (already shuffled)."""

    def __init__(self, gpt_dataset, eos_id: int, reset_position_ids: bool, eod_mask_loss: bool):
        self.gpt_dataset = gpt_dataset
        self.eos_id = eos_id
        self.reset_position_ids = reset_position_ids
        self.eod_mask_loss = eod_mask_loss

    @property
    def indexed_dataset(self):
        return self.gpt_dataset.dataset

    def __len__(self) -> int:
        return len(self.gpt_dataset)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        sample = self.gpt_dataset[int(idx)]  # window of seq+1 tokens, split into tokens/labels
        tokens, labels = sample["tokens"], sample["labels"]  # [s] int64
        document_ids = document_ids_from_tokens(tokens, self.eos_id)  # [s]
        return {
            "tokens": tokens,
            "labels": labels,
            # GPTDataset's loss_mask is 0 only on padding (none in train windows)
            "loss_mask": loss_mask_from_tokens(tokens, self.eos_id, self.eod_mask_loss) * sample["loss_mask"],
            "document_ids": document_ids,
            "position_ids": position_ids_from_document_ids(document_ids, self.reset_position_ids),
        }


def _fingerprint(idx_path: str) -> str:
    h = hashlib.sha1()
    with open(idx_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_tokenizer_matches(prefix: str, tokenizer: Tokenizer) -> None:
    """preprocess writes <prefix>.summary.json; a different tokenizer would decode garbage."""
    path = f"{prefix}.summary.json"
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            s = json.load(f)
    except ValueError as e:
        raise DataError(f"data.data_path {prefix}: {path} is not preprocess's JSON summary ({e}); "
                        f"{_rebuild_hint(prefix)}") from None
    if not isinstance(s, dict):
        raise DataError(f"data.data_path {prefix}: {path} is not preprocess's JSON summary (a "
                        f"{type(s).__name__}); {_rebuild_hint(prefix)}")
    if (s.get("vocab_size"), s.get("eos_id")) != (tokenizer.vocab_size, tokenizer.eos_id):
        raise DataError(
            f"data.tokenizer_model {tokenizer.path}: vocab_size={tokenizer.vocab_size}, eos_id={tokenizer.eos_id}, "
            f"but {prefix} was tokenized with vocab_size={s.get('vocab_size')}, eos_id={s.get('eos_id')} ({s.get('tokenizer')})")


# megatron.core.datasets.indexed_dataset.DType codes -> bytes per token
_DTYPE_WIDTH = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}
# _IndexWriter's header: magic, version <Q, dtype code <B, sequence count <Q, document count <Q
_IDX_HEADER = struct.Struct("<9sQBQQ")  # 34 bytes


def _rebuild_hint(prefix: str) -> str:
    """The command that rewrites <prefix>.bin/.idx: exact when preprocess's summary.json names its
    inputs and tokenizer, else with placeholders."""
    inputs, tok = "<corpus.jsonl>", "<tokenizer.model>"
    try:
        with open(f"{prefix}.summary.json") as f:
            s = json.load(f)
        inputs, tok = " ".join(s["inputs"]) or inputs, s["tokenizer"] or tok
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (f"rebuild with: megatron-kd preprocess --input {inputs} --tokenizer-model {tok} "
            f"--output-prefix {prefix} --overwrite")


def read_index(prefix: str) -> np.ndarray:
    """Document lengths (tokens, int32 [sequences]) of ``<prefix>.idx``, after checking that the
    .idx holds exactly what its header promises and the .bin exactly what the .idx promises.

    Read here rather than through megatron's IndexedDataset: a truncated .bin passes its
    constructor and fails in the first training step (a raw ValueError, after the run directory
    exists), and a short .idx fails inside it and then again in its ``__del__`` (a second
    traceback). Raises DataError (one line: the file, expected vs actual bytes, the fix).
    """
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    fix = _rebuild_hint(prefix)
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if head[:len(_IDX_MAGIC)] != _IDX_MAGIC:
        raise DataError(f"data.data_path {prefix}: {idx} is not a megatron indexed dataset index "
                        f"(bad header {head[:9]!r}); {fix}")
    if len(head) < _IDX_HEADER.size:
        raise DataError(f"data.data_path {prefix}: {idx} is {idx_size} bytes, shorter than its "
                        f"{_IDX_HEADER.size}-byte header (truncated); {fix}")
    _, version, code, sequences, documents = _IDX_HEADER.unpack(head)
    if version != 1:
        raise DataError(f"data.data_path {prefix}: {idx} has index version {version}, expected 1; {fix}")
    if code not in _DTYPE_WIDTH:
        raise DataError(f"data.data_path {prefix}: {idx} has unknown token dtype code {code} "
                        f"(expected one of {sorted(_DTYPE_WIDTH)}); {fix}")
    # int32 lengths, int64 pointers (byte offsets into the .bin), int64 document indices
    expected_idx = _IDX_HEADER.size + sequences * (4 + 8) + documents * 8
    if idx_size != expected_idx:
        raise DataError(f"data.data_path {prefix}: {idx} is {idx_size} bytes but its header promises "
                        f"{expected_idx} ({sequences} sequences, {documents} document indices); {fix}")
    if sequences == 0:
        raise DataError(f"data.data_path {prefix}: {idx} holds no documents; {fix}")
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=_IDX_HEADER.size)
    last_pointer = int(np.fromfile(idx, dtype=np.int64, count=1,
                                   offset=_IDX_HEADER.size + 4 * sequences + 8 * (sequences - 1))[0])
    width = _DTYPE_WIDTH[code]
    expected_bin = int(lengths.sum(dtype=np.int64)) * width
    if (lengths < 0).any() or last_pointer + int(lengths[-1]) * width != expected_bin:
        raise DataError(f"data.data_path {prefix}: {idx} is inconsistent (its document lengths add up "
                        f"to {expected_bin} bytes, its last pointer to {last_pointer + int(lengths[-1]) * width}); {fix}")
    if bin_size != expected_bin:
        raise DataError(f"data.data_path {prefix}: {bin_} is {bin_size} bytes but {idx} promises "
                        f"{expected_bin} ({sequences} documents x {width}-byte tokens); {fix}")
    return lengths


def check_data(cfg, tokenizer: Optional[Tokenizer] = None):
    """Validate data.data_path / data.tokenizer_model / data.split before any run state is
    written; returns ``(prefix, tokenizer, split bounds)``. Raises DataError (one line)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    if not cfg.data_path:
        raise DataError("data.data_path: required (the <prefix> of <prefix>.bin/.idx written by preprocess)")
    prefix = str(cfg.data_path)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"data.data_path {prefix}: {prefix + ext} not found (run megatron-kd preprocess)")
    if tokenizer is None:
        if not cfg.tokenizer_model:
            raise DataError("data.tokenizer_model: required to find the EOS id of the packed documents")
        tokenizer = load_tokenizer(cfg.tokenizer_model)
    _check_tokenizer_matches(prefix, tokenizer)
    lengths = read_index(prefix)

    # Each split with weight > 0 must hold at least one window, else GPTDataset loops forever.
    seq = int(cfg.seq_length)
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    for name, b in zip(SPLIT_NAMES, bounds):
        if b is None:
            continue
        beg, end = int(round(b[0] * len(lengths))), int(round(b[1] * len(lengths)))
        tokens = int(lengths[beg:end].sum())
        if tokens < seq + 1:
            raise DataError(
                f"data.split={cfg.split!r}: the {name} split of {prefix} gets {end - beg} documents, "
                f"{tokens} tokens; data.seq_length={seq} needs at least {seq + 1} (more data or another split)")
    return prefix, tokenizer, bounds


def build_packed_datasets(cfg, tokenizer: Optional[Tokenizer] = None, *,
                          cache_dir: Optional[str] = None,
                          num_samples: Sequence[Optional[int]] = (None, None, None),
                          ) -> List[Optional[PackedDataset]]:
    """``[train, valid, test]`` PackedDatasets (None where the split weight is 0).

    ``cfg``: a :class:`megatron_kd.config.DataConfig` (data_path, tokenizer_model, seq_length,
    reset_position_ids, eod_mask_loss, split, seed). ``cache_dir``: where the index .npy files go
    (pass ``<run_dir>/data_cache``); default ``<data_path>_cache`` next to the data.
    ``num_samples[i]``: windows wanted from split i; None = one epoch. Asking for more than an
    epoch makes GPTDataset add freshly shuffled epochs. Works with or without torch.distributed
    (when initialised, rank 0 builds the cache first; every rank must call this).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3:
        raise DataError(f"num_samples: expected 3 entries (train, valid, test), got {len(num_samples)}")
    prefix, tokenizer, bounds = check_data(cfg, tokenizer)
    seq = int(cfg.seq_length)

    config = GPTDatasetConfig(
        random_seed=int(cfg.seed),
        sequence_length=seq,
        blend=([prefix], None),
        split=cfg.split,
        path_to_cache=cache_dir or f"{prefix}_cache",
        tokenizer=MegatronTokenizerAdapter(tokenizer, _fingerprint(prefix + ".idx")),
        # masks and positions are ours (packing.py); GPTDataset only cuts windows
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [n if b is not None else None for n, b in zip(num_samples, bounds)]
    gpt = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return [None if d is None else PackedDataset(d, tokenizer.eos_id, bool(cfg.reset_position_ids),
                                                 bool(cfg.eod_mask_loss)) for d in gpt]
