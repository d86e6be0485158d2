"""Two-phase distillation: many task experts into one multi-task agent, off-policy first, then on-policy.

Paper: arXiv 2606.30044 (https://arxiv.org/abs/2606.30044): two-phase distillation of per-task RL experts.

One expert (teacher) per task, one student for all tasks. Off-policy distillation alone (forward KL on the
experts' trajectories) is mode-covering: the pooled data of many tasks holds more behaviour than a small
student can, and it averages. On-policy distillation alone (reverse KL on the student's own rollouts) is
mode-seeking but needs a student that already reaches the states the experts know. So:
- Phase 1, off-policy: each expert plays --expert-episodes training seeds of its own task (only the solved
  ones kept with --success-only); the student trains on the experts' agent tokens, tasks balanced in every
  batch: cross-entropy -log pi_s(y_t) (forward KL with only the sampled tokens known; the paper's SFT), or
  the exact forward KL against the expert's whole distribution (`--teacher-loss full`).
- Phase 2, on-policy: the student plays whole episodes of every task; each episode is scored by its own
  task's expert only (common/teacher.Teachers routes the rows); sampled-token reverse KL,
  A_t = stopgrad(log pi_T(y_t) - log pi_s(y_t)), loss_t = -A_t log pi_s(y_t) (the paper's objective), or the
  exact reverse KL over the vocabulary (`--student-loss full`). No environment reward.
- `--phase2-iterations 0` is off-policy distillation alone, `--phase1-iterations 0` on-policy alone: the two
  baselines are this script; `--phase2-data experts` is off-policy alone with phase 2's learning rate after
  the switch (the control of the rate drop).

Open choices, as flags: the data size (--expert-episodes per task), filtering by success (--success-only), the
switch (after --phase1-iterations; the paper gives no criterion), the experts' sampling temperature
(--expert-temperature), phase 2's learning rate (--phase2-learning-rate) and --adv-clip. One optimizer and one
learning rate schedule (warmup, decay) span both phases. Losses: a real model trains phase 1 with `ce` and phase 2
with `--student-loss topk`, the reverse KL over the expert's top 64 tokens plus one bucket for the rest (the paper's
sampled form: `--student-loss sampled`); the tiny default with the exact losses (`full`); `--real-losses` gives a
tiny student the real-model ones. Each of the --num-minibatches optimizer steps holds every task in the batch's
ratio (a draw from --seed and the iteration, the same on any number of ranks); phase 2's sampled form weighs the
later ones by the importance ratio (--ratio-max, --ratio-clip). Arguments left at None are "auto": the tiny
default's values with a tiny student, the real-model values otherwise (TINY and REAL below the Args); the memory
choices (--activation-checkpointing, --cache-turns, --rollout-gather, --rollout-chunk) follow a memory plan made
from the models' configs before any weight is loaded (--plan prints it).

    python two_phase.py                                    # embedded tiny default: three games, CPU, minutes
    python two_phase.py --phase2-iterations 0              # off-policy distillation alone (baseline)
    python two_phase.py --phase1-iterations 0              # on-policy distillation alone (baseline)
    torchrun --nproc_per_node 8 two_phase.py --student qwen3-8b --tasks tau2:airline tau2:retail \
        --teachers <airline-expert> <retail-expert> --user-model qwen3-8b
    python two_phase.py <the same arguments> --plan        # its memory plan for 1 to 8 ranks, no weights loaded
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.distributed as dist
import tyro

import envs
from common.dist import all_max, all_sum, setup
from common.episode import (STUDENT, TEACHER, Episode, TurnCache, collate, end_of_turn_id, episode_sums,
                            generate_replies, pack_by_tokens, start_episodes, step_envs)
from common.memory import plan_run
from common.models import ModelError, fill_defaults, fill_from_rank0, load_student_and_teachers, student_name, teacher_name
from common.runs import Run, check_rollout_args, eval_batch, evaluate, gathered, minibatch_plan, seed_everything
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
    `tiny-novice` or `tiny-small` (tiny students that share a tokenizer with the tasks' tiny experts)"""
    tasks: tuple[str, ...] | None = None
    """environment specs (see envs/), one expert each; the student learns all of them (auto: the tiny default's three
    games; a real student needs them)"""
    teachers: tuple[str, ...] | None = None
    """one frozen expert per task, in --tasks' order: the tasks' tiny experts for a tiny student; a real one needs them"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template (the tiny models do not think)"""
    user_model: str | None = None
    """the customer of conversational tasks (tau2:*), played by this model (any name the student takes; a whole
    copy per rank, greedy); unset = the env's scripted stand-in, which answers from the task's scenario"""

    # Rollouts
    num_envs: int = 12
    """episodes of each rank per iteration, over the tasks in turn (the global batch is num_envs x world size)"""
    max_turns: int | None = None
    """turns per episode before it is cut; 0 = the environment's default (auto: 12 tiny, 0 real)"""
    max_new_tokens: int | None = None
    """tokens a turn may generate (auto: 24 tiny, 512 real; more with --thinking)"""
    max_seq_len: int | None = None
    """tokens an episode may hold; a turn that would not fit ends it as truncated (auto: 2048 tiny, 16384 real)"""
    temperature: float = 1.0
    """sampling temperature of the student's training rollouts; other than 1 only with --student-loss full or topk"""
    cache_turns: bool = True
    """keep each episode's key/value cache between turns, so a turn runs only its new tokens (faster; the memory
    grows with episodes x tokens); on unless the memory plan needs it off; --no-cache-turns: always off"""
    rollout_chunk: int = 0
    """episodes decoded at once (bounds the batched caches and logits); 0 = auto: all, or fewer if the memory plan needs"""
    rollout_gather: Literal["auto", "whole", "student", "layers"] = "auto"
    """rollouts hold the sharded models gathered whole (`whole`, fastest), the student whole and the experts by layer
    in each forward (`student`), or every model by layer (`layers`, least memory); auto: the fastest the plan fits"""

    # Optimization
    phase1_iterations: int = 100
    """off-policy iterations (phase 1): batches of the experts' episodes, --num-minibatches optimizer steps each"""
    phase2_iterations: int = 100
    """on-policy iterations (phase 2): a batch of student rollouts and --num-minibatches optimizer steps each"""
    learning_rate: float | None = None
    """AdamW learning rate of phase 1 (auto: 2e-3 tiny, 1e-5 real)"""
    phase2_learning_rate: float | None = None
    """AdamW learning rate of phase 2 (auto: 5e-4 tiny, 2e-5 real): the same optimizer, its rate changed at the
    switch (the tiny default's on-policy steps, one episode of each task, are noisier than the experts' tokens)"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning rate after warmup: constant, or decaying to 0 at the end (of both phases)"""
    warmup_iterations: int = 0
    """linear learning rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_minibatches: int | None = None
    """optimizer steps per iteration: the batch is split into this many mini-batches, each holding every task
    in the batch's ratio, so at most the smallest task's count of the batch (auto: 4 tiny, 1 real)"""
    micro_batch_tokens: int | None = None
    """token budget of one forward/backward micro-batch, accumulated in a mini-batch (auto: 4096 tiny, 16384 real)"""
    activation_checkpointing: bool = False
    """recompute decoder layers in backward to save memory: always; without it, where the memory plan needs it"""
    plan: bool = False
    """print the memory plan (per-rank bytes for 1 to 8 ranks, from the models' configs) and exit: no weights loaded"""
    device_memory: str = "auto"
    """the memory a rank plans for: auto (this GPU's, or on a CPU the available memory over the host's ranks;
    --plan on a machine without a GPU plans 80 GiB GPUs for a real student), or gpu:<GiB> / cpu:<GiB>"""

    # Evaluation and checkpoints
    eval_interval: int = 50
    """evaluate the student on every task every N iterations"""
    eval_episodes: int = 32
    """held-out episodes per task and evaluation (split over ranks)"""
    eval_temperature: float = 0.0
    """sampling temperature of evaluation (0 = greedy)"""
    eval_batch: int = 0
    """held-out episodes of each task a rank plays at once, every task in the same batch (0 = auto: all of its share
    of --eval-episodes with a tiny student, --num-envs over the number of tasks with a real one)"""
    save_interval: int = 25
    """write a resumable checkpoint every N iterations (and at the end)"""
    resume: str | None = None
    """a run folder (or its checkpoint.pt) to continue from"""
    max_env_failures: float = 0.25
    """an episode whose env fails is dropped; more than this fraction of an iteration's stops the run (checkpointed)"""

    # Algorithm specific arguments
    expert_episodes: int = 100
    """phase 1 data: training seeds 0..N-1 of each task that its expert plays once, before training"""
    success_only: bool = True
    """keep only the experts' solved episodes as phase 1 data"""
    expert_temperature: float = 1.0
    """sampling temperature of the experts' episodes (0 = greedy: one trajectory per seed)"""
    student_loss: Literal["sampled", "topk", "full"] | None = None
    """phase 2: `sampled` = the paper's sampled-token reverse KL; `topk` = the reverse KL over the expert's top
    --topk tokens and one bucket for the rest (scales to a 151k vocabulary; it taught where `sampled` did not,
    docs/guided_opd.md); `full` = the exact reverse KL over the vocabulary (auto: full tiny, topk real)"""
    topk: int = 64
    """topk: the expert's k most likely tokens at each position"""
    teacher_loss: Literal["ce", "full"] | None = None
    """phase 1: `ce` = cross-entropy on the experts' tokens (the paper's SFT), `full` = the exact forward KL over
    the vocabulary (auto: full tiny, ce real)"""
    adv_clip: float = 0.0
    """clip the sampled form's per-token advantage log pi_T - log pi_s to +-adv_clip (0 = no clip)"""
    ratio_max: float = math.inf
    """phase 2's sampled form: weigh each token's term by the importance ratio pi_s / pi_s(rollout) (later mini-batches
    on-policy in expectation), truncated at ratio_max (inf: the plain ratio); 0 = no ratio, the plain estimator"""
    ratio_clip: float = 0.0
    """phase 2's sampled form: PPO's clipped surrogate instead, the ratio clipped to 1 +- ratio_clip with the
    advantage of the rollout-time student (0 = off; when set, --ratio-max is not used)"""
    phase2_data: Literal["student", "experts"] = "student"
    """phase 2's data: `student` = its own rollouts (on-policy, the paper); `experts` = phase 1's data and loss at phase
    2's rate (off-policy with the default's rate drop: the control that differs only in where phase 2's data comes from)"""
    real_losses: bool = False
    """with a tiny student: train with the real-model losses (REAL_LOSSES: --teacher-loss and --student-loss as a
    real run takes them), everything else the tiny default's, to see them teach on a CPU"""

    @property
    def total_iterations(self) -> int:
        return self.phase1_iterations + self.phase2_iterations


# "Auto" arguments (None above): the embedded tiny default's values, and a real model's.
# REAL's sources (docs/real_models.md): phase 1 (supervised) at 1e-5, the low end of public SFT recipes for whole 1-8B
# models (1e-5 to 2e-5); phase 2 at NeMo-RL's on-policy distillation rate for full models (2e-5; 4e-5 did worse); one
# optimizer step per batch; the lengths are the papers' (512 tokens a turn).
TINY = dict(tasks=("twx:simonsays", "twx:peckingorder", "twx:coin:numLocations=4,includeDoors=0"), max_turns=12,
            max_new_tokens=24, max_seq_len=2048, learning_rate=2e-3, phase2_learning_rate=5e-4, micro_batch_tokens=4096,
            num_minibatches=4, student_loss="full", teacher_loss="full")
REAL = dict(max_turns=0, max_new_tokens=512, max_seq_len=16384, learning_rate=1e-5, phase2_learning_rate=2e-5,
            micro_batch_tokens=16384, num_minibatches=1, student_loss="topk", teacher_loss="ce")
REAL_LOSSES = ("student_loss", "teacher_loss")  # what --real-losses takes from REAL


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the two phases
# ----------------------------------------------------------------------------------------------------
def phase_at(iteration: int, args: Args) -> int:
    """1 (off-policy, on the experts' episodes) for the first --phase1-iterations iterations (0-based), then 2."""
    return 1 if iteration < args.phase1_iterations else 2


def lr_at(iteration: int, args: Args) -> float:
    """The phase's learning rate (--learning-rate, --phase2-learning-rate) times the warmup and the schedule,
    which span both phases."""
    base = args.learning_rate if phase_at(iteration, args) == 1 else args.phase2_learning_rate
    if iteration < args.warmup_iterations:
        return base * (iteration + 1) / args.warmup_iterations
    p = (iteration - args.warmup_iterations) / max(1, args.total_iterations - args.warmup_iterations)
    return base * {"constant": 1.0, "cosine": 0.5 * (1.0 + math.cos(math.pi * p)), "linear": 1.0 - p}[args.lr_schedule]


def task_label(spec: str) -> str:
    """A task's name in metric names: the game of a spec (`twx:coin:numLocations=4` -> `coin`)."""
    return spec.split(":")[1] if ":" in spec else spec


def task_of_slot(slot: int, args: Args) -> str:
    """Episode slot k of an iteration's global batch (ranks hold consecutive slots) plays task k mod #tasks: every
    batch is balanced over the tasks (the first B mod #tasks get one more), split alike whatever the ranks."""
    return args.tasks[slot % len(args.tasks)]


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: rollouts. One model writes every turn of its episodes: an expert (phase 1 data, role TEACHER)
# or the student (phase 2, role STUDENT); the env steps; the tokens grow one sequence per episode.
# ----------------------------------------------------------------------------------------------------
def truncate_if_full(ep: Episode, args: Args) -> bool:
    """End an episode whose next turn could pass --max-seq-len (logged as truncated, never a crash)."""
    if len(ep) + args.max_new_tokens > args.max_seq_len:
        ep.truncated = True
        return True
    return False


def rollout(agent, tokenizer, pool, tasks, seeds, role: int, args: Args, sampler: torch.Generator,
            temperature: float, max_turns: int) -> list[Episode]:
    """`agent` plays episode seeds[i] of task tasks[i] on env pool[i]; the episodes remember their task."""
    eot = end_of_turn_id(tokenizer)
    # the envs reset and step at once where they allow it; an env that fails ends its episode (`error`, dropped later)
    episodes = start_episodes(tokenizer, pool, seeds, args.thinking, tasks=tasks)
    active = [i for i, ep in enumerate(episodes) if not ep.done and not truncate_if_full(ep, args)]
    caches = [TurnCache() for _ in episodes]
    for _ in range(max_turns):
        if all_max(len(active)) == 0:  # FSDP: every rank runs the same generate calls, so all stop together
            break
        outs = generate_replies(agent, tokenizer, [episodes[i].ids for i in active], args.max_new_tokens,
                                temperature, generator=sampler,
                                caches=[caches[i] for i in active] if args.cache_turns else None, chunk=args.rollout_chunk)
        texts = [tokenizer.decode(reply, skip_special_tokens=True) for reply in outs]
        steps = step_envs(pool, episodes, active, texts)
        still_playing = []
        for i, reply, text, (obs, reward, env_done, info) in zip(active, outs, texts, steps):
            ep = episodes[i]
            ep.append_reply(reply, role, eot)
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


def collect_expert_data(experts: Teachers, tokenizer, pools: dict, args: Args, sampler, max_turns: int, run: Run):
    """Phase 1 data: each task's expert (held as --rollout-gather says) plays training seeds 0..--expert-episodes-1
    of its task, split over ranks; every rank gets every task's episodes (by seed), only the solved ones with
    --success-only. Returns (episodes by task, the experts' success rate on these seeds by task)."""
    data, rates, world = {}, {}, run.world
    for task in args.tasks:
        with gathered(*run.gather(None, experts[task])):
            rates[task], mine = evaluate(lambda p, s: rollout(experts[task], tokenizer, p, [task] * len(s), s, TEACHER,
                                                              args, sampler, args.expert_temperature, max_turns),
                                         pools[task], args.expert_episodes, run.rank, world)
        every = [None] * world
        dist.all_gather_object(every, mine)
        episodes = sorted((ep for eps in every for ep in eps), key=lambda ep: ep.seed)
        data[task] = [ep for ep in episodes if ep.success or not args.success_only]
    return data, rates


def score_by_task(experts: Teachers, batch: dict, episodes: list[Episode], full: bool, topk: int = 0):
    """Each episode scored by its own task's expert only (the paper: "for a prompt from task i, ... the
    corresponding teacher"): log pi_T at every agent token, its top-k or the full rows for those losses."""
    return experts.score(batch, batch["loss_mask"], [ep.task for ep in episodes], full=full, topk=topk)


def expert_batch(data: dict, iteration: int, args: Args, rank: int, world: int) -> list[Episode]:
    """This rank's share of phase-1 iteration `iteration`'s batch: slot k of the global batch takes the next
    episode of its task's data (task_of_slot), which is passed through in a new random order each epoch. The
    order is drawn from (--seed, task, epoch) alone: every rank and a resumed run pick the same batch."""
    n_tasks, batch = len(args.tasks), []
    for slot in range(rank * args.num_envs, (rank + 1) * args.num_envs):
        task = task_of_slot(slot, args)
        # the task's k-th pick: its slots in earlier batches (ceil((B - t) / n_tasks) of the B slots are task t's)
        k = iteration * ((args.num_envs * world - slot % n_tasks + n_tasks - 1) // n_tasks) + slot // n_tasks
        epoch, i = divmod(k, len(data[task]))
        order = random.Random(f"{args.seed}/{task}/{epoch}").sample(range(len(data[task])), len(data[task]))
        batch.append(replace(data[task][order[i]], slot=slot))  # a copy that knows its slot (picks its mini-batch)
    return batch


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the losses. Per-token terms first (pure functions of log-probs, unit-tested against each
# other), then the loss of one micro-batch: sums over its trained tokens by role (the experts' tokens in
# phase 1, the student's in phase 2; the training step divides by the mini-batch's token count).
# ----------------------------------------------------------------------------------------------------
def sampled_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor, adv_clip: float = 0.0) -> torch.Tensor:
    """Phase 2: A_t = stopgrad(log pi_T(y_t) - log pi_s(y_t)), loss_t = -A_t log pi_s(y_t).
    Its expected gradient under y_t ~ pi_s is the gradient of KL(pi_s || pi_T) at that position."""
    advantage = (logp_t - logp_s).detach()
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    return -advantage * logp_s


def clipped_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_clip: float,
                               adv_clip: float = 0.0) -> torch.Tensor:
    """Phase 2's sampled form for a batch that the student sampled a few optimizer steps ago (PPO's surrogate):
    A_t = log pi_T(y_t) - log pi_old(y_t) from the rollout-time student, r_t = pi_s(y_t) / pi_old(y_t),
    loss_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t). At r_t = 1 its gradient is the plain form's."""
    advantage = logp_t - logp_old
    if adv_clip > 0:
        advantage = advantage.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp_s - logp_old)
    return -torch.min(ratio * advantage, ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * advantage)


def importance_sampled_reverse_kl(logp_s: torch.Tensor, logp_old: torch.Tensor, logp_t: torch.Tensor, ratio_max: float,
                                 adv_clip: float = 0.0) -> torch.Tensor:
    """Phase 2's sampled form on tokens drawn by the rollout-time student pi_old, a few optimizer steps ago
    (importance sampling): the plain form's loss weighted by stopgrad(min(r_t, c)), r_t = pi_s(y_t) /
    pi_old(y_t). Below the cap its expected gradient under y_t ~ pi_old is grad KL(pi_s || pi_T) at the current
    student; at r_t = 1 it is the plain form's."""
    weight = torch.exp(logp_s - logp_old).detach().clamp(max=ratio_max)
    return weight * sampled_reverse_kl(logp_s, logp_t, adv_clip)


def topk_reverse_kl(at_s: torch.Tensor, topk_t: torch.Tensor) -> torch.Tensor:
    """Phase 2's reverse KL over k + 1 buckets: the expert's top-k tokens v (log-probs [..., k] of student and
    expert at them) and the tail R of all other tokens, p(R) = 1 - sum_v p(v): sum over the buckets of
    p_s log(p_s / p_T), a lower bound of KL(pi_s || pi_T) that is exact when the tail is one token or empty.
    No sampling: every position's whole top-k is trained, whichever token the student drew there."""
    def with_tail(logp: torch.Tensor) -> torch.Tensor:  # log p(R), floored at 1e-6 (fp32 resolves no finer)
        return torch.cat([logp, torch.log((-torch.expm1(logp.logsumexp(-1))).clamp(min=1e-6)).unsqueeze(-1)], -1)
    at_s, topk_t = with_tail(at_s), with_tail(topk_t)
    p_s, p_t = at_s.exp(), topk_t.exp()
    return (p_s * (at_s - topk_t) - p_s + p_t).sum(-1)


def full_reverse_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_s || pi_T) = sum_v pi_s(v) (log pi_s(v) - log pi_T(v)), from full log-prob rows [N, V]."""
    return (full_s.exp() * (full_s - full_t)).sum(-1)


def full_forward_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_T || pi_s) = sum_v pi_T(v) (log pi_T(v) - log pi_s(v)); its gradient is that of the
    cross-entropy against the expert's whole distribution."""
    return (full_t.exp() * (full_t - full_s)).sum(-1)


def two_phase_loss(student, mb: dict, args: Args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sum of the student-token loss, sum of the expert-token loss, statistics) over the micro-batch's
    trained tokens. `mb` holds the batch tensors, each row's own expert's log-probs (`teacher_logp`), its full
    rows at the trained positions (`teacher_full`, for the exact losses) and the rollout student's (`old_logp`)."""
    s_mask = mb["loss_mask"] & (mb["role"] == STUDENT)
    t_mask = mb["loss_mask"] & (mb["role"] == TEACHER)
    full = "teacher_full" in mb
    s = token_logprobs(student, mb["input_ids"], mb["attention_mask"], mb["loss_mask"], full=full,
                       at=mb.get("teacher_topk_ids"))
    logp_s, logp_t = s.logp, mb["teacher_logp"]

    if "teacher_topk_ids" in mb:  # phase 2 with --student-loss topk
        rkl_tokens = topk_reverse_kl(s.at_logp, mb["teacher_topk_logp"])
    elif args.ratio_clip > 0 and "old_logp" in mb:  # phase 2's sampled form with --ratio-clip
        rkl_tokens = clipped_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_clip, args.adv_clip)
    elif "old_logp" in mb and args.ratio_max > 0:  # phase 2's sampled form, importance ratio
        rkl_tokens = importance_sampled_reverse_kl(logp_s, mb["old_logp"], logp_t, args.ratio_max, args.adv_clip)
    else:
        rkl_tokens = sampled_reverse_kl(logp_s, logp_t, args.adv_clip)
    fkl_tokens = -logp_s  # phase 1: forward KL with only the expert's sampled tokens known = cross-entropy
    if full:  # the exact losses from the full distributions at the trained positions (rows in mask order)
        where = mb["loss_mask"].nonzero(as_tuple=True)
        if args.student_loss == "full":
            rkl_tokens = torch.zeros_like(logp_s).index_put(where, full_reverse_kl(s.full, mb["teacher_full"]))
        if args.teacher_loss == "full":
            fkl_tokens = torch.zeros_like(logp_s).index_put(where, full_forward_kl(s.full, mb["teacher_full"]))
    pg_sum, ce_sum = (rkl_tokens * s_mask).sum(), (fkl_tokens * t_mask).sum()
    with torch.no_grad():
        stats = {
            "reverse_kl": ((logp_s - logp_t) * s_mask).sum().item(),  # sampled-token estimate
            "forward_kl": ((logp_t - logp_s) * t_mask).sum().item(),  # on the experts' own samples
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


def train_step(student, optimizer, episodes: list[Episode], batch: dict, teacher_scores, old_logp, plan: list[int],
               args: Args, world: int, device) -> dict:
    """One iteration's updates. The batch is split into --num-minibatches mini-batches, one optimizer step
    each (as verl's PPO mini-batches): a tiny model needs many steps, and rollouts cost the most. The split is
    `plan` (the same on every rank): every mini-batch holds every task in the batch's ratio, its episodes
    shuffled (the paper keeps the tasks balanced in every batch). Inside a
    mini-batch, micro-batches of at most --micro-batch-tokens accumulate gradients; the loss is the token
    mean over the mini-batch's trained tokens (the experts' or the student's). Returns the summed statistics
    of the micro-batches and the mean gradient norm."""
    loss_mask = batch["loss_mask"]
    full_rows = None
    if teacher_scores.full is not None:  # map each trained position to its row of the experts' full distributions
        full_rows = torch.full(loss_mask.shape, -1, dtype=torch.long)
        full_rows[loss_mask] = torch.arange(int(loss_mask.sum()))
    stats_sum, grad_norms, skipped = {}, [], 0
    for m in range(args.num_minibatches):
        rows = [i for i, ep in enumerate(episodes) if plan[ep.slot] == m]
        n_tokens = all_sum({"tokens": int(loss_mask[rows].sum())})["tokens"]
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
            pg_sum, ce_sum, stats = two_phase_loss(student, mb, args)
            # The mini-batch's loss is a mean over its tokens on every rank; FSDP averages gradients over
            # ranks, hence the factor world.
            loss = (pg_sum + ce_sum) * weight * world / max(n_tokens, 1.0)
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
    if args.phase1_iterations < 0 or args.phase2_iterations < 0 or args.total_iterations == 0:
        raise SystemExit("error: --phase1-iterations and --phase2-iterations must be 0 or more, and not both 0 "
                         "(0 = that phase is skipped: on-policy or off-policy distillation alone)")
    check_rollout_args(args)
    if not args.tasks or len({task_label(t) for t in args.tasks}) != len(args.tasks):
        raise SystemExit(f"error: --tasks must name at least one task, each game once (got {' '.join(args.tasks)})")
    if args.teachers is not None and len(args.teachers) != len(args.tasks):
        raise SystemExit(f"error: --teachers must name one expert per task: {len(args.tasks)} task(s) "
                         f"({' '.join(args.tasks)}) but {len(args.teachers)} teacher(s)")
    if (args.phase1_iterations or args.phase2_data == "experts") and args.expert_episodes < 1:
        raise SystemExit("error: --expert-episodes must be at least 1 with a phase 1 (or pass --phase1-iterations 0)")
    if args.temperature != 1 and args.student_loss == "sampled":
        raise SystemExit("error: --temperature must be 1 with the sampled reverse KL (its log-probs are of the "
                         "untempered models); sample at another temperature only with --student-loss full or topk")
    if args.expert_temperature < 0 or min(args.adv_clip, args.ratio_clip, args.ratio_max) < 0 or args.topk < 1:
        raise SystemExit("error: --expert-temperature must be 0 (greedy) or more, --adv-clip, --ratio-clip and "
                         "--ratio-max 0 (off) or positive, --topk at least 1")
    if args.ratio_clip and args.student_loss != "sampled":
        raise SystemExit("error: --ratio-clip weighs phase 2's sampled form: use it with --student-loss sampled, or drop it")


if __name__ == "__main__":
    # ---- INFRASTRUCTURE: arguments, process group, seeds, models, run folder (common/ holds the details) ----
    args = tyro.cli(Args)
    fill_defaults(args, TINY, REAL, REAL_LOSSES, required=("tasks", "teachers"))
    check_args(args)
    rank, world, device = setup()
    try:
        args.student = student_name(args.student, args.tasks[0])
        args.teachers = tuple(args.teachers or (teacher_name(None, args.student, t) for t in args.tasks))
        # The memory plan from the configs (--plan prints it, exits): phase 1's experts generate alone, then the student
        distinct = list(dict.fromkeys(args.teachers))
        plan = plan_run(args, world, device, args.student, distinct, [[e] for e in distinct] + [[STUDENT]],
                        topk=args.topk if args.student_loss == "topk" else 0, full="full" in (args.student_loss, args.teacher_loss))
    except (ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        for task in args.tasks:  # a bad spec fails here, in one line
            envs.make(task, seed=args.seed).close()
        user = env_user(args.user_model, next((t for t in args.tasks if t.startswith("tau2:")), args.tasks[0]), device)
    except (envs.EnvError, ModelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    seed_everything(args.seed + rank)  # each rank its own stream; the run is reproducible from --seed
    sampler = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling of tokens
    generators = {"sampler": sampler}

    # The student trains, each task's expert is frozen; all sharded with FSDP2 (an expert shared by tasks once).
    student, tokenizer, expert_models = load_student_and_teachers(args.student, list(args.teachers), device, args.max_seq_len)
    student = shard(student, device, trainable=True, activation_checkpointing=args.activation_checkpointing)
    for model in {id(m): m for m in expert_models}.values():
        shard(model, device, trainable=False)
    experts = Teachers(dict(zip(args.tasks, expert_models)), args.micro_batch_tokens)  # routes rows by task
    # foreach: one multi-tensor update instead of one per parameter (the default on CPU), the same numbers
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, foreach=True)

    run = Run(args, "+".join(task_label(t) for t in args.tasks), student, tokenizer, optimizer, generators, device,
              "tasks and experts: " + ", ".join(f"{task_label(t)} {e}" for t, e in zip(args.tasks, args.teachers)), plan)
    if run.extra.get("phase1_iterations", args.phase1_iterations) != args.phase1_iterations:
        raise SystemExit(f"error: the checkpoint switched phases after {run.extra['phase1_iterations']} iterations: "
                         f"resume with --phase1-iterations {run.extra['phase1_iterations']}")

    # Environments are made once and reset for every episode (a TextWorld-Express env is a JVM process).
    # Their own randomness comes from (--seed, split, episode seed): the same episode on any rank.
    def make(task, split):
        return envs.make(task, seed=args.seed, split=split, **(user if task.startswith("tau2:") else {}))

    # Training envs: --num-envs per task (the experts' data is played one task at a time, a full batch wide);
    # phase 2's slot j plays its task on that task's env j. Held-out envs: a batch's share per task.
    task_pools = {t: [make(t, "train") for _ in range(args.num_envs)] for t in args.tasks}
    eval_size = eval_batch(args, world, math.ceil(args.num_envs / len(args.tasks)))
    eval_pools = {t: [make(t, "heldout") for _ in range(eval_size)] for t in args.tasks}
    pool_tasks = [task_of_slot(rank * args.num_envs + j, args) for j in range(args.num_envs)]
    pool = [task_pools[task][j] for j, task in enumerate(pool_tasks)]
    max_turns = args.max_turns or max(env.max_turns for env in pool)

    def evaluate_alone(model_of: dict) -> tuple[dict, list[Episode]]:
        """Each task's model alone on the task's held-out seeds, the tasks of one model in one batch: per-task
        rates, their mean and the lowest success rate; and this rank's first episode of each task (for the
        decoded trajectories)."""
        out, shown = {}, []
        for model in {id(m): m for m in model_of.values()}.values():
            results = run.evaluate_tasks(model, lambda p, s, t, sampler: rollout(
                model, tokenizer, p, t, s, STUDENT, args, sampler, args.eval_temperature, max_turns),
                {task: eval_pools[task] for task in args.tasks if model_of[task] is model})
            out.update({f"{task_label(t)}/{k}": v for t, (ev, _) in results.items() for k, v in ev.items()})
            shown += [ep for _, eps in results.values() for ep in eps[:1]]
        for k in ("success_rate", "score", "episode_turns"):
            out[k] = sum(out[f"{task_label(t)}/{k}"] for t in args.tasks) / len(args.tasks)
        out["min_success_rate"] = min(out[f"{task_label(t)}/success_rate"] for t in args.tasks)
        return out, shown

    def summary(ev: dict) -> str:
        return " ".join(f"{task_label(t)} {ev[task_label(t) + '/success_rate']:.2f}" for t in args.tasks)

    # Each expert alone on its task, once: the levels the student is distilled towards.
    if run.start == 0:
        teacher_eval, _ = evaluate_alone({task: experts[task] for task in args.tasks})
        student_eval, _ = evaluate_alone(dict.fromkeys(args.tasks, student))
        run.log(0, {"teacher": teacher_eval, "eval": student_eval},
                f"experts' held-out success: {summary(teacher_eval)}; student before training: {summary(student_eval)}")

    # Phase 1 data, played before training (again on a resume in phase 1: the experts' sampling has its own
    # generator seeded from --seed, so the same episodes come back).
    if run.start < args.phase1_iterations or args.phase2_data == "experts":
        t0 = time.time()
        collect_sampler = torch.Generator(device=device).manual_seed(args.seed * 1000 + 777 + rank)
        data, train_rates = collect_expert_data(experts, tokenizer, task_pools, args, collect_sampler, max_turns, run)
        empty = [task for task in args.tasks if not data[task]]
        if empty:
            raise SystemExit(f"error: the expert of {', '.join(empty)} solved none of its {args.expert_episodes} training "
                             "episodes: pass --no-success-only, more --expert-episodes, or a better expert")
        if rank == 0:
            print(f"phase 1 data in {time.time() - t0:.0f}s: " + ", ".join(
                f"{task_label(t)} {len(data[t])} episodes ({train_rates[t]['success_rate']:.0%} solved)" for t in args.tasks))

    for iteration in range(run.start, args.total_iterations):
        t_iter = time.time()
        phase = phase_at(iteration, args)
        off_policy = phase == 1 or args.phase2_data == "experts"  # the experts' episodes, phase 1's loss
        lr = lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ALGO LOGIC: phase 1 takes the iteration's batch of the experts' episodes; phase 2 plays the student
        t0 = time.time()
        if off_policy:
            episodes = expert_batch(data, iteration, args, rank, world)
        else:
            seeds = [(iteration * world + rank) * args.num_envs + j for j in range(args.num_envs)]
            with gathered(*run.gather(student)):  # whole, or by layer (--rollout-gather)
                episodes = rollout(student, tokenizer, pool, pool_tasks, seeds, STUDENT, args, sampler, args.temperature,
                                   max_turns)
            for j, ep in enumerate(episodes):
                ep.slot = rank * args.num_envs + j  # its place in the batch over every rank: picks its mini-batch
            episodes = run.drop_failed(episodes, iteration)  # those whose env failed; a signal or too many stop the run
        t_rollout = time.time() - t0

        # Expert scoring, each episode by its own task's expert only: log pi_T of every agent token (phase 2's
        # advantage; phase 1's logged forward KL), its top-k or full distributions for those losses. For phase 2's
        # sampled form, the student's own rollout-time log-probs too (the ratio's denominator).
        t0 = time.time()
        batch = collate(episodes, tokenizer.pad_token_id)
        need_full = (args.teacher_loss if off_policy else args.student_loss) == "full"
        scores = score_by_task(experts, batch, episodes, full=need_full,
                               topk=args.topk if not off_policy and args.student_loss == "topk" else 0)
        old_logp = None
        if not off_policy and args.student_loss == "sampled" and (args.ratio_clip > 0 or args.ratio_max > 0):
            old_logp = score_teacher(student, batch, batch["loss_mask"], args.micro_batch_tokens).logp
        t_teacher = time.time() - t0

        # ALGO LOGIC: the training step, on mini-batches that hold every task in the batch's ratio (the slots of each
        # task shuffled and dealt in turn, drawn from --seed and the iteration)
        t0 = time.time()
        plan = minibatch_plan([task_of_slot(g, args) for g in range(args.num_envs * world)], args.num_minibatches,
                              random.Random(f"{args.seed}/mb/{iteration}"))
        step = train_step(student, optimizer, episodes, batch, scores, old_logp, plan, args, world, device)
        t_train = time.time() - t0

        # ---- INFRASTRUCTURE: logging (sums over every rank's episodes and micro-batches), eval, checkpoint ----
        totals = all_sum({**episode_sums(episodes), **{k: v for k, v in step.items() if k not in ("grad_norm", "skipped_steps")}})
        completed = iteration + 1  # charts/*: in phase 1 of the experts' episodes trained on, in phase 2 the student's
        n_student, n_teacher = max(totals["student_tokens"], 1), max(totals["teacher_tokens"], 1)
        losses = {"loss": (totals["pg_loss"] + totals["ce_loss"]) / max(totals["agent_tokens"], 1), **(
            {"forward_kl": totals["forward_kl"] / n_teacher, "ce_loss": totals["ce_loss"] / n_teacher} if off_policy else
            {"reverse_kl": totals["reverse_kl"] / n_student, "pg_loss": totals["pg_loss"] / n_student}),  # one role a phase
            **({"clipfrac": totals["clipped"] / n_student} if "clipped" in totals else {})}
        kl = f"fkl {losses['forward_kl']:.3f}" if off_policy else f"rkl {losses['reverse_kl']:.3f}"
        run.log_iteration(completed, totals, step, lr, t_iter, (t_rollout, t_teacher, t_train), losses, {"phase": phase},
                          words=f"phase {phase}  {kl}")
        if run.due(completed, args.eval_interval):
            ev, eval_eps = evaluate_alone(dict.fromkeys(args.tasks, student))
            run.log(completed, {"eval": ev}, f"eval after {completed} iterations: held-out success {summary(ev)} (mean "
                    f"{ev['success_rate']:.2f}, min {ev['min_success_rate']:.2f})",
                    [(f"eval/{task_label(ep.task)}/trajectory", ep) for ep in eval_eps])
        run.save(completed, extra={"phase": phase_at(completed, args), "phase1_iterations": args.phase1_iterations})

    run.finish([env for p in (*task_pools.values(), *eval_pools.values()) for env in p])  # the student in HF format
