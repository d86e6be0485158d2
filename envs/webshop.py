"""WebShop (`webshop[:param=value,...]`): find and buy the product an instruction asks for, in a text shop.

WebShop is not a package: the wrapper drives the text environment (`web_agent_site.envs.WebAgentTextEnv`,
observation mode `text`) of a user's checkout of the upstream WebShop repository, found through the
`WEBSHOP_PATH` environment variable. The checkout must be set up as its README says (its requirements,
the product data and the search index built by its setup script); the wrapper puts the checkout on
`sys.path` and builds the environment with the checkout as working directory.

Actions: `search[query]` on a page with a search bar, `click[button]` for a button or product shown
(`click[buy now]` ends the episode). `info["valid_actions"]` lists the clicks of the current page, and
`search[<the instruction>]` where a search bar is shown (any query is valid there). Score: WebShop's reward
(0..1, the match of the bought product to the instruction), given when the agent buys; success is a
reward of 1. WebShop has no expert: `oracle_actions()` is None. Default episode length: 15 turns.

Splits over WebShop's human-written instructions (goal indexes, as in the WebShop paper): `test` 0-499,
`dev` 500-1499, `train` 1500 onward less every tenth, `heldout` those tenth instructions.
Parameter: `num_products=N` loads only the first N products (WebShop's own option; default: all the
checkout's data), e.g. `webshop:num_products=1000`.
"""

from __future__ import annotations

import os
import sys

from envs.base import EnvError, TextEnv, parse_params

NAMES = ()
PARAMS = {"num_products": 0}
TEST_GOALS, DEV_GOALS, TRAIN_START = range(0, 500), range(500, 1500), 1500
MISSING = ("WebShop is not set up: clone https://github.com/princeton-nlp/WebShop, run its setup.sh, "
           "and set WEBSHOP_PATH to the checkout")


class WebShopEnv(TextEnv):
    max_turns = 15
    max_action_chars = 300

    def __init__(self, params: str = "", split: str = "train"):
        super().__init__(split)
        opts = parse_params(params, PARAMS, f"webshop:{params}")
        self.task = "webshop"
        self._env = _load_text_env(opts["num_products"] or None)
        n_goals = len(getattr(getattr(self._env, "server", None), "goals", ())) or 12087
        train = range(TRAIN_START, n_goals)
        self.goals = {"test": TEST_GOALS, "dev": DEV_GOALS,
                      "train": [g for g in train if g % 10 != 9], "heldout": [g for g in train if g % 10 == 9]}[split]

    def _reset(self, seed: int):
        self.goal = self.goals[seed % len(self.goals)]
        obs, _ = self._env.reset(session=self.goal)
        self._instruction = str(self._env.instruction_text)
        return obs, self._info(0.0)

    def _step(self, action: str):
        obs, reward, done, _ = self._env.step(action)
        reward = float(reward or 0.0)
        return obs, reward, bool(done), self._info(reward)

    def _info(self, reward: float) -> dict:
        page = self._env.get_available_actions()
        valid = [f"click[{c}]" for c in page.get("clickables", [])]
        if page.get("has_search_bar"):
            valid.insert(0, f"search[{self._instruction}]")
        return {"success": reward >= 1.0, "score": max(0.0, min(1.0, reward)), "valid_actions": valid,
                "goal": self.goal}

    def system_prompt(self) -> str:
        return ("You are shopping in a web shop. "
                f"{self._instruction.strip()}\n"
                "Actions: search[QUERY] when the page has a search bar; click[BUTTON] for a button or product "
                "listed on the page (click[buy now] buys the selected product and ends the episode).\n"
                "Reply with one action as <action>ACTION</action>.")


def _load_text_env(num_products: int | None):
    """WebShop's text environment from the checkout at $WEBSHOP_PATH, built from inside the checkout
    (its data and search-index paths are resolved from there)."""
    path = os.environ.get("WEBSHOP_PATH")
    if not path:
        raise EnvError(MISSING)
    if not os.path.isdir(os.path.join(path, "web_agent_site")):
        raise EnvError(f"WEBSHOP_PATH={path} is not a WebShop checkout (it has no web_agent_site folder); {MISSING}")
    path = os.path.abspath(path)
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
    finally:
        os.chdir(cwd)


def make_env(name: str, params: str, split: str, seed: int) -> WebShopEnv:
    if name and not params:  # `webshop:num_products=1000`: the name slot holds the parameters
        name, params = "", name
    if name:
        raise EnvError(f"webshop takes no name, only parameters, e.g. webshop:num_products=1000 (got {name!r})")
    return WebShopEnv(params, split)
