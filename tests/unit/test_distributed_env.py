"""distributed.discover: rank/world/master from torchrun, Slurm (srun), MPI, or a lone process.

Pure functions of an env dict: no process group is started here.
"""
import pytest

from megatron_kd import distributed
from megatron_kd.distributed import RankInfo, discover, first_host

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
            "MASTER_PORT": "29611", "LOCAL_WORLD_SIZE": "2"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "gpu[003-005,009]", "SLURM_JOB_ID": "123456"}


def test_torchrun():
    assert discover(TORCHRUN) == RankInfo(3, 8, 1, "node7", 29611, "torchrun")


def test_torchrun_defaults():
    info = discover({"RANK": "0", "WORLD_SIZE": "1"})
    assert (info.local_rank, info.master_addr, info.master_port, info.launcher) == (0, "127.0.0.1", 29500, "torchrun")


def test_torchrun_inside_srun_wins():
    # `srun torchrun ...`: torchrun's per-worker RANK is the truth, not the Slurm task id
    info = discover({**SLURM, **TORCHRUN})
    assert info.launcher == "torchrun" and (info.rank, info.world_size) == (3, 8)


def test_slurm():
    info = discover(SLURM)
    assert (info.rank, info.world_size, info.local_rank) == (5, 16, 1)
    assert info.master_addr == "gpu003" and info.launcher == "slurm"


def test_slurm_port_from_job_id_is_stable_and_in_range():
    ports = {discover(SLURM).master_port for _ in range(3)}
    assert len(ports) == 1
    port = ports.pop()
    assert 20000 <= port < 40000 and port == 20000 + 123456 % 20000
    # every task of the job agrees on it (it does not depend on the task's own ids)
    other_task = {**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert discover(other_task).master_port == port
    # another job on the same node gets another port
    assert discover({**SLURM, "SLURM_JOB_ID": "123457"}).master_port != port


def test_slurm_port_comes_from_the_given_env_not_os_environ(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    assert discover(SLURM).master_port == 20000 + 123456 % 20000


@pytest.mark.parametrize("job_id", ["0", "19999", "20000", "4294967295"])
def test_slurm_port_range(job_id):
    assert 20000 <= discover({**SLURM, "SLURM_JOB_ID": job_id}).master_port < 40000


def test_slurm_without_job_id_uses_default_port():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}
    assert discover(env).master_port == 29500


def test_slurm_master_overrides():
    info = discover({**SLURM, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"})
    assert (info.master_addr, info.master_port) == ("10.1.2.3", 31000)


@pytest.mark.parametrize("nodes,master", [
    ({"SLURM_JOB_NODELIST": "node1,node2"}, "node1"),
    ({"SLURM_JOB_NODELIST": "single-host"}, "single-host"),
    ({"SLURM_NODELIST": "cn[10-11]"}, "cn10"),  # older variable name
    ({}, "127.0.0.1"),
])
def test_slurm_master_from_nodelist(nodes, master):
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert discover({**env, **nodes}).master_addr == master


def test_slurm_localid_defaults_to_zero():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}
    assert discover(env).local_rank == 0


def test_single_process():
    info = discover({})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == \
        (0, 1, 0, "127.0.0.1", "single")
    assert 0 < info.master_port < 65536
    assert discover({"MASTER_PORT": "12345"}).master_port == 12345


def test_partial_torchrun_env_is_not_torchrun():
    assert discover({"RANK": "1"}).launcher == "single"


def test_reads_os_environ_by_default(monkeypatch):
    for k in list(TORCHRUN) + list(SLURM):
        monkeypatch.delenv(k, raising=False)
    for k, v in TORCHRUN.items():
        monkeypatch.setenv(k, v)
    assert discover() == RankInfo(3, 8, 1, "node7", 29611, "torchrun")


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"])
def test_mpi_branch(monkeypatch, var):
    seen = {}

    def fake(env):
        seen.update(env)
        return RankInfo(2, 4, 0, "mpi-host", 1234, "mpi")

    monkeypatch.setattr(distributed, "_discover_mpi", fake)
    info = discover({var: "2", "OMPI_COMM_WORLD_SIZE": "4"})
    assert info.launcher == "mpi" and seen[var] == "2"


def test_slurm_wins_over_mpi_env(monkeypatch):
    # srun --mpi=pmix sets both; Slurm's ids need no mpi4py
    monkeypatch.setattr(distributed, "_discover_mpi", lambda env: pytest.fail("mpi branch taken"))
    assert discover({**SLURM, "PMIX_RANK": "5"}).launcher == "slurm"


def test_mpi_without_mpi4py_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(RuntimeError, match="mpi4py"):
        discover({"OMPI_COMM_WORLD_RANK": "0"})


# ----------------------------------------------------------------------------- first_host


@pytest.mark.parametrize("nodelist,host", [
    ("gpu[003-005,009]", "gpu003"),
    ("gpu[003-005,009],cpu1", "gpu003"),
    ("gpu[009,003-005]", "gpu009"),  # Slurm's order, not the smallest
    ("node1,node2", "node1"),
    ("node1", "node1"),
    ("  node1\n", "node1"),
    ("gpu[7]", "gpu7"),
    ("gpu-a100-[12,15]", "gpu-a100-12"),
    ("rack[1-2]-ib", "rack1-ib"),
    ("r[1-2]n[07-09]", "r1n07"),
    ("10.0.0.5", "10.0.0.5"),
    ("x[2-3],y[1]", "x2"),
])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "   ", "gpu[003", ",node1", "gpu]1", "a[]"])
def test_first_host_rejects_garbage(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_host(nodelist)
