"""Throughput of the three things every method here spends its time on: generating turns, scoring episodes
with a teacher, and the training step. Prints tokens/s, the share of the hardware's limit reached and
peak memory, for the models of a real run, on CPU or GPU.

Models are built from the published Qwen3 shapes with random weights and the real tokenizer (nothing is
downloaded), or the tiny student's shape (`tiny`). Random weights never close their turns, and the models
are kept from closing them anyway, so every reply has exactly --new-tokens tokens and every path does the
same work. Episodes are synthetic: a first prompt of --prompt-tokens random tokens, then --turns turns of
reply + observation (--obs-tokens), so the key/value caches kept between turns are exercised.

Turn generation, the same episodes and the same samples through each path:
  reread    generate_replies without caches: every turn re-reads the whole conversation
  episode   generate_replies with a TurnCache per episode (the scripts' default)
  batch     generate_replies with a BatchCache: buffers written in place, a look at ended replies every 8 tokens
  generate  transformers' model.generate on the whole conversation, each turn (left padded)
The share of the memory-bandwidth limit is the time the device needs to read the weights once per decoding
step, plus the key/value cache each step attends to, at --bandwidth (measured by a copy on the device when not
given), over the measured time. Scoring and the training step (FSDP2 as the scripts shard it, bf16 compute on
GPU) report model FLOP utilisation against --peak-tflops (a table of GPUs when not given; none on CPU).

    python benchmark/throughput.py                                         # the tiny student, CPU
    python benchmark/throughput.py --model qwen3-1.7b --teacher qwen3-8b --episodes 64 --turns 10 \\
        --new-tokens 128 --obs-tokens 128 --seq-len 4096                   # one GPU
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.dist import cleanup, setup  # noqa: E402
from common.episode import BatchCache, TurnCache, end_of_turn_id, generate_replies  # noqa: E402
from common.models import QWEN3_SHAPES, ModelError, qwen3_tokenizer, random_qwen3  # noqa: E402
from common.teacher import score_teacher, token_logprobs  # noqa: E402

PATHS = ("reread", "episode", "batch", "generate")
PARTS = ("generate", "score", "train")
# dense bf16 tensor-core peaks (TFLOP/s) of common GPUs, for model FLOP utilisation
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "4090": 165.0}


@dataclass
class Args:
    model: str = "tiny"
    """the student: `tiny` (the tiny student's shape and tokenizer) or a Qwen3 size: qwen3-0.6b, qwen3-1.7b, ..."""
    teacher: str | None = None
    """the model that scores episodes (default: the same shape as --model)"""
    parts: tuple[str, ...] = PARTS
    """what to measure: generate, score, train"""
    paths: tuple[str, ...] = PATHS
    """the generation paths to compare: reread, episode, batch, generate"""
    episodes: int = 16
    """episodes generated together (one batch)"""
    turns: int = 4
    """turns per episode"""
    new_tokens: int = 24
    """tokens of every reply"""
    prompt_tokens: int = 100
    """tokens of each episode's first prompt"""
    obs_tokens: int = 40
    """tokens of each observation"""
    seq_len: int = 1024
    """tokens of each sequence that is scored or trained on"""
    sequences: int = 8
    """sequences scored, and trained on, per step"""
    micro_batch_tokens: int = 16384
    """token budget of one scoring or training forward pass (the scripts' --micro-batch-tokens)"""
    temperature: float = 1.0
    """sampling temperature of generation (0 = greedy)"""
    repeats: int = 2
    """timed repetitions of each measurement (after one warm-up); the best is printed"""
    bandwidth: float | None = None
    """device memory bandwidth in GB/s for the generation limit (default: measured by a copy)"""
    peak_tflops: float | None = None
    """device peak in TFLOP/s for model FLOP utilisation (default: from a table of GPUs; none on CPU)"""
    seed: int = 0
    """seed of the weights, the tokens and the samples"""


def load(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight model of the named shape and its tokenizer."""
    if name == "tiny":
        from transformers import AutoTokenizer

        from common import tiny, tiny_build

        tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
        model = tiny_build.new_model(tiny_build.SUITES["twx"].student, len(tok), seed=seed).to(device, dtype)
        return model.eval().requires_grad_(False), tok
    return random_qwen3(name, device, dtype, seed).eval().requires_grad_(False), qwen3_tokenizer()


def never_close(model, eot: int):
    """Keep the model from ending its replies, so that every path generates the same number of tokens."""
    def hook(module, inputs, logits):
        logits[..., eot] = float("-inf")
        return logits

    return model.get_output_embeddings().register_forward_hook(hook)


def timed(fn, device, repeats: int):
    """(result, best seconds over `repeats` runs after a warm-up, peak GPU memory in GiB or None)."""
    fn()
    best, result = float("inf"), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return result, best, peak


def measured_bandwidth(device: torch.device) -> float:
    """GB/s of a large copy on the device (bytes read + written)."""
    x = torch.empty(2**28 if device.type == "cuda" else 2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    _, seconds, _ = timed(lambda: y.copy_(x), device, 5)
    return 2 * x.numel() / seconds / 1e9


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def flops_per_token(model, context: float) -> float:
    """Forward FLOPs per token: 2 per weight of the matmuls (embedding lookup excluded, LM head included) and
    the attention's two products over `context` keys on average."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if c.tie_word_embeddings:
        matmul += model.get_output_embeddings().weight.numel()
    return 2 * matmul + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * context


# ----------------------------------------------------------------------------------------------------
# Turn generation
# ----------------------------------------------------------------------------------------------------
def play(model, tok, args: Args, path: str, device) -> tuple[list, int, float]:
    """The synthetic episodes through one path: (replies per turn, generated tokens, bytes the limit reads)."""
    g = torch.Generator().manual_seed(args.seed)
    vocab = min(len(tok), model.config.vocab_size) - 300  # ordinary tokens, below the special ones

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    prompts = [tokens(args.prompt_tokens) for _ in range(args.episodes)]
    caches = {"episode": [TurnCache() for _ in prompts], "batch": BatchCache(len(prompts))}.get(path)
    eot, pad = end_of_turn_id(tok), tok.pad_token_id if tok.pad_token_id is not None else end_of_turn_id(tok)
    replies, generated, limit_bytes = [], 0, 0
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model)
    for turn in range(args.turns):
        sampler = torch.Generator(device=device).manual_seed(args.seed * 1000 + turn)
        if path == "generate":
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            out = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=args.temperature > 0,
                                 temperature=args.temperature or None, top_p=None, top_k=None, pad_token_id=pad)
            out = [row[width:].tolist() for row in out]
        else:
            out = generate_replies(model, tok, prompts, args.new_tokens, args.temperature, generator=sampler,
                                   caches=None if path == "reread" else [caches[i] for i in range(len(prompts))],
                                   check_every=8 if path == "batch" else 1)
        replies.append(out)
        context = sum(len(p) for p in prompts)
        for step in range(args.new_tokens):  # each decoding step reads the weights and every episode's cache
            limit_bytes += weights + per_token * (context + step * len(prompts))
        for p, r in zip(prompts, out):
            generated += len(r)
            p += r + [eot] + tokens(args.obs_tokens)
    return replies, generated, limit_bytes


def bench_generation(model, tok, args: Args, device, bandwidth: float):
    print(f"turn generation: {args.episodes} episodes x {args.turns} turns of {args.new_tokens} new tokens "
          f"(first prompt {args.prompt_tokens}, observations {args.obs_tokens} tokens)")
    results = {}
    for path in args.paths:
        (replies, generated, limit_bytes), seconds, peak = timed(lambda: play(model, tok, args, path, device), device,
                                                                 args.repeats)
        results[path] = replies
        share = limit_bytes / (bandwidth * 1e9) / seconds
        print(f"  {path:9s} {seconds:8.2f} s {generated / seconds:10.0f} tokens/s  {100 * share:5.1f}% of the "
              f"bandwidth limit  peak {_gib(peak)}")
    if "episode" in results:  # generate samples with its own generator: its replies are not comparable
        for path in ("reread", "batch"):
            if path in results:
                same = sum(a == b for x, y in zip(results["episode"], results[path]) for a, b in zip(x, y))
                print(f"  identical replies, {path} vs episode: {same} of {args.episodes * args.turns}")
    return results


# ----------------------------------------------------------------------------------------------------
# Scoring and the training step
# ----------------------------------------------------------------------------------------------------
def batch_of(args: Args, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab - 300, (args.sequences, args.seq_len), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, : args.seq_len // 4] = False  # the prompt is not scored, as in an episode
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "loss_mask": mask.to(device)}


def bench_scoring(teacher, args: Args, device, peak_tflops: float | None):
    batch = batch_of(args, teacher.config.vocab_size, device)
    _, seconds, peak = timed(lambda: score_teacher(teacher, batch, batch["loss_mask"], args.micro_batch_tokens),
                             device, args.repeats)
    tokens = batch["input_ids"].numel()
    flops = tokens * flops_per_token(teacher, args.seq_len / 2)
    print(f"teacher scoring: {args.sequences} sequences of {args.seq_len} tokens  {seconds:7.2f} s "
          f"{tokens / seconds:10.0f} tokens/s  MFU {_mfu(flops, seconds, peak_tflops)}  peak {_gib(peak)}")


def bench_training(name: str, args: Args, device, peak_tflops: float | None, checkpointing: bool):
    from guided_opd import shard  # the scripts' FSDP2 wrapping (each algorithm file has the same)

    gc.collect()  # the previous measurement's models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, _ = load(name, torch.device("cpu"), torch.float32, args.seed)
    model = shard(model.train().requires_grad_(True), device, trainable=True, activation_checkpointing=checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = batch_of(args, model.config.vocab_size, device)
    rows = max(1, args.micro_batch_tokens // args.seq_len)

    def step():
        n = batch["loss_mask"].sum()
        for i in range(0, args.sequences, rows):
            part = {k: v[i:i + rows] for k, v in batch.items()}
            logp = token_logprobs(model, part["input_ids"], part["attention_mask"], part["loss_mask"]).logp
            (-logp.sum() / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _, seconds, peak = timed(step, device, args.repeats)
    tokens = batch["input_ids"].numel()
    flops = 3 * tokens * flops_per_token(model, args.seq_len / 2)  # forward + backward (recomputation not counted)
    print(f"training step{' (activation checkpointing)' if checkpointing else ''}: {args.sequences} sequences of "
          f"{args.seq_len} tokens  {seconds:7.2f} s {tokens / seconds:10.0f} tokens/s  "
          f"MFU {_mfu(flops, seconds, peak_tflops)}  peak {_gib(peak)}")


def _gib(peak) -> str:
    return "-" if peak is None else f"{peak:.1f} GiB"


def _mfu(flops: float, seconds: float, peak_tflops: float | None) -> str:
    return "-" if not peak_tflops else f"{100 * flops / seconds / (peak_tflops * 1e12):.1f}%"


def main():
    args = tyro.cli(Args)
    known = ("tiny", *QWEN3_SHAPES)
    for name in (args.model, args.teacher or args.model):
        if name not in known:
            raise SystemExit(f"error: unknown model {name!r}; use one of {', '.join(known)}")
    for what, given, allowed in (("--parts", args.parts, PARTS), ("--paths", args.paths, PATHS)):
        if not set(given) <= set(allowed):
            raise SystemExit(f"error: {what} takes {', '.join(allowed)}")
    if min(args.episodes, args.turns, args.new_tokens, args.prompt_tokens, args.seq_len, args.sequences,
           args.repeats) < 1 or args.obs_tokens < 0:
        raise SystemExit("error: counts must be at least 1 (--obs-tokens 0 or more)")
    _, _, device = setup()  # a process group of one: the training step runs under FSDP2 as in the scripts
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    bandwidth = args.bandwidth or measured_bandwidth(device)
    print(f"{name}, {dtype}, {torch.get_num_threads()} threads; bandwidth {bandwidth:.0f} GB/s"
          f"{'' if args.bandwidth else ' (measured)'}; peak {peak_tflops or '-'} TFLOP/s")
    try:
        if "generate" in args.parts:
            model, tok = load(args.model, device, dtype, args.seed)
            hook = never_close(model, end_of_turn_id(tok))
            print(f"student {args.model}: {weight_bytes(model) / 2**30:.2f} GiB of weights, "
                  f"{kv_bytes_per_token(model) / 2**10:.0f} KiB of key/value cache per token")
            bench_generation(model, tok, args, device, bandwidth)
            hook.remove()
            del model
        if "score" in args.parts:
            teacher, _ = load(args.teacher or args.model, device, dtype, args.seed + 2)
            print(f"teacher {args.teacher or args.model}: {weight_bytes(teacher) / 2**30:.2f} GiB of weights")
            bench_scoring(teacher, args, device, peak_tflops)
            del teacher
        if "train" in args.parts:
            for checkpointing in (False, True):
                bench_training(args.model, args, device, peak_tflops, checkpointing)
    except torch.OutOfMemoryError:
        raise SystemExit("error: out of GPU memory: lower --episodes, --seq-len, --sequences or --micro-batch-tokens, "
                         "or take a smaller --model / --teacher") from None
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
