"""Reading worker.py's ``MKD_TEST_RECORD_IDS`` files: which training windows each step consumed.

Each rank appends one line per finished step, across every attempt of a run (killed ones and the
resumes), so an iteration that was redone after a kill appears more than once; the last line of
an iteration is the attempt that counted (the run resumed from a checkpoint before the earlier
ones). Shared by tests/reliability/test_exactly_once.py and benchmarks/fault_stress.py.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def read(record_dir) -> dict[int, list[tuple[int, list[int]]]]:
    """rank -> [(iteration, window ids), ...] in the order written (every attempt).

    A line cut short by a kill (possible only mid-``write``) is dropped: its step never counted.
    """
    out: dict[int, list] = {}
    for path in sorted(Path(record_dir).glob("ids.*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(r["rank"], []).append((r["iteration"], r["ids"]))
    return out


def counted(records) -> dict[int, dict[int, list[int]]]:
    """rank -> {iteration: ids of the last attempt of that iteration}."""
    return {rank: dict(rows) for rank, rows in records.items()}


def compare(records, reference, iterations: int) -> dict:
    """The run's consumed windows against an uninterrupted run's (both from :func:`read`).

    ``lost`` / ``duplicated``: window ids the reference consumed in iterations 1..N that the run
    (its counted attempts) consumed fewer / more times; ``wrong_steps``: (rank, iteration) whose
    counted ids differ from the reference's (order included); ``redo_differs``: (rank, iteration)
    where an earlier, killed attempt read other ids than the counted one; ``redone``: attempts
    beyond the first, summed over ranks.
    """
    got, ref = counted(records), counted(reference)
    lost, duplicated, wrong, redo_differs, redone = Counter(), Counter(), [], [], 0
    for rank in sorted(set(ref) | set(got)):
        g, r = got.get(rank, {}), ref.get(rank, {})
        want = Counter(i for it in range(1, iterations + 1) for i in r.get(it, []))
        have = Counter(i for it in range(1, iterations + 1) for i in g.get(it, []))
        lost += want - have
        duplicated += have - want
        wrong += [(rank, it) for it in range(1, iterations + 1) if g.get(it) != r.get(it)]
        for it, ids in records.get(rank, []):
            if it in g and ids != g[it]:
                redo_differs.append((rank, it))
        redone += len(records.get(rank, [])) - len(g)
    return {"lost": sum(lost.values()), "duplicated": sum(duplicated.values()), "wrong_steps": wrong,
            "redo_differs": sorted(set(redo_differs)), "redone": redone}
