"""A real one-node Slurm on localhost for the tests: munged, slurmctld and slurmd in a temp dir.

Debian's ``slurm-wlm`` and ``munge`` (``tools/install.sh test`` installs them). Everything lives under one
directory: the munge key and socket, ``slurm.conf`` (``SLURM_CONF`` points every client command at
it), state and spool dirs, daemon logs. The daemons run in the foreground as children of this
process, so they are stopped by their PIDs, never by name.

Why these settings: ``proctrack/linuxproc`` and ``task/none`` need no cgroups (containers and
gVisor have none to delegate); ``select/cons_tres`` is what GPU clusters use; ``SlurmdParameters=
config_overrides`` lets the node declare at least 2 CPUs on a 1-core runner; ``JobRequeue=1`` and
``--requeue`` in the scripts make ``scontrol requeue`` legal.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
NODE = "localhost"  # resolvable everywhere, so MASTER_ADDR derived from the node list works
PARTITION = "ci"

CONF = """\
ClusterName=mkdci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd.%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
InactiveLimit=0
MessageTimeout=60
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


class SlurmMissing(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]
    return [b for b in BINARIES if not any(Path(d, b).is_file() for d in dirs)]


def _which(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = max(2, cpus or os.cpu_count() or 1)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> "LocalSlurm":
        missing = missing_binaries()
        if missing:
            raise SlurmMissing(
                f"Slurm/munge binaries not found: {', '.join(missing)}; the Slurm tests need Debian's "
                "packages: apt-get install -y slurm-wlm munge openmpi-bin (`bash tools/install.sh test` installs them)")
        for sub in ("munge", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.conf.write_text(CONF.format(
            host=socket.gethostname().split(".")[0], node=NODE, root=self.root, cpus=self.cpus,
            partition=PARTITION, ctld_port=_free_port(), slurmd_port=_free_port()))
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--key-file={key}", f"--socket={self.root}/munge/munge.socket",
                                   f"--pid-file={self.root}/run/munged.pid",
                                   f"--seed-file={self.root}/munge/munged.seed",
                                   f"--log-file={self.root}/log/munged.log"])
            self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), 20, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, f"node {NODE} idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs (a failed test may leave one running: its slurmstepd and
        batch script would outlive slurmd), then SIGTERM each daemon by PID (slurmd first) and
        SIGKILL whatever is left."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self.cmd("squeue", "-h", "-o", "%i", check=False, timeout=30).stdout.split()
                if jobs:
                    self.cmd("scancel", "--full", "--signal=KILL", *jobs, check=False, timeout=30)
                    self.cmd("scancel", *jobs, check=False, timeout=30)
                    # idle again = slurmd has ended every step process (squeue forgets sooner)
                    self._wait(self._node_idle, 60, "node idle after scancel")
            except (subprocess.TimeoutExpired, RuntimeError):
                pass  # stopping the daemons below still happens
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for log in self._logs:
            log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --------------------------------------------------------------- helpers
    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) with SLURM_CONF set to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def cmd(self, *args: str, check: bool = True, timeout: float = 60, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env(env), cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}\n"
                               f"{self.daemon_logs()}")
        return p

    def job(self, job_id: int, attempts: int = 10) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...).

        Retried: on a heavily loaded box an RPC can fail once (slurmctld busy, SIGPIPE).
        """
        for attempt in range(attempts):
            p = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=attempt == attempts - 1)
            if p.returncode == 0:
                break
            time.sleep(1)
        out = p.stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait_job(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED",
                                                            "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.cmd("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")
            time.sleep(0.2)

    def daemon_logs(self, n: int = 15) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            p = self.root / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.daemon_logs()}")
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True)
        return p.returncode == 0 and f"{NODE} idle" in p.stdout

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"local Slurm: {what} not reached in {timeout:.0f}s\n{self.daemon_logs()}")
