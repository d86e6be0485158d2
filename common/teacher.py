"""Model loading and token scoring for teachers and students (DESIGN.md section 3).

`token_logprobs` returns, for every trained position t of a sequence, log p(token_t | tokens_<t), and
optionally the top-k log-probs or the full log-softmax row there. It never builds the [B, T, V] logits
of a whole batch: with a 151k vocabulary those are the largest tensor of the step (B=8, T=8k: 39 GB in
fp32). Instead it keeps only the positions that are trained, and projects them through the LM head a
chunk of positions at a time, reducing each chunk to the few numbers the losses need.

`score_teacher` runs that under `torch.no_grad()` in micro-batches; `Teachers` routes each trajectory
to its own teacher (MOPD, two-phase).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from types import MethodType

import torch
from torch.utils.checkpoint import checkpoint

ALIASES = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
}
KNOWN = ", ".join([*ALIASES, "tiny", "tiny:<suite>", "tiny-expert:<game>"])


class ModelError(RuntimeError):
    """A one-line, user-facing error about a model name or a vocabulary mismatch."""


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve(name: str) -> str:
    """Alias, tiny model, local path or hub id -> something `from_pretrained` accepts."""
    if name in ALIASES:
        return ALIASES[name]
    if name == "tiny" or name.startswith(("tiny:", "tiny-expert")):
        from common import tiny  # lazy: building the tiny models needs the environments

        return tiny.model_path(name)
    if os.path.exists(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    raise ModelError(f"unknown model {name!r}: use one of {KNOWN}, a hub id (org/name) or a local directory")


def _from_pretrained(path: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only), tokenizer


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               trainable: bool = False):
    """Load (model, tokenizer). dtype None = fp32 on CPU or for a trainable model (the optimizer keeps
    fp32 weights; FSDP's MixedPrecisionPolicy computes in bf16), bf16 for a frozen model on GPU.
    A frozen model is put in eval mode with requires_grad False."""
    from huggingface_hub import constants

    path = resolve(name_or_path)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if dtype is None:
        dtype = torch.float32 if (trainable or on_cpu) else torch.bfloat16
    # Try the local files (a directory or the hub cache) first: offline, the hub client would otherwise
    # retry for half a minute before failing.
    try:
        model, tokenizer = _from_pretrained(path, dtype, local_only=True)
    except OSError:
        try:
            if os.path.isdir(path) or constants.HF_HUB_OFFLINE:
                raise OSError
            model, tokenizer = _from_pretrained(path, dtype, local_only=False)
        except OSError:
            raise ModelError(f"model {name_or_path!r} ({path}) could not be found locally or downloaded "
                             "from the hub") from None
    if device is not None:
        model.to(device)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model, tokenizer


def _vocab(obj) -> tuple[int | None, int | None, dict | None]:
    """(tokenizer length, output size, token->id dict) of a model, a tokenizer or a (model, tokenizer) pair."""
    n_tok = n_out = vocab = None
    for o in obj if isinstance(obj, (tuple, list)) else (obj,):
        if hasattr(o, "get_output_embeddings"):
            head = o.get_output_embeddings()
            n_out = getattr(head, "out_features", None) or o.config.get_text_config().vocab_size
        elif hasattr(o, "get_vocab"):
            n_tok, vocab = len(o), o.get_vocab()
    return n_tok, n_out, vocab


def check_vocab(student, teacher, names: tuple[str, str] = ("student", "teacher")) -> None:
    """Fail with a one-line error unless teacher and student share one vocabulary. Each side is a model,
    a tokenizer or a (model, tokenizer) pair; tokenizers are compared by content, models by output size
    (Qwen3 pads its 151,669-token vocabulary to 151,936 outputs, so the two numbers differ legitimately)."""
    s_tok, s_out, s_vocab = _vocab(student)
    t_tok, t_out, t_vocab = _vocab(teacher)
    same_tok = s_vocab is None or t_vocab is None or s_vocab == t_vocab
    same_out = s_out is None or t_out is None or s_out == t_out
    if not (same_tok and same_out):
        def size(n_tok, n_out):
            return ", ".join(f"{n} {what}" for n, what in ((n_tok, "tokens"), (n_out, "outputs")) if n is not None)

        extra = "" if (s_tok != t_tok or s_out != t_out) else " (same size, different tokens)"
        raise ModelError(f"teacher {names[1]!r} vocabulary ({size(t_tok, t_out)}) differs from student "
                         f"{names[0]!r} ({size(s_tok, s_out)}){extra}: distillation needs one shared tokenizer")


# ----------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """Per-token scores. logp [B, T]: log p(input_ids[b, t] | input_ids[b, :t]) where mask[b, t], else 0.
    topk_logp / topk_ids [B, T, k] (0 where not masked); full [N, V]: the log-softmax rows of the N masked
    positions in row-major order (mask.nonzero() order)."""

    logp: torch.Tensor
    topk_logp: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    full: torch.Tensor | None = None


def _chunk_stats(head_forward, h: torch.Tensor, targets: torch.Tensor, topk: int, full: bool):
    """LM head on a chunk of hidden states [n, H] -> log-prob of each target, top-k, full rows."""
    logits = head_forward(h).float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - lse.squeeze(-1)]
    if topk:
        vals, ids = logits.topk(topk, dim=-1)
        out += [vals - lse, ids]
    if full:
        out.append(logits - lse)
    return tuple(out)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, *,
                   topk: int = 0, full: bool = False, chunk_size: int = 1024) -> Scores:
    """Score the masked tokens of a right-padded batch with one forward pass of `model`.

    Differentiable when grad is enabled (the student's training forward); then each chunk is
    checkpointed, so backward keeps only hidden states, not the chunk logits."""
    mask = mask.bool().clone()
    mask[:, 0] = False  # the first token has no prediction
    rows, cols = mask.nonzero(as_tuple=True)
    targets = input_ids[rows, cols]
    head = model.get_output_embeddings()
    head_forward = head.forward  # the original, bound method

    def scoring_head(self, hidden_states):
        # Called by the model as `lm_head(hidden_states)` with hidden_states [B, T, H] (logits_to_keep=0).
        # The hidden state at t-1 predicts the token at t.
        h = hidden_states[rows, cols - 1]
        stats = []
        for i in range(0, h.shape[0], chunk_size):
            args = (head_forward, h[i:i + chunk_size], targets[i:i + chunk_size], topk, full)
            if torch.is_grad_enabled():
                stats.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
            else:
                stats.append(_chunk_stats(*args))
        if not stats:  # no masked position: empty results, still computed from h so shapes line up
            stats = [_chunk_stats(head_forward, h, targets, topk, full)]
        # Return a dict instead of logits: the model hands it back as `out.logits`. Returning it (rather
        # than stashing it aside) matters under FSDP2, which hooks the root module's outputs to unshard
        # its parameters again for backward.
        keys = ["logp"] + (["topk_logp", "topk_ids"] if topk else []) + (["full"] if full else [])
        return {k: torch.cat(v) for k, v in zip(keys, zip(*stats))}

    # Why patch the head instead of calling `model.model(...)` then the head ourselves: under FSDP2
    # (`fully_shard` on each decoder layer, then on the root), the root unit's parameters (embeddings,
    # final norm, LM head) are gathered only inside the root module's own forward call. So we run the
    # root forward and let it call our head, which reduces the hidden states to per-token statistics.
    saved = head.__dict__.get("forward")  # an instance-level forward someone else installed, if any
    head.forward = MethodType(scoring_head, head)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        if saved is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = saved

    B, T = input_ids.shape
    logp = out["logp"].new_zeros(B, T).index_put((rows, cols), out["logp"])
    scores = Scores(logp=logp, full=out.get("full"))
    if topk:
        scores.topk_logp = out["topk_logp"].new_zeros(B, T, topk).index_put((rows, cols), out["topk_logp"])
        scores.topk_ids = out["topk_ids"].new_zeros(B, T, topk).index_put((rows, cols), out["topk_ids"])
    return scores


def _is_sharded(model) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def score_teacher(model, batch: dict[str, torch.Tensor], mask: torch.Tensor, micro_batch_tokens: int = 16384,
                  topk: int = 0, full: bool = False, chunk_size: int = 1024) -> Scores:
    """`token_logprobs` without grad, in micro-batches of consecutive rows holding at most
    `micro_batch_tokens` tokens (rows x longest row, padding counted; always at least one row).
    Results are on the batch's device. Under FSDP every rank runs the same number of forward passes
    (ranks with fewer micro-batches run empty ones), as the sharded parameters are gathered collectively."""
    device = next(model.parameters()).device
    ids, attn = batch["input_ids"], batch["attention_mask"]
    lengths = attn.sum(-1).clamp(min=1).tolist()
    groups, start = [], 0  # greedy split of consecutive rows by token budget
    for i in range(1, len(lengths)):
        if (i - start + 1) * max(lengths[start:i + 1]) > micro_batch_tokens:
            groups.append((start, i))
            start = i
    if lengths:
        groups.append((start, len(lengths)))
    n_calls = len(groups)
    if _is_sharded(model):
        n = torch.tensor([n_calls], device=device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        n_calls = int(n.item())

    B, T = ids.shape
    V = model.get_output_embeddings().out_features if full else 0
    scores = Scores(logp=torch.zeros(B, T, device=ids.device),
                    topk_logp=torch.zeros(B, T, topk, device=ids.device) if topk else None,
                    topk_ids=torch.zeros(B, T, topk, dtype=torch.long, device=ids.device) if topk else None)
    fulls = []
    for j in range(n_calls):
        if j < len(groups):
            a, b = groups[j]
            L = max(lengths[a:b])  # right padding: cut the columns no row of this micro-batch uses
            s = token_logprobs(model, ids[a:b, :L].to(device), attn[a:b, :L].to(device), mask[a:b, :L].to(device),
                               topk=topk, full=full, chunk_size=chunk_size)
            scores.logp[a:b, :L] = s.logp.to(ids.device)
            if topk:
                scores.topk_logp[a:b, :L] = s.topk_logp.to(ids.device)
                scores.topk_ids[a:b, :L] = s.topk_ids.to(ids.device)
            if full:
                fulls.append(s.full.to(ids.device))
        else:  # an empty pass to keep in step with the other ranks
            one = torch.ones(1, 1, dtype=torch.long, device=device)
            token_logprobs(model, one, one, torch.zeros_like(one, dtype=torch.bool))
    if full:
        scores.full = torch.cat(fulls) if fulls else torch.zeros(0, V, device=ids.device)
    return scores


class Teachers:
    """Several frozen teachers by name; each row of a batch is scored by the teacher it names."""

    def __init__(self, models: dict, micro_batch_tokens: int = 16384):
        self.models = dict(models)
        self.micro_batch_tokens = micro_batch_tokens

    def __getitem__(self, name: str):
        return self.models[name]

    def __len__(self) -> int:
        return len(self.models)

    def score(self, batch: dict[str, torch.Tensor], mask: torch.Tensor, names_per_row: list[str],
              topk: int = 0) -> Scores:
        """Group rows by teacher, score each group with its teacher, put the results back in row order.
        Every teacher runs on every rank (possibly on no rows): FSDP needs all ranks in each forward."""
        unknown = set(names_per_row) - set(self.models)
        if unknown:
            raise ModelError(f"no teacher for {sorted(unknown)}; teachers are {sorted(self.models)}")
        B, T = batch["input_ids"].shape
        dev = batch["input_ids"].device
        out = Scores(logp=torch.zeros(B, T, device=dev),
                     topk_logp=torch.zeros(B, T, topk, device=dev) if topk else None,
                     topk_ids=torch.zeros(B, T, topk, dtype=torch.long, device=dev) if topk else None)
        for name, model in self.models.items():
            idx = torch.tensor([i for i, n in enumerate(names_per_row) if n == name], dtype=torch.long, device=dev)
            sub = {k: batch[k][idx] for k in ("input_ids", "attention_mask")}
            s = score_teacher(model, sub, mask[idx], self.micro_batch_tokens, topk=topk)
            out.logp[idx] = s.logp
            if topk:
                out.topk_logp[idx], out.topk_ids[idx] = s.topk_logp, s.topk_ids
        return out
