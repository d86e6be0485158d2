"""Token scoring for teachers and students.

`token_logprobs` returns, for every trained position t of a sequence, log p(token_t | tokens_<t), and
optionally the top-k log-probs, the log-probs of given tokens (`at`: a student at its teacher's top-k) or
the full log-softmax row there. It never builds the [B, T, V] logits
of a whole batch: with a 151k vocabulary those are the largest tensor of the step (B=8, T=8k: 39 GB in
fp32). Instead it keeps only the positions that are trained, and projects them through the LM head a
chunk of positions at a time, reducing each chunk to the few numbers the losses need.

`score_teacher` runs that under `torch.no_grad()` in micro-batches; `Teachers` routes each trajectory
to its own teacher (MOPD, two-phase).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
from torch.utils.checkpoint import checkpoint

from common.dist import all_max
from common.episode import pack_by_tokens
from common.models import ModelError

@dataclass
class Scores:
    """Per-token scores. logp [B, T]: log p(input_ids[b, t] | input_ids[b, :t]) where mask[b, t], else 0.
    topk_logp / topk_ids [B, T, k] (0 where not masked); at_logp [B, T, k]: log p of the tokens `at` named
    at each position; full [N, V]: the log-softmax rows of the N masked positions in row-major order
    (mask.nonzero() order, the first column never included)."""

    logp: torch.Tensor
    topk_logp: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    full: torch.Tensor | None = None
    at_logp: torch.Tensor | None = None


def _chunk_stats(head_forward, h: torch.Tensor, targets: torch.Tensor, topk: int, full: bool, at: torch.Tensor | None):
    """LM head on a chunk of hidden states [n, H] -> log-prob of each target, top-k, full rows, at `at` [n, k]."""
    logits = head_forward(h).float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = [logits.gather(-1, targets[:, None]).squeeze(-1) - lse.squeeze(-1)]
    if topk:
        vals, ids = logits.topk(topk, dim=-1)
        out += [vals - lse, ids]
    if full:
        out.append(logits - lse)
    if at is not None:
        out.append(logits.gather(-1, at) - lse)
    return tuple(out)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, *,
                   topk: int = 0, full: bool = False, at: torch.Tensor | None = None, chunk_size: int = 1024) -> Scores:
    """Score the masked tokens of a right-padded batch with one forward pass of `model`.

    `at` [B, T, k] (token ids) also returns the log-probs of those tokens at each masked position (MOPD's
    top-k loss scores the student at its teacher's top-k tokens). Differentiable when grad is enabled (the
    student's training forward); then each chunk is checkpointed, so backward keeps only hidden states,
    not the chunk logits."""
    mask = mask.bool().clone()
    mask[:, 0] = False  # the first token has no prediction
    rows, cols = mask.nonzero(as_tuple=True)
    targets = input_ids[rows, cols]
    at_rows = at[rows, cols].long() if at is not None else None
    head = model.get_output_embeddings()
    head_forward = head.forward  # the original, bound method

    def scoring_head(self, hidden_states):
        # Called by the model as `lm_head(hidden_states)` with hidden_states [B, T, H] (logits_to_keep=0).
        # The hidden state at t-1 predicts the token at t.
        h = hidden_states[rows, cols - 1]
        stats = []
        for i in range(0, h.shape[0], chunk_size):
            args = (head_forward, h[i:i + chunk_size], targets[i:i + chunk_size], topk, full,
                    at_rows[i:i + chunk_size] if at_rows is not None else None)
            if torch.is_grad_enabled():
                stats.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
            else:
                stats.append(_chunk_stats(*args))
        if not stats:  # no masked position: empty results, still computed from h so shapes line up
            stats = [_chunk_stats(head_forward, h, targets, topk, full, at_rows)]
        # Return a dict instead of logits: the model hands it back as `out.logits`. Returning it (rather
        # than stashing it aside) matters under FSDP2, which hooks the root module's outputs to unshard
        # its parameters again for backward.
        keys = (["logp"] + (["topk_logp", "topk_ids"] if topk else []) + (["full"] if full else [])
                + (["at_logp"] if at_rows is not None else []))
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
    if at is not None:
        scores.at_logp = out["at_logp"].new_zeros(B, T, at.shape[-1]).index_put((rows, cols), out["at_logp"])
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
    groups = pack_by_tokens(lengths, micro_batch_tokens)  # consecutive rows
    # under FSDP the sharded parameters are gathered collectively: every rank runs as many passes
    n_calls = all_max(len(groups)) if _is_sharded(model) else len(groups)

    B, T = ids.shape
    V = model.get_output_embeddings().out_features if full else 0
    scores = Scores(logp=torch.zeros(B, T, device=ids.device),
                    topk_logp=torch.zeros(B, T, topk, device=ids.device) if topk else None,
                    topk_ids=torch.zeros(B, T, topk, dtype=torch.long, device=ids.device) if topk else None)
    fulls = []
    for j in range(n_calls):
        if j < len(groups):
            a, b = groups[j][0], groups[j][-1] + 1
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
              topk: int = 0, full: bool = False) -> Scores:
        """Group rows by teacher, score each group with its teacher, put the results back in row order
        (full rows too: in the whole batch's mask order, as `score_teacher` returns them).
        Every teacher runs on every rank (possibly on no rows): FSDP needs all ranks in each forward."""
        unknown = set(names_per_row) - set(self.models)
        if unknown:
            raise ModelError(f"no teacher for {sorted(unknown)}; teachers are {sorted(self.models)}")
        B, T = batch["input_ids"].shape
        dev = batch["input_ids"].device
        out = Scores(logp=torch.zeros(B, T, device=dev),
                     topk_logp=torch.zeros(B, T, topk, device=dev) if topk else None,
                     topk_ids=torch.zeros(B, T, topk, dtype=torch.long, device=dev) if topk else None)
        if full:  # the row of out.full that each scored position gets (the first column is never scored)
            scored = mask.bool().clone()
            scored[:, 0] = False
            full_row = torch.full((B, T), -1, dtype=torch.long, device=dev)
            full_row[scored] = torch.arange(int(scored.sum()), device=dev)
        for name, model in self.models.items():
            idx = torch.tensor([i for i, n in enumerate(names_per_row) if n == name], dtype=torch.long, device=dev)
            sub = {k: batch[k][idx] for k in ("input_ids", "attention_mask")}
            s = score_teacher(model, sub, mask[idx], self.micro_batch_tokens, topk=topk, full=full)
            out.logp[idx] = s.logp
            if topk:
                out.topk_logp[idx], out.topk_ids[idx] = s.topk_logp, s.topk_ids
            if full:
                if out.full is None:
                    out.full = s.full.new_zeros(int(scored.sum()), s.full.shape[-1])
                out.full[full_row[idx][scored[idx]]] = s.full
        return out
