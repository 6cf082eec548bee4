"""The watchdog still ends a rank and its helpers when its stderr is a broken pipe.

On a lost node the launcher that reads the rank's output (slurmstepd) dies with the launcher's
other processes: the watchdog's log line then raised BrokenPipeError and ended the watchdog
before it killed anything, so the rank's helpers outlived it (seen in tests/slurm/
test_multinode.py: the checkpoint writer's spawn child and resource tracker, parent pid 1).
Here: launcher (bash) -> rank (python) -> {watchdog with stderr on a pipe nobody reads, helper};
the launcher is SIGKILLed, and the rank and its helper must be gone within seconds.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import megatron_kd.watchdog as watchdog

RANK = textwrap.dedent("""
    import os, subprocess, sys, time
    r, w = os.pipe()
    os.close(r)  # stderr of the watchdog: a pipe whose reader is gone
    beat_r, beat_w = os.pipe()
    subprocess.Popen([sys.executable, "-S", sys.argv[1], "0", str(os.getpid()), str(os.getppid()),
                      str(beat_r), "600"], pass_fds=(beat_r,), stderr=w)
    helper = subprocess.Popen(["sleep", "300"])
    print(helper.pid, flush=True)
    while True:
        os.write(beat_w, b".")
        time.sleep(0.2)
""")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_watchdog_kills_rank_and_helpers_with_a_broken_stderr(tmp_path):
    (tmp_path / "rank.py").write_text(RANK)
    launcher = subprocess.Popen(["bash", "-c", f'"{sys.executable}" rank.py "{watchdog.__file__}"; :'],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True)
    helper = int(launcher.stdout.readline())
    rank = int(Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()[1])
    time.sleep(1.5)  # the watchdog has scanned the rank's descendants (every second)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while (_alive(rank) or _alive(helper)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in (rank, helper) if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"outlived the launcher: {left} (rank {rank}, helper {helper})"
