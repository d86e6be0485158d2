"""Guided on-policy distillation (Guided-OPD) for multi-turn LLM agents.

Paper: "Guided On-Policy Distillation for LLM Agents", arXiv 2606.15912.

Plain on-policy distillation (OPD) lets the student play whole episodes and trains every student token
towards the teacher (sampled-token reverse KL). In multi-turn tasks a weak student's early mistakes
compound: its trajectories drift to states where the teacher's signal is unreliable. Guided-OPD lets the
teacher write some turns: at every turn, independently, the teacher writes the whole turn with
probability beta, else the student does; either way the turn is executed and becomes shared history.

- Student turns: sampled-token reverse KL as a per-token advantage,
  A_t = stopgrad(log pi_t(y_t) - log pi_s(y_t)), loss_t = -A_t log pi_s(y_t)  (its expected gradient
  under the student's own samples is the gradient of KL(pi_s || pi_t)).
- Teacher turns: forward KL on the teacher's sampled tokens = cross-entropy, loss_t = -log pi_s(y_t).
- The paper writes L = (1 - beta) J_rKL + beta J_fKL. Here both terms are token means over the same
  global batch, so each role's weight is its share of the batch's tokens, which is (1 - beta) : beta in
  expectation. We read the paper's weights as exactly that (no extra factor); the paper does not say.
- Curriculum: beta decays from 1 to 0 along a cosine, reaching 0 at 80% of training, then plain OPD.
  Evaluation always uses beta = 0 (the student alone). No environment reward is used for training.

Normalisation: each rollout batch is split into --num-minibatches mini-batches, one optimizer step each;
a mini-batch's loss is the sum over its trained tokens on every rank divided by their number (token
mean). Choices the paper leaves open (flags where they matter): several mini-batch steps per batch of
fresh rollouts without an importance ratio (the later steps are slightly off-policy, as in verl's PPO
mini-batches), AdamW with a constant learning rate by default, the exact full-vocabulary losses as
options (`--student-loss full`, `--teacher-loss full`) for local teachers; they are the defaults of the
embedded tiny default, where the sampled forms did not teach the student (README). With a 151k
vocabulary use the paper's sampled forms: `--student-loss sampled --teacher-loss ce`.

Run:
    python guided_opd.py                                   # embedded tiny default, CPU, minutes
    python guided_opd.py --beta-start 0                    # vanilla OPD, the baseline
    torchrun --nproc_per_node 8 guided_opd.py --student qwen3-1.7b --teacher qwen3-30b-a3b \\
        --env alfworld --max-turns 50 --max-new-tokens 512 --max-seq-len 16384 --learning-rate 1e-6 \\
        --student-loss sampled --teacher-loss ce
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import tyro
from torch.utils.tensorboard import SummaryWriter

import envs
from common import tiny
from common.episode import ENV, STUDENT, TEACHER, Episode, TurnCache, collate, end_of_turn_id, generate_replies
from common.teacher import ModelError, check_vocab, load_model, score_teacher, token_logprobs


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
    """the student: an alias (qwen3-0.6b, qwen3-1.7b, ...), a hub id, a local path, or `tiny` (the tiny
    student that shares a tokenizer with --env's tiny expert)"""
    teacher: str = "tiny-expert"
    """the teacher (frozen); `tiny-expert` = the tiny expert of --env's game"""
    env: str = "twx:simonsays"
    """environment spec, e.g. twx:coin, scienceworld:boil, alfworld (see envs/)"""
    thinking: bool = False
    """Qwen3 thinking mode in the chat template (the tiny models do not think)"""

    # Rollouts
    num_envs: int = 16
    """episodes played by each rank per iteration (the global batch is num_envs x world size)"""
    max_turns: int | None = 12
    """turns per episode before it is cut (12 suits the tiny default); None = the environment's default"""
    max_new_tokens: int = 24
    """tokens a turn may generate (raise to 512+ for real models, more with --thinking)"""
    max_seq_len: int = 2048
    """tokens an episode may hold; a turn that would not fit ends the episode as truncated"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (student and teacher turns)"""
    cache_turns: bool = True
    """keep each episode's key/value cache between turns, so a turn runs only its new tokens (faster;
    the memory grows with episodes x tokens; turn off if rollouts run out of memory)"""

    # Optimization
    total_iterations: int = 100
    """training iterations: one batch of rollouts and one optimizer step each"""
    learning_rate: float = 2e-3
    """AdamW learning rate"""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """learning rate after warmup: constant, or decaying to 0 at the end"""
    warmup_iterations: int = 0
    """linear learning rate warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    num_minibatches: int = 8
    """optimizer steps per iteration: the rollout batch is split into this many mini-batches"""
    micro_batch_tokens: int = 4096
    """token budget of one forward/backward micro-batch (gradient accumulation within a mini-batch)"""
    activation_checkpointing: bool = False
    """recompute decoder layers in backward to save memory (real models)"""

    # Evaluation and checkpoints
    eval_interval: int = 20
    """evaluate the student (beta = 0, greedy) every N iterations"""
    eval_episodes: int = 64
    """held-out episodes per evaluation (split over ranks)"""
    eval_temperature: float = 0.0
    """sampling temperature of evaluation (0 = greedy)"""
    save_interval: int = 20
    """write a resumable checkpoint every N iterations (and at the end)"""
    resume: str | None = None
    """a run folder (or its checkpoint.pt) to continue from"""

    # Algorithm specific arguments
    beta_start: float = 1.0
    """probability that the teacher writes a turn, at the start (0 = vanilla OPD)"""
    beta_end: float = 0.0
    """the probability at the end of the curriculum"""
    curriculum_fraction: float = 0.8
    """fraction of training over which beta goes from beta_start to beta_end (then stays)"""
    curriculum: Literal["cosine", "linear", "constant"] = "cosine"
    """shape of the beta curriculum (constant keeps beta_start: an ablation)"""
    student_loss: Literal["sampled", "full"] = "full"
    """student turns: `sampled` = the paper's sampled-token reverse KL (use it with a 151k vocabulary), or
    `full` = the exact reverse KL over the vocabulary (the tiny default: the sampled form did not teach it)"""
    teacher_loss: Literal["ce", "full"] = "full"
    """teacher turns: `ce` = cross-entropy on the teacher's tokens (the paper's), or `full` = the exact
    forward KL over the vocabulary (needs the teacher's full distribution at every trained position)"""


# ALGO LOGIC: the guidance curriculum
def beta_schedule(iteration: int, args: Args) -> float:
    """Teacher-turn probability at `iteration` (0-based): beta_start -> beta_end over the first
    curriculum_fraction of training (cosine by default, as in the paper), then beta_end."""
    if args.curriculum == "constant":
        return args.beta_start
    horizon = max(1.0, args.curriculum_fraction * args.total_iterations)
    p = min(1.0, iteration / horizon)
    if args.curriculum == "cosine":
        w = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        w = 1.0 - p
    return args.beta_end + (args.beta_start - args.beta_end) * w


def lr_at(iteration: int, args: Args) -> float:
    if iteration < args.warmup_iterations:
        return args.learning_rate * (iteration + 1) / args.warmup_iterations
    p = (iteration - args.warmup_iterations) / max(1, args.total_iterations - args.warmup_iterations)
    if args.lr_schedule == "cosine":
        return args.learning_rate * 0.5 * (1.0 + math.cos(math.pi * p))
    if args.lr_schedule == "linear":
        return args.learning_rate * (1.0 - p)
    return args.learning_rate


# ----------------------------------------------------------------------------------------------------
# Distributed helpers: one process works the same as torchrun with one rank
# ----------------------------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python guided_opd.py`: a process group of one, on a free port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(model, device, trainable: bool, activation_checkpointing: bool = False):
    """FSDP2: one unit per decoder layer, then the root (embeddings, final norm, LM head).
    bf16 compute with fp32 reductions on GPU; fp32 on CPU (bf16 is about 10x slower there)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    # A frozen teacher frees its gathered root parameters after each forward; the student keeps them
    # for its backward (FSDP2's default for the root).
    fully_shard(model, mp_policy=mp, reshard_after_forward=not trainable)
    return model


def set_rollout_mode(models, on: bool):
    """During rollouts keep every unit's parameters gathered between the many small decoding forwards
    (about 2x faster here), and free them afterwards."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_reshard_after_forward(not on, recurse=False)
                if not on:
                    m.reshard()


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: guided rollouts. Each turn, each episode's author is drawn independently (teacher with
# probability beta); both models generate their episodes' turns in a batch; the env steps; the tokens
# are appended to one sequence per episode with their role, so the loss knows who wrote what.
# ----------------------------------------------------------------------------------------------------
def rollout(student, teacher, tokenizer, pool, seeds, beta, args: Args, role_rng: random.Random,
            gen: torch.Generator, temperature: float, device, max_turns: int) -> list[Episode]:
    eot = end_of_turn_id(tokenizer)
    episodes = []
    for env, seed in zip(pool, seeds):
        obs, info = env.reset(seed)
        episodes.append(Episode.start(tokenizer, env.system_prompt(), obs, args.thinking, task=info["task"], seed=seed))
    active = [i for i, e in enumerate(episodes) if not _truncate_if_full(e, args)]
    # each model keeps its own cache per episode and catches up on the turns the other one wrote
    caches = {role: [TurnCache() for _ in episodes] for role in (STUDENT, TEACHER)}
    for _ in range(max_turns):
        # every rank must run the same generate calls (FSDP): stop only when all ranks are done
        if all_sum([len(active)], device)[0] == 0:
            break
        roles = {i: TEACHER if role_rng.random() < beta else STUDENT for i in active}
        replies = {}
        for role, model in ((STUDENT, student), (TEACHER, teacher)):
            who = [i for i in active if roles[i] == role]
            if all_sum([len(who)], device)[0] == 0:
                continue
            outs = generate_replies(model, tokenizer, [episodes[i].ids for i in who], args.max_new_tokens,
                                    temperature, generator=gen,
                                    caches=[caches[role][i] for i in who] if args.cache_turns else None)
            replies.update(zip(who, outs))
        still = []
        for i in active:
            ep = episodes[i]
            ep.append_reply(replies[i], roles[i], eot)
            text = tokenizer.decode(replies[i], skip_special_tokens=True)
            ep.replies.append(text)
            obs, reward, done, info = pool[i].step(text)
            ep.reward += reward
            ep.success, ep.score = bool(info["success"]), float(info["score"])
            ep.invalid_turns += int(info["invalid"])
            if done:
                ep.done = True
            else:
                ep.append_observation(tokenizer, obs, args.thinking)
                if not _truncate_if_full(ep, args):
                    still.append(i)
                    continue
            caches[STUDENT][i] = caches[TEACHER][i] = None  # the episode is over: free its caches
        active = still
    return episodes


def _truncate_if_full(ep: Episode, args: Args) -> bool:
    """End an episode whose next turn could pass --max-seq-len (logged as truncated, never a crash)."""
    if len(ep) + args.max_new_tokens > args.max_seq_len:
        ep.truncated = True
        return True
    return False


# ----------------------------------------------------------------------------------------------------
# ALGO LOGIC: the losses. Per-token terms first (pure functions of log-probs, unit-tested against each
# other), then the loss of one micro-batch: the sum over its trained tokens (the caller divides by the
# global token count) and the statistics to log.
# ----------------------------------------------------------------------------------------------------
def sampled_reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Student turns: A_t = stopgrad(log pi_t(y_t) - log pi_s(y_t)), loss_t = -A_t log pi_s(y_t).
    Its expected gradient under y_t ~ pi_s is the gradient of KL(pi_s || pi_t) at that position."""
    advantage = (logp_t - logp_s).detach()
    return -advantage * logp_s


def full_reverse_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_s || pi_t) = sum_v pi_s(v) (log pi_s(v) - log pi_t(v)), from full log-prob rows [N, V]."""
    return (full_s.exp() * (full_s - full_t)).sum(-1)


def full_forward_kl(full_s: torch.Tensor, full_t: torch.Tensor) -> torch.Tensor:
    """KL(pi_t || pi_s) = sum_v pi_t(v) (log pi_t(v) - log pi_s(v)); its gradient is that of the
    cross-entropy against the teacher's whole distribution."""
    return (full_t.exp() * (full_t - full_s)).sum(-1)


def guided_opd_loss(student, mb: dict, args: Args):
    s_mask = mb["loss_mask"] & (mb["role"] == STUDENT)
    t_mask = mb["loss_mask"] & (mb["role"] == TEACHER)
    full = args.student_loss == "full" or args.teacher_loss == "full"
    s = token_logprobs(student, mb["input_ids"], mb["attention_mask"], mb["loss_mask"], full=full)
    logp_s, logp_t = s.logp, mb["teacher_logp"]

    rkl_tokens = sampled_reverse_kl(logp_s, logp_t)  # student turns
    fkl_tokens = -logp_s  # teacher turns: forward KL with only the sampled tokens known = cross-entropy
    if full:  # the exact losses from the full distributions at the trained positions (rows in mask order)
        where = mb["loss_mask"].nonzero(as_tuple=True)
        if args.student_loss == "full":
            rkl_tokens = torch.zeros_like(logp_s).index_put(where, full_reverse_kl(s.full, mb["teacher_full"]))
        if args.teacher_loss == "full":
            fkl_tokens = torch.zeros_like(logp_s).index_put(where, full_forward_kl(s.full, mb["teacher_full"]))
    loss_sum = (rkl_tokens * s_mask).sum() + (fkl_tokens * t_mask).sum()
    with torch.no_grad():
        stats = {
            "reverse_kl": ((logp_s - logp_t) * s_mask).sum().item(),  # sampled-token estimate
            "forward_kl": ((logp_t - logp_s) * t_mask).sum().item(),  # on the teacher's own samples
            "pg_loss": (rkl_tokens * s_mask).sum().item(),
            "ce_loss": (fkl_tokens * t_mask).sum().item(),
            "student_tokens": s_mask.sum().item(),
            "teacher_tokens": t_mask.sum().item(),
        }
    return loss_sum, stats


def micro_batches(episodes: list[Episode], budget: int) -> list[list[int]]:
    """Group episode indices so each group's padded size (rows x longest) stays within `budget`."""
    order = sorted(range(len(episodes)), key=lambda i: len(episodes[i]))
    groups, cur, longest = [], [], 0
    for i in order:
        n = len(episodes[i])
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def evaluate(student, tokenizer, args: Args, pool, rank: int, world: int, device, n: int) -> tuple[dict, list[Episode]]:
    """The student alone (beta = 0) on `n` held-out seeds, split across ranks, `len(pool)` at a time."""
    seeds = list(range(rank, n, world))
    gen = torch.Generator(device=device).manual_seed(args.seed + 12345 + rank)
    episodes = []
    n_rounds = torch.tensor([math.ceil(len(seeds) / len(pool))], device=device)
    dist.all_reduce(n_rounds, op=dist.ReduceOp.MAX)  # every rank runs the same number of rollouts
    for k in range(int(n_rounds.item())):
        chunk = seeds[k * len(pool):(k + 1) * len(pool)]
        eps = rollout(student, None, tokenizer, pool[:len(chunk)], chunk, 0.0, args, random.Random(0), gen,
                      args.eval_temperature, device, args.max_turns or pool[0].max_turns)
        episodes += eps
    tot = all_sum([len(episodes), sum(e.success for e in episodes), sum(e.score for e in episodes),
                   sum(e.turns for e in episodes)], device)
    return {"success_rate": tot[1] / tot[0], "score": tot[2] / tot[0], "episode_turns": tot[3] / tot[0]}, episodes


def trajectory_text(tokenizer, ep: Episode) -> str:
    """A decoded episode for tensorboard: who wrote each turn, and what the env said."""
    body = tokenizer.decode(ep.ids, skip_special_tokens=False)
    return f"seed {ep.seed}, success {ep.success}, turns {ep.turns}\n\n```\n{body}\n```"


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic, resumable (model, optimizer, iteration, every rank's RNG states)
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path, student, optimizer, iteration, run_name, rngs, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(student, options=opts)
    optim_sd = get_optimizer_state_dict(student, optimizer, options=opts)
    all_rngs = [None] * dist.get_world_size()
    dist.all_gather_object(all_rngs, rngs)
    if rank == 0:
        tmp = path + ".tmp"
        torch.save({"model": model_sd, "optimizer": optim_sd, "iteration": iteration, "run_name": run_name,
                    "rngs": all_rngs}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint
    dist.barrier()


def load_checkpoint(path, student, optimizer, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(student, ckpt["model"], options=opts)
    set_optimizer_state_dict(student, optimizer, ckpt["optimizer"], options=opts)
    return ckpt["iteration"], ckpt["run_name"], ckpt["rngs"][rank]


def rng_state(role_rng, gen):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "role": role_rng.getstate(), "gen": gen.get_state()}


def set_rng_state(state, role_rng, gen):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    role_rng.setstate(state["role"])
    gen.set_state(state["gen"])


def checkpoint_file(resume: str) -> str:
    path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {resume!r}: pass the folder of an earlier run (runs/<run_name>) "
                         "or its checkpoint.pt")
    return path


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.num_envs < 1 or args.total_iterations < 1:
        fail("--num-envs and --total-iterations must be at least 1")
    if not 1 <= args.num_minibatches <= args.num_envs:
        fail(f"--num-minibatches must be between 1 and --num-envs ({args.num_envs})")
    resume_path = checkpoint_file(args.resume) if args.resume else None
    rank, world, device = setup_distributed()
    try:
        probe = envs.make(args.env, seed=args.seed)  # a bad spec fails here, in one line
    except (envs.EnvError, ValueError) as e:
        fail(str(e))
    probe.close()
    if args.teacher == "tiny-expert":
        try:
            args.teacher = tiny.expert_for(args.env)
        except ValueError as e:
            fail(str(e))
    if args.student == "tiny":
        args.student = tiny.student_for(args.env)

    # Seeding: each rank gets its own stream (rank offset), the run is reproducible from --seed.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    role_rng = random.Random(args.seed * 1000 + rank)
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    torch.set_num_threads(max(1, torch.get_num_threads() // world) if device.type == "cpu" else torch.get_num_threads())

    # Models: the student trains, the teacher is frozen; both sharded with FSDP2.
    try:
        student, tokenizer = load_model(args.student, trainable=True)
        teacher, teacher_tok = load_model(args.teacher, device=device)
        check_vocab((student, tokenizer), (teacher, teacher_tok), (args.student, args.teacher))
    except (ModelError, ValueError) as e:
        fail(str(e))
    max_pos = student.config.max_position_embeddings
    if args.max_seq_len > max_pos:
        fail(f"--max-seq-len {args.max_seq_len} exceeds the student's {max_pos} positions: lower --max-seq-len")
    if args.max_new_tokens >= args.max_seq_len:
        fail(f"--max-new-tokens {args.max_new_tokens} must be below --max-seq-len {args.max_seq_len}")
    student = shard(student, device, trainable=True, activation_checkpointing=args.activation_checkpointing)
    teacher = shard(teacher, device, trainable=False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay)

    start_iteration = 0
    run_name = f"{args.env.replace(':', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if resume_path:
        start_iteration, run_name, state = load_checkpoint(resume_path, student, optimizer, rank)
        set_rng_state(state, role_rng, gen)
    run_dir = os.path.join(args.runs_dir, run_name)
    writer = None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=run_name, save_code=True, resume="allow", id=run_name)
        # steps count completed iterations; a resumed run drops what the interrupted one logged after its checkpoint
        writer = SummaryWriter(run_dir, purge_step=start_iteration + 1 if resume_path else None)
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        print(f"run {run_name}: {world} rank(s) on {device}, student {args.student}, teacher {args.teacher}, env {args.env}")

    # Environments are made once and reset for every episode (a TextWorld-Express env is a JVM process).
    pool = [envs.make(args.env, seed=args.seed + rank, split="train") for _ in range(args.num_envs)]
    eval_pool = [envs.make(args.env, seed=args.seed + rank, split="heldout") for _ in range(args.num_envs)]

    # The teacher alone, once: the level the student is distilled towards.
    if start_iteration == 0:
        set_rollout_mode([teacher], True)
        teacher_eval, _ = evaluate(teacher, tokenizer, args, eval_pool, rank, world, device, args.eval_episodes)
        student_eval, _ = evaluate(student, tokenizer, args, eval_pool, rank, world, device, args.eval_episodes)
        set_rollout_mode([student, teacher], False)
        if rank == 0:
            for k, v in teacher_eval.items():
                writer.add_scalar(f"teacher/{k}", v, 0)
            for k, v in student_eval.items():
                writer.add_scalar(f"eval/{k}", v, 0)
            print(f"teacher held-out success {teacher_eval['success_rate']:.2f}, "
                  f"student before training {student_eval['success_rate']:.2f}")

    for iteration in range(start_iteration, args.total_iterations):
        t_iter = time.time()
        beta = beta_schedule(iteration, args)
        lr = lr_at(iteration, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ALGO LOGIC: rollouts with guidance probability beta
        t0 = time.time()
        seeds = [(iteration * world + rank) * args.num_envs + j for j in range(args.num_envs)]
        set_rollout_mode([student, teacher], True)
        episodes = rollout(student, teacher, tokenizer, pool, seeds, beta, args, role_rng, gen, args.temperature,
                           device, args.max_turns or pool[0].max_turns)
        set_rollout_mode([student, teacher], False)
        t_rollout = time.time() - t0

        # Teacher scoring: log pi_t of every agent token (student turns need it for the advantage; the
        # teacher's own turns for the logged forward KL), full distributions only for the exact losses.
        t0 = time.time()
        batch = collate(episodes, tokenizer.pad_token_id)
        need_full = args.student_loss == "full" or args.teacher_loss == "full"
        scores = score_teacher(teacher, batch, batch["loss_mask"], args.micro_batch_tokens, full=need_full)
        t_teacher = time.time() - t0

        # ALGO LOGIC: training. The rollout batch is split into --num-minibatches mini-batches, one optimizer
        # step each (as verl's PPO mini-batches): a tiny model needs many steps, and rollouts cost the most.
        # Each mini-batch's loss is the token mean over that mini-batch on all ranks; inside it, micro-batches
        # of at most --micro-batch-tokens accumulate gradients.
        t0 = time.time()
        n_local = int(batch["loss_mask"].sum())
        n_global = all_sum([n_local], device)[0]
        full_rows = None
        if need_full:  # map each trained position to its row of the teacher's full distributions
            full_rows = torch.full(batch["loss_mask"].shape, -1, dtype=torch.long)
            full_rows[batch["loss_mask"]] = torch.arange(n_local)
        stats_sum, grad_norms, skipped = {}, [], 0
        minibatches = [list(range(k, len(episodes), args.num_minibatches)) for k in range(args.num_minibatches)]
        for rows in minibatches:
            mb_tokens = all_sum([int(batch["loss_mask"][rows].sum())], device)[0]
            groups = [[rows[i] for i in g] for g in micro_batches([episodes[r] for r in rows], args.micro_batch_tokens)]
            n_max = torch.tensor([len(groups)], device=device)
            dist.all_reduce(n_max, op=dist.ReduceOp.MAX)  # every rank runs as many forward/backward passes
            n_max = int(n_max.item())
            optimizer.zero_grad(set_to_none=True)
            for j in range(n_max):
                student.set_requires_gradient_sync(j == n_max - 1)  # reduce gradients once, after the last
                idx = groups[j] if j < len(groups) else groups[0][:1]  # a rank with fewer micro-batches repeats
                weight = 1.0 if j < len(groups) else 0.0               # one row with zero weight, to stay in step
                L = max(len(episodes[i]) for i in idx)
                mb = {k: batch[k][idx, :L].to(device) for k in ("input_ids", "attention_mask", "loss_mask", "role")}
                mb["teacher_logp"] = scores.logp[idx, :L].to(device)
                if need_full:
                    mb["teacher_full"] = scores.full[full_rows[idx, :L][batch["loss_mask"][idx, :L]]].to(device)
                loss_sum, stats = guided_opd_loss(student, mb, args)
                # FSDP averages gradients over ranks: scale by world / tokens for the mini-batch's global token mean.
                (loss_sum * weight * world / max(mb_tokens, 1.0)).backward()
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v * weight
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if math.isfinite(grad_norm):
                optimizer.step()
                grad_norms.append(grad_norm)
            else:  # a non-finite loss or gradient: skip the step, keep the weights, log it
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
        grad_norm = sum(grad_norms) / max(len(grad_norms), 1)
        t_train = time.time() - t0

        # Logging: sums over every rank's episodes.
        keys = sorted(stats_sum)
        g = all_sum([len(episodes), sum(e.success for e in episodes), sum(e.score for e in episodes),
                     sum(e.turns for e in episodes), sum(e.invalid_turns for e in episodes),
                     sum(e.truncated for e in episodes), sum(sum(e.loss_mask) for e in episodes)]
                    + [stats_sum[k] for k in keys], device)
        tot = dict(zip(keys, g[7:]))
        if rank == 0:
            n_ep, turns = g[0], max(g[3], 1)
            writer.add_scalar("charts/success_rate", g[1] / n_ep, iteration + 1)
            writer.add_scalar("charts/score", g[2] / n_ep, iteration + 1)
            writer.add_scalar("charts/episode_turns", g[3] / n_ep, iteration + 1)
            writer.add_scalar("charts/invalid_action_rate", g[4] / turns, iteration + 1)
            writer.add_scalar("charts/truncated_rate", g[5] / n_ep, iteration + 1)
            writer.add_scalar("charts/tokens_per_second", g[6] / max(time.time() - t_iter, 1e-9), iteration + 1)
            writer.add_scalar("charts/learning_rate", lr, iteration + 1)
            writer.add_scalar("schedule/beta", beta, iteration + 1)
            writer.add_scalar("schedule/teacher_token_fraction", tot["teacher_tokens"] / max(n_global, 1), iteration + 1)
            writer.add_scalar("losses/reverse_kl", tot["reverse_kl"] / max(tot["student_tokens"], 1), iteration + 1)
            writer.add_scalar("losses/forward_kl", tot["forward_kl"] / max(tot["teacher_tokens"], 1), iteration + 1)
            writer.add_scalar("losses/pg_loss", tot["pg_loss"] / max(tot["student_tokens"], 1), iteration + 1)
            writer.add_scalar("losses/ce_loss", tot["ce_loss"] / max(tot["teacher_tokens"], 1), iteration + 1)
            writer.add_scalar("losses/loss", (tot["pg_loss"] + tot["ce_loss"]) / max(n_global, 1), iteration + 1)
            writer.add_scalar("losses/grad_norm", grad_norm, iteration + 1)
            writer.add_scalar("losses/skipped_steps", skipped, iteration + 1)
            writer.add_scalar("time/rollout", t_rollout, iteration + 1)
            writer.add_scalar("time/teacher", t_teacher, iteration + 1)
            writer.add_scalar("time/train", t_train, iteration + 1)
            print(f"iter {iteration:4d}  beta {beta:.2f}  success {g[1] / n_ep:.2f}  turns {g[3] / n_ep:5.1f}  "
                  f"rkl {tot['reverse_kl'] / max(tot['student_tokens'], 1):.3f}  "
                  f"loss {(tot['pg_loss'] + tot['ce_loss']) / max(n_global, 1):.4f}  grad {grad_norm:.2f}"
                  + (f"  ({skipped} non-finite steps skipped)" if skipped else ""), flush=True)

        done = iteration + 1
        if done % args.eval_interval == 0 or done == args.total_iterations:
            set_rollout_mode([student], True)
            ev, eval_eps = evaluate(student, tokenizer, args, eval_pool, rank, world, device, args.eval_episodes)
            set_rollout_mode([student], False)
            if rank == 0:
                for k, v in ev.items():
                    writer.add_scalar(f"eval/{k}", v, done)
                for ep in eval_eps[:2]:
                    writer.add_text("eval/trajectory", trajectory_text(tokenizer, ep), done)
                print(f"eval after {done} iterations: held-out success {ev['success_rate']:.2f}, "
                      f"score {ev['score']:.2f}, turns {ev['episode_turns']:.1f}", flush=True)
        if done % args.save_interval == 0 or done == args.total_iterations:
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), student, optimizer, done, run_name,
                            rng_state(role_rng, gen), rank)

    # Final save: the full student on rank 0 in Hugging Face format (AutoModelForCausalLM loads it).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        final_dir = os.path.join(run_dir, "final")
        student.save_pretrained(final_dir, state_dict=full_sd)
        tokenizer.save_pretrained(final_dir)
        writer.close()
        print(f"saved the student to {final_dir}")
    for env in pool + eval_pool:
        env.close()
    dist.destroy_process_group()
