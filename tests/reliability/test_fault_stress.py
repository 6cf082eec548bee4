"""The toy-size CI run of benchmarks/fault_stress.py (issue 19, item 6), so the script cannot rot
unseen: one SIGKILL inside a checkpoint save, then ``--resume``; its printed summary must
report every kill survived, every resume on the newest complete checkpoint, no window lost or
consumed twice, and the uninterrupted run's final loss bit for bit. The 50-kill figures in
docs/reliability.md come from the same script (``--kills 50``)."""
from __future__ import annotations

import json
import sys

import multirank_util as mr

SCRIPT = mr.REPO / "benchmarks" / "fault_stress.py"


def test_fault_stress_one_kill_mid_save(tiny_data, tmp_path):
    p = mr.run([sys.executable, str(SCRIPT), "--kills", "1", "--steps", "6", "--seed", "0",
                "--data", str(tiny_data),
                "--workdir", str(tmp_path / "stress")])
    lines = p.stdout.splitlines()
    assert lines[-1].startswith("summary "), mr.tail(p.stdout)
    s = json.loads(lines[-1][len("summary "):])
    assert s["failure"] is None and s["kills_survived"] == 1, s
    assert s["kill_points"] == {"save": 1}, s
    assert s["resumes_checked"] == s["resumes_newest"] == 1, s
    assert (s["ids_lost"], s["ids_duplicated"], s["steps_with_other_ids"], s["redone_with_other_ids"]) == (0, 0, 0, 0), s
    assert s["redone_steps"] > 0, s  # the kills cost work that was redone
    assert s["final_loss_equal"] and s["logged_losses_differing"] == 0, s
    assert "kills survived:                      1 / 1" in p.stdout
