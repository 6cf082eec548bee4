"""Kill a training run many times and check that it still trains exactly the uninterrupted run.

    python benchmarks/fault_stress.py --kills 50 [--nproc 2] [--seed 0] [--steps N] [--workdir DIR]

Builds the multi-rank tests' tiny corpus and recipe (tests/multirank/conftest.py; ``--data`` reuses
an existing one), trains it once uninterrupted (A), then trains it again (B) and SIGKILLs B's whole
process group (launcher and every rank) ``--kills`` times, each kill followed by ``--resume``, and
lets the last attempt finish. Kill points are drawn from ``--seed`` (at least one mid-save):

* ``save``    inside a checkpoint save: shards written, not yet renamed (worker.py holds it there)
* ``step``    right after a step's update, before the loop counts or checkpoints it (held there)
* ``timed``   a random moment 0-0.3 s after the attempt finished its j-th step: wherever it is
              (a step, a save, an evaluation, logging)
* ``startup`` a random moment between the process start and its first step (imports, resume,
              index building)

Both runs record the training windows every step consumed (worker.py ``MKD_TEST_RECORD_IDS``).
Printed at the end, measured in this one run: kills survived; resumes that loaded the newest
complete checkpoint on disk at the time of the kill (a checkpoint directory under its final
``iter_XXXXXXX`` name: save_checkpoint renames it only after every rank wrote its shards);
window ids lost or duplicated against A; the final loss against A's; wall time. The last line,
``summary {...}``, holds the same as JSON (tests/reliability/test_fault_stress.py reads it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MULTIRANK = REPO / "tests" / "multirank"
sys.path.insert(0, str(MULTIRANK))

import ids_record  # noqa: E402
import multirank_util as mr  # noqa: E402

KINDS = ("save", "step", "timed", "startup")
WEIGHTS = (3, 2, 3, 1)
RESUMED = re.compile(r"resumed from \S+ at iteration (\d+)")
ITER_DIR = re.compile(r"iter_(\d{7})")


def _tiny_fixtures():
    spec = importlib.util.spec_from_file_location("multirank_fixtures", MULTIRANK / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def newest_complete(run_dir: Path) -> int:
    """The newest checkpoint under its final name with megatron's files in it (0: none)."""
    best = 0
    for d in (run_dir / "checkpoints").glob("iter_*"):
        m = ITER_DIR.fullmatch(d.name)
        if m and all((d / f).exists() for f in ("metadata.json", "common.pt", ".metadata")):
            best = max(best, int(m.group(1)))
    return best


def _record_count(rec: Path) -> int:
    path = rec / "ids.0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


class Stress:
    def __init__(self, args, recipe: Path, root: Path):
        self.args, self.recipe, self.root = args, recipe, root
        self.rng = random.Random(args.seed)
        self.overrides = [f"train.train_iters={args.steps}", f"checkpoint.save_interval={args.save_interval}",
                          "train.eval_interval=4", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
        if args.nproc == 2:
            self.overrides.append("parallel.tensor_model_parallel_size=2")
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def cmd(self, run_dir: Path, flags):
        return mr.train_cmd(self.recipe, run_dir, self.args.nproc, self.overrides, flags)

    def reference(self):
        """A: uninterrupted; also times the start-up (process start to first step)."""
        rec = self.root / "ids_a"
        rec.mkdir()
        t0 = time.monotonic()
        proc = mr.start(self.cmd(self.root / "a", ["--overwrite"]), env=mr.child_env(MKD_TEST_RECORD_IDS=rec),
                        log=self.logs / "a.log")
        while _record_count(rec) == 0 and proc.poll() is None:
            time.sleep(0.02)
        self.startup_s = time.monotonic() - t0
        if proc.wait() != 0:
            sys.exit(f"the uninterrupted run failed:\n{mr.tail((self.logs / 'a.log').read_text())}")
        self.reference_s = time.monotonic() - t0
        return rec

    def plan_kill(self, i: int, forced_save: int, resumed: int):
        """(kind, iteration or step count, delay), past the resume point so that B progresses and
        before the end so that the attempt is still running when its kill comes."""
        a = self.args
        left = a.steps - resumed
        kind = "save" if i == forced_save else self.rng.choices(KINDS, WEIGHTS)[0]
        if kind == "timed" and left < 3:  # the attempt could finish within the random delay
            kind = "step"
        if kind == "save":
            k = min((resumed // a.save_interval + self.rng.randint(1, 2)) * a.save_interval, a.steps)
            return kind, k, 0.0
        if kind == "step":
            return kind, self.rng.randint(resumed + 1, min(resumed + 2 * a.save_interval, a.steps)), 0.0
        if kind == "timed":
            return kind, self.rng.randint(1, min(2 * a.save_interval, left - 2)), self.rng.uniform(0, 0.3)
        return kind, 0, self.rng.uniform(0, self.startup_s)

    def attempt(self, n: int, rec: Path, kill):
        """One attempt of B: start, kill it as planned (None: let it finish); -> (rc, log text)."""
        run_b, nproc = self.root / "b", self.args.nproc
        env = {"MKD_TEST_RECORD_IDS": rec}
        markers = []
        if kill and kill[0] == "save":
            env["MKD_TEST_HANG_AT_SAVE"] = kill[1]
            markers = [run_b / "checkpoints" / f"hang.{r}" for r in range(nproc)]
        elif kill and kill[0] == "step":
            env["MKD_TEST_HANG_AT_STEP"] = kill[1]
            markers = [rec / f"hang.{r}" for r in range(nproc)]
        log = self.logs / f"b{n:03d}.log"
        before = _record_count(rec)
        t0 = time.monotonic()
        proc = mr.start(self.cmd(run_b, ["--resume"] if n else ["--overwrite"]), env=mr.child_env(**env), log=log)
        if kill:
            kind, k, delay = kill
            if kind in ("save", "step"):
                reached = lambda: all(m.exists() for m in markers)  # noqa: E731
            elif kind == "timed":
                reached = lambda: _record_count(rec) - before >= k  # noqa: E731
            else:
                reached = lambda: time.monotonic() - t0 >= delay  # noqa: E731
            while not reached() and proc.poll() is None:
                time.sleep(0.01)
            if kind == "timed":
                time.sleep(delay)
            mr.kill_group(proc)
            for m in markers:
                m.unlink(missing_ok=True)
        else:
            proc.wait()
        return proc.returncode, log.read_text()

    def run(self):
        a, t_start = self.args, time.monotonic()
        rec_a = self.reference()
        rec_b = self.root / "ids_b"
        rec_b.mkdir()
        forced_save = self.rng.randrange(a.kills) if a.kills else -1
        kinds, resumes = Counter(), []  # resumes: (newest complete at the kill, loaded or None)
        survived, failure, newest = 0, None, 0
        for n in range(a.kills + 1):  # attempt n: killed as planned, the last one runs to the end
            kill = self.plan_kill(n, forced_save, newest_complete(self.root / "b")) if n < a.kills else None
            before = _record_count(rec_b)
            rc, log = self.attempt(n, rec_b, kill)
            if n:
                m = RESUMED.search(log)
                first = _first_iteration(rec_b, before)  # fresh start (no checkpoint): 1
                resumes.append((newest, int(m.group(1)) if m else (first - 1 if first else None)))
            if kill is None and rc != 0:
                failure = f"final attempt exited {rc}: {_last_line(log)}"
            elif kill is not None and rc != -9:  # not our SIGKILL: it failed or ended on its own
                failure = f"attempt {n} ({kill[0]} kill) exited {rc} before its kill: {_last_line(log)}"
            if failure:
                break
            survived += n > 0  # the kill before this attempt was followed by a working resume
            if kill is not None:
                kinds[kill[0]] += 1
                newest = newest_complete(self.root / "b")
        return self.summary(rec_a, rec_b, kinds, resumes, survived, failure, time.monotonic() - t_start)

    def summary(self, rec_a, rec_b, kinds, resumes, survived, failure, wall):
        a = self.args
        ids = ids_record.compare(ids_record.read(rec_b), ids_record.read(rec_a), a.steps)
        rows_a, _ = _losses(self.root / "a")
        rows_b, unreadable = _losses(self.root / "b")
        loss_a = dict(rows_a)
        checked = [(want, got) for want, got in resumes if got is not None]
        final_a, final_b = loss_a.get(a.steps), dict(rows_b).get(a.steps)  # B: its last attempt's
        differ = sum(v != loss_a.get(it) for it, v in rows_b)
        return {
            "kills": a.kills, "nproc": a.nproc, "steps": a.steps, "save_interval": a.save_interval,
            "seed": a.seed, "kill_points": dict(kinds), "kills_survived": survived,
            "failure": failure,
            "resumes_checked": len(checked), "resumes_newest": sum(w == g for w, g in checked),
            "resumes_not_newest": [(w, g) for w, g in checked if w != g],
            "resumes_killed_before_load": len(resumes) - len(checked),
            "ids_lost": ids["lost"], "ids_duplicated": ids["duplicated"],
            "steps_with_other_ids": len(ids["wrong_steps"]), "redone_steps": ids["redone"],
            "redone_with_other_ids": len(ids["redo_differs"]),
            "final_loss": final_b, "final_loss_uninterrupted": final_a,
            "final_loss_equal": final_b is not None and final_b == final_a,
            "logged_losses": len(rows_b), "logged_losses_differing": differ,
            "metrics_lines_unreadable": unreadable,
            "wall_s": round(wall, 1), "uninterrupted_s": round(self.reference_s, 1),
        }


def _first_iteration(rec: Path, skip: int):
    rows = (rec / "ids.0.jsonl").read_text().splitlines()[skip:] if (rec / "ids.0.jsonl").exists() else []
    for line in rows:
        try:
            return json.loads(line)["iteration"]
        except (json.JSONDecodeError, KeyError):
            continue
    return None


def _losses(run_dir: Path):
    """[(iteration, train loss)] in file order from metrics.jsonl, and the number of lines that
    do not parse (a kill in the middle of writing one)."""
    rows, bad = [], 0
    path = run_dir / "logs" / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if r.get("split") == "train":
            rows.append((r["iteration"], r["lm loss"]))
    return rows, bad


def _last_line(text: str) -> str:
    lines = [l for l in mr.tail(text, 20).splitlines() if l.strip()]
    return lines[-1] if lines else "(no output)"


def report(s: dict) -> str:
    ratio = (s["final_loss"] / s["final_loss_uninterrupted"]
             if s["final_loss"] and s["final_loss_uninterrupted"] else float("nan"))
    kp = s["kill_points"]
    lines = [
        f"fault stress: {s['kills']} SIGKILLs of the whole process group, {s['nproc']} process(es)"
        f"{' (TP=2)' if s['nproc'] == 2 else ''}, {s['steps']} steps, checkpoint every {s['save_interval']}, "
        f"seed {s['seed']}",
        "  kill points: " + ", ".join(f"{kp.get(k, 0)} {k}" for k in KINDS),
        f"  kills survived:                      {s['kills_survived']} / {s['kills']}"
        + (f"   FAILED: {s['failure']}" if s["failure"] else ""),
        f"  resumes that loaded the newest complete checkpoint: {s['resumes_newest']} / {s['resumes_checked']}"
        f" ({s['resumes_killed_before_load']} attempt(s) killed before loading)"
        + (f"; (newest, loaded): {s['resumes_not_newest']}" if s["resumes_not_newest"] else ""),
        f"  sample ids lost / duplicated:        {s['ids_lost']} / {s['ids_duplicated']}"
        f"  (steps with other windows than A: {s['steps_with_other_ids']}; redone steps (summed over ranks): {s['redone_steps']},"
        f" of which read other windows than their redo: {s['redone_with_other_ids']})",
        f"  final loss (iteration {s['steps']}):      {s['final_loss']} vs {s['final_loss_uninterrupted']}"
        f" uninterrupted (ratio {ratio:.9f}, bit-identical: {'yes' if s['final_loss_equal'] else 'NO'})",
        f"  logged train losses differing from A at the same iteration: {s['logged_losses_differing']}"
        f" of {s['logged_losses']} (unreadable metrics.jsonl lines: {s['metrics_lines_unreadable']})",
        f"  wall time: {s['wall_s']} s (the uninterrupted run alone: {s['uninterrupted_s']} s)",
        "summary " + json.dumps(s),
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--nproc", type=int, default=1, choices=(1, 2), help="2: TP=2 under torchrun")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: max(8, 2 x kills))")
    ap.add_argument("--save-interval", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="an existing tiny corpus prefix (default: build one)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.kills < 0 or args.save_interval < 1:
        ap.error("--kills >= 0 and --save-interval >= 1")
    args.steps = args.steps or max(8, 2 * args.kills)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        fixtures = _tiny_fixtures()
        prefix = args.data
        if prefix is None:
            (root / "data").mkdir(exist_ok=True)
            prefix = fixtures.make_tiny_data(root / "data")
        recipe = fixtures.write_tiny_recipe(root / "tiny.yaml", prefix)
        summary = Stress(args, recipe, root).run()
    print(report(summary), flush=True)
    ok = (summary["failure"] is None and summary["ids_lost"] == summary["ids_duplicated"] == 0
          and summary["final_loss_equal"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
