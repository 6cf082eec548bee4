"""Run test_teacher_cache.py's one-process ``megatron-kd`` jobs, importing torch and megatron-core
once: ``python cache_forkrun.py JOBS.json OUT_DIR``.

JOBS.json is a list of batches; the jobs of a batch run together (forked children, one process
each, as ``python -m megatron_kd.cli ARGV`` would after its imports), batches one after another.
A job is ``{"name", "argv", "kill_at"?, "list_after"?}``; ``kill_at`` = N: the N-th commit of a shard writer
(kd/cache_format.py ``ShardWriter.commit``) flushes that batch's records into ``.bin.tmp`` and the
child SIGKILLs itself before the ``.progress`` count is replaced -- a kill with a batch on disk
that no progress file vouches for. ``OUT_DIR/<name>.{out,err,rc}`` hold each job's output and exit
status; with ``list_after`` = a directory, ``OUT_DIR/<name>.files`` lists what it holds once the
job's batch has finished (e.g. what a killed build left behind). (An import costs ~5 s of CPU;
the test's 9 jobs share one.)
"""
import gc
import json
import os
import signal
import sys
from pathlib import Path


def _child(job: dict, out: Path):
    for fd, suffix in ((1, "out"), (2, "err")):
        f = os.open(out / f"{job['name']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    if job.get("kill_at"):
        from megatron_kd.kd import cache_format

        calls, original = [0], cache_format.ShardWriter.commit

        def commit(self):
            calls[0] += 1
            if calls[0] == job["kill_at"]:
                for m in (self._records, self._hashes):
                    if m is not None:
                        m.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            original(self)

        cache_format.ShardWriter.commit = commit
    from megatron_kd.cli import main

    sys.argv = ["megatron-kd", *job["argv"]]
    sys.exit(main(job["argv"]))


def main():
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    import megatron_kd.cli  # noqa: F401
    import megatron_kd.kd.cache_teacher  # noqa: F401
    import megatron_kd.kd.cached_train  # noqa: F401
    import megatron_kd.kd.train_spec  # noqa: F401
    import megatron_kd.run  # noqa: F401
    import megatron_kd.training.loop  # noqa: F401

    gc.freeze()
    batches, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        running = {}
        for job in batch:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(job, out)
            running[pid] = job["name"]
        while running:
            pid, status = os.wait()
            name = running.pop(pid)
            (out / f"{name}.rc.tmp").write_text(str(os.waitstatus_to_exitcode(status)))
            os.replace(out / f"{name}.rc.tmp", out / f"{name}.rc")
        for job in batch:
            if job.get("list_after"):
                root = Path(job["list_after"])
                names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                (out / f"{job['name']}.files").write_text(json.dumps(names))


if __name__ == "__main__":
    main()
