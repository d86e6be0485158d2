"""Long runs survive faults: an episode whose env raises is dropped and counted (envs.call_all, the episode
helpers of common/episode.py, each script's rollout with a fake env, Run.drop_failed and evaluation in-process),
too many stop the run with a checkpoint, and SIGTERM / SIGINT stop it at an iteration boundary from which
--resume ends as the run never stopped. End to end: the TextWorld-Express JVMs of a running script are killed
from here (found in /proc by benchmark/fault_injection.py's helpers), and scripts get SIGTERM after their first
iteration."""

from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import envs
from common import checkpoint
from common.episode import Episode, start_episodes, step_envs
from common.runs import Run, evaluate, evaluate_tasks

from end_to_end import ROOT, assert_same_run, command, final_weights, run_script, scalars

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
from fault_injection import descendants, game_jvms, kill_busy_jvm, processes  # noqa: E402  (the JVMs of a run, from /proc)

OK_STEP = ("Nothing happens.", 0.0, False, {"success": False, "score": 0.0, "invalid": False})


class FakeEnv:
    """Never ends on its own; raises at reset, or at its `fail_step`-th step (1-based), when told to."""
    task = "fake:game"

    def __init__(self, fail_step: int = 0, fail_reset: bool = False, concurrent: bool = True):
        self.fail_step, self.fail_reset, self.concurrent, self.steps = fail_step, fail_reset, concurrent, 0

    def reset(self, seed):
        self.steps = 0
        if self.fail_reset:
            raise envs.EnvError("fake:game: the game process died during reset (killed by signal 9)")
        return "You are in the kitchen.", {"task": self.task}

    def system_prompt(self):
        return "Find the coin."

    def step(self, reply):
        self.steps += 1
        if self.steps == self.fail_step:
            raise RuntimeError("the game server went away\nmore lines")
        return OK_STEP


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from common import tiny

    return AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, intermediate_size=64))


# ------------------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("concurrent", [True, False], ids=["threads", "one-by-one"])
def test_call_all_returns_each_envs_exception_in_its_place(concurrent):
    pool = [FakeEnv(concurrent=concurrent), FakeEnv(fail_reset=True, concurrent=concurrent), FakeEnv(concurrent=concurrent)]
    out = envs.call_all(pool, lambda env, seed: env.reset(seed), [0, 1, 2], errors=True)
    assert out[0][1]["task"] == out[2][1]["task"] == "fake:game" and isinstance(out[1], envs.EnvError)
    with pytest.raises(envs.EnvError):  # without errors=True, as before: the first exception
        envs.call_all(pool, lambda env, seed: env.reset(seed), [0, 1, 2])


def test_episode_helpers_mark_the_failed_episodes(tokenizer):
    pool = [FakeEnv(), FakeEnv(fail_reset=True), FakeEnv(fail_step=1)]
    episodes = start_episodes(tokenizer, pool, [5, 6, 7])
    assert [bool(ep.error) for ep in episodes] == [False, True, False]
    failed = episodes[1]
    assert failed.done and failed.seed == 6 and failed.task == "fake:game" and len(failed) == 0
    assert failed.error == "the game process died during reset (killed by signal 9)"  # the env named once, in the log
    steps = step_envs(pool, episodes, [0, 2], ["<action>look</action>"] * 2)
    assert steps[0] == OK_STEP and steps[1][2] is True  # a failed step reads as the episode's end
    assert episodes[2].error == "RuntimeError: the game server went away" and not episodes[0].error


ROLLOUTS = {  # each script's rollout with a pool of envs: (module, call)
    "guided_opd": lambda m, model, tok, pool, args: m.rollout(model, model, tok, pool, list(range(len(pool))), 0.5, args,
                                                              torch.Generator(), 1.0, 3),
    "mopd": lambda m, model, tok, pool, args: m.rollout(model, tok, pool, ["a", "b", "a", "b"], list(range(len(pool))),
                                                        args, torch.Generator(), 1.0, 3),
    "two_phase": lambda m, model, tok, pool, args: m.rollout(model, tok, pool, ["t"] * len(pool), list(range(len(pool))),
                                                             1, args, torch.Generator(), 1.0, 3),
    "atod": lambda m, model, tok, pool, args: m.rollout(model, tok, pool, [0, 0, 1, 1], args, [11, 12], 1.0, 3),
}


@pytest.mark.parametrize("script", list(ROLLOUTS))
def test_rollout_plays_on_when_an_env_raises(script, tokenizer):
    """Each script's rollout: the env that raises at its 2nd step ends its episode there, marked failed; the one
    whose reset raises gives an empty failed episode; the others play all their turns."""
    import importlib

    m = importlib.import_module(script)
    args = m.Args(max_new_tokens=4, max_seq_len=512)
    for key, value in m.TINY.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.max_new_tokens = 4
    pool = [FakeEnv(), FakeEnv(fail_step=2), FakeEnv(fail_reset=True), FakeEnv()]
    episodes = ROLLOUTS[script](m, tiny_model(len(tokenizer)), tokenizer, pool, args)
    assert [bool(ep.error) for ep in episodes] == [False, True, True, False]
    assert "the game server went away" in episodes[1].error and episodes[1].turns == 2
    assert all(ep.turns == 3 and not ep.done for ep in (episodes[0], episodes[3]))  # played to --max-turns


# ----------------------------------------------------------------------------- Run, in-process
@pytest.fixture
def run_of_one(tmp_path, monkeypatch):
    """Make a Run in a gloo process group of one (a small model, SGD), its signal handlers put back after."""
    import guided_opd as g

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    monkeypatch.setattr(sys, "argv", ["guided_opd.py", "--num-envs", "4", "--resume", "old/run"])

    def make(**kw):
        args = g.Args(runs_dir=str(tmp_path / "runs"), total_iterations=10, save_interval=5, **kw)
        model = torch.nn.Linear(3, 2)
        sampler = torch.Generator().manual_seed(0)
        return Run(args, "fake", model, None, torch.optim.SGD(model.parameters(), lr=0.1), {"sampler": sampler},
                   torch.device("cpu"), "test")

    yield make
    for s, h in handlers.items():
        signal.signal(s, h)
    if dist.is_initialized():
        dist.destroy_process_group()


def episodes_with(errors: list[str]) -> list[Episode]:
    return [Episode(ids=[1, 2], loss_mask=[0, 1], turn_id=[-1, 0], role=[0, 1], task="twx:coin", seed=i, error=e,
                    success=True) for i, e in enumerate(errors)]


def test_drop_failed_counts_and_logs_each_failure(run_of_one, capsys):
    run = run_of_one()
    kept = run.drop_failed(episodes_with(["", "the game process died during step (killed by signal 9)", "", ""]), 3)
    assert [ep.seed for ep in kept] == [0, 2, 3] and (run.failures, run.failures_total) == (1, 1)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("iteration 3: dropped episode 1 of twx:coin, its env failed: the game process died during step "
                       "(killed by signal 9)")
    kept = run.drop_failed(episodes_with(["", "", "", "boom"]), 4, group=2)  # ATOD: the whole group goes
    assert [ep.seed for ep in kept] == [0, 1] and (run.failures, run.failures_total) == (1, 2)
    kept = run.drop_failed(episodes_with([""] * 4), 5)
    assert len(kept) == 4 and (run.failures, run.failures_total) == (0, 2)


def test_too_many_failures_stop_with_a_checkpoint_of_the_iterations_start(run_of_one):
    run = run_of_one()
    boundary = checkpoint.rng_state(run.generators)
    torch.rand(3, generator=run.generators["sampler"])  # the abandoned rollout draws
    with pytest.raises(SystemExit) as stop:
        run.drop_failed(episodes_with(["", "died", "died", ""]), 3)
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith("error: 2 of 4 episodes failed in iteration 3, over "
                                                       "--max-env-failures 0.25: env twx:coin (first: twx:coin: died)")
    assert message.endswith(f"resume with: python guided_opd.py --num-envs 4 --resume {run.dir}")
    ckpt = torch.load(os.path.join(run.dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["iteration"] == 3 and torch.equal(ckpt["rngs"][0]["sampler"], boundary["sampler"])


def test_a_rank_without_episodes_stops_the_run_under_any_threshold(run_of_one):
    run = run_of_one(max_env_failures=1.0)
    with pytest.raises(SystemExit, match="error: 2 of 2 episodes failed in iteration 0, a rank has none left"):
        run.drop_failed(episodes_with(["died", "died"]), 0)


def test_sigterm_stops_at_the_end_of_the_iteration(run_of_one, capsys):
    run = run_of_one()
    run.failures_total = 4
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only takes note
    assert run.stop_signal == signal.SIGTERM
    with pytest.raises(SystemExit) as stop:
        run.save(2, extra={"phase": 1})  # not a --save-interval iteration
    assert stop.value.code == 143
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"SIGTERM: stopped after 2 iterations; checkpoint {run.dir}/checkpoint.pt; resume with: "
                    f"python guided_opd.py --num-envs 4 --resume {run.dir}")
    ckpt = torch.load(os.path.join(run.dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["iteration"] == 2 and ckpt["extra"] == {"phase": 1, "env_failures_total": 4}


def test_sigint_after_the_rollout_abandons_the_iteration(run_of_one, capsys):
    run = run_of_one()
    run.save(1)
    boundary = checkpoint.rng_state(run.generators)
    torch.rand(3, generator=run.generators["sampler"])
    run._on_signal(signal.SIGINT, None)
    with pytest.raises(SystemExit) as stop:
        run.drop_failed(episodes_with(["", ""]), 1)
    assert stop.value.code == 130
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("SIGINT: stopped before training iteration 1;")
    ckpt = torch.load(os.path.join(run.dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["rngs"][0]["sampler"], boundary["sampler"])


def test_evaluation_drops_failed_episodes_from_the_rates_and_counts_them(capsys):
    def play(pool, seeds):
        return [Episode(ids=[1], loss_mask=[0], turn_id=[-1], role=[0], task="twx:coin", seed=s, success=s % 2 == 1,
                        error="died" if s == 0 else "") for s in seeds]

    rates, kept = evaluate(play, [None] * 2, 4, 0, 1)
    assert [ep.seed for ep in kept] == [1, 2, 3] and rates["env_failures"] == 1
    assert rates["success_rate"] == pytest.approx(2 / 3)  # over the 3 episodes played to their end
    assert "evaluation: dropped episode 0 of twx:coin, its env failed: died" in capsys.readouterr().out



def test_several_tasks_are_evaluated_in_one_batch_each_with_its_own_rates(capsys):
    """evaluate_tasks (mopd.py's domains, two_phase.py's tasks): every round is one call with every task's envs,
    and each task gets the rates and episodes it gets evaluated alone (a failed env dropped from its own task)."""
    calls = []

    def play(pool, seeds, tasks):
        calls.append((list(pool), list(seeds), list(tasks)))
        return [Episode(ids=[1], loss_mask=[0], turn_id=[-1], role=[0], task=t, seed=s, success=(s + len(t)) % 3 == 0,
                        turns=s + len(t), error="died" if (t, s) == ("bb", 2) else "") for s, t in zip(seeds, tasks)]

    pools = {"a": ["a0", "a1", "a2"], "bb": ["b0", "b1", "b2"]}
    together = evaluate_tasks(play, pools, 5, 0, 1)
    assert calls == [(["a0", "a1", "a2", "b0", "b1", "b2"], [0, 1, 2] * 2, ["a"] * 3 + ["bb"] * 3),
                     (["a0", "a1", "b0", "b1"], [3, 4] * 2, ["a", "a", "bb", "bb"])]  # 5 seeds, 3 at a time
    for task, pool in pools.items():
        alone = evaluate(lambda p, s: play(p, s, [task] * len(s)), pool, 5, 0, 1)
        assert together[task] == alone
    assert together["a"][0]["success_rate"] == pytest.approx(1 / 5) and together["bb"][0]["env_failures"] == 1
    assert together["bb"][0]["success_rate"] == pytest.approx(2 / 4)  # seeds 0, 1, 3, 4 (2 dropped): 1 and 4


# ---------------------------------------------------------------------------------------- end to end
SMOKE = ["--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4", "--max-new-tokens", "8"]
# coin: the smoke expert's wrong moves do not end the game, so rollouts play all their turns (room for a kill)
LONG_ROLLOUTS = ["--env", "twx:coin:numLocations=4,includeDoors=0", "--max-turns", "10"]


class Started:
    """A script running in a subprocess (its own session), its stdout and stderr lines collected as they come."""

    def __init__(self, script, args, tmp_path, torchrun=0):
        self.p = subprocess.Popen(command(script, torchrun) + args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=lambda f, lines: lines.extend(f), args=a, daemon=True)
                        for a in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.readers:
            t.start()

    def wait_for(self, pattern, timeout=300, stderr=False) -> bool:
        """Whether a line of stdout (or stderr) matches `pattern` before the run ends or `timeout` seconds pass."""
        lines, deadline = self.err if stderr else self.out, time.time() + timeout
        while time.time() < deadline and self.p.poll() is None:
            if any(re.search(pattern, line) for line in list(lines)):
                return True
            time.sleep(0.02)
        return any(re.search(pattern, line) for line in list(lines))

    def finish(self, timeout=600) -> int:
        code = self.p.wait(timeout)
        for t in self.readers:
            t.join(10)
        return code

    def said(self) -> str:
        """What the run said of its end, for a failed assertion: its stdout's last lines and its `error:` lines
        (its stderr's last lines are often py4j's tracebacks of a killed JVM)."""
        return "".join(self.out[-10:] + [line for line in self.err if line.startswith("error:")])

    def __del__(self):  # a test that failed midway: its processes go, torchrun's workers (sessions of their own) too
        if self.p.poll() is None:
            for pid in [self.p.pid, *descendants(self.p.pid, processes())]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def kill_jvms(started: Started, n: int, timeout=600) -> int:
    """Kill a busy game JVM of the run `n` times, or until the run ends; how many were killed. Each kill but the
    first waits until the previous one is over: its replacement JVM started, and an iteration logged after that.
    (Waiting only for the next iteration's line is not enough: a JVM killed at the end of a rollout is replaced
    at the next one, and the next kill could then hit the replacement during its replay, which the run rightly
    drops.)"""
    deadline, killed = time.time() + timeout, 0
    iterations = lambda: sum(bool(re.match(r"iter +\d+ ", line)) for line in list(started.out))  # noqa: E731
    running = lambda: started.p.poll() is None and time.time() < deadline  # noqa: E731
    while killed < n and running():
        before = set(game_jvms(started.p.pid, processes()))
        if kill_busy_jvm(started.p.pid, timeout=5):
            killed += 1
            while running() and not set(game_jvms(started.p.pid, processes())) - before:
                time.sleep(0.05)
            logged = iterations()
            while running() and iterations() == logged:
                time.sleep(0.05)
    return killed


@pytest.mark.parametrize("ranks", [1, 2])
def test_killed_game_jvms_are_replaced_and_the_run_ends_as_if_they_had_not_died(tmp_path, ranks):
    """guided_opd.py, 4 episodes an iteration (1 rank x 4, or 2 x 2), sampling at temperature 1 with teacher turns:
    the TextWorld-Express JVM of a rank killed mid-rollout, twice; every episode in it is replayed in a new JVM
    (envs/base.py, JavaEnv), none is dropped, and the run ends with the undisturbed run's numbers and weights."""
    args = SMOKE + LONG_ROLLOUTS + ["--num-envs", str(4 // ranks), "--total-iterations", "8", "--eval-interval", "8",
                                    "--save-interval", "8", "--beta-start", "0.7"]
    torchrun = ranks if ranks > 1 else 0
    run_script("guided_opd.py", args + ["--runs-dir", "full"], tmp_path, torchrun)
    started = Started("guided_opd.py", args + ["--runs-dir", "killed"], tmp_path, torchrun)
    assert started.wait_for(r"^teacher held-out success"), started.err[-20:]
    killed = kill_jvms(started, 2)
    assert started.finish() == 0, started.said()
    assert killed == 2, "the run ended before two kills landed"
    (full,), (killed,) = glob.glob(str(tmp_path / "full" / "*")), glob.glob(str(tmp_path / "killed" / "*"))
    assert not any(re.search(r"dropped episode", line) for line in started.out)
    assert sum(scalars(killed, "charts/env_failures").values()) == 0
    assert_same_run(full, killed, ["losses/loss", "charts/success_rate", "charts/episode_turns", "eval/success_rate",
                                   "losses/grad_norm", "schedule/teacher_token_fraction"])
    w1, w2 = final_weights(full), final_weights(killed)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def kill_every_jvm_for(started: Started, seconds: float) -> int:
    """SIGKILL every game JVM of the run as soon as it appears, for `seconds`: the replays in new JVMs die too, and
    the episodes in flight fail. Returns how many were killed."""
    killed, deadline = set(), time.time() + seconds
    while time.time() < deadline and started.p.poll() is None:
        for p in game_jvms(started.p.pid, processes()):
            if p not in killed:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.add(p)
                except ProcessLookupError:
                    pass
        time.sleep(0.02)
    return len(killed)


def test_failures_over_the_threshold_stop_the_run_with_a_checkpoint(tmp_path):
    """--max-env-failures 0: every JVM killed as it starts, for a few seconds of the rollout (no replay can finish),
    so the episodes in flight fail; the first one dropped in training stops the run with one line naming the env,
    after a checkpoint of that iteration's start."""
    args = SMOKE + LONG_ROLLOUTS + ["--num-envs", "2", "--total-iterations", "20", "--eval-interval", "20",
                                    "--save-interval", "20", "--max-env-failures", "0"]
    started = Started("guided_opd.py", args, tmp_path)
    assert started.wait_for(r"^iter +0 "), started.err[-20:]
    assert kill_every_jvm_for(started, 8) >= 2
    assert started.finish() == 1
    (error,) = [line.strip() for line in started.err if line.startswith("error:")]
    m = re.match(r"error: (\d) of 2 episodes failed in iteration (\d+), (?:over --max-env-failures 0.0|a rank has none "
                 r"left): env twx:coin "
                 r"\(first: twx:coin: .*\); checkpoint (\S+); resume with: python \S+"
                 r"guided_opd.py .* --resume (\S+)$", error)
    assert m, started.err[-5:]
    ckpt = torch.load(tmp_path / m.group(3), weights_only=False)
    assert ckpt["iteration"] == int(m.group(2)) and m.group(3) == os.path.join(m.group(4), "checkpoint.pt")


def resume_command(started: Started, code: int) -> list[str]:
    """The resume command the stopped run printed, to run here (python and torchrun as this interpreter's)."""
    (line,) = [line for line in started.out if "resume with: " in line]
    argv = shlex.split(line.split("resume with: ", 1)[1])
    launcher = [sys.executable] if argv[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    assert code == 143 and started.out[-1] == line
    return launcher + argv[1:]


def worker(pid: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank`."""
    table = processes()
    for p in descendants(pid, table):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0") and b"guided_opd.py" in table[p][1]:
                    return p
        except OSError:
            pass
    raise AssertionError("no such worker")


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigterm_then_resume_ends_as_the_run_never_stopped(tmp_path, ranks):
    """guided_opd.py gets SIGTERM after its first iteration (2 ranks: only rank 1 gets it, both stop at the same
    boundary): exit 143 with a checkpoint and the resume command, which then ends with the uninterrupted run's
    numbers and weights (sampling at temperature 1: the random states of the boundary matter)."""
    args = SMOKE + ["--num-envs", "2", "--total-iterations", "4", "--eval-interval", "2", "--save-interval", "4",
                    "--beta-start", "0.7", "--micro-batch-tokens", "300"]
    torchrun = ranks if ranks > 1 else 0
    run_script("guided_opd.py", args + ["--runs-dir", "full"], tmp_path, torchrun)
    started = Started("guided_opd.py", args + ["--runs-dir", "cut"], tmp_path, torchrun)
    assert started.wait_for(r"^iter    0 "), started.err[-20:]
    os.kill(started.p.pid if ranks == 1 else worker(started.p.pid, 1), signal.SIGTERM)
    code = started.finish()
    if ranks > 1:  # torchrun reports its workers' exit codes
        assert code != 0 and "exitcode  : 143" in "".join(started.err)
        code = 143
    resume = resume_command(started, code)
    assert (resume[3:5] == ["--standalone", "--nproc_per_node=2"]) if ranks > 1 else len(resume) == len(args) + 6
    p = subprocess.run(resume, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (full,), (cut,) = glob.glob(str(tmp_path / "full" / "*")), glob.glob(str(tmp_path / "cut" / "*"))
    assert_same_run(full, cut, ["losses/loss", "charts/success_rate", "charts/episode_turns", "eval/success_rate",
                                "losses/grad_norm", "schedule/teacher_token_fraction"])
    w1, w2 = final_weights(full), final_weights(cut)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("script,args", [
    ("mopd.py", ["--num-envs", "3"]),
    ("two_phase.py", ["--num-envs", "4", "--expert-episodes", "6", "--no-success-only", "--phase1-iterations", "1",
                      "--phase2-iterations", "3"]),
    ("atod.py", ["--num-envs", "4", "--group-size", "2"]),
], ids=["mopd", "two_phase", "atod"])
def test_sigterm_leaves_a_checkpoint_and_the_resume_command(tmp_path, script, args):
    extra = [] if script == "two_phase.py" else ["--total-iterations", "4"]
    started = Started(script, SMOKE + args + extra + ["--eval-interval", "4", "--save-interval", "4"], tmp_path)
    assert started.wait_for(r"^iter    0 "), started.err[-20:]
    started.p.send_signal(signal.SIGTERM)
    resume = resume_command(started, started.finish())
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert resume[-2:] == ["--resume", os.path.join("runs", os.path.basename(run_dir))]
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["iteration"] in (1, 2)


def test_a_second_signal_exits_at_once(tmp_path):
    started = Started("guided_opd.py", SMOKE + LONG_ROLLOUTS + ["--num-envs", "2", "--total-iterations", "4",
                                                                "--save-interval", "4"], tmp_path)
    assert started.wait_for(r"^iter    0 "), started.err[-20:]
    started.p.send_signal(signal.SIGINT)
    assert started.wait_for(r"^SIGINT: stopping at the next iteration boundary", 60, stderr=True)
    started.p.send_signal(signal.SIGINT)  # still in the rollout of iteration 1
    assert started.finish(60) == 130
    assert "SIGINT again: exiting now" in "".join(started.err)
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))
