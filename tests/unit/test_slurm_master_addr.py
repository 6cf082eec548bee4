"""slurm/common.sh's mkd_setup: the first host of the node list must resolve, or the job stops at
once with one line naming it (instead of a rendezvous timeout on every node). scontrol is a
stand-in that expands the node list; getent is the real one (/etc/hosts, DNS)."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _setup(tmp_path, first_host: str, nodelist: str, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "scontrol").write_text(f'#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo {first_host} && exit 0\nexit 1\n')
    (fake / "scontrol").chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MKD_", "MASTER_"))}
    e.update(PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_JOB_NODELIST=nodelist, **env)
    return subprocess.run(["bash", "-c", 'source slurm/common.sh; mkd_setup; echo "master $MASTER_ADDR:$MASTER_PORT"'],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=30)


def test_unresolvable_first_host_is_one_line(tmp_path):
    p = _setup(tmp_path, "nosuchhost-mkd-zz9", "nosuchhost-mkd-zz[9-10]")
    assert p.returncode == 2 and "master" not in p.stdout
    lines = p.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "error: MASTER_ADDR=nosuchhost-mkd-zz9 (first host of SLURM_JOB_NODELIST=nosuchhost-mkd-zz[9-10]) " \
           "does not resolve" in lines[0] and "MKD_MASTER_ADDR" in lines[0]


def test_resolvable_first_host_and_the_override(tmp_path):
    p = _setup(tmp_path, "localhost", "localhost")
    assert p.returncode == 0 and p.stdout.strip() == "master localhost:20007", p.stderr
    p = _setup(tmp_path, "nosuchhost-mkd-zz9", "nosuchhost-mkd-zz9", MKD_MASTER_ADDR="127.0.0.1")
    assert p.returncode == 0 and p.stdout.strip() == "master 127.0.0.1:20007", p.stderr
