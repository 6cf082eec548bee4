"""Run many ``megatron-kd`` command lines, each in its own process, importing torch and
megatron-core once: ``python cli_forkserver.py OUT_DIR``, then one JSON job per stdin line.

A job is ``{"name": ..., "argv": [...], "cwd": ...}``; the line ``wait`` waits for every job
started so far and answers ``done`` on stdout (the caller prepares what later jobs need). The
server imports what the CLI imports lazily (~5 s of CPU per process otherwise, most of what a
refused command costs), then forks one child per job, at most ``MKD_FORK_JOBS`` (default 2) at a
time. A child is what ``python -m megatron_kd.cli ARGV`` would be after its imports: it chdirs,
sends fd 1/2 to ``OUT_DIR/<name>.out/.err``, runs ``cli.main`` and leaves through ``sys.exit``,
so the interpreter shuts down as usual (an uncaught exception prints its traceback and exits 1;
``__del__`` noise shows up in .err). ``OUT_DIR/<name>.rc`` holds each job's exit status.
"""
import gc
import json
import os
import sys
from pathlib import Path


def _preload() -> None:
    import megatron.core.datasets.blended_megatron_dataset_config  # noqa: F401
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    import megatron_kd.cli  # noqa: F401
    import megatron_kd.data.preprocess  # noqa: F401
    import megatron_kd.kd.train_spec  # noqa: F401
    import megatron_kd.longred.train_spec  # noqa: F401
    import megatron_kd.run  # noqa: F401
    import megatron_kd.training.loop  # noqa: F401


def _child(job: dict, out: Path):
    os.chdir(job["cwd"])
    for fd, suffix in ((0, None), (1, "out"), (2, "err")):
        f = os.open(out / f"{job['name']}.{suffix}" if suffix else os.devnull,
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC if suffix else os.O_RDONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["megatron-kd", *job["argv"]]
    from megatron_kd.cli import main

    sys.exit(main(job["argv"]))  # nothing below catches it: the child ends here


def serve(out: Path, parallel: int) -> None:
    running = {}  # pid -> job name

    def reap():
        pid, status = os.wait()
        (out / f"{running.pop(pid)}.rc").write_text(str(os.waitstatus_to_exitcode(status)))

    for line in sys.stdin:
        if line.strip() == "wait":
            while running:
                reap()
            print("done", flush=True)
            continue
        job = json.loads(line)
        while len(running) >= parallel:
            reap()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(job, out)
        running[pid] = job["name"]
    while running:
        reap()


if __name__ == "__main__":
    _preload()
    # The imported modules' objects out of the collector's reach: a child's collections and
    # shutdown would otherwise walk (and copy-on-write) all of them, ~1.4 s of CPU per child.
    # What a child creates itself is collected (and its __del__ run) as in any process.
    gc.freeze()
    serve(Path(sys.argv[1]), int(os.environ.get("MKD_FORK_JOBS", "2")))
