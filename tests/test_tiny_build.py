"""The tiny models' recipe (common/tiny_build.py) on its smoke version: built on demand (only what a run asks
for), cached, loadable, deterministic across processes, and the names that select it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import tiny, tiny_build
from common.models import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_is_cached_and_loadable():
    r = tiny_build.recipe()
    table = tiny_build.build()
    assert set(table) == {g[0] for g in r.games}
    assert all(set(row) == {"teacher", "student", "student-novice", "student-small"} for row in table.values())
    t0 = time.time()
    tiny_build.build()  # a second call finds everything on disk
    assert time.time() - t0 < 5
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    for name in ["tiny", "tiny-novice", "tiny-small"] + [f"tiny-expert:{g[0]}" for g in r.games]:
        model = AutoModelForCausalLM.from_pretrained(tiny.model_path(name))
        assert model.config.vocab_size == len(tok), name
    student, _ = load_model("tiny")
    small, _ = load_model("tiny-small")
    teacher, _ = load_model("tiny-expert:coin")
    size = [sum(p.numel() for p in m.parameters()) for m in (small, student, teacher)]
    assert size[0] < size[1] <= size[2]


def test_a_run_builds_only_what_it_uses(tmp_path, monkeypatch):
    """A newcomer's first run builds the tokenizer, the student and the one expert it uses, not the suite."""
    monkeypatch.setenv("AGENT_DISTILL_CACHE", str(tmp_path))
    tiny.model_path("tiny-expert:simonsays")
    root = tiny_build.build_dir(tiny_build.recipe())
    built = lambda: sorted(f.rsplit("-", 1)[0] for f in os.listdir(root) if not f.endswith(".lock"))
    assert built() == ["expert-simonsays", "tokenizer"]
    tiny.model_path("tiny-novice")
    assert built() == ["expert-simonsays", "student-novice", "tokenizer"]
    tiny.model_path("tiny")  # the able student starts from the novice, already built
    assert built() == ["expert-simonsays", "student", "student-novice", "tokenizer"]


def test_a_changed_model_rebuilds_only_itself():
    r = tiny_build.SMOKE
    other_expert = dataclasses.replace(r, games=((r.games[0][0], r.games[0][1], 3, 1e-3),) + r.games[1:])
    assert tiny_build.build_dir(other_expert) == tiny_build.build_dir(r)  # same tokenizer
    assert tiny_build.artefact_dir(other_expert, "expert-simonsays") != tiny_build.artefact_dir(r, "expert-simonsays")
    assert tiny_build.artefact_dir(other_expert, "expert-coin") == tiny_build.artefact_dir(r, "expert-coin")
    assert tiny_build.artefact_dir(other_expert, "student") == tiny_build.artefact_dir(r, "student")
    assert tiny_build.build_dir(dataclasses.replace(r, seed=1)) != tiny_build.build_dir(r)
    assert tiny_build.artefact_dir(r, "student-small") != tiny_build.artefact_dir(r, "student")
    # the able student rebuilds when its novice or its own recipe changes; the novice not with the able recipe
    assert tiny_build.artefact_dir(dataclasses.replace(r, student_steps=7), "student") != tiny_build.artefact_dir(r, "student")
    able = dataclasses.replace(r, able_target=0.5)
    assert tiny_build.artefact_dir(able, "student") != tiny_build.artefact_dir(r, "student")
    assert tiny_build.artefact_dir(able, "student-novice") == tiny_build.artefact_dir(r, "student-novice")


_BUILD = """
import dataclasses, hashlib, sys
from common import tiny_build
r = dataclasses.replace(tiny_build.SMOKE, games=(("simonsays", "twx:simonsays", 20, 5e-3),), student_steps=5, able_steps=5,
                        able_val_every=2, eval_batch=1)  # every evaluation in several batches: the helper plays some
tiny_build.HELPERS = sys.argv[2] == "1"
tiny_build.build(r, verbose=False, jobs=int(sys.argv[1]))
h = hashlib.sha1()
for what in ("tokenizer", "expert-simonsays", "student-novice", "student"):
    folder = tiny_build.artefact_dir(r, what)
    for f in sorted(("tokenizer.json", "model.safetensors")):
        try:
            h.update(open(folder + "/" + f, "rb").read())
        except FileNotFoundError:
            pass
print(h.hexdigest())
"""


def test_build_is_deterministic_across_processes_threads_and_workers(tmp_path):
    """Two processes with different hash seeds (Python's set and dict orders), thread counts (the build trains
    with one thread whatever the machine has), build workers (one model after the other, or side by side in
    two processes) and evaluation helpers (none, or one per build process) build the same bytes."""
    digests = []
    for k, (hashseed, threads, jobs, helpers) in enumerate((("1", "1", "1", "0"), ("12345", "2", "2", "1"))):
        env = dict(os.environ, AGENT_DISTILL_CACHE=str(tmp_path / str(k)), PYTHONHASHSEED=hashseed,
                   PYTHONPATH=ROOT, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _BUILD, jobs, helpers], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]


def test_a_run_builds_its_missing_models_side_by_side(tmp_path, monkeypatch):
    """prepare() (what a script calls before loading its models) builds the missing ones in worker processes,
    each once, and their threads are the build's, not the caller's."""
    monkeypatch.setenv("AGENT_DISTILL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(tiny_build, "_build_worker", lambda r, what, verbose, helpers: calls.append(what))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    class Pool:  # the worker pool, in this process, recording what it is asked
        def __init__(self, jobs, mp_context=None):
            calls.append(("jobs", jobs))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def submit(self, fn, *a):
            fn(*a)
            return type("Done", (), {"result": lambda self: None})()

    import concurrent.futures

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(tiny_build, "_build_expert", lambda *a: calls.append("expert in the caller"))
    monkeypatch.setattr(tiny_build, "_build_student", lambda *a: calls.append("student in the caller"))
    tiny.prepare(["tiny", "tiny-expert:simonsays", "tiny"])
    assert calls[0] == ("jobs", 2)
    assert calls[1:3] == ["student", "expert-simonsays"]  # the longest chain first, each model once
    seen = []
    monkeypatch.setattr(tiny_build, "_build_student", lambda *a: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny_build.build(tiny_build.recipe(), only=["student-novice"], table=False, jobs=1)
    finally:
        torch.set_num_threads(threads)
    assert seen == [tiny_build.BUILD_THREADS]


def test_expert_and_student_names():
    assert tiny.expert_for("twx:coin:numLocations=4,includeDoors=0") == "tiny-expert:coin"
    assert tiny.expert_for("twx:simonsays") == "tiny-expert:simonsays"
    assert tiny.expert_for("gem:guessthenumber:hard") == "tiny-expert:guessthenumber"
    assert tiny.student_for("twx:simonsays") == tiny.student_for("twx:sorting") == "tiny"
    assert tiny.student_for("gem:guessthenumber:hard") == "tiny:gem"
    assert tiny.student_for("gem:guessthenumber:hard", variant="small") == "tiny-small:gem"
    with pytest.raises(ValueError, match="pass --teacher"):
        tiny.expert_for("twx:sorting")
    with pytest.raises(ValueError, match="no tiny expert for game 'chess'"):
        tiny.model_path("tiny-expert:chess")
    with pytest.raises(ValueError, match="unknown tiny suite 'chess'"):
        tiny.model_path("tiny:chess")
    with pytest.raises(ValueError, match="no tiny student 'tiny-huge'"):
        tiny.model_path("tiny-huge")


@pytest.mark.parametrize("suite", [pytest.param(s, marks=pytest.mark.needs_env(s)) for s in ("gem", "scienceworld")])
def test_any_env_with_an_oracle_gets_a_suite(suite):
    """GEM and ScienceWorld list no valid actions: the student's random play draws from the oracle's
    actions. Each suite has its own tokenizer, shared by its experts and its student."""
    r = tiny_build.recipe(suite)
    game, spec = r.games[0][:2]
    table = tiny_build.build(r, verbose=False, only=[f"expert-{game}", "student"])
    assert set(table) == {game} and set(table[game]) == {"teacher", "student"}
    student, tok = load_model(tiny.student_for(spec))
    teacher, teacher_tok = load_model(tiny.expert_for(spec))
    assert tok.get_vocab() == teacher_tok.get_vocab()
    assert tok.get_vocab() != load_model("tiny")[1].get_vocab()  # not the default suite's tokenizer
    assert student.config.vocab_size == teacher.config.vocab_size == len(tok)


def test_the_default_student_is_the_novice_made_able():
    """`tiny` starts from `tiny-novice` (same shape, other weights) and records the validation that stopped
    its supervised steps, per game; the novice and the small student are trained on random play only."""
    import json

    r = tiny_build.recipe()
    novice, _ = load_model("tiny-novice")
    able, _ = load_model("tiny")
    assert novice.config.to_dict()["hidden_size"] == able.config.to_dict()["hidden_size"]
    diff = [(p - q).abs().max().item() for p, q in zip(novice.parameters(), able.parameters())]
    assert max(diff) > 0
    with open(os.path.join(tiny_build.artefact_dir(r, "student"), "tiny.json")) as f:
        info = json.load(f)
    assert info["init"] == "student-novice"
    assert set(info["validation"]) == {g[0] for g in r.games}
    assert 0 < sum(v["steps"] for v in info["validation"].values()) <= r.able_steps


class _Scripted:
    """A validation that returns scripted success rates of every game, one per game and call, and counts the calls."""

    def __init__(self, rates):
        self.rates, self.calls = {g: list(v) for g, v in rates.items()}, 0

    def __call__(self, model):
        self.calls += 1
        return {g: v.pop(0) for g, v in self.rates.items()}


def test_train_able_keeps_each_game_near_the_target():
    """A game is in the mix while its validation is below the target, out when at it, and back in when it
    falls below again (training on the others made it forget); the build stops when all are at it together."""
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    r = dataclasses.replace(tiny_build.SMOKE, able_steps=40, able_val_every=4, able_target=0.2, batch_tokens=64)
    traj = tiny_build.TextTrajectory("system", ["obs one", "obs two"], ["look", "go north"], True)
    episodes = {g: [tiny_build.render(tok, traj)] for g in ("a", "b")}
    model = tiny_build.new_model(r.student, len(tok), 0)
    #              validation after steps 4, 8, 12, 16
    val = _Scripted({"a": [0.5, 0.0, 0.3, 0.3], "b": [0.0, 0.1, 0.0, 0.2]})
    reached = tiny_build.train_able(model, episodes, val, r, tok.pad_token_id, 0, lambda *a: None)
    # steps 1-4: a, b, a, b; 5-8: b only (a at 0.5); 9-12: a, b (a forgot); 13-16: b only; stop at 16 (both at 0.2+)
    assert reached == {"a": (0.3, 2 + 2), "b": (0.2, 2 + 4 + 2 + 4)}
    assert val.calls == 4


def test_the_helper_process_plays_the_batches_as_this_process_would(monkeypatch):
    """Evaluation batches shared with the build's helper process come back as this process would play them (the
    same replies, ends and scores, in the batches' order) and with the weights of the moment: the helper plays
    with the model as it is at the call, not as it was at its first."""
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(tiny.model_path("tiny-expert:simonsays")).eval()
    specs = [g[1] for g in tiny_build.recipe().games[:2]]
    batches = [(specs[0], [0, 1, 2]), (specs[1], [3, 4]), (specs[0], [5]), (specs[1], [6, 7, 8, 9])]
    play_args = ("heldout", 6, 24, True)
    record = lambda played: [[(e.ids, e.success, e.score, e.turns) for e in eps] for eps in played]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    here, calls = [], []
    play = tiny_build._play
    monkeypatch.setattr(tiny_build, "_play", lambda m, t, spec, seeds, *a: calls.append(seeds) or play(m, t, spec, seeds, *a))
    try:
        for _ in range(2):  # the second time with other weights
            here.append(record(play(model, tok, spec, seeds, *play_args) for spec, seeds in batches))
            calls.clear()
            shared = record(tiny_build._play_batches(model, tok, batches, *play_args))
            # here the largest batch (4 seeds) and the last (1), the helper the other two (3 + 2)
            assert sorted(calls) == [[5], [6, 7, 8, 9]]
            assert shared == here[-1]
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)
        assert here[0] != here[1]  # the changed weights play other episodes
        assert len({len(e[0]) for eps in here[0] for e in eps}) > 1  # varied episodes, not all alike
    finally:
        tiny_build.close_pools()
    assert not tiny_build._HELPERS and not tiny_build._POOLS


def test_evaluate_games_matches_one_game_at_a_time(monkeypatch):
    """evaluate_games on several games gives each game what evaluate gives it alone (batches of `batch` seeds)."""
    monkeypatch.setattr(tiny_build, "HELPERS", False)  # the helper has its own test
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(tiny.model_path("tiny-expert:coin")).eval()
    specs = [g[1] for g in tiny_build.recipe().games]
    try:
        together = tiny_build.evaluate_games(model, tok, specs, range(5), 6, batch=2)
        alone = [tiny_build.evaluate(model, tok, spec, range(5), 6, batch=2) for spec in specs]
    finally:
        tiny_build.close_pools()
    assert together == alone
    assert len({(r["score"], r["episode_turns"]) for r in alone}) > 1
