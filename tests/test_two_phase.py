"""two_phase.py: the losses against their definitions, the phase switch, the balanced off-policy batches,
routing of each episode to its own task's expert, the training step in-process under FSDP2, and end-to-end
runs in a subprocess (single process, torchrun with 2 ranks, interrupted in either phase and resumed, bad
input), the memory plan (--plan) and a Qwen3-shaped run with every memory saving on.

The end-to-end runs use the smoke recipe's models: experts that write valid, mostly wrong actions (a wrong
action ends a simonsays game), so episodes end at different turns and ranks get uneven work; the smoke
experts solve few episodes, hence --no-success-only."""

from __future__ import annotations

import glob
import os
import random
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import two_phase as tp
from common.episode import STUDENT, TEACHER, Episode, collate
from common.runs import minibatch_plan
from common.teacher import Teachers, score_teacher

from end_to_end import assert_same_run, final_weights, kill_after_first_checkpoint, run_script, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, torchrun=0, timeout=600, check=True):
    """two_phase.py in a subprocess (see end_to_end.run_script)."""
    return run_script("two_phase.py", args, tmp_path, torchrun, timeout, check)


TWO_TASKS = ["--tasks", "twx:simonsays", "twx:coin:numLocations=4,includeDoors=0"]
SMOKE = ["--num-envs", "4", "--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4", "--max-new-tokens", "8",
         "--expert-episodes", "6", "--no-success-only", "--eval-interval", "2", "--save-interval", "2"]


# ---------------------------------------------------------------------------------------------- losses
def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return Qwen3ForCausalLM(cfg)


def micro_batch(role, vocab=50, T=12, teacher=None):
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(role))
    loss_mask = torch.zeros(2, T, dtype=torch.bool)
    loss_mask[0, 5:9] = loss_mask[1, 3:11] = True
    mb = {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long), "loss_mask": loss_mask,
          "role": torch.where(loss_mask, role, 0)}
    if teacher is None:
        return {**mb, "teacher_logp": torch.log(torch.rand(2, T))}
    s = score_teacher(teacher, mb, loss_mask, full=True)
    return {**mb, "teacher_logp": s.logp, "teacher_full": s.full}


def log_softmax_rows(model, ids):
    return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def test_phase1_loss_is_cross_entropy_on_the_experts_tokens():
    model, mb = tiny_model(), micro_batch(TEACHER)
    pg_sum, ce_sum, stats = tp.two_phase_loss(model, mb, tp.Args(student_loss="sampled", teacher_loss="ce"))
    logits = model(input_ids=mb["input_ids"]).logits[:, :-1]
    target, mask = mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
    assert torch.allclose(ce_sum, ce, atol=1e-4) and pg_sum.item() == 0
    assert stats["student_tokens"] == 0 and stats["teacher_tokens"] == 12


def test_phase1_full_forward_kl_is_its_definition_and_zero_at_the_expert():
    student, expert = tiny_model(seed=0), tiny_model(seed=1).eval()
    mb = micro_batch(TEACHER, teacher=expert)
    _, fkl, _ = tp.two_phase_loss(student, mb, tp.Args(teacher_loss="full"))
    ls, lt = log_softmax_rows(student, mb["input_ids"]), log_softmax_rows(expert, mb["input_ids"])
    ref = sum((lt[b, t - 1].exp() * (lt[b, t - 1] - ls[b, t - 1])).sum() for b, t in mb["loss_mask"].nonzero().tolist())
    assert fkl > 0.01 and torch.allclose(fkl, ref, atol=1e-5)
    _, same, _ = tp.two_phase_loss(expert, mb, tp.Args(teacher_loss="full"))  # student = expert
    assert abs(same.item()) < 1e-5


def test_phase2_losses_are_the_reverse_kl():
    student, expert = tiny_model(seed=0), tiny_model(seed=1).eval()
    mb = micro_batch(STUDENT, teacher=expert)
    ls, lt = log_softmax_rows(student, mb["input_ids"]), log_softmax_rows(expert, mb["input_ids"])
    rows = mb["loss_mask"].nonzero().tolist()
    # sampled: -stopgrad(log pi_T - log pi_s) log pi_s at the sampled tokens
    pg, ce, stats = tp.two_phase_loss(student, mb, tp.Args(student_loss="sampled"))
    lp = [ls[b, t - 1, mb["input_ids"][b, t]] for b, t in rows]
    ref = sum(-(mb["teacher_logp"][b, t] - x).detach() * x for (b, t), x in zip(rows, lp))
    assert torch.allclose(pg, ref, atol=1e-4) and ce.item() == 0
    assert stats["reverse_kl"] == pytest.approx(sum((x - mb["teacher_logp"][b, t]).item() for (b, t), x in zip(rows, lp)), abs=1e-3)
    # full: sum_v pi_s (log pi_s - log pi_T)
    pg_full, _, _ = tp.two_phase_loss(student, mb, tp.Args(student_loss="full"))
    ref_full = sum((ls[b, t - 1].exp() * (ls[b, t - 1] - lt[b, t - 1])).sum() for b, t in rows)
    assert pg_full > 0.01 and torch.allclose(pg_full, ref_full, atol=1e-5)


def test_sampled_estimate_has_the_full_reverse_kl_gradient():
    torch.manual_seed(0)
    theta = torch.randn(11, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(11), -1)
    logp_s = torch.log_softmax(theta, -1)
    expected = sum(logp_s[y].exp().detach() * tp.sampled_reverse_kl(logp_s[y], teacher[y]) for y in range(11))
    (grad_sampled,) = torch.autograd.grad(expected, theta)
    (grad_full,) = torch.autograd.grad(tp.full_reverse_kl(torch.log_softmax(theta, -1), teacher), theta)
    assert torch.allclose(grad_sampled, grad_full, atol=1e-6)


def test_ratio_clip_changes_the_gradient_only_where_the_ratio_leaves_the_range():
    """--ratio-clip: phase 2's sampled loss weighs each token by r = pi_s / pi_old (the rollout student, `old_logp`),
    clipped to [1 - eps, 1 + eps] as PPO. At r = 1 it has the plain form's gradient; with every ratio inside the range
    the unclipped ratio's (a huge eps); with ratios outside it, the clip changes the gradient."""
    student, mb = tiny_model(), micro_batch(STUDENT)
    logp = score_teacher(student, mb, mb["loss_mask"]).logp  # the rollout-time student = the current one: r = 1
    mb["teacher_logp"] = logp + 1.0 - 2.0 * (torch.arange(logp.shape[1]) % 2)  # advantages +-1: both sides clip

    def grad(eps, shift=None):  # gradient of the student-token loss, rollout log-probs logp - shift
        batch = mb if shift is None else {**mb, "old_logp": logp - shift * mb["loss_mask"]}
        pg, _, stats = tp.two_phase_loss(student, batch, tp.Args(student_loss="sampled", ratio_clip=eps))
        assert pg.item() != 0 and (shift is None) == ("clipped" not in stats)
        return torch.cat([g.flatten() for g in torch.autograd.grad(pg, list(student.parameters()))])

    plain = grad(0.0)
    assert torch.allclose(grad(0.2, 0.0), plain, atol=1e-6)
    for shift in (0.1, -0.1):  # r = e^0.1 or e^-0.1: inside [0.8, 1.2]
        assert torch.allclose(grad(0.2, shift), grad(1e9, shift), atol=1e-6)
        assert not torch.allclose(grad(0.2, shift), plain, atol=1e-4)  # the ratio is in the gradient
    for shift in (0.5, -0.5):  # r = 1.65 or 0.61: outside
        assert not torch.allclose(grad(0.2, shift), grad(1e9, shift), atol=1e-4)


# -------------------------------------------------------------------------------- schedule and batches
def test_phase_switch():
    a = tp.Args(phase1_iterations=3, phase2_iterations=2)
    assert [tp.phase_at(i, a) for i in range(5)] == [1, 1, 1, 2, 2] and a.total_iterations == 5
    assert [tp.phase_at(i, tp.Args(phase1_iterations=0, phase2_iterations=2)) for i in range(2)] == [2, 2]
    assert [tp.phase_at(i, tp.Args(phase1_iterations=2, phase2_iterations=0)) for i in range(2)] == [1, 1]


def test_each_phase_has_its_learning_rate_and_the_schedule_spans_both():
    a = tp.Args(phase1_iterations=2, phase2_iterations=2, learning_rate=2e-3, phase2_learning_rate=5e-4)
    assert [tp.lr_at(i, a) for i in range(4)] == pytest.approx([2e-3, 2e-3, 5e-4, 5e-4])
    a.lr_schedule = "linear"  # decays over the whole run: phase 2 starts halfway down
    assert [tp.lr_at(i, a) for i in range(4)] == pytest.approx([2e-3, 1.5e-3, 2.5e-4, 1.25e-4])


def fake_data(tasks, sizes):
    return {t: [Episode(ids=[], loss_mask=[], turn_id=[], role=[], task=t, seed=s) for s in range(n)]
            for t, n in zip(tasks, sizes)}


def test_expert_batches_are_balanced_cover_each_epoch_and_do_not_depend_on_ranks():
    tasks = ("a:x", "a:y", "a:z")
    data = fake_data(tasks, [5, 7, 4])
    one = tp.Args(tasks=tasks, num_envs=6)
    two = tp.Args(tasks=tasks, num_envs=3)
    picks = []
    for it in range(10):
        batch = tp.expert_batch(data, it, one, 0, 1)
        assert Counter(ep.task for ep in batch) == {t: 2 for t in tasks}  # balanced
        assert batch == tp.expert_batch(data, it, two, 0, 2) + tp.expert_batch(data, it, two, 1, 2)  # rank split
        picks += batch
    for t, n in zip(tasks, [5, 7, 4]):  # 20 picks per task: every episode once per pass over the task's data
        seeds = [ep.seed for ep in picks if ep.task == t]
        for e in range(len(seeds) // n):
            assert sorted(seeds[e * n:(e + 1) * n]) == list(range(n))
    assert [ep.seed for ep in picks[:12]] != [ep.seed for ep in sorted(picks[:12], key=lambda ep: ep.seed)]  # shuffled


@pytest.mark.parametrize("num_envs,world", [(4, 1), (2, 2), (5, 1), (7, 1)])
def test_expert_batches_of_a_size_that_is_no_multiple_of_the_tasks_neither_repeat_nor_skip(num_envs, world):
    """With a batch of B slots not a multiple of the task count, slot k still plays task k mod #tasks (the first
    B mod #tasks tasks get one episode more per batch), and each task's picks go through its data in order:
    every episode once per pass, none repeated or skipped, whatever the split over ranks."""
    tasks = ("a:x", "a:y", "a:z")
    sizes = [5, 7, 4]
    data = fake_data(tasks, sizes)
    args = tp.Args(tasks=tasks, num_envs=num_envs)
    picks = [ep for it in range(12) for rank in range(world) for ep in tp.expert_batch(data, it, args, rank, world)]
    for t, n in zip(tasks, sizes):
        seeds = [ep.seed for ep in picks if ep.task == t]
        assert len(seeds) >= n
        for e in range(len(seeds) // n):
            assert sorted(seeds[e * n:(e + 1) * n]) == list(range(n)), (t, seeds)


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one in this process (FSDP2 needs one), without touching os.environ."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_rollouts_are_routed_to_their_tasks_expert(process_group):
    """Student rollouts over two tasks (slots alternate): each episode plays and remembers its slot's task, and
    the experts' scores of each row are those of that task's expert alone."""
    import envs
    from common.models import load_model

    student, tok = load_model("tiny")
    experts = {t: load_model(f"tiny-expert:{tp.task_label(t)}")[0] for t in ("twx:simonsays", "twx:coin:numLocations=4,includeDoors=0")}
    args = tp.Args(tasks=tuple(experts), num_envs=4, max_turns=3, max_new_tokens=8, max_seq_len=2048)
    tasks = [tp.task_of_slot(j, args) for j in range(4)]
    pool = [envs.make(t, seed=1) for t in tasks]
    episodes = tp.rollout(student, tok, pool, tasks, [0, 1, 2, 3], STUDENT, args, torch.Generator().manual_seed(0), 1.0, 3)
    assert [ep.task for ep in episodes] == tasks == [args.tasks[0], args.tasks[1]] * 2
    batch = collate(episodes, tok.pad_token_id)
    routed = tp.score_by_task(Teachers(experts), batch, episodes, full=True)
    for i, ep in enumerate(episodes):
        own = score_teacher(experts[ep.task], {k: batch[k][i:i + 1] for k in batch}, batch["loss_mask"][i:i + 1])
        other = score_teacher(experts[tasks[1 - i % 2]], {k: batch[k][i:i + 1] for k in batch}, batch["loss_mask"][i:i + 1])
        assert torch.allclose(routed.logp[i], own.logp[0], atol=1e-5) and routed.logp[i].abs().sum() > 0
        assert not torch.allclose(routed.logp[i], other.logp[0], atol=1e-3)
    for env in pool:
        env.close()


def synthetic_episodes(role, V=50, n=6):
    rng = torch.Generator().manual_seed(0)
    episodes = []
    for i in range(n):
        ep = Episode(ids=[], loss_mask=[], turn_id=[], role=[])
        for turn in range(1 + i % 3):
            obs = torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=rng)),), generator=rng).tolist()
            reply = torch.randint(1, V, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng).tolist()
            ep.ids += obs + reply
            ep.loss_mask += [0] * len(obs) + [1] * len(reply)
            ep.turn_id += [-1] * len(obs) + [turn] * len(reply)
            ep.role += [0] * len(obs) + [role] * len(reply)
        episodes.append(ep)
    return episodes


def run_train_step(args, episodes, V=50):
    student = tp.shard(tiny_model(V, seed=2), torch.device("cpu"), trainable=True)
    teacher = tiny_model(V, seed=3).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = collate(episodes, 0)
    scores = score_teacher(teacher, batch, batch["loss_mask"], full=True)
    old = score_teacher(student, batch, batch["loss_mask"]).logp if args.ratio_clip else None
    for j, ep in enumerate(episodes):
        ep.slot = j
    plan = minibatch_plan([0] * len(episodes), args.num_minibatches, random.Random(0))
    stats = tp.train_step(student, optimizer, episodes, batch, scores, old, plan, args, 1, torch.device("cpu"))
    grads = {n: p.grad.full_tensor().clone() for n, p in student.named_parameters()}
    return stats, grads


@pytest.mark.parametrize("role,losses", [(TEACHER, ("full", "full")), (TEACHER, ("sampled", "ce")),
                                         (STUDENT, ("full", "full")), (STUDENT, ("sampled", "ce"))])
def test_gradient_accumulation_equals_the_token_mean_of_one_micro_batch(process_group, role, losses):
    episodes = synthetic_episodes(role)
    kw = dict(student_loss=losses[0], teacher_loss=losses[1], num_minibatches=1, max_grad_norm=1e9)
    one, g_one = run_train_step(tp.Args(micro_batch_tokens=10**6, **kw), episodes)
    many, g_many = run_train_step(tp.Args(micro_batch_tokens=20, **kw), episodes)
    assert one["grad_norm"] > 0 and one["grad_norm"] == pytest.approx(many["grad_norm"], rel=1e-5)
    # the gradient of the mini-batch's token mean, written out by hand
    ref = tiny_model(50, seed=2)
    batch = collate(episodes, 0)
    scores = score_teacher(tiny_model(50, seed=3).eval(), batch, batch["loss_mask"], full=True)
    pg, ce, stats = tp.two_phase_loss(ref, {**batch, "teacher_logp": scores.logp, "teacher_full": scores.full},
                                      tp.Args(student_loss=losses[0], teacher_loss=losses[1]))
    ((pg + ce) / (stats["student_tokens"] + stats["teacher_tokens"])).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g_many[n], p.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(g_one[n], p.grad, atol=1e-6, rtol=1e-4)


def test_ratio_clip_reaches_every_micro_batch(process_group):
    """--ratio-clip: the rollout student's log-probs reach each micro-batch's loss (its clip count comes back); at
    ratio 1 (one optimizer step, taken before the weights move) the gradient is the plain estimator's."""
    kw = dict(student_loss="sampled", teacher_loss="ce", num_minibatches=1, max_grad_norm=1e9, micro_batch_tokens=20)
    clipped, g_clipped = run_train_step(tp.Args(ratio_clip=0.2, **kw), synthetic_episodes(STUDENT))
    plain, g_plain = run_train_step(tp.Args(**kw), synthetic_episodes(STUDENT))
    assert clipped["clipped"] == 0 and "clipped" not in plain and clipped["grad_norm"] > 0
    for n in g_plain:
        torch.testing.assert_close(g_clipped[n], g_plain[n], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_run_trains_both_phases_and_saves_a_loadable_model(tmp_path):
    from common.models import load_model

    run(SMOKE + ["--phase1-iterations", "2", "--phase2-iterations", "2"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert scalars(run_dir, "schedule/phase") == {1: 1, 2: 1, 3: 2, 4: 2}  # the switch after 2 iterations
    assert set(scalars(run_dir, "losses/forward_kl")) == {1, 2} and set(scalars(run_dir, "losses/reverse_kl")) == {3, 4}
    for game in ("simonsays", "peckingorder", "coin"):
        assert set(scalars(run_dir, f"eval/{game}/success_rate")) == {0, 2, 4}
        assert set(scalars(run_dir, f"teacher/{game}/success_rate")) == {0}
    for tag in ("eval/success_rate", "eval/min_success_rate", "charts/success_rate", "time/rollout"):
        assert scalars(run_dir, tag), tag
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    final = final_weights(run_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["extra"] == {"phase": 2, "phase1_iterations": 2, "env_failures_total": 0}  # the last: Run's (faults)
    initial = load_model("tiny")[0].state_dict()
    assert all(torch.equal(final[k], ckpt["model"][k]) for k in ckpt["model"])
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_torchrun_two_ranks_gives_the_single_process_run(tmp_path):
    """The same global batch (8 episodes over two tasks, greedy experts and student) as 1 rank x 8 envs and
    2 ranks x 4: the same losses and gradient norms in both phases, with episodes that end at different turns
    and several micro-batches per mini-batch. The student starts as the smoke simonsays expert and learns slowly
    (it writes valid actions, so its simonsays games end early; the smoke student's invalid replies never do)."""
    common = SMOKE + TWO_TASKS + ["--phase1-iterations", "2", "--phase2-iterations", "2", "--temperature", "0",
                                  "--student", "tiny-expert:simonsays", "--learning-rate", "1e-4",
                                  "--expert-temperature", "0", "--max-turns", "5", "--micro-batch-tokens", "400",
                                  "--eval-episodes", "4", "--eval-interval", "4", "--save-interval", "4"]
    run(common + ["--num-envs", "8", "--runs-dir", "one"], tmp_path)
    run(common + ["--num-envs", "4", "--runs-dir", "two"], tmp_path, torchrun=2)
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "two" / "*"))
    assert_same_run(one, two, ["losses/loss", "losses/forward_kl", "losses/reverse_kl", "losses/grad_norm",
                               "charts/episode_turns", "eval/success_rate", "schedule/phase"])
    turns = scalars(one, "charts/episode_turns")  # not degenerate: episodes end at different turns in both phases
    assert 1 < turns[1] < 5 and 1 < turns[2] < 5 and min(turns[3], turns[4]) < 5, turns
    assert all(v > 0 for v in scalars(two, "losses/grad_norm").values())  # the gradients reached the weights
    w1, w2 = final_weights(one), final_weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-5) for k in w1)


def test_phase2_on_the_experts_data_is_off_policy_distillation_with_phase2s_rate(tmp_path):
    """--phase2-data experts (the control of the default's learning-rate drop): phase 2 takes phase 1's batches and
    loss, so at phase 1's rate it is off-policy distillation alone, step for step and weight for weight; at
    another rate only the rate differs (a phase 2 that played the student would log a reverse KL)."""
    common = SMOKE + TWO_TASKS + ["--num-envs", "4", "--expert-episodes", "6", "--expert-temperature", "0",
                                  "--eval-interval", "4", "--eval-episodes", "2", "--save-interval", "4"]
    run(common + ["--phase1-iterations", "4", "--phase2-iterations", "0", "--runs-dir", "off"], tmp_path)
    run(common + ["--phase1-iterations", "2", "--phase2-iterations", "2", "--phase2-data", "experts",
                  "--phase2-learning-rate", "2e-3", "--runs-dir", "same"], tmp_path)
    run(common + ["--phase1-iterations", "2", "--phase2-iterations", "2", "--phase2-data", "experts",
                  "--runs-dir", "drop"], tmp_path)
    (off,), (same,), (drop,) = (glob.glob(str(tmp_path / d / "*")) for d in ("off", "same", "drop"))
    assert_same_run(off, same, ["losses/loss", "losses/forward_kl", "losses/grad_norm", "eval/success_rate"])
    w1, w2 = final_weights(off), final_weights(same)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-5) for k in w1)
    assert set(scalars(drop, "losses/forward_kl")) == {1, 2, 3, 4} and scalars(drop, "schedule/phase")[4] == 2
    with pytest.raises(KeyError):
        scalars(drop, "losses/reverse_kl")
    lr = scalars(drop, "charts/learning_rate")
    assert lr[2] == pytest.approx(2e-3) and lr[3] == pytest.approx(5e-4), lr
    w3 = final_weights(drop)
    assert any(not torch.allclose(w1[k], w3[k], atol=1e-6, rtol=1e-5) for k in w1)


@pytest.mark.parametrize("ranks,phase1", [(1, 3), (2, 1)])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, ranks, phase1):
    """Killed after its first checkpoint (iteration 2 of 4: in phase 1 with --phase1-iterations 3, so the resumed
    run plays the experts' data again and crosses the switch; in phase 2 with 1) and resumed: the same logged
    numbers and final weights as the uninterrupted run, with sampling, so every rank's random states matter."""
    args = SMOKE + TWO_TASKS + ["--phase1-iterations", str(phase1), "--phase2-iterations", str(4 - phase1),
                                "--micro-batch-tokens", "300", "--eval-interval", "4"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    run(args + ["--runs-dir", "full"], tmp_path, torchrun=ranks if ranks > 1 else 0)
    cut = kill_after_first_checkpoint(launcher + [os.path.join(ROOT, "two_phase.py")] + args + ["--runs-dir", "cut"],
                                       tmp_path, "cut")
    assert torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)["extra"]["phase"] == (1 if phase1 > 2 else 2)
    run(args + ["--runs-dir", "cut", "--resume", cut], tmp_path, torchrun=ranks if ranks > 1 else 0)
    (full,) = glob.glob(str(tmp_path / "full" / "*"))
    assert_same_run(full, cut, ["losses/loss", "losses/grad_norm", "charts/success_rate", "charts/episode_turns",
                                "eval/success_rate", "schedule/phase"])
    w1, w2 = final_weights(full), final_weights(cut)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    if ranks == 1:  # resuming with another switch point is refused in one line
        p = run(SMOKE + TWO_TASKS + ["--phase1-iterations", "2", "--phase2-iterations", "2", "--resume", cut], tmp_path,
                check=False)
        assert p.returncode != 0 and f"resume with --phase1-iterations {phase1}" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,expected", [
    (["--tasks", "twx:simonsays", "twx:sorting"], "no tiny expert for env 'twx:sorting'"),
    (["--tasks", "twx:nosuchgame"], "unknown env 'twx:nosuchgame'"),  # checked by name, before any env is made
    (["--tasks", "twx:nosuchgame", "--teachers", "tiny-expert:coin"], "unknown env"),
    (["--teachers", "tiny-expert:simonsays"], "--teachers must name one expert per task: 3 task(s)"),
    (["--teachers", "nosuchmodel", "tiny-expert:coin", "tiny-expert:coin"], "unknown model"),
    (["--phase1-iterations", "-1"], "must be 0 or more, and not both 0"),
    (["--phase1-iterations", "0", "--phase2-iterations", "0"], "must be 0 or more, and not both 0"),
    (["--tasks", "twx:coin", "twx:coin:numLocations=4"], "each game once"),
    (["--success-only", "--tasks", "twx:simonsays", "--expert-episodes", "2"], "solved none of its 2 training episodes"),
    (["--expert-episodes", "0"], "--expert-episodes must be at least 1"),
    (["--temperature", "0.5", "--student-loss", "sampled"], "--temperature must be 1 with the sampled reverse KL"),
    (["--user-model", "tiny"], "--user-model is for conversational envs"),
    (["--ratio-clip", "-0.2"], "--adv-clip, --ratio-clip and --ratio-max 0 (off) or positive"),
    (["--ratio-max", "-1"], "--adv-clip, --ratio-clip and --ratio-max 0 (off) or positive"),
    (["--ratio-clip", "0.2", "--student-loss", "topk"], "--ratio-clip weighs phase 2's sampled form"),
    (["--resume", "no/such/run"], "no checkpoint"),
    (["--student", "tiny-huge"], "no tiny student 'tiny-huge'"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    p = run(SMOKE + ["--phase1-iterations", "1", "--phase2-iterations", "1"] + args, tmp_path, check=False, timeout=300)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert expected in last and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_expert_with_another_vocabulary_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from common import tiny

    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    other = tiny_model(vocab=len(tok) + 7)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    p = run(SMOKE + TWO_TASKS + ["--teachers", "tiny-expert:simonsays", str(tmp_path / "other")], tmp_path, check=False,
            timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "vocabulary" in last and str(len(tok) + 7) in last, p.stderr[-2000:]


@pytest.mark.needs_env("tau2")
def test_tau2_tasks_end_to_end_with_a_model_customer(tmp_path, qwen3_shaped):
    """The paper's main benchmark: two conversational tasks (airline and retail), the customer played by a model
    (`--user-model`), the real-model defaults (cross-entropy in phase 1, the top-k reverse KL in phase 2: the
    experts' top-k scored in phase 2 only)."""
    m = qwen3_shaped
    p = run(["--tasks", "tau2:airline", "tau2:retail", "--student", m, "--teachers", m, m, "--user-model", m,
             "--num-envs", "2", "--phase1-iterations", "1", "--phase2-iterations", "1", "--expert-episodes", "2",
             "--no-success-only", "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "9000",
             "--num-minibatches", "1", "--eval-interval", "2", "--eval-episodes", "2", "--learning-rate", "1e-3",
             "--device-memory", "cpu:16"], tmp_path)  # the plan's budget, not this shared host's free memory
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "held-out success airline" in p.stdout and os.path.exists(os.path.join(run_dir, "final", "config.json"))
    assert scalars(run_dir, "schedule/phase") == {1: 1, 2: 2} and set(scalars(run_dir, "losses/reverse_kl")) == {2}
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())


# ---------------------------------------------------------------------------------------------- real models
def test_plan_prints_the_table_without_weights(tmp_path, qwen3_shaped):
    """--plan: the memory plan from the configs alone, printed for 1 to 8 ranks, before any env or weight: the
    model's folder here holds no weights at all."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(qwen3_shaped, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    m = str(bare)
    p = run(["--student", m, "--tasks", "twx:simonsays", "--teachers", m, "--plan"], tmp_path, timeout=120)
    assert "memory plan: student" in p.stdout and "peak" in p.stdout and "8 rank(s)" in p.stdout, p.stdout[-2000:]
    assert "rollout:" in p.stdout and "training micro-batch:" in p.stdout
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("args,missing", [(["--tasks", "twx:simonsays"], "--teachers"), ([], "--tasks and --teachers")])
def test_a_real_student_needs_its_tasks_and_experts(tmp_path, qwen3_shaped, args, missing):
    p = run(["--student", qwen3_shaped] + args, tmp_path, check=False, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and f"needs {missing}" in last and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("ranks", [1, 2])
def test_real_shaped_run_with_the_least_memory_choices(tmp_path, qwen3_shaped, ranks):
    """A Qwen3-shaped student and expert (real tokenizer, tied embeddings) through both phases with every memory
    saving on: rollouts gathered layer by layer, one episode decoded at a time, activation checkpointing; with 2
    ranks the models are read by rank 0 alone and the other's shards filled from it. The peak memory is logged."""
    m = qwen3_shaped
    p = run(["--student", m, "--tasks", "twx:simonsays", "--teachers", m, "--phase1-iterations", "1",
             "--phase2-iterations", "1", "--num-envs", "2", "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len",
             "512", "--eval-episodes", "2", "--eval-interval", "2", "--expert-episodes", "2", "--no-success-only",
             "--rollout-gather", "layers", "--rollout-chunk", "1", "--activation-checkpointing",
             "--device-memory", "cpu:16"], tmp_path, torchrun=ranks if ranks > 1 else 0, timeout=300)  # not this host's
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "activation checkpointing on, rollouts gather by layer" in p.stdout and "1 episode(s) decoded at once" in p.stdout
    assert scalars(run_dir, "schedule/phase") == {1: 1, 2: 2} and set(scalars(run_dir, "losses/reverse_kl")) == {2}
    assert all(v > 0 for v in scalars(run_dir, "memory/peak_gib").values()) and set(scalars(run_dir, "memory/plan_gib")) == {1, 2}
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    assert os.path.exists(os.path.join(run_dir, "final", "config.json"))
