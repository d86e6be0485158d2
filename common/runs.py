"""What every training script does around its method: the run's folder, logs, checkpoints and final save
(`Run`), held-out evaluation, decoded trajectories, and keeping FSDP's parameters gathered while a model
generates.

The scripts log to tensorboard under `runs/<run_name>` (mirrored to Weights and Biases with `--track`);
steps count completed iterations, and step 0 holds the evaluations before training.

Faults (docs/faults.md): an episode whose env raised is dropped from its batch and counted (`Run.drop_failed`,
`evaluate`); too many in one iteration, or SIGTERM / SIGINT, stop the run at an iteration boundary with a
checkpoint and the command that resumes it (`Run`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from common import checkpoint
from common.dist import all_max, all_sum, cleanup
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
    if args.eval_batch < 0 or args.rollout_chunk < 0:
        fail("--eval-batch and --rollout-chunk must be 0 (auto) or more")
    if args.temperature < 0 or args.eval_temperature < 0:
        fail("--temperature and --eval-temperature must be 0 (greedy) or more")
    if not 0 <= args.max_env_failures <= 1:
        fail("--max-env-failures is a fraction of an iteration's episodes, between 0 and 1")
    if args.resume:
        checkpoint.resolve(args.resume)  # a folder without a checkpoint fails here, in one line


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_name(env: str, exp_name: str, seed: int) -> str:
    return f"{env.replace(':', '_').replace('=', '-').replace(',', '_')}__{exp_name}__{seed}__{int(time.time())}"


def open_writer(args, run_dir: str, name: str, resumed_at: int | None):
    """Rank 0's tensorboard writer (with the hyperparameter table), and wandb mirroring with `args.track`.
    A resumed run drops whatever the interrupted run logged after its checkpoint (`purge_step`): from step 0
    when it resumes before the first iteration, as it logs the evaluations before training again."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(run_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=name, save_code=True, resume="allow", id=name)
    writer = SummaryWriter(run_dir, purge_step=resumed_at + (resumed_at > 0) if resumed_at is not None else None)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return writer


def log_scalars(writer, prefix: str, values: dict[str, float], step: int) -> None:
    for k, v in values.items():
        writer.add_scalar(f"{prefix}/{k}", v, step)


class Run:
    """A training run's bookkeeping, the same in every script: its name and folder, rank 0's tensorboard writer
    (None on the other ranks, where logging does nothing), held-out evaluation, resumable checkpoints and the
    final save. Made fresh, or from --resume's checkpoint with the student, optimizer and named generators
    restored in place; `start` is the first iteration to play, `extra` what the script keeps in its checkpoints
    ({} when fresh). Every rank makes it and calls `evaluate`, `drop_failed`, `save` and `finish` (collective).

    It also takes SIGTERM and SIGINT: the run stops at the next iteration boundary (after the iteration's rollout,
    abandoning the iteration, in `drop_failed`; else at its end, in `save`), every rank at the same one, with a
    checkpoint and the command that resumes it, and exits with 128 + the signal (143, 130); a second signal
    exits at once. Resumed, it ends as the run never stopped would have."""

    def __init__(self, args, label: str, student, tokenizer, optimizer, generators: dict, device, about: str, plan=None):
        self.args, self.student, self.tokenizer, self.optimizer, self.generators = args, student, tokenizer, optimizer, generators
        self.plan = plan  # the run's memory plan (common/memory.py): its peak is logged beside the measured one
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device
        self.start, self.name, self.extra = 0, run_name(label, args.exp_name, args.seed), {}
        if args.resume:
            self.start, self.name, self.extra = checkpoint.load(checkpoint.resolve(args.resume), student, optimizer, generators)
        self.dir = os.path.join(args.runs_dir, self.name)
        self.writer = open_writer(args, self.dir, self.name, self.start if args.resume else None) if self.rank == 0 else None
        if self.writer is not None:
            print(f"run {self.name}: {self.world} rank(s) on {device}, student {args.student}, {about}")
        # episodes dropped for a failed env: in the last iteration (every rank's) and in the whole run
        self.failures, self.failures_total = 0, int(self.extra.pop("env_failures_total", 0))
        self.boundary = checkpoint.rng_state(generators)  # the random states at the start of the next iteration
        self.stop_signal, self.stopping = 0, False  # the first SIGTERM or SIGINT received; its checkpoint written
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:  # the checkpoint is written and the run exits now (torchrun signals ranks as one exits)
            return
        if self.stop_signal:  # the second one: no waiting (the last checkpoint stays as it is)
            os.write(2, f"{signal.Signals(signum).name} again: exiting now\n".encode())
            os._exit(128 + signum)
        self.stop_signal = signum
        if self.rank == 0:  # os.write: print may be in the middle of a write of its own
            os.write(2, f"{signal.Signals(signum).name}: stopping at the next iteration boundary with a checkpoint "
                        "(send it again to exit at once)\n".encode())

    def evaluate(self, model, play, pool: list) -> tuple[dict[str, float], list[Episode]]:
        """`model` alone on held-out seeds 0..--eval-episodes-1 (`evaluate` below), its FSDP parameters gathered:
        `play(envs, seeds, sampler)`, with a sampler seeded from --seed and the rank (the same at every call)."""
        return self.evaluate_tasks(model, lambda envs, seeds, tasks, sampler: play(envs, seeds, sampler), {None: pool})[None]

    def evaluate_tasks(self, model, play, pools: dict) -> dict:
        """The same on several tasks in one batch (`evaluate_tasks` below): `play(envs, seeds, tasks, sampler)`;
        the rates and episodes by task."""
        sampler = torch.Generator(device=self.device).manual_seed(self.args.seed + 12345 + self.rank)
        with gathered(*self.gather(model)):
            return evaluate_tasks(lambda envs, seeds, tasks: play(envs, seeds, tasks, sampler), pools,
                                  self.args.eval_episodes, self.rank, self.world)

    def gather(self, student=None, *teachers) -> list:
        """The models a rollout gathers whole (`gathered`), by --rollout-gather: every one (`whole`), the student only
        (`student`), none (`layers`: FSDP gathers one layer at a time in each forward pass). `student` is the run's
        student or None; any other model counts as a teacher."""
        mode = getattr(self.args, "rollout_gather", "whole")
        models = [m for m in (student, *teachers) if m is not None]
        return [m for m in models if mode == "whole" or (mode == "student" and m is self.student)]

    def due(self, completed: int, interval: int) -> bool:
        """An evaluation or a checkpoint after `completed` iterations: every `interval`, and at the end."""
        return completed % interval == 0 or completed == self.args.total_iterations

    def log(self, step: int, scalars: dict[str, dict], line: str, shown=()) -> None:
        """Evaluations: each dict of `scalars` under its prefix (`eval`, `teacher`, `eval/<task>`), the decoded
        episodes `shown` ((tag, episode) pairs) and `line` on stdout."""
        if self.writer is not None:
            for prefix, values in scalars.items():
                log_scalars(self.writer, prefix, values, step)
            for tag, ep in shown:
                self.writer.add_text(tag, trajectory_text(self.tokenizer, ep), step)
            print(line, flush=True)

    def log_iteration(self, step: int, totals: dict, train: dict, lr: float, t_iter: float, times: tuple, losses: dict,
                      schedule: dict | None = None, charts: dict | None = None, words: str = "") -> None:
        """An iteration's record (`step` iterations completed): charts/* (the rates of `totals`, sums over every
        rank's episodes; the learning rate, `charts`, agent tokens per second since `t_iter`), losses/* (`losses`,
        the training step's mean gradient norm and skipped steps from `train`), schedule/*, time/* (seconds of
        rollout, teacher scoring, training); a line on stdout with the script's `words`."""
        if self.writer is None:
            return
        rates = episode_means(totals)
        log_scalars(self.writer, "charts", {**rates, "learning_rate": lr, **(charts or {}), "env_failures": self.failures,
                                            "env_failures_total": self.failures_total,
                                            "tokens_per_second": totals["agent_tokens"] / max(time.time() - t_iter, 1e-9)}, step)
        log_scalars(self.writer, "losses", {**losses, "grad_norm": train["grad_norm"], "skipped_steps": train["skipped_steps"]}, step)
        log_scalars(self.writer, "schedule", schedule or {}, step)
        log_scalars(self.writer, "time", dict(zip(("rollout", "teacher", "train"), times)), step)
        log_scalars(self.writer, "memory", self.memory(), step)
        print(f"iter {step - 1:4d}  success {rates['success_rate']:.2f}  turns {rates['episode_turns']:5.1f}  {words}  "
              f"loss {losses['loss']:.4f}  grad {train['grad_norm']:.2f}"
              + (f"  ({train['skipped_steps']} non-finite steps skipped)" if train["skipped_steps"] else "")
              + (f"  ({self.failures} env failures: episodes dropped)" if self.failures else ""), flush=True)

    def drop_failed(self, episodes: list[Episode], iteration: int, group: int = 1) -> list[Episode]:
        """The rollout's episodes without those whose env failed (`Episode.error`), each logged in one line; with
        `group`, without every group of `group` consecutive episodes that holds one (GRPO needs whole groups).
        Every rank calls it after its rollout (collective): they count every rank's failures (charts/env_failures)
        and agree to abandon the iteration, before it trains, when a signal came, or when more than
        --max-env-failures of its episodes failed or a rank has none left: a checkpoint of the iteration's start,
        then the run stops with the command that resumes it."""
        report_failures(episodes, f"iteration {iteration}", self.rank, self.world)
        bad = {i // group for i, ep in enumerate(episodes) if ep.error}
        kept = [ep for i, ep in enumerate(episodes) if i // group not in bad]
        n = all_sum({"failed": sum(bool(ep.error) for ep in episodes), "episodes": len(episodes), "empty": int(not kept)})
        sig = all_max(self.stop_signal)
        if sig:
            self._stop(iteration, f"{signal.Signals(sig).name}: stopped before training iteration {iteration}", 128 + sig)
        if n["empty"] or n["failed"] > self.args.max_env_failures * n["episodes"]:
            where = [None] * self.world
            dist.all_gather_object(where, [(ep.task, ep.error) for ep in episodes if ep.error])
            envs_ = sorted({task for w in where for task, _ in w})
            first = next((f"{task}: {error}" for w in where for task, error in w), "")
            self._stop(iteration, f"error: {n['failed']:.0f} of {n['episodes']:.0f} episodes failed in iteration {iteration}"
                       + (", a rank has none left" if n["empty"] else f", over --max-env-failures {self.args.max_env_failures}")
                       + f": env {', '.join(envs_)} (first: {first})", 1)
        self.failures = int(n["failed"])
        self.failures_total += self.failures
        return kept

    def save(self, completed: int, extra: dict | None = None) -> None:
        """At the end of every iteration (`completed` of them), with the script's `extra`: a resumable checkpoint
        every --save-interval iterations and at the end; and when a signal came, one before the run stops with the
        command that resumes it."""
        self.extra = self.extra if extra is None else extra
        sig = all_max(self.stop_signal) if completed < self.args.total_iterations else 0
        if sig:
            self._stop(completed, f"{signal.Signals(sig).name}: stopped after {completed} iterations", 128 + sig, boundary=False)
        if self.due(completed, self.args.save_interval):
            self._checkpoint(completed)
        self.boundary = checkpoint.rng_state(self.generators)

    def _checkpoint(self, completed: int, rngs: dict | None = None) -> str:
        path = os.path.join(self.dir, "checkpoint.pt")
        checkpoint.save(path, self.student, self.optimizer, completed, self.name, self.generators,
                        {**self.extra, "env_failures_total": self.failures_total}, rngs)
        return path

    def _stop(self, completed: int, why: str, code: int, boundary: bool = True):
        """Checkpoint after `completed` iterations (with the random states of that boundary: the abandoned
        iteration's rollout drew from them), say why and how to resume in one line, and exit with `code`."""
        path = self._checkpoint(completed, self.boundary if boundary else None)
        self.stopping = True
        if self.writer is not None:
            self.writer.close()
        cleanup()
        line = f"{why}; checkpoint {path}; resume with: {self.resume_command()}"
        if code == 1:
            raise SystemExit(line if self.rank == 0 else 1)
        if self.rank == 0:
            print(line, flush=True)
        raise SystemExit(code)

    def resume_command(self) -> str:
        """This run's command line with --resume <its folder>: plain python, or torchrun with as many ranks (one
        node: --standalone; more: add this run's rendezvous options)."""
        argv, skip = [], False
        for a in sys.argv[1:]:
            if not skip and a != "--resume" and not a.startswith("--resume="):
                argv.append(a)
            skip = a == "--resume"
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
        launcher = (["torchrun", "--standalone" if nodes == 1 else f"--nnodes={nodes}",
                     f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', self.world)}"]
                    if "TORCHELASTIC_RUN_ID" in os.environ else ["python"])
        return shlex.join(launcher + [sys.argv[0], *argv, "--resume", self.dir])

    def memory(self) -> dict[str, float]:
        """This rank's measured peak memory so far and the plan's, in GiB (memory/*)."""
        from common.memory import GiB, peak_bytes

        return {"peak_gib": peak_bytes(self.device) / GiB, **({"plan_gib": self.plan.peak / GiB} if self.plan else {})}

    def finish(self, envs_to_close) -> None:
        """The final save: the full student on rank 0 in Hugging Face format (AutoModelForCausalLM loads it);
        then each rank's peak memory against the plan (one line each), the envs closed and the process group left."""
        checkpoint.save_final(self.student, self.tokenizer, os.path.join(self.dir, "final"))
        mem = self.memory()
        if "plan_gib" in mem:
            print(f"rank {self.rank}: peak memory {mem['peak_gib']:.2f} GiB, plan {mem['plan_gib']:.2f} GiB", flush=True)
        if self.writer is not None:
            self.writer.close()
            print(f"saved the student to {os.path.join(self.dir, 'final')}")
        for env in envs_to_close:
            env.close()
        cleanup()


def minibatch_plan(keys: list, num_minibatches: int, rng: random.Random, together: bool = False) -> list[int]:
    """The mini-batch (0 .. num_minibatches - 1) of each slot g of an iteration's batch over every rank, keys[g]
    being what the slot belongs to (its domain, task or group). Every rank passes the same keys and a generator
    in the same state, so the split is the same however the slots are spread over ranks.
    - strata (`together` False): each key's slots, shuffled, are dealt in turn over the mini-batches, one deal
      running on over the keys: every mini-batch holds each key in its share of the batch (to one slot), and
      the mini-batches' sizes differ by one at most. One key for every slot: a shuffled split into equal parts.
    - groups (`together` True): the slots of a key stay in one mini-batch (a GRPO group); the keys, shuffled,
      are dealt in turn."""
    distinct = list(dict.fromkeys(keys))
    if together:
        rng.shuffle(distinct)
        where = {key: i % num_minibatches for i, key in enumerate(distinct)}
        return [where[key] for key in keys]
    plan, dealt = [0] * len(keys), 0
    for key in distinct:
        slots = [g for g, k in enumerate(keys) if k == key]
        rng.shuffle(slots)
        for g in slots:
            plan[g], dealt = dealt % num_minibatches, dealt + 1
    return plan


def eval_batch(args, world: int, real: int) -> int:
    """Held-out episodes a rank plays at once (its evaluation pool): --eval-batch, or (0, auto) all of its share
    of --eval-episodes for a tiny student, `real` for a real one. A tiny model's decoding step costs about the
    same for 16 rows as for 64 (per-call overheads), and a TextWorld-Express env is only a game object in the
    shared JVM, so one batch instead of four rounds made evaluation about 2x faster (331 -> 168 ms per iteration
    of guided_opd.py's profile, the shared JVM included); a real model's
    key/value caches take memory, so it plays `real` (the script's --num-envs share) at a time."""
    from common.models import is_tiny

    share = math.ceil(args.eval_episodes / world)
    return max(1, min(args.eval_batch or (share if is_tiny(args.student) else real), share))


def evaluate(play, pool: list, n_episodes: int, rank: int, world: int) -> tuple[dict[str, float], list[Episode]]:
    """`evaluate_tasks` with one task: `play(envs, seeds) -> episodes`; returns its rates and episodes."""
    return evaluate_tasks(lambda envs, seeds, tasks: play(envs, seeds), {None: pool}, n_episodes, rank, world)[None]


def evaluate_tasks(play, pools: dict, n_episodes: int, rank: int, world: int) -> dict:
    """Play held-out seeds 0..n_episodes-1 of every task of `pools` (its envs by task), the seeds split over ranks,
    `len(envs)` episodes of every task at a time, all tasks in the same batch: `play(envs, seeds, tasks) ->
    episodes` (one per env, in order). Returns, by task, the rates over every rank's episodes and this rank's
    episodes. Every rank plays as many rounds (FSDP: the same number of forward passes), a rank without seeds
    left plays an empty round. An episode whose env failed is dropped from both (logged in one line), and
    counted (`env_failures`, every rank's)."""
    seeds = list(range(rank, n_episodes, world))
    size = min(len(pool) for pool in pools.values())
    episodes = {task: [] for task in pools}
    for k in range(all_max(math.ceil(len(seeds) / size))):
        chunk = seeds[k * size:(k + 1) * size]
        played = iter(play([env for pool in pools.values() for env in pool[:len(chunk)]], chunk * len(pools),
                           [task for task in pools for _ in chunk]))
        for task in pools:
            episodes[task] += [next(played) for _ in chunk]
    sums = {}
    for i, (task, eps) in enumerate(episodes.items()):
        report_failures(eps, "evaluation", rank, world)
        kept = [ep for ep in eps if not ep.error]
        sums.update({f"{i}/{k}": v for k, v in {**episode_sums(kept), "env_failures": len(eps) - len(kept)}.items()})
        episodes[task] = kept
    sums = all_sum(sums)
    out = {}
    for i, task in enumerate(pools):
        mine = {k[len(f"{i}/"):]: v for k, v in sums.items() if k.startswith(f"{i}/")}
        out[task] = ({**episode_means(mine), "env_failures": mine["env_failures"]}, episodes[task])
    return out


def report_failures(episodes: list[Episode], where: str, rank: int, world: int) -> None:
    """One line on stdout for each episode whose env failed: where, the env (the episode's task) and the error."""
    for ep in episodes:
        if ep.error:
            print(f"{f'rank {rank}: ' if world > 1 else ''}{where}: dropped episode {ep.seed} of {ep.task}, its env "
                  f"failed: {ep.error}", flush=True)


def trajectory_text(tokenizer, ep: Episode) -> str:
    """A decoded episode for tensorboard: who wrote each turn, and what the env said."""
    body = tokenizer.decode(ep.ids, skip_special_tokens=False)
    return f"seed {ep.seed}, success {ep.success}, turns {ep.turns}\n\n```\n{body}\n```"


@contextlib.contextmanager
def gathered(*models):
    """Generation without FSDP's per-call cost. Every FSDP unit's parameters are gathered once on entry (a
    collective: every rank enters together), and FSDP's forward hooks are taken off the units until the exit,
    so each of the many small forward passes of generation is the plain module's, on the gathered weights; on
    exit the hooks go back, in their order, and the parameters are freed (the root of a trainable model gathers
    them again at its next forward, as `fully_shard` set it up). The numbers are those of hooked passes: the
    hooks only gather, free and cast floating-point inputs, and generation's inputs are integers and caches.
    Gathering once instead of per token is about 2x faster here, and dropping the hooks saves another 10-20% of
    a decoding step of the tiny student (docs/performance.md). No gradients inside: nothing would
    reduce them, so the block runs under `torch.no_grad()`."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units = [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]
    saved = []
    try:
        for m in units:
            m.unshard()
            state = fully_shard.state(m)
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                saved.append((hooks, hooks.copy()))
                for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is state]:
                    del hooks[key]
        with torch.no_grad():
            yield
    finally:
        for hooks, before in saved:
            hooks.clear()
            hooks.update(before)
        for m in units:
            m.reshard()
