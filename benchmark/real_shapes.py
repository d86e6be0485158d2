"""The four scripts end to end at a real Qwen3 shape, on this machine: measured peak memory against the plan.

Each script runs a few iterations with a random-weight model of a published Qwen3 shape and the real Qwen3
tokenizer (common.models.random_qwen3, saved once to a folder) as student and teacher(s), on 1 and 2 ranks
(torchrun, gloo on a CPU), and prints per script and world size: the wall time, each rank's measured peak (the
resident set on a CPU, `torch.cuda.max_memory_allocated` on a GPU, as the script reports it when it ends), the
plan's peak for the same run, their ratio, and the ranks' peaks together. `--device-memory` per world size is the
budget the plan fits its auto choices into (default: 16 GiB for one rank, 10 GiB a rank for two, so that two
ranks stay under 20 GiB together on a 23 GiB machine).

`--readme` prints instead the plans of the README's four torchrun commands (8 ranks of 80 GiB GPUs): `--plan`,
no weights loaded.

    python benchmark/real_shapes.py                          # qwen3-0.6b, the four scripts, 1 and 2 ranks
    python benchmark/real_shapes.py --scripts guided_opd --ranks 1
    python benchmark/real_shapes.py --readme
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCRIPTS = ("guided_opd", "mopd", "atod", "two_phase")
# a few iterations of two 8-token turns: every phase of a run (rollout, scoring, training, step, checkpoint, save)
COMMON = ["--num-envs", "2", "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "512", "--eval-episodes", "2",
          "--micro-batch-tokens", "512"]
# the README's torchrun commands, with a model of the same size standing in for each expert (the plan reads shapes)
README = {
    "guided_opd": ["--student", "qwen3-1.7b", "--teacher", "qwen3-30b-a3b", "--env", "alfworld", "--max-turns", "30",
                   "--num-envs", "8"],
    "mopd": ["--student", "qwen3-1.7b", "--domains", "alfworld@qwen3-1.7b", "scienceworld:boil@Qwen/Qwen3-1.7B",
             "--max-turns", "30"],
    "atod": ["--student", "qwen3-1.7b", "--teacher", "qwen3-4b", "--env", "alfworld", "--max-turns", "50"],
    "two_phase": ["--student", "qwen3-8b", "--tasks", "tau2:airline", "tau2:retail", "--teachers", "qwen3-8b",
                  "Qwen/Qwen3-8B", "--user-model", "qwen3-8b"],
}


def model_folder(shape: str, folder: str) -> str:
    """A random-weight model of `shape` with the real Qwen3 tokenizer, saved once under `folder`."""
    import torch

    from common.models import qwen3_tokenizer, random_qwen3

    path = os.path.join(folder, shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        random_qwen3(shape, "cpu", torch.float32).save_pretrained(path)
        qwen3_tokenizer().save_pretrained(path)
    return path


def script_args(script: str, m: str) -> list[str]:
    """The run of `script` with model folder `m` as student and every teacher."""
    return {
        "guided_opd": ["--student", m, "--teacher", m, "--env", "twx:simonsays", "--total-iterations", "2"],
        "mopd": ["--student", m, "--domains", f"twx:simonsays@{m}", f"twx:peckingorder@{m}", "--total-iterations", "2"],
        "atod": ["--student", m, "--teacher", m, "--env", "twx:peckingorder", "--group-size", "2", "--total-iterations", "2"],
        "two_phase": ["--student", m, "--tasks", "twx:simonsays", "--teachers", m, "--phase1-iterations", "1",
                      "--phase2-iterations", "1", "--expert-episodes", "2", "--no-success-only"],
    }[script] + COMMON


def run(script: str, args: list[str], ranks: int, cwd: str, threads: int) -> tuple[float, str, int]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    t0 = time.time()
    p = subprocess.run(launcher + [os.path.join(ROOT, f"{script}.py"), *args], cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"))
    return time.time() - t0, p.stdout + p.stderr, p.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b", help="a published Qwen3 shape (common.models.QWEN3_SHAPES)")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device-memory", nargs="+", default=["cpu:16", "cpu:10"],
                        help="the plan's budget per rank, one per --ranks entry (auto: this machine's)")
    parser.add_argument("--extra", nargs="*", default=[], help="more arguments for every run (e.g. --rollout-gather layers)")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "agent-distill-real-shapes"),
                        help="where the random-weight models are saved (reused)")
    parser.add_argument("--readme", action="store_true", help="print the plans of the README's torchrun commands instead")
    parser.add_argument("--out", default=None, help="write the results as markdown to this file (default: "
                        "benchmark/results/real_shapes.md, or real_plans.md with --readme; - for none)")
    a = parser.parse_args()
    command = "python benchmark/real_shapes.py " + " ".join(sys.argv[1:])
    if a.readme:
        lines = ["# The README's torchrun commands: their memory plans on 8 GPUs of 80 GiB\n", f"`{command.strip()}`"
                 " (an expert of the student's size stands in for each `<expert>`; the plan reads shapes only)\n",
                 "| command | student, teachers | peak GiB per rank at 8 ranks | fits 80 GiB | choices at 8 ranks |",
                 "|---|---|---|---|---|"]
        for script, args in README.items():
            _, out, code = run(script, [*args, "--plan", "--device-memory", "gpu:80"], 1, ROOT, 1)
            print(f"$ {script}.py {' '.join(args)} --plan\n{out.strip()}\n" if code == 0 else f"{script}: failed\n{out[-2000:]}")
            if code == 0:
                col = lambda label: re.search(rf"^{label}\s.*?(\S+)\s*$", out, re.M).group(1)  # the 8-rank column
                models = re.search(r"^memory plan: (.*?); ", out, re.M).group(1)
                lines.append(f"| `{script}.py {' '.join(args)}` | {models} | {col('peak')} | {col('fits')} | activation checkpointing "
                             f"{col('activation checkpointing')}, rollout gather {col('rollout gather')}, caches between turns "
                             f"{col('cache turns')}, rollout chunk {col('rollout chunk')} |")
        write(a.out or os.path.join(ROOT, "benchmark", "results", "real_plans.md"), lines)
        return
    m = model_folder(a.shape, a.folder)
    budgets = dict(zip(a.ranks, a.device_memory))
    rows = []
    for script in a.scripts:
        for ranks in a.ranks:
            with tempfile.TemporaryDirectory() as cwd:
                wall, out, code = run(script, [*script_args(script, m), "--device-memory", budgets.get(ranks, "auto"), *a.extra],
                                      ranks, cwd, max(1, (os.cpu_count() or 2) // ranks))
            peaks = [(int(r), float(p), float(q)) for r, p, q in
                     re.findall(r"rank (\d+): peak memory ([\d.]+) GiB, plan ([\d.]+) GiB", out)]
            choices = re.search(r"; (activation checkpointing .*)$", out, re.M)
            if code or len(peaks) != ranks:
                print(f"{script} on {ranks} rank(s) failed (exit {code}):\n{out[-3000:]}", flush=True)
                rows.append((script, ranks, wall, None, None, None))
                continue
            peak, plan = max(p for _, p, _ in peaks), peaks[0][2]
            rows.append((script, ranks, wall, peak, plan, sum(p for _, p, _ in peaks)))
            print(f"{script} on {ranks} rank(s): {wall:.0f} s, peak per rank {', '.join(f'{p:.2f}' for _, p, _ in sorted(peaks))} GiB, "
                  f"plan {plan:.2f} GiB; {choices.group(1) if choices else ''}", flush=True)
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"a CPU of {os.cpu_count()} cores"
    lines = [f"# The four scripts at {a.shape}'s shape: measured peak memory against the plan\n",
             f"`{command.strip()}` on {where}; random weights, the real Qwen3 tokenizer, student and teachers of that shape; "
             f"each rank's plan budget (--device-memory) {', '.join(f'{r} rank(s): {b}' for r, b in budgets.items())}\n",
             "| script | ranks | wall s | peak GiB per rank (max) | plan GiB | peak / plan | ranks together GiB |",
             "|---|---|---|---|---|---|---|"]
    for script, ranks, wall, peak, plan, total in rows:
        lines.append(f"| {script} | {ranks} | {wall:.0f} | " + ("failed | | | |" if peak is None else
                     f"{peak:.2f} | {plan:.2f} | {peak / plan:.2f} | {total:.2f} |"))
    print("\n".join(lines))
    write(a.out or os.path.join(ROOT, "benchmark", "results", "real_shapes.md"), lines)


def write(path: str, lines: list[str]) -> None:
    if path != "-":
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
