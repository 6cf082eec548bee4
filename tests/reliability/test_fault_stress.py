"""The toy-size CI run of benchmarks/fault_stress.py (issue 19, item 6): 2 SIGKILLs at seeded
points (one inside a checkpoint save), each followed by ``--resume``; its printed summary must
report every kill survived, every resume on the newest complete checkpoint, no window lost or
consumed twice, and the uninterrupted run's final loss bit for bit. The 50-kill figures in
docs/reliability.md come from the same script (``--kills 50``)."""
from __future__ import annotations

import json
import sys

import multirank_util as mr

SCRIPT = mr.REPO / "benchmarks" / "fault_stress.py"


def test_fault_stress_two_kills(tiny_data, tmp_path):
    p = mr.run([sys.executable, str(SCRIPT), "--kills", "2", "--seed", "0", "--data", str(tiny_data),
                "--workdir", str(tmp_path / "stress")])
    lines = p.stdout.splitlines()
    assert lines[-1].startswith("summary "), mr.tail(p.stdout)
    s = json.loads(lines[-1][len("summary "):])
    assert s["failure"] is None and s["kills_survived"] == 2, s
    assert s["kill_points"].get("save", 0) >= 1 and sum(s["kill_points"].values()) == 2, s
    assert s["resumes_checked"] == s["resumes_newest"] == 2, s
    assert (s["ids_lost"], s["ids_duplicated"], s["steps_with_other_ids"], s["redone_with_other_ids"]) == (0, 0, 0, 0), s
    assert s["redone_steps"] > 0, s  # the kills cost work that was redone
    assert s["final_loss_equal"] and s["logged_losses_differing"] == 0, s
    assert "kills survived:                      2 / 2" in p.stdout
