"""ATOD: annealed on-policy distillation and GRPO, with turn-level reweighting (T-DUR), for multi-turn agents.

Paper: ATOD, arXiv 2606.27814.

On-policy distillation (OPD) follows the teacher token by token but can never do better than it; GRPO uses the
environment's reward, which can pass the teacher, but learns slowly from a weak start. ATOD mixes the two
advantages and shifts the weight from the teacher to the reward as training goes. The student alone plays
groups of G episodes of the same task (temperature 1); the outcome reward r is the episode's success.
- GRPO, per trajectory i: A_GRPO_i = (r_i - mean of its group) / (std of its group + 1e-6), on all its tokens.
- OPD, per token: A_OPD_t = (log pi_t(y_t) - log pi_old(y_t)) * w_k(t), with the rollout-time student pi_old.
- T-DUR (turn weights, from rollout values, no gradient): per turn k of a trajectory, d_k = mean |log pi_old -
  log pi_t| and h_k = mean(-log pi_old) over the turn's tokens, each min-max normalised over the trajectory's
  turns (0.5 where the range is below 1e-8); w_k = 1 - (1 - d_k)(1 - h_k).
- Hybrid (Eq 8): A_t = kappa(s) A_OPD_t + rho(s) A_GRPO, with p = min(s / S_anneal, 1), kappa = max(0.1, 1 -
  0.9 p), rho = 1 + p; in PPO's clipped surrogate (ratio to pi_old), a token mean per trajectory, then the mean
  over trajectories; no KL penalty.

Open choices, as flags (their help says more): --renormalize-weights (on: T-DUR weights scaled to mean 1 per
trajectory, plain OPD's scale; as written the mean is about 0.07), --weighting token or none (w = 1, the paper's
OPD baseline with --mode opd), --anneal-iterations (the paper's 80 of 150), --clip-eps 0.2, --update-epochs and
--num-minibatches (steps of whole groups, shuffled anew each epoch), --lr-schedule (the paper gives none),
--reward success (the paper's) or score; --opd-loss: the paper's sampled advantage inside the surrogate
(`sampled`), or the reverse KL per token weighted by kappa w_k beside it, exact (`full`, tiny: a 1.5k vocabulary)
or over the teacher's top 64 tokens and a tail bucket (`topk`, real: the sampled form did not teach the tiny
student in guided_opd.py, the top-k form did); --real-losses; --term-grad-norms (docs/atod.md: the terms' scales).
Baselines and ablations: --mode opd (rho = 0), grpo (kappa = 0), constant (kappa = rho = 1).
Groups are never split across ranks: each rank plays whole groups, so advantages are computed locally. A
mini-batch without any signal (every advantage and KL weight 0: GRPO on groups of equal rewards) takes no step.
Arguments left at None are "auto" (the TINY and REAL tables below the Args).

    python atod.py                                    # tiny default: peckingorder, an imperfect teacher (0.77)
    python atod.py --mode opd                         # OPD only; --mode grpo: GRPO only
    torchrun --nproc_per_node 8 atod.py --student qwen3-1.7b --teacher <your GRPO-trained qwen3-4b> \\
        --env alfworld --max-turns 50                 # the paper's 150 iterations; add --plan to see its memory first
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
from common.episode import (STUDENT, Episode, TurnCache, collate, end_of_turn_id, episode_sums, generate_replies,
                            pack_by_tokens, start_episodes, step_envs)
from common.memory import plan_run
from common.models import ModelError, fill_defaults, fill_from_rank0, is_tiny, load_student_and_teachers, student_name, teacher_name
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
    """the teacher (frozen; the paper's are GRPO-trained). Auto: for a tiny student, tiny-expert:peckingorder-imperfect
    on the default env (an imperfect teacher: the student fine-tuned briefly on the game's oracle episodes) and --env's
    tiny expert elsewhere; a real student needs one"""
    env: str | None = None
    """environment spec, e.g. twx:simonsays, scienceworld:boil, alfworld (see envs/); auto: twx:peckingorder for a
    tiny student, a real one needs it"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template (the tiny models do not think)"""
    user_model: str | None = None
    """the customer of conversational envs (tau2:*), played by this model (any name the student takes; a whole
    copy per rank, greedy); unset = the env's scripted stand-in, which answers from the task's scenario"""

    # Rollouts
    num_envs: int = 16
    """episodes played by each rank per iteration, whole groups (the global batch is num_envs x world size)"""
    max_turns: int | None = None
    """turns per episode before it is cut; 0 = the environment's default (auto: 12 tiny, 0 real)"""
    max_new_tokens: int | None = None
    """tokens a turn may generate (auto: 24 tiny, 512 real; more with --thinking)"""
    max_seq_len: int | None = None
    """tokens an episode may hold; a turn that would not fit ends the episode as truncated (auto: 2048 tiny,
    16384 real)"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (the paper's 1; the losses use the untempered log-probs)"""
    cache_turns: bool = True
    """keep each episode's key/value cache between turns, so a turn runs only its new tokens (faster; the memory
    grows with episodes x tokens); on unless the memory plan needs it off; --no-cache-turns: always off"""
    rollout_chunk: int = 0
    """episodes decoded at once, a rollout's batch in chunks (bounds the batched caches and logits); 0 = auto: all,
    or fewer where the memory plan needs it"""
    rollout_gather: Literal["auto", "whole", "student", "layers"] = "auto"
    """how rollouts hold the sharded models: gathered whole (`whole`, fastest), the student whole and the teacher
    (its evaluation) one layer at a time in each forward (`student`), every model by layer (`layers`, least memory);
    auto: the fastest that the memory plan fits"""

    # Optimization
    total_iterations: int | None = None
    """iterations: a batch of rollouts and --update-epochs x --num-minibatches steps each (auto: 30 tiny, 150 real)"""
    learning_rate: float | None = None
    """AdamW learning rate (auto: 5e-4 tiny, 1e-6 real)"""
    lr_schedule: Literal["constant", "cosine", "linear"] | None = None
    """learning rate after warmup: constant, or decaying to 0 at the end (auto: cosine tiny, constant real)"""
    warmup_iterations: int = 0
    """linear learning rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_minibatches: int | None = None
    """optimizer steps per epoch = mini-batches, each of whole groups (GRPO's advantages sum to 0 within a group), so
    at most the global batch's groups (num_envs x world / group_size); auto: 4, or that many groups if fewer"""
    update_epochs: int = 1
    """passes over each rollout batch (PPO epochs)"""
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
    eval_interval: int = 5
    """evaluate the student every N iterations"""
    eval_episodes: int = 64
    """held-out episodes per evaluation (split over ranks)"""
    eval_temperature: float = 0.0
    """sampling temperature of evaluation (0 = greedy; the paper validates at 0.4)"""
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
    mode: Literal["atod", "opd", "grpo", "constant"] = "atod"
    """atod: annealed kappa and rho; opd: OPD only (rho = 0); grpo: GRPO only (kappa = 0); constant: kappa = rho
    = 1 (no annealing)"""
    group_size: int | None = None
    """G: episodes of the same task per group, the GRPO baseline being the group's mean reward (auto: 8, the
    paper's, real; 4 tiny, so that the tiny default's 16 episodes hold 4 tasks)"""
    reward: Literal["success", "score"] = "success"
    """the outcome reward of an episode: success (0/1, the paper's) or the env's score"""
    anneal_iterations: int | None = None
    """iterations over which kappa goes 1 -> 0.1 and rho 1 -> 2 (the paper: 80 of 150); auto: the same fraction
    of --total-iterations"""
    weighting: Literal["tdur", "token", "none"] = "tdur"
    """weights of the OPD term: tdur (per turn, the paper's), token (the same, per token: an ablation), none (w = 1)"""
    renormalize_weights: bool = True
    """scale each trajectory's T-DUR weights to mean 1 over its tokens, so that the OPD term keeps the scale of
    plain OPD (the paper does not say; `--no-renormalize-weights` = as written, mean weight about 0.07 here)"""
    clip_eps: float = 0.2
    """PPO clip range of the importance ratio to the rollout-time student"""
    opd_loss: Literal["sampled", "topk", "full"] | None = None
    """sampled: A_OPD on the sampled token, inside the surrogate (the paper's); topk: the reverse KL over the
    teacher's top --topk tokens and one bucket for the rest, weighted by kappa w, beside the surrogate (scales to
    a 151k vocabulary); full: the exact reverse KL over the vocabulary, the same way (auto: full tiny, topk real)"""
    topk: int = 64
    """topk: the teacher's k most likely tokens at each position"""
    term_grad_norms: bool | None = None
    """log the gradient norm of the OPD term and of the GRPO term apart, on each iteration's first mini-batch (two
    more forward/backward passes of it; auto: on tiny, off real)"""
    real_losses: bool = False
    """with a tiny student: train with the real-model OPD loss (REAL_LOSSES: --opd-loss as a real run takes it),
    everything else the tiny default's, to see it teach on a CPU"""


# "Auto" arguments (None above): the embedded tiny default's values, and a real model's.
# REAL's sources: the ATOD paper's rate (1e-6, constant), 150 iterations and groups of 8; 4 mini-batches as verl's
# GRPO recipes (at most the global batch's groups: see --num-minibatches); the papers' lengths (512 tokens a turn).
TINY = dict(env="twx:peckingorder", max_turns=12, max_new_tokens=24, max_seq_len=2048, learning_rate=5e-4,
            micro_batch_tokens=4096, opd_loss="full", group_size=4, lr_schedule="cosine", term_grad_norms=True,
            total_iterations=30, num_minibatches=4)
REAL = dict(max_turns=0, max_new_tokens=512, max_seq_len=16384, learning_rate=1e-6, micro_batch_tokens=16384,
            opd_loss="topk", group_size=8, lr_schedule="constant", term_grad_norms=False, total_iterations=150,
            num_minibatches=4)
REAL_LOSSES = ("opd_loss",)  # what --real-losses takes from REAL
TINY_TEACHER = "tiny-expert:peckingorder-imperfect"  # the default env's imperfect teacher (common/tiny_build.py MORE_EXPERTS)
PAPER_ANNEAL_FRACTION = 80 / 150


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the annealing schedule
# ----------------------------------------------------------------------------------------------------
def kappa_rho(iteration: int, args: Args) -> tuple[float, float]:
    """(kappa, rho) at `iteration` (0-based): p = min(s / S_anneal, 1), kappa = max(0.1, 1 - 0.9 p), rho = 1 + p;
    the baselines fix them."""
    if args.mode != "atod":
        return {"opd": (1.0, 0.0), "grpo": (0.0, 1.0), "constant": (1.0, 1.0)}[args.mode]
    p = min(iteration / max(args.anneal_iterations, 1), 1.0)
    return max(0.1, 1.0 - 0.9 * p), 1.0 + p


def lr_at(iteration: int, args: Args) -> float:
    if iteration < args.warmup_iterations:
        return args.learning_rate * (iteration + 1) / args.warmup_iterations
    p = (iteration - args.warmup_iterations) / max(1, args.total_iterations - args.warmup_iterations)
    return args.learning_rate * {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p}[args.lr_schedule]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: group rollouts. The student alone plays every turn. Rows come in blocks (a group of G episodes
# of one task in training; all rows in evaluation), each turn of a block sampled from its own generator, seeded
# by (block seed, turn): a group's episodes are the same however the batch is split over ranks (whatever the
# other ranks generate), and a resumed run draws them again identically.
# ----------------------------------------------------------------------------------------------------
def truncate_if_full(ep: Episode, args: Args) -> bool:
    """End an episode whose next turn could pass --max-seq-len (logged as truncated, never a crash)."""
    if len(ep) + args.max_new_tokens > args.max_seq_len:
        ep.truncated = True
        return True
    return False


def rollout(student, tokenizer, pool, seeds, args: Args, block_seeds: list[int], temperature: float,
            max_turns: int) -> list[Episode]:
    eot = end_of_turn_id(tokenizer)
    device = next(student.parameters()).device
    block = math.ceil(len(seeds) / len(block_seeds))
    # the envs reset and step at once where they allow it; an env that fails ends its episode (`error`, dropped later)
    episodes = start_episodes(tokenizer, pool, seeds, args.thinking)
    active = [i for i, ep in enumerate(episodes) if not ep.done and not truncate_if_full(ep, args)]
    caches = [TurnCache() for _ in episodes]
    for turn in range(max_turns):
        if all_max(len(active)) == 0:  # FSDP: every rank runs the same generate calls, so all stop together
            break
        # each block (a group's episodes) samples with its own generator: the replies do not depend on how the
        # blocks are split over ranks; the blocks are sampled together, in one batched call
        samplers = [torch.Generator(device=device).manual_seed(block_seed * 1009 + turn) for block_seed in block_seeds]
        outs = generate_replies(student, tokenizer, [episodes[i].ids for i in active], args.max_new_tokens, temperature,
                                generator=[samplers[i // block] for i in active],
                                caches=[caches[i] for i in active] if args.cache_turns else None, chunk=args.rollout_chunk)
        replies = dict(zip(active, outs))
        texts = [tokenizer.decode(replies[i], skip_special_tokens=True) for i in active]
        steps = step_envs(pool, episodes, active, texts)
        still_playing = []
        for i, text, (obs, reward, env_done, info) in zip(active, texts, steps):
            ep = episodes[i]
            ep.append_reply(replies[i], STUDENT, eot)
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
            caches[i] = None  # the episode is over: free its cache
        active = still_playing
    return episodes


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the advantages. GRPO per trajectory from its group's rewards; T-DUR weights per turn from the
# rollout-time log-probs of the student and the teacher; the hybrid per token. Pure functions of tensors.
# ----------------------------------------------------------------------------------------------------
def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r_i - mean of its group) / (std of its group + 1e-6), rewards [N] in groups of consecutive rows.
    A group whose rewards are all equal gets 0 (no signal, no division by zero). std: unbiased, as verl's GRPO."""
    r = rewards.view(-1, group_size).double()
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1).float()


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalised to [0, 1]; 0.5 everywhere when the range is below 1e-8."""
    lo, hi = x.min(), x.max()
    return torch.full_like(x, 0.5) if hi - lo < 1e-8 else (x - lo) / (hi - lo)


def tdur_weights(logp_s: torch.Tensor, logp_t: torch.Tensor, turn_id: torch.Tensor, mask: torch.Tensor,
                 per: str = "turn", renormalize: bool = False) -> torch.Tensor:
    """T-DUR weights [B, T] (0 outside `mask`). For each row, over its units (turns, or tokens with per="token"):
    d = mean |log pi_s - log pi_t|, h = mean(-log pi_s) over the unit's masked tokens, each min-max normalised
    over the row's units; w = 1 - (1 - d)(1 - h), given to each of the unit's tokens. With `renormalize`, each
    row's weights are scaled to mean 1 over its tokens (a row of all-zero weights stays 0)."""
    weights = torch.zeros_like(logp_s)
    for b in range(logp_s.shape[0]):
        pos = mask[b].nonzero().squeeze(-1)
        if pos.numel() == 0:
            continue
        unit = turn_id[b, pos] if per == "turn" else torch.arange(pos.numel())
        units, index = unit.unique(return_inverse=True)
        count = torch.zeros(len(units)).index_add_(0, index, torch.ones(pos.numel()))
        d = torch.zeros(len(units)).index_add_(0, index, (logp_s[b, pos] - logp_t[b, pos]).abs().float()) / count
        h = torch.zeros(len(units)).index_add_(0, index, -logp_s[b, pos].float()) / count
        w = (1 - (1 - minmax(d)) * (1 - minmax(h)))[index]
        if renormalize and w.sum() > 0:
            w = w * pos.numel() / w.sum()
        weights[b, pos] = w
    return weights


def hybrid_advantages(logp_old: torch.Tensor, logp_t: torch.Tensor, weights: torch.Tensor, adv_grpo: torch.Tensor,
                      mask: torch.Tensor, kappa: float, rho: float, opd_in_surrogate: bool = True) -> torch.Tensor:
    """A_t = kappa w_t (log pi_t - log pi_old) + rho A_GRPO_i on the masked tokens [B, T] (Eq 8). Without
    `opd_in_surrogate` (--opd-loss full) only rho A_GRPO: the OPD term is then the exact KL beside the surrogate."""
    opd = kappa * weights * (logp_t - logp_old) if opd_in_surrogate else torch.zeros_like(logp_old)
    return (opd + rho * adv_grpo[:, None]) * mask


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the losses. Per-token terms first (unit-tested against their definitions), then the loss of one
# micro-batch: the sum over its trajectories of each one's token mean (the training step divides by the
# mini-batch's number of trajectories) and the statistics to log.
# ----------------------------------------------------------------------------------------------------
def clipped_surrogate(logp_s: torch.Tensor, logp_old: torch.Tensor, advantage: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """PPO's loss per token: -min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi_s(y_t) / pi_old(y_t)."""
    ratio = torch.exp(logp_s - logp_old)
    return -torch.min(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)


def full_reverse_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), from full log-prob rows [N, V]."""
    return (full_s.exp() * (full_s - full_t)).sum(-1)


def topk_reverse_kl(at_s: torch.Tensor, topk_t: torch.Tensor) -> torch.Tensor:
    """The reverse KL over k + 1 buckets: the teacher's top-k tokens v (log-probs [..., k] of student and
    teacher at them) and the tail R of all other tokens, p(R) = 1 - sum_v p(v): sum over the buckets of
    p_s log(p_s / p_t), a lower bound of KL(pi_s || pi_t) that is exact when the tail is one token or empty."""
    def with_tail(logp: torch.Tensor) -> torch.Tensor:  # log p(R), floored at 1e-6 (fp32 resolves no finer)
        return torch.cat([logp, torch.log((-torch.expm1(logp.logsumexp(-1))).clamp(min=1e-6)).unsqueeze(-1)], -1)
    at_s, topk_t = with_tail(at_s), with_tail(topk_t)
    p_s, p_t = at_s.exp(), topk_t.exp()
    return (p_s * (at_s - topk_t) - p_s + p_t).sum(-1)


def atod_loss(student, mb: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """(sum over the micro-batch's trajectories of their token-mean loss, statistics). `mb` holds the batch
    tensors, the rollout student's log-probs (`old_logp`), the teacher's (`teacher_logp`), the hybrid advantages
    (`advantages`), each token's 1 / (its trajectory's token count) (`token_share`), and for --opd-loss full / topk
    the teacher's full rows at the trained positions (`teacher_full`) or its top-k (`teacher_topk_logp`, `_ids`)
    and each token's kappa w (`kl_coef`)."""
    mask = mb["loss_mask"].clone()
    mask[:, 0] = False  # the first token is never predicted
    full = args.opd_loss == "full"
    s = token_logprobs(student, mb["input_ids"], mb["attention_mask"], mask, full=full, at=mb.get("teacher_topk_ids"))
    logp_s, logp_old = s.logp, mb["old_logp"]
    tokens = clipped_surrogate(logp_s, logp_old, mb["advantages"], args.clip_eps)
    if full:  # the OPD term as the exact reverse KL, weighted by kappa w (rows in mask order)
        kl = torch.zeros_like(logp_s).index_put(mask.nonzero(as_tuple=True), full_reverse_kl(s.full, mb["teacher_full"]))
        tokens = tokens + mb["kl_coef"] * kl
    elif args.opd_loss == "topk":  # the same with the top-k and its tail bucket
        tokens = tokens + mb["kl_coef"] * topk_reverse_kl(s.at_logp, mb["teacher_topk_logp"])
    loss_sum = (tokens * mb["token_share"] * mask).sum()
    with torch.no_grad():
        log_ratio = (logp_s - logp_old) * mask
        stats = {
            "loss": loss_sum.item(),  # summed per-trajectory token means
            "clipped": ((log_ratio.exp() - 1).abs().gt(args.clip_eps) & mask).sum().item(),
            "approx_kl": ((log_ratio.exp() - 1 - log_ratio) * mask).sum().item(),  # k3 estimate of KL(old || new)
            "tokens": mask.sum().item(),
        }
    return loss_sum, stats


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


def train_step(student, optimizer, episodes: list[Episode], batch: dict, teacher_scores, old_logp, advantages, kl_coef,
               terms: dict, plans: list[list[int]], args: Args, world: int, device) -> dict:
    """One iteration's updates: --update-epochs passes over the rollout batch, each split into --num-minibatches
    mini-batches of whole groups by its `plans` entry (the same on every rank), one optimizer step each. Inside a
    mini-batch, micro-batches of at most --micro-batch-tokens accumulate gradients. With --term-grad-norms, the
    first mini-batch's gradient is also taken for each of `terms` alone ({name: (advantages, kl_coef)}): on it
    the ratio is 1, the surrogate linear in A, so the terms' gradients add up to the step's. Returns the summed
    statistics of the micro-batches, the mean gradient norm and the terms' norms."""
    loss_mask = batch["loss_mask"].clone()
    loss_mask[:, 0] = False
    full_rows = None
    if teacher_scores.full is not None:  # map each trained position to its row of the teacher's full distributions
        full_rows = torch.full(loss_mask.shape, -1, dtype=torch.long)
        full_rows[loss_mask] = torch.arange(int(loss_mask.sum()))
    n_tokens = loss_mask.sum(1)
    token_share = (1.0 / n_tokens.clamp(min=1).float())[:, None].expand(loss_mask.shape)  # a token mean per trajectory
    stats_sum = {"loss": 0.0, "clipped": 0.0, "approx_kl": 0.0, "tokens": 0.0}
    grad_norms, skipped, no_signal, term_norms = [], 0, 0, {}

    def backward(rows: list[int], trajectories: int, advantages, kl_coef) -> dict:
        """The mini-batch `rows`' gradient (zeroed first); the summed statistics of its micro-batches."""
        out = {}
        order = sorted(rows, key=lambda r: len(episodes[r]))  # similar lengths together: less padding
        groups = pack_by_tokens([len(e) for e in episodes], args.micro_batch_tokens, order)
        n_max = all_max(len(groups))  # every rank runs as many forward/backward passes
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_max):
            student.set_requires_gradient_sync(j == n_max - 1)  # reduce gradients once, after the last
            idx = groups[j] if j < len(groups) else (groups or [[0]])[0][:1]  # a rank with fewer micro-batches repeats
            weight = 1.0 if j < len(groups) else 0.0               # one row with zero weight, to stay in step
            width = max(len(episodes[i]) for i in idx)  # right padding beyond the longest row is cut
            mb = {k: batch[k][idx, :width].to(device) for k in ("input_ids", "attention_mask", "loss_mask")}
            for k, v in (("teacher_logp", teacher_scores.logp), ("old_logp", old_logp), ("advantages", advantages),
                         ("kl_coef", kl_coef), ("token_share", token_share)):
                mb[k] = v[idx, :width].to(device)
            if full_rows is not None:
                mb["teacher_full"] = teacher_scores.full[full_rows[idx, :width][loss_mask[idx, :width]]].to(device)
            if teacher_scores.topk_ids is not None:
                mb["teacher_topk_logp"] = teacher_scores.topk_logp[idx, :width].to(device)
                mb["teacher_topk_ids"] = teacher_scores.topk_ids[idx, :width].to(device)
            loss_sum, stats = atod_loss(student, mb, args)
            # The mini-batch's loss is a mean over its trajectories on every rank; FSDP averages gradients
            # over ranks, hence the factor world.
            loss = loss_sum * weight * world / max(trajectories, 1.0)
            loss.backward()
            for key, v in stats.items():
                out[key] = out.get(key, 0.0) + v * weight
        return out

    for epoch in range(args.update_epochs):
        for m in range(args.num_minibatches):
            rows = [i for i, ep in enumerate(episodes) if plans[epoch][ep.slot] == m]
            counts = all_sum({"n": int((n_tokens[rows] > 0).sum()), "signal": int(((advantages[rows] != 0) | (kl_coef[rows] != 0)).sum())})
            if counts["signal"] == 0:  # no advantage, no KL (GRPO on flat groups): a zero gradient, and AdamW would
                no_signal += 1         # still move the weights along its momentum; so no step
                continue
            if args.term_grad_norms and not term_norms:  # each term's share of the first step's gradient
                for name, (adv, coef) in terms.items():
                    backward(rows, counts["n"], adv, coef)
                    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float("inf"))  # the norm, unclipped
                    term_norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            for key, v in backward(rows, counts["n"], advantages, kl_coef).items():
                stats_sum[key] = stats_sum.get(key, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                grad_norms.append(grad_norm)
            else:  # a non-finite loss or gradient: skip the step, keep the weights, log it
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
    return {**stats_sum, "grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "skipped_steps": skipped,
            "no_signal_steps": no_signal, "term_norms": term_norms}


def check_args(args: Args) -> None:
    """One-line errors for bad input, before anything is loaded (the shared arguments in common/runs.py)."""
    check_rollout_args(args)
    if args.group_size < 2:
        raise SystemExit("error: --group-size must be at least 2 (GRPO compares the episodes of a group)")
    if args.num_envs % args.group_size:
        raise SystemExit(f"error: --num-envs ({args.num_envs}) must be a multiple of --group-size ({args.group_size}): "
                         "each rank plays whole groups")
    if args.temperature != 1 and args.opd_loss == "sampled":
        raise SystemExit("error: --temperature must be 1 with --opd-loss sampled (its log-probs are of the untempered "
                         "student); sample at another temperature only with --opd-loss full or topk")
    if args.clip_eps <= 0 or args.update_epochs < 1 or args.anneal_iterations < 0 or args.topk < 1:
        raise SystemExit("error: --clip-eps must be positive, --update-epochs at least 1, --anneal-iterations 0 or more, "
                         "--topk at least 1")


if __name__ == "__main__":
    # ---- INFRASTRUCTURE: arguments, process group, seeds, models, run folder (common/ holds the details) ----
    args = tyro.cli(Args)
    auto_minibatches = args.num_minibatches is None
    fill_defaults(args, TINY, REAL, REAL_LOSSES, required=("env", "teacher"))
    most_minibatches = args.num_minibatches  # auto: at most the global batch's groups (after setup); a rank's until then
    if auto_minibatches:
        args.num_minibatches = min(most_minibatches, max(1, args.num_envs // max(args.group_size, 1)))
    if args.anneal_iterations is None:
        args.anneal_iterations = round(PAPER_ANNEAL_FRACTION * args.total_iterations)
    check_args(args)
    rank, world, device = setup()
    groups = args.num_envs * world // args.group_size  # of the global batch: a mini-batch holds whole groups
    if not auto_minibatches and args.num_minibatches > groups:
        raise SystemExit(f"error: --num-minibatches {args.num_minibatches} is more than the {groups} groups of the global "
                         "batch (num_envs x ranks / group_size): each mini-batch holds whole groups")
    args.num_minibatches = min(most_minibatches, groups)
    try:
        if args.teacher is None and is_tiny(args.student) and args.env == TINY["env"]:
            args.teacher = TINY_TEACHER
        args.student = student_name(args.student, args.env)
        args.teacher = teacher_name(args.teacher, args.student, args.env)
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    # The memory plan, from the configs alone (--plan prints it and exits); the teacher generates in its evaluation.
    plan = plan_run(args, world, device, args.student, [args.teacher], [[STUDENT], [args.teacher]],
                    topk=args.topk if args.opd_loss == "topk" else 0, full=args.opd_loss == "full")
    try:
        envs.make(args.env, seed=args.seed).close()  # a bad spec fails here, in one line
        user = env_user(args.user_model, args.env, device)  # {} or {"user": the customer model}
    except (envs.EnvError, ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    seed_everything(args.seed + rank)  # each rank its own stream; the run is reproducible from --seed
    generators = {}  # rollouts draw from generators seeded by (--seed, task, turn): nothing to checkpoint

    # The student trains, the teacher is frozen; both sharded with FSDP2.
    student, tokenizer, (teacher,) = load_student_and_teachers(args.student, [args.teacher], device, args.max_seq_len)
    student = shard(student, device, trainable=True, activation_checkpointing=args.activation_checkpointing)
    teacher = shard(teacher, device, trainable=False)
    # foreach: one multi-tensor update instead of one per parameter (the default on CPU), the same numbers
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True)

    run = Run(args, args.env, student, tokenizer, optimizer, generators, device, f"teacher {args.teacher}, env {args.env}", plan)
    extra = run.extra  # {"best_success_rate": the best held-out success so far}, set at step 0

    # Environments are made once and reset for every episode (a TextWorld-Express env is a JVM process).
    # Their own randomness comes from (--seed, split, episode seed): the same episode on any rank.
    pool = [envs.make(args.env, seed=args.seed, split="train", **user) for _ in range(args.num_envs)]
    eval_pool = [envs.make(args.env, seed=args.seed, split="heldout", **user)
                 for _ in range(eval_batch(args, world, args.num_envs))]
    max_turns = args.max_turns or pool[0].max_turns
    groups_per_rank = args.num_envs // args.group_size

    def evaluate_alone(model):
        """The model alone on the held-out seeds (its own samplers, by task: the shared one is not used)."""
        return run.evaluate(model, lambda p, s, _: rollout(model, tokenizer, p, s, args, [args.seed + 12345 + (s[0] if s else 0)],
                                                           args.eval_temperature, max_turns), eval_pool)

    # The teacher alone, once: the level the student should pass.
    if run.start == 0:
        teacher_eval, _ = evaluate_alone(teacher)
        student_eval, _ = evaluate_alone(student)
        extra["best_success_rate"] = student_eval["success_rate"]
        run.log(0, {"teacher": teacher_eval, "eval": {**student_eval, "best_success_rate": student_eval["success_rate"]}},
                f"teacher held-out success {teacher_eval['success_rate']:.2f}, "
                f"student before training {student_eval['success_rate']:.2f}")

    for iteration in range(run.start, args.total_iterations):
        t_iter = time.time()
        kappa, rho = kappa_rho(iteration, args)
        lr = lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ALGO LOGIC: group rollouts, the student alone; a group's G episodes play one task (one seed)
        t0 = time.time()
        tasks = [(iteration * world + rank) * groups_per_rank + k for k in range(groups_per_rank)]
        seeds = [task for task in tasks for _ in range(args.group_size)]
        with gathered(*run.gather(student)):  # whole, or by layer (--rollout-gather)
            episodes = rollout(student, tokenizer, pool, seeds, args, [args.seed * 1_000_003 + task for task in tasks],
                               args.temperature, max_turns)
        for j, ep in enumerate(episodes):
            ep.slot = rank * args.num_envs + j  # its place in the batch over every rank: picks its mini-batch
        episodes = run.drop_failed(episodes, iteration, group=args.group_size)  # whole groups: GRPO needs them
        t_rollout = time.time() - t0

        # Scoring: the teacher's and the rollout-time student's log-probs of every agent token (the teacher's full
        # distributions or top-k too for --opd-loss full / topk), then the advantages: GRPO per group, T-DUR weights,
        # the hybrid.
        t0 = time.time()
        batch = collate(episodes, tokenizer.pad_token_id)
        scores = score_teacher(teacher, batch, batch["loss_mask"], args.micro_batch_tokens, full=args.opd_loss == "full",
                               topk=args.topk if args.opd_loss == "topk" else 0)
        old_logp = score_teacher(student, batch, batch["loss_mask"], args.micro_batch_tokens).logp
        scored = batch["loss_mask"].clone()
        scored[:, 0] = False
        rewards = torch.tensor([float(ep.success) if args.reward == "success" else ep.score for ep in episodes])
        adv_grpo = grpo_advantages(rewards, args.group_size)
        if args.weighting == "none":
            weights = scored.float()
        else:
            weights = tdur_weights(old_logp, scores.logp, batch["turn_id"], scored, args.weighting, args.renormalize_weights)
        opd_sampled = args.opd_loss == "sampled"
        advantages = hybrid_advantages(old_logp, scores.logp, weights, adv_grpo, scored, kappa, rho, opd_sampled)
        kl_coef = torch.zeros_like(weights) if opd_sampled else kappa * weights
        terms = {"opd": (hybrid_advantages(old_logp, scores.logp, weights, adv_grpo, scored, kappa, 0.0, opd_sampled), kl_coef),
                 "grpo": (hybrid_advantages(old_logp, scores.logp, weights, adv_grpo, scored, 0.0, rho), torch.zeros_like(kl_coef))}
        group_std = rewards.view(-1, args.group_size).std(1)
        t_teacher = time.time() - t0

        # ALGO LOGIC: the training step
        t0 = time.time()
        # whole groups per mini-batch, the groups shuffled anew for each epoch (drawn from --seed and the iteration)
        rng = random.Random(f"{args.seed}/mb/{iteration}")
        slot_groups = [g // args.group_size for g in range(args.num_envs * world)]
        plans = [minibatch_plan(slot_groups, args.num_minibatches, rng, together=True) for _ in range(args.update_epochs)]
        step = train_step(student, optimizer, episodes, batch, scores, old_logp, advantages, kl_coef, terms, plans, args,
                          world, device)
        t_train = time.time() - t0

        # ---- INFRASTRUCTURE: logging (sums over every rank's episodes and micro-batches), eval, checkpoint ----
        n_rows = scored.any(1).sum().item()
        totals = all_sum({**episode_sums(episodes), **{k: v for k, v in step.items() if k not in ("grad_norm", "skipped_steps", "no_signal_steps", "term_norms")},
                          "groups": len(episodes) // args.group_size, "flat_groups": int((group_std < 1e-8).sum()), "group_std": group_std.sum().item(),
                          "reward": rewards.sum().item(), "weight_sum": (weights * scored).sum().item(),
                          "scored": scored.sum().item(), "trajectories": n_rows,
                          "reverse_kl": ((old_logp - scores.logp) * scored).sum().item()})  # sampled estimate, rollout time
        completed = iteration + 1
        n_tok, n_traj = max(totals["tokens"], 1), max(totals["trajectories"], 1) * args.update_epochs
        losses = {"loss": totals["loss"] / n_traj, "reverse_kl": totals["reverse_kl"] / max(totals["scored"], 1),
                  "clipfrac": totals["clipped"] / n_tok, "approx_kl": totals["approx_kl"] / n_tok,
                  "no_signal_steps": step["no_signal_steps"],
                  **{f"grad_norm_{name}": v for name, v in step["term_norms"].items()}}  # on the first step, unclipped
        run.log_iteration(completed, totals, step, lr, t_iter, (t_rollout, t_teacher, t_train), losses, {"kappa": kappa, "rho": rho},
                          {"reward": totals["reward"] / totals["episodes"], "reward_std_in_group": totals["group_std"] / totals["groups"],
                           "flat_group_fraction": totals["flat_groups"] / totals["groups"],
                           "turn_weight_mean": totals["weight_sum"] / max(totals["scored"], 1)},
                          f"kappa {kappa:.2f}  rho {rho:.2f}  flat groups {totals['flat_groups']:.0f}/{totals['groups']:.0f}  "
                          f"rkl {losses['reverse_kl']:.3f}")
        if run.due(completed, args.eval_interval):
            ev, eval_eps = evaluate_alone(student)
            extra["best_success_rate"] = max(extra["best_success_rate"], ev["success_rate"])
            run.log(completed, {"eval": {**ev, "best_success_rate": extra["best_success_rate"]}},
                    f"eval after {completed} iterations: held-out success {ev['success_rate']:.2f} (best "
                    f"{extra['best_success_rate']:.2f}), score {ev['score']:.2f}, turns {ev['episode_turns']:.1f}",
                    [("eval/trajectory", ep) for ep in eval_eps[:2]])
        run.save(completed, extra)

    run.finish(pool + eval_pool)  # the student in Hugging Face format, the envs closed
