"""Is a checkpoint directory complete? Manifests, the checks behind resume fallback and keep_last,
and ``megatron-kd checkpoint verify``.

A checkpoint's files are listed with their sizes (and, with ``checkpoint.verify``, their sha256) in
``mkd_manifest.json``, written into ``iter_XXXXXXX.tmp`` after every rank has finished writing and
before the rename (checkpointing.save_checkpoint). The rename alone only protects against a kill
*during* the save; a shard deleted, truncated or bit-flipped afterwards (a full disk, a partial
copy between clusters, a storage fault) used to surface as a traceback inside megatron-core on
resume. *Complete* means: the manifest exists and every file it lists exists with the recorded
size (and, when checksums are asked for, the recorded sha256); ``metadata.json`` parses and
``common.pt`` unpickles (both are small; a garbage ``common.pt`` otherwise fails deep inside
megatron with an unrelated AttributeError).

Checkpoints written before manifests existed (and any checkpoint whose manifest was deleted: the
two cannot be told apart) count as complete when megatron-core's own files are there
(``metadata.json``, ``common.pt``, ``.metadata``) and readable; a missing shard file in such a
checkpoint is only found by the load.

Nothing here imports torch at module level: ``checkpoint verify`` lists a run in about a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

MANIFEST = "mkd_manifest.json"
MEGATRON_FILES = ("metadata.json", "common.pt", ".metadata")
_ITER = re.compile(r"^iter_(\d{7})$")
_HASH_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or unusable (cli.py: one line, exit 2)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(ckpt: Path) -> list[str]:
    """Every file under ckpt (relative, sorted), the manifest itself left out."""
    out = []
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def file_records(ckpt: Path, names: list[str], checksums: bool, part=(0, 1)) -> dict:
    """{name: {"size": n[, "sha256": hex]}}; only names[rank::world] are hashed, so the ranks of a
    job share the reading (checkpointing.py gathers the parts)."""
    rank, world = part
    mine = set(names[rank::world]) if checksums else set()
    records = {}
    for name in names:
        rec = {"size": (ckpt / name).stat().st_size}
        if name in mine:
            rec["sha256"] = sha256(ckpt / name)
        records[name] = rec
    return records


def write_manifest(ckpt: Path, iteration: int, records: dict) -> None:
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "iteration": iteration, "files": records}, indent=1) + "\n")
    os.replace(tmp, ckpt / MANIFEST)


def read_manifest(ckpt: Path) -> Optional[dict]:
    """The manifest's file records; None when there is no manifest (an older checkpoint)."""
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(r.get("size"), int) for r in files.values()):
            raise ValueError("a file without a size")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    return files


def problem(ckpt, checksums: bool = False, part=(0, 1)) -> Optional[str]:
    """Why ckpt is not a complete checkpoint (one short phrase naming the file), or None.

    ``checksums``: also compare the recorded sha256 of names[rank::world] (``part``), where
    recorded. Every size is checked by every caller (a stat per file).
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "directory missing"
    try:
        files = read_manifest(ckpt)
    except CheckpointError:
        return f"{MANIFEST} unreadable"
    if files is None:
        missing = [f for f in MEGATRON_FILES if not (ckpt / f).is_file()]
        if missing:
            return f"{missing[0]} missing (no {MANIFEST})"
    else:
        for name in sorted(files):
            path = ckpt / name
            if not path.is_file():
                return f"{name} missing"
            size, recorded = path.stat().st_size, files[name]["size"]
            if size != recorded:
                return f"{name} has {size} bytes, the manifest records {recorded}"
        if checksums:
            rank, world = part
            names = [n for n in sorted(files) if "sha256" in files[n]]
            for name in names[rank::world]:
                if sha256(ckpt / name) != files[name]["sha256"]:
                    return f"{name} fails its sha256 checksum"
    return _unreadable(ckpt)


def first_problem(problems: Iterable[Optional[str]]) -> Optional[str]:
    """The lowest rank's problem, when each rank checked a share of the files."""
    return next((p for p in problems if p), None)


def _unreadable(ckpt: Path) -> Optional[str]:
    """metadata.json must parse and common.pt unpickle (megatron reads both first, and reports a
    garbage common.pt as an unrelated AttributeError)."""
    try:
        json.loads((ckpt / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        return f"metadata.json unreadable ({type(e).__name__})"
    import torch

    try:
        torch.load(ckpt / "common.pt", map_location="cpu")
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means the file is damaged
        return f"common.pt unreadable ({type(e).__name__})"
    return None


def iteration_dirs(root) -> list[tuple[int, Path]]:
    """(iteration, path) of every ``iter_XXXXXXX`` directory under root, newest first (``.tmp``
    saves in progress and set-aside ``.damaged`` copies are not checkpoints)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def looks_like_checkpoint(p: Path) -> bool:
    """p is meant as one checkpoint (named iter_*, or holding any of its files), damaged or not."""
    return bool(_ITER.match(p.name)) or any((p / f).is_file() for f in (MANIFEST, *MEGATRON_FILES))


# ----------------------------------------------------------------- megatron-kd checkpoint verify
@dataclass
class Entry:
    iteration: int
    path: Path
    problem: Optional[str]
    note: str = ""  # how it was checked


def _describe(ckpt: Path, checksums: bool) -> Entry:
    m = _ITER.match(ckpt.name)
    files = None
    try:
        files = read_manifest(ckpt)
    except CheckpointError:
        pass
    if files is None:
        note = f"no {MANIFEST} (older checkpoint): megatron's files only"
    elif checksums and any("sha256" in r for r in files.values()):
        note = f"{len(files)} files, sizes and sha256"
    else:
        note = f"{len(files)} files, sizes" + (" (no checksums recorded)" if checksums else "")
    return Entry(int(m.group(1)) if m else -1, ckpt, problem(ckpt, checksums), note)


def checkpoints_under(path) -> tuple[Path, list[Path]]:
    """RUN_DIR, its checkpoints/ dir, or one iter_* dir -> (what is listed, its iter dirs)."""
    p = Path(path)
    if looks_like_checkpoint(p):
        return p, [p]
    for root in (p / "checkpoints", p):
        dirs = iteration_dirs(root)
        if dirs or (root / "latest_checkpointed_iteration.txt").is_file():
            return root, [d for _, d in dirs]
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory")
    raise CheckpointError(f"{p}: no checkpoints (expected a run dir, its checkpoints/ folder, or an "
                          "iter_* folder)")


def verify_main(path, checksums: bool = False, out=print) -> int:
    """List every checkpoint under path, complete or damaged (and why), and the one ``--resume``
    would pick. Exit status: 0 the newest is complete, 1 resume would fall back to an older one,
    2 none is complete."""
    root, dirs = checkpoints_under(path)
    entries = [_describe(d, checksums) for d in dirs]
    pick = next((e for e in entries if e.problem is None), None)
    out(f"{root}:")
    for e in entries:
        state = "complete" if e.problem is None else f"DAMAGED: {e.problem}"
        mark = "   <- resume loads this" if e is pick else ""
        out(f"  {e.path.name}  {state}  [{e.note}]{mark}")
    for tmp in sorted(root.glob("iter_*.tmp")) + sorted(root.glob("iter_*.damaged*")):
        what = "unfinished save (replaced by the next save of that iteration)" if tmp.suffix == ".tmp" \
            else "damaged checkpoint set aside by a later save"
        out(f"  {tmp.name}  ignored: {what}")
    if not entries:
        out("  no checkpoints")
    if pick is None:
        out("no complete checkpoint: --resume cannot continue this run" if entries else
            "no complete checkpoint")
        return 2
    if pick is not entries[0]:
        out(f"--resume falls back from iteration {entries[0].iteration} to {pick.iteration} "
            "(the damaged newer ones are left in place)")
        return 1
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("checkpoint", help="checkpoint tools: `checkpoint verify RUN_DIR` lists each "
                                          "checkpoint, complete or damaged, and which one --resume loads")
    csub = c.add_subparsers(dest="checkpoint_command", required=True)
    v = csub.add_parser("verify", help="list checkpoints, complete / damaged (+ the file), the one --resume "
                                       "loads; exit 0 newest complete, 1 resume falls back, 2 none complete")
    v.add_argument("run_dir", metavar="RUN_DIR",
                   help="run directory, its checkpoints/ folder, or one iter_* folder")
    v.add_argument("--checksums", action="store_true",
                   help="also check sha256 where the manifest records them (checkpoint.verify: true)")


def run(args) -> int:
    return verify_main(args.run_dir, checksums=args.checksums)

