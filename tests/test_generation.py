"""Batched turn generation (common/episode.py): key/value caches kept between turns give the same replies
as re-reading every prompt, when episodes skip turns (another model wrote them), start late, end, or are
cut at max_new_tokens."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import torch
from transformers import AutoTokenizer

from common import tiny
from common.episode import STUDENT, TEACHER, Episode, TurnCache, end_of_turn_id, generate_replies


def _model_that_sometimes_stops(vocab: int, eot: int):
    """A random tiny Qwen3 that closes its turn (`<|im_end|>`) whenever its favourite token's id is a
    multiple of 7, so greedy replies end at different lengths (a random model would never close its turn)."""
    model = tiny.new_model(tiny.ModelShape(hidden=32, layers=2, heads=2, kv_heads=1, mlp=64), vocab, seed=3).eval()
    # an untied random head: with the tied one a random model just repeats its last token
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32, generator=torch.Generator().manual_seed(3)))

    def stop_sometimes(module, inputs, logits):
        top = logits.max(-1)
        logits[..., eot] = torch.where(top.indices % 7 == 0, top.values + 1.0, top.values - 1.0)
        return logits

    model.lm_head.register_forward_hook(stop_sometimes)
    return model


def test_cached_turns_equal_uncached_turns():
    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    eot = end_of_turn_id(tok)
    model = _model_that_sometimes_stops(len(tok), eot)
    rng = random.Random(0)
    words = ["you", "see", "a", "coin", "door", "north", "kitchen", "take", "the", "open"]
    episodes = [Episode.start(tok, "Play the game.", " ".join(rng.choices(words, k=rng.randint(2, 30))))
                for _ in range(5)]
    caches = [TurnCache() for _ in episodes]
    ended, lengths, closed = set(), [], 0
    for turn in range(6):
        live = [i for i in range(len(episodes)) if i not in ended and not (i == 4 and turn < 2)]  # 4 starts late
        who = [i for i in live if rng.random() < 0.7]  # the others' turns are written by "another model"
        prompts = [episodes[i].ids for i in who]
        plain = generate_replies(model, tok, prompts, 6, 0.0)
        cached = generate_replies(model, tok, prompts, 6, 0.0, caches=[caches[i] for i in who])
        assert cached == plain
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
            ended.add(1)  # an ended episode's cache is simply not used again
    assert len(set(lengths)) > 2 and 0 < closed < len(lengths)  # replies of several lengths, some cut
    # the caches hold keys and values for exactly the tokens they have seen, without padding
    for c in caches:
        assert all(k.shape[2] == c.n and v.shape[2] == c.n for k, v in c.layers)


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


def test_benchmark_prints_both_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmark", "generation.py"), "--episodes", "2",
                          "--turns", "2", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "caches off" in out.stdout and "caches on" in out.stdout
    assert "identical replies with and without caches: 4 of 4" in out.stdout
