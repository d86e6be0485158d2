"""ScienceWorld (`scienceworld:<task>[:param=value,...]`): 30 science-curriculum tasks in a Java simulator.

Names are the package's task names (`scienceworld:boil`, `scienceworld:find-animal`, ...). Each task has
numbered variations that the package splits into train / dev / test. `train` uses the package's train
variations less the last fifth of them, `heldout` is that last fifth (at least one variation), `dev` and
`test` are the package's own; `reset(seed)` plays variation `seed mod (variations in the split)`.

Parameters: `valid_actions=1` puts the list of valid actions in `info["valid_actions"]` after every
step. It is off by default because listing them (hundreds of action-object combinations) takes longer
than the step itself; `env.valid_actions()` asks for the list on demand. `simplifications=easy` (or
names joined with `+`, e.g. `openDoors+teleportAction`) passes the package's simplifications.

Score: the simulator's 0-100 task score divided by 100 (a failed task scores 0); the reward is the change
of that score; success is a completed task. The oracle is the package's gold action sequence, valid while
the agent follows it. Default episode length: 30 turns; some tasks' gold sequences are longer.
"""

from __future__ import annotations

from envs.base import EnvError, JavaEnv, call_with_timeout, not_installed, parse_params

REQUIRES = {"scienceworld": "scienceworld"}  # import name -> pip package (see envs.missing)

try:  # the task list ships as data inside the package; read it without starting Java
    from scienceworld.constants import TASKS as _TASKS

    NAMES = tuple(sorted(t["task_name"].replace("mendellian", "mendelian") for t in _TASKS))
except ImportError:
    NAMES = ()  # the missing package is reported by make_env with the install command

HELDOUT_FRACTION = 0.2
PARAMS = {"valid_actions": False, "simplifications": ""}


class ScienceWorldEnv(JavaEnv):
    max_turns = 30
    timeout_s = 120.0  # a Java call that takes longer is a hung simulator (loading a task takes ~3 s)

    def __init__(self, task_name: str, params: str = "", split: str = "train", seed: int = 0):
        opts = parse_params(params, PARAMS, f"scienceworld:{task_name}:{params}")  # before a JVM starts
        self.list_valid_actions = opts["valid_actions"]
        self.simplifications = opts["simplifications"].replace("+", ",")
        self.task_name = task_name
        super().__init__(split, seed)
        self.task = f"scienceworld:{task_name}"
        try:
            self._java(lambda: self._sim.load(task_name, 0, self.simplifications, generateGoldPath=False), "load")
        except ValueError as e:  # the package's own check of the simplifications
            self.close()
            raise EnvError(f"scienceworld:{task_name}: {str(e).splitlines()[0]}") from None
        train = list(self._server.getVariationsTrain())
        n_heldout = max(1, int(len(train) * HELDOUT_FRACTION))
        self.variations = {"train": train[:-n_heldout], "heldout": train[-n_heldout:],
                           "dev": list(self._server.getVariationsDev()),
                           "test": list(self._server.getVariationsTest())}[split]
        self._action_templates = sorted(str(a) for a in self._server.getPossibleActions())
        self._gold: list[str] = []
        self._gold_pos, self._on_plan = 0, True
        self._score = 0.0

    def _launch(self):
        try:
            from scienceworld import ScienceWorldEnv as _Simulator
        except ImportError:
            raise not_installed(REQUIRES["scienceworld"]) from None
        # The episode length is ours (max_turns), so the simulator's own step limit is set out of reach.
        return _Simulator("", envStepLimit=1_000_000)

    @property
    def _server(self):
        return self._sim.server  # the Java object; see _step for why it is called directly

    def _java(self, fn, what: str):
        """Call the simulator with a time-out that kills a hung JVM (the next reset starts a new one)."""
        return call_with_timeout(fn, self.timeout_s, f"ScienceWorld ({what}, task {self.task_name})",
                                 on_timeout=lambda: self.game_process().kill())

    def _reset(self, seed: int):
        self.variation = self.variations[seed % len(self.variations)]

        def load_and_look():
            self._sim.load(self.task_name, self.variation, self.simplifications, generateGoldPath=True)
            self._server.reset()
            return str(self._server.step("look around"))

        obs = self._java(load_and_look, "load")
        self._task_description = str(self._server.freeActionTaskDesc())
        self._gold = [str(a) for a in self._server.getGoldActionSequence()]
        self._gold_pos, self._on_plan = 0, True
        self._score = max(0.0, float(self._server.getScore()))  # some tasks credit the starting state
        return f"{self._task_description}\n{obs}", self._info(False)

    def _step(self, action: str):
        if self._on_plan and self._gold_pos < len(self._gold) and action == self._gold[self._gold_pos]:
            self._gold_pos += 1
        else:
            self._on_plan = False

        # The package's `step` also lists every valid action and reads look/inventory (about 10x the
        # cost of the step itself); we call the Java server directly and ask for the list only on demand.
        def step():
            return str(self._server.step(action)), float(self._server.getScore()), bool(self._server.getCompleted())

        obs, raw_score, completed = self._java(step, "step")
        failed = raw_score < 0  # the simulator scores a failed task -1 and ends it
        score = 0.0 if failed else min(1.0, raw_score)
        reward, self._score = score - self._score, score
        done = completed or failed
        return obs, reward, done, self._info(completed and not failed and score >= 1.0, failed)

    def _info(self, success: bool, failed: bool = False) -> dict:
        info = {"success": bool(success), "score": self._score, "failure": failed, "variation": self.variation}
        if self.list_valid_actions:
            info["valid_actions"] = self.valid_actions()
        return info

    def valid_actions(self) -> list[str]:
        """The valid actions in the current state (slow: the simulator enumerates them)."""
        return sorted(str(a) for a in self._java(self._server.getValidActionObjectCombinations, "valid actions"))

    def system_prompt(self) -> str:
        return (f"You are an agent in ScienceWorld, a text simulation of science experiments. "
                f"{self._task_description.strip()}\n"
                f"Actions (OBJ and LOC are things you see): {', '.join(self._action_templates)}.\n"
                "Reply with one action as <action>ACTION</action>.")

    def oracle_actions(self) -> list[str] | None:
        if not self._on_plan:
            return None
        return self._gold[self._gold_pos:]


def make_env(name: str, params: str, split: str, seed: int) -> ScienceWorldEnv:
    return ScienceWorldEnv(name, params, split, seed)
