"""Batched turn generation (common/episode.py): key/value caches kept between turns give the same replies
as re-reading every prompt, when episodes skip turns (another model wrote them), start late, end, or are
cut at max_new_tokens."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from common import tiny, tiny_build
from common.episode import STUDENT, TEACHER, BatchCache, Episode, TurnCache, end_of_turn_id, generate_replies


def _model_that_sometimes_stops(vocab: int, eot: int):
    """A random tiny Qwen3 that closes its turn (`<|im_end|>`) whenever its favourite token's id is a
    multiple of 7, so greedy replies end at different lengths (a random model would never close its turn)."""
    model = tiny_build.new_model(tiny_build.ModelShape(hidden=32, layers=2, heads=2, kv_heads=1, mlp=64), vocab, seed=3).eval()
    # an untied random head: with the tied one a random model just repeats its last token
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32, generator=torch.Generator().manual_seed(3)))

    def stop_sometimes(module, inputs, logits):
        top = logits.max(-1)
        logits[..., eot] = torch.where(top.indices % 7 == 0, top.values + 1.0, top.values - 1.0)
        return logits

    model.lm_head.register_forward_hook(stop_sometimes)
    return model


@pytest.mark.parametrize("kind", ["episode", "batch", "batch-check-every-4", "episode-chunks-of-2"])
def test_cached_turns_equal_uncached_turns(kind):
    """Per-episode caches (TurnCache) and the fast path's BatchCache (small headroom, so that its rows are
    compacted into new buffers several times; an ended episode's row freed) against no cache at all; and the
    batch decoded two episodes at a time (`chunk`, the memory plan's --rollout-chunk), each reply its own."""
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    model = _model_that_sometimes_stops(len(tok), eot)
    rng = random.Random(0)
    words = ["you", "see", "a", "coin", "door", "north", "kitchen", "take", "the", "open"]
    episodes = [Episode.start(tok, "Play the game.", " ".join(rng.choices(words, k=rng.randint(2, 30))))
                for _ in range(5)]
    caches = [TurnCache() for _ in episodes] if kind.startswith("episode") else BatchCache(len(episodes), headroom=1.05)
    chunk = 2 if kind == "episode-chunks-of-2" else 0
    check_every = 4 if kind == "batch-check-every-4" else 1
    ended, lengths, closed, capacities = set(), [], 0, set()
    for turn in range(6):
        live = [i for i in range(len(episodes)) if i not in ended and not (i == 4 and turn < 2)]  # 4 starts late
        who = [i for i in live if rng.random() < 0.7]  # the others' turns are written by "another model"
        prompts = [episodes[i].ids for i in who]
        plain = generate_replies(model, tok, prompts, 6, 0.0)
        cached = generate_replies(model, tok, prompts, 6, 0.0, caches=[caches[i] for i in who], check_every=check_every,
                                  chunk=chunk)
        assert cached == plain
        capacities.add(getattr(caches, "capacity", None))
        for i, reply in zip(who, cached):
            lengths.append(len(reply))
            closed += int(reply[-1] == eot)
            episodes[i].append_reply(reply, STUDENT, eot)
            assert caches[i].n <= len(episodes[i])
        for i in set(live) - set(who):
            episodes[i].append_reply(tok.encode("<action>open door</action>", add_special_tokens=False) + [eot],
                                     TEACHER, eot)
        for i in live:
            episodes[i].append_observation(tok, " ".join(rng.choices(words, k=rng.randint(1, 40))))
        if turn == 3:
            ended.add(1)  # an ended episode's cache is not used again (a BatchCache row is freed)
            caches[1] = None
    assert len(set(lengths)) > 2 and 0 < closed < len(lengths)  # replies of several lengths, some cut
    if kind.startswith("episode"):  # the caches hold keys and values for exactly the tokens they have seen, no padding
        for c in filter(None, caches):
            assert all(k.shape[2] == c.n and v.shape[2] == c.n for k, v in c.layers)
    else:  # the rows were moved into larger buffers several times; each row's count = its real columns
        assert len(capacities) > 2
        assert caches.real.sum(1).tolist() == caches.n and caches.n[1] == 0



@pytest.mark.parametrize("kind", ["none", "episode", "batch"])
def test_groups_with_their_own_generators_sample_as_their_own_calls(kind):
    """One generator per prompt (atod.py: a group's episodes share one): one batched call gives each group the
    replies of a call with only its prompts and its generator, sampled at temperature 1 over several turns."""
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    model = _model_that_sometimes_stops(len(tok), eot)
    rng = random.Random(1)
    words = ["you", "see", "a", "coin", "door", "north", "kitchen", "take", "the", "open"]
    groups = [[0, 1], [2, 3, 4], [5]]
    episodes = [Episode.start(tok, "Play the game.", " ".join(rng.choices(words, k=rng.randint(2, 30)))) for _ in range(6)]
    caches = {"none": None, "episode": [TurnCache() for _ in episodes], "batch": BatchCache(len(episodes))}[kind]
    lengths = set()
    for turn in range(3):
        alone = {}
        for g, rows in enumerate(groups):  # each group alone, its generator seeded by (group, turn)
            gen = torch.Generator().manual_seed(100 * g + turn)
            alone.update(zip(rows, generate_replies(model, tok, [episodes[i].ids for i in rows], 6, 1.0, generator=gen)))
        gens = [torch.Generator().manual_seed(100 * g + turn) for g in range(len(groups))]
        together = generate_replies(model, tok, [ep.ids for ep in episodes], 6, 1.0,
                                    generator=[gens[g] for g, rows in enumerate(groups) for _ in rows],
                                    caches=None if caches is None else [caches[i] for i in range(len(episodes))])
        assert together == [alone[i] for i in range(len(episodes))]
        for ep, reply in zip(episodes, together):
            lengths.add(len(reply))
            ep.append_reply(reply, STUDENT, eot)
            ep.append_observation(tok, " ".join(rng.choices(words, k=rng.randint(1, 20))))
    assert len(lengths) > 2  # replies of several lengths: groups that end at different steps


def test_prompt_that_does_not_extend_its_cache_is_refused():
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    model = _model_that_sometimes_stops(len(tok), eot)
    ep = Episode.start(tok, "s", "o")
    cache = TurnCache()
    generate_replies(model, tok, [ep.ids], 4, 0.0, caches=[cache])
    try:
        generate_replies(model, tok, [ep.ids[:2]], 4, 0.0, caches=[cache])
    except ValueError as e:
        assert "does not extend its cache" in str(e)
    else:
        raise AssertionError("a shorter prompt was accepted")


def test_throughput_benchmark_runs_every_path_with_the_same_replies():
    """benchmark/throughput.py on the tiny shape: every generation path, scoring and the training step (with and
    without activation checkpointing) print their numbers; greedy, the cached paths give the re-read replies."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmark", "throughput.py"), "--episodes", "3",
                          "--turns", "3", "--new-tokens", "4", "--temperature", "0", "--seq-len", "64",
                          "--sequences", "2", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for path in ("reread", "episode", "batch", "generate"):
        assert f"  {path} " in out.stdout
    assert "identical replies, reread vs episode: 9 of 9" in out.stdout
    assert "identical replies, batch vs episode: 9 of 9" in out.stdout
    assert "teacher scoring" in out.stdout and "training step (activation checkpointing)" in out.stdout


def test_throughput_benchmark_bad_input_is_one_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmark", "throughput.py"), "--model", "qwen3-9b"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("error: unknown model 'qwen3-9b'")
