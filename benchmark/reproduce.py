"""Rerun one paper's comparison, every arm on every seed, and write the table and figure its page shows.

A paper is a list of arms, an arm a script with its flags (the results sections of docs/<method>.md); each arm runs once
per seed, one process per run, and the tensorboard logs give a markdown table (per arm: the metric before
training, at the end per seed, its mean ± std, min and max, the best after training began, the wall time of a
run) and an SVG figure (a panel per arm: the mean over seeds against the iteration, with a min-max band, drawn
by curves.py).

    python benchmark/reproduce.py guided_opd   # Guided-OPD against vanilla OPD (exact and real-model losses)
    python benchmark/reproduce.py novice       # the same with the format-only student (--student tiny-novice)
    python benchmark/reproduce.py sampled      # vanilla OPD's sampled-token loss: with the ratio, without, one step
    python benchmark/reproduce.py mopd         # MOPD, one teacher for all, off-policy on the pooled teachers'
                                               # data (two_phase.py), MOPD with --loss pg and with --loss topk
    python benchmark/reproduce.py atod         # ATOD, its previous default, OPD (w = 1 and T-DUR), GRPO, no annealing,
                                               # no T-DUR, the real-model losses; the teacher as a line
    python benchmark/reproduce.py two_phase    # two-phase, off-policy only (at one rate, and with the default's
                                               # drop), on-policy only (same total iterations)

    python benchmark/reproduce.py atod --seeds 1 2 3 --jobs 2 --arms ATOD "OPD (w = 1)"   # 3 seeds, 2 at a time
    python benchmark/reproduce.py mopd --dry-run                                 # print the commands only
    python benchmark/reproduce.py guided_opd --seeds 1 2 --iterations 2 \\
        --extra --eval-interval 1 --eval-episodes 4 --num-envs 4 --num-minibatches 2   # a quick smoke check

`--extra` comes last: everything after it is appended to every run's command (so it can override the arms'
flags). The metric is held-out success (`eval/success_rate`; for two_phase.py the mean over its tasks), and
mopd's normalised score g (`eval/normalised_mean`; for the two_phase.py arm computed the same way from its
per-task logs). `--iterations N` gives every run N iterations (`--total-iterations N`; two_phase.py's arms
split N between the phases as their label says); by default the paper's main script's own count.

Layout: `<runs-dir>/<arm>/seed<S>/` holds the run's tensorboard folder (the script's `--runs-dir`, with its
checkpoints and `final/` model), `log.txt` (the run's stdout and stderr) and `reproduce.json` (the run's
recipe, exit status and wall time). A run that exited cleanly and saved its final model is skipped when the
command is repeated; an interrupted one continues from its last checkpoint (`--resume`); a failed one is
reported with its log's last lines and its command, and the table marks its seed. A folder that holds a
run of another recipe (other iterations, flags or --extra) is an error: pass another --runs-dir.
Writes `<out-dir>/<paper>.md` and `<out-dir>/<paper>.svg`; with the default --out-dir, also the quotes of them in
README.md and docs/ (benchmark/quote.py).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Annotated, Callable

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import quote  # noqa: E402
from curves import read_scalars, summary, svg  # noqa: E402

Curve = dict[int, float]  # step -> value


# ----------------------------------------------------------------------------------------------------
# The scripts' defaults, read from their text (importing a script would import torch and the models' code)
# ----------------------------------------------------------------------------------------------------
def script_default(script: str, name: str):
    """The tiny default of field `name` of `script`'s Args (a literal): its default, or where that is None ("auto"),
    its value in the script's TINY table."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    value = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == name and stmt.value:
                    value = ast.literal_eval(stmt.value)
    if value is not None:
        return value
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TINY":
            for kw in node.value.keywords:
                if kw.arg == name:
                    return ast.literal_eval(kw.value)
    raise SystemExit(f"error: {script} has no Args field {name!r} with a literal default or TINY value")


def default_iterations(script: str) -> int:
    if script == "two_phase.py":
        return script_default(script, "phase1_iterations") + script_default(script, "phase2_iterations")
    return script_default(script, "total_iterations")


def mopd_pooled_flags() -> tuple[str, ...]:
    """two_phase.py's flags for mopd.py's default domains and their teachers: --tasks the env specs, and
    --teachers only where mopd.py names them (a bare spec takes its tiny expert in both scripts)."""
    domains = [d.partition("@") for d in script_default("mopd.py", "domains")]
    specs, teachers = [spec for spec, _, _ in domains], [teacher for _, _, teacher in domains]
    if any(teachers) and not all(teachers):
        raise SystemExit("error: mopd.py's default domains name some teachers and not others: two_phase.py's "
                         "--teachers needs one per task")
    return ("--tasks", *specs) + (("--teachers", *teachers) if all(teachers) else ())


# ----------------------------------------------------------------------------------------------------
# Papers and arms
# ----------------------------------------------------------------------------------------------------
def total(n: int) -> tuple[str, ...]:
    return ("--total-iterations", str(n))


def phases(first: Callable[[int], int]) -> Callable[[int], tuple[str, ...]]:
    """two_phase.py's length flags: `first(n)` off-policy iterations, the rest of n on-policy."""
    return lambda n: ("--phase1-iterations", str(first(n)), "--phase2-iterations", str(n - first(n)))


def tag(name: str) -> Callable[[dict[str, Curve]], Curve]:
    return lambda scalars: scalars[name]


def normalised_mean(scalars: dict[str, Curve]) -> Curve:
    """mopd.py's eval/normalised_mean from a two_phase.py run's per-task logs: per task g = (s - s0) / (t - s0),
    s the student's held-out success, s0 the same at step 0, t the expert's (nan where t <= s0), then the mean
    over the tasks where g is defined (nan where none is)."""
    tasks = [k.split("/")[1] for k in scalars if re.fullmatch(r"teacher/[^/]+/success_rate", k)]
    if not tasks:
        raise KeyError("teacher/<task>/success_rate")
    curves = [(scalars[f"eval/{t}/success_rate"], scalars[f"teacher/{t}/success_rate"][0]) for t in tasks]
    out = {}
    for step in sorted(set.intersection(*(set(c) for c, _ in curves))):
        g = [(c[step] - c[0]) / (teacher - c[0]) for c, teacher in curves if teacher > c[0]]
        out[step] = sum(g) / len(g) if g else math.nan
    return out


@dataclass(frozen=True)
class Arm:
    label: str
    """the arm's name in the table and the figure"""
    script: str
    """the script at the repository root"""
    flags: tuple[str, ...] = ()
    """the arm's own flags"""
    length: Callable[[int], tuple[str, ...]] = total
    """the flags that make the run N iterations long"""
    metric: Callable[[dict[str, Curve]], Curve] | None = None
    """the run's curve of the paper's metric from its scalars (None: the paper's tag)"""

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class Paper:
    title: str
    """the heading of the table and the figure"""
    arms: tuple[Arm, ...]
    """the compared runs; the first one's script gives the default length"""
    tag: str
    """the compared scalar"""
    about: str
    """what the scalar is, for the table"""
    teacher_tag: str | None = None
    """the teacher's own level at step 0, drawn as a horizontal line and a row (None: no such row)"""

    @property
    def iterations(self) -> int:
        return default_iterations(self.arms[0].script)


GUIDED = (Arm("Guided-OPD", "guided_opd.py"), Arm("vanilla OPD", "guided_opd.py", ("--beta-start", "0")))
REAL_LOSSES = ("--real-losses",)  # a script's real-model losses on the tiny student (the tiny learning rate)
SUCCESS = "held-out success of the student alone"
SAMPLED_FORM = ("--student-loss", "sampled", "--teacher-loss", "ce", "--learning-rate", "1e-4")
# two_phase.py as the off-policy arm of MOPD's comparison: MOPD's batch, rate, optimizer steps, held-out episodes,
# and every teacher episode kept (MOPD distills whatever its teachers say)
MOPD_MATCHED = ("--num-envs", "16", "--learning-rate", "5e-4", "--num-minibatches", "5", "--eval-episodes", "64",
                "--no-success-only")
PAPERS = {
    "guided_opd": Paper("Guided-OPD against vanilla OPD, with the exact losses and the real-model ones", GUIDED + tuple(
        Arm(f"{a.label}, real-model losses", a.script, a.flags + REAL_LOSSES) for a in GUIDED),
        "eval/success_rate", SUCCESS, "teacher/success_rate"),
    "novice": Paper("Guided-OPD against vanilla OPD, format-only student (tiny-novice)",
                    tuple(replace(a, flags=a.flags + ("--student", "tiny-novice")) for a in GUIDED),
                    "eval/success_rate", SUCCESS, "teacher/success_rate"),
    "sampled": Paper("The paper's sampled-token loss beside the exact one, vanilla OPD",
                     (GUIDED[1],) + tuple(Arm(f"vanilla OPD, {name}", "guided_opd.py", GUIDED[1].flags + SAMPLED_FORM + extra)
                                          for name, extra in (("sampled, importance ratio, lr 1e-4", ()),
                                                              ("sampled, no ratio, lr 1e-4", ("--ratio-max", "0")),
                                                              ("sampled, one step per batch, lr 1e-4", ("--num-minibatches", "1")))),
                     "eval/success_rate", SUCCESS, "teacher/success_rate"),
    "mopd": Paper("MOPD: per-domain teachers against one teacher, off-policy distillation and the sampled losses", (
        Arm("MOPD", "mopd.py"),
        Arm("one teacher for all", "mopd.py", ("--route", "simonsays")),
        Arm("off-policy on the pooled teachers' data", "two_phase.py", mopd_pooled_flags() + MOPD_MATCHED,
            phases(lambda n: n), normalised_mean),
        Arm("MOPD --loss pg", "mopd.py", ("--loss", "pg")),
        Arm("MOPD --loss topk --no-topk-tail", "mopd.py", ("--loss", "topk", "--no-topk-tail")),
        Arm("MOPD --loss topk (the real-model loss)", "mopd.py", REAL_LOSSES)),
        "eval/normalised_mean", "normalised score g = (s - s_initial) / (s_teacher - s_initial), mean over domains "
        "(two_phase.py's run: computed the same way from its per-task logs, against its own step-0 evaluation)"),
    "atod": Paper("ATOD against OPD, GRPO and its ablations", (
        Arm("ATOD", "atod.py"),
        Arm("ATOD, min-max T-DUR weights and score reward", "atod.py", ("--no-renormalize-weights", "--reward", "score")),
        Arm("OPD (w = 1)", "atod.py", ("--mode", "opd", "--weighting", "none")),
        Arm("OPD (T-DUR)", "atod.py", ("--mode", "opd")),
        Arm("GRPO", "atod.py", ("--mode", "grpo")),
        Arm("no annealing", "atod.py", ("--mode", "constant")),
        Arm("no T-DUR", "atod.py", ("--weighting", "none")),
        Arm("ATOD, real-model losses", "atod.py", REAL_LOSSES)),
        "eval/success_rate", SUCCESS, "teacher/success_rate"),
    "two_phase": Paper("two-phase distillation against either phase alone", (
        Arm("two-phase", "two_phase.py", length=phases(lambda n: n // 2)),
        Arm("off-policy only", "two_phase.py", length=phases(lambda n: n)),
        Arm("off-policy only, phase 2's rate after the switch", "two_phase.py", ("--phase2-data", "experts"),
            phases(lambda n: n // 2)),
        Arm("two-phase, phase 2 at phase 1's rate", "two_phase.py", ("--phase2-learning-rate", "2e-3"),
            phases(lambda n: n // 2)),
        Arm("on-policy only", "two_phase.py", length=phases(lambda n: 0)),
        Arm("two-phase, real-model losses", "two_phase.py", REAL_LOSSES, phases(lambda n: n // 2))),
        "eval/success_rate", SUCCESS + ", mean over the tasks", "teacher/success_rate"),
}


@dataclass
class Args:
    paper: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PAPER")]
    """the comparison to rerun: guided_opd, novice, sampled, mopd, atod or two_phase"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """the seeds every arm runs (each run's --seed)"""
    iterations: int | None = None
    """training iterations of every run (default: the paper's main script's own count); two_phase.py's arms
    split them between the phases"""
    arms: list[str] | None = None
    """run and report only these arms, by label (default: all), e.g. --arms Guided-OPD "vanilla OPD\""""
    jobs: int = 1
    """runs at a time; with more than one each run gets OMP_NUM_THREADS=1 (with one, the environment is left as is)"""
    runs_dir: str | None = None
    """folder of the runs (default: runs/reproduce/<paper>)"""
    out_dir: str = "benchmark/results"
    """where <paper>.md (the table) and <paper>.svg (the figure) are written"""
    dry_run: bool = False
    """print the runs' commands (and which are finished) and stop"""
    report_only: bool = False
    """start no run: write the table and figure from the runs already finished (the others: "not run")"""
    extra: list[str] = field(default_factory=list)
    """flags appended to every run's command, e.g. --extra --eval-interval 1; it must come last: everything
    after it is passed on"""


# ----------------------------------------------------------------------------------------------------
# Runs: one per arm and seed, in its own folder
# ----------------------------------------------------------------------------------------------------
def shown(path: str) -> str:
    """A file of the repository as a command shows it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


@dataclass
class Job:
    arm: Arm
    """what runs"""
    seed: int
    """its --seed"""
    folder: str
    """<runs-dir>/<arm>/seed<S>: the script's --runs-dir, log.txt and reproduce.json"""
    recipe: list[str]
    """what makes the run: the script, the arm's and seed's flags, the length, --extra"""

    @property
    def log(self) -> str:
        return os.path.join(self.folder, "log.txt")

    def state(self) -> dict:
        """reproduce.json: recipe, returncode, wall_s (summed over attempts); {} before the first attempt."""
        path = os.path.join(self.folder, "reproduce.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def save_state(self, **values) -> None:
        state, path = {**self.state(), **values}, os.path.join(self.folder, "reproduce.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)  # whole or not at all

    def run_dirs(self) -> list[str]:
        """The script's run folders (normally one: its name ends with the start time)."""
        return sorted(e.path for e in os.scandir(self.folder) if e.is_dir()) if os.path.isdir(self.folder) else []

    def finished(self) -> str | None:
        """The run folder of a run that exited cleanly with its final model, else None."""
        done = [d for d in self.run_dirs() if os.path.isdir(os.path.join(d, "final"))]
        return done[0] if len(done) == 1 and self.state().get("returncode") == 0 else None

    def command(self) -> list[str]:
        cmd = [sys.executable, shown(os.path.join(ROOT, self.recipe[0])), *self.recipe[1:], "--runs-dir", self.folder]
        return cmd + (["--resume", self.resumable()] if self.resumable() else [])

    def resumable(self) -> str | None:
        """The run folder of an unfinished run with a checkpoint to continue from, else None."""
        saved = [d for d in self.run_dirs() if os.path.exists(os.path.join(d, "checkpoint.pt"))]
        return saved[-1] if saved and not self.finished() else None


def jobs_of(paper: Paper, arms: list[Arm], args: Args, runs_dir: str) -> list[Job]:
    """Seed by seed, every arm (so a partial reproduce has every arm on its first seeds)."""
    n = args.iterations or paper.iterations
    return [Job(arm, seed, os.path.join(runs_dir, arm.slug, f"seed{seed}"),
                [arm.script, *arm.flags, "--seed", str(seed), *arm.length(n), "--exp-name", arm.slug, *args.extra])
            for seed in args.seeds for arm in arms]


def check_recipes(jobs: list[Job]) -> None:
    for job in jobs:
        recorded = job.state().get("recipe")
        if recorded is not None and recorded != job.recipe:
            raise SystemExit(f"error: {job.folder} holds a run of another recipe ({shlex.join(recorded)}): pass "
                             "another --runs-dir, or remove that folder")


def execute(job: Job, env: dict | None) -> int:
    """Run the job (or continue it from its checkpoint) with its output in its log; returns the exit status."""
    if not job.resumable():  # a run that never reached a checkpoint starts again
        for d in job.run_dirs():
            shutil.rmtree(d)
    os.makedirs(job.folder, exist_ok=True)
    job.save_state(recipe=job.recipe)
    cmd = job.command()
    t0 = time.time()
    with open(job.log, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    job.save_state(returncode=rc, wall_s=job.state().get("wall_s", 0.0) + time.time() - t0, command=cmd)
    return rc


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_all(jobs: list[Job], n_parallel: int) -> list[Job]:
    """Run the unfinished jobs, `n_parallel` at a time; returns the failed ones."""
    todo = [j for j in jobs if not j.finished()]
    for j in jobs:
        if j.finished():
            print(f"{j.arm.label}, seed {j.seed}: finished before, skipped ({j.folder})")
    env = dict(os.environ, OMP_NUM_THREADS="1") if n_parallel > 1 else None
    lock, failed = threading.Lock(), []

    def one(k_job):
        k, job = k_job
        with lock:
            print(f"[{k}/{len(todo)}] {job.arm.label}, seed {job.seed}: {shlex.join(job.command())}", flush=True)
        t0 = time.time()
        rc = execute(job, env)
        with lock:
            if rc == 0:
                print(f"[{k}/{len(todo)}] {job.arm.label}, seed {job.seed}: done in {time.time() - t0:.0f} s", flush=True)
            else:
                failed.append(job)
                print(f"[{k}/{len(todo)}] {job.arm.label}, seed {job.seed}: FAILED (exit {rc}), log {job.log}", flush=True)

    pool = ThreadPoolExecutor(max_workers=n_parallel)
    try:
        list(pool.map(one, enumerate(todo, 1)))
    finally:  # on Ctrl-C (the runs get it too) start no more
        pool.shutdown(cancel_futures=True)
    return failed


# ----------------------------------------------------------------------------------------------------
# The report: a markdown table and an SVG figure
# ----------------------------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def stats(values: list[float]) -> str:
    """`mean ± std | min | max` cells."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} | {min(values):.2f} | {max(values):.2f}"


def wall(seconds: list[float]) -> str:
    if not seconds:
        return "-"
    mean = f"{statistics.mean(seconds):.0f} s"
    return mean if len(seconds) == 1 else f"{mean} ({min(seconds):.0f}-{max(seconds):.0f})"


def along_the_way(groups: dict[str, list[Curve]], columns: int = 6) -> list[str]:
    """A table of each arm's mean over seeds (and its min-max) at up to `columns` steps that every run of the
    first arm evaluated, evenly spaced from the first to the last ("-" where an arm's runs lack the step; no
    lines when there are fewer than two such steps)."""
    common = sorted(set.intersection(*(set(c) for c in next(iter(groups.values()))))) if groups else []
    if len(common) < 2:
        return []
    picks = sorted({common[round(i * (len(common) - 1) / (columns - 1))] for i in range(columns)})
    rows = ["Along the way: mean over seeds (min-max) at each step.", "",
            "| arm | " + " | ".join(f"step {k}" for k in picks) + " |", "|---|" + "---|" * len(picks)]
    for label, cs in groups.items():
        cells = (f"{statistics.mean(c[k] for c in cs):.2f} ({min(c[k] for c in cs):.2f}-{max(c[k] for c in cs):.2f})"
                 if all(k in c for c in cs) else "-" for k in picks)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows + [""]


def report(paper: Paper, jobs: list[Job], args: Args, command: str, figure: str) -> tuple[str, dict[str, list[Curve]]]:
    """The markdown and the figure's groups (label -> one curve per finished run) from the runs' logs."""
    iterations, seeds = args.iterations or paper.iterations, ", ".join(map(str, args.seeds))
    rows = [f"| arm | run | start (step 0), mean | final per seed ({seeds}) | final mean ± std | min | max | "
            "best after step 0, mean | wall time per run |", "|---|---|---|---|---|---|---|---|---|"]
    groups, teacher, failed = {}, {}, []
    for arm in dict.fromkeys(j.arm for j in jobs):
        curves, cells, seconds = [], [], []
        for job in (j for j in jobs if j.arm == arm):
            run_dir = job.finished()
            if not run_dir:
                cells.append("not run" if job.state().get("returncode") in (None, 0) else "failed")
                failed += [job] if cells[-1] == "failed" else []
                continue
            scalars = read_scalars(run_dir)
            try:
                curves.append((arm.metric or tag(paper.tag))(scalars))
                if paper.teacher_tag:
                    teacher.setdefault(arm.label, []).append(scalars[paper.teacher_tag][0])
            except KeyError as e:
                raise SystemExit(f"error: {run_dir} has no scalar {e.args[0]!r}; it has {', '.join(sorted(scalars))}")
            cells.append(fmt(curves[-1][max(curves[-1])]))
            seconds.append(job.state()["wall_s"])
        run = f"`{shlex.join(['python', arm.script, *arm.flags, *arm.length(iterations)])}`"
        if not curves:
            rows.append(f"| {arm.label} | {run} | - | {', '.join(cells)} | - | - | - | - | - |")
            continue
        groups[arm.label] = curves
        s = summary([{k: v for k, v in c.items() if k > 0} or c for c in curves])  # best: after step 0
        starts = [c[0] for c in curves if 0 in c]
        rows.append(f"| {arm.label} | {run} | {fmt(statistics.mean(starts) if starts else None)} | {', '.join(cells)} | "
                    f"{stats(s['finals'])} | {statistics.mean(s['best']):.2f} | {wall(seconds)} |")
    along = along_the_way(groups)
    if teacher:  # the same teacher in every arm: its evaluations in the first arm's runs
        source, values = next(iter(teacher.items()))
        last = max(max(c) for cs in groups.values() for c in cs)
        groups["teacher"] = [{0: t, last: t} for t in values]
        rows.append(f"| teacher | `{paper.teacher_tag}` at step 0 of the {source} runs | | "
                    f"{', '.join(map(fmt, values))} | {stats(values)} | | |")
    md = [f"# {paper.title}", "", f"`{command}`", "",
          f"Metric: `{paper.tag}`, {paper.about}. {iterations} iterations per run, seeds {seeds}. Each run is "
          f"`python <script> <flags> --seed S <iterations> --exp-name <arm> {shlex.join(args.extra)}"
          f"{' ' if args.extra else ''}--runs-dir <runs-dir>/<arm>/seed<S>`, its script and flags in the column run. "
          "Final: the value at the run's last step; best: the highest value after step 0.", "", *rows, "", *along]
    if failed:
        md += ["Failed runs:", ""] + [f"- {j.arm.label}, seed {j.seed} (exit {j.state()['returncode']}): log "
                                      f"`{j.log}`" for j in failed] + [""]
    if groups:
        md += [f"![{paper.tag} against iteration, mean over seeds and min-max band]({os.path.basename(figure)})", ""]
    return "\n".join(md), groups


def main(argv: list[str]) -> int:
    cut = argv.index("--extra") if "--extra" in argv else len(argv)
    args = tyro.cli(Args, args=argv[:cut], description=__doc__)
    args.extra = argv[cut + 1:]
    if args.paper not in PAPERS:
        raise SystemExit(f"error: unknown paper {args.paper!r}: choose one of {', '.join(PAPERS)}")
    paper = PAPERS[args.paper]
    labels = [a.label for a in paper.arms]
    if args.arms and not set(args.arms) <= set(labels):
        raise SystemExit(f"error: {args.paper} has no arm {sorted(set(args.arms) - set(labels))[0]!r}: its arms are "
                         + ", ".join(repr(x) for x in labels))
    if not args.seeds or len(set(args.seeds)) != len(args.seeds) or args.jobs < 1 or (args.iterations or 1) < 1:
        raise SystemExit("error: --seeds needs distinct seeds, --jobs and --iterations at least 1")
    arms = [a for a in paper.arms if not args.arms or a.label in args.arms]
    runs_dir = args.runs_dir or os.path.join("runs", "reproduce", args.paper)
    jobs = jobs_of(paper, arms, args, runs_dir)
    check_recipes(jobs)
    if args.dry_run:
        for job in jobs:
            print(("# finished, skipped: " if job.finished() else "") + shlex.join(job.command()))
        return 0

    failed = [] if args.report_only else run_all(jobs, args.jobs)

    os.makedirs(args.out_dir, exist_ok=True)
    md_path, svg_path = (os.path.join(args.out_dir, f"{args.paper}.{ext}") for ext in ("md", "svg"))
    command = shlex.join(["python", shown(os.path.abspath(__file__)), *argv])
    md, groups = report(paper, jobs, args, command, svg_path)
    with open(md_path, "w") as f:
        f.write(md)
    if groups:
        with open(svg_path, "w") as f:
            f.write(svg(groups, paper.title, paper.tag))
    print("\n" + md + f"\nwrote {md_path}" + (f" and {svg_path}" if groups else " (no finished run: no figure)"), flush=True)
    if os.path.abspath(args.out_dir) == os.path.join(ROOT, "benchmark", "results"):  # the files the pages quote
        for page in quote.pages():
            if quote.write(page):
                print(f"rewrote the quotes of {shown(page)}")
    for job in failed:
        print(f"\n{job.arm.label}, seed {job.seed} failed: {shlex.join(job.state()['command'])}\n"
              f"last lines of {job.log}:\n{tail(job.log)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
