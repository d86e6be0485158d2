"""Check that an environment keeps the `TextEnv` contract (envs/base.py), in the manner of Gymnasium's
env checker. Run it on every wrapper you write:

    python -m envs.checker twx:coin [--split heldout] [--seeds 0 1]   # one line per failure; exit status 1
    failures = envs.check(MyEnv())          # [] when the env keeps the contract
    failures = envs.check(lambda: MyEnv())  # a factory (or a spec string) also lets it check a second instance

What it plays: for each seed, an episode of replies taken from what the env offers (the oracle's next
action, else one of `valid_actions`, else `look`); then, for the first seed, the same replies again:
after another episode, under another global random state, with malformed replies between them, with an
action no game knows between them, after a set of hostile replies, after its game process was killed
mid-episode (where the game runs in one of its own), and (with a factory) in a second instance. Each
failure is one line:
- reset and step return the contract's types, and `info` its keys and types, the same keys all episode;
- the replayed episodes equal the first one (observations, rewards, done, success, score, invalid,
  action, valid_actions), and nothing touches the caller's global random state (Python's, NumPy's);
- a malformed reply is an invalid turn: reward 0, not done, success and score unchanged, the turn
  counted, and the game not stepped (the episode goes on as if the reply had not been there); an action
  the env itself calls invalid must not step the game either;
- no hostile reply (brackets nested thousands deep, 100k characters, NUL and control characters, lone
  UTF-16 surrogates, nested or empty action tags) raises or takes longer than `max_step_s`, and the env
  plays the episode as before after them;
- where the game runs in a process of its own (`game_process()`), killing it between two turns makes the
  step in flight a one-line EnvError, and the next reset starts a new one that plays the episode as before;
  an env that `survives_process_death` (its games share one process) instead answers that step, and the rest
  of the episode, as if the process had not died;
- every valid action survives `parse_action` unchanged (the agent can write it);
- the oracle's actions are valid turns, and it wins at least one of its episodes (not every one: some
  oracles cannot win every game);
- a step after `done` is a no-op; `system_prompt()` is a non-empty string after reset, a one-line EnvError
  (or a task-free string) before it; `step` before reset is a one-line EnvError;
- the slowest reset takes at most `max_reset_s`, a step on average at most `max_step_s`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from envs.base import EPISODE_OVER, EnvError, TextEnv, parse_action

MALFORMED = ("", "I am not sure what to do.", "<action></action>", "<action>" + "x" * 2000 + "</action>",
             "<action>look\x00around</action>")
NONSENSE = "<action>xyzzy plugh</action>"  # parses, but no game knows it: its own feedback, or an invalid turn
# Replies that have crashed or stalled wrappers (JSON parsers' recursion, a quadratic tag regex, text Java or
# a tokenizer cannot encode). Each may be an invalid turn or a move the game answers, but must not raise.
HOSTILE = {
    "[ nested 3000 deep": "<action>" + "[" * 3000 + "]" * 3000 + "</action>",
    "{ nested 3000 deep": "<action>" + "{" * 3000 + "}" * 3000 + "</action>",
    "( nested 3000 deep": "<action>" + "(" * 3000 + ")" * 3000 + "</action>",
    "a call nested 2000 deep": '<action>{"name": "respond", "arguments": {"content": ' + "[" * 2000 + "]" * 2000
                               + "}}</action>",
    "[{( 60000 deep, no tag": "[{(" * 20_000,
    "100k characters in a tag": "<action>" + "x" * 100_000 + "</action>",
    "100k characters of unclosed tags": "<action>" * 12_500,
    "NUL and control characters": "<action>look\x00around\x07\x1b[0m\x9b</action>",
    "NULs around a tag": "\x00" * 1000 + "<action>\x00</action>" + "\x00" * 1000,
    "a lone surrogate": "<action>look \ud800</action>",
    "lone surrogates around a tag": "\udfff\ud800 <action>\udc00</action> \ud800",
    "an escaped lone surrogate": '<action>{"name": "respond", "arguments": {"content": "\\ud800 \\u0000"}}</action>',
    "nested action tags": "<action><action>look</action></action>",
    "an empty action tag": "<action></action>",
    "an action tag of whitespace": "<action> \n\t </action>",
}
CONTRACT_TYPES = {"success": bool, "score": float, "task": str, "invalid": bool}
COMPARED = ("success", "score", "invalid", "action", "valid_actions")  # the info keys replays must reproduce
GLOBAL_SEEDS = (1234, 98765)  # the caller's global random states the episodes are played under


def _reply(action: str) -> str:
    return f"Let me think about it.\n<action>{action}</action>"


def _global_state():
    """The caller's global random state (Python's, and NumPy's when installed), comparable with ==."""
    try:
        import numpy as np
    except ImportError:
        return random.getstate(), None
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return random.getstate(), (name, keys.tobytes(), pos, has_gauss, gauss)


def _seed_global(seed: int) -> None:
    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class _Episode:
    """What one episode showed: the reset's (observation, info), then per step (reply, obs, reward, done, info)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.start: tuple | None = None
        self.steps: list[tuple] = []
        self.from_oracle = True  # every action came from the oracle (and it had a plan at reset)
        self.complete = False  # played to its end without an exception

    @property
    def replies(self) -> list[str]:
        return [s[0] for s in self.steps]

    @property
    def done(self) -> bool:
        return bool(self.steps) and self.steps[-1][3]

    @property
    def success(self) -> bool:
        return bool(self.steps) and self.steps[-1][4]["success"]


def _view(info: dict) -> tuple:
    """The parts of `info` an episode is compared by (wrapper extras such as file paths may differ)."""
    return tuple(info.get(k) for k in COMPARED)


def _around_difference(a: str, b: str) -> str:
    """Two texts shown from a little before the first character where they differ."""
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, at - 20)
    dots = "..." if start else ""
    return f"{dots}{a[start:at + 40]!r} then {dots}{b[start:at + 40]!r}"


def _difference(a: _Episode, b: _Episode) -> str | None:
    """Where episode `b` first differs from `a`, in words, or None."""
    rows_a = [(a.start[0], 0.0, False, a.start[1])] + [s[1:] for s in a.steps]
    rows_b = [(b.start[0], 0.0, False, b.start[1])] + [s[1:] for s in b.steps]
    for turn, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        where = "the reset" if turn == 0 else f"turn {turn}"
        if ra[0] != rb[0]:
            return f"{where}: observation {_around_difference(ra[0], rb[0])}"
        if ra[1:3] != rb[1:3]:
            return f"{where}: (reward, done) {ra[1:3]} then {rb[1:3]}"
        if _view(ra[3]) != _view(rb[3]):
            keys = [k for k, x, y in zip(COMPARED, _view(ra[3]), _view(rb[3])) if x != y]
            return f"{where}: info {', '.join(keys)} differ"
    if len(rows_a) != len(rows_b):
        return f"{len(rows_a) - 1} turns then {len(rows_b) - 1}"
    return None


class _Checker:
    def __init__(self, env: TextEnv, factory, max_turns, max_reset_s, max_step_s, log):
        self.env, self.factory = env, factory
        self.max_turns = max_turns
        self.max_reset_s, self.max_step_s = max_reset_s, max_step_s
        self.log = log or (lambda line: None)
        self.failures: list[str] = []
        self.reset_s: list[float] = []
        self.step_s: list[float] = []
        self.keys: set | None = None

    def fail(self, line: str) -> None:
        if line not in self.failures:
            self.failures.append(line)

    # -- one call into the env, timed, with the caller's random state watched -------------------------
    def _call(self, what: str, fn, times: list | None):
        before = _global_state()
        start = time.perf_counter()
        try:
            out = fn()
        except Exception as e:
            self.fail(f"{what} raised {_first_line(e)}")
            return None
        finally:
            if times is not None:
                times.append(time.perf_counter() - start)
            if _global_state() != before:
                self.fail(f"{what} changed the caller's global random state; run the library's random draws "
                          "under envs.base.private_random")
        return out

    def _check_info(self, info, where: str, episode_keys: set | None) -> bool:
        if not isinstance(info, dict):
            self.fail(f"{where}: info is a {type(info).__name__}, not a dict")
            return False
        ok = True
        for key, kind in CONTRACT_TYPES.items():
            if not isinstance(info.get(key), kind):
                self.fail(f"{where}: info[{key!r}] is {info.get(key)!r}, not a {kind.__name__}")
                ok = False
        if isinstance(info.get("score"), float) and not 0.0 <= info["score"] <= 1.0:
            self.fail(f"{where}: info['score'] is {info['score']}, outside 0..1")
        if info.get("task") != self.env.task:
            self.fail(f"{where}: info['task'] is {info.get('task')!r}, not the env's task {self.env.task!r}")
        if not isinstance(info.get("action", 0), (str, type(None))):
            self.fail(f"{where}: info['action'] is {info.get('action', 'missing')!r}, not a str or None")
            ok = False
        valid = info.get("valid_actions")
        if "valid_actions" in info and not (isinstance(valid, list) and all(isinstance(a, str) for a in valid)):
            self.fail(f"{where}: info['valid_actions'] is not a list of str")
        elif valid:
            for a in valid:
                if parse_action(_reply(a), self.env.max_action_chars, self.env.ascii_only) != a:
                    self.fail(f"{where}: valid action {a[:60]!r} cannot be played: parse_action does not keep it "
                              f"(longer than {self.env.max_action_chars} chars, non-ASCII, or odd spaces)")
                    break
        if episode_keys is not None and set(info) != episode_keys:
            lacks, adds = sorted(episode_keys - set(info)), sorted(set(info) - episode_keys)
            self.fail(f"{where}: info keys differ from the reset's (lacks {lacks}, adds {adds}); "
                      "keep the same keys all episode")
        return ok

    def reset(self, seed: int, episode: _Episode) -> bool:
        out = self._call(f"reset({seed})", lambda: self.env.reset(seed), self.reset_s)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], str)):
            if out is not None:
                self.fail(f"reset({seed}) returned {type(out).__name__}, not (observation: str, info: dict)")
            return False
        obs, info = out
        if not self._check_info(info, f"reset({seed})", None):
            return False
        if info["invalid"] or info["action"] is not None:
            self.fail(f"reset({seed}): info['invalid'] must be False and info['action'] None")
        self.keys = set(info)
        episode.start = (obs, info)
        return True

    def step(self, reply: str, where: str):
        out = self._call(f"{where}: step", lambda: self.env.step(reply), self.step_s)
        if out is None:
            return None
        if not (isinstance(out, tuple) and len(out) == 4 and isinstance(out[0], str) and isinstance(out[1], float)
                and isinstance(out[2], bool)):
            self.fail(f"{where}: step returned {out!r:.80}, not (observation: str, reward: float, done: bool, info)")
            return None
        if not self._check_info(out[3], where, self.keys):
            return None
        return out

    # -- episodes ---------------------------------------------------------------------------------------
    def play(self, seed: int, replies: list[str] | None = None, insert: tuple = ()) -> _Episode:
        """An episode of `seed`: chosen replies (None) or the given ones, with the replies of `insert` before
        the first few of them (each must be an invalid turn)."""
        ep = _Episode(seed)
        if not self.reset(seed, ep):
            return ep
        prompt = self._call(f"seed {seed}: system_prompt()", self.env.system_prompt, None)
        if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
            self.fail(f"seed {seed}: system_prompt() after reset is {prompt!r:.40}, not a non-empty str")
        info = ep.start[1]
        extra = list(insert)
        turns = len(replies) if replies is not None else self.max_turns or self.env.max_turns  # GEM's: per game
        for turn in range(1, turns + 1):
            if extra and not self._invalid_turn(extra.pop(0), info, f"seed {seed}, turn {turn}"):
                return ep
            if replies is not None:
                reply, oracle = replies[turn - 1], False
            else:
                action, oracle = self._choose(info, turn, seed)
                reply = _reply(action)
                ep.from_oracle &= oracle
            out = self.step(reply, f"seed {seed}, turn {turn}")
            if out is None:
                return ep
            obs, reward, done, info = out
            if oracle and info["invalid"]:
                self.fail(f"seed {seed}, turn {turn}: the oracle's action {action!r} was an invalid turn")
            ep.steps.append((reply, obs, reward, done, info))
            if done:
                break
        ep.complete = True
        return ep

    def _choose(self, info: dict, turn: int, seed: int):
        plan = self._call(f"seed {seed}, turn {turn}: oracle_actions()", self.env.oracle_actions, None)
        if plan:
            return plan[0], True
        valid = info.get("valid_actions")
        # a fixed spread over the valid actions, so that episodes move on without an oracle
        return (valid[(7 * turn + 3) % len(valid)] if valid else "look"), False

    def _invalid_turn(self, reply: str, before: dict, where: str) -> bool:
        """Play `reply`, which must be an invalid turn; False when the episode cannot go on as before."""
        turns = self.env.turns
        out = self.step(reply, where)
        if out is None:
            return False
        obs, reward, done, info = out
        if reply == NONSENSE and not info["invalid"]:
            return False  # the game took it as a move (its own feedback): the episode may differ from here
        if not (info["invalid"] and reward == 0.0 and not done and self.env.turns == turns + 1):
            self.fail(f"{where}: the reply {reply[:30]!r} gave (reward {reward}, done {done}, "
                      f"invalid {info['invalid']}, turn counted {self.env.turns == turns + 1}); it must be an "
                      "invalid turn with reward 0 that does not end the episode")
        if (info["success"], info["score"]) != (before["success"], before["score"]):
            self.fail(f"{where}: the reply {reply[:30]!r} changed success or score")
        return True

    def after_done(self, ep: _Episode) -> None:
        final = ep.steps[-1]
        out = self.step(final[0], f"seed {ep.seed}: step after done")
        if out is None:
            return
        obs, reward, done, info = out
        if not (reward == 0.0 and done and obs == EPISODE_OVER and _view(info) == _view(final[4])):
            self.fail(f"seed {ep.seed}: a step after done gave ({obs[:30]!r}, reward {reward}, done {done}, success "
                      f"{info['success']}, score {info['score']}); it must be a no-op with reward 0")

    def hostile(self, first: _Episode) -> None:
        """Every HOSTILE reply after a reset of the first seed (a new reset when one ends the episode): none may
        raise or stall; then the first episode replayed must be as before."""
        seed = first.seed
        if not self.reset(seed, _Episode(seed)):
            return
        for name, reply in HOSTILE.items():
            start = time.perf_counter()
            out = self.step(reply, f"seed {seed}, hostile reply ({name})")
            took = time.perf_counter() - start
            if took > self.max_step_s:
                self.fail(f"seed {seed}, hostile reply ({name}): the step took {took:.1f} s (limit "
                          f"{self.max_step_s:g} s); no reply may stall the env")
            if out is not None and out[2] and not self.reset(seed, _Episode(seed)):
                return
        self.compare(first, self.play(seed, first.replies), "replaying its replies after hostile replies",
                     "no reply may leave the env changed")

    def process_death(self, first: _Episode) -> None:
        """Where the game runs in a process of its own: kill it before the first episode's last turn that reaches
        the game; that step must raise a one-line EnvError, and the next reset must replay the episode (or, with
        `survives_process_death`, the step and the rest of the episode must be as before)."""
        if self.env.game_process() is None:  # the game runs in this Python process: nothing can die apart
            return
        reaching = [i for i, s in enumerate(first.steps) if not s[4]["invalid"]]
        if not reaching:
            return
        seed, last = first.seed, reaching[-1]
        again = _Episode(seed)
        if not self.reset(seed, again):
            return
        for turn, reply in enumerate(first.replies[:last], 1):
            out = self.step(reply, f"seed {seed}, turn {turn}")
            if out is None:
                return
            again.steps.append((reply, *out))
        proc = self.env.game_process()
        proc.kill()
        proc.wait(timeout=60)
        where = f"seed {seed}, turn {last + 1}, its game process (pid {proc.pid}) killed before it"
        if getattr(self.env, "survives_process_death", False):
            for turn, reply in enumerate(first.replies[last:], last + 1):
                out = self.step(reply, f"seed {seed}, turn {turn}, its game process killed before turn {last + 1}")
                if out is None:
                    return
                again.steps.append((reply, *out))
            again.complete = True
            self.compare(first, again, "the episode after its game process was killed",
                         "replay the episode on a new process (survives_process_death)")
            return
        try:
            self.env.step(first.replies[last])
            self.fail(f"{where}: step did not raise; it must raise a one-line EnvError saying the process died")
        except EnvError as e:
            if "\n" in str(e).strip():
                self.fail(f"{where}: step raised a multi-line EnvError; make it one line")
        except Exception as e:
            self.fail(f"{where}: step raised {_first_line(e)}, not a one-line EnvError")
        self.compare(first, self.play(seed, first.replies), "replaying its replies after its game process was killed",
                     "reset must start a new process when the old one died")

    def compare(self, first: _Episode, again: _Episode, what: str, fix: str) -> None:
        if not again.complete:
            return  # its failure is already reported
        diff = _difference(first, again)
        if diff:
            self.fail(f"seed {first.seed}: {what} gives another episode ({diff}); {fix}")

    # -- the whole check --------------------------------------------------------------------------------
    def run(self, seeds) -> list[str]:
        env = self.env
        if getattr(env, "_last_info", None) is None:  # a fresh env: before the first reset
            try:
                env.system_prompt()
            except EnvError as e:
                if "\n" in str(e).strip():
                    self.fail("system_prompt() before reset raised a multi-line EnvError; make it one line")
            except Exception as e:
                self.fail(f"system_prompt() before reset raised {_first_line(e)}; make it task-free or raise a "
                          "one-line EnvError")
            try:
                env.step(_reply("look"))
                self.fail("step() before reset did not raise; it must be a one-line EnvError")
            except EnvError:
                pass
            except Exception as e:
                self.fail(f"step() before reset raised {_first_line(e)}, not a one-line EnvError")

        _seed_global(GLOBAL_SEEDS[0])
        episodes = []
        for seed in seeds:
            episodes.append(self.play(seed))
            if episodes[-1].done:
                self.after_done(episodes[-1])
        oracle = [ep for ep in episodes if ep.complete and ep.from_oracle and ep.steps]
        if oracle:
            wins = sum(ep.success for ep in oracle)
            self.log(f"oracle won {wins} of {len(oracle)} episodes")
            if not wins:
                self.fail(f"the oracle won none of its {len(oracle)} episodes (seeds "
                          f"{', '.join(str(ep.seed) for ep in oracle)}); its plans must solve the game")
        first = episodes[0]
        if first.complete:
            replies = first.replies
            if len(episodes) > 1:
                _seed_global(GLOBAL_SEEDS[0])
                self.compare(first, self.play(first.seed, replies), "replaying its replies after another episode",
                             "reset(seed) must not depend on earlier episodes")
            _seed_global(GLOBAL_SEEDS[1])
            self.compare(first, self.play(first.seed, replies), "replaying its replies under another global "
                         "random state", "run the library's random draws under envs.base.private_random")
            _seed_global(GLOBAL_SEEDS[0])
            for insert, what in ((MALFORMED, "malformed replies"), ((NONSENSE,), f"{NONSENSE}, an invalid turn,")):
                self.compare(first, self.play(first.seed, replies, insert), f"replaying its replies with {what} "
                             "between them", "an invalid turn must not step the game")
            self.hostile(first)
            self.process_death(first)
            if self.factory is not None:
                self.compare(first, self._second_instance(first), "a second instance made the same way",
                             "the episode must follow from the spec, make seed and reset seed alone")
        self._timing()
        return self.failures

    def _second_instance(self, first: _Episode) -> _Episode:
        second = self._call("making a second instance", self.factory, None)
        if second is None:
            return _Episode(first.seed)
        checked, self.env = self.env, second
        try:
            _seed_global(GLOBAL_SEEDS[0])
            return self.play(first.seed, first.replies)
        finally:
            self.env = checked
            second.close()

    def _timing(self) -> None:
        if self.reset_s:
            slowest = max(self.reset_s)
            self.log(f"reset: {len(self.reset_s)} calls, mean {sum(self.reset_s) / len(self.reset_s):.3f} s, "
                     f"max {slowest:.3f} s")
            if slowest > self.max_reset_s:
                self.fail(f"the slowest reset took {slowest:.1f} s (limit {self.max_reset_s:g} s)")
        if self.step_s:
            mean = sum(self.step_s) / len(self.step_s)
            self.log(f"step: {len(self.step_s)} calls, mean {mean * 1000:.1f} ms, max {max(self.step_s):.3f} s")
            if mean > self.max_step_s:
                self.fail(f"a step took {mean:.2f} s on average (limit {self.max_step_s:g} s)")


def check(env, seeds=(0, 1), max_turns: int | None = None, max_reset_s: float = 60.0, max_step_s: float = 5.0,
          log=None) -> list[str]:
    """Run `env` through the contract; returns one line per failure (empty: the env keeps it).

    `env` is a `TextEnv`, a spec for `envs.make` (split train, make seed 0), or a function of no arguments
    that builds one (then a second instance is checked to play the same episodes, and the env is closed at
    the end). `seeds`: the reset seeds played (two or more also check that an episode does not depend on
    the one before). `max_turns`: turns per episode (default: the env's). `log`: called with a line per
    measurement (timings, the oracle's wins). The caller's global random state is restored at the end."""
    import envs

    if isinstance(env, str):
        spec = env
        factory = lambda: envs.make(spec)  # noqa: E731
    else:
        factory = None if isinstance(env, TextEnv) else env
    caller = _global_state()
    try:
        if factory is not None:
            start = time.perf_counter()
            try:
                env = factory()
            except Exception as e:
                return [f"making the env raised {_first_line(e)}"]
            if log:
                log(f"make: {time.perf_counter() - start:.2f} s")
            if _global_state() != caller:
                return ["making the env changed the caller's global random state; run the library's random "
                        "draws under envs.base.private_random"]
        if not isinstance(env, TextEnv):
            return [f"{type(env).__name__} is not a TextEnv"]
        try:
            return _Checker(env, factory, max_turns, max_reset_s, max_step_s, log).run(list(seeds))
        finally:
            if factory is not None:
                env.close()
    finally:  # the episodes ran under the checker's own global seeds: give the caller back its state
        random.setstate(caller[0])
        if caller[1] is not None:
            import numpy as np

            name, keys, pos, has_gauss, gauss = caller[1]
            np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, gauss))


def main(argv=None) -> int:
    import envs

    parser = argparse.ArgumentParser(prog="python -m envs.checker", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="an envs.make spec, e.g. twx:coin or gem:sokoban:hard")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, default=0, help="the make seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the reset seeds to play")
    parser.add_argument("--max-turns", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    failures = check(lambda: envs.make(args.spec, seed=args.seed, split=args.split), seeds=args.seeds,
                     max_turns=args.max_turns, log=lambda line: print(f"  {line}"))
    for line in failures:
        print(f"FAIL {line}")
    verdict = f"{len(failures)} failure(s)" if failures else "keeps the contract"
    print(f"{args.spec} ({args.split}): {verdict} ({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
