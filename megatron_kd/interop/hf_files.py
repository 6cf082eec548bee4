"""Reading and writing HF checkpoint directories one tensor at a time.

safetensors files are memory-mapped; ``safe_open(...).get_slice`` reads one tensor (or one
expert of a stacked tensor) without touching the rest, so conversion holds at most the model it
builds plus the tensor in hand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from megatron_kd.training.checkpointing import CheckpointError
from megatron_kd.data.errors import DataError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: config.json not found (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


class ShardReader:
    """name -> tensor over ``model.safetensors`` or an indexed set of shards."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE).is_file():
            with safe_open(self.dir / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX} nor {SINGLE} found (only safetensors "
                                  "checkpoints are read)")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir}: shard {missing[0]} listed in {INDEX} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.weight_map = weight_map
        self._open = {f: safe_open(self.dir / f, "pt") for f in sorted(set(weight_map.values()))}
        self.bytes_read = 0

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._open[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str, index: int = -1) -> torch.Tensor:
        """The tensor, or its ``index``-th slice along dim 0 (one expert)."""
        f = self._open[self.weight_map[name]]
        t = f.get_tensor(name) if index < 0 else f.get_slice(name)[index]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def total_bytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in self._open)


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_bytes``
    as they arrive, then the index (names fixed up once the shard count is known)."""

    def __init__(self, out_dir: Path, max_bytes: int = 2 << 30):
        self.dir, self.max_bytes = Path(out_dir), max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list = []
        self.weight_map: Dict[str, int] = {}
        self.bytes_written = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self.files)
        tmp = self.dir / f"shard-{k:05d}.tmp"
        save_file(self.pending, str(tmp), metadata={"format": "pt"})
        self.files.append(tmp)
        for name in self.pending:
            self.weight_map[name] = k
        self.bytes_written += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            self.files[0].rename(self.dir / SINGLE)
            return
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for tmp, name in zip(self.files, names):
            tmp.rename(self.dir / name)
        index = {"metadata": {"total_size": self.bytes_written},
                 "weight_map": {k: names[v] for k, v in sorted(self.weight_map.items())}}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))


def tokenizer_file(hf_dir: Path) -> Path:
    """The tokenizer our data pipeline reads (tokenizer.json preferred over tokenizer.model)."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(hf_dir) / name).is_file():
            return Path(hf_dir) / name
    raise DataError(f"{hf_dir}: no tokenizer.json or tokenizer.model; the tokenizer travels with the "
                    "checkpoint (pass --tokenizer to name one elsewhere)")


def copy_tokenizer(src_dir: Path, dst_dir: Path, main: Optional[Path] = None) -> Path:
    """Copy the tokenizer files that exist; return the path of the main one in dst_dir."""
    main = Path(main) if main is not None else tokenizer_file(src_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, dst_dir / name)
    if not (dst_dir / main.name).is_file():
        shutil.copy2(main, dst_dir / main.name)
    return dst_dir / main.name
