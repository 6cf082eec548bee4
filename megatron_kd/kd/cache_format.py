"""On-disk format of the offline teacher cache: per DP shard, a memory-mapped ``.bin`` of top-k
records and an ``.idx``, plus ``build.json`` (what is being built) and ``manifest.json`` (written
last: the cache is complete).

Layout of ``<cache>/<split>/shard-DDDDD-of-NNNNN.*`` (megatron's indexed-dataset convention: raw
``.bin`` data, an ``.idx`` with a magic header and one entry per sequence):

* ``.bin``: one packed record per token, ``seq_length`` records per window, windows in sample
  order: ``ids`` int32 [k] (global vocab ids; -1 = an unused top-p slot; int32 holds 202,048 and
  int16 does not), ``logp`` fp32 [k] (teacher ``log softmax(z / T)`` over the true vocab; -inf in
  unused slots), ``tail`` fp32 (log of the mass outside the kept ids). 8k + 4 bytes per token. fp32,
  not bf16: bf16 log-probs carry ~4e-3 relative error, 3 000x the 1e-6 the cached loss is held to
  against the live one.
* ``.idx``: header ``<9sQQQQQ`` (magic, version, k, seq_length, first window, windows), then one
  uint64 per window: a hash of the window's tokens, checked when training reads the window (a
  cache row never silently feeds another window's tokens).

Writing is resumable and never exposes a half-written shard: records go to ``.bin.tmp`` /
``.idx.tmp`` (preallocated, memory-mapped); after each batch of windows both are flushed and
``.progress`` (windows done) is replaced atomically; a finished shard is renamed to ``.bin``,
then its ``.idx`` is renamed into place. A reader needs ``manifest.json``, which rank 0 writes
after every shard is finished, and checks each shard's size against its header.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_kd.data.errors import DataError

FORMAT = 1
MAGIC = b"MKDTOPK\x00\x00"
HEADER = struct.Struct("<9sQQQQQ")  # magic, version, k, seq_length, first window, windows
BUILD, MANIFEST = "build.json", "manifest.json"


class TeacherCacheError(DataError):
    """A teacher cache that is incomplete, damaged, or built for another run (one line, exit 2)."""


def record_dtype(k: int) -> np.dtype:
    """One token's record, packed: 8k + 4 bytes."""
    return np.dtype([("ids", "<i4", (k,)), ("logp", "<f4", (k,)), ("tail", "<f4")])


def bytes_per_token(k: int) -> int:
    return record_dtype(k).itemsize


def window_hash(tokens) -> int:
    """uint64 hash of one window's token ids (int64 little-endian bytes)."""
    data = np.ascontiguousarray(np.asarray(tokens, dtype="<i8")).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, obj) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_ranges(windows: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [first, end) windows of each DP shard (sizes differ by at most one)."""
    return [(d * windows // shards, (d + 1) * windows // shards) for d in range(shards)]


def shard_stem(split_dir: Path, shard: int, shards: int) -> Path:
    return split_dir / f"shard-{shard:05d}-of-{shards:05d}"


class ShardWriter:
    """Writes one DP shard's windows ``[first, first + windows)``; resumes a killed writer."""

    def __init__(self, stem: Path, k: int, seq_length: int, first: int, windows: int):
        self.stem, self.k, self.seq, self.first, self.windows = Path(stem), k, seq_length, first, windows
        self.dtype = record_dtype(k)
        self.bin, self.idx = Path(f"{stem}.bin"), Path(f"{stem}.idx")
        self.bin_tmp, self.idx_tmp = Path(f"{stem}.bin.tmp"), Path(f"{stem}.idx.tmp")
        self.progress = Path(f"{stem}.progress")
        self.done = 0
        self._records = self._hashes = None

    def _header(self) -> bytes:
        return HEADER.pack(MAGIC, FORMAT, self.k, self.seq, self.first, self.windows)

    def finished(self) -> bool:
        """A renamed shard whose sizes match its header (a truncated one is rewritten)."""
        return (self.idx.is_file() and self.bin.is_file()
                and shard_problem(self.stem, self.k, self.seq, self.first, self.windows) is None)

    def open(self) -> int:
        """Open for writing; returns the windows already written by an earlier (killed) run."""
        self.done = 0
        progress = None
        if self.progress.is_file() and self.bin_tmp.is_file() and self.idx_tmp.is_file():
            try:
                progress = json.loads(self.progress.read_text())
            except ValueError:
                progress = None
        expect = {"k": self.k, "seq_length": self.seq, "first": self.first, "windows": self.windows}
        nbytes = self.windows * self.seq * self.dtype.itemsize
        if (progress and all(progress.get(key) == v for key, v in expect.items())
                and self.bin_tmp.stat().st_size == nbytes
                and self.idx_tmp.stat().st_size == HEADER.size + 8 * self.windows):
            self.done = int(progress["done"])
            mode = "r+"
        else:
            for p in (self.bin_tmp, self.idx_tmp, self.progress):
                p.unlink(missing_ok=True)
            with open(self.idx_tmp, "wb") as f:
                f.write(self._header())
                f.truncate(HEADER.size + 8 * self.windows)
            with open(self.bin_tmp, "wb") as f:
                f.truncate(nbytes)  # sparse until written
            mode = "r+"
        self._records = np.memmap(self.bin_tmp, dtype=self.dtype, mode=mode,
                                  shape=(self.windows * self.seq,)) if nbytes else None
        self._hashes = np.memmap(self.idx_tmp, dtype="<u8", mode=mode, offset=HEADER.size,
                                 shape=(self.windows,)) if self.windows else None
        return self.done

    def write(self, ids: np.ndarray, logp: np.ndarray, tail: np.ndarray, hashes: list[int]) -> None:
        """Windows ``done .. done + n``: ids/logp ``[n, s, k]``, tail ``[n, s]``, one hash each."""
        n = len(hashes)
        lo, hi = self.done * self.seq, (self.done + n) * self.seq
        rec = self._records[lo:hi]
        rec["ids"] = ids.reshape(-1, self.k)
        rec["logp"] = logp.reshape(-1, self.k)
        rec["tail"] = tail.reshape(-1)
        self._hashes[self.done:self.done + n] = np.asarray(hashes, dtype="<u8")
        self.done += n
        self.commit()

    def commit(self) -> None:
        """Records and hashes on disk first, then the count that says they are there."""
        for m in (self._records, self._hashes):
            if m is not None:
                m.flush()
        atomic_write_json(self.progress, {"k": self.k, "seq_length": self.seq, "first": self.first,
                                          "windows": self.windows, "done": self.done})

    def close(self) -> None:
        """All windows written: rename the data, then the index (the shard's completion mark)."""
        assert self.done == self.windows, (self.done, self.windows)
        self._records = self._hashes = None
        os.replace(self.bin_tmp, self.bin)
        os.replace(self.idx_tmp, self.idx)
        self.progress.unlink(missing_ok=True)


def shard_problem(stem: Path, k: int, seq: int, first: int, windows: int) -> Optional[str]:
    """None if the shard's .idx header and both sizes are what the manifest says, else why not."""
    idx, bin_ = Path(f"{stem}.idx"), Path(f"{stem}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            return f"{p} is missing"
    with open(idx, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:9] != MAGIC:
        return f"{idx} is not a teacher-cache index (bad or short header)"
    _, version, hk, hseq, hfirst, hwin = HEADER.unpack(head)
    if (version, hk, hseq, hfirst, hwin) != (FORMAT, k, seq, first, windows):
        return (f"{idx} header says version {version}, k={hk}, seq_length={hseq}, windows "
                f"{hfirst}..{hfirst + hwin}; the manifest says version {FORMAT}, k={k}, "
                f"seq_length={seq}, windows {first}..{first + windows}")
    want_idx = HEADER.size + 8 * windows
    if idx.stat().st_size != want_idx:
        return f"{idx} is {idx.stat().st_size} bytes, expected {want_idx} (truncated or damaged)"
    want_bin = windows * seq * bytes_per_token(k)
    if bin_.stat().st_size != want_bin:
        return (f"{bin_} is {bin_.stat().st_size} bytes, expected {want_bin} ({windows} windows x "
                f"{seq} tokens x {bytes_per_token(k)} bytes; truncated or damaged)")
    return None


class TeacherCache:
    """Read side: ``manifest.json`` + every shard checked on open, then memory-mapped."""

    def __init__(self, path):
        self.path = Path(path)
        man = self.path / MANIFEST
        if not man.is_file():
            hint = (f"incomplete (it has {BUILD} but no {MANIFEST}): rerun the same megatron-kd "
                    "cache-teacher command to finish it" if (self.path / BUILD).is_file()
                    else "not a teacher cache (no manifest.json; build one with megatron-kd cache-teacher)")
            raise TeacherCacheError(f"kd.teacher_cache {self.path}: {hint}")
        try:
            self.manifest = json.loads(man.read_text())
        except ValueError as e:
            raise TeacherCacheError(f"kd.teacher_cache {self.path}: {man} is not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"kd.teacher_cache {self.path}: format {self.manifest.get('format')}, "
                                    f"expected {FORMAT}")
        self.k = int(self.manifest["top_k"])
        self.seq = int(self.manifest["data"]["seq_length"])
        self.dtype = record_dtype(self.k)
        self._shards: dict = {}
        for split, info in self.manifest["splits"].items():
            shards = []
            for sh in info["shards"]:
                stem = self.path / split / sh["stem"]
                why = shard_problem(stem, self.k, self.seq, sh["first"], sh["windows"])
                if why:
                    raise TeacherCacheError(f"kd.teacher_cache {self.path}: {why}; rebuild it with "
                                            "megatron-kd cache-teacher (same arguments, --overwrite)")
                rec = (np.memmap(f"{stem}.bin", dtype=self.dtype, mode="r",
                                 shape=(sh["windows"] * self.seq,)) if sh["windows"] else None)
                hashes = np.fromfile(f"{stem}.idx", dtype="<u8", count=sh["windows"], offset=HEADER.size)
                shards.append((sh["first"], sh["windows"], rec, hashes))
            self._shards[split] = shards

    def windows(self, split: str) -> int:
        return int(self.manifest["splits"][split]["windows"]) if split in self._shards else 0

    def has(self, split: str) -> bool:
        return split in self._shards

    def window(self, split: str, i: int):
        """(ids [s, k] int32, logp [s, k] fp32, tail [s] fp32, token hash) of window ``i``."""
        for first, n, rec, hashes in self._shards[split]:
            if first <= i < first + n:
                r = rec[(i - first) * self.seq:(i - first + 1) * self.seq]
                return r["ids"], r["logp"], r["tail"], int(hashes[i - first])
        raise TeacherCacheError(f"kd.teacher_cache {self.path}: window {i} of split {split} is not "
                                f"cached (it holds {self.windows(split)})")
