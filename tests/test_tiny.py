"""The embedded tiny default on its smoke recipe: built once, cached, loadable, deterministic, and the
names that select it."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import tiny
from common.teacher import load_model


def test_build_is_cached_and_loadable():
    table = tiny.build()
    assert set(table) == {g[0] for g in tiny.recipe().games}
    t0 = time.time()
    tiny.build()  # a second call finds everything on disk
    assert time.time() - t0 < 5
    for name in ["tiny"] + [f"tiny-expert:{g[0]}" for g in tiny.recipe().games]:
        model = AutoModelForCausalLM.from_pretrained(tiny.model_path(name))
        assert model.config.vocab_size == tiny.recipe().vocab_size or model.config.vocab_size > 100
    student, tok = load_model("tiny")
    teacher, _ = load_model("tiny-expert:coin")
    assert student.config.vocab_size == teacher.config.vocab_size == len(tok)
    assert sum(p.numel() for p in student.parameters()) <= sum(p.numel() for p in teacher.parameters())


def test_build_is_deterministic(tmp_path, monkeypatch):
    r = dataclasses.replace(tiny.SMOKE, games=(("simonsays", "twx:simonsays", 2, 5e-3),))
    weights = []
    for k in range(2):
        monkeypatch.setenv("AGENT_DISTILL_CACHE", str(tmp_path / str(k)))
        tiny.build(r, verbose=False)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tiny.build_dir(r), "expert-simonsays"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_recipe_change_means_a_new_folder():
    assert tiny.build_dir(tiny.SMOKE) != tiny.build_dir(dataclasses.replace(tiny.SMOKE, seed=1))


def test_expert_and_student_names():
    assert tiny.expert_for("twx:coin:numLocations=4,includeDoors=0") == "tiny-expert:coin"
    assert tiny.expert_for("twx:simonsays") == "tiny-expert:simonsays"
    assert tiny.expert_for("gem:guessthenumber:hard") == "tiny-expert:guessthenumber"
    assert tiny.student_for("twx:simonsays") == tiny.student_for("twx:sorting") == "tiny"
    assert tiny.student_for("gem:guessthenumber:hard") == "tiny:gem"
    with pytest.raises(ValueError, match="pass --teacher"):
        tiny.expert_for("twx:sorting")
    with pytest.raises(ValueError, match="no tiny expert for game 'chess'"):
        tiny.model_path("tiny-expert:chess")
    with pytest.raises(ValueError, match="unknown tiny suite 'chess'"):
        tiny.model_path("tiny:chess")


@pytest.mark.parametrize("suite", ["gem", "scienceworld"])
def test_any_env_with_an_oracle_gets_a_suite(suite):
    """GEM and ScienceWorld list no valid actions: the student's random play draws from the oracle's
    actions. Each suite has its own tokenizer, shared by its experts and its student."""
    r = tiny.recipe(suite)
    table = tiny.build(r, verbose=False)
    game, spec = r.games[0][:2]
    assert set(table) == {game} and set(table[game]) == {"teacher", "student"}
    student, tok = load_model(tiny.student_for(spec))
    teacher, teacher_tok = load_model(tiny.expert_for(spec))
    assert tok.get_vocab() == teacher_tok.get_vocab()
    assert tok.get_vocab() != load_model("tiny")[1].get_vocab()  # not the default suite's tokenizer
