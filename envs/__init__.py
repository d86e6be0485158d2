"""Environment registry: `envs.make("twx:coin", seed=0)` returns a `TextEnv` (see envs/base.py), and
`envs.check(env)` runs one through the contract every wrapper keeps (see envs/checker.py).

A spec is `family[:name][:params]`. Each family lives in its own module (imported only when used, so
optional packages stay optional) that defines `NAMES` (the valid names, empty when the family takes
none) and `make_env(name, params, split, seed, **kwargs) -> TextEnv` (keyword arguments only where the
family takes some), and, where it needs optional packages (requirements-envs.txt), `REQUIRES` (import
name -> pip package; see `missing`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from concurrent.futures import ThreadPoolExecutor

from envs.base import SPLITS, EnvError, TextEnv, not_installed, parse_action

# family -> module. Adding an environment = one module + one line here.
FAMILIES = {
    "twx": "envs.twx",
    "scienceworld": "envs.scienceworld",
    "alfworld": "envs.alfworld",
    "webshop": "envs.webshop",
    "gem": "envs.gem",
    "tau2": "envs.tau2",
}


def __getattr__(name: str):
    # `envs.check` is envs/checker.py's, imported on first use (so `python -m envs.checker` runs it afresh)
    if name == "check":
        from envs.checker import check

        return check
    raise AttributeError(f"module 'envs' has no attribute {name!r}")


def _module(family: str):
    return importlib.import_module(FAMILIES[family])


def known_specs() -> list[str]:
    """Every valid spec without params, for error messages and `--help`."""
    specs = []
    for family in FAMILIES:
        names = getattr(_module(family), "NAMES", ())
        specs += [f"{family}:{n}" for n in names] if names else [family]
    return specs


def missing(family: str) -> str | None:
    """The wrapper's one-line install hint when a package in `family`'s `REQUIRES` is not installed, else None.
    Finds the packages without importing them (cheap: the tests skip a family's tests on it)."""
    for module, package in getattr(_module(family), "REQUIRES", {}).items():
        if importlib.util.find_spec(module) is None:
            return str(not_installed(package))
    return None


def check_spec(spec: str):
    """(family, name, params, module) of a spec whose family and game exist, else a one-line EnvError; no env is
    made (a run's plan checks names before anything starts)."""
    family, _, rest = spec.partition(":")
    name, _, params = rest.partition(":")
    if family not in FAMILIES:
        raise EnvError(f"unknown env {spec!r}; known: {', '.join(FAMILIES)} (e.g. {', '.join(known_specs()[:4])})")
    module = _module(family)
    names = getattr(module, "NAMES", ())
    if names and name not in names:
        raise EnvError(f"unknown env {spec!r}; known: {', '.join(f'{family}:{n}' for n in names)}")
    return family, name, params, module


def make(spec: str, seed: int = 0, split: str = "train", **kwargs) -> TextEnv:
    """Build the environment named by `spec`. `seed` seeds the wrapper's own random draws (which game
    `reset(seed)` plays does not depend on it; envs/base.py says what does); `kwargs` go to the family's
    `make_env` (e.g. a conversational env's simulated user)."""
    family, name, params, module = check_spec(spec)
    try:
        inspect.signature(module.make_env).bind(name, params, split, int(seed), **kwargs)
    except TypeError:
        raise EnvError(f"{family} takes no keyword argument(s) {', '.join(sorted(kwargs))}") from None
    return module.make_env(name, params, split, int(seed), **kwargs)


_THREADS: ThreadPoolExecutor | None = None


def call_all(pool: list[TextEnv], fn, args: list, errors: bool = False) -> list:
    """`[fn(env, arg) for env, arg in zip(pool, args)]`, run at the same time in threads when every env of
    `pool` allows it (`TextEnv.concurrent`: its game runs in a process of its own, as TextWorld-Express's
    and ScienceWorld's JVMs, so the threads wait on those processes in parallel), else one after another.
    Results in order; the first exception is raised as it is, or with `errors` each env's exception is
    returned in its place (the others' calls still run). A batch of rollouts resets and steps its envs
    through here: one after another, 16 TextWorld-Express resets take 16 round trips to their JVMs."""
    global _THREADS
    if errors:
        fn = functools.partial(_returning_errors, fn)
    if len(pool) < 2 or not all(getattr(env, "concurrent", False) for env in pool):
        return [fn(env, arg) for env, arg in zip(pool, args)]
    if _THREADS is None:
        _THREADS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="envs")
    return list(_THREADS.map(fn, pool, args))


def _returning_errors(fn, env, arg):
    try:
        return fn(env, arg)
    except Exception as e:  # any failure of one env's game, wrapper or reply handling
        return e


__all__ = ["make", "call_all", "check", "known_specs", "missing", "TextEnv", "EnvError", "parse_action", "SPLITS",
           "FAMILIES"]
