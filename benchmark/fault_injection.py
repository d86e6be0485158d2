"""Fault injection: does a run survive game processes that die mid-rollout, and what does it cost?

Runs guided_opd.py twice with the same seed and length: undisturbed, and with the TextWorld-Express JVM of the
run killed (SIGKILL) every --kill-every iterations while the rollout talks to it (a JVM under the run's process
that used the CPU in the last 0.3 s, found in /proc). Every game in it is lost; each env's next call starts a new
JVM (the first to notice; the others join it) and replays its episode there (envs/base.py, JavaEnv;
docs/faults.md), so nothing should be dropped and the two runs should end alike. Prints, per run: iterations
completed, JVMs killed, episodes dropped in training (charts/env_failures) and in evaluation (eval/env_failures),
the final held-out success and the wall time.

    python benchmark/fault_injection.py --iterations 30 --kill-every 3
    python benchmark/fault_injection.py --iterations 4 --kill-every 1 -- --num-envs 4 --eval-episodes 8

Everything after `--` goes to guided_opd.py. The runs' folders go under --runs-dir (fault-injection/ by default).
The JVM search (`processes`, `busy_jvm`) also serves tests/test_faults.py.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def processes() -> dict[int, tuple[int, bytes, int]]:
    """pid -> (parent pid, command line, CPU ticks used) of every process, from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out[int(d)] = (int(fields[1]), f.read(), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                pass  # a process that ended meanwhile
    return out


def descendants(pid: int, table: dict) -> list[int]:
    """The processes below `pid` in `table` (`processes()`): its children, theirs, and so on."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _, _) in table.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def game_jvms(pid: int, table: dict) -> list[int]:
    """The game JVMs (py4j gateways: TextWorld-Express's, ScienceWorld's) below the process `pid` in `table`."""
    return [p for p in descendants(pid, table) if b"py4j.GatewayServer" in table[p][1]]


def busy_jvm(pid: int, wait: float = 0.3) -> int | None:
    """A game JVM below the process `pid` that used the CPU in the last `wait` seconds, or None."""
    before = processes()
    jvms = game_jvms(pid, before)
    time.sleep(wait)
    after = processes()
    busy = [p for p in jvms if p in after and after[p][2] > before[p][2]]
    return busy[0] if busy else None


def kill_busy_jvm(pid: int, timeout: float = 120) -> bool:
    """SIGKILL one busy game JVM of the run `pid` (waiting up to `timeout` seconds for one); whether it did."""
    deadline = time.time() + timeout
    while time.time() < deadline and os.path.exists(f"/proc/{pid}"):
        jvm = busy_jvm(pid)
        if jvm is not None:
            try:
                os.kill(jvm, signal.SIGKILL)
                return True
            except ProcessLookupError:
                pass
    return False


def play(label: str, args, extra: list[str]) -> dict:
    """One guided_opd.py run; with args.kill_every > 0 a JVM killed after every kill_every-th iteration's line."""
    runs_dir = os.path.join(args.runs_dir, label)
    cmd = [sys.executable, os.path.join(ROOT, "guided_opd.py"), "--total-iterations", str(args.iterations),
           "--seed", str(args.seed), "--runs-dir", runs_dir, *extra]
    t0, kills, killers, lines = time.time(), [], [], []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in p.stdout:
        lines.append(line)
        print(f"[{label}] {line}", end="", flush=True)
        if args.kill_every and line.startswith("iter ") and (int(line.split()[1]) + 1) % args.kill_every == 0:
            killers.append(threading.Thread(target=lambda: kills.append(kill_busy_jvm(p.pid)), daemon=True))
            killers[-1].start()
    code = p.wait()
    for t in killers:
        t.join()
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    series = lambda tag: {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}  # noqa: E731
    success = series("eval/success_rate")
    return {"run": label, "exit": code, "iterations": len(series("charts/success_rate")), "killed": sum(kills),
            "dropped": int(sum(series("charts/env_failures").values())),
            "eval_dropped": int(sum(series("eval/env_failures").values())),
            "success": success[max(success)] if success else float("nan"), "minutes": (time.time() - t0) / 60}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30, help="guided_opd.py --total-iterations of both runs")
    parser.add_argument("--kill-every", type=int, default=3, help="kill one JVM after every N-th iteration")
    parser.add_argument("--seed", type=int, default=1, help="guided_opd.py --seed of both runs")
    parser.add_argument("--runs-dir", default="fault-injection", help="where the two runs' folders go")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    rows = [play("undisturbed", argparse.Namespace(**{**vars(args), "kill_every": 0}), extra), play("killed", args, extra)]
    print(f"\n{' '.join(['guided_opd.py', '--total-iterations', str(args.iterations), '--seed', str(args.seed), *extra])}; "
          f"one JVM killed after every {args.kill_every} iterations in the second run\n")
    print("| run | exit | iterations | JVMs killed | episodes dropped (training) | (evaluation) | final held-out success "
          "| minutes |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['exit']} | {r['iterations']} | {r['killed']} | {r['dropped']} | {r['eval_dropped']} "
              f"| {r['success']:.3f} | {r['minutes']:.1f} |")


if __name__ == "__main__":
    main()
