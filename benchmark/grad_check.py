"""Do the sampled-token losses teach? Their gradient, averaged over many samplings, against the exact loss's.

The real-model defaults train with the papers' sampled-token losses (one sampled token y_t per position: the
exact full-vocabulary forms cost too much with 151k tokens); the tiny default trains with the exact ones. This
checks the estimators through the scripts' own code, at the student's parameters:

- fixed states: a few episodes (the tiny student playing with guided_opd.py's rollout at beta = 0, and oracle
  episodes rendered by common.tiny_build), the student's and teacher's full log-prob rows at every trained position,
  teacher-forced on the fixed sequences (the contexts stay fixed);
- at each position K tokens y ~ pi_s(.|context), independently; the batch is replicated K times, replica k
  holding the k-th draw at every position, and goes through the script's own loss function (guided_opd_loss,
  mopd_loss, atod_loss with their per-token terms) with the student's log-probs gathered from the
  differentiable full log-softmax rows; reduced as the script's train_step reduces a mini-batch (a token mean
  for guided_opd, the mean over trajectories of each one's token mean for mopd and atod), so the K replicas
  average the K draws;
- backprop to the student's parameters; cosine with the gradient of the exact loss on the same states, same
  reduction (`--student-loss full`, `--loss full`, `--opd-loss full`);
- K = 16, 256 (several repetitions: mean cosine) and 4096; the column `E` is the estimator's exact
  expectation (the per-token loss weighted by pi_s over the whole vocabulary, reduced by the script's loss
  through its full path): what the samples converge to. A form whose E column is below 1 is biased.

The forms: guided_opd `sampled_reverse_kl` (alone and with `--adv-baseline`) and `clipped_sampled_reverse_kl`
(--ratio-clip 0.2, --adv-clip 0);
mopd `--loss pg` (advantage clipped at --mopd-adv-clip, 5 as the script), `--loss topk --no-topk-tail` (the
paper's) and `--loss topk` (with the tail bucket; both deterministic: the same value in every column); atod's OPD advantage kappa (log pi_t - log pi_old) inside its PPO surrogate with
w = 1 (`--weighting none`), GRPO advantage 0, against its `--opd-loss full` term kappa KL.

Mutations, which the check must catch (tests/test_grad_agreement.py asserts it on small random models): the
advantage without its stop-gradient, its sign flipped, and for atod log pi_old taken from the current student
with its gradient. (In atod's surrogate -r A the advantage's own gradient is harmless in expectation: r = 1 in
value, and -r grad A = kappa grad log pi_s(y) has mean 0.)

Then several mini-batches, as the scripts split a rollout batch: the student takes S AdamW steps at learning
rate LR (`--moves S@LR`, the exact reverse KL on the first mini-batch); the second mini-batch's tokens are then
drawn from the rollout-time student pi_old while the gradient is taken at the current one. Compared with the
exact gradient at the current parameters: (i) the plain form, advantage recomputed from the current student
(`--ratio-max 0`), (ii) the clipped ratio form (--ratio-clip 0.2; atod's surrogate, --clip-eps 0.2), (ii') the
same with the clip wide open (importance weighting only), (iii) the stale advantage of pi_old without any ratio
(a bug), (iv) the plain form weighted by the importance ratio (guided_opd's and mopd's default) and (iv') the
same truncated at 2. The drift is reported as the mean KL(pi_old || pi_s) per
position and the share of pi_old's draws whose ratio leaves 1 +- 0.2.

    python benchmark/grad_check.py                      # the tiny student and simonsays expert, about a minute on CPU
    python benchmark/grad_check.py --samples 16 256 --repeats 4 --moves 1@1e-3
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import atod  # noqa: E402
import guided_opd  # noqa: E402
import mopd  # noqa: E402
from common.episode import STUDENT, Episode, collate  # noqa: E402
from common.teacher import Scores, score_teacher, token_logprobs  # noqa: E402


@dataclass
class Args:
    student: str = "tiny"
    """the student (`random`: a random pair of small Qwen3 models on random token sequences)"""
    teacher: str | None = None
    """the teacher (default: --env's tiny expert)"""
    env: str = "twx:simonsays"
    """the environment whose episodes give the states"""
    student_episodes: int = 4
    """episodes the student plays (temperature 1, guided_opd.rollout at beta 0)"""
    oracle_episodes: int = 4
    """oracle episodes rendered in the scripts' token format"""
    max_turns: int = 6
    """turns per episode at most (keeps the states small)"""
    samples: tuple[int, ...] = (16, 256, 4096)
    """K: tokens drawn per position"""
    repeats: int = 8
    """independent estimates per K below 4096 (mean cosine reported)"""
    repeats_large: int = 2
    """independent estimates per K of 4096 and more"""
    move_repeats: int = 4
    """independent estimates per K below 4096 in the mini-batch case"""
    topk: tuple[int, ...] = (64, 256)
    """mopd --topk values (capped at the vocabulary)"""
    mopd_adv_clip: float = 5.0
    """mopd --adv-clip of the pg form (the script's default)"""
    ratio_clip: float = 0.2
    """--ratio-clip of the clipped forms (guided_opd, mopd) and atod's --clip-eps"""
    kappa: float = 1.0
    """atod's kappa (1 at its first iteration)"""
    moves: tuple[str, ...] = ("7@1e-6", "1@1e-5", "7@1e-5", "3@1e-4", "1@1e-3")
    """mini-batch case, `S@LR`: the student takes S AdamW steps at learning rate LR between the rollout and the
    mini-batch (7 = the last of 8 mini-batches; 1e-3 is guided_opd's tiny default); empty to skip"""
    seed: int = 0
    """seed of the episodes and the draws"""


# ----------------------------------------------------------------------------------------------------
# Fixed states: the trained positions of a batch, the student's and teacher's full rows there
# ----------------------------------------------------------------------------------------------------
@dataclass
class States:
    """The N trained positions of a batch of episodes, in mask.nonzero() order (the order of the scripts' full
    rows), and a compact layout [B, W] holding them: row b keeps its trained positions at columns 1..n_b (column
    0 is never trained, as in the scripts), so a replicated batch stays small."""

    batch: dict
    mask: torch.Tensor          # [B, T] trained positions of the real batch (column 0 off)
    rows: torch.Tensor          # [N] compact row of each position
    cols: torch.Tensor          # [N] compact column
    cmask: torch.Tensor         # [B, W] compact mask
    targets: torch.Tensor       # [N] the tokens of the sequences at those positions
    teacher_full: torch.Tensor  # [N, V] the teacher's log-softmax rows
    topk_ids: torch.Tensor      # [B, W, k] the teacher's top-k (compact, most likely first: a smaller k is a prefix)
    topk_logp: torch.Tensor     # [B, W, k]

    @property
    def n(self) -> int:
        return int(self.rows.numel())

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """[R, N, ...] values per position -> [R * B, W, ...] (0 elsewhere): R replicas of the compact batch."""
        R = x.shape[0]
        B, W = self.cmask.shape
        out = x.new_zeros((R, B, W) + tuple(x.shape[2:]))
        out[:, self.rows, self.cols] = x
        return out.reshape((R * B, W) + tuple(x.shape[2:]))

    def replicate(self, x: torch.Tensor, r: int) -> torch.Tensor:
        return x.repeat((r,) + (1,) * (x.dim() - 1))


def make_states(teacher, episodes: list[Episode], pad_id: int, topk: int) -> States:
    batch = collate(episodes, pad_id)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    cols = torch.arange(b_idx.numel()) - starts[b_idx] + 1
    B, W = mask.shape[0], int(counts.max()) + 1
    cmask = torch.zeros(B, W, dtype=torch.bool)
    cmask[b_idx, cols] = True
    k = min(topk, teacher.get_output_embeddings().out_features)
    sc = score_teacher(teacher, batch, mask, full=True)
    vals, ids = sc.full.topk(k, dim=-1)
    st = States(batch, mask, b_idx, cols, cmask, batch["input_ids"][b_idx, t_idx], sc.full, None, None)
    st.topk_ids, st.topk_logp = st.compact(ids[None]), st.compact(vals[None])
    return st


def student_rows(student, st: States) -> torch.Tensor:
    """The student's full log-softmax rows [N, V] at the trained positions, differentiable (the scripts' scorer)."""
    b = st.batch
    return token_logprobs(student, b["input_ids"], b["attention_mask"], st.mask, full=True).full


# ----------------------------------------------------------------------------------------------------
# The scripts' losses on given rows: the student's scorer replaced by rows already computed
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(module, **attrs):
    """Set attributes of a module for the duration (the scripts' functions look them up at call time)."""
    saved = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def scorer(scores: Scores):
    """A stand-in for common.teacher.token_logprobs that returns `scores` (computed from the rows)."""
    def token_logprobs_(model, input_ids, attention_mask, mask, **kw):
        assert scores.logp.shape == mask.shape, (scores.logp.shape, mask.shape)
        return scores
    return token_logprobs_


def gather(rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """rows [N, V], y [R, N] -> [R, N]: each replica's log-prob of its token at each position."""
    return rows.gather(1, y.T).T


FORMS = {  # script -> sampled forms (the exact one is "full")
    "guided_opd": ("sampled", "baseline", "importance", "ratio"),
    "mopd": ("pg", "topk", "topk-tail", "importance", "ratio"),
    "atod": ("surrogate",),
}
SAMPLED = {"sampled", "baseline", "importance", "ratio", "pg", "surrogate", "stale"}  # forms whose loss depends on drawn tokens


@dataclass
class Setting:
    """The loss options of the check (flags of the scripts)."""

    adv_clip: float = 0.0        # guided_opd --adv-clip
    mopd_adv_clip: float = 5.0   # mopd --adv-clip (pg)
    ratio_clip: float = 0.2      # --ratio-clip; atod --clip-eps
    ratio_max: float = math.inf  # --ratio-max (the importance ratio's cap; the scripts' default: none)
    kappa: float = 1.0           # atod
    topk: int = 64               # mopd --topk
    mutation: str = ""           # a deliberately wrong variant: "nodetach" (the advantage keeps its gradient),
    # "flip" (its sign flipped), "old_nodetach" (atod: log pi_old of ratio and advantage = the current log-prob)


def stale_term(logp_s, logp_t, logp_old, adv_clip: float = 0.0):
    """-A_old log pi_s(y), A_old = log pi_t(y) - log pi_old(y) of the rollout-time student, no ratio: what the
    plain form would compute with the advantage stored at rollout time (a bug once the student has moved)."""
    a = (logp_t - logp_old).detach()
    return -(a.clamp(-adv_clip, adv_clip) if adv_clip > 0 else a) * logp_s


def token_term(script: str, form: str, s: Setting):
    """The script's per-token loss of a form as a function (logp_s, logp_t, logp_old) -> loss, elementwise: the
    same function its loss applies to the sampled token (used for the expectation over the whole vocabulary)."""
    if script == "guided_opd" and form in ("sampled", "baseline"):  # a constant baseline's expectation is 0
        return lambda ls, lt, lo: guided_opd.sampled_reverse_kl(ls, lt, s.adv_clip)
    if script == "guided_opd" and form == "importance":
        return lambda ls, lt, lo: guided_opd.importance_sampled_reverse_kl(ls, lo, lt, s.ratio_max, s.adv_clip)
    if script == "mopd" and form == "importance":
        return lambda ls, lt, lo: mopd.importance_sampled_reverse_kl(ls, lo, lt, s.ratio_max, s.mopd_adv_clip)
    if script == "guided_opd" and form == "ratio":
        return lambda ls, lt, lo: guided_opd.clipped_sampled_reverse_kl(ls, lo, lt, s.ratio_clip, s.adv_clip)
    if script == "mopd" and form == "pg":
        return lambda ls, lt, lo: mopd.sampled_reverse_kl(ls, lt, s.mopd_adv_clip)
    if script == "mopd" and form == "ratio":
        return lambda ls, lt, lo: mopd.clipped_sampled_reverse_kl(ls, lo, lt, s.ratio_clip, s.mopd_adv_clip)
    if script == "atod" and form == "surrogate":
        def term(ls, lt, lo):
            one = torch.ones_like(ls, dtype=torch.bool)
            adv = atod.hybrid_advantages(lo, lt, one.float(), torch.zeros(ls.shape[0]), one, s.kappa, 1.0, True)
            return atod.clipped_surrogate(ls, lo, adv, s.ratio_clip)
        return term
    if form == "stale":  # the stale advantage of pi_old without a ratio (a bug)
        clip = s.mopd_adv_clip if script == "mopd" else s.adv_clip if script == "guided_opd" else 0.0
        return lambda ls, lt, lo: stale_term(ls, lt, lo, clip)
    raise ValueError(f"no per-token term for {script} {form}")


@contextlib.contextmanager
def mutated(script: str, form: str, s: Setting):
    """Deliberately wrong variants, swapped into the script's module (what the check must catch). Form "stale"
    goes through the script's ratio branch (which hands it old_logp) with its term swapped for -A_old log pi_s."""
    module = {"guided_opd": guided_opd, "mopd": mopd, "atod": atod}[script]
    if form == "stale" and script != "atod":
        with patched(module, clipped_sampled_reverse_kl=lambda ls, lo, lt, rc, ac=0.0, b=0.0: stale_term(ls, lt, lo, ac)):
            yield
        return
    if not s.mutation or script == "atod":  # atod's are applied where its advantage is built (script_loss)
        yield
        return
    if s.mutation == "nodetach":
        def fn(logp_s, logp_t, adv_clip=0.0, baseline=0.0):
            a = logp_t - logp_s
            return -((a.clamp(-adv_clip, adv_clip) if adv_clip > 0 else a) - baseline) * logp_s
    elif s.mutation == "flip":
        def fn(logp_s, logp_t, adv_clip=0.0, baseline=0.0):
            a = (logp_s - logp_t).detach()
            return -((a.clamp(-adv_clip, adv_clip) if adv_clip > 0 else a) + baseline) * logp_s
    else:
        raise ValueError(s.mutation)
    with patched(module, sampled_reverse_kl=fn):
        yield


def script_loss(script: str, form: str, F: torch.Tensor, st: States, s: Setting, y: torch.Tensor | None = None,
                old: torch.Tensor | None = None, expect: torch.Tensor | None = None) -> torch.Tensor:
    """The mini-batch loss of `script` as its train_step scales it (one rank, weight 1), from the student's rows
    F [N, V] at the states. form "full" = the exact loss; a sampled form needs y [K, N], the drawn tokens (the
    batch replicated K times); `old` [N, V] are the rollout-time student's rows (default: the current ones,
    detached: ratio 1). `expect` [N, V] (with a sampled form, y None): the form's exact expectation over tokens
    drawn from `expect` (probabilities), through the script's full path with its full_reverse_kl swapped for
    that expectation."""
    old = F.detach() if old is None else old
    T = st.teacher_full
    full_path = form in ("full", "topk", "topk-tail") or expect is not None
    if full_path:  # one replica; logp_s of the sequences' own tokens (only logged by the scripts)
        y = st.targets[None]
    R = y.shape[0]
    logp_s, logp_t, logp_old = (st.compact(gather(x, y)) for x in (F, T, old))
    mask = st.replicate(st.cmask, R)
    dummy = torch.zeros_like(mask, dtype=torch.long)
    scores = Scores(logp=logp_s, full=F if full_path else None)
    swap = {}
    if expect is not None:  # full_reverse_kl(full_s, full_t) -> the form's expected per-token loss
        term = token_term(script, form, s)
        swap["full_reverse_kl"] = lambda fs, ft: (expect * term(fs, ft, old)).sum(-1)
    module = {"guided_opd": guided_opd, "mopd": mopd, "atod": atod}[script]
    mb = {"input_ids": dummy, "attention_mask": torch.ones_like(dummy), "loss_mask": mask, "teacher_logp": logp_t,
          "old_logp": logp_old, "teacher_full": T}

    with patched(module, token_logprobs=scorer(scores), **swap), mutated(script, form, s):
        if script == "guided_opd":
            args = guided_opd.Args(student_loss="full" if full_path else "sampled", teacher_loss="none",
                                   adv_clip=s.adv_clip, ratio_clip=s.ratio_clip if form in ("ratio", "stale") else 0.0,
                                   ratio_max=s.ratio_max if form == "importance" else 0.0, adv_baseline=form == "baseline")
            if form not in ("ratio", "stale", "importance"):
                del mb["old_logp"]  # the plain form: no ratio
            mb["role"] = torch.full_like(dummy, STUDENT)
            pg_sum, ce_sum, _ = guided_opd.guided_opd_loss(None, mb, args)
            return (pg_sum + ce_sum) / max(int(mask.sum()), 1)  # --role-weighting tokens: one token mean
        if script == "mopd":
            loss = "full" if form == "full" or expect is not None else "pg" if form in ("pg", "ratio", "stale", "importance") else "topk"
            args = mopd.Args(loss=loss, adv_clip=s.mopd_adv_clip, topk=s.topk, domains=("d",), topk_tail=form == "topk-tail",
                             ratio_clip=s.ratio_clip if form in ("ratio", "stale") else 0.0,
                             ratio_max=s.ratio_max if form == "importance" else 0.0)
            if form not in ("ratio", "stale", "importance"):
                del mb["old_logp"]  # the plain form: no ratio
            mb["domain"] = dummy
            if loss == "topk":  # the student's log-probs at its teacher's top-k tokens, as token_logprobs(at=...)
                ids, vals = st.topk_ids[..., :s.topk], st.topk_logp[..., :s.topk]
                mb["teacher_topk_logp"], mb["teacher_topk_ids"] = vals, ids
                scores.at_logp = st.compact(F[None]).gather(-1, ids)
            loss_sum, _ = mopd.mopd_loss(None, mb, args)
            return loss_sum / max(int(mask.any(-1).sum()), 1)  # the mean over trajectories
        if script == "atod":
            full = form == "full" or expect is not None
            args = atod.Args(opd_loss="full" if full else "sampled", clip_eps=s.ratio_clip, weighting="none")
            weights = mask.float()  # --weighting none: w = 1
            adv_old = logp_old
            kappa = s.kappa
            if s.mutation == "nodetach":  # the advantage from the current student's log-prob, with its gradient
                adv_old = logp_s
            elif s.mutation == "old_nodetach":  # log pi_old (ratio and advantage) = the current one, with its gradient
                adv_old = mb["old_logp"] = logp_s
            elif s.mutation == "flip":
                kappa = -kappa
            elif form == "stale" and not full:  # the advantage of pi_old without a ratio: -A log pi_s
                adv = atod.hybrid_advantages(logp_old, logp_t, weights, torch.zeros(mask.shape[0]), mask, kappa, 1.0)
                n_tok = mask.sum(1)
                return ((-adv * logp_s) * mask / n_tok.clamp(min=1)[:, None]).sum() / max(int((n_tok > 0).sum()), 1)
            mb["advantages"] = atod.hybrid_advantages(adv_old, logp_t, weights, torch.zeros(mask.shape[0]), mask,
                                                      kappa, 1.0, opd_in_surrogate=not full)
            # the exact term is weighted kappa w; an expectation's per-token term has kappa in its advantage
            mb["kl_coef"] = torch.zeros_like(weights) if not full else weights if expect is not None else kappa * weights
            n_tokens = mask.sum(1)
            mb["token_share"] = (1.0 / n_tokens.clamp(min=1).float())[:, None].expand(mask.shape)
            loss_sum, _ = atod.atod_loss(None, mb, args)
            return loss_sum / max(int((n_tokens > 0).sum()), 1)  # the mean over trajectories
    raise ValueError(script)


# ----------------------------------------------------------------------------------------------------
# Gradients at the student's parameters, and their agreement
# ----------------------------------------------------------------------------------------------------
def param_grad(F: torch.Tensor, params: list, loss_of_rows) -> torch.Tensor:
    """The gradient at the parameters of loss_of_rows(rows), rows = F (the student's graph, kept for reuse):
    first d loss / d rows, then back through the student."""
    leaf = F.detach().requires_grad_()
    (d,) = torch.autograd.grad(loss_of_rows(leaf), leaf)
    grads = torch.autograd.grad(F, params, grad_outputs=d, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def norm_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double().norm() / b.double().norm().clamp(min=1e-30))


def draw(probs: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """[K, N] tokens, K independent draws at each position from probs [N, V]."""
    return torch.multinomial(probs, k, replacement=True, generator=gen).T


def agreement(script: str, form: str, F, st: States, s: Setting, params, exact: torch.Tensor, samples, repeats: int,
              repeats_large: int, gen: torch.Generator, old: torch.Tensor | None = None) -> dict:
    """{K: (mean cosine, std, repeats)} for each K, "E": the cosine of the form's exact expectation, and "norm":
    the norm of that expectation over the exact gradient's. Tokens come from `old` (the rollout-time student)
    when given, else from the current student."""
    sampler = (old if old is not None else F.detach()).exp()
    out = {}
    if form not in SAMPLED:  # deterministic (topk): the same value at every K
        g = param_grad(F, params, lambda rows: script_loss(script, form, rows, st, s, old=old))
        c = cosine(g, exact)
        return {**{k: (c, 0.0, 1) for k in samples}, "E": (c, 0.0, 1), "norm": norm_ratio(g, exact)}
    for k in samples:
        cs = []
        for _ in range(repeats if k < 4096 else repeats_large):
            y = draw(sampler, k, gen)
            cs.append(cosine(param_grad(F, params, lambda rows: script_loss(script, form, rows, st, s, y, old)), exact))
        t = torch.tensor(cs, dtype=torch.float64)
        out[k] = (float(t.mean()), float(t.std()) if len(cs) > 1 else 0.0, len(cs))
    if s.mutation and script == "atod":  # its mutations are not per-token terms of token_term
        out["E"], out["norm"] = (float("nan"), 0.0, 1), float("nan")
    else:
        g = param_grad(F, params, lambda rows: script_loss(script, form, rows, st, s, old=old, expect=sampler))
        out["E"], out["norm"] = (cosine(g, exact), 0.0, 1), norm_ratio(g, exact)
    return out


def exact_grad(script: str, F, st: States, s: Setting, params) -> torch.Tensor:
    return param_grad(F, params, lambda rows: script_loss(script, "full", rows, st, s))


# ----------------------------------------------------------------------------------------------------
# Models and episodes
# ----------------------------------------------------------------------------------------------------
def random_pair(vocab: int = 96, seed: int = 0, hidden: int = 32, layers: int = 1, teacher_scale: float = 3.0):
    """A small random Qwen3 student and a teacher (another initialisation, its head scaled so that its
    distributions are peaked), fp32, for tests and when no tiny model is built."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def model(s):
        torch.manual_seed(s)
        return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=hidden // 2, max_position_embeddings=512,
                                            tie_word_embeddings=False))
    student, teacher = model(seed), model(seed + 1)
    with torch.no_grad():
        student.lm_head.weight.mul_(teacher_scale / 2)
        teacher.lm_head.weight.mul_(teacher_scale)
    teacher.eval().requires_grad_(False)
    return student, teacher


def synthetic_episodes(vocab: int, n: int, seed: int, turns: int = 3, reply: int = 6, obs: int = 8) -> list[Episode]:
    """Episodes of random tokens: a prompt, then `turns` agent replies (trained) between observations, lengths varied."""
    g = random.Random(seed)
    eps = []
    for i in range(n):
        ids, mask = [g.randrange(vocab) for _ in range(obs)], [0] * obs
        for _ in range(turns - i % 2):
            r = reply + g.randrange(-2, 3)
            ids += [g.randrange(vocab) for _ in range(r)]
            mask += [1] * r
            o = obs + g.randrange(-3, 4)
            ids += [g.randrange(vocab) for _ in range(o)]
            mask += [0] * o
        eps.append(Episode(ids=ids, loss_mask=mask, turn_id=[0] * len(ids), role=[STUDENT] * len(ids)))
    return eps


def load_models(args: Args):
    """(student, teacher, tokenizer, description): the named models (`--student random`: a random pair of small
    Qwen3 models, whose states are then random token sequences, with no tokenizer)."""
    from common import tiny
    from common.models import load_model

    if args.student == "random":
        s, t = random_pair(seed=args.seed)
        return s, t, None, "random Qwen3 pair"
    teacher = args.teacher or tiny.expert_for(args.env)
    s, tok = load_model(args.student, trainable=True)
    t, _ = load_model(teacher)
    return s, t, tok, f"student {args.student}, teacher {teacher}"


def make_episodes(student, tokenizer, args: Args, env: str) -> list[Episode]:
    """Student-played episodes (guided_opd.rollout at beta 0, temperature 1) and oracle ones (common.tiny_build)."""
    import envs
    from common import tiny_build
    from common.models import fill_defaults

    eps = []
    if args.student_episodes:
        a = guided_opd.Args(student="tiny", env=env, seed=args.seed, num_envs=args.student_episodes)
        fill_defaults(a, guided_opd.TINY, guided_opd.REAL)
        pool = [envs.make(env, seed=args.seed, split="train") for _ in range(args.student_episodes)]
        try:
            with torch.no_grad():
                eps += guided_opd.rollout(student, None, tokenizer, pool, list(range(100, 100 + args.student_episodes)),
                                          0.0, a, torch.Generator().manual_seed(args.seed), 1.0, args.max_turns)
        finally:
            for e in pool:
                e.close()
    if args.oracle_episodes:
        trajs = tiny_build.play(env, range(200, 200 + args.oracle_episodes), "oracle", args.max_turns, random.Random(args.seed))
        eps += [tiny_build.render(tokenizer, t) for t in trajs]
    return [e for e in eps if sum(e.loss_mask) > 0]


def move(student, st: States, steps: int, lr: float):
    """A copy of the student after `steps` AdamW steps on the exact reverse KL at `st` (gradient clipped at 1,
    as train_step)."""
    moved = copy.deepcopy(student)
    opt = torch.optim.AdamW(moved.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        script_loss("guided_opd", "full", student_rows(moved, st), st, Setting()).backward()
        torch.nn.utils.clip_grad_norm_(moved.parameters(), 1.0)
        opt.step()
    return moved


def drift(F_old: torch.Tensor, F: torch.Tensor, clip: float) -> tuple[float, float]:
    """(mean KL(pi_old || pi_s) per position, share of pi_old's draws whose ratio leaves 1 +- clip)."""
    p = F_old.exp()
    kl = (p * (F_old - F)).sum(-1).mean()
    out = (p * ((F - F_old).exp() - 1).abs().gt(clip)).sum(-1).mean()
    return float(kl), float(out)


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------
LABELS = {
    ("guided_opd", "sampled"): "sampled_reverse_kl",
    ("guided_opd", "baseline"): "sampled_reverse_kl, --adv-baseline (micro-batch mean)",
    ("guided_opd", "importance"): "importance_sampled_reverse_kl (--ratio-max inf, the default)",
    ("guided_opd", "ratio"): "clipped_sampled_reverse_kl (--ratio-clip 0.2, --adv-clip 0)",
    ("mopd", "pg"): "--loss pg (adv clip {c:g})",
    ("mopd", "topk"): "--loss topk --no-topk-tail (k {k}, the paper's)",
    ("mopd", "topk-tail"): "--loss topk (k {k}, with the tail bucket)",
    ("mopd", "importance"): "--loss pg, importance ratio (adv clip {c:g}, the default)",
    ("mopd", "ratio"): "--loss pg --ratio-clip 0.2 (adv clip {c:g})",
    ("atod", "surrogate"): "kappa A_OPD in the PPO surrogate, w = 1",
}
CASE_LABELS = {"sampled": "(i) plain, advantage of the current student", "pg": "(i) plain, advantage of the current student",
               "ratio": "(ii) clipped ratio {c:g}, advantage of pi_old",
               "surrogate": "(ii) PPO surrogate (clip {c:g}), advantage of pi_old",
               "wide": "(ii') the same, ratio unclipped (clip 1e9)",
               "stale": "(iii) advantage of pi_old, no ratio (a bug)",
               "importance": "(iv) importance ratio, advantage of the current student (the default)",
               "capped": "(iv') the same, truncated at 2 (--ratio-max 2)"}
MUTATIONS = {"nodetach": "advantage without stop-gradient", "flip": "advantage's sign flipped",
             "old_nodetach": "log pi_old = current log-prob with its gradient"}


def fmt(v) -> str:
    m, sd, n = v
    return f"{m:.3f}" + (f" ± {sd:.3f}" if n > 1 else "")


def row(res: dict, ks) -> str:
    return " | ".join(fmt(res[k]) for k in ks) + f" | {fmt(res['E'])} (×{res['norm']:.2f}) |"


def main(args: Args) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    student, teacher, tok, what = load_models(args)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    V = student.get_output_embeddings().out_features
    topks = sorted({min(k, V) for k in args.topk})
    if tok is not None:
        episodes = make_episodes(student, tok, args, args.env)
        pad = tok.pad_token_id
        made = f"{args.student_episodes} played by the student, {args.oracle_episodes} oracle"
    else:
        episodes = synthetic_episodes(V, args.student_episodes + args.oracle_episodes, args.seed)
        pad = 0
        made = "random tokens"
    s = Setting(mopd_adv_clip=args.mopd_adv_clip, ratio_clip=args.ratio_clip, kappa=args.kappa)
    st = make_states(teacher, episodes, pad, max(topks))
    F = student_rows(student, st)
    p_s = F.detach().exp()
    kl = (p_s * (F.detach() - st.teacher_full)).sum(-1)
    clipped = (p_s * ((st.teacher_full - F.detach()).abs() > args.mopd_adv_clip)).sum(-1).mean()
    print(f"{what}; {len(episodes)} episodes ({made}), "
          f"{st.n} trained positions, vocabulary {V}, {sum(p.numel() for p in params):,} parameters")
    print(f"reverse KL(pi_s || pi_t) per position: mean {kl.mean():.3f}, max {kl.max():.3f}; pi_s mass where "
          f"|log pi_t - log pi_s| > {args.mopd_adv_clip:g} (mopd's clip): {clipped:.3f}")
    ids_full = st.teacher_full.topk(max(topks), -1).indices
    for k in topks:
        outside = 1 - p_s.gather(1, ids_full[:, :k]).sum(-1).mean()
        print(f"pi_s mass outside the teacher's top-{k}: {outside:.3f}")

    ks = list(args.samples)
    print("\nCosine between the mean sampled gradient and the exact loss's (`full`), at the student's parameters "
          f"(mean ± std over {args.repeats} estimates below K = 4096, {args.repeats_large} at 4096 and above); E: the "
          "estimator's exact expectation (× its norm over the exact gradient's):\n")
    print("| script | loss form | " + " | ".join(f"K = {k}" for k in ks) + " | E (K → ∞) |")
    print("|" + "---|" * (len(ks) + 3))
    for script, forms in FORMS.items():
        exact = exact_grad(script, F, st, s, params)
        for form in forms:
            for k_top in (topks if form in ("topk", "topk-tail") else (None,)):
                if k_top is not None:
                    s.topk = k_top
                res = agreement(script, form, F, st, s, params, exact, ks, args.repeats, args.repeats_large, gen)
                label = LABELS[(script, form)].format(c=s.mopd_adv_clip, k=s.topk)
                print(f"| {script} | {label} | " + row(res, ks))
    print(f"\n({time.time() - t_start:.0f} s)\n")

    k_big = max(ks)
    print(f"Mutations (what the check must catch), same states, K = {k_big}:\n")
    print(f"| script | form | mutation | K = {k_big} | E (K → ∞) |")
    print("|---|---|---|---|---|")
    for script, form in (("guided_opd", "sampled"), ("mopd", "pg"), ("atod", "surrogate")):
        exact = exact_grad(script, F, st, s, params)
        for mutation in ("", "nodetach", "flip") + (("old_nodetach",) if script == "atod" else ()):
            sm = dataclasses.replace(s, mutation=mutation)
            res = agreement(script, form, F, st, sm, params, exact, [k_big], 1, args.repeats_large, gen)
            e = "n/a" if math.isnan(res["E"][0]) else f"{fmt(res['E'])} (×{res['norm']:.2f})"
            print(f"| {script} | {LABELS[(script, form)].format(c=s.mopd_adv_clip, k=s.topk)} | "
                  f"{MUTATIONS.get(mutation, 'none (the script)')} | {fmt(res[k_big])} | {e} |")
    print(f"\n({time.time() - t_start:.0f} s)\n")

    if args.moves:
        half = [episodes[i] for i in range(0, len(episodes), 2)], [episodes[i] for i in range(1, len(episodes), 2)]
        st1, st2 = (make_states(teacher, h, pad, max(topks)) for h in half)
        F_old = student_rows(student, st2).detach()
        print("Several mini-batches: the student takes S AdamW steps at learning rate LR on the first mini-batch (the "
              "exact reverse KL); the second one's tokens come from the rollout-time student pi_old, the gradient is "
              "taken at the current one; cosine with the exact gradient there:\n")
        print(f"| S @ LR | KL(pi_old ‖ pi_s) | ratio outside 1 ± {args.ratio_clip:g} | script | estimator | "
              + " | ".join(f"K = {k}" for k in ks) + " | E (K → ∞) |")
        print("|" + "---|" * (len(ks) + 6))
        for spec in args.moves:
            steps, _, lr = spec.partition("@")
            moved = move(student, st1, int(steps), float(lr))
            mparams = [p for p in moved.parameters() if p.requires_grad]
            Fm = student_rows(moved, st2)
            d_kl, d_out = drift(F_old, Fm.detach(), args.ratio_clip)
            wide, capped = dataclasses.replace(s, ratio_clip=1e9), dataclasses.replace(s, ratio_max=2.0)
            for script, forms in (("guided_opd", ("sampled", "importance", "capped", "ratio", "wide", "stale")),
                                  ("mopd", ("pg", "importance", "capped", "ratio", "wide", "stale")),
                                  ("atod", ("surrogate", "wide", "stale"))):
                exact = exact_grad(script, Fm, st2, s, mparams)
                for form in forms:
                    f, sf = ((form, s) if form not in ("wide", "capped") else ("importance", capped) if form == "capped"
                             else ("surrogate" if script == "atod" else "ratio", wide))
                    res = agreement(script, f, Fm, st2, sf, mparams, exact, ks, args.move_repeats, args.repeats_large,
                                    gen, old=F_old)
                    print(f"| {steps} @ {lr} | {d_kl:.2g} | {d_out:.3f} | {script} | "
                          f"{CASE_LABELS[form].format(c=args.ratio_clip)} | " + row(res, ks))
            del moved, Fm
        print(f"\n({time.time() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main(tyro.cli(Args))
