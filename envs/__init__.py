"""Environment registry: `envs.make("twx:coin", seed=0)` returns a `TextEnv` (see envs/base.py).

A spec is `family[:name][:params]`. Each family lives in its own module (imported only when used, so
optional packages stay optional) that defines `NAMES` (the valid names, empty when the family takes
none) and `make_env(name, params, split, seed) -> TextEnv`.
"""

from __future__ import annotations

import importlib

from envs.base import SPLITS, EnvError, TextEnv, parse_action

# family -> module. Adding an environment = one module + one line here.
FAMILIES = {
    "twx": "envs.twx",
    "scienceworld": "envs.scienceworld",
    "alfworld": "envs.alfworld",
    "webshop": "envs.webshop",
    "gem": "envs.gem",
    "tau2": "envs.tau2",
}


def _module(family: str):
    return importlib.import_module(FAMILIES[family])


def known_specs() -> list[str]:
    """Every valid spec without params, for error messages and `--help`."""
    specs = []
    for family in FAMILIES:
        names = getattr(_module(family), "NAMES", ())
        specs += [f"{family}:{n}" for n in names] if names else [family]
    return specs


def make(spec: str, seed: int = 0, split: str = "train") -> TextEnv:
    """Build the environment named by `spec`; `seed` makes its internal randomness reproducible."""
    family, _, rest = spec.partition(":")
    name, _, params = rest.partition(":")
    if family not in FAMILIES:
        raise EnvError(f"unknown env {spec!r}; known: {', '.join(FAMILIES)} (e.g. {', '.join(known_specs()[:4])})")
    module = _module(family)
    names = getattr(module, "NAMES", ())
    if names and name not in names:
        raise EnvError(f"unknown env {spec!r}; known: {', '.join(f'{family}:{n}' for n in names)}")
    return module.make_env(name, params, split, int(seed))


__all__ = ["make", "known_specs", "TextEnv", "EnvError", "parse_action", "SPLITS", "FAMILIES"]
