"""Why ``megatron-kd reproduce --jobs 2``: the study's tiny runs do not fill two cores.

    python benchmarks/study_jobs.py --study runs/demo [--steps 300]

Trains the study's phase-1 recipe (``examples/reproduce/phase1.yaml``: the 0.52M-parameter
student, 32 x 64 tokens per step) twice on the data of an existing study directory (the demo's
or a reproduce run's ``data/``): (a) one run after the other, each with all cores' threads, (b) both
at once, each a process with cores / 2 threads. Prints the wall time of each and the throughput
ratio (a) / (b), measured in one run on this machine. Run it on an otherwise idle box.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _cmd(study: Path, steps: int, out: Path):
    code = ("import sys; from megatron_kd.config import load_config; from megatron_kd.run import train\n"
            "if __name__ == '__main__':\n"
            f"    cfg = load_config('{HERE.parent / 'examples/reproduce/phase1.yaml'}', "
            f"['data.tokenizer_model={study / 'data/tokenizer.model'}', 'data.data_path={study / 'data/phase1'}', "
            f"'train.train_iters={steps}', 'checkpoint.save={out}', 'train.log_interval={steps}'])\n"
            "    train(cfg, overwrite=True)\n")
    return [sys.executable, "-c", code]


def _run(cmds, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    if any(p.wait() for p in procs):
        sys.exit("benchmark run failed")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="a study/demo directory with data/phase1 and data/tokenizer.model")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    study = Path(args.study).resolve()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        a = [_cmd(study, args.steps, Path(tmp) / f"seq{i}") for i in range(2)]
        b = [_cmd(study, args.steps, Path(tmp) / f"par{i}") for i in range(2)]
        seq = sum(_run([c], cores) for c in a)
        par = _run(b, max(1, cores // 2))
    print(f"two phase-1 runs of {args.steps} steps on {cores} cores:")
    print(f"  (a) one after the other, {cores} threads each: {seq:7.1f} s")
    print(f"  (b) at once, {max(1, cores // 2)} thread(s) each:  {par:7.1f} s")
    print(f"  throughput (b) / (a): {seq / par:.2f}x")


if __name__ == "__main__":
    main()
