"""Rank discovery (torchrun, Slurm srun, mpirun) -> torch.distributed -> megatron parallel_state.

Order of precedence: torchrun's env (RANK/WORLD_SIZE/LOCAL_RANK), then Slurm's
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first host of SLURM_JOB_NODELIST), then MPI
(OpenMPI/PMI env, or mpi4py's COMM_WORLD, with the master address broadcast from rank 0),
else a single process.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from megatron_kd import platform, watchdog


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist ('gpu[003-005,009],cpu1' -> 'gpu003';
    'rack[1-2]-ib' -> 'rack1-ib')."""
    nodelist = nodelist.strip()
    # first entry: up to the first comma outside brackets
    m = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])+", nodelist)
    if not m or nodelist[m.end():m.end() + 1] not in ("", ","):
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    # each bracket group -> the first value of its first range (zero padding kept)
    return re.sub(r"\[([^\]]+)\]", lambda g: g.group(1).split(",")[0].split("-")[0], m.group(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_from_job(env: dict, default: int = 29500) -> int:
    """A port every task of the job derives alike (20000-39999), so jobs sharing a node differ."""
    job = env.get("SLURM_JOB_ID")
    return 20000 + int(job) % 20000 if job and job.isdigit() else default


def discover(env: Optional[dict] = None) -> RankInfo:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                        "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)),
                        env.get("MASTER_ADDR") or first_host(nodelist),
                        int(env.get("MASTER_PORT") or _port_from_job(env)), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _discover_mpi(env)
    return RankInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def _discover_mpi(env: dict) -> RankInfo:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(
            "launched under MPI but mpi4py is not installed: pip install 'megatron_kd[mpi]'"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK",
                             comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()))
    if rank == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    else:
        addr, port = None, None
    addr, port = comm.bcast((addr, port), root=0)
    return RankInfo(rank, world, local_rank, addr, port, "mpi")


def init_distributed(timeout_minutes: float = 10) -> RankInfo:
    """Start torch.distributed for this process (a 1-rank group when launched alone).

    ``timeout_minutes``: how long a collective waits for a silent peer (Megatron-LM's
    --distributed-timeout-minutes). A rank started by a launcher also gets its watchdog and
    heartbeat (watchdog.py) first: a launcher that dies during the rendezvous is noticed too.
    """
    platform.setup()
    info = discover()
    platform.set_device(info.local_rank)
    watchdog.start(info, timeout_minutes)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=platform.backend(),
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
        watchdog.install_failure_report()
    return info


def init_model_parallel(parallel_cfg, seed: int) -> None:
    """megatron parallel_state groups (TP, PP with optional virtual stages, CP, EP, DP) + RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
        expert_model_parallel_size=parallel_cfg.expert_model_parallel_size,
        # megatron's groups have a timeout of their own (default 30 min), not the world's
        distributed_timeout_minutes=parallel_cfg.distributed_timeout_minutes,
    )
    # Same data-parallel seed on every rank, distinct per TP rank for the TP region, distinct per
    # PP stage (Megatron-LM's _set_random_seed convention).
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + 100 * pp_rank
    import random

    import numpy as np

    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    watchdog.stop_store_heartbeat()  # its TCPStore client must not outlive the group's store
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
