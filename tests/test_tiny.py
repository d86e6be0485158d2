"""The shipped tiny models (common/tiny_models): loaded by name with no build and no network, checked against
their manifest, playing on this machine as they played where they were built, and made by today's recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from common import tiny, tiny_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shipped(monkeypatch):
    monkeypatch.delenv("AGENT_DISTILL_TINY", raising=False)  # the tests' default is the smoke recipe
    return tiny.manifest(tiny.SHIPPED)


_LOAD_ALL = """
import json, os, sys
from common.models import load_model
m = json.load(open(os.path.join("common", "tiny_models", "manifest.json")))
for name in m["models"]:
    if not name.startswith("tokenizer"):
        model, tok = load_model(name)
        assert model.config.vocab_size == len(tok), name
built = [mod for mod in ("common.tiny_build", "envs") if mod in sys.modules]
print(json.dumps([len(m["models"]), built, os.listdir(os.environ["AGENT_DISTILL_CACHE"])]))
"""


def test_shipped_models_load_by_name_with_no_build_and_no_network(tmp_path):
    """Every shipped name loads in a fresh process that has no network (offline hub) and an empty cache: nothing is
    built (the recipe and the environments are never imported) and nothing is written to the cache."""
    env = {k: v for k, v in os.environ.items() if k != "AGENT_DISTILL_TINY"}
    env.update(AGENT_DISTILL_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _LOAD_ALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, built, cache = json.loads(out.stdout.strip().splitlines()[-1])
    assert count >= 12 and built == [] and cache == [], out.stdout


def test_the_manifest_covers_every_default(shipped):
    """Each script's default student and teachers, and every suite's tokenizer, students and experts, are shipped
    with a hash for each file, the torch version that built them, and (models) their held-out success."""
    for name in ["tiny", "tiny-novice", "tiny-small", "tokenizer", "tiny-expert:simonsays", "tiny-expert:peckingorder",
                 "tiny-expert:coin", "tiny-expert:peckingorder-imperfect", "tiny-expert:coin-same-origin",
                 "tiny:gem", "tiny-expert:guessthenumber"]:
        e = tiny.entry(name)
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(e["files"]) or name == "tokenizer", name
        assert all(len(h) == 64 for h in e["files"].values())
        assert name.startswith("tokenizer") or e["heldout"], name
    assert all(s["built"]["torch"] and s["built"]["threads"] == 1 for s in shipped["suites"].values())
    assert set(shipped["suites"]) == set(tiny_build.SHIPPED_SUITES)
    assert set(shipped["models"]) == {n for s in tiny_build.SHIPPED_SUITES for n, _ in tiny_build.names(tiny_build.SUITES[s])}


def test_the_shipped_models_are_today_s_recipe(shipped):
    """A changed recipe whose models were not re-shipped fails here, with the command that re-makes them."""
    tiny_build.check_shipped(shipped)


def test_a_changed_recipe_without_reshipping_fails_with_the_rebuild_command(shipped, monkeypatch):
    import dataclasses

    changed = dataclasses.replace(tiny_build.SUITES["twx"], able_target=0.3)
    monkeypatch.setitem(tiny_build.SUITES, "twx", changed)
    with pytest.raises(ValueError, match=r"^the recipe of tiny, .* changed after the tiny models were shipped: run "
                                         r"`python -m common\.tiny --rebuild --ship`"):
        tiny_build.check_shipped(shipped)


SEEDS = 32  # held-out seeds a test plays per model and game (the manifest records 100; --check plays them all)


# ScienceWorld's env steps take about 0.1 s (it lists 400+ valid actions): its suite's table takes minutes to play,
# so `python -m common.tiny --check` measures it and the tests do not
@pytest.mark.parametrize("suite", ["twx", pytest.param("gem", marks=pytest.mark.needs_env("gem"))])
def test_shipped_heldout_success_matches_the_manifest(suite, shipped, capsys):
    """Each model, played greedily on its games' first SEEDS held-out seeds on this machine, succeeds or fails on each
    seed as the manifest records, but for at most one episode (another CPU's float kernels, or another batch's
    padding, may flip a rare near-tie). The table is printed; `python -m common.tiny --check` plays all seeds."""
    names = [n for n, e in shipped["models"].items() if e["suite"] == suite and "heldout" in e]
    measured = tiny.measure(names, episodes=SEEDS, batch=SEEDS // 2)  # two batches a game: the helper plays one
    with capsys.disabled():
        print(f"\nheld-out success of the shipped {suite} models on their first {SEEDS} seeds, manifest and this machine:")
        first = {n: {g: {**r, "success_rate": r["successes"][:SEEDS].count("1") / SEEDS} for g, r in e["heldout"].items()}
                 for n, e in shipped["models"].items() if n in names}
        tiny.print_table({**shipped, "models": {n: {**shipped["models"][n], "heldout": first[n]} for n in names}},
                         measured)
    for n in names:
        for game, want in shipped["models"][n]["heldout"].items():
            got = measured[n][game]["successes"]
            flipped = sum(a != b for a, b in zip(got, want["successes"][:SEEDS]))
            assert len(got) == SEEDS and flipped <= 1, (n, game, got, want["successes"][:SEEDS])


def _copy_of(shipped_manifest: dict, names: list[str], dst) -> str:
    """A folder laid out like the shipped one with only `names` (their files copied)."""
    models = {n: shipped_manifest["models"][n] for n in names}
    for e in models.values():
        shutil.copytree(os.path.join(tiny.SHIPPED, e["folder"]), os.path.join(dst, e["folder"]))
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump({**shipped_manifest, "models": models}, f)
    return str(dst)


def test_a_tampered_or_missing_file_is_refused_with_a_one_line_error(shipped, tmp_path, monkeypatch):
    from common.models import load_model, load_student_and_teachers

    root = _copy_of(shipped, ["tiny", "tiny-expert:simonsays"], tmp_path)
    monkeypatch.setenv("AGENT_DISTILL_TINY", root)
    monkeypatch.setattr(tiny, "_VERIFIED", set())
    load_model("tiny")  # as shipped: loads
    weights = tmp_path / "twx" / "tiny-expert-simonsays" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"^error: tiny model file .*model\.safetensors does not match its manifest"):
        load_student_and_teachers("tiny", ["tiny-expert:simonsays"], "cpu", 512)
    os.remove(tmp_path / "twx" / "tiny" / "tokenizer.json")
    monkeypatch.setattr(tiny, "_VERIFIED", set())
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing: re-make the models") as e:
        load_model("tiny")
    assert "\n" not in str(e.value)


def test_an_unknown_name_or_folder_is_a_one_line_error(shipped, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no tiny expert for game 'chess'; the tiny experts are: simonsays"):
        tiny.model_path("tiny-expert:chess")
    with pytest.raises(ValueError, match="no tiny student 'tiny-huge'; the students are: tiny, tiny-novice, tiny-small"):
        tiny.model_path("tiny-huge")
    assert tiny.student_for("gem:guessthenumber:hard", variant="novice") == "tiny-novice:gem"
    assert tiny.expert_for("twx:coin:numLocations=4,includeDoors=0") == "tiny-expert:coin"
    monkeypatch.setenv("AGENT_DISTILL_TINY", str(tmp_path))
    with pytest.raises(ValueError, match="no tiny models in .* unset AGENT_DISTILL_TINY"):
        tiny.model_path("tiny")


@pytest.mark.needs_env("gem")
def test_a_rebuild_exports_the_shipped_layout_and_ships_it(tmp_path, monkeypatch):
    """`--rebuild` (here of the smoke recipe, from the tests' cache) writes a folder laid out like the shipped one,
    which loads by name through AGENT_DISTILL_TINY; `--ship` replaces a suite of the shipped folder (a copy here)
    and keeps the others."""
    out = tmp_path / "rebuilt"
    smoke_hidden = tiny_build.recipe("gem").student.hidden
    m = tiny_build.rebuild(str(out), ["gem"], cache=tiny_build.cache_root())
    assert set(m["suites"]) == {"gem"} and "tiny:gem" in m["models"] and "tiny-expert:guessthenumber" in m["models"]
    monkeypatch.setenv("AGENT_DISTILL_TINY", str(out))
    folder = tiny.model_path("tiny:gem")
    assert folder == str(out / "gem" / "tiny") and os.path.exists(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["hidden_size"] == smoke_hidden
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny.SHIPPED, shipped, ignore=shutil.ignore_patterns("gem", "scienceworld"))
    tiny_build.ship(str(out), str(shipped))
    after = tiny.manifest(str(shipped))
    assert after["models"]["tiny:gem"]["files"] == m["models"]["tiny:gem"]["files"]
    assert after["models"]["tiny"] == tiny.manifest(tiny.SHIPPED)["models"]["tiny"]  # the twx suite untouched
    assert os.path.isdir(shipped / "gem" / "tiny") and os.path.isdir(shipped / "twx" / "tiny")


def test_the_command_line_prints_the_shipped_table(shipped):
    env = {k: v for k, v in os.environ.items() if k != "AGENT_DISTILL_TINY"}
    out = subprocess.run([sys.executable, "-m", "common.tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rate = shipped["models"]["tiny"]["heldout"]["simonsays"]["success_rate"]
    assert any(line.split()[:3] == ["tiny", "twx:simonsays", f"{rate:.2f}"] for line in lines), out.stdout
    assert "built with torch" in lines[-1]
