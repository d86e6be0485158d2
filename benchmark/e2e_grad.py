"""The sampled reverse KL's gradient on real rollout batches, end to end, against the exact loss's.

benchmark/grad_check.py compares the estimators at fixed states. This follows the training path instead: the student
plays a batch of episodes at temperature 1 (guided_opd.rollout at beta 0, K = 1 sampled token per position as in
training), the batch is collated, the teacher scores it (common/teacher.py), and guided_opd_loss gives the gradient of
the sampled form (`--student-loss sampled`) and of the exact one (`--student-loss full`) on the same batch, each a
mean over the batch's student tokens. Over many batches the sampled gradients' mean must tend to the exact gradients'
mean (a bug anywhere on that path, such as teacher log-probs one position off, would stop it); a single batch's
sampled gradient shows the noise a training step sees. Adam divides each coordinate by its own scale, so the table
also gives how often the two gradients agree in sign, coordinate by coordinate (as cos(sign, sign): 0 = chance).
Then the tokens that carry the largest pushes: the advantage log pi_t - log pi_s of each sampled student token.

    python benchmark/e2e_grad.py                                   # the shipped student on simonsays, 64 batches
    python benchmark/e2e_grad.py --student runs/<run>/final        # a student after some training
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import envs  # noqa: E402
import guided_opd  # noqa: E402
from common.episode import collate  # noqa: E402
from common.models import fill_defaults, load_model  # noqa: E402
from common.teacher import score_teacher  # noqa: E402


@dataclass
class Args:
    student: str = "tiny"
    """the student (a tiny name, or a run's final folder)"""
    teacher: str = "tiny-expert:simonsays"
    """the teacher that scores the student's tokens"""
    env: str = "twx:simonsays"
    """the environment the student plays"""
    batches: int = 64
    """rollout batches (each of guided_opd.py's --num-envs episodes of its tiny default)"""
    seed: int = 0
    """seed of the samples (the batches play train seeds 0, 1, 2, ...)"""
    top: int = 10
    """student tokens with the most negative advantages to print"""


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def measure(student, teacher, tokenizer, env: str, batches: int, seed: int, report=print) -> dict:
    """Play `batches` rollout batches and compare the sampled and exact gradients (see the module docstring).
    Returns the cosines after all batches and the per-token advantages [(A, log pi_s, log pi_t, token, context)]."""
    args = guided_opd.Args(student="tiny", env=env, beta_start=0.0, student_loss="sampled", teacher_loss="ce")
    fill_defaults(args, guided_opd.TINY, guided_opd.REAL)
    pool = [envs.make(env, seed=seed, split="train") for _ in range(args.num_envs)]
    params = [p for p in student.parameters() if p.requires_grad]
    sums = {"sampled": 0.0, "full": 0.0}
    per_batch, signs, advantages, successes = [], [], [], 0
    cos = torch.nn.functional.cosine_similarity
    gen, t0 = torch.Generator().manual_seed(seed), time.time()
    try:
        for b in range(batches):
            with torch.no_grad():
                episodes = guided_opd.rollout(student, None, tokenizer, pool, [b * args.num_envs + j for j in range(args.num_envs)],
                                              0.0, args, gen, 1.0, args.max_turns)
            successes += sum(e.success for e in episodes)
            batch = collate(episodes, tokenizer.pad_token_id)
            scores = score_teacher(teacher, batch, batch["loss_mask"], full=True)
            mb = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "role")}
            mb.update(teacher_logp=scores.logp, teacher_full=scores.full)
            grads = {}
            for form in ("sampled", "full"):
                student.zero_grad(set_to_none=True)
                pg_sum, _, stats = guided_opd.guided_opd_loss(student, mb, guided_opd.Args(**{**vars(args), "student_loss": form}))
                (pg_sum / max(stats["student_tokens"], 1)).backward()
                grads[form] = flat_grad(params)
                sums[form] = sums[form] + grads[form]
            per_batch.append(cos(grads["sampled"], grads["full"], 0).item())
            signs.append(cos(grads["sampled"].sign(), grads["full"].sign(), 0).item())
            with torch.no_grad():  # each sampled student token's advantage, for the largest pushes
                logp_s = score_teacher(student, batch, batch["loss_mask"]).logp
                for i, j in batch["loss_mask"].nonzero().tolist():
                    a = (scores.logp[i, j] - logp_s[i, j]).item()
                    advantages.append((a, logp_s[i, j].item(), scores.logp[i, j].item(), batch["input_ids"][i, j].item(),
                                       batch["input_ids"][i, max(0, j - 6):j].tolist()))
            n = b + 1
            if n & (n - 1) == 0 or n == batches:  # 1, 2, 4, ... and the last
                report(f"| {n} | {cos(sums['sampled'], sums['full'], 0).item():.3f} | "
                       f"{(sums['sampled'].norm() / sums['full'].norm()).item():.2f} | {sum(per_batch) / n:.3f} | "
                       f"{sum(signs) / n:.3f} | {time.time() - t0:.0f} s |")
    finally:
        for e in pool:
            e.close()
        student.zero_grad(set_to_none=True)
    return {"mean_cos": cos(sums["sampled"], sums["full"], 0).item(), "batch_cos": sum(per_batch) / batches,
            "sign_cos": sum(signs) / batches, "advantages": advantages, "success": successes / (batches * args.num_envs)}


def main(args: Args) -> None:
    student, tokenizer = load_model(args.student, trainable=True)
    teacher, _ = load_model(args.teacher)
    print(f"student {args.student}, teacher {args.teacher}, env {args.env}: the sampled reverse KL's gradient of real "
          f"rollout batches against the exact loss's on the same batches\n")
    print("| batches | cos(mean sampled, mean exact) | norm ratio | one batch's cos, mean | one batch's sign agreement, "
          "mean | time |\n|---|---|---|---|---|---|")
    out = measure(student, teacher, tokenizer, args.env, args.batches, args.seed)
    adv = out["advantages"]
    big = [a for a, *_ in adv if a < -5]
    total = sum(abs(a) for a, *_ in adv)
    print(f"\n{len(adv)} sampled student tokens, success of the sampled episodes {out['success']:.2f}; advantage "
          f"log pi_t - log pi_s: mean {sum(a for a, *_ in adv) / len(adv):.2f}; {len(big) / len(adv):.1%} of the tokens "
          f"below -5 carry {-sum(big) / total:.0%} of the sum of |advantage|")
    print(f"\nThe {args.top} most negative advantages (the largest pushes down):\n\n| advantage | log pi_s | log pi_t | token | "
          "after |\n|---|---|---|---|---|")
    for a, ls, lt, token, context in sorted(adv)[:args.top]:
        print(f"| {a:.2f} | {ls:.2f} | {lt:.2f} | `{tokenizer.decode([token])!r}` | `{tokenizer.decode(context)!r}` |")


if __name__ == "__main__":
    main(tyro.cli(Args))
