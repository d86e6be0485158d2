"""Multi-teacher on-policy distillation (MOPD) for multi-turn LLM agents.

Paper: MOPD, arXiv 2606.30406 (one student distilled from several domain teachers, each trained from the
student's own starting point).

Several domains, each an environment with its own frozen teacher. Each iteration draws the episodes over the
domains in fixed ratios (`--domain-weights`), one rollout per task; the student plays whole episodes alone
(temperature 1); every trajectory is scored by its own domain's teacher only (routing, never an average of
teachers). Losses, per trained token y_t of a trajectory y, reduced as the paper: the mean over each
trajectory's tokens, then the mean over trajectories.
- `--loss pg` (the paper's main form): A_t = clip(stopgrad(log pi_t(y_t) - log pi_s(y_t)), -c, c), c = 5,
  loss = -mean_y (1/|y|) sum_t A_t log pi_s(y_t).
- `--loss topk` (the paper's alternative, k = 64): over the teacher's top-k tokens v at each position,
  sum_v [p_s(v) log(p_s(v)/p_t(v)) - p_s(v) + p_t(v)], not renormalised (the last two terms correct for the
  truncation; with k = the vocabulary it is the exact reverse KL). By default (not in the paper; the paper's
  form is `--no-topk-tail`) plus the same term for the bucket of all tokens outside the top-k: without it
  nothing holds the student's mass there down (the tiny student's collapsed into it, docs/mopd.md).
- `--loss full`: the exact reverse KL over the vocabulary, for local teachers (cheap with the tiny vocabulary).
The headline metric: per domain, the normalised score g_d = (s_d - s_d(initial student)) / (s_d(teacher) -
s_d(initial student)) on held-out seeds (0 = the initial student, 1 = the domain's teacher), and its mean
and minimum over domains. Teachers and initial student are evaluated once, at the start.

Mini-batches: the rollout batch is split into --num-minibatches optimizer steps, each holding every domain in
the batch's ratio (each domain's episodes shuffled and dealt in turn, drawn from --seed and the iteration, the
same on any number of ranks); `--loss pg` weighs the later ones, drawn by an older student, by the importance
ratio (`--ratio-max` truncates it, `--ratio-clip` = PPO's clipped ratio, `--ratio-max 0` = none; the paper's
is unknown). Open choices, as flags: `--domain-weights` (the paper's 0.35 : 0.35 : 0.30 were its own domains);
`--adv-clip`; `--topk`; `--route` scores every domain with one domain's teacher (the routing ablation);
`--real-losses` runs a tiny student with the real-model loss. Arguments left at None are "auto": the TINY or
REAL table below the Args (a real student needs --domains); the memory plan (common/memory.py, `--plan`) fills
the memory choices. The tiny default trains with `--loss full`; a real model with `--loss topk` (k = 64, with
the tail bucket; 768 bytes per token of a rank's batch): from the tiny default's able student it taught about as
the exact loss did, while `--loss pg` collapsed at the tiny rate and stalled at a fifth of it (docs/mopd.md).

    python mopd.py                                          # embedded tiny default: 3 games, 3 same-origin experts
    python mopd.py --route simonsays                        # ablation: simonsays' teacher scores every domain
    torchrun --nproc_per_node 8 mopd.py --student qwen3-1.7b \\
        --domains alfworld@PATH_A scienceworld:boil@PATH_B --max-turns 30   # --plan: its memory plan, no weights
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
from common.episode import (STUDENT, Episode, TurnCache, collate, end_of_turn_id, episode_means, episode_sums,
                            generate_replies, pack_by_tokens, start_episodes, step_envs)
from common.memory import plan_run
from common.models import ModelError, fill_defaults, fill_from_rank0, load_student_and_teachers, student_name, teacher_name
from common.runs import Run, check_rollout_args, eval_batch, gathered, minibatch_plan, seed_everything
from common.teacher import Teachers, score_teacher, token_logprobs
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

    # Models and environments
    student: str = "tiny"
    """the student: an alias (qwen3-0.6b, qwen3-1.7b, ...), a hub id, a local path, or `tiny` (weak but able),
    `tiny-novice` or `tiny-small` (tiny students that share a tokenizer with the domains' tiny experts)"""
    domains: tuple[str, ...] | None = None
    """the domains, each `ENV_SPEC@TEACHER` (e.g. `alfworld@qwen3-8b`); a bare ENV_SPEC takes its tiny expert (tiny
    students only); logged by the spec's game (`coin`). Auto: three games, each with its same-origin tiny teacher
    (trained from the tiny student, as the paper's from its student); a real student needs it"""
    domain_weights: tuple[float, ...] | None = None
    """share of each domain in every batch, in --domains order (normalised; default: uniform)"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template (the tiny models do not think)"""
    user_model: str | None = None
    """the customer of conversational domains (tau2:*), played by this model (any name the student takes; a whole
    copy per rank, greedy); unset = the env's scripted stand-in, which answers from the task's scenario"""

    # Rollouts
    num_envs: int = 16
    """episodes played by each rank per iteration (the global batch is num_envs x world size)"""
    max_turns: int | None = None
    """turns per episode before it is cut; 0 = the environment's default (auto: 12 tiny, 0 real)"""
    max_new_tokens: int | None = None
    """tokens a turn may generate (auto: 24 tiny, 512 real; more with --thinking)"""
    max_seq_len: int | None = None
    """tokens an episode may hold; a turn that would not fit ends it as truncated (auto: 2048 tiny, 16384 real)"""
    temperature: float = 1.0
    """sampling temperature of training rollouts; other than 1 only with --loss full or topk"""
    cache_turns: bool = True
    """keep each episode's key/value cache between turns, so a turn runs only its new tokens (faster; the memory
    grows with episodes x tokens); on unless the memory plan needs it off; --no-cache-turns: always off"""
    rollout_chunk: int = 0
    """episodes decoded at once (bounds the batched caches and logits); 0 = auto: all, or fewer if the plan needs"""
    rollout_gather: Literal["auto", "whole", "student", "layers"] = "auto"
    """rollouts gather the sharded student whole (`whole`, `student`: fastest) or by layer (`layers`, least
    memory); auto: the fastest that the memory plan fits"""

    # Optimization
    total_iterations: int = 100
    """training iterations: one batch of rollouts and --num-minibatches optimizer steps each"""
    learning_rate: float | None = None
    """AdamW learning rate (auto: 5e-4 tiny, 2e-5 real)"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning rate after warmup: constant, or decaying to 0 at the end"""
    warmup_iterations: int = 0
    """linear learning rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_minibatches: int | None = None
    """optimizer steps per iteration: the batch split into this many mini-batches, each holding every domain in the
    batch's ratio (at most the smallest domain's count; auto: 5 of the tiny default's 16, 1 real)"""
    micro_batch_tokens: int | None = None
    """token budget of a forward/backward micro-batch, accumulated within a mini-batch (auto: 4096 tiny, 16384 real)"""
    activation_checkpointing: bool = False
    """recompute decoder layers in backward to save memory: always; without it, where the memory plan needs it"""
    plan: bool = False
    """print the memory plan (per-rank bytes for 1 to 8 ranks, from the models' configs) and exit: no weights loaded"""
    device_memory: str = "auto"
    """the memory a rank plans for: auto (this GPU's; on a CPU the available over the host's ranks, or 80 GiB GPUs
    for --plan of a real student), or gpu:<GiB> / cpu:<GiB>"""

    # Evaluation and checkpoints
    eval_interval: int = 20
    """evaluate the student every N iterations"""
    eval_episodes: int = 64
    """held-out episodes per domain and evaluation (split over ranks)"""
    eval_temperature: float = 0.0
    """sampling temperature of evaluation (0 = greedy)"""
    eval_batch: int = 0
    """held-out episodes of each domain a rank plays at once, every domain in the same batch (0 = auto: all of its share
    of --eval-episodes with a tiny student, --num-envs over the number of domains with a real one)"""
    save_interval: int = 20
    """write a resumable checkpoint every N iterations (and at the end)"""
    resume: str | None = None
    """a run folder (or its checkpoint.pt) to continue from"""
    max_env_failures: float = 0.25
    """an episode whose env fails is dropped; more than this fraction of an iteration's stops the run (checkpointed)"""

    # Algorithm specific arguments
    loss: Literal["pg", "topk", "full"] | None = None
    """`pg`: the paper's clipped sampled-token policy gradient; `topk`: reverse KL over the teacher's top-k
    tokens with the truncation terms; `full`: the exact reverse KL over the vocabulary (auto: full tiny, topk real)"""
    adv_clip: float = 5.0
    """pg: clip the per-token advantage log pi_t - log pi_s to +-adv_clip (0 = no clip)"""
    topk: int = 64
    """topk: the teacher's k most likely tokens at each position"""
    topk_tail: bool = True
    """topk: add the same term for the mass outside the teacher's top-k (one bucket), which holds the student's mass
    there down as the exact KL does; `--no-topk-tail`: the paper's form"""
    route: str = "domain"
    """`domain`: each trajectory is scored by its own domain's teacher (MOPD); a domain's name: that domain's
    teacher scores every domain (the routing ablation; normalised scores still use each domain's own teacher)"""
    ratio_max: float = math.inf
    """pg: weigh each token's term by the importance ratio pi_s / pi_s(rollout), so that later mini-batches stay
    on-policy in expectation; truncated at ratio_max (inf: the plain ratio); 0 = no ratio, the plain estimator"""
    ratio_clip: float = 0.0
    """pg: PPO's clipped surrogate instead, ratio in 1 +- ratio_clip, the rollout student's advantage (0 = off)"""
    real_losses: bool = False
    """a tiny student trains with the real-model loss (REAL_LOSSES), all else the tiny default's: seen on a CPU"""


# "Auto" arguments (None above): the embedded tiny default's values, and a real model's. REAL's sources
# (docs/real_models.md): the rate is NeMo-RL's for on-policy distillation of full models (2e-5; 4e-5 did worse);
# one optimizer step per batch as tinker-cookbook's multi-teacher on-policy distillation.
TINY = dict(domains=("twx:simonsays@tiny-expert:simonsays-same-origin", "twx:peckingorder@tiny-expert:peckingorder-same-origin",
                     "twx:coin:numLocations=4,includeDoors=0@tiny-expert:coin-same-origin"), max_turns=12,
            max_new_tokens=24, max_seq_len=2048, learning_rate=5e-4, micro_batch_tokens=4096, num_minibatches=5, loss="full")
REAL = dict(max_turns=0, max_new_tokens=512, max_seq_len=16384, learning_rate=2e-5, micro_batch_tokens=16384,
            num_minibatches=1, loss="topk")
REAL_LOSSES = ("loss",)  # what --real-losses takes from REAL


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: domains, their teachers and the batch's domain mix
# ----------------------------------------------------------------------------------------------------
def parse_domains(specs, student: str) -> list[tuple[str, str, str]]:
    """`ENV_SPEC[@TEACHER]` -> (name, env spec, teacher); a bare spec takes its tiny expert (tiny students).
    The name is the spec's game (`twx:coin:numLocations=4` -> `coin`), or the whole spec where two share it."""
    parsed = []
    for item in specs:
        spec, _, teacher = item.partition("@")
        try:
            teacher = teacher_name(teacher or None, student, spec, real_default="")
        except ModelError:
            teacher = ""
        if not teacher:
            raise SystemExit(f"error: domain {spec!r} has no teacher: pass it as {spec}@TEACHER")
        parsed.append((spec, teacher))
    games = [(s.split(":") + [""])[1] or s for s, _ in parsed]
    return [(g if games.count(g) == 1 else s, s, t) for g, (s, t) in zip(games, parsed)]


def routing(domains: list[tuple[str, str, str]], route: str) -> dict[str, str]:
    """Which teacher scores each domain's trajectories: its own (`domain`, MOPD), or --route's for all."""
    own = {name: teacher for name, _, teacher in domains}
    if route != "domain" and route not in own:
        raise SystemExit(f"error: --route must be `domain` or a domain's name ({', '.join(own)}), got {route!r}")
    return {name: own[name if route == "domain" else route] for name in own}


def domain_draws(iteration: int, n: int, weights: list[float], seed: int) -> list[int]:
    """The domain of each of the iteration's n episodes (the global batch): fixed ratios, as the paper's batches
    (counts by largest remainder, ties drawn), in a shuffled order. The same list on every rank."""
    rng = random.Random(f"{seed}/domains/{iteration}")
    exact = [w * n / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda d: (counts[d] - exact[d], rng.random()))
    for d in by_remainder[: n - sum(counts)]:
        counts[d] += 1
    draws = [d for d, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(draws)
    return draws


def lr_at(iteration: int, args: Args) -> float:
    if iteration < args.warmup_iterations:
        return args.learning_rate * (iteration + 1) / args.warmup_iterations
    p = (iteration - args.warmup_iterations) / max(1, args.total_iterations - args.warmup_iterations)
    return args.learning_rate * {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p}[args.lr_schedule]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: student rollouts: whole episodes of every domain in one batch, one token sequence per episode.
# ----------------------------------------------------------------------------------------------------
def truncate_if_full(ep: Episode, args: Args) -> bool:
    """End an episode whose next turn could pass --max-seq-len (logged as truncated, never a crash)."""
    if len(ep) + args.max_new_tokens > args.max_seq_len:
        ep.truncated = True
        return True
    return False


def rollout(student, tokenizer, pool, domains, seeds, args: Args, sampler: torch.Generator, temperature: float,
            max_turns: int) -> list[Episode]:
    eot = end_of_turn_id(tokenizer)
    # the envs reset and step at once where they allow it; an env that fails ends its episode (`error`, named by domain)
    episodes = start_episodes(tokenizer, pool, seeds, args.thinking, tasks=domains)
    active = [i for i, ep in enumerate(episodes) if not ep.done and not truncate_if_full(ep, args)]
    caches = [TurnCache() for _ in episodes]
    for _ in range(max_turns):
        if all_max(len(active)) == 0:  # FSDP: every rank runs the same generate calls, so all stop together
            break
        outs = generate_replies(student, tokenizer, [episodes[i].ids for i in active], args.max_new_tokens,
                                temperature, generator=sampler,
                                caches=[caches[i] for i in active] if args.cache_turns else None,
                                chunk=args.rollout_chunk)
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
# ALGO LOGIC: the losses. Per-token terms first (pure functions of log-probs, unit-tested against each
# other), then the loss of one micro-batch: the sum over its trajectories of each one's token mean (the
# training step divides by the mini-batch's number of trajectories) and the statistics to log.
# ----------------------------------------------------------------------------------------------------
def sampled_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, adv_clip: float = 0.0) -> torch.Tensor:
    """The pg form: A_t = clip(stopgrad(log pi_t(y_t) - log pi_s(y_t)), -c, c), loss_t = -A_t log pi_s(y_t).
    Unclipped, its expected gradient under y_t ~ pi_s is the gradient of KL(pi_s || pi_t) at that position."""
    advantage = (logp_t - logp_s).detach()
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    return -advantage * logp_s


def clipped_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_clip: float,
                               adv_clip: float = 0.0) -> torch.Tensor:
    """The pg form for a batch that the student sampled a few optimizer steps ago (PPO's surrogate):
    A_t = log pi_t(y_t) - log pi_old(y_t) from the rollout-time student, r_t = pi_s(y_t) / pi_old(y_t),
    loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t). At r_t = 1 its gradient is the plain form's."""
    advantage = logp_t - logp_old
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp_s - logp_old)
    return -torch.min(ratio * advantage, ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * advantage)


def importance_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_max: float,
                                 adv_clip: float = 0.0) -> torch.Tensor:
    """The pg form on tokens drawn by the rollout-time student pi_old, a few optimizer steps ago (importance
    sampling): the plain form's loss weighted by stopgrad(min(r_t, c)), r_t = pi_s(y_t) / pi_old(y_t).
    Unclipped and below the cap its expected gradient under y_t ~ pi_old is grad KL(pi_s || pi_t) at the current
    student; at r_t = 1 it is the plain form's."""
    weight = torch.exp(logp_s - logp_old).detach().clamp(max=ratio_max)
    return weight * sampled_reverse_kl(logp_s, logp_t, adv_clip)


def topk_reverse_kl(at_s: torch.Tensor, topk_t: torch.Tensor, tail: bool = False) -> torch.Tensor:
    """Over the teacher's top-k tokens v (log-probs [..., k] of student and teacher at those tokens):
    sum_v [p_s(v) log(p_s(v) / p_t(v)) - p_s(v) + p_t(v)], not renormalised; each term is >= 0, and with
    k = the vocabulary the sum is KL(pi_s || pi_t). With `tail`, plus the same term for the tail R outside the
    top-k, with p(R) = 1 - sum_v p(v): the exact KL of the k + 1 buckets, a lower bound of KL(pi_s || pi_t)."""
    def with_tail(logp: torch.Tensor) -> torch.Tensor:  # log p(R) = log(1 - exp(logsumexp)), floored at 1e-6:
        # fp32 log-probs of a near one-hot teacher resolve its top-k mass no finer than that
        return torch.cat([logp, torch.log((-torch.expm1(logp.logsumexp(-1))).clamp(min=1e-6)).unsqueeze(-1)], -1)
    # ALGO LOGIC: without the tail bucket the gradient raises every token outside the teacher's top-k whenever
    # the student's top-k terms are above their teacher's (d/dz_j = -p_s(j) * sum_v p_s(v) log(p_s(v)/p_t(v))
    # for j outside); with a near one-hot teacher the student's mass drifts there (docs/mopd.md).
    if tail:
        at_s, topk_t = with_tail(at_s), with_tail(topk_t)
    p_s, p_t = at_s.exp(), topk_t.exp()
    return (p_s * (at_s - topk_t) - p_s + p_t).sum(-1)


def full_reverse_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), from full log-prob rows [N, V]."""
    return (full_s.exp() * (full_s - full_t)).sum(-1)


def sequence_means(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean of `tokens` over its masked positions ([B]; 0 for a row without any)."""
    return (tokens * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def mopd_loss(student, mb: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """(sum over the micro-batch's trajectories of their token-mean loss, statistics). `mb` holds the batch
    tensors, the routed teacher's log-probs (`teacher_logp`), its top-k (`teacher_topk_logp`, `_ids`), or its
    full rows at the trained positions (`teacher_full`), and the rollout student's (`old_logp`)."""
    mask = mb["loss_mask"]
    s = token_logprobs(student, mb["input_ids"], mb["attention_mask"], mask, full=args.loss == "full",
                       at=mb.get("teacher_topk_ids"))
    logp_s, logp_t = s.logp, mb["teacher_logp"]
    if args.loss == "pg" and "old_logp" in mb and args.ratio_clip > 0:
        tokens = clipped_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_clip, args.adv_clip)
    elif args.loss == "pg" and "old_logp" in mb and args.ratio_max > 0:
        tokens = importance_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_max, args.adv_clip)
    elif args.loss == "pg":
        tokens = sampled_reverse_kl(logp_s, logp_t, args.adv_clip)
    elif args.loss == "topk":
        tokens = topk_reverse_kl(s.at_logp, mb["teacher_topk_logp"], args.topk_tail)
    else:  # the exact reverse KL from the full rows at the trained positions (rows in mask order)
        tokens = torch.zeros_like(logp_s).index_put(mask.nonzero(as_tuple=True), full_reverse_kl(s.full, mb["teacher_full"]))
    per_sequence = sequence_means(tokens, mask)
    with torch.no_grad():
        rkl = sequence_means(logp_s - logp_t, mask)  # sampled-token estimate, per trajectory
        stats = {"reverse_kl": rkl.sum().item(), "loss": per_sequence.sum().item(),
                 "sequences": mask.any(-1).sum().item(), "tokens": mask.sum().item(),
                 "adv_clipped": ((logp_t - logp_s).abs().gt(args.adv_clip) & mask).sum().item() if args.adv_clip else 0.0}
        for d in range(len(args.domains)):  # per domain (by index), to see what each teacher says
            rows = mb["domain"][:, 0] == d
            stats[f"{d}/reverse_kl"], stats[f"{d}/sequences"] = rkl[rows].sum().item(), mask[rows].any(-1).sum().item()
        if "old_logp" in mb:  # share of tokens whose ratio left the clip range (above the cap, truncated)
            ratio = (logp_s - mb["old_logp"]).exp()
            out = (ratio - 1).abs().gt(args.ratio_clip) if args.ratio_clip > 0 else ratio.gt(args.ratio_max)
            stats["clipped"] = (out & mask).sum().item()
    return per_sequence.sum(), stats


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


def train_step(student, optimizer, episodes: list[Episode], batch: dict, teacher_scores, old_logp, plan: list[int],
               args: Args, world: int, device) -> dict:
    """One iteration's updates: --num-minibatches optimizer steps (as verl's PPO mini-batches), the split `plan` (the
    same on every rank; every mini-batch holds every domain in the batch's ratio, as the paper's batches), each of
    micro-batches of at most --micro-batch-tokens. Returns the summed statistics and the mean gradient norm."""
    loss_mask = batch["loss_mask"]
    full_rows = None
    if teacher_scores.full is not None:  # map each trained position to its row of the teacher's full distributions
        full_rows = torch.full(loss_mask.shape, -1, dtype=torch.long)
        full_rows[loss_mask] = torch.arange(int(loss_mask.sum()))
    stats_sum, grad_norms, skipped = {}, [], 0
    for m in range(args.num_minibatches):
        rows = [i for i, ep in enumerate(episodes) if plan[ep.slot] == m]
        counts = all_sum({"sequences": int(loss_mask[rows].any(-1).sum())})
        order = sorted(rows, key=lambda r: len(episodes[r]))  # similar lengths together: less padding
        groups = pack_by_tokens([len(e) for e in episodes], args.micro_batch_tokens, order)
        n_max = all_max(len(groups))  # every rank runs as many forward/backward passes
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_max):
            student.set_requires_gradient_sync(j == n_max - 1)  # reduce gradients once, after the last
            idx = groups[j] if j < len(groups) else (groups or [[0]])[0][:1]  # a rank with fewer micro-batches repeats
            weight = 1.0 if j < len(groups) else 0.0               # one row with zero weight, to stay in step
            width = max(len(episodes[i]) for i in idx)  # right padding beyond the longest row is cut
            mb = {k: batch[k][idx, :width].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "domain")}
            mb["teacher_logp"] = teacher_scores.logp[idx, :width].to(device)
            if full_rows is not None:
                mb["teacher_full"] = teacher_scores.full[full_rows[idx, :width][loss_mask[idx, :width]]].to(device)
            if teacher_scores.topk_ids is not None:
                mb["teacher_topk_logp"] = teacher_scores.topk_logp[idx, :width].to(device)
                mb["teacher_topk_ids"] = teacher_scores.topk_ids[idx, :width].to(device)
            if old_logp is not None:
                mb["old_logp"] = old_logp[idx, :width].to(device)
            loss_sum, stats = mopd_loss(student, mb, args)
            # The mini-batch's loss is a mean over its trajectories on every rank; FSDP averages gradients
            # over ranks, hence the factor world.
            loss = loss_sum * weight * world / max(counts["sequences"], 1.0)
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


def normalised(score: float, initial: float, teacher: float) -> float:
    """g = (s - s_initial) / (s_teacher - s_initial): 0 = the initial student, 1 = the teacher (nan if the
    teacher does not beat the initial student: nothing to distill there)."""
    return (score - initial) / (teacher - initial) if teacher > initial else float("nan")


def check_args(args: Args) -> None:
    """One-line errors for bad input, before anything is loaded (the shared arguments in common/runs.py)."""
    check_rollout_args(args)
    if args.temperature != 1 and args.loss == "pg":
        raise SystemExit("error: --temperature must be 1 with --loss pg (its log-probs are of the untempered "
                         "models); sample at another temperature only with --loss full or topk")
    specs = [d.partition("@")[0] for d in args.domains]
    if not specs or len(set(specs)) != len(specs):
        raise SystemExit(f"error: --domains needs distinct environments, got {' '.join(args.domains) or 'none'}: "
                         "give each env once")
    if args.domain_weights is not None and (len(args.domain_weights) != len(specs) or min(args.domain_weights) <= 0):
        raise SystemExit(f"error: --domain-weights needs {len(specs)} positive numbers (one per domain, in --domains "
                         f"order), got {' '.join(map(str, args.domain_weights)) or 'none'}")
    if min(args.adv_clip, args.ratio_clip, args.ratio_max) < 0 or args.topk < 1 or (args.ratio_clip and args.loss != "pg"):
        raise SystemExit("error: --adv-clip, --ratio-clip and --ratio-max must be 0 (off) or positive (--ratio-clip with --loss pg "
                         "only), --topk at least 1")


if __name__ == "__main__":
    # ---- INFRASTRUCTURE: arguments, process group, seeds, models, run folder (common/ holds the details) ----
    args = tyro.cli(Args)
    fill_defaults(args, TINY, REAL, REAL_LOSSES, required=("domains",))
    check_args(args)
    rank, world, device = setup()
    try:
        args.student = student_name(args.student, args.domains[0].partition("@")[0])
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    domains = parse_domains(args.domains, args.student)  # [(name, env spec, teacher)]
    names, own_teacher = [name for name, _, _ in domains], routing(domains, "domain")
    route = routing(domains, args.route)  # the ablation: every trajectory to --route's teacher
    distinct = list(dict.fromkeys(t for _, _, t in domains))  # each distinct teacher, loaded once
    # The memory plan, from the configs alone (--plan prints it and exits): fills the auto memory choices.
    plan = plan_run(args, world, device, args.student, distinct, [[STUDENT]] + [[t] for t in distinct],
                    topk=args.topk if args.loss == "topk" else 0, full=args.loss == "full")
    try:
        for name, spec, _ in domains:
            envs.make(spec, seed=args.seed).close()  # a bad spec fails here, in one line
    except (envs.EnvError, ValueError) as e:
        raise SystemExit(f"error: domain {name!r}: {e}") from None
    try:  # {} or {"user": the customer model}, one copy for the tau2 domains (the others talk to no customer)
        user = env_user(args.user_model, next((s for _, s, _ in domains if s.startswith("tau2:")), domains[0][1]), device)
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    weights = list(args.domain_weights or [1.0] * len(domains))
    seed_everything(args.seed + rank)  # each rank its own stream; the run is reproducible from --seed
    sampler = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling of tokens
    generators = {"sampler": sampler}

    # The student trains; the teachers are frozen; all sharded with FSDP2 (each rank's shards from rank 0's weights).
    student, tokenizer, models = load_student_and_teachers(args.student, distinct, device, args.max_seq_len)
    student = shard(student, device, trainable=True, activation_checkpointing=args.activation_checkpointing)
    teachers = Teachers({n: shard(m, device, trainable=False) for n, m in zip(distinct, models)}, args.micro_batch_tokens)
    # foreach: one multi-tensor update instead of one per parameter (the default on CPU), the same numbers
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True)

    run = Run(args, "+".join(names), student, tokenizer, optimizer, generators, device,
              "domains " + ", ".join(f"{n} ({s}) scored by {route[n]}" for n, s, _ in domains), plan)
    baseline = run.extra.setdefault("baseline", {})  # per domain: held-out success of the initial student and its teacher

    # Environments are made on first use and reset for every episode (a TextWorld-Express env is a JVM
    # process): one pool per domain and split, as large as the most episodes of it played at once.
    pools = {}

    def pool(domain: str, split: str, n: int) -> list:
        envs_ = pools.setdefault((domain, split), [])
        spec = next(s for d, s, _ in domains if d == domain)
        envs_ += [envs.make(spec, seed=args.seed, split=split, **(user if spec.startswith("tau2:") else {}))
                  for _ in range(n - len(envs_))]
        return envs_[:n]

    max_turns = args.max_turns or max(pool(d, "train", 1)[0].max_turns for d in names)
    eval_size = eval_batch(args, world, math.ceil(args.num_envs / len(names)))  # per domain; a real one: a batch in all

    def evaluate_alone(model, domains: list[str]) -> dict:
        """The model alone on the domains' held-out seeds, all domains in one batch: {domain: (rates, episodes)}."""
        return run.evaluate_tasks(model, lambda p, s, d, sampler: rollout(model, tokenizer, p, d, s, args, sampler,
                                                                          args.eval_temperature, max_turns),
                                  {d: pool(d, "heldout", eval_size) for d in domains})

    def evaluate_domains(step: int, results: dict | None = None) -> None:
        results = results or evaluate_alone(student, names)
        g = {d: normalised(ev["success_rate"], *baseline[d]) for d, (ev, _) in results.items()}
        known = [v for v in g.values() if math.isfinite(v)] or [float("nan")]
        run.log(step, {**{f"eval/{d}": {**ev, "normalised": g[d]} for d, (ev, _) in results.items()},
                       "eval": {"success_rate": sum(ev["success_rate"] for ev, _ in results.values()) / len(results),
                                "normalised_mean": sum(known) / len(known), "normalised_min": min(known)}},
                f"eval after {step} iterations: " + ", ".join(f"{d} success {ev['success_rate']:.2f} (g {g[d]:.2f})"
                                                              for d, (ev, _) in results.items())
                + f"; normalised mean {sum(known) / len(known):.2f}, min {min(known):.2f}",
                [(f"eval/{d}/trajectory", ep) for d, (_, eps) in results.items() for ep in eps[:1]])

    # Each domain's own teacher alone and the initial student, once: the two ends of the normalised score.
    if run.start == 0:
        initial = evaluate_alone(student, names)
        for d in names:
            (teacher_eval, _), = evaluate_alone(teachers[own_teacher[d]], [d]).values()
            student_eval = initial[d][0]
            baseline[d] = (student_eval["success_rate"], teacher_eval["success_rate"])
            run.log(0, {f"teacher/{d}": teacher_eval}, f"{d}: teacher held-out success {teacher_eval['success_rate']:.2f}, "
                    f"student before training {student_eval['success_rate']:.2f}")
        evaluate_domains(0, initial)

    for iteration in range(run.start, args.total_iterations):
        t_iter = time.time()
        lr = lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ALGO LOGIC: student rollouts over the domains in fixed ratios, one per task
        t0 = time.time()
        draws = domain_draws(iteration, args.num_envs * world, weights, args.seed)[rank * args.num_envs:(rank + 1) * args.num_envs]
        mine = [names[d] for d in draws]
        seeds = [(iteration * world + rank) * args.num_envs + j for j in range(args.num_envs)]
        play = [pool(d, "train", mine.count(d))[mine[:j].count(d)] for j, d in enumerate(mine)]
        with gathered(*run.gather(student)):  # whole, or by layer (--rollout-gather)
            episodes = rollout(student, tokenizer, play, mine, seeds, args, sampler, args.temperature, max_turns)
        for j, ep in enumerate(episodes):
            ep.slot = rank * args.num_envs + j  # its place in the batch over every rank: picks its mini-batch
        episodes = run.drop_failed(episodes, iteration)  # those whose env failed; a signal or too many stop the run
        draws = [names.index(ep.task) for ep in episodes]
        t_rollout = time.time() - t0

        # Teacher scoring, routed: each trajectory by its domain's teacher, log pi_t of every agent token, plus
        # the top-k (topk) or the full rows (full). With --ratio-clip the student's rollout-time log-probs too.
        t0 = time.time()
        batch = collate(episodes, tokenizer.pad_token_id)
        batch["domain"] = torch.tensor(draws)[:, None].expand_as(batch["input_ids"])
        scores = teachers.score(batch, batch["loss_mask"], [route[ep.task] for ep in episodes],
                                topk=args.topk if args.loss == "topk" else 0, full=args.loss == "full")
        old_logp = None
        if args.loss == "pg" and (args.ratio_clip > 0 or args.ratio_max > 0):
            old_logp = score_teacher(student, batch, batch["loss_mask"], args.micro_batch_tokens).logp
        t_teacher = time.time() - t0

        t0 = time.time()
        # ALGO LOGIC: the training step, on mini-batches that hold every domain in the batch's ratio (train_step)
        plan = minibatch_plan(domain_draws(iteration, args.num_envs * world, weights, args.seed), args.num_minibatches,
                              random.Random(f"{args.seed}/mb/{iteration}"))
        step = train_step(student, optimizer, episodes, batch, scores, old_logp, plan, args, world, device)
        t_train = time.time() - t0

        # ---- INFRASTRUCTURE: logging (sums over every rank's episodes and micro-batches), eval, checkpoint ----
        per_domain = {f"{d}/{k}": v for d in names for k, v in episode_sums([e for e in episodes if e.task == d]).items()}
        totals = all_sum({**episode_sums(episodes), **per_domain,
                          **{k: v for k, v in step.items() if k not in ("grad_norm", "skipped_steps")}})
        completed = iteration + 1
        n_seq = max(totals["sequences"], 1)
        losses = {"reverse_kl": totals["reverse_kl"] / n_seq, "loss": totals["loss"] / n_seq,
                  "adv_clipfrac": totals["adv_clipped"] / max(totals["tokens"], 1),
                  **{f"{d}/reverse_kl": totals[f"{i}/reverse_kl"] / max(totals[f"{i}/sequences"], 1) for i, d in enumerate(names)},
                  **({"clipfrac": totals["clipped"] / max(totals["tokens"], 1)} if "clipped" in totals else {})}
        by_domain = {f"{d}/{k}": v for d in names for k, v in
                     episode_means({k[len(d) + 1:]: v for k, v in totals.items() if k.startswith(d + "/")}).items()}
        run.log_iteration(completed, totals, step, lr, t_iter, (t_rollout, t_teacher, t_train), losses, charts=by_domain,
                          words=f"rkl {losses['reverse_kl']:.3f}")
        if run.due(completed, args.eval_interval):
            evaluate_domains(completed)
        run.save(completed, extra={"baseline": baseline})

    run.finish([e for p in pools.values() for e in p])  # the student in Hugging Face format, the envs closed
