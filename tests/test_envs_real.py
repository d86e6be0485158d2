"""The real environments behind `envs.make`: ScienceWorld, ALFWorld (generated games), WebShop (a fake
checkout: the real one cannot be installed here), GEM. Oracles solve real episodes through the wrappers;
bad input gives one-line errors. The optional packages (requirements-envs.txt) must be installed: a
missing one fails these tests, it does not skip them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

import envs
from envs.base import EnvError, call_with_timeout, parse_params


def play_oracle(env, seed, max_turns=None):
    """One episode following `oracle_actions()`; returns (last info, turns, observations)."""
    obs, info = env.reset(seed)
    seen = [obs]
    for _ in range(max_turns or env.max_turns):
        plan = env.oracle_actions()
        if not plan:
            break
        obs, reward, done, info = env.step(f"Thinking about it.\n<action>{plan[0]}</action>")
        seen.append(obs)
        if done:
            break
    return info, env.turns, seen


def one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and msg, msg
    return msg


# --------------------------------------------------------------------------------------------------
# shared helpers and the registry
# --------------------------------------------------------------------------------------------------
def test_registry_lists_the_real_families():
    specs = envs.known_specs()
    for spec in ("scienceworld:boil", "scienceworld:find-animal", "alfworld", "webshop", "gem:sokoban"):
        assert spec in specs
    assert len([s for s in specs if s.startswith("scienceworld:")]) == 30
    with pytest.raises(EnvError) as e:
        envs.make("scienceworld:no-such-task")
    assert "scienceworld:boil" in one_line(e.value)


def test_call_with_timeout_stops_a_hung_call():
    killed = []
    with pytest.raises(EnvError) as e:
        call_with_timeout(lambda: time.sleep(5), 0.2, "the simulator", on_timeout=lambda: killed.append(1))
    assert killed == [1] and "did not answer within 0.2 s" in one_line(e.value)
    assert call_with_timeout(lambda: 7, 1.0, "x") == 7
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, 1.0, "x")


def test_parse_params():
    assert parse_params("valid_actions=1;n=3", {"valid_actions": False, "n": 0}, "s") == {"valid_actions": True, "n": 3}
    for bad in ("nope=1", "valid_actions", "n=three"):
        with pytest.raises(EnvError):
            parse_params(bad, {"valid_actions": False, "n": 0}, "s")


# --------------------------------------------------------------------------------------------------
# ScienceWorld
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sw_find():
    env = envs.make("scienceworld:find-non-living-thing", split="dev")
    yield env
    env.close()


@pytest.mark.parametrize("task,split", [("lifespan-longest-lived", "train"), ("find-animal", "test"),
                                        ("chemistry-mix-paint-secondary-color", "heldout")])
def test_scienceworld_oracle_solves(task, split):
    with envs.make(f"scienceworld:{task}", split=split) as env:
        info, turns, seen = play_oracle(env, seed=1)
        assert info["success"] and info["score"] == 1.0, seen[-3:]
        assert info["task"] == f"scienceworld:{task}" and turns <= env.max_turns == 30
        assert env.variation in env.variations
        assert "Your task is to" in env.system_prompt()


def test_scienceworld_splits_and_invalid_actions(sw_find):
    env = sw_find
    obs, info = env.reset(0)
    assert 0.0 <= info["score"] < 1.0 and "valid_actions" not in info  # listing them is opt-in (slow)
    obs, reward, done, info = env.step("<action>fly to the moon</action>")
    assert not done and reward == 0.0 and "No known action" in obs
    assert env.oracle_actions() is None  # the agent left the gold plan
    obs, reward, done, info = env.step("no action tag here")
    assert info["invalid"] and not done
    valid = env.valid_actions()
    assert "look around" in valid and len(valid) > 50
    assert env.variations == list(env._server.getVariationsDev())  # the package's dev variations


def test_scienceworld_train_and_heldout_split_the_package_train_set():
    with envs.make("scienceworld:lifespan-longest-lived") as train_env:
        package_train = list(train_env._server.getVariationsTrain())
        heldout = envs.make("scienceworld:lifespan-longest-lived", split="heldout")
        assert set(train_env.variations).isdisjoint(heldout.variations) and heldout.variations
        assert sorted(train_env.variations + heldout.variations) == sorted(package_train)
        heldout.close()


def test_scienceworld_valid_actions_flag_and_bad_params():
    with envs.make("scienceworld:lifespan-shortest-lived:valid_actions=1") as env:
        obs, info = env.reset(0)
        assert "look around" in info["valid_actions"]
        obs, reward, done, info = env.step(f"<action>{env.oracle_actions()[0]}</action>")
        assert info["valid_actions"]
    with pytest.raises(EnvError) as e:
        envs.make("scienceworld:boil:speed=3")
    assert "valid_actions" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        envs.make("scienceworld:boil:simplifications=fast")
    assert "Unknown simplification" in one_line(e.value)


def test_scienceworld_hung_java_is_stopped():
    env = envs.make("scienceworld:lifespan-longest-lived")
    proc = env._sim._gateway.java_process
    env.timeout_s = 0.5
    with pytest.raises(EnvError) as e:
        env._java(lambda: time.sleep(10), "step")
    assert "did not answer" in one_line(e.value)
    proc.wait(timeout=10)  # the JVM was killed
    with pytest.raises(EnvError):
        env.reset(0)


# --------------------------------------------------------------------------------------------------
# ALFWorld: games generated from the files bundled in the wheel
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["pick_and_place", "look_at_obj", "pick_clean", "pick_heat", "pick_cool", "pick_two"])
def test_alfworld_generated_games_are_solved_by_the_expert(task):
    with envs.make(f"alfworld:{task}:generated") as env:
        info, turns, seen = play_oracle(env, seed=0)
        assert info["success"] and info["score"] == 1.0, seen[-3:]
        assert turns <= env.max_turns == 50
        assert "Your task is to:" in env.system_prompt()


def test_alfworld_generated_games_vary_and_reject_bad_commands():
    with envs.make("alfworld:all:generated", split="test") as env:
        tasks = set()
        for seed in range(4):
            obs, info = env.reset(seed)
            tasks.add(env._task_line)
            assert obs.startswith("-= Welcome to TextWorld, ALFRED! =-") and info["valid_actions"]
            assert all(a in info["valid_actions"] for a in env.oracle_actions())
        assert len(tasks) > 1
        obs, reward, done, info = env.step("<action>fly to the moon</action>")
        assert obs == "Nothing happens." and not done and not info["success"]
        obs, reward, done, info = env.step("I give up")
        assert info["invalid"]
    # Generation is reproducible and does not touch the caller's random stream.
    random.seed(123)
    expected = random.random()
    random.seed(123)
    with envs.make("alfworld:all:generated") as a, envs.make("alfworld:all:generated") as b:
        assert a.reset(5)[0] == b.reset(5)[0]
    assert random.random() == expected


def test_alfworld_missing_data_and_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    with pytest.raises(EnvError) as e:
        envs.make("alfworld")
    assert "alfworld-download" in one_line(e.value) and "generated" in str(e.value)
    with pytest.raises(EnvError):
        envs.make("alfworld:pick_everything")
    with pytest.raises(EnvError):
        envs.make("alfworld:all:synthetic")


# --------------------------------------------------------------------------------------------------
# WebShop: the error paths, and the wrapper's logic on a fake checkout
# --------------------------------------------------------------------------------------------------
FAKE_WEBSHOP = '''
import os

class _Server:
    goals = [{"instruction_text": f"goal {i}"} for i in range(2000)]

class WebAgentTextEnv:
    def __init__(self, observation_mode="html", num_products=None, human_goals=True):
        assert observation_mode == "text"
        self.cwd, self.num_products, self.server = os.getcwd(), num_products, _Server()

    def reset(self, session=None):
        self.session, self.page = session, "search"
        self.instruction_text = f"Instruction: find goal {session}"
        return f"WebShop [SEP] {self.instruction_text} [SEP] Search", None

    def get_available_actions(self):
        if self.page == "search":
            return {"has_search_bar": True, "clickables": ["search"]}
        return {"has_search_bar": False, "clickables": ["back to search", "b000", "buy now"]}

    def step(self, action):
        if action.startswith("search["):
            self.page = "results"
            return "results [SEP] b000 [SEP] buy now", 0.0, False, None
        if action == "click[buy now]" and self.page == "results":
            return "Thank you for shopping", (1.0 if self.session % 2 else 0.5), True, None
        return "Invalid action", 0.0, False, None
'''


def test_webshop_missing_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("WEBSHOP_PATH", raising=False)
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "WEBSHOP_PATH" in one_line(e.value) and "WebShop" in str(e.value)
    monkeypatch.setenv("WEBSHOP_PATH", str(tmp_path))
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "not a WebShop checkout" in one_line(e.value)


def test_webshop_wrapper_on_a_fake_checkout(tmp_path, monkeypatch):
    pkg = tmp_path / "web_agent_site" / "envs"
    pkg.mkdir(parents=True)
    (tmp_path / "web_agent_site" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_WEBSHOP))
    monkeypatch.setenv("WEBSHOP_PATH", str(tmp_path))
    monkeypatch.delitem(sys.modules, "web_agent_site", raising=False)
    monkeypatch.delitem(sys.modules, "web_agent_site.envs", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    cwd = os.getcwd()
    env = envs.make("webshop:num_products=1000", split="test")
    assert os.getcwd() == cwd and env._env.cwd == str(tmp_path) and env._env.num_products == 1000
    assert env.max_turns == 15 and env.oracle_actions() is None
    obs, info = env.reset(1)
    assert env.goal == 1 and info["valid_actions"][0].startswith("search[") and "goal 1" in env.system_prompt()
    obs, reward, done, info = env.step("<action>click[nothing]</action>")
    assert obs == "Invalid action" and not done
    obs, reward, done, info = env.step("<action>search[goal 1]</action>")
    assert "click[buy now]" in info["valid_actions"]
    obs, reward, done, info = env.step("<action>click[buy now]</action>")
    assert done and info["success"] and info["score"] == 1.0
    env.reset(2)
    env.step("<action>search[x]</action>")
    obs, reward, done, info = env.step("<action>click[buy now]</action>")
    assert done and not info["success"] and info["score"] == 0.5
    train, held = envs.make("webshop").goals, envs.make("webshop", split="heldout").goals
    assert min(train) >= 1500 and set(train).isdisjoint(held) and len(train) + len(held) == 500
    assert list(envs.make("webshop", split="dev").goals) == list(range(500, 1500))


# --------------------------------------------------------------------------------------------------
# GEM
# --------------------------------------------------------------------------------------------------
# (game, difficulty, seeds, wins needed). The oracle cannot win every board: Minesweeper can need a
# guess, a Sokoban level's shortest solution can exceed the turn limit, half the FifteenPuzzle shuffles
# have no solution (the oracle then has no plan).
GEM_CASES = [("guessthenumber", "easy", 10, 10), ("guessthenumber", "hard", 5, 5), ("mastermind", "easy", 10, 10),
             ("mastermind", "hard", 3, 3), ("towerofhanoi", "easy", 5, 5), ("towerofhanoi", "hard", 2, 2),
             ("sudoku", "easy", 5, 5), ("sudoku", "hard", 2, 2), ("sokoban", "easy", 10, 9),
             ("minesweeper", "easy", 10, 6), ("fifteenpuzzle", "easy", 10, 4)]


@pytest.mark.parametrize("game,difficulty,n,need", GEM_CASES)
def test_gem_oracle_solves(game, difficulty, n, need):
    env = envs.make(f"gem:{game}:{difficulty}")
    wins = 0
    for seed in range(n):
        info, turns, seen = play_oracle(env, seed)
        assert turns <= env.max_turns
        wins += info["success"]
        assert info["score"] == 1.0 if info["success"] else 0.0 <= info["score"] <= 1.0
    assert wins >= need, f"{game}:{difficulty} won {wins}/{n}"


def test_gem_fifteenpuzzle_oracle_wins_every_solvable_board():
    from envs.gem import _solvable

    env = envs.make("gem:fifteenpuzzle:easy")
    for seed in range(12):
        env.reset(seed)
        solvable = _solvable(env._solver._key(env._env), 2)
        info, _, _ = play_oracle(env, seed)
        assert info["success"] == solvable


def test_gem_action_format_and_feedback():
    env = envs.make("gem:towerofhanoi")  # easy by default
    obs, info = env.reset(3)
    prompt = env.system_prompt()
    assert "\\boxed" not in prompt and "<action>A C</action>" in prompt
    assert "A: [3, 2, 1]" in obs
    obs, reward, done, info = env.step("<action>B C</action>")  # moving from an empty tower: rejected
    assert "empty" in obs and not done
    obs, reward, done, info = env.step("<action>\\boxed{A C}</action>")  # an agent that boxes it itself
    assert "moved disk 1" in obs and "C: [1]" in obs
    obs, reward, done, info = env.step("no tag")
    assert info["invalid"] and env.turns == 3
    obs, reward, done, info = env.step("<action>sideways</action>")  # GEM ends the game on unparsable moves
    assert done and not info["success"] and info["score"] == 0.0


def test_gem_seeds_splits_and_global_rng():
    random.seed(7)
    import numpy as np

    np.random.seed(7)
    expected = random.random(), np.random.random()
    random.seed(7)
    np.random.seed(7)
    a, b = envs.make("gem:sokoban"), envs.make("gem:sokoban", split="test")
    first = a.reset(4)[0]
    play_oracle(a, 4)
    assert a.reset(4)[0] == first and b.reset(4)[0] != first
    assert (random.random(), np.random.random()) == expected  # GEM ran on its own random state


def test_gem_bad_names():
    with pytest.raises(EnvError) as e:
        envs.make("gem:wordle")
    assert "gem:sokoban" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        envs.make("gem:sokoban:impossible")
    assert "easy" in one_line(e.value)


def test_missing_optional_package_is_one_line():
    """With the package hidden, the wrapper names the install command (run in a clean interpreter)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["gem"] = None            # makes `import gem` fail
        sys.modules["scienceworld"] = None
        sys.modules["alfworld"] = None
        import envs
        for spec in ("gem:sokoban", "scienceworld:boil", "alfworld:all:generated"):
            try:
                envs.make(spec)
            except envs.EnvError as e:
                print(e)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stderr
    assert all("pip install -r requirements-envs.txt" in line for line in lines), lines
