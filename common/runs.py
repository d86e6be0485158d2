"""What every training script does around its method: the run's folder and logs, held-out evaluation,
decoded trajectories, and keeping FSDP's parameters gathered while a model generates.

The scripts log to tensorboard under `runs/<run_name>` (mirrored to Weights and Biases with `--track`);
steps count completed iterations, and step 0 holds the evaluations before training.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch

from common.dist import all_max, all_sum
from common.episode import Episode, episode_means, episode_sums


def check_rollout_args(args) -> None:
    """One-line errors for bad values of the arguments every script shares (rollouts, batches, evaluation),
    before anything is loaded."""
    def fail(msg):
        raise SystemExit(f"error: {msg}")

    if args.num_envs < 1 or args.total_iterations < 1:
        fail("--num-envs and --total-iterations must be at least 1")
    if not 1 <= args.num_minibatches <= args.num_envs:
        fail(f"--num-minibatches must be between 1 and --num-envs ({args.num_envs})")
    if args.max_new_tokens < 1 or args.max_new_tokens >= args.max_seq_len:
        fail(f"--max-new-tokens must be at least 1 and below --max-seq-len ({args.max_seq_len})")
    if args.max_turns < 0 or args.micro_batch_tokens < 1 or args.eval_episodes < 1:
        fail("--max-turns must be 0 (the env's default) or more; --micro-batch-tokens and --eval-episodes at least 1")
    if args.temperature < 0 or args.eval_temperature < 0:
        fail("--temperature and --eval-temperature must be 0 (greedy) or more")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(env: str, exp_name: str, seed: int) -> str:
    return f"{env.replace(':', '_').replace('=', '-').replace(',', '_')}__{exp_name}__{seed}__{int(time.time())}"


def open_writer(args, run_dir: str, name: str, resumed_at: int | None):
    """Rank 0's tensorboard writer (with the hyperparameter table), and wandb mirroring with `args.track`.
    A resumed run drops whatever the interrupted run logged after its checkpoint (`purge_step`)."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=name, save_code=True, resume="allow", id=name)
    writer = SummaryWriter(run_dir, purge_step=resumed_at + 1 if resumed_at is not None else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def log_scalars(writer, prefix: str, values: dict[str, float], step: int) -> None:
    for k, v in values.items():
        writer.add_scalar(f"{prefix}/{k}", v, step)


def evaluate(play, pool: list, n_episodes: int, rank: int, world: int) -> tuple[dict[str, float], list[Episode]]:
    """Play held-out seeds 0..n_episodes-1, split over ranks, `len(pool)` episodes at a time, with
    `play(envs, seeds) -> episodes`; returns the rates over every rank's episodes and this rank's episodes.
    Every rank plays as many rounds (FSDP: the same number of forward passes), a rank without seeds left
    plays an empty round."""
    seeds = list(range(rank, n_episodes, world))
    episodes = []
    for k in range(all_max(math.ceil(len(seeds) / len(pool)))):
        chunk = seeds[k * len(pool):(k + 1) * len(pool)]
        episodes += play(pool[:len(chunk)], chunk)
    return episode_means(all_sum(episode_sums(episodes))), episodes


def trajectory_text(tokenizer, ep: Episode) -> str:
    """A decoded episode for tensorboard: who wrote each turn, and what the env said."""
    body = tokenizer.decode(ep.ids, skip_special_tokens=False)
    return f"seed {ep.seed}, success {ep.success}, turns {ep.turns}\n\n```\n{body}\n```"


@contextlib.contextmanager
def gathered(*models):
    """Keep every FSDP unit's parameters gathered between the many small forward passes of generation
    (about 2x faster here than gathering them again for each token), and free them afterwards. Then each
    unit reshards after its forward again, except the root of a trainable model, which keeps its
    parameters (embeddings, LM head) from forward to backward, as `fully_shard` set it up."""
    from torch.distributed.fsdp import FSDPModule

    units = [(m, m is model and any(p.requires_grad for p in model.parameters()))
             for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]
    for m, _ in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m, trainable_root in units:
            m.set_reshard_after_forward(not trainable_root, recurse=False)
            m.reshard()
