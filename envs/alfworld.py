"""ALFWorld (`alfworld[:<task>][:generated]`): household tasks in TextWorld's PDDL engine, package `alfworld`.

Six task types: pick_and_place, look_at_obj (examine an object under a desk lamp), pick_clean, pick_heat,
pick_cool, pick_two. `alfworld` plays all six, `alfworld:pick_heat` one of them (`all` names all six).

Data. The official games (from `alfworld-download`) are found through the `ALFWORLD_DATA` environment
variable (default `~/.cache/alfworld`, where `alfworld-download` puts them), in
`$ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen}`. Splits: `train` is the official train set
less every tenth game, `heldout` those tenth games (disjoint), `dev` is valid_seen (rooms seen in
training) and `test` valid_unseen (unseen rooms, the number papers report). `reset(seed)` plays game
`seed mod (games in the split)`.

Generated games (`alfworld:all:generated`, `alfworld:pick_cool:generated`): without the data, each
`reset(seed)` writes a new game from the files that ship inside the `alfworld` wheel: the PDDL domain
and text grammar, the receptacle and object lists of the AI2-THOR floor plans, the object affordances
and the goal templates. A room of the task's type (a kitchen for clean/heat/cool) gets its real
receptacles, the target object(s) and a few other objects placed where they can be, and the task's goal.
Splits: train / heldout / dev are disjoint seed ranges over the training floor plans, test uses the
floor plans ALFRED holds out. The room, its objects and the task follow from the reset seed; the make seed
(`envs.make(..., seed=)`) picks the wording of the task among the grammar's phrasings, and the expert's
random choices when it breaks a loop.

Actions are the game's commands (`go to fridge 1`, `take apple 1 from countertop 2`,
`move apple 1 to fridge 1`, `heat apple 1 with microwave 1`, `use desklamp 1`, ...); the admissible ones
are in `info["valid_actions"]`, anything else is answered "Nothing happens.". Success (score 1) is the
game's `won`. The oracle is ALFWorld's handcoded expert, run alongside the episode on what the agent
sees; it is not optimal and can fail. Default episode length: 50 turns.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import tempfile

from envs.base import EnvError, TextEnv, not_installed, private_random

NAMES = ()  # the name is an optional task type, checked by make_env
REQUIRES = {"alfworld": "alfworld", "textworld": "textworld"}  # import name -> pip package (see envs.missing)
TASK_TYPES = {"pick_and_place": "pick_and_place_simple", "look_at_obj": "look_at_obj_in_light",
              "pick_clean": "pick_clean_then_place_in_recep", "pick_heat": "pick_heat_then_place_in_recep",
              "pick_cool": "pick_cool_then_place_in_recep", "pick_two": "pick_two_obj_and_place"}
DATA_SPLITS = {"train": "train", "heldout": "train", "dev": "valid_seen", "test": "valid_unseen"}
GENERATED_SEEDS = {"train": (0, 80000), "heldout": (80000, 100000), "dev": (100000, 110000), "test": (0, 100000)}
_GAME_LISTS: dict = {}  # (data folder, split, task types) -> sorted game files, scanned once per process


class ALFWorldEnv(TextEnv):
    max_turns = 50
    max_action_chars = 300

    def __init__(self, task: str = "", source: str = "", split: str = "train", seed: int = 0):
        super().__init__(split, seed)
        if task not in ("", "all", *TASK_TYPES):
            raise EnvError(f"unknown ALFWorld task {task!r}; use one of all, {', '.join(TASK_TYPES)}")
        if source not in ("", "generated"):
            raise EnvError(f"unknown ALFWorld option {source!r}; the only one is `generated` (alfworld:all:generated)")
        try:
            with private_random(self._rng_state):  # importing TextWorld seeds NumPy's global generator
                import textworld
                from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
                from alfworld.agents.expert import HandCodedTWAgent
                from textworld.envs import PddlEnv
        except ImportError:
            raise not_installed(REQUIRES["alfworld"]) from None
        self._expert_class = HandCodedTWAgent
        self.task_types = [TASK_TYPES[task]] if task in TASK_TYPES else list(TASK_TYPES.values())
        self.task = "alfworld"
        self.generated = source == "generated"
        if self.generated:
            self._workdir = tempfile.mkdtemp(prefix="alfworld-generated-")
            self.games: list[str] = []
        else:
            self._workdir = None
            self.games = _official_games(DATA_SPLITS[split], tuple(self.task_types))
            if split in ("train", "heldout"):  # every tenth training game is held out
                self.games = [g for i, g in enumerate(self.games) if (i % 10 == 9) == (split == "heldout")]
        # facts: the handcoded expert reads the game state's facts.
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True)
        self._env = AlfredDemangler(PddlEnv(infos), shuffle=False)
        self._plan: list[str] | None = None

    def _reset(self, seed: int):
        if self.generated:
            lo, hi = GENERATED_SEEDS[self.split]
            with private_random(self._rng_state):
                gamefile = _write_generated_game(self._workdir, lo + seed % (hi - lo), self.task_types,
                                                 unseen_rooms=self.split == "test")
        else:
            gamefile = self.games[seed % len(self.games)]
        self.gamefile = gamefile
        with open(gamefile) as f:  # the grammar, carried by each game, words the put command
            grammar = json.load(f)["grammar"]
        self._put_command = ("move (object) to (receptacle)" if '"move {o} to {r}"' in grammar
                             else "put (object) in/on (receptacle)")
        self._env.load(gamefile)
        self._state = self._env.reset()
        obs = self._state.feedback
        self._task_line = obs[obs.find("Your task is to:"):].strip()
        self._expert = self._expert_class(max_steps=200)
        self._expert.reset(gamefile)  # reads the task parameters from traj_data.json beside the game
        self._expert.observe(obs)
        self._update_plan("")
        return obs, self._info()

    def _step(self, action: str):
        self._state, _, done = self._env.step(action)
        self._update_plan(action)
        return self._state.feedback, float(self._state["won"]), bool(done), self._info()

    def _update_plan(self, last_action: str) -> None:
        """Let the expert see the last step and name its next action (it must see every step)."""
        from alfworld.agents.expert.handcoded_expert import HandCodedAgentFailed, HandCodedAgentTimeout

        if self._state["won"]:
            self._plan = None
            return
        # The bundled grammar calls the put action `move X to Y`; the expert tracks its inventory by the
        # word `put`, so it is told the command in its own words.
        if last_action.startswith("move "):
            last_action = "put " + last_action[len("move "):]
        try:
            with private_random(self._rng_state):  # the expert breaks loops with random.choice
                nxt = self._expert.act(self._state, 0, self._state["won"], last_action)
        except (HandCodedAgentFailed, HandCodedAgentTimeout):
            nxt = None
        if nxt is not None and nxt not in self._state["admissible_commands"]:
            # The expert can name a command that does not apply here (e.g. closing a receptacle it left
            # behind); like ALFWorld's own expert wrapper, it then looks around and re-plans.
            nxt = "look"
        self._plan = [nxt] if nxt else None

    def _info(self) -> dict:
        won = bool(self._state["won"])
        return {"success": won, "score": float(won), "valid_actions": list(self._state["admissible_commands"]),
                "gamefile": self.gamefile}

    def system_prompt(self) -> str:
        return ("You are in a household and must solve a task by typing commands. "
                f"{self._task_line}\n"
                "Commands: look, inventory, go to (receptacle), open (receptacle), close (receptacle), "
                f"take (object) from (receptacle), {self._put_command}, examine (something), "
                "use (object), heat (object) with (receptacle), clean (object) with (receptacle), "
                "cool (object) with (receptacle). Objects and receptacles are named with a number, "
                "e.g. apple 1, countertop 2.\n"
                "Reply with one command as <action>COMMAND</action>.")

    def oracle_actions(self) -> list[str] | None:
        return list(self._plan) if self._plan else None

    def close(self) -> None:
        workdir, self._workdir = getattr(self, "_workdir", None), None
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    def __del__(self):
        self.close()


def _data_dir() -> str:
    return os.path.expanduser(os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld"))


def _official_games(data_split: str, task_types: tuple) -> list[str]:
    """The solvable games of one official split, filtered like ALFWorld's own loader."""
    root = os.path.join(_data_dir(), "json_2.1.1", data_split)
    key = (root, task_types)
    if key not in _GAME_LISTS:
        games = []
        for gamefile in sorted(glob.glob(os.path.join(root, "**", "game.tw-pddl"), recursive=True)):
            folder = os.path.dirname(gamefile)
            if "movable" in folder or "Sliced" in folder:  # not supported by ALFWorld's text engine
                continue
            try:
                with open(os.path.join(folder, "traj_data.json")) as f:
                    if json.load(f)["task_type"] not in task_types:
                        continue
                with open(gamefile) as f:
                    if not json.load(f).get("solvable"):
                        continue
            except (OSError, ValueError, KeyError):
                continue
            games.append(gamefile)
        _GAME_LISTS[key] = games
    if not _GAME_LISTS[key]:
        raise EnvError(f"no ALFWorld games in {root}: run `alfworld-download` and set ALFWORLD_DATA to its "
                       "folder, or play games generated without the data: `alfworld:all:generated`")
    return _GAME_LISTS[key]


# --------------------------------------------------------------------------------------------------
# Game generation from the files bundled in the alfworld wheel
# --------------------------------------------------------------------------------------------------
_APPLIANCE = {"pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
              "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
              "pick_cool_then_place_in_recep": ("Fridge", "Coolable")}
_ROOMS = {"pick_and_place_simple": ("Kitchen", "LivingRoom", "Bedroom", "Bathroom"),
          "pick_two_obj_and_place": ("Kitchen", "LivingRoom", "Bedroom", "Bathroom"),
          "look_at_obj_in_light": ("Bedroom",),  # the bedrooms have desk lamps
          "pick_clean_then_place_in_recep": ("Kitchen",),
          "pick_heat_then_place_in_recep": ("Kitchen",),
          "pick_cool_then_place_in_recep": ("Kitchen",)}
_LAMP_HOMES = ("Desk", "SideTable", "Dresser")


def _mangle(name: str) -> str:
    """ALFRED's object ids in PDDL-safe form (the engine's demangler turns them into `apple 1`)."""
    for a, b in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_")):
        name = name.replace(a, b)
    return name


def _recep_class(recep_id: str) -> str:
    parts = recep_id.split("|")  # e.g. Sink|-01.90|+00.97|-01.50|SinkBasin is a SinkBasin
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


def _write_generated_game(workdir: str, seed: int, task_types: list, unseen_rooms: bool) -> str:
    """Write game.tw-pddl and traj_data.json for one generated game into `workdir`; return the game file."""
    import alfworld
    import alfworld.gen.constants as C
    import alfworld.gen.goal_library as goals
    from alfworld.agents.utils.misc import add_task_to_grammar

    rng = random.Random(seed)
    layouts = os.path.join(os.path.dirname(C.__file__), "layouts")
    static = set(C.RECEPTACLES) - set(C.MOVABLE_RECEPTACLES)
    movable = {o for objs in C.VAL_RECEPTACLE_OBJECTS.values() for o in objs if "Sliced" not in o} - static
    scenes = C.TEST_SCENE_NUMBERS if unseen_rooms else C.TRAIN_SCENE_NUMBERS
    task_type = rng.choice(task_types)
    appliance, affordance = _APPLIANCE.get(task_type, (None, None))

    # Draw a room of the task's type until one can host the task (the room has what the task needs).
    for _ in range(100):
        scene = rng.choice([s for s in scenes if any(s in C.SCENE_TYPE[r] for r in _ROOMS[task_type])])
        with open(os.path.join(layouts, f"FloorPlan{scene}-openable.json")) as f:
            receps = sorted(r for r in json.load(f) if _recep_class(r) in static)
        with open(os.path.join(layouts, f"FloorPlan{scene}-objects.json")) as f:
            scene_objects = sorted(set(json.load(f)))
        rtypes = sorted({_recep_class(r) for r in receps})

        def homes(obj, exclude=()):
            return [r for r in receps if obj in C.VAL_RECEPTACLE_OBJECTS[_recep_class(r)] and _recep_class(r) not in exclude]

        if appliance and appliance not in rtypes:
            continue
        lamp_homes = [r for r in receps if _recep_class(r) in _LAMP_HOMES]
        if task_type == "look_at_obj_in_light" and ("DeskLamp" not in scene_objects or not lamp_homes):
            continue
        choices = []  # (object, parent receptacle type) pairs the task can use
        for obj in scene_objects:
            if obj not in movable or (affordance and obj not in C.VAL_ACTION_OBJECTS[affordance]):
                continue
            if task_type == "look_at_obj_in_light":
                choices += [(obj, "")] if homes(obj) else []
                continue
            for parent in rtypes:
                if parent != appliance and obj in C.VAL_RECEPTACLE_OBJECTS[parent] and homes(obj, (parent,)):
                    choices.append((obj, parent))
        if choices:
            break
    else:
        raise EnvError(f"could not generate an ALFWorld game for seed {seed}")
    obj, parent = rng.choice(choices)

    n_targets = 2 if task_type == "pick_two_obj_and_place" else 1
    others = [o for o in scene_objects if o in movable and o != obj and homes(o, (parent,))]
    placed = []  # (object id, class, receptacle id)
    for i, cls in enumerate([obj] * (n_targets + rng.randint(0, 1)) + rng.sample(others, min(8, len(others)))):
        placed.append((f"{cls}|{i:02d}|{rng.randint(0, 99):02d}", cls, rng.choice(homes(cls, (parent,)))))
    toggle = ""
    if task_type == "look_at_obj_in_light":
        toggle = "DeskLamp"
        lamp = ("DeskLamp|99|00", "DeskLamp", rng.choice(lamp_homes))

    M = _mangle
    loc = {r: f"loc|{i}" for i, r in enumerate(receps)}
    start = "loc|start"
    otypes = sorted({c for _, c, _ in placed} | ({toggle} if toggle else set()))
    objects = ["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
    objects += [f"{M(o)} - object" for o, _, _ in placed] + [f"{M(r)} - receptacle" for r in receps]
    objects += [f"{M(x)} - location" for x in [*loc.values(), start]]
    init = [f"(atLocation agent1 {M(start)})"]
    for r in receps:
        init += [f"(receptacleType {M(r)} {_recep_class(r)}Type)", f"(receptacleAtLocation {M(r)} {M(loc[r])})"]
        if _recep_class(r) in C.OPENABLE_CLASS_LIST:
            init.append(f"(openable {M(r)})")
    init += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if ot in C.VAL_RECEPTACLE_OBJECTS[rt]]
    for o, cls, r in placed:
        init += [f"(objectType {M(o)} {cls}Type)", f"(pickupable {M(o)})",
                 f"(inReceptacle {M(o)} {M(r)})", f"(objectAtLocation {M(o)} {M(loc[r])})"]
        init += [f"({a.lower()} {M(o)})" for a in ("Heatable", "Coolable", "Cleanable", "Sliceable")
                 if cls in C.VAL_ACTION_OBJECTS[a]]
        if cls in C.MOVABLE_RECEPTACLES:
            init.append(f"(isReceptacleObject {M(o)})")
    if toggle:
        o, cls, r = lamp
        objects.append(f"{M(o)} - object")
        init += [f"(objectType {M(o)} {cls}Type)", f"(toggleable {M(o)})",
                 f"(inReceptacle {M(o)} {M(r)})", f"(objectAtLocation {M(o)} {M(loc[r])})"]
    goal = goals.gdict[task_type]["pddl"].replace("#", "-").format(obj=obj, recep=parent, toggle=toggle, mrecep="")
    problem = (f"(define (problem generated_{seed})\n(:domain alfred)\n(:objects\n" + "\n".join(objects)
               + "\n)\n(:init\n" + "\n".join(init) + "\n)\n" + goal)

    traj_data = {"task_type": task_type, "scene": {"floor_plan": f"FloorPlan{scene}"},
                 "pddl_params": {"object_target": obj, "parent_target": parent, "toggle_target": toggle,
                                 "mrecep_target": "", "object_sliced": False}}
    data = os.path.join(os.path.dirname(alfworld.__file__), "data")
    with open(os.path.join(data, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(data, "alfred.twl2")) as f:
        grammar = add_task_to_grammar(f.read(), traj_data)  # picks one of the goal's task phrasings
    gamefile = os.path.join(workdir, "game.tw-pddl")
    with open(gamefile, "w") as f:
        json.dump({"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem, "solvable": True}, f)
    with open(os.path.join(workdir, "traj_data.json"), "w") as f:
        json.dump(traj_data, f)
    return gamefile


def make_env(name: str, params: str, split: str, seed: int) -> ALFWorldEnv:
    return ALFWorldEnv(name, params, split, seed)
