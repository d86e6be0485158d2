"""Where the time of a default run goes: one of the four scripts, run in this process exactly as `python
<script> <flags>` would (its own `__main__`), with timers around the functions that make up an iteration, and
its wall time split into those parts as a table of seconds, milliseconds per iteration and shares.

Timers, not a sampling profiler: a few hundred timed calls per iteration cost nothing measurable, so the
numbers are the run's own. A part's time is exclusive: a timed call inside another timed call is taken out of
the outer one (the env steps inside a rollout count as env time), except inside evaluation, setup, scoring and
checkpoints, which keep everything they call (an evaluation's generation is evaluation, a teacher's forward
pass is scoring). What no timer covers (the script's own Python between calls, process start and imports) is
"other". `--cprofile N` runs the same
again under cProfile and prints the N functions with the most time of their own (there the profiler's cost
inflates whatever makes many small Python calls).

    python benchmark/profile_iteration.py guided_opd.py                      # 20 iterations of the tiny default
    python benchmark/profile_iteration.py mopd.py --iterations 10 -- --loss pg     # after --: the script's flags
    python benchmark/profile_iteration.py atod.py --cprofile 30
"""

from __future__ import annotations

import contextlib
import functools
import os
import runpy
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETUP, EVAL, SAVE = "setup: models built or loaded, sharded", "evaluation (held-out episodes, teacher alone)", \
    "checkpoints and the final save"
SCORING = "scoring: teacher and rollout-time student"
OUTER = (SETUP, EVAL, SAVE, SCORING)  # these keep the time of the timed calls inside them
ORDER = [SETUP, "rollout: env reset and step", "rollout: turn generation", SCORING,
         "training: forward (the loss)", "training: backward", "training: gradient clipping",
         "training: optimizer step", EVAL, "logging (tensorboard, stdout)", SAVE]


class Timers:
    """Exclusive wall time per part, over a stack of the timed calls in progress."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[list] = []  # [part, start of its current stretch]

    def wrap(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.stack and self.stack[-1][0] in OUTER:  # inside evaluation, setup, scoring or a save: theirs
                return fn(*args, **kwargs)
            now = time.perf_counter()
            if self.stack:  # pause the caller's stretch
                outer = self.stack[-1]
                self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
            self.stack.append([part, now])
            try:
                return fn(*args, **kwargs)
            finally:
                part_, start = self.stack.pop()
                now = time.perf_counter()
                self.seconds[part_] = self.seconds.get(part_, 0.0) + now - start
                self.calls[part_] = self.calls.get(part_, 0) + 1
                if self.stack:
                    self.stack[-1][1] = now  # the caller's next stretch starts now
        return timed


def install(timers: Timers) -> None:
    """Put timers on the functions of an iteration, before the script imports them."""
    import envs
    from common import episode, models, runs, teacher

    def patch(owner, name: str, part: str):
        setattr(owner, name, timers.wrap(part, getattr(owner, name)))

    patch(models, "load_student_and_teachers", SETUP)
    patch(envs, "call_all", "rollout: env reset and step")
    patch(episode, "generate_replies", "rollout: turn generation")
    patch(teacher, "score_teacher", SCORING)
    patch(teacher.Teachers, "score", SCORING)
    patch(teacher, "token_logprobs", "training: forward (the loss)")  # inside scoring it is scoring
    patch(torch.Tensor, "backward", "training: backward")
    patch(torch.nn.utils, "clip_grad_norm_", "training: gradient clipping")
    patch(torch.optim.AdamW, "step", "training: optimizer step")
    patch(runs.Run, "evaluate_tasks", EVAL)  # Run.evaluate plays through it
    patch(runs.Run, "log_iteration", "logging (tensorboard, stdout)")
    patch(runs.Run, "log", "logging (tensorboard, stdout)")
    patch(runs.Run, "save", SAVE)
    patch(runs.Run, "finish", SAVE)


@dataclass
class Args:
    script: Annotated[str, tyro.conf.Positional]
    """the script to profile: guided_opd.py, mopd.py, atod.py or two_phase.py"""
    iterations: int = 20
    """training iterations of the run (--total-iterations; two_phase.py: half in each phase)"""
    cprofile: int = 0
    """also run it under cProfile and print the N functions with the most time of their own"""


def length_flags(script: str, n: int) -> list[str]:
    if script == "two_phase.py":
        return ["--phase1-iterations", str(n // 2), "--phase2-iterations", str(n - n // 2)]
    return ["--total-iterations", str(n)]


def run_script(argv: list[str]) -> None:
    sys.argv = argv
    with contextlib.chdir(ROOT):
        runpy.run_path(argv[0], run_name="__main__")


def main() -> None:
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    args, flags = tyro.cli(Args, args=sys.argv[1:cut]), sys.argv[cut + 1:]
    script = os.path.join(ROOT, args.script)
    if not os.path.exists(script):
        raise SystemExit(f"error: no script {args.script!r} at the repository root")
    timers = Timers()
    install(timers)
    with tempfile.TemporaryDirectory() as runs:
        argv = [script, *length_flags(args.script, args.iterations), "--runs-dir", runs, *flags]
        t0 = time.perf_counter()
        run_script(argv)
        total = time.perf_counter() - t0
        seconds, calls = dict(timers.seconds), dict(timers.calls)  # the timed run's (the profiled one adds its own)
        if args.cprofile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(run_script, argv)
    n = args.iterations
    print(f"\n{args.script} {' '.join(flags)}: {n} iterations, {total:.1f} s in all, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads")
    print("| part | seconds | ms per iteration | share | calls |\n|---|---|---|---|---|")
    parts = {**seconds, "other (the scripts' own Python, process group, envs made)": total - sum(seconds.values())}
    for part in ORDER + [p for p in parts if p not in ORDER]:
        if part in parts:
            print(f"| {part} | {parts[part]:.1f} | {1000 * parts[part] / n:.0f} | {100 * parts[part] / total:.1f}% | "
                  f"{calls.get(part, '')} |")
    if args.cprofile:
        print()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
