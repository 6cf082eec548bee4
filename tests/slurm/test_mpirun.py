"""`mpirun -np 2` (Debian's OpenMPI 4) around the same entry point as srun and torchrun.

No launcher-specific code in the command: megatron_kd/distributed.py sees OMPI_COMM_WORLD_RANK,
takes rank/world from mpi4py's COMM_WORLD and broadcasts rank 0's address and a free port, then
torch.distributed starts (gloo). TP=2 on 2 ranks only runs if the ranks really formed one world.
"""
from __future__ import annotations

import math
import shutil

import pytest

from conftest import LAYOUT, RTOL, STEPS, child_env, curve, run, train_cmd


def test_mpirun_matches_single_process(kd_recipe, reference, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.fail("mpirun not found: apt-get install -y openmpi-bin (`bash tools/install.sh test` installs it)", pytrace=False)
    import mpi4py  # noqa: F401  (installed by tools/install.sh test; a missing one fails here)

    env = child_env(
        # root in CI containers; harmless otherwise
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        # containers forbid cross-memory attach; 1-core runners have fewer slots than ranks
        OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    exported = [a for k in ("PYTHONPATH", "OMP_NUM_THREADS", "MEGATRON_KD_FORCE_CPU", "PYTHONWARNINGS")
                for a in ("-x", k)]
    run([mpirun, "-np", "2", "--bind-to", "none", *exported,
         *train_cmd(kd_recipe, tmp_path / "run", *LAYOUT)], env=env)
    rows = curve(tmp_path / "run")
    assert [it for it, _ in rows] == list(range(1, STEPS + 1)), rows
    for it, v in rows:
        assert math.isclose(v, reference[it], rel_tol=RTOL), (it, v, reference[it])
