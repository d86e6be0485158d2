"""Guided on-policy distillation (Guided-OPD) for multi-turn LLM agents.

Paper: "On-Policy Distillation with Curriculum Turn-level Guidance for Multi-turn Agents", arXiv 2606.15912.

In multi-turn on-policy distillation (OPD) a weak student's early mistakes compound: its episodes drift to
states where the teacher's signal is unreliable. Guided-OPD lets the teacher write some turns: at every turn,
independently, the teacher writes the whole turn with probability beta, else the student; either way the
turn is executed and becomes shared history. beta decays from 1 to 0 along a cosine, reaching 0 at 80% of
training (then plain OPD). Evaluation uses beta = 0. No environment reward is used.
- Student turns, the paper's: sampled-token reverse KL, A_t = stopgrad(log pi_t(y_t) - log pi_s(y_t)), loss_t =
  -A_t log pi_s(y_t) (in expectation over the student's samples, the gradient of KL(pi_s || pi_t)):
  `--student-loss sampled`.
- Teacher turns: forward KL with only the teacher's sampled tokens known = cross-entropy, -log pi_s(y_t).
- The paper's L = (1 - beta) J_rKL + beta J_fKL: `--role-weighting tokens` (default) is one token mean over
  both roles (each role weighs its share of the tokens: (1 - beta) : beta when turns are equally long);
  `beta` weighs a token mean per role by (1 - beta) and beta. The paper does not say which.

Which loss runs: a real model's student turns train by default with `--student-loss topk`, the reverse KL over
the teacher's top 64 tokens plus one bucket for the rest of the vocabulary (no sampling of the loss; it
taught vanilla OPD on the tiny default where the sampled form did not, docs/guided_opd.md), its teacher turns with `ce`;
the tiny default trains with the exact full-vocabulary losses (`full`), and `--real-losses` runs a tiny student
with the real-model ones. Mini-batches: the rollout batch, shuffled (a draw from --seed and the iteration, the
same on any number of ranks), is split into --num-minibatches optimizer steps; the sampled form weighs the
later ones, drawn by an older student, by the importance ratio (on-policy in expectation; `--ratio-max` truncates
it, `--ratio-clip` = PPO's clipped ratio instead, `--ratio-max 0` = none).
Open choices, as flags: `--adv-clip` (as MOPD) or `--adv-baseline` (the micro-batch's mean advantage, a constant
baseline: the same expected gradient); `--teacher-loss none`; `--curriculum step` (beta 1, then 0). Arguments
left at None are "auto": the tiny default's values with a tiny student, the real-model values otherwise (the
TINY and REAL tables below the Args). Rollouts sample at temperature 1, since the sampled losses use the
log-probs of the untempered models.

    python guided_opd.py                                   # embedded tiny default, CPU, minutes
    python guided_opd.py --beta-start 0                    # vanilla OPD, the baseline
    python guided_opd.py --beta-start 0 --real-losses      # vanilla OPD with the real-model losses, on a CPU
    torchrun --nproc_per_node 8 guided_opd.py --student qwen3-1.7b --teacher qwen3-30b-a3b --env alfworld \
        --max-turns 30 --num-envs 8                       # the run's memory plan is printed first (--plan: only it)
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import envs
from common.dist import all_max, all_sum, setup
from common.episode import (STUDENT, TEACHER, BatchCache, Episode, TurnCache, collate, end_of_turn_id, episode_sums,
                            generate_replies, pack_by_tokens, start_episodes, step_envs)
from common.memory import plan_run
from common.models import ModelError, fill_defaults, fill_from_rank0, load_student_and_teachers, student_name, teacher_name
from common.runs import Run, check_rollout_args, eval_batch, gathered, minibatch_plan, seed_everything
from common.teacher import score_teacher, token_logprobs
from common.user import env_user


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (each rank adds its rank)"""
    track: bool = False
    """mirror the tensorboard logs to Weights and Biases"""
    wandb_project_name: str = "agent-distill"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    runs_dir: str = "runs"
    """folder of the runs: tensorboard logs, checkpoints and the final model"""

    # Models and environment
    student: str = "tiny"
    """the student: an alias (qwen3-0.6b, qwen3-1.7b, ...), a hub id, a local path, or `tiny` (weak but able),
    `tiny-novice` or `tiny-small` (tiny students that share a tokenizer with --env's tiny expert)"""
    teacher: str | None = None
    """the teacher (frozen): --env's tiny expert for a tiny student; a real student needs one (the paper's: qwen3-30b-a3b)"""
    env: str | None = None
    """environment spec, e.g. twx:coin, scienceworld:boil, alfworld (see envs/); auto: twx:simonsays for a tiny
    student, a real one needs it"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template (the tiny models do not think)"""
    user_model: str | None = None
    """the customer of conversational envs (tau2:*), played by this model (any name the student takes; a whole
    copy per rank, greedy); unset = the env's scripted stand-in, which answers from the task's scenario"""

    # Rollouts
    num_envs: int = 16
    """episodes played by each rank per iteration (the global batch is num_envs x world size)"""
    max_turns: int | None = None
    """turns per episode before it is cut; 0 = the environment's default (auto: 12 tiny, 0 real)"""
    max_new_tokens: int | None = None
    """tokens a turn may generate (auto: 24 tiny, 512 real; more with --thinking)"""
    max_seq_len: int | None = None
    """tokens an episode may hold; a turn that would not fit ends the episode as truncated (auto: 2048 tiny,
    16384 real)"""
    temperature: float = 1.0
    """sampling temperature of training rollouts; other than 1 only with --student-loss full or topk and --teacher-loss full or none"""
    cache_turns: bool = True
    """keep each episode's key/value cache between turns, so a turn runs only its new tokens (faster; the memory
    grows with episodes x tokens); on unless the memory plan needs it off; --no-cache-turns: always off"""
    rollout_chunk: int = 0
    """episodes decoded at once, a rollout's batch in chunks (bounds the batched caches and logits); 0 = auto: all,
    or fewer where the memory plan needs it"""
    rollout_gather: Literal["auto", "whole", "student", "layers"] = "auto"
    """how rollouts hold the sharded models: gathered whole once (`whole`, fastest), the student whole and the
    teacher one layer at a time in each forward (`student`), every model by layer (`layers`, least memory); auto:
    the fastest that the memory plan fits"""
    batch_cache: bool = False
    """the fast path for GPUs: keep the batch's caches in preallocated buffers written in place (BatchCache in
    common/episode.py) and look for ended replies every 8 tokens instead of after each; the same replies"""

    # Optimization
    total_iterations: int = 100
    """training iterations: one batch of rollouts and --num-minibatches optimizer steps each"""
    learning_rate: float | None = None
    """AdamW learning rate (auto: 1e-3 tiny, 2e-5 real)"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning rate after warmup: constant, or decaying to 0 at the end"""
    warmup_iterations: int = 0
    """linear learning rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_minibatches: int | None = None
    """optimizer steps per iteration: the rollout batch is shuffled and split into this many mini-batches (auto: 8
    tiny; 1 real, one step per batch as tinker-cookbook's and TRL's on-policy distillation)"""
    micro_batch_tokens: int | None = None
    """token budget of one forward/backward micro-batch, gradient accumulation within a mini-batch (auto:
    4096 tiny, 16384 real)"""
    activation_checkpointing: bool = False
    """recompute decoder layers in backward to save memory: always; without it, where the memory plan needs it"""
    plan: bool = False
    """print the memory plan (per-rank bytes for 1 to 8 ranks, from the models' configs) and exit: no weights loaded"""
    device_memory: str = "auto"
    """the memory a rank plans for: auto (this GPU's, or on a CPU the available memory over the host's ranks;
    --plan on a machine without a GPU plans 80 GiB GPUs for a real student), or gpu:<GiB> / cpu:<GiB>"""

    # Evaluation and checkpoints
    eval_interval: int = 20
    """evaluate the student (beta = 0) every N iterations"""
    eval_episodes: int = 64
    """held-out episodes per evaluation (split over ranks)"""
    eval_temperature: float = 0.0
    """sampling temperature of evaluation (0 = greedy)"""
    eval_batch: int = 0
    """held-out episodes a rank plays at once (0 = auto: all of its share of --eval-episodes with a tiny student,
    --num-envs with a real one)"""
    save_interval: int = 20
    """write a resumable checkpoint every N iterations (and at the end)"""
    resume: str | None = None
    """a run folder (or its checkpoint.pt) to continue from"""
    max_env_failures: float = 0.25
    """an episode whose env fails is dropped; more than this fraction of an iteration's stops the run (checkpointed)"""

    # Algorithm specific arguments
    beta_start: float = 1.0
    """probability that the teacher writes a turn, at the start (0 = vanilla OPD)"""
    beta_end: float = 0.0
    """the probability at the end of the curriculum"""
    curriculum_fraction: float = 0.8
    """fraction of training over which beta goes from beta_start to beta_end (then stays)"""
    curriculum: Literal["cosine", "linear", "constant", "step"] = "cosine"
    """shape of the beta curriculum: constant keeps beta_start; step jumps from beta_start to beta_end at
    the end of the curriculum (off-policy, then on-policy: an ablation)"""
    student_loss: Literal["sampled", "topk", "full"] | None = None
    """student turns: `sampled` = the paper's sampled-token reverse KL; `topk` = the reverse KL over the teacher's
    top --topk tokens and one bucket for the rest (scales to a 151k vocabulary; it taught where `sampled` did not,
    docs/guided_opd.md); `full` = the exact reverse KL over the vocabulary (auto: full tiny, topk real)"""
    topk: int = 64
    """topk: the teacher's k most likely tokens at each position"""
    teacher_loss: Literal["ce", "full", "none"] | None = None
    """teacher turns: `ce` = cross-entropy on the teacher's tokens (the paper's), `full` = the exact forward KL
    over the vocabulary, `none` = context only, not trained (auto: full tiny, ce real)"""
    role_weighting: Literal["tokens", "beta"] = "tokens"
    """`tokens`: one token mean over both roles (each role weighs its share of the tokens); `beta`: a token
    mean per role, weighted (1 - beta) for student turns and beta for teacher turns"""
    adv_clip: float = 0.0
    """clip the sampled form's per-token advantage log pi_t - log pi_s to +-adv_clip (0 = no clip)"""
    adv_baseline: bool = False
    """sampled form: subtract the micro-batch's mean advantage over its student tokens from each one's (a
    constant baseline: the same expected gradient, less variance)"""
    ratio_max: float = math.inf
    """sampled form: weigh each token's term by the importance ratio pi_s / pi_s(rollout), so that later
    mini-batches stay on-policy in expectation; truncated at ratio_max (inf: the plain ratio, which measured
    closest to the exact gradient, docs/optimizer_steps.md); 0 = no ratio, the plain estimator (off-policy after the first step)"""
    ratio_clip: float = 0.0
    """sampled form: PPO's clipped surrogate instead, the ratio clipped to 1 +- ratio_clip with the advantage of
    the rollout-time student (0 = off; when set, --ratio-max is not used)"""
    real_losses: bool = False
    """with a tiny student: train with the real-model losses (REAL_LOSSES: --student-loss and --teacher-loss as a
    real run takes them), everything else the tiny default's, to see them teach on a CPU"""


# "Auto" arguments (None above): the embedded tiny default's values, and a real model's.
# REAL's sources (docs/real_models.md): the rate is NeMo-RL's for on-policy distillation of full models (2e-5); one
# optimizer step per batch as tinker-cookbook and TRL; the lengths are the papers' (512 tokens a turn).
TINY = dict(env="twx:simonsays", max_turns=12, max_new_tokens=24, max_seq_len=2048, learning_rate=1e-3,
            micro_batch_tokens=4096, num_minibatches=8, student_loss="full", teacher_loss="full")
REAL = dict(max_turns=0, max_new_tokens=512, max_seq_len=16384, learning_rate=2e-5, micro_batch_tokens=16384,
            num_minibatches=1, student_loss="topk", teacher_loss="ce")
REAL_LOSSES = ("student_loss", "teacher_loss")  # what --real-losses takes from REAL


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the guidance curriculum
# ----------------------------------------------------------------------------------------------------
def beta_schedule(iteration: int, args: Args) -> float:
    """Teacher-turn probability at `iteration` (0-based): beta_start -> beta_end over the first
    curriculum_fraction of training (cosine by default, as in the paper), then beta_end."""
    if args.curriculum == "constant":
        return args.beta_start
    horizon = max(1.0, args.curriculum_fraction * args.total_iterations)
    p = min(1.0, iteration / horizon)
    w = {"cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p, "step": float(p < 1.0)}[args.curriculum]
    return args.beta_end + (args.beta_start - args.beta_end) * w


def lr_at(iteration: int, args: Args) -> float:
    if iteration < args.warmup_iterations:
        return args.learning_rate * (iteration + 1) / args.warmup_iterations
    p = (iteration - args.warmup_iterations) / max(1, args.total_iterations - args.warmup_iterations)
    return args.learning_rate * {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p}[args.lr_schedule]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: guided rollouts. Each turn, each episode's author is drawn independently (teacher with
# probability beta); both models generate their episodes' turns in a batch; the env steps; the tokens
# are appended to one sequence per episode with their role, so the loss knows who wrote what.
# ----------------------------------------------------------------------------------------------------
def truncate_if_full(ep: Episode, args: Args) -> bool:
    """End an episode whose next turn could pass --max-seq-len (logged as truncated, never a crash)."""
    if len(ep) + args.max_new_tokens > args.max_seq_len:
        ep.truncated = True
        return True
    return False


def rollout(student, teacher, tokenizer, pool, seeds, beta: float, args: Args, sampler: torch.Generator,
            temperature: float, max_turns: int) -> list[Episode]:
    eot = end_of_turn_id(tokenizer)
    # one stream of role draws per episode, from the run's seed and the episode's: an episode gets the same
    # roles however the batch is split over ranks, and a resumed run draws them again identically
    role_rngs = [random.Random(f"{args.seed}/{seed}") for seed in seeds]
    # the envs reset and step at once where they allow it; an env that fails ends its episode (`error`, dropped later)
    episodes = start_episodes(tokenizer, pool, seeds, args.thinking)
    active = [i for i, ep in enumerate(episodes) if not ep.done and not truncate_if_full(ep, args)]
    # each model keeps its own cache per episode and catches up on the turns the other one wrote
    caches = {role: BatchCache(len(episodes)) if args.batch_cache else [TurnCache() for _ in episodes]
              for role in (STUDENT, TEACHER)}
    for _ in range(max_turns):
        if all_max(len(active)) == 0:  # FSDP: every rank runs the same generate calls, so all stop together
            break
        roles = {i: TEACHER if role_rngs[i].random() < beta else STUDENT for i in active}
        replies = {}
        for role, model in ((STUDENT, student), (TEACHER, teacher)):
            writers = [i for i in active if roles[i] == role]
            if all_max(len(writers)) == 0:
                continue
            outs = generate_replies(model, tokenizer, [episodes[i].ids for i in writers], args.max_new_tokens,
                                    temperature, generator=sampler,
                                    caches=[caches[role][i] for i in writers] if args.cache_turns else None,
                                    check_every=8 if args.batch_cache else 1, chunk=args.rollout_chunk)
            replies.update(zip(writers, outs))
        texts = [tokenizer.decode(replies[i], skip_special_tokens=True) for i in active]
        steps = step_envs(pool, episodes, active, texts)
        still_playing = []
        for i, text, (obs, reward, env_done, info) in zip(active, texts, steps):
            ep = episodes[i]
            ep.append_reply(replies[i], roles[i], eot)
            ep.replies.append(text)
            ep.reward += reward
            ep.success, ep.score = bool(info["success"]), float(info["score"])
            ep.invalid_turns += int(info["invalid"])
            if env_done:
                ep.done = True
            else:
                ep.append_observation(tokenizer, obs, args.thinking)
                if not truncate_if_full(ep, args):
                    still_playing.append(i)
                    continue
            caches[STUDENT][i] = caches[TEACHER][i] = None  # the episode is over: free its caches
        active = still_playing
    return episodes


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the losses. Per-token terms first (pure functions of log-probs, unit-tested against each
# other), then the loss of one micro-batch: per-role sums over its trained tokens (the training step
# divides them by the mini-batch's token counts) and the statistics to log.
# ----------------------------------------------------------------------------------------------------
def sampled_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, adv_clip: float = 0.0,
                       baseline: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Student turns: A_t = stopgrad(log pi_t(y_t) - log pi_s(y_t)), loss_t = -A_t log pi_s(y_t).
    Its expected gradient under y_t ~ pi_s is the gradient of KL(pi_s || pi_t) at that position; so is that
    of -(A_t - b) log pi_s(y_t) for a constant b, since E[grad log pi_s(y_t)] = 0 (a baseline, `--adv-baseline`)."""
    advantage = (logp_t - logp_s).detach()
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    return -(advantage - baseline) * logp_s


def clipped_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_clip: float,
                               adv_clip: float = 0.0, baseline: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The sampled form for a batch that the student sampled a few optimizer steps ago (PPO's surrogate):
    A_t = log pi_t(y_t) - log pi_old(y_t) from the rollout-time student, r_t = pi_s(y_t) / pi_old(y_t),
    loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t). At r_t = 1 its gradient is the plain form's."""
    advantage = logp_t - logp_old
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    advantage = advantage - baseline
    ratio = torch.exp(logp_s - logp_old)
    return -torch.min(ratio * advantage, ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * advantage)


def importance_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_max: float,
                                 adv_clip: float = 0.0, baseline: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The sampled form on tokens drawn by the rollout-time student pi_old, a few optimizer steps ago (importance
    sampling): the plain form's loss weighted by stopgrad(min(r_t, c)), r_t = pi_s(y_t) / pi_old(y_t). Below the
    cap c its expected gradient under y_t ~ pi_old is E_old[r_t (log pi_s - log pi_t) grad log pi_s] =
    grad KL(pi_s || pi_t) at the current student; at r_t = 1 it is the plain form's."""
    weight = torch.exp(logp_s - logp_old).detach().clamp(max=ratio_max)
    return weight * sampled_reverse_kl(logp_s, logp_t, adv_clip, baseline)


def topk_reverse_kl(at_s: torch.Tensor, topk_t: torch.Tensor) -> torch.Tensor:
    """The reverse KL over k + 1 buckets: the teacher's top-k tokens v (log-probs [..., k] of student and
    teacher at them) and the tail R of all other tokens, p(R) = 1 - sum_v p(v): sum over the buckets of
    p_s log(p_s / p_t), a lower bound of KL(pi_s || pi_t) that is exact when the tail is one token or empty.
    No sampling: every position's whole top-k is trained, whichever token the student drew there."""
    def with_tail(logp: torch.Tensor) -> torch.Tensor:  # log p(R), floored at 1e-6 (fp32 resolves no finer)
        return torch.cat([logp, torch.log((-torch.expm1(logp.logsumexp(-1))).clamp(min=1e-6)).unsqueeze(-1)], -1)
    at_s, topk_t = with_tail(at_s), with_tail(topk_t)
    p_s, p_t = at_s.exp(), topk_t.exp()
    return (p_s * (at_s - topk_t) - p_s + p_t).sum(-1)


def full_reverse_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), from full log-prob rows [N, V]."""
    return (full_s.exp() * (full_s - full_t)).sum(-1)


def full_forward_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_t || pi_s) = sum_v pi_t(v) (log pi_t(v) - log pi_s(v)); its gradient is that of the
    cross-entropy against the teacher's whole distribution."""
    return (full_t.exp() * (full_t - full_s)).sum(-1)


def guided_opd_loss(student, mb: dict, args: Args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of the student-turn loss, sum of the teacher-turn loss, statistics) over the micro-batch's
    trained tokens. `mb` holds the batch tensors, the teacher's log-probs (`teacher_logp`), its full rows at
    the trained positions (`teacher_full`, for the exact losses) and the rollout student's (`old_logp`)."""
    s_mask = mb["loss_mask"] & (mb["role"] == STUDENT)
    t_mask = mb["loss_mask"] & (mb["role"] == TEACHER)
    full = args.student_loss == "full" or args.teacher_loss == "full"
    s = token_logprobs(student, mb["input_ids"], mb["attention_mask"], mb["loss_mask"], full=full,
                       at=mb.get("teacher_topk_ids"))
    logp_s, logp_t = s.logp, mb["teacher_logp"]

    baseline = 0.0
    if args.adv_baseline:  # the micro-batch's mean advantage over its student tokens (of the rollout student's)
        a = logp_t - (mb["old_logp"] if args.ratio_clip > 0 else logp_s.detach())
        a = a.clamp(-args.adv_clip, args.adv_clip) if args.adv_clip > 0 else a
        baseline = (a * s_mask).sum() / s_mask.sum().clamp(min=1)
    if args.student_loss == "topk":
        rkl_tokens = topk_reverse_kl(s.at_logp, mb["teacher_topk_logp"])
    elif "old_logp" in mb and args.ratio_clip > 0:
        rkl_tokens = clipped_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_clip, args.adv_clip, baseline)
    elif "old_logp" in mb and args.ratio_max > 0:
        rkl_tokens = importance_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_max, args.adv_clip, baseline)
    else:
        rkl_tokens = sampled_reverse_kl(logp_s, logp_t, args.adv_clip, baseline)
    fkl_tokens = -logp_s  # teacher turns: forward KL with only the sampled tokens known = cross-entropy
    if full:  # the exact losses from the full distributions at the trained positions (rows in mask order)
        where = mb["loss_mask"].nonzero(as_tuple=True)
        if args.student_loss == "full":
            rkl_tokens = torch.zeros_like(logp_s).index_put(where, full_reverse_kl(s.full, mb["teacher_full"]))
        if args.teacher_loss == "full":
            fkl_tokens = torch.zeros_like(logp_s).index_put(where, full_forward_kl(s.full, mb["teacher_full"]))
    if args.teacher_loss == "none":
        fkl_tokens = torch.zeros_like(logp_s)
    pg_sum, ce_sum = (rkl_tokens * s_mask).sum(), (fkl_tokens * t_mask).sum()
    with torch.no_grad():
        stats = {
            "reverse_kl": ((logp_s - logp_t) * s_mask).sum().item(),  # sampled-token estimate
            "forward_kl": ((logp_t - logp_s) * t_mask).sum().item(),  # on the teacher's own samples
            "pg_loss": pg_sum.item(),
            "ce_loss": ce_sum.item(),
            "student_tokens": s_mask.sum().item(),
            "teacher_tokens": t_mask.sum().item(),
        }
        if "old_logp" in mb:  # share of student tokens whose ratio left the clip range (above the cap, truncated)
            ratio = (logp_s - mb["old_logp"]).exp()
            out = (ratio - 1).abs().gt(args.ratio_clip) if args.ratio_clip > 0 else ratio.gt(args.ratio_max)
            stats["clipped"] = (out & s_mask).sum().item()
    return pg_sum, ce_sum, stats


# ----------------------------------------------------------------------------------------------------
# FSDP2 wrapping and the training step
# ----------------------------------------------------------------------------------------------------
def shard(model, device, trainable: bool, activation_checkpointing: bool = False):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, LM head).
    bf16 compute with fp32 reductions on GPU; fp32 on CPU (bf16 is about 10x slower there)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    one_rank = torch.distributed.get_world_size() == 1
    weights = model.state_dict() if not one_rank and model.device.type != "meta" else {}  # rank 0's, loaded on its CPU
    if one_rank:
        model.to(device)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    # A frozen teacher frees its gathered root parameters after each forward; the student keeps them
    # for its backward (FSDP2's default for the root).
    fully_shard(model, mp_policy=mp, reshard_after_forward=not trainable)
    if not one_rank:  # every rank's shards from rank 0's weights, one tensor at a time
        fill_from_rank0(model, weights, device)
    return model


def train_step(student, optimizer, episodes: list[Episode], batch: dict, teacher_scores, old_logp, beta: float,
               plan: list[int], args: Args, world: int, device) -> dict:
    """One iteration's updates. The rollout batch is split into --num-minibatches mini-batches, one optimizer
    step each (as verl's PPO mini-batches): a tiny model needs many steps, and rollouts cost the most. The
    split is `plan` (a shuffle of the batch's slots, the same on every rank): each step sees a random share of
    the episodes. Inside a mini-batch, micro-batches of at most --micro-batch-tokens accumulate gradients.
    Returns the summed statistics of the micro-batches and the mean gradient norm."""
    loss_mask = batch["loss_mask"]
    full_rows = None
    if teacher_scores.full is not None:  # map each trained position to its row of the teacher's full distributions
        full_rows = torch.full(loss_mask.shape, -1, dtype=torch.long)
        full_rows[loss_mask] = torch.arange(int(loss_mask.sum()))
    trained = loss_mask & ((batch["role"] == STUDENT) | torch.tensor(args.teacher_loss != "none"))
    stats_sum, grad_norms, skipped = {}, [], 0
    for m in range(args.num_minibatches):
        rows = [i for i, ep in enumerate(episodes) if plan[ep.slot] == m]
        counts = all_sum({"tokens": int(trained[rows].sum()), "student": int((loss_mask & (batch["role"] == STUDENT))[rows].sum()),
                          "teacher": int((trained & (batch["role"] == TEACHER))[rows].sum())})
        order = sorted(rows, key=lambda r: len(episodes[r]))  # similar lengths together: less padding
        groups = pack_by_tokens([len(e) for e in episodes], args.micro_batch_tokens, order)
        n_max = all_max(len(groups))  # every rank runs as many forward/backward passes
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_max):
            student.set_requires_gradient_sync(j == n_max - 1)  # reduce gradients once, after the last
            idx = groups[j] if j < len(groups) else (groups or [[0]])[0][:1]  # a rank with fewer micro-batches repeats
            weight = 1.0 if j < len(groups) else 0.0               # one row with zero weight, to stay in step
            width = max(len(episodes[i]) for i in idx)  # right padding beyond the longest row is cut
            mb = {k: batch[k][idx, :width].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "role")}
            mb["teacher_logp"] = teacher_scores.logp[idx, :width].to(device)
            if full_rows is not None:
                mb["teacher_full"] = teacher_scores.full[full_rows[idx, :width][loss_mask[idx, :width]]].to(device)
            if teacher_scores.topk_ids is not None:
                mb["teacher_topk_logp"] = teacher_scores.topk_logp[idx, :width].to(device)
                mb["teacher_topk_ids"] = teacher_scores.topk_ids[idx, :width].to(device)
            if old_logp is not None:
                mb["old_logp"] = old_logp[idx, :width].to(device)
            pg_sum, ce_sum, stats = guided_opd_loss(student, mb, args)
            # The mini-batch's loss is a mean over its tokens on every rank; FSDP averages gradients over
            # ranks, hence the factor world.
            if args.role_weighting == "tokens":  # one token mean: each role weighs its share of the tokens
                loss = (pg_sum + ce_sum) * weight * world / max(counts["tokens"], 1.0)
            else:  # a token mean per role, weighted (1 - beta) : beta
                loss = ((1 - beta) * pg_sum / max(counts["student"], 1.0)
                        + beta * ce_sum / max(counts["teacher"], 1.0)) * weight * world
            loss.backward()
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + v * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):
            optimizer.step()
            grad_norms.append(grad_norm)
        else:  # a non-finite loss or gradient: skip the step, keep the weights, log it
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
    return {**stats_sum, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "skipped_steps": skipped}


def check_args(args: Args) -> None:
    """One-line errors for bad input, before anything is loaded (the shared arguments in common/runs.py)."""
    check_rollout_args(args)
    if args.temperature != 1 and (args.student_loss == "sampled" or args.teacher_loss == "ce"):
        raise SystemExit("error: --temperature must be 1 with the sampled losses (their log-probs are of the untempered "
                         "models); sample at another temperature only with --student-loss full or topk and --teacher-loss full or none")
    if not (0 <= args.beta_end <= 1 and 0 <= args.beta_start <= 1) or min(args.adv_clip, args.ratio_clip, args.ratio_max) < 0:
        raise SystemExit("error: --beta-start and --beta-end must be between 0 and 1, --adv-clip, --ratio-clip and "
                         "--ratio-max 0 (off) or positive")
    if args.topk < 1:
        raise SystemExit("error: --topk must be at least 1")
    if args.ratio_clip and args.student_loss != "sampled":
        raise SystemExit("error: --ratio-clip weighs the sampled form's tokens: use it with --student-loss sampled, or drop it")
    if args.batch_cache and (not args.cache_turns or args.rollout_chunk):
        raise SystemExit("error: --batch-cache keeps the whole batch's caches between turns: drop --no-cache-turns and "
                         "--rollout-chunk, or --batch-cache")


if __name__ == "__main__":
    # ---- INFRASTRUCTURE: arguments, process group, seeds, models, run folder (common/ holds the details) ----
    args = tyro.cli(Args)
    fill_defaults(args, TINY, REAL, REAL_LOSSES, required=("env", "teacher"))
    check_args(args)
    rank, world, device = setup()
    try:
        args.student = student_name(args.student, args.env)
        args.teacher = teacher_name(args.teacher, args.student, args.env)
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    # The memory plan, from the configs alone (--plan prints it and exits): fills the auto memory choices.
    plan = plan_run(args, world, device, args.student, [args.teacher], [[STUDENT, args.teacher]],
                    topk=args.topk if args.student_loss == "topk" else 0, full="full" in (args.student_loss, args.teacher_loss))
    try:
        envs.make(args.env, seed=args.seed).close()  # a bad spec fails here, in one line
        user = env_user(args.user_model, args.env, device)  # {} or {"user": the customer model}
    except (envs.EnvError, ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    seed_everything(args.seed + rank)  # each rank its own stream; the run is reproducible from --seed
    sampler = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling of tokens
    generators = {"sampler": sampler}

    # The student trains, the teacher is frozen; both sharded with FSDP2.
    student, tokenizer, (teacher,) = load_student_and_teachers(args.student, [args.teacher], device, args.max_seq_len)
    student = shard(student, device, trainable=True, activation_checkpointing=args.activation_checkpointing)
    teacher = shard(teacher, device, trainable=False)
    # foreach: one multi-tensor update instead of one per parameter (the default on CPU), the same numbers
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True)

    run = Run(args, args.env, student, tokenizer, optimizer, generators, device, f"teacher {args.teacher}, env {args.env}", plan)

    # Environments are made once and reset for every episode (a TextWorld-Express env is a JVM process).
    # Their own randomness comes from (--seed, split, episode seed): the same episode on any rank.
    pool = [envs.make(args.env, seed=args.seed, split="train", **user) for _ in range(args.num_envs)]
    eval_pool = [envs.make(args.env, seed=args.seed, split="heldout", **user)
                 for _ in range(eval_batch(args, world, args.num_envs))]
    max_turns = args.max_turns or pool[0].max_turns

    def evaluate_alone(model):
        """The model alone (beta = 0) on the held-out seeds."""
        return run.evaluate(model, lambda p, s, sampler: rollout(model, None, tokenizer, p, s, 0.0, args, sampler,
                                                                 args.eval_temperature, max_turns), eval_pool)

    # The teacher alone, once: the level the student is distilled towards.
    if run.start == 0:
        teacher_eval, _ = evaluate_alone(teacher)
        student_eval, _ = evaluate_alone(student)
        run.log(0, {"teacher": teacher_eval, "eval": student_eval}, f"teacher held-out success "
                f"{teacher_eval['success_rate']:.2f}, student before training {student_eval['success_rate']:.2f}")

    for iteration in range(run.start, args.total_iterations):
        t_iter = time.time()
        beta = beta_schedule(iteration, args)
        lr = lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ALGO LOGIC: rollouts with guidance probability beta
        t0 = time.time()
        seeds = [(iteration * world + rank) * args.num_envs + j for j in range(args.num_envs)]
        with gathered(*run.gather(student, teacher)):  # whole, or by layer (--rollout-gather)
            episodes = rollout(student, teacher, tokenizer, pool, seeds, beta, args, sampler, args.temperature, max_turns)
        for j, ep in enumerate(episodes):
            ep.slot = rank * args.num_envs + j  # its place in the batch over every rank: picks its mini-batch
        episodes = run.drop_failed(episodes, iteration)  # those whose env failed; a signal or too many stop the run
        t_rollout = time.time() - t0

        # Teacher scoring: log pi_t of every agent token (student turns need it for the advantage; the
        # teacher's own turns for the logged forward KL), its top-k for --student-loss topk, full distributions
        # only for the exact losses. For the sampled form's ratio, the student's rollout-time log-probs too.
        t0 = time.time()
        batch = collate(episodes, tokenizer.pad_token_id)
        need_full = args.student_loss == "full" or args.teacher_loss == "full"
        scores = score_teacher(teacher, batch, batch["loss_mask"], args.micro_batch_tokens, full=need_full,
                               topk=args.topk if args.student_loss == "topk" else 0)
        old_logp = None
        if args.student_loss == "sampled" and (args.ratio_clip > 0 or args.ratio_max > 0):
            old_logp = score_teacher(student, batch, batch["loss_mask"], args.micro_batch_tokens).logp
        t_teacher = time.time() - t0

        # ALGO LOGIC: the training step, on mini-batches that shuffle the batch's slots (drawn from --seed, iteration)
        t0 = time.time()
        plan = minibatch_plan([0] * (args.num_envs * world), args.num_minibatches, random.Random(f"{args.seed}/mb/{iteration}"))
        step = train_step(student, optimizer, episodes, batch, scores, old_logp, beta, plan, args, world, device)
        t_train = time.time() - t0

        # ---- INFRASTRUCTURE: logging (sums over every rank's episodes and micro-batches), eval, checkpoint ----
        totals = all_sum({**episode_sums(episodes), **{k: v for k, v in step.items() if k not in ("grad_norm", "skipped_steps")}})
        completed = iteration + 1
        n_student, n_teacher = max(totals["student_tokens"], 1), max(totals["teacher_tokens"], 1)
        trained = totals["student_tokens"] + (totals["teacher_tokens"] if args.teacher_loss != "none" else 0)
        losses = {"reverse_kl": totals["reverse_kl"] / n_student, "forward_kl": totals["forward_kl"] / n_teacher,
                  "pg_loss": totals["pg_loss"] / n_student, "ce_loss": totals["ce_loss"] / n_teacher,
                  "loss": (totals["pg_loss"] + totals["ce_loss"]) / max(trained, 1),
                  **({"clipfrac": totals["clipped"] / n_student} if "clipped" in totals else {})}
        run.log_iteration(completed, totals, step, lr, t_iter, (t_rollout, t_teacher, t_train), losses,
                          {"beta": beta, "teacher_token_fraction": totals["teacher_tokens"] / max(totals["agent_tokens"], 1)},
                          words=f"beta {beta:.2f}  rkl {losses['reverse_kl']:.3f}")
        if run.due(completed, args.eval_interval):
            ev, eval_eps = evaluate_alone(student)
            run.log(completed, {"eval": ev}, f"eval after {completed} iterations: held-out success {ev['success_rate']:.2f}, "
                    f"score {ev['score']:.2f}, turns {ev['episode_turns']:.1f}", [("eval/trajectory", ep) for ep in eval_eps[:2]])
        run.save(completed)

    run.finish(pool + eval_pool)  # the student in Hugging Face format, the envs closed
