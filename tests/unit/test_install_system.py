"""`tools/install.sh system` (run first by `install.sh test`): the Debian packages the launcher
tests need are installed when it may (root, or passwordless sudo), otherwise it stops at once with
the one command to run. apt-get, sudo and id are stand-ins on PATH that record their calls; the
programs looked for live in a scratch directory (MKD_SYSTEM_PATH), so nothing on this machine
is installed or removed.
"""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = {"slurm-wlm": ["slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol"],
            "munge": ["munged"], "openmpi-bin": ["mpirun"]}


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def box(tmp_path):
    """(run, system dir, call log): run(uid, sudo_ok, present packages) -> CompletedProcess."""
    system, fake, calls = tmp_path / "system", tmp_path / "bin", tmp_path / "calls"
    system.mkdir(), fake.mkdir()
    # apt-get install creates the packages' programs, as the real one would
    _script(fake / "apt-get", f"""echo "apt-get $*" >> {calls}
[ "$1" = install ] || exit 0
declare -A progs=({' '.join(f'[{k}]="{" ".join(v)}"' for k, v in PROGRAMS.items())})
for a in "$@"; do for p in ${{progs[$a]}}; do printf '#!/bin/sh\\n' > {system}/$p; chmod +x {system}/$p; done; done
""")

    def run(uid: int, sudo_ok: bool, present=()):
        for pkg in present:
            for prog in PROGRAMS[pkg]:
                _script(system / prog, "")
        _script(fake / "id", f'[ "$1" = -u ] && echo {uid} || exec /usr/bin/id "$@"\n')
        _script(fake / "sudo", f"""echo "sudo $*" >> {calls}
[ "$1" = -n ] && [ "$2" = true ] && exit {0 if sudo_ok else 1}
exec "$@"
""")
        env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", MKD_SYSTEM_PATH=str(system))
        return subprocess.run(["bash", "tools/install.sh", "system"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)

    return run, system, calls


def _calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_nothing_missing_runs_no_apt(box):
    run, _, calls = box
    p = run(uid=1000, sudo_ok=False, present=PROGRAMS)
    assert p.returncode == 0, p.stderr
    assert _calls(calls) == []


def test_root_installs_only_what_is_missing(box):
    run, system, calls = box
    p = run(uid=0, sudo_ok=False, present=["slurm-wlm"])
    assert p.returncode == 0, p.stderr
    assert _calls(calls) == ["apt-get update -qq", "apt-get install -y -qq munge openmpi-bin"]
    assert (system / "munged").exists() and (system / "mpirun").exists()


def test_passwordless_sudo_installs(box):
    run, _, calls = box
    p = run(uid=1000, sudo_ok=True)
    assert p.returncode == 0, p.stderr
    assert _calls(calls) == [
        "sudo -n true", "sudo apt-get update -qq", "apt-get update -qq",
        "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge openmpi-bin",
        "apt-get install -y -qq slurm-wlm munge openmpi-bin"]


def test_no_privilege_stops_at_once_with_the_command(box):
    run, _, calls = box
    p = run(uid=1000, sudo_ok=False, present=["munge"])
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "install.sh: the Slurm/MPI tests need Debian packages (slurm-wlm openmpi-bin); "
        "run: sudo apt-get install -y slurm-wlm openmpi-bin"]
    assert _calls(calls) == ["sudo -n true"]  # asked, installed nothing
    assert not (REPO / ".venv").exists() or p.stdout == ""  # stopped before any pip work


def test_unknown_mode_is_refused():
    p = subprocess.run(["bash", "tools/install.sh", "sytem"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown mode 'sytem'" in p.stderr
