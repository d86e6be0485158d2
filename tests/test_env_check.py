"""The contract every environment keeps (envs/base.py) and the checker that tests it (envs/checker.py):
the base class enforces what a wrapper cannot get wrong, the checker passes on every family that runs
here and names each defect of deliberately broken wrappers in one line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

import envs
from envs.base import EPISODE_OVER, EnvError, TextEnv, parse_action, private_random
from envs.checker import check
from test_envs_real import webshop_checkout  # noqa: F401 (a fixture: the fake WebShop checkout)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


class Counter(TextEnv):
    """A correct toy game: say `add` until the count reaches the target the seed picks; `stop` gives up.
    Its generated target wording draws from the global `random`, under the wrapper's private state."""

    task = "counter"
    max_turns = 8

    def _reset(self, seed):
        with private_random(self._rng_state):
            self.word = random.choice(["Count", "Go", "Climb"])
        self.target, self.count = 2 + seed % 3, 0
        return f"{self.word} to {self.target}.", self._info()

    def _step(self, action):
        if action == "add":
            self.count += 1
        won = self.count == self.target
        return str(self.count), float(won), won or action == "stop", self._info()

    def _info(self):
        won = self.count == self.target
        return {"success": won, "score": float(won), "valid_actions": ["add", "stop"]}

    def system_prompt(self):
        return f"{self.word} to {self.target}: reply <action>add</action> or <action>stop</action>."

    def oracle_actions(self):
        return ["add"] * (self.target - self.count)


class OwnProcess(Counter):
    """Counter whose game runs in a child process of its own (a `sleep`, standing in for a JVM): a step
    fails once that process died, and `_restart` starts a new one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._proc = subprocess.Popen(["sleep", "600"])

    def game_process(self):
        return self._proc

    def _restart(self):
        self.close()
        self._proc = subprocess.Popen(["sleep", "600"])

    def _step(self, action):
        if self._proc.poll() is not None:
            raise ConnectionResetError("the game's connection was reset")
        return super()._step(action)

    def close(self):
        self._proc.kill()
        self._proc.wait()


def play(env, seed, actions):
    out = [env.reset(seed)]
    out += [env.step(f"<action>{a}</action>") for a in actions]
    return out


# --------------------------------------------------------------------------------------------------
# the contract, kept by TextEnv
# --------------------------------------------------------------------------------------------------
def test_step_after_done_is_a_no_op():
    env = Counter()
    env.reset(0)  # target 2
    env.step("<action>add</action>")
    obs, reward, done, info = env.step("<action>add</action>")
    assert done and reward == 1.0 and info["success"]
    for reply in ("<action>add</action>", "<action>stop</action>", "no tag"):  # the game would now say lost
        assert env.step(reply) == (EPISODE_OVER, 0.0, True, info)
    assert env.turns == 2 and env.count == 2  # neither a turn nor a step of the game


def test_prompt_and_step_before_reset_are_one_line_errors():
    env = Counter()
    with pytest.raises(EnvError) as e:
        env.system_prompt()
    assert "reset" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        env.step("<action>add</action>")
    assert "reset" in one_line(e.value)
    env.reset(1)
    assert "to 3" in env.system_prompt()


def test_info_has_the_same_keys_and_types_every_turn():
    env = Counter()
    obs, info = env.reset(0)
    assert info == {"success": False, "score": 0.0, "valid_actions": ["add", "stop"], "invalid": False,
                    "task": "counter", "action": None}
    for reply in ("<action>add</action>", "nothing", "<action>add</action>"):
        obs, reward, done, step_info = env.step(reply)
        assert set(step_info) == set(info) and type(step_info["score"]) is float
    assert step_info["action"] == "add" and step_info["success"] is True


class NumpyTypes(Counter):
    def _step(self, action):
        obs, reward, done, info = super()._step(action)
        return obs, np.float32(reward), np.bool_(done), dict(info, success=np.bool_(info["success"]),
                                                              score=np.float64(info["score"]))


class ScoreOutOfRange(Counter):
    def _step(self, action):
        obs, reward, done, info = super()._step(action)
        return obs, reward, done, dict(info, score=100.0 * info["score"])


class ValidActionsAtResetOnly(Counter):
    def _step(self, action):
        obs, reward, done, info = super()._step(action)
        del info["valid_actions"]
        return obs, reward, done, info


def test_the_base_class_enforces_info_types():
    obs, reward, done, info = play(NumpyTypes(), 0, ["add"])[-1]
    assert type(reward) is float and type(done) is bool and type(info["success"]) is bool
    assert type(info["score"]) is float
    with pytest.raises(EnvError) as e:
        play(ScoreOutOfRange(), 0, ["add", "add"])
    assert "ScoreOutOfRange._step returned score 100.0" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        play(ValidActionsAtResetOnly(), 0, ["add"])
    assert "omits valid_actions" in one_line(e.value)


def test_a_wrapper_cannot_override_reset_or_step():
    with pytest.raises(TypeError) as e:
        class OwnStep(Counter):
            def step(self, reply):
                return "", 0.0, False, {}
    assert "implement _step instead" in str(e.value)


def test_reset_is_deterministic_and_the_make_seed_seeds_the_wrappers_draws():
    env = Counter(seed=0)
    random.seed(3)
    first = play(env, 5, ["add", "stop"])
    play(env, 6, ["add"])
    random.seed(4)
    assert play(env, 5, ["add", "stop"]) == first  # whatever came before, whatever the caller's state
    assert play(Counter(seed=0), 5, ["add", "stop"]) == first
    words = {play(Counter(seed=s), 5, [])[0][0].split()[0] for s in range(10)}
    assert len(words) > 1  # the make seed varies the wrapper's own draws


def test_a_game_process_that_died_fails_the_step_in_one_line_and_restarts_at_reset():
    env = OwnProcess()
    try:
        env.reset(0)
        env.step("<action>add</action>")
        dead = env.game_process()
        dead.kill()
        dead.wait()
        assert env.step("no tag")[3]["invalid"]  # an invalid turn does not reach the game
        with pytest.raises(EnvError) as e:
            env.step("<action>add</action>")
        assert one_line(e.value) == ("counter: the game process died during step (killed by signal 9; "
                                     "ConnectionResetError: the game's connection was reset); the next "
                                     "reset(seed) starts a new one")
        assert play(env, 0, ["add", "add"])[-1][3]["success"]
        assert env.game_process() is not dead and env.game_process().poll() is None
    finally:
        env.close()


def test_parse_action_on_hostile_text():
    # tags are taken as a lazy `<action>(.*?)</action>` regex takes them, left to right ...
    assert parse_action("<action>a<action>b</action>") == "a<action>b"
    assert parse_action("<action><action>x</action></action>") == "<action>x"
    assert parse_action("<action>a</action> <action>b") == "a"
    start = time.perf_counter()  # ... but in linear time: the regex took 8 s on this reply
    assert parse_action("<action>" * 12_500 + "</action>", 10**6) == "<action>" * 12_499
    assert parse_action("<action>" * 12_500) is None
    assert time.perf_counter() - start < 0.5
    for ascii_only in (True, False):  # control characters and lone surrogates never reach a game
        for action in ("look\x00around", "look \ud800", "\udfff", "\x1b[0m", "say \x9b"):
            assert parse_action(f"<action>{action}</action>", 9999, ascii_only) is None
    assert parse_action("<action>porte d’entrée\tà gauche</action>", 200, False) == "porte d’entrée à gauche"


class EchoesSurrogates(Counter):
    def _reset(self, seed):
        obs, info = super()._reset(seed)
        return obs + " \ud800", info


def test_observations_never_hold_lone_surrogates():
    obs, info = EchoesSurrogates().reset(0)
    assert obs.endswith(" \ufffd") and obs.encode("utf-8")


def test_make_passes_keyword_arguments_to_families_that_take_them():
    with pytest.raises(EnvError) as e:
        envs.make("gem:sokoban", user=print)
    assert "gem takes no keyword argument(s) user" in one_line(e.value)


# --------------------------------------------------------------------------------------------------
# the checker on deliberately broken wrappers: each defect named in one line
# --------------------------------------------------------------------------------------------------
class UsesGlobalRandom(Counter):
    def _reset(self, seed):
        obs, info = super()._reset(seed)
        return f"{obs} Lucky number {random.randint(0, 10**6)}.", info


class RemembersEpisodes(Counter):
    resets = 0

    def _reset(self, seed):
        self.resets += 1
        obs, info = super()._reset(seed)
        return f"{obs} (game {self.resets})", info


class StepsOnInvalidTurns(Counter):
    """Answers invalid turns itself (as a wrapper may) but lets them count towards the game."""

    def _step(self, action):
        if action not in ("add", "stop"):
            self.count += 1
            return "What?", 0.0, False, dict(self._info(), invalid=True)
        return super()._step(action)


class KeysChange(Counter):
    def _step(self, action):
        obs, reward, done, info = super()._step(action)
        return obs, reward, done, dict(info, bonus=1) if info["success"] else info


class OracleMisleads(Counter):
    def oracle_actions(self):
        return ["stop"]


class OracleMisspells(Counter):
    def oracle_actions(self):
        return ["añadir"] if self.count else ["add"]  # not ASCII: an unparsable reply


class UnplayableValidActions(Counter):
    def _info(self):
        return dict(super()._info(), valid_actions=["add", "stop  now", "a" * 300])


class FailsMidway(Counter):
    def _step(self, action):
        if self.count == 1:
            raise KeyError("count")
        return super()._step(action)


class ParsesJSON(Counter):
    """Takes JSON actions, as tau2 does, and lets json's RecursionError out on deep nesting."""

    max_action_chars, ascii_only = 8000, False

    def _step(self, action):
        if action.startswith(("[", "{")):
            json.loads(action)
            return "Not a move.", 0.0, False, dict(self._info(), invalid=True)
        return super()._step(action)


class StallsOnParentheses(Counter):
    max_action_chars = 8000

    def _step(self, action):
        if action.count("(") > 1000:
            time.sleep(0.3)
        return super()._step(action)


class NoRestart(OwnProcess):
    def _restart(self):
        pass


class DeathUnnoticed(OwnProcess):
    def _step(self, action):
        return Counter._step(self, action)


class SlowStep(Counter):
    def _step(self, action):
        time.sleep(0.02)
        return super()._step(action)


BROKEN = [
    (UsesGlobalRandom, "changed the caller's global random state"),
    (UsesGlobalRandom, "under another global random state gives another episode"),
    (RemembersEpisodes, "after another episode gives another episode (the reset: observation"),
    (StepsOnInvalidTurns, "with <action>xyzzy plugh</action>, an invalid turn, between them gives another"),
    (KeysChange, "info keys differ from the reset's (lacks [], adds ['bonus'])"),
    (OracleMisleads, "the oracle won none of its 2 episodes"),
    (OracleMisspells, "the oracle's action 'añadir' was an invalid turn"),
    (UnplayableValidActions, "valid action 'stop  now' cannot be played"),
    (FailsMidway, "seed 0, turn 2: step raised KeyError: 'count'"),
    (ScoreOutOfRange, "step raised EnvError: ScoreOutOfRange._step returned score 100.0"),
    (ValidActionsAtResetOnly, "omits valid_actions"),
    (ParsesJSON, "seed 0, hostile reply ([ nested 3000 deep): step raised RecursionError"),
    (NoRestart, "seed 0, turn 1: step raised EnvError: counter: the game process died during step"),
    (DeathUnnoticed, "killed before it: step did not raise; it must raise a one-line EnvError"),
]


@pytest.mark.parametrize("broken,says", BROKEN, ids=[f"{b.__name__}-{i}" for i, (b, _) in enumerate(BROKEN)])
def test_the_checker_names_what_a_broken_wrapper_gets_wrong(broken, says):
    failures = check(broken)
    assert all(line and "\n" not in line for line in failures)
    assert any(says in line for line in failures), failures


def test_the_checker_passes_a_correct_wrapper_and_measures_it():
    random.seed(11)
    expected = random.random()
    random.seed(11)
    notes = []
    assert check(Counter(), seeds=(0, 1, 2), log=notes.append) == []
    assert check(Counter) == []  # a factory: a second instance is checked too
    assert random.random() == expected  # the caller's stream is as it was
    assert notes[0] == "oracle won 3 of 3 episodes" and notes[1].startswith("reset: ")
    assert check(SlowStep, max_step_s=0.01)[-1].startswith("a step took 0.0")
    assert check(StallsOnParentheses, max_step_s=0.2) == [
        "seed 0, hostile reply (( nested 3000 deep): the step took 0.3 s (limit 0.2 s); no reply may stall the env"]


def test_the_checker_kills_a_game_process_and_checks_the_restart():
    env = OwnProcess()
    first = env.game_process()
    try:
        assert check(env) == []
        assert first.poll() is not None and env.game_process().poll() is None  # killed, and replaced
    finally:
        env.close()



# --------------------------------------------------------------------------------------------------
# every family that runs here keeps the contract
# --------------------------------------------------------------------------------------------------
# family -> specs checked (and the reset seeds, where the oracle does not win seeds 0 and 1)
CHECKED = {
    "twx": [f"twx:{game}" for game in ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting",
                                       "simonsays", "peckingorder")],
    "gem": [f"gem:{game}" for game in ("guessthenumber", "mastermind", "sokoban", "towerofhanoi", "minesweeper",
                                       "fifteenpuzzle", "sudoku")],
    "scienceworld": ["scienceworld:find-non-living-thing"],
    "alfworld": ["alfworld:pick_and_place:generated"],
    "webshop": ["webshop"],
    "tau2": ["tau2:airline", "tau2:retail"],
}
SEEDS = {"gem:fifteenpuzzle": (1, 2)}  # seed 0's board has no solution: the oracle does not play it


def test_every_registered_family_is_checked():
    assert set(envs.FAMILIES) <= set(CHECKED), "add specs of the new family to CHECKED"


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.needs_env(family))
                                  for family in envs.FAMILIES for s in CHECKED.get(family, ())])
def test_every_family_keeps_the_contract(spec, request):
    if spec == "webshop":
        request.getfixturevalue("webshop_checkout")(300)
    notes = []
    failures = check(spec, seeds=SEEDS.get(spec, (0, 1)), log=notes.append)
    assert failures == [], "\n".join(failures + notes)


@pytest.mark.needs_env("gem")
def test_the_command_line_checker():
    out = subprocess.run([sys.executable, "-m", "envs.checker", "gem:towerofhanoi", "--split", "heldout"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gem:towerofhanoi (heldout): keeps the contract" in out.stdout
    out = subprocess.run([sys.executable, "-m", "envs.checker", "gem:chess"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "FAIL making the env raised EnvError: unknown env 'gem:chess'" in out.stdout


def test_a_wrapper_with_a_game_process_but_no_restart_is_refused_when_defined():
    """A game in a process of its own must say how to start a new one: the class fails where it is defined, not at
    the first reset after its process died."""
    with pytest.raises(TypeError) as e:
        class NoRestart(TextEnv):  # noqa: F841
            def game_process(self):
                return None
    assert "implement _restart" in str(e.value)

    class WithRestart(TextEnv):  # noqa: F841  (a process and a way to restart it: accepted)
        def game_process(self):
            return None

        def _restart(self):
            pass
