"""``megatron-kd reproduce``: the paper's Figure 4 at small scale, resumable, with controls.

One study directory holds the data, the teachers, the phase-1 students (one per theta x seed), the
phase-2 students (setup x {KD, CE} x seed, and each control's arms) and the report. Every run is
complete when its ``study_done.json`` (its evaluation) exists: a killed study reruns only the runs
without one (their partial directory is replaced); a directory holding a study with other
settings is refused. The runs train through the project's training loop and recipes
(``recipes/reproduce/``): in this process one after the other (``jobs=1``), or ``jobs`` at a time
in worker processes (study/worker.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

from megatron_kd.config import load_config
from megatron_kd.study.spec import CONTROLS, MAIN_SETUP, SETUPS, StudyConfig, phase1_arm

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "reproduce"
TEACHER_LM_WEIGHT = 1.0  # teacher objective: answer-token CE + this x mean LM CE
DONE = "study_done.json"
EVAL_SETS = "eval_sets.json"
#: a passkey document of n tokens holds needle distances up to n minus this (needle head + answer)
DISTANCE_MARGIN = 12


#: environment of a launcher (torchrun, Slurm, MPI): a worker is a single-rank process of its own
_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"}


class StudyError(RuntimeError):
    """The study cannot give a meaningful answer with these settings (said, with the numbers)."""


@dataclass
class RunSpec:
    name: str  # path under the study directory
    recipe: str
    overrides: List[str]
    kind: str  # teacher | phase1 | phase2
    teacher_objective: bool = False  # the passkey teacher's own objective instead of the spec's
    eval_bands: bool = True
    meta: Dict[str, object] = field(default_factory=dict)


class Study:
    def __init__(self, cfg: StudyConfig, root: Path, log=None):
        self.cfg = cfg
        self.root = Path(root)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.timings: Dict[str, float] = {}
        cfg.validate(lambda n: n - DISTANCE_MARGIN)
        self._check_recipes()

    def _check_recipes(self):
        """Every recipe the plan uses loads (and validates) before anything is trained."""
        names = {"teacher.yaml", "phase1.yaml", "phase2_kd.yaml", "phase2_ce.yaml"}
        if "positional_teacher" in self.cfg.controls:
            names.add("teacher_positional.yaml")
        names |= {f"control_{c}.yaml" for c in self.cfg.controls}
        for n in sorted(names):
            load_config(str(RECIPES / n))

    # ------------------------------------------------------------------ plan
    def _teacher_runs(self, name: str, recipe: str, tok: str, data: Path) -> List[RunSpec]:
        runs, prev = [], None
        for w, iters, gbs in self.cfg.teacher_stages:
            run = f"{name}/len{w:04d}"
            ov = [f"data.tokenizer_model={tok}", f"data.data_path={data / f'teacher_{w}'}",
                  f"data.seq_length={w}", f"train.train_iters={iters}", f"train.global_batch_size={gbs}",
                  f"train.micro_batch_size={max(1, gbs // 2)}"]
            if prev:
                ov += [f"checkpoint.load={self.root / prev}", "checkpoint.finetune=true"]
            runs.append(RunSpec(run, recipe, ov, "teacher", True, eval_bands=(w == self.cfg.teacher_length),
                                meta={"seq_length": w}))
            prev = run
        return runs

    def teacher_runs(self, tok: str, data: Path) -> List[RunSpec]:
        runs = self._teacher_runs("teacher", "teacher.yaml", tok, data)
        if "positional_teacher" in self.cfg.controls:
            runs += self._teacher_runs("teacher_positional", "teacher_positional.yaml", tok, data)
        return runs

    def thetas(self) -> List[int]:
        """Phase-1 thetas the setups need."""
        return sorted({SETUPS[s][0] for s in self.cfg.setups})

    def phase1_run(self, tok: str, data: Path, theta: int, seed: int) -> RunSpec:
        c = self.cfg
        return RunSpec(
            f"{phase1_arm(theta)}/seed{seed}", "phase1.yaml",
            [f"data.tokenizer_model={tok}", f"train.seed={1234 + seed}", f"data.seed={1234 + seed}",
             f"data.data_path={data / 'phase1'}", f"model.rotary_base={theta}",
             f"data.seq_length={c.phase1_seq_length}", f"train.train_iters={c.phase1_iters}",
             f"train.global_batch_size={c.phase1_global_batch_size}",
             f"train.micro_batch_size={c.phase1_global_batch_size // 2}"],
            "phase1", meta={"theta": theta, "seed": seed})

    def phase2_runs(self, tok: str, data: Path, seeds: Dict[int, List[int]]) -> List[RunSpec]:
        """``seeds``: phase-1 theta -> the seeds whose phase 1 passed the bar (one per slot)."""
        c = self.cfg
        teacher = self.root / "teacher" / f"len{c.teacher_length:04d}"

        def phase2(name, recipe, setup, seed, arm, extra=()):
            th1, th2 = SETUPS[setup]
            ov = [f"data.tokenizer_model={tok}", f"train.seed={1234 + seed}", f"data.seed={1234 + seed}",
                  f"data.data_path={data / 'phase2'}", f"data.seq_length={c.phase2_seq_length}",
                  f"model.rotary_base={th2}", f"train.train_iters={c.phase2_iters}",
                  f"train.global_batch_size={c.phase2_global_batch_size}",
                  f"train.micro_batch_size={c.phase2_global_batch_size // 2}",
                  f"checkpoint.load={self.root / phase1_arm(th1) / f'seed{seed}'}",
                  f"teacher.load={teacher}", f"kd.alpha={c.kd_alpha if arm == 'kd' else 0.0}"]
            return RunSpec(f"{name}/{arm}/seed{seed}", recipe, ov + list(extra), "phase2",
                           meta={"setup": setup, "arm": arm, "seed": seed, "group": name})

        runs = []
        for slot in range(c.seeds):
            for setup in c.setups:
                seed = seeds[SETUPS[setup][0]][slot]
                for arm in ("kd", "ce"):
                    runs.append(phase2(setup, f"phase2_{arm}.yaml", setup, seed, arm))
            seed = seeds[SETUPS[MAIN_SETUP][0]][slot] if c.controls else None
            for ctrl in c.controls:
                extra = []
                if ctrl == "positional_teacher":
                    extra = [f"teacher.load={self.root / 'teacher_positional' / f'len{c.teacher_length:04d}'}"]
                elif ctrl == "short_teacher":
                    extra = [f"teacher.load={self.root / 'teacher' / f'len{c.short_teacher_stage():04d}'}"]
                for arm in CONTROLS[ctrl][1]:
                    runs.append(phase2(f"control_{ctrl}", f"control_{ctrl}.yaml", MAIN_SETUP, seed, arm, extra))
        return runs

    def _teacher_objective(self, tok: str):
        from megatron_kd.data import load_tokenizer
        from megatron_kd.eval import passkey

        gen = passkey.PasskeyGenerator(load_tokenizer(tok), ["filler"], key_len=1)
        return passkey.AnswerObjective.factory(gen.question_ids(), 1, TEACHER_LM_WEIGHT)

    # ------------------------------------------------------------------ execution
    def _train(self, spec: RunSpec) -> float:
        from megatron_kd.run import train

        run = self.root / spec.name
        extra = [f"train.log_interval={self.cfg.log_interval}"] if self.cfg.log_interval else []
        cfg = load_config(str(RECIPES / spec.recipe), spec.overrides + extra + [f"checkpoint.save={run}"])
        objective = self._teacher_objective(cfg.data.tokenizer_model) if spec.teacher_objective else None
        t = time.time()
        train(cfg, overwrite=True, objective_factory=objective)
        return time.time() - t

    def execute(self, spec: RunSpec, sets) -> dict:
        """Train and evaluate one run unless its study_done.json exists (then read it)."""
        from megatron_kd.study.evaluate import evaluate_run

        run = self.root / spec.name
        done = run / DONE
        if done.exists():
            return json.loads(done.read_text())
        if self.cfg.jobs == 1:
            self.log(f"[study {time.time() - self.t0:7.1f}s] train {spec.name}")
        seconds = self._train(spec)
        result = evaluate_run(run, sets, bands=spec.eval_bands, probe=spec.kind == "phase1")
        result.update(name=spec.name, kind=spec.kind, meta=spec.meta, train_seconds=round(seconds, 1))
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(done)
        return result

    def run(self) -> dict:
        from megatron_kd.study.corpus import build_corpus
        from megatron_kd.study.evaluate import build_eval_sets, save_eval_sets
        from megatron_kd.study.report import write_report

        c = self.cfg
        self.t0 = time.time()
        self._check_same_study()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "study_config.json").write_text(json.dumps(c.to_dict(), indent=2))
        self.log(f"[study] {self.root}: preset {c.preset}, {c.seeds} seed(s), setups {', '.join(c.setups)}, "
                 f"controls {', '.join(c.controls) or 'none'}")
        t = time.time()
        n_teacher = {w: max(64, int(it * gbs * 1.1)) for w, it, gbs in c.teacher_stages}
        corpus = build_corpus(self.root / "data", [w for w, _, _ in c.teacher_stages], n_teacher,
                              c.phase1_seq_length, c.phase1_docs, c.phase2_doc_tokens, c.phase2_docs,
                              c.passkey_fraction, log=self.log)
        sets = build_eval_sets(c, corpus)
        save_eval_sets(sets, self.root / EVAL_SETS)  # what worker processes score with
        self.timings["data"] = round(time.time() - t, 1)
        tok, data = corpus.tokenizer, corpus.root
        results: Dict[str, dict] = {}
        t = time.time()
        teachers = self.teacher_runs(tok, data)
        # a teacher curriculum is one chain (each stage loads the previous one)
        self._run_tasks([[s for s in teachers if s.name.split("/")[0] == chain]
                         for chain in dict.fromkeys(s.name.split("/")[0] for s in teachers)], sets)
        results.update({s.name: self.execute(s, sets) for s in teachers})  # read back the done markers
        self.timings["teacher"] = round(time.time() - t, 1)
        t = time.time()
        seeds, phase1 = self._phase1(tok, data, sets)
        results.update(phase1)
        self.timings["phase1"] = round(time.time() - t, 1)
        t = time.time()
        phase2 = self.phase2_runs(tok, data, seeds)
        self._run_tasks([[s] for s in phase2], sets)
        results.update({s.name: self.execute(s, sets) for s in phase2})
        self.timings["phase2"] = round(time.time() - t, 1)
        summary = write_report(self.root, c, results, corpus, self.timings | {"total": round(time.time() - self.t0, 1)},
                               replaced=self.replaced)
        return summary

    #: settings that change no trained run: a study may be resumed with other values
    RESUMABLE_CHANGES = ("jobs", "in_distribution_bar")

    def _check_same_study(self):
        from megatron_kd.config import ConfigError

        path = self.root / "study_config.json"
        if not path.exists():
            if self.root.exists() and any(self.root.iterdir()):
                raise ConfigError(f"--run-dir {self.root}: not empty and not a study directory; use another")
            return
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(self.cfg.to_dict()))
        diff = [k for k in new if k not in self.RESUMABLE_CHANGES and old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise ConfigError(f"--run-dir {self.root} holds a study with other settings ({k}: {old.get(k)} there, "
                              f"{new[k]} now); resume it with its own settings or use another --run-dir")

    def _run_tasks(self, tasks: List[List[RunSpec]], sets) -> None:
        """Each task (a list of runs, in order) to completion: in this process with jobs = 1, else
        up to ``jobs`` worker processes at once (study/worker.py), each with cores / jobs threads,
        its output in ``<study>/logs/``."""
        pending = [t for t in tasks if not all((self.root / s.name / DONE).exists() for s in t)]
        if self.cfg.jobs == 1:
            for task in pending:
                for spec in task:
                    self.execute(spec, sets)
            return
        (self.root / "logs").mkdir(exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // max(1, min(self.cfg.jobs, len(pending))))
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        running = []
        try:
            while pending or running:
                while pending and len(running) < self.cfg.jobs:
                    task = pending.pop(0)
                    todo = [s for s in task if not (self.root / s.name / DONE).exists()]
                    log = self.root / "logs" / (todo[0].name.replace("/", "_") + ".log")
                    for s in todo:
                        self.log(f"[study {time.time() - self.t0:7.1f}s] train {s.name}")
                    with open(log, "w") as f:
                        proc = subprocess.Popen(
                            [sys.executable, "-m", "megatron_kd.study.worker", str(self.root),
                             json.dumps([asdict(s) for s in todo])],
                            stdout=f, stderr=subprocess.STDOUT, env=env)
                    running.append((proc, todo, log))
                time.sleep(0.2)
                for item in [r for r in running if r[0].poll() is not None]:
                    running.remove(item)
                    proc, todo, log = item
                    if proc.returncode != 0:
                        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
                        raise StudyError(f"run {todo[0].name} failed (exit {proc.returncode}): "
                                         f"{tail[0] if tail else ''} -- full log {log}; rerun the same "
                                         f"command to resume")
        finally:
            for proc, _, _ in running:
                proc.kill()
                proc.wait()

    def _phase1(self, tok: str, data: Path, sets):
        """Phase 1 for every theta x seed, checked against the in-distribution bar. A seed whose
        phase 1 stays below it (the retrieval phase change comes at a seed-dependent step) is
        replaced by the next spare seed -- the same one for the KD and the CE arm, so the
        comparison stays paired -- at most ``seeds`` spares per theta. When more than half of the
        first runs miss the bar, the budget is the problem, not a seed: the study stops at once, as
        it does when the spares run out, with the measured numbers.
        Returns ({theta: seeds used}, {run name: result})."""
        from megatron_kd.study.evaluate import accuracy

        c = self.cfg
        seeds = {th: list(range(c.seeds)) for th in self.thetas()}
        spare = {th: c.seeds for th in seeds}
        results, failed = {}, {}
        first = True
        while True:
            specs = [self.phase1_run(tok, data, th, s) for th, ss in seeds.items() for s in ss]
            self._run_tasks([[s] for s in specs], sets)
            low = []
            for spec in specs:
                r = results[spec.name] = self.execute(spec, sets)
                acc = accuracy(r["phase1_probe"])
                if acc < c.in_distribution_bar:
                    low.append((spec.meta["theta"], spec.meta["seed"], spec.name, acc))
            self.log(f"  phase-1 in-distribution exact match ({c.phase1_seq_length - 1}-token documents): "
                     + ", ".join(f"{s.name} {accuracy(results[s.name]['phase1_probe']):.2f}" for s in specs))
            if not low:
                break
            budget = first and 2 * len(low) > len(specs)
            first = False
            failed.update({name: acc for _, _, name, acc in low})
            need = {th: sum(1 for x in low if x[0] == th) for th, _, _, _ in low}
            if budget or any(spare[th] + n > 2 * c.seeds for th, n in need.items()):
                why = f"{len(low)} of {len(specs)} runs" if budget else "spare seeds used up"
                raise StudyError(
                    f"phase 1 did not reach the in-distribution bar {c.in_distribution_bar:.2f} after "
                    f"{c.phase1_iters} steps ({', '.join(f'{k} {v:.2f}' for k, v in failed.items())}; "
                    f"chance 0.06; {why}): a table past this point would compare chance with chance. "
                    f"Raise --phase1-iters (demo: --train-iters; 2,000 reach it, docs/reproduce.md) or lower "
                    f"--in-distribution-bar; "
                    f"finished runs are kept")
            for th, seed, name, acc in low:
                seeds[th][seeds[th].index(seed)] = spare[th]
                self.log(f"  {name}: {acc:.2f} < bar {c.in_distribution_bar:.2f}: replaced by seed {spare[th]} "
                         f"(both arms)")
                spare[th] += 1
        if c.in_distribution_bar == 0:
            self.log("  (in-distribution bar off: this preset checks the pipeline, not the science)")
        self.replaced = failed
        return seeds, results
