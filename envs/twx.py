"""TextWorld-Express games (`twx:<game>[:param=value,...]`), the fast environment of the embedded default.

Eight games: cookingworld, twc, coin, mapreader, arithmetic, sorting, simonsays, peckingorder. Game
parameters can follow the name, e.g. `twx:coin:numLocations=4,includeDoors=0`. Seeds: the game's
training fold has seeds 0-999; `train` uses 0-799 and `heldout` 800-999, `dev` and `test` are the
package's own folds (their object names never occur in the training fold).

The oracle is the package's gold action sequence, except for coin, whose gold walk uses the hidden
location of the coin: there an explorer that acts only on what it observes is the oracle (take the
coin when visible, else go through an unvisited exit, else step back along the path).
"""

from __future__ import annotations

import copy
import re

from envs.base import EnvError, JavaEnv

NAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
FOLD_SEEDS = {"train": (0, 800), "heldout": (800, 1000), "dev": (10000, 11000), "test": (20000, 21000)}
FOLD_NAME = {"train": "train", "heldout": "train", "dev": "dev", "test": "test"}

_EXIT_RE = re.compile(r"To the (North|South|East|West) you see ([^.]*)\.")
_ROOM_RE = re.compile(r"You are in the ([a-z \-]+)\.")
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


class TWXEnv(JavaEnv):
    max_turns = 30
    shared_jvm = True  # one JVM for every TextWorld-Express env of the process (JavaEnv)

    def __init__(self, game: str, params: str = "", split: str = "train", seed: int = 0):
        super().__init__(split, seed)
        self.game, self.params = game, params
        self.task = f"twx:{game}"
        self._gold: list[str] = []
        self._gold_pos = 0
        self._on_plan = True

    def _launch(self):
        try:
            from textworld_express import TextWorldExpressEnv
        except ImportError:
            raise EnvError("TextWorld-Express is missing: run `pip install textworld-express`") from None
        return TextWorldExpressEnv(envStepLimit=10_000)  # episode length is ours (max_turns)

    def _attach(self, owner):
        # the package's object without its constructor (which starts a JVM): the owner's gateway, and a game
        # (`PythonInterface`, all of a game's state) of its own in that JVM
        sim = copy.copy(owner)
        sim.server = owner._gateway.jvm.textworldexpress.runtime.PythonInterface()
        sim.runHistory = []
        return sim

    def _reset(self, seed: int):
        from py4j.protocol import Py4JJavaError

        try:
            obs, info, gold = self._in_jvm(self._sim_reset, seed, starts_episode=True)
        except (ValueError, Py4JJavaError) as e:  # the game's answer (not a lost JVM): surface it in one line
            raise EnvError(f"TextWorld-Express rejected game {self.game!r} with params {self.params!r}: "
                           f"{str(e).splitlines()[0]}") from None
        self._task_description = info["taskDescription"]
        self._gold = gold
        self._gold_pos, self._on_plan = 0, True
        self._explorer = _Explorer() if self.game == "coin" else None
        if self._explorer:
            self._explorer.observe(obs, None)
        return obs, self._info(info, 0.0)

    # the game's own calls, through JavaEnv._in_jvm (which replays them on a new JVM if this one dies)
    def _sim_reset(self, seed: int):
        lo, hi = FOLD_SEEDS[self.split]
        obs, info = self._sim.reset(seed=lo + seed % (hi - lo), gameFold=FOLD_NAME[self.split], gameName=self.game,
                                    gameParams=self.params, generateGoldPath=True)
        return obs, info, list(self._sim.getGoldActionSequence())

    def _sim_step(self, action: str):
        return self._sim.step(action)

    def _step(self, action: str):
        if self._on_plan and self._gold_pos < len(self._gold) and action == self._gold[self._gold_pos]:
            self._gold_pos += 1
        else:
            self._on_plan = False
        obs, reward, done, info = self._in_jvm(self._sim_step, action)
        if self._explorer:
            self._explorer.observe(obs, action)
        done = bool(done or info["tasksuccess"] or info["taskfailure"])
        return obs, reward / 100.0 if abs(reward) > 1 else reward, done, self._info(info, reward)

    def _info(self, info: dict, reward: float) -> dict:
        return {"success": bool(info["tasksuccess"]), "score": max(0.0, min(1.0, float(info["score"]))),
                "valid_actions": sorted(info["validActions"]), "failure": bool(info["taskfailure"])}

    def system_prompt(self) -> str:
        return (f"You are an agent in a text game. {self._task_description.strip()} "
                "Reply with one action as <action>ACTION</action>.")

    def oracle_actions(self) -> list[str] | None:
        if self._explorer:
            return [self._explorer.next_action(self._last_info.get("valid_actions", []))]
        if not self._on_plan:
            return None
        return self._gold[self._gold_pos:]


class _Explorer:
    """Coin's observation-only expert: depth-first search over rooms, taking the coin on sight."""

    def __init__(self):
        self.room: str | None = None
        self.exits: dict[str, dict[str, str]] = {}  # room -> direction -> what is seen that way
        self.tried: dict[str, set[str]] = {}  # room -> directions already explored from it
        self.visited: set[str] = set()
        self.stack: list[str] = []  # forward moves from the start room, for backtracking
        self.backtracking = False
        self.return_now = False

    def observe(self, obs: str, action: str | None):
        m = _ROOM_RE.search(obs)
        if not m:
            return
        room = m.group(1)
        moved = action is not None and action.startswith("move ") and room != self.room
        if moved and not self.backtracking:  # arrived through a new exit
            d = action.split()[1]
            self.stack.append(d)
            self.tried.setdefault(room, set()).add(_OPPOSITE[d])
            self.return_now = room in self.visited
        self.backtracking = False
        self.room = room
        self.visited.add(room)
        self.exits[room] = {d.lower(): what for d, what in _EXIT_RE.findall(obs)}

    def next_action(self, valid: list[str]) -> str:
        if "take coin" in valid:
            return "take coin"
        if not self.return_now:
            tried = self.tried.setdefault(self.room, set())
            for d, what in sorted(self.exits.get(self.room, {}).items()):
                if d in tried:
                    continue
                if "closed" in what and f"open door to {d}" in valid:
                    self.exits[self.room][d] = "an open door"
                    return f"open door to {d}"
                if f"move {d}" in valid:
                    tried.add(d)
                    return f"move {d}"
        self.return_now = False
        if self.stack:  # dead end or a room seen before: step back the way we came
            self.backtracking = True
            return f"move {_OPPOSITE[self.stack.pop()]}"
        return "look around"


def make_env(name: str, params: str, split: str, seed: int) -> TWXEnv:
    return TWXEnv(name, params.replace(";", ","), split, seed)
