"""The embedded default's models: tiny Qwen3 teachers and students, shipped with the project as files.

Every script's defaults run a real, small version of its method on a CPU with no downloads: TextWorld-Express
games, a byte-level BPE tokenizer of about 1.5k tokens trained on their text, one tiny Qwen3 expert per game
(the papers' "RL expert") and a smaller tiny Qwen3 student that is weak but able. They are built once by the
recipe in common/tiny_build.py and shipped in `common/tiny_models/` (Hugging Face folders, fp32 safetensors),
with `manifest.json`: each model's recipe key, its files' SHA-256, the torch version that built it and its
held-out success per game. A model's weights depend on the CPU's float kernels that trained it (a skill that
arrives as a jump lands at another step), so shipping the files is what makes every machine run the same models
and get the numbers of the docs/ pages.

This module only resolves names to those folders, checking each file against the manifest:

- `tiny` (the default student), `tiny-novice`, `tiny-small`, `tiny-expert:<game>`, `tokenizer`, and
  `tiny[-<variant>]:<suite>` / `tokenizer:<suite>` for the other suites (`gem`, `scienceworld`);
- `expert_for(env)` / `student_for(env)`: the tiny models that go with an environment spec.

`AGENT_DISTILL_TINY` chooses where the models come from: unset, the shipped folder; a folder laid out like it
(what `python -m common.tiny --rebuild --out DIR` writes); or `smoke`, the recipe's seconds-long version with
untrained models, built into `$AGENT_DISTILL_CACHE` on first use (the tests).

    python -m common.tiny                    # the shipped models' held-out table, from the manifest
    python -m common.tiny --check            # the same table measured on this machine, beside the manifest's
    python -m common.tiny --rebuild --out D  # re-make the suites from the recipe into D; --ship: into common/tiny_models
"""

from __future__ import annotations

import hashlib
import json
import os

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_models")
DEFAULT_SUITE = "twx"  # the games the scripts play with no arguments
REBUILD = "python -m common.tiny --rebuild --ship"  # the command that re-makes the shipped models


def source() -> str:
    """Where the tiny models come from: the shipped folder, another folder laid out like it, or "smoke"."""
    return os.environ.get("AGENT_DISTILL_TINY", "") or SHIPPED


def manifest(root: str | None = None) -> dict:
    """The manifest of a folder of tiny models ({"built": ..., "suites": ..., "models": ...}); under `smoke`, a
    manifest of the smoke recipe's models without files (they are built on first use)."""
    root = root or source()
    if root == "smoke":
        from common import tiny_build

        return tiny_build.catalog()
    path = os.path.join(root, "manifest.json")
    if not os.path.exists(path):
        raise ValueError(f"no tiny models in {root} (no manifest.json): unset AGENT_DISTILL_TINY for the shipped ones, "
                         f"or make them with `python -m common.tiny --rebuild --out {root}`")
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def _same_env(a: str, b: str) -> bool:
    return a == b or a.split(":")[:2] == b.split(":")[:2]


def suite_of(env_spec: str) -> str | None:
    """The suite with a tiny expert for this environment spec (its family and game), if any."""
    suites = manifest()["suites"]
    return next((s for s in suites if any(_same_env(spec, env_spec) for spec in suites[s]["games"].values())), None)


def expert_for(env_spec: str) -> str:
    """The tiny expert's name for an environment spec (`tiny-expert:<game>`)."""
    suites = manifest()["suites"]
    for suite in suites.values():
        for game, spec in suite["games"].items():
            if _same_env(spec, env_spec):
                return f"tiny-expert:{game}"
    specs = [spec for suite in suites.values() for spec in suite["games"].values()]
    raise ValueError(f"no tiny expert for env {env_spec!r}; tiny experts exist for {', '.join(specs)}: pass --teacher "
                     "(or make a suite of the recipe that is not shipped, as scienceworld: `python -m common.tiny "
                     "--rebuild --suite scienceworld --out DIR`, and run with AGENT_DISTILL_TINY=DIR)")


def student_for(env_spec: str, variant: str = "") -> str:
    """The tiny student that shares a tokenizer with the env's tiny expert: `tiny` (the default suite's,
    also for envs without a tiny expert) or `tiny:<suite>`; `tiny-<variant>[:<suite>]` for another student."""
    suite = suite_of(env_spec)
    name = f"tiny-{variant}" if variant else "tiny"
    return name if suite in (None, DEFAULT_SUITE) else f"{name}:{suite}"


def entry(name: str) -> dict:
    """The manifest entry of `tiny[-<variant>][:<suite>]`, `tiny-expert:<game>` or `tokenizer[:<suite>]`, with
    a one-line error for a name that selects nothing."""
    m = manifest()
    models, suites = m["models"], m["suites"]
    kind, _, arg = name.partition(":")
    if kind == "tiny-expert":
        experts = [n.partition(":")[2] for n in models if n.startswith("tiny-expert:")]
        if arg not in experts:
            raise ValueError(f"no tiny expert for game {arg!r}; the tiny experts are: {', '.join(experts)}")
        return models[name]
    if kind == "tokenizer" or kind == "tiny" or kind.startswith("tiny-"):
        suite = arg or DEFAULT_SUITE
        if suite not in suites:
            raise ValueError(f"unknown tiny suite {suite!r}; the suites are: {', '.join(suites)}")
        key = kind + ("" if suite == DEFAULT_SUITE else f":{suite}")
        if key not in models:
            students = [n.partition(":")[0] for n in models if n.startswith("tiny") and models[n]["suite"] == suite
                        and not n.startswith("tiny-expert")]
            raise ValueError(f"no tiny student {kind!r}; the students are: {', '.join(students)}")
        return models[key]
    raise ValueError(f"unknown tiny model {name!r}; use tiny[-<variant>][:<{'|'.join(suites)}>] or "
                     f"tiny-expert:<game> (games: {', '.join(g for s in suites.values() for g in s['games'])})")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: set = set()  # folders whose files matched the manifest in this process


def _verified(root: str, e: dict) -> str:
    """The model's folder, once each of its files matched its SHA-256 in the manifest."""
    folder = os.path.join(root, e["folder"])
    if folder in _VERIFIED:
        return folder
    fix = (f"restore it (`git checkout -- common/tiny_models`) or re-make the models ({REBUILD})" if root == SHIPPED
           else f"re-make the models (`python -m common.tiny --rebuild --out {root}`)")
    for name, digest in e["files"].items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ValueError(f"tiny model file {path} is missing: {fix}")
        if sha256(path) != digest:
            raise ValueError(f"tiny model file {path} does not match its manifest (SHA-256): {fix}")
    _VERIFIED.add(folder)
    return folder


def model_path(name: str) -> str:
    """Local folder of a tiny model (or `tokenizer[:<suite>]`): a Hugging Face folder with its tokenizer."""
    e = entry(name)
    if source() == "smoke":
        from common import tiny_build

        return tiny_build.model_path(e)
    return _verified(source(), e)


def prepare(names: list[str]) -> None:
    """Make these tiny models ready before a run loads them: check the shipped files, or under `smoke` build what
    is missing of them side by side."""
    if source() == "smoke":
        from common import tiny_build

        tiny_build.prepare([entry(n) for n in names])
    else:
        for n in names:
            model_path(n)


# --------------------------------------------------------------------------------------------------
# The held-out table
# --------------------------------------------------------------------------------------------------
def measure(names: list[str] | None = None, root: str | None = None, episodes: int | None = None,
            batch: int | None = None) -> dict:
    """The held-out table of a folder's models measured on this machine: {model: {game: rates}}, each model on its
    games' held-out seeds 0..episodes-1 (the manifest's count by default), greedy, `batch` episodes at a time (the
    build's batch by default), as the build measured it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import tiny_build

    root = root or source()
    m = manifest(root)
    out = {}
    try:
        for n, e in m["models"].items():
            if "heldout" not in e or (names is not None and n not in names):
                continue
            suite = m["suites"][e["suite"]]
            folder = _verified(root, e)
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            tok = AutoTokenizer.from_pretrained(folder)
            games = list(e["heldout"])
            rates = tiny_build.evaluate_games(model, tok, [e["heldout"][g]["env"] for g in games],
                                              range(episodes or suite["heldout_episodes"]), suite["max_turns"],
                                              batch=batch or suite["eval_batch"])
            out[n] = dict(zip(games, rates))
    finally:
        tiny_build.close_pools()
    return out


def print_table(m: dict, measured: dict | None = None, other: dict | None = None, other_name: str = "") -> None:
    """The held-out table of a manifest; with `measured` ({model: {game: rates}}) or another manifest, their
    success beside it."""
    print(f"{'model':<36} {'env':<42} {'success':>8}" + (f" {'measured':>9}" if measured else "")
          + (f" {other_name:>9}" if other else ""))
    rows = [(n, game, r["success_rate"]) for n, e in m["models"].items() for game, r in e.get("heldout", {}).items()]
    for n, game, rate in rows:
        row = f"{n:<36} {m['models'][n]['heldout'][game]['env']:<42} {rate:>8.2f}"
        if measured is not None:
            row += f" {measured[n][game]['success_rate']:>9.2f}" if n in measured else f" {'-':>9}"
        if other is not None:  # and whether the weights are the same bytes
            e = other["models"].get(n, {})
            theirs = e.get("heldout", {}).get(game)
            row += f" {theirs['success_rate']:>9.2f}" if theirs else f" {'-':>9}"
            same = e.get("files", {}).get("model.safetensors") == m["models"][n]["files"].get("model.safetensors")
            row += "   same weights" if same else "   other weights"
        print(row)
    built = next(iter(m["suites"].values())).get("built", {})
    seeds = ", ".join(f"{s} {v['heldout_episodes']}" for s, v in m["suites"].items())
    print(f"(held-out seeds per suite: {seeds}; built with torch {built.get('torch', '?')}, "
          f"{built.get('threads', '?')} thread per model)")


def main():
    import argparse
    import time

    parser = argparse.ArgumentParser(description="The tiny models: their held-out table, measured again, or rebuilt.")
    parser.add_argument("--check", action="store_true", help="measure the held-out table on this machine")
    parser.add_argument("--rebuild", action="store_true", help="re-make the suites from the recipe (common/tiny_build.py)")
    parser.add_argument("--out", default="tiny-rebuild", help="--rebuild: the folder to make them in (resumable)")
    parser.add_argument("--ship", action="store_true", help="rebuild, then replace the shipped models with them")
    parser.add_argument("--suite", action="append", help="--rebuild: only this suite (repeatable; default: the shipped "
                                                         "ones, twx and gem; scienceworld on request)")
    cli = parser.parse_args()
    if cli.rebuild or cli.ship:
        from common import tiny_build

        t0 = time.time()
        built = tiny_build.rebuild(cli.out, cli.suite)
        print(f"rebuilt in {cli.out} ({time.time() - t0:.0f}s); held-out success beside the shipped models':")
        print_table(built, other=manifest(SHIPPED), other_name="shipped")
        if cli.ship:
            tiny_build.ship(cli.out, SHIPPED)
            print(f"shipped: {SHIPPED} now holds them (commit it)")
        return
    m = manifest()
    print_table(m, measure() if cli.check else None)


if __name__ == "__main__":
    main()
