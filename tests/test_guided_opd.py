"""guided_opd.py: the losses against their definitions, the curriculum, the training step (gradient
accumulation, role weighting) in-process under FSDP2, and end-to-end runs in a subprocess (single process,
torchrun with 2 ranks, interrupted and resumed, bad input).

The end-to-end runs use the smoke recipe's models: experts that write valid, mostly wrong actions (a wrong
action ends a simonsays game), so with beta strictly between 0 and 1 episodes end at different turns,
both roles write turns, and ranks get uneven work."""

from __future__ import annotations

import glob
import os
import random
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import guided_opd as g
from common.episode import STUDENT, TEACHER, Episode, collate
from common.runs import minibatch_plan
from common.teacher import score_teacher

from end_to_end import assert_same_run, final_weights, kill_after_first_checkpoint, run_script, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, torchrun=0, timeout=600, check=True):
    """guided_opd.py in a subprocess (see end_to_end.run_script)."""
    return run_script("guided_opd.py", args, tmp_path, torchrun, timeout, check)


SMOKE = ["--num-envs", "2", "--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4", "--max-new-tokens", "8",
         "--eval-interval", "2", "--save-interval", "2"]
# not degenerate: both roles, episodes that end early (the smoke expert's wrong actions end the game),
# one or two micro-batches per mini-batch (ranks with fewer join with an empty one), greedy so that runs
# can be compared exactly
MIXED = ["--curriculum", "constant", "--beta-start", "0.5", "--temperature", "0", "--max-turns", "5",
         "--max-new-tokens", "8", "--micro-batch-tokens", "500", "--eval-episodes", "4"]


# ---------------------------------------------------------------------------------------------- losses
def test_sampled_reverse_kl_is_zero_when_teacher_is_student():
    logp = torch.log_softmax(torch.randn(5, 7), -1)[:, 0].requires_grad_()
    loss = g.sampled_reverse_kl(logp, logp.detach()).sum()
    loss.backward()
    assert loss.item() == 0 and torch.all(logp.grad == 0)
    full = torch.log_softmax(torch.randn(5, 7), -1)
    assert torch.allclose(g.full_reverse_kl(full, full), torch.zeros(5), atol=1e-6)
    assert torch.allclose(g.full_forward_kl(full, full), torch.zeros(5), atol=1e-6)


def test_sampled_estimate_has_the_full_reverse_kl_gradient():
    # E_{y ~ pi_s}[grad of -A(y) log pi_s(y)] = grad KL(pi_s || pi_t): enumerate y exactly
    torch.manual_seed(0)
    theta = torch.randn(11, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(11), -1)
    logp_s = torch.log_softmax(theta, -1)
    expected = sum(logp_s[y].exp().detach() * g.sampled_reverse_kl(logp_s[y], teacher[y]) for y in range(11))
    (grad_sampled,) = torch.autograd.grad(expected, theta)
    (grad_full,) = torch.autograd.grad(g.full_reverse_kl(torch.log_softmax(theta, -1), teacher), theta)
    assert torch.allclose(grad_sampled, grad_full, atol=1e-6)
    # and a Monte Carlo average of sampled tokens approaches it
    ys = torch.distributions.Categorical(logits=theta.detach()).sample((200_000,))
    mc = g.sampled_reverse_kl(torch.log_softmax(theta, -1)[ys], teacher[ys]).mean()
    (grad_mc,) = torch.autograd.grad(mc, theta)
    assert torch.allclose(grad_mc, grad_full, atol=2e-2)


def test_advantage_clip_and_ppo_form():
    logp_s = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    logp_t = torch.tensor([-9.0, -1.0, -0.5, -1.0])
    # the clip bounds the advantage: the first token's -8 becomes -5
    (grad,) = torch.autograd.grad(g.sampled_reverse_kl(logp_s, logp_t, adv_clip=5.0).sum(), logp_s)
    assert torch.allclose(grad, torch.tensor([5.0, -1.0, 0.0, -2.0]), atol=1e-6)
    # at ratio 1 (the rollout student is the current one) the PPO form has the plain form's gradient
    (g_plain,) = torch.autograd.grad(g.sampled_reverse_kl(logp_s, logp_t).sum(), logp_s)
    (g_ppo,) = torch.autograd.grad(g.clipped_sampled_reverse_kl(logp_s, logp_s.detach(), logp_t, 0.2).sum(), logp_s)
    assert torch.allclose(g_plain, g_ppo, atol=1e-6)
    # a token whose ratio already moved past 1 + eps in its advantage's direction gets no more gradient;
    # one that moved against it still does
    old = logp_s.detach() - torch.tensor([-0.5, 0.5, 0.0, -0.5])  # ratios 0.61, 1.65, 1, 0.61; A -8.5, 1.5, 0, 1.5
    (g_clip,) = torch.autograd.grad(g.clipped_sampled_reverse_kl(logp_s, old, logp_t, 0.2).sum(), logp_s)
    assert g_clip[0] == 0 and g_clip[1] == 0 and g_clip[2] == 0 and g_clip[3] != 0


def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return Qwen3ForCausalLM(cfg)


def micro_batch(role, vocab=50, T=12):
    ids = torch.randint(0, vocab, (2, T))
    loss_mask = torch.zeros(2, T, dtype=torch.bool)
    loss_mask[:, 5:9] = True
    return {"input_ids": ids, "attention_mask": torch.ones(2, T, dtype=torch.long), "loss_mask": loss_mask,
            "role": torch.where(loss_mask, role, 0), "teacher_logp": torch.log(torch.rand(2, T))}


def test_teacher_turn_loss_is_cross_entropy():
    model, mb = tiny_model(), micro_batch(TEACHER)
    pg_sum, ce_sum, stats = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="ce"))
    logits = model(input_ids=mb["input_ids"]).logits[:, :-1]
    target, mask = mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
    assert torch.allclose(ce_sum, ce, atol=1e-4) and pg_sum.item() == 0 and stats["student_tokens"] == 0
    _, ce_none, _ = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="none"))
    assert ce_none.item() == 0


def test_student_turn_loss_is_the_sampled_reverse_kl():
    model, mb = tiny_model(), micro_batch(STUDENT)
    logp = torch.log_softmax(model(input_ids=mb["input_ids"]).logits.float(), -1)
    lp = logp[:, :-1].gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    mask = mb["loss_mask"][:, 1:]
    pg_sum, ce_sum, stats = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="ce"))
    ref = (-(mb["teacher_logp"][:, 1:] - lp).detach() * lp)[mask].sum()
    assert torch.allclose(pg_sum, ref, atol=1e-4) and ce_sum.item() == 0
    assert stats["reverse_kl"] == pytest.approx((lp - mb["teacher_logp"][:, 1:])[mask].sum().item(), abs=1e-3)


def test_adv_baseline_subtracts_the_mean_advantage_of_the_student_tokens_only():
    """--adv-baseline: each student token's advantage minus the mean over the micro-batch's student tokens (teacher
    tokens and padding excluded), without a gradient through that mean."""
    model = tiny_model()
    mb = micro_batch(STUDENT)
    mb["role"][0, 7:9] = TEACHER  # mixed roles: the teacher's tokens must not enter the student tokens' mean
    logp = torch.log_softmax(model(input_ids=mb["input_ids"]).logits.float(), -1)
    lp = logp[:, :-1].gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    s_mask = (mb["loss_mask"] & (mb["role"] == STUDENT))[:, 1:]
    adv = (mb["teacher_logp"][:, 1:] - lp).detach()
    b = adv[s_mask].mean()
    args = g.Args(student_loss="sampled", teacher_loss="ce", adv_baseline=True)
    pg_sum, _, _ = g.guided_opd_loss(model, mb, args)
    ref = (-(adv - b) * lp)[s_mask].sum()
    assert torch.allclose(pg_sum, ref, atol=1e-4)
    (grad,) = torch.autograd.grad(pg_sum, model.lm_head.weight)
    (grad_ref,) = torch.autograd.grad(ref, model.lm_head.weight)
    assert torch.allclose(grad, grad_ref, atol=1e-5)
    plain, _, _ = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="ce"))
    assert abs(b.item()) > 0.1 and not torch.allclose(plain, pg_sum, atol=1e-3)  # the baseline changes the loss


def test_exact_losses_against_their_definitions():
    """Distinct teacher and student distributions, both roles, trained positions in separate runs across rows:
    the exact reverse KL on student tokens and forward KL on teacher tokens, position by position."""
    V, T = 50, 14
    student, teacher = tiny_model(V, seed=0), tiny_model(V, seed=1).eval()
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros(3, T, dtype=torch.bool)
    loss_mask[0, 3:5] = loss_mask[0, 9:12] = loss_mask[2, 6:8] = loss_mask[1, 13] = True  # row 1: one token
    role = torch.zeros(3, T, dtype=torch.long)
    role[0, 3:5], role[0, 9:12], role[1, 13], role[2, 6:8] = STUDENT, TEACHER, TEACHER, STUDENT
    batch = {"input_ids": ids, "attention_mask": torch.ones(3, T, dtype=torch.long), "loss_mask": loss_mask}
    scores = score_teacher(teacher, batch, loss_mask, full=True)
    mb = {**batch, "role": role, "teacher_logp": scores.logp, "teacher_full": scores.full}
    pg_sum, ce_sum, _ = g.guided_opd_loss(student, mb, g.Args(student_loss="full", teacher_loss="full"))
    ls = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
    lt = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    rkl = fkl = 0.0
    for b, t in loss_mask.nonzero().tolist():  # position t is predicted from t - 1
        p_s, p_t = ls[b, t - 1], lt[b, t - 1]
        if role[b, t] == STUDENT:
            rkl += (p_s.exp() * (p_s - p_t)).sum()
        else:
            fkl += (p_t.exp() * (p_t - p_s)).sum()
    assert torch.allclose(pg_sum, rkl, atol=1e-5) and torch.allclose(ce_sum, fkl, atol=1e-5)
    assert pg_sum > 0.01 and ce_sum > 0.01  # the two models really differ


def test_beta_curriculum():
    a = g.Args(total_iterations=100)
    assert g.beta_schedule(0, a) == 1.0
    assert g.beta_schedule(40, a) == pytest.approx(0.5)  # half-way through the 80% curriculum (cosine)
    assert g.beta_schedule(80, a) == pytest.approx(0.0, abs=1e-12) and g.beta_schedule(99, a) == 0.0
    lin = g.Args(total_iterations=100, curriculum="linear")
    assert g.beta_schedule(20, lin) == pytest.approx(0.75)
    assert g.beta_schedule(50, g.Args(curriculum="constant", beta_start=0.3)) == 0.3
    assert g.beta_schedule(10, g.Args(beta_start=0.0)) == 0.0  # vanilla OPD
    step = g.Args(total_iterations=100, curriculum="step")
    assert [g.beta_schedule(i, step) for i in (0, 79, 80, 99)] == [1.0, 1.0, 0.0, 0.0]
    values = [g.beta_schedule(i, a) for i in range(100)]
    assert all(x >= y for x, y in zip(values, values[1:]))


# ------------------------------------------------------------------------------ the training step
@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one in this process (FSDP2 needs one), without touching os.environ."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def synthetic_episodes(V=50, n=6):
    """Episodes of different lengths with student and teacher turns (role strings as a rollout leaves them)."""
    rng = torch.Generator().manual_seed(0)
    episodes = []
    for i in range(n):
        ep = Episode(ids=[], loss_mask=[], turn_id=[], role=[])
        for turn in range(1 + i % 3):
            obs = torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=rng)),), generator=rng).tolist()
            reply = torch.randint(1, V, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng).tolist()
            role = TEACHER if (i + turn) % 2 else STUDENT
            ep.ids += obs + reply
            ep.loss_mask += [0] * len(obs) + [1] * len(reply)
            ep.turn_id += [-1] * len(obs) + [turn] * len(reply)
            ep.role += [0] * len(obs) + [role] * len(reply)
        episodes.append(ep)
    return episodes


def run_train_step(args, episodes, V=50):
    student = g.shard(tiny_model(V, seed=2), torch.device("cpu"), trainable=True)
    teacher = tiny_model(V, seed=3).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)  # (Adam would amplify rounding in near-zero gradients)
    batch = collate(episodes, 0)
    scores = score_teacher(teacher, batch, batch["loss_mask"], full=True)
    old = score_teacher(student, batch, batch["loss_mask"]).logp if args.ratio_clip else None
    for j, ep in enumerate(episodes):
        ep.slot = j
    plan = minibatch_plan([0] * len(episodes), args.num_minibatches, random.Random(0))
    stats = g.train_step(student, optimizer, episodes, batch, scores, old, 0.3, plan, args, 1, torch.device("cpu"))
    grads = {n: p.grad.full_tensor().clone() for n, p in student.named_parameters()}
    weights = {n: p.full_tensor().detach().clone() for n, p in student.named_parameters()}
    return stats, grads, weights


@pytest.mark.parametrize("losses", [("full", "full"), ("sampled", "ce")])
def test_gradient_accumulation_equals_one_micro_batch(process_group, losses):
    episodes = synthetic_episodes()
    kw = dict(student_loss=losses[0], teacher_loss=losses[1], num_minibatches=2, max_grad_norm=1e9)
    one, g_one, w_one = run_train_step(g.Args(micro_batch_tokens=10**6, **kw), episodes)
    many, g_many, w_many = run_train_step(g.Args(micro_batch_tokens=20, **kw), episodes)
    assert one["grad_norm"] > 0 and one["grad_norm"] == pytest.approx(many["grad_norm"], rel=1e-5)
    for n in g_one:
        torch.testing.assert_close(g_many[n], g_one[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w_many[n], w_one[n], atol=1e-6, rtol=1e-5)
    assert one["pg_loss"] == pytest.approx(many["pg_loss"], rel=1e-5)


@pytest.mark.parametrize("weighting", ["tokens", "beta"])
def test_role_weighting(process_group, weighting):
    """One mini-batch: the gradient equals that of the loss written out by hand, the token mean over both
    roles, or (1 - beta) x student-token mean + beta x teacher-token mean."""
    episodes, beta = synthetic_episodes(), 0.3
    args = g.Args(student_loss="full", teacher_loss="full", num_minibatches=1, max_grad_norm=1e9,
                  role_weighting=weighting, micro_batch_tokens=30)
    _, grads, _ = run_train_step(args, episodes)
    ref = tiny_model(50, seed=2)
    batch = collate(episodes, 0)
    scores = score_teacher(tiny_model(50, seed=3).eval(), batch, batch["loss_mask"], full=True)
    pg, ce, stats = g.guided_opd_loss(ref, {**batch, "teacher_logp": scores.logp, "teacher_full": scores.full}, args)
    S, T = stats["student_tokens"], stats["teacher_tokens"]
    assert S > 0 and T > 0
    loss = (pg + ce) / (S + T) if weighting == "tokens" else (1 - beta) * pg / S + beta * ce / T
    loss.backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_run_trains_and_saves_a_loadable_model(tmp_path):
    from common.models import load_model

    run(SMOKE + ["--total-iterations", "2"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    for tag in ["charts/success_rate", "losses/reverse_kl", "schedule/beta", "eval/success_rate", "time/rollout",
                "teacher/success_rate"]:
        assert scalars(run_dir, tag), tag
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    # the final save is the checkpoint's model, and training moved it away from the initial student
    final = final_weights(run_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]
    initial = load_model("tiny")[0].state_dict()
    assert all(torch.equal(final[k], ckpt[k]) for k in ckpt)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


@pytest.mark.needs_env("gem")
def test_env_of_another_suite_picks_that_suites_tiny_models(tmp_path):
    """--env gem:... with the default --student tiny: the GEM suite's student and expert, which share
    their own tokenizer."""
    out = run(SMOKE + ["--total-iterations", "1", "--env", "gem:guessthenumber:hard", "--no-cache-turns"], tmp_path)
    assert "student tiny:gem, teacher tiny-expert:guessthenumber" in out.stdout


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "batch-cache"])
def test_torchrun_two_ranks_gives_the_single_process_run(tmp_path, fast):
    """The same 8 episodes a step (greedy) as 1 rank x 8 envs and 2 ranks x 4 envs: same losses, gradient
    norms and weights, with both roles, episodes ending at different turns and uneven work per rank. With
    --batch-cache on the 2 ranks: the fast generation path gives the eager loop's run (and keeps the ranks'
    forward passes in step when one rank has no reply to write)."""
    common = MIXED + ["--total-iterations", "2", "--num-minibatches", "2", "--eval-interval", "2"]
    run(common + ["--num-envs", "8", "--runs-dir", "one"], tmp_path)
    run(common + ["--num-envs", "4", "--runs-dir", "two"] + (["--batch-cache"] if fast else []), tmp_path, torchrun=2)
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "two" / "*"))
    assert_same_run(one, two, ["losses/loss", "losses/reverse_kl", "losses/forward_kl", "losses/grad_norm",
                               "charts/episode_turns", "schedule/teacher_token_fraction", "eval/success_rate"])
    turns, fraction = scalars(one, "charts/episode_turns"), scalars(one, "schedule/teacher_token_fraction")
    assert all(1 < t < 5 for t in turns.values()) and all(0 < f < 1 for f in fraction.values())  # not degenerate
    assert all(v > 0 for v in scalars(two, "losses/grad_norm").values())  # the gradients reached the weights
    w1, w2 = final_weights(one), final_weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-5) for k in w1)


def test_evaluation_in_one_batch_gives_the_rounds_results(tmp_path):
    """The tiny default plays a rank's held-out episodes in one batch (--eval-batch 0, auto): the same evaluation
    (greedy) as rounds of 2 (--eval-batch 2), and training untouched (its own sampler and envs)."""
    common = MIXED + ["--num-envs", "4", "--num-minibatches", "2", "--total-iterations", "2", "--eval-interval", "1",
                      "--eval-episodes", "8", "--temperature", "1"]
    run(common + ["--runs-dir", "one"], tmp_path)
    run(common + ["--eval-batch", "2", "--runs-dir", "rounds"], tmp_path)
    (one,), (rounds,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "rounds" / "*"))
    assert_same_run(one, rounds, ["eval/success_rate", "eval/score", "eval/episode_turns", "teacher/episode_turns",
                                  "losses/loss", "losses/grad_norm"], rel=0)
    turns = scalars(one, "teacher/episode_turns")  # (the smoke student alone plays every turn)
    assert all(1 < t < 5 for t in turns.values()), turns  # episodes of several lengths: padding in the batch
    w1, w2 = final_weights(one), final_weights(rounds)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("ranks", [1, 2])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, ranks):
    """Killed after its first checkpoint (iteration 2 of 4) and resumed: the same logged numbers and final
    weights as the uninterrupted run; with sampling (temperature 1), so every rank's random states matter."""
    args = SMOKE + ["--total-iterations", "4", "--beta-start", "0.7", "--micro-batch-tokens", "300"]
    run(args + ["--runs-dir", "full"], tmp_path, torchrun=ranks if ranks > 1 else 0)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    cut = kill_after_first_checkpoint(launcher + [os.path.join(ROOT, "guided_opd.py")] + args + ["--runs-dir", "cut"],
                                       tmp_path, "cut")
    run(args + ["--runs-dir", "cut", "--resume", cut], tmp_path, torchrun=ranks if ranks > 1 else 0)
    (full,) = glob.glob(str(tmp_path / "full" / "*"))
    assert_same_run(full, cut, ["losses/loss", "charts/success_rate", "charts/episode_turns", "eval/success_rate",
                                "losses/grad_norm", "schedule/teacher_token_fraction"])
    w1, w2 = final_weights(full), final_weights(cut)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("args,expected", [
    (["--env", "twx:nosuchgame"], "unknown env"),
    (["--teacher", "nosuchmodel"], "unknown model"),
    (["--resume", "no/such/run"], "no checkpoint"),
    (["--max-seq-len", "100000"], "lower --max-seq-len"),
    (["--num-minibatches", "5"], "--num-minibatches must be between 1 and --num-envs"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "-1"], "must be 0 (greedy) or more"),
    (["--temperature", "0.7", "--student-loss", "sampled"], "--temperature must be 1 with the sampled losses"),
    (["--env", "twx:sorting"], "no tiny expert for env 'twx:sorting'"),
    (["--student", "tiny-huge"], "no tiny student 'tiny-huge'"),
    (["--user-model", "tiny"], "--user-model is for conversational envs"),
    (["--batch-cache", "--no-cache-turns"], "--batch-cache keeps the whole batch's caches between turns"),
    (["--batch-cache", "--rollout-chunk", "4"], "--batch-cache keeps the whole batch's caches between turns"),
    (["--rollout-chunk", "-1"], "--eval-batch and --rollout-chunk must be 0 (auto) or more"),
    (["--eval-batch", "-1"], "--eval-batch and --rollout-chunk must be 0 (auto) or more"),
    (["--ratio-clip", "0.2", "--student-loss", "full"], "--ratio-clip weighs the sampled form's tokens"),
    (["--adv-baseline", "--ratio-clip", "0.2", "--student-loss", "full"], "--ratio-clip weighs the sampled form's"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    p = run(SMOKE + args, tmp_path, check=False, timeout=300)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert expected in last and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from common import tiny

    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))
    other = tiny_model(vocab=len(tok) + 7)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    p = run(SMOKE + ["--teacher", str(tmp_path / "other")], tmp_path, check=False, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "vocabulary" in last and str(len(tok) + 7) in last, p.stderr[-2000:]


@pytest.mark.needs_env("tau2")
def test_tau2_airline_end_to_end_with_a_model_customer(tmp_path, qwen3_shaped):
    """A conversational env (its system prompt alone is thousands of tokens) with the Qwen3 token format: the
    customer played by a model (`--user-model`), the real-model defaults (sampled reverse KL and CE)."""
    m = qwen3_shaped
    p = run(["--env", "tau2:airline", "--student", m, "--teacher", m, "--user-model", m, "--num-envs", "2",
             "--total-iterations", "2", "--max-turns", "3", "--max-new-tokens", "8", "--max-seq-len", "9000",
             "--num-minibatches", "1", "--eval-interval", "2", "--eval-episodes", "2", "--learning-rate", "1e-3"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "held-out success" in p.stdout and os.path.exists(os.path.join(run_dir, "final", "config.json"))
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())


def test_real_student_gets_the_real_defaults_and_needs_its_teacher():
    """`--student qwen3-1.7b`: the real-model lengths, losses, rate and one step per batch, never the tiny default's
    game or expert (whose vocabulary could never match): without --teacher and --env it is refused."""
    from common.models import fill_defaults, student_name, teacher_name

    args = g.Args(student="qwen3-1.7b", teacher="qwen3-8b", env="alfworld")
    fill_defaults(args, g.TINY, g.REAL, required=("env", "teacher"))
    assert teacher_name(args.teacher, student_name(args.student, args.env), args.env) == "qwen3-8b"
    assert (args.max_new_tokens, args.student_loss, args.teacher_loss, args.max_turns) == (512, "topk", "ce", 0)
    assert (args.learning_rate, args.num_minibatches) == (2e-5, 1)
    with pytest.raises(SystemExit, match="needs --env and --teacher"):
        fill_defaults(g.Args(student="qwen3-1.7b"), g.TINY, g.REAL, required=("env", "teacher"))
    tiny_args = g.Args()
    fill_defaults(tiny_args, g.TINY, g.REAL, required=("env", "teacher"))
    assert (tiny_args.max_new_tokens, tiny_args.student_loss, tiny_args.max_turns, tiny_args.env) == (24, "full", 12, "twx:simonsays")
    assert teacher_name(None, "tiny", "twx:coin") == "tiny-expert:coin"
    # evaluation: a tiny student plays its rank's share of the held-out episodes at once, a real one --num-envs
    from common.runs import eval_batch

    assert [eval_batch(tiny_args, w, tiny_args.num_envs) for w in (1, 3)] == [64, 22]
    assert [eval_batch(args, w, args.num_envs) for w in (1, 8)] == [16, 8]
    args.eval_batch = tiny_args.eval_batch = 5
    assert eval_batch(args, 1, 16) == eval_batch(tiny_args, 1, 16) == 5


def test_out_of_gpu_memory_is_one_line_naming_the_flag(capsys):
    """common/dist.py's excepthook (installed by setup()): an OutOfMemoryError raised under train_step (here
    from a scoring call inside it) names --micro-batch-tokens; under rollout, --num-envs; other errors pass."""
    from common.dist import out_of_memory_hook

    def token_logprobs():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def train_step():
        token_logprobs()

    def rollout():
        raise torch.OutOfMemoryError("CUDA out of memory")

    for fn, expected in ((train_step, "error: out of GPU memory in the training step: lower --micro-batch-tokens"),
                         (rollout, "error: out of GPU memory in rollouts: lower --num-envs")):
        try:
            fn()
        except torch.OutOfMemoryError as e:
            out_of_memory_hook(type(e), e, e.__traceback__)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(expected)
    seen = []
    try:
        raise ValueError("something else")
    except ValueError as e:
        out_of_memory_hook(type(e), e, e.__traceback__, fallback=lambda *a: seen.append(a[1]))
    assert len(seen) == 1 and isinstance(seen[0], ValueError)
