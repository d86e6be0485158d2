"""benchmark/reproduce.py: a paper's comparison rerun on the smoke recipe (two seeds, two iterations) writes a
table whose numbers are those of the runs' tensorboard logs and a figure with a line per arm; a second call
skips the finished runs; bad input is a one-line error. The table's arithmetic (mean, std, best after step 0,
failed seeds, mopd's normalised score computed for the two_phase.py arm) is checked on hand-written logs with
distinct numbers, and the arms' commands with --dry-run."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from end_to_end import ROOT, scalars

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import reproduce  # noqa: E402

TWO = ["--arms", "Guided-OPD", "vanilla OPD"]  # of guided_opd's four arms
SMOKE = ["--seeds", "1", "2", "--iterations", "2", "--jobs", "2", "--runs-dir", "runs", "--out-dir", "out",
         "--extra", "--eval-interval", "1", "--eval-episodes", "4", "--num-envs", "4", "--num-minibatches", "2"]


def reproduce_cmd(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "reproduce.py"), *args], cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)


def table_rows(md: str) -> dict[str, list[str]]:
    """label -> the row's cells after the label, of the first markdown table."""
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    table = lines[first:lines.index("", first) if "" in lines[first:] else len(lines)]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows[1:]}  # after the header


def test_reproduce_smoke(tmp_path):
    p = reproduce_cmd(["guided_opd", *TWO, *SMOKE], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (tmp_path / "out" / "guided_opd.md").read_text()
    rows = table_rows(md)
    assert list(rows) == ["Guided-OPD", "vanilla OPD", "teacher"], md
    for label, slug in (("Guided-OPD", "guided-opd"), ("vanilla OPD", "vanilla-opd")):
        finals, starts, best = [], [], []
        for seed in (1, 2):
            folder = tmp_path / "runs" / slug / f"seed{seed}"
            (run_dir,) = glob.glob(str(folder / "*" / "final"))  # one run, finished
            curve = scalars(os.path.dirname(run_dir), "eval/success_rate")
            assert sorted(curve) == [0, 1, 2]
            finals.append(curve[2])
            starts.append(curve[0])
            best.append(max(curve[1], curve[2]))
            assert "saved the student" in (folder / "log.txt").read_text()  # the run's output, next to its folder
        run, start, per_seed, mean_std, lo, hi, best_mean, wall = rows[label]
        assert "--total-iterations 2" in run and ("--beta-start 0" in run) == (label == "vanilla OPD")
        assert per_seed == ", ".join(f"{v:.2f}" for v in finals)
        assert start == f"{sum(starts) / 2:.2f}" and best_mean == f"{sum(best) / 2:.2f}"
        assert mean_std.startswith(f"{sum(finals) / 2:.2f} ± ") and lo == f"{min(finals):.2f}" and hi == f"{max(finals):.2f}"
        assert wall.endswith(")") and " s (" in wall  # mean (min-max) of two runs
    teachers = [scalars(d, "teacher/success_rate")[0] for d in sorted(glob.glob(str(tmp_path / "runs" / "guided-opd" / "seed*" / "*")))
                if os.path.isdir(d)]
    assert rows["teacher"][2] == ", ".join(f"{v:.2f}" for v in teachers)
    figure = (tmp_path / "out" / "guided_opd.svg").read_text()
    assert figure.count("<polyline") == 3  # a line per arm and the teacher's
    assert "Guided-OPD (2 seeds)" in figure and "vanilla OPD (2 seeds)" in figure
    assert "![" in md and "(guided_opd.svg)" in md and "reproduce.py guided_opd --arms Guided-OPD 'vanilla OPD' --seeds 1 2" in md

    # Again: every run is finished, nothing runs, the same table comes out.
    folders = sorted(glob.glob(str(tmp_path / "runs" / "*" / "seed*" / "*")))
    p = reproduce_cmd(["guided_opd", *TWO, *SMOKE], tmp_path, timeout=60)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("finished before, skipped") == 4 and "[1/" not in p.stdout
    assert sorted(glob.glob(str(tmp_path / "runs" / "*" / "seed*" / "*"))) == folders
    assert (tmp_path / "out" / "guided_opd.md").read_text() == md

    # The table along the way: each arm's mean (min-max) over the seeds at every evaluated step.
    along = md[md.index("Along the way"):]
    assert "| arm | step 0 | step 1 | step 2 |" in along
    for label, slug in (("Guided-OPD", "guided-opd"), ("vanilla OPD", "vanilla-opd")):
        curves = [scalars(d, "eval/success_rate") for d in sorted(glob.glob(str(tmp_path / "runs" / slug / "seed*" / "*")))
                  if os.path.isdir(d)]
        cells = table_rows(along)[label]
        assert cells == [f"{sum(c[k] for c in curves) / 2:.2f} ({min(c[k] for c in curves):.2f}-"
                         f"{max(c[k] for c in curves):.2f})" for k in (0, 1, 2)], along

    # --report-only with a seed never run: the table says so, and nothing starts.
    p = reproduce_cmd(["guided_opd", "--report-only", *TWO, *SMOKE[:3], "3", *SMOKE[3:]], tmp_path, timeout=60)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "runs" / "*" / "seed3")) and "[1/" not in p.stdout
    assert table_rows((tmp_path / "out" / "guided_opd.md").read_text())["Guided-OPD"][2].endswith(", not run")
    (tmp_path / "out" / "guided_opd.md").write_text(md)

    # The same folders with another recipe: refused, in one line.
    p = reproduce_cmd(["guided_opd", "--seeds", "1", "--iterations", "3", "--runs-dir", "runs"], tmp_path, timeout=60)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and "another recipe" in p.stderr, p.stderr


@pytest.mark.parametrize("args, message", [(["nope"], "error: unknown paper 'nope'"),
                                           (["atod", "--arms", "PPO"], "error: atod has no arm 'PPO'"),
                                           (["atod", "--seeds", "1", "1"], "error: --seeds needs distinct seeds")])
def test_bad_input_one_line(tmp_path, args, message):
    p = reproduce_cmd(args, tmp_path, timeout=60)
    assert p.returncode != 0 and p.stderr.strip().startswith(message) and "\n" not in p.stderr.strip(), p.stderr
    assert not os.listdir(tmp_path)  # nothing made


def test_dry_run_commands(tmp_path):
    import mopd

    p = reproduce_cmd(["mopd", "--dry-run", "--seeds", "3", "--iterations", "6", "--extra", "--num-envs", "4"], tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 6 and all(line.endswith(f"--runs-dir {folder}/seed3") and " --seed 3 " in line and
                                   "--num-envs 4" in line for line, folder in zip(lines, (
        "runs/reproduce/mopd/mopd", "runs/reproduce/mopd/one-teacher-for-all",
        "runs/reproduce/mopd/off-policy-on-the-pooled-teachers-data", "runs/reproduce/mopd/mopd-loss-pg",
        "runs/reproduce/mopd/mopd-loss-topk-no-topk-tail", "runs/reproduce/mopd/mopd-loss-topk-the-real-model-loss"))), p.stdout
    pooled = lines[2]
    assert "two_phase.py" in pooled and "--phase1-iterations 6 --phase2-iterations 0" in pooled
    specs = [d.partition("@")[0] for d in mopd.TINY["domains"]]  # mopd's tiny default domains and their teachers
    teachers = [d.partition("@")[2] for d in mopd.TINY["domains"]]
    assert f"--tasks {' '.join(specs)}" in pooled.replace("'", "")
    assert (f"--teachers {' '.join(teachers)}" in pooled.replace("'", "")) if all(teachers) else "--teachers" not in pooled
    assert "--route simonsays" in lines[1] and "--loss pg" in lines[3] and "--loss topk" in lines[4]
    assert "--loss topk --no-topk-tail" in lines[4] and "tail" not in lines[5]
    assert all("--total-iterations 6" in line for line in lines[:2] + lines[3:])

    assert "--real-losses" in lines[5]
    off_matched = ("--num-envs 16 --learning-rate 5e-4 --num-minibatches 5 --eval-episodes 64 --no-success-only")
    assert off_matched in pooled  # MOPD's batch, rate, steps and held-out episodes (mopd.py's own defaults)
    assert [mopd.Args().num_envs, mopd.TINY["learning_rate"], mopd.TINY["num_minibatches"], mopd.Args().eval_episodes] == [
        16, 5e-4, 5, 64]

    p = reproduce_cmd(["two_phase", "--dry-run", "--seeds", "1", "--iterations", "7"], tmp_path)
    two, off, off_drop, two_fast, on, real = p.stdout.splitlines()
    assert "--phase2-data experts --seed 1 --phase1-iterations 3 --phase2-iterations 4" in off_drop
    assert "--phase1-iterations 3 --phase2-iterations 4" in two and "--phase1-iterations 3 --phase2-iterations 4" in real
    assert "--phase1-iterations 7 --phase2-iterations 0" in off and "--phase1-iterations 0 --phase2-iterations 7" in on
    assert "--phase2-learning-rate 2e-3 --seed 1 --phase1-iterations 3 --phase2-iterations 4" in two_fast
    assert "--real-losses" in real
    p = reproduce_cmd(["sampled", "--dry-run", "--seeds", "1"], tmp_path)
    exact, *sampled = p.stdout.splitlines()
    assert "--student-loss" not in exact and "--beta-start 0" in exact and len(sampled) == 3
    assert all("--beta-start 0 --student-loss sampled --teacher-loss ce --learning-rate 1e-4" in line for line in sampled)
    assert ["--ratio-max 0" in line for line in sampled] == [False, True, False]
    assert ["--num-minibatches 1" in line for line in sampled] == [False, False, True]
    p = reproduce_cmd(["novice", "--dry-run", "--seeds", "1"], tmp_path)
    assert all("--student tiny-novice" in line and "--total-iterations 100" in line for line in p.stdout.splitlines())
    assert not os.listdir(tmp_path)  # a dry run makes nothing


def write_run(job, curves: dict[str, dict[int, float]], returncode=0, wall_s=10.0):
    """A finished (or failed) run as reproduce.py leaves it: the script's run folder with its tensorboard log and
    final model, and reproduce.json."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = os.path.join(job.folder, "run__1")
    writer = SummaryWriter(run_dir)
    for tag, curve in curves.items():
        for step, value in curve.items():
            writer.add_scalar(tag, value, step)
    writer.close()
    if returncode == 0:
        os.makedirs(os.path.join(run_dir, "final"))
    job.save_state(recipe=job.recipe, returncode=returncode, wall_s=wall_s)


def test_report_numbers(tmp_path):
    """mopd's table from hand-written logs: MOPD from eval/normalised_mean, the two_phase.py arm's g computed from
    its per-task success (a task whose expert does not beat the initial student left out), a failed seed."""
    paper = reproduce.PAPERS["mopd"]
    args = reproduce.Args(paper="mopd", seeds=[1, 2], iterations=10, arms=["MOPD", "off-policy on the pooled teachers' data"])
    arms = [a for a in paper.arms if a.label in args.arms]
    jobs = reproduce.jobs_of(paper, arms, args, str(tmp_path / "runs"))
    assert [(j.arm.label, j.seed) for j in jobs] == [(arms[0].label, 1), (arms[1].label, 1), (arms[0].label, 2),
                                                     (arms[1].label, 2)]
    for job in jobs:
        os.makedirs(job.folder)
    write_run(jobs[0], {"eval/normalised_mean": {0: 0.0, 5: 0.3, 10: 0.2}}, wall_s=100)
    write_run(jobs[2], {"eval/normalised_mean": {0: 0.7, 5: 0.6, 10: 0.5}}, wall_s=200)  # best after step 0: 0.6
    # g(a) = (0.6 - 0.2) / (1.0 - 0.2) = 0.5 at step 10, 0.25 at 5; b's expert (0.5) does not beat the student (0.5)
    write_run(jobs[1], {"teacher/a/success_rate": {0: 1.0}, "teacher/b/success_rate": {0: 0.5}, "teacher/success_rate": {0: 0.75},
                        "eval/a/success_rate": {0: 0.2, 5: 0.4, 10: 0.6}, "eval/b/success_rate": {0: 0.5, 5: 0.0, 10: 0.9}},
              wall_s=30)
    write_run(jobs[3], {}, returncode=1)
    assert [bool(j.finished()) for j in jobs] == [True, True, True, False]

    md, groups = reproduce.report(paper, jobs, args, "python benchmark/reproduce.py mopd", "mopd.svg")
    rows = table_rows(md)
    assert list(rows) == ["MOPD", "off-policy on the pooled teachers' data"]  # no teacher row: g is 1 for the teacher
    assert rows["MOPD"][1:] == ["0.35", "0.20, 0.50", "0.35 ± 0.21", "0.20", "0.50", "0.45", "150 s (100-200)"]
    assert rows["MOPD"][0] == "`python mopd.py --total-iterations 10`"
    assert rows["off-policy on the pooled teachers' data"][1:] == ["0.00", "0.50, failed", "0.50 ± 0.00", "0.50", "0.50",
                                                                    "0.50", "30 s"]
    assert "--phase1-iterations 10 --phase2-iterations 0" in rows["off-policy on the pooled teachers' data"][0]
    assert f"- off-policy on the pooled teachers' data, seed 2 (exit 1): log `{jobs[3].log}`" in md
    assert groups["off-policy on the pooled teachers' data"] == [pytest.approx({0: 0.0, 5: 0.25, 10: 0.5})]
    figure = reproduce.svg(groups, paper.title, paper.tag)  # a panel per arm, the first arm dashed in the second
    assert figure.count("<polygon") == 2 and figure.count("<polyline") == 3 and figure.count('stroke-dasharray="5,4"') == 1
    groups["teacher"] = [{0: 0.9, 10: 0.9}]
    figure = reproduce.svg(groups, paper.title, paper.tag)  # the teacher: a dotted level in each panel, not a panel
    assert figure.count("<polygon") == 2 and figure.count('stroke-dasharray="2,3"') == 2
    assert [reproduce.svg.__globals__["nice_step"](n) for n in (30, 100, 200, 7)] == [5, 20, 50, 2]


def test_profile_iteration_splits_a_run_into_its_parts(tmp_path):
    """benchmark/profile_iteration.py times a script's parts: every timer is on a function the scripts call
    (a renamed one would leave its part out of the table), and the parts add up to the run's wall time."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "profile_iteration.py"), "atod.py",
                        "--iterations", "2", "--", "--eval-interval", "2", "--eval-episodes", "4", "--num-envs", "4",
                        "--group-size", "2", "--num-minibatches", "2"],
                       cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = table_rows(p.stdout[p.stdout.index("| part |"):])
    for part in ("setup: models built or loaded, sharded", "rollout: env reset and step", "rollout: turn generation",
                 "scoring: teacher and rollout-time student", "training: forward (the loss)", "training: backward",
                 "training: gradient clipping", "training: optimizer step", "evaluation (held-out episodes, teacher alone)",
                 "logging (tensorboard, stdout)", "checkpoints and the final save"):
        assert part in rows and int(rows[part][3]) > 0, (part, rows)
    assert int(rows["training: optimizer step"][3]) == 2 * 2  # 2 iterations x 2 mini-batches
    total = float(p.stdout.split(" s in all")[0].rsplit(", ", 1)[-1])
    assert abs(sum(float(r[0]) for r in rows.values()) - total) < 0.1 * len(rows)
