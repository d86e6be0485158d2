"""atod.py: the advantages (GRPO, T-DUR weights, the hybrid), the annealing schedule and the clipped surrogate
against their definitions, the loss and the training step in-process under FSDP2, and end-to-end runs in a
subprocess (single process, torchrun with 2 ranks, interrupted and resumed, bad input).

The end-to-end runs use the smoke recipe's models on simonsays, played by the smoke simonsays expert as the
student (it writes valid, mostly wrong actions, and a wrong action ends the game): at temperature 1 the
episodes of a group end at different turns and score differently, so the GRPO term is not zero."""

from __future__ import annotations

import glob
import os
import random
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import atod as a
from common.episode import STUDENT, Episode, collate
from common.runs import minibatch_plan
from common.teacher import score_teacher

from end_to_end import assert_same_run, final_weights, kill_after_first_checkpoint, run_script, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, torchrun=0, timeout=600, check=True):
    """atod.py in a subprocess (see end_to_end.run_script)."""
    return run_script("atod.py", args, tmp_path, torchrun, timeout, check)


SMOKE = ["--num-envs", "4", "--group-size", "2", "--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4",
         "--max-new-tokens", "8", "--eval-interval", "2", "--save-interval", "2"]
# not degenerate: a student that plays valid, mostly wrong simonsays actions (episodes end at different turns),
# the score as reward (it differs within groups), several micro-batches per mini-batch
MIXED = ["--env", "twx:simonsays", "--student", "tiny-expert:simonsays", "--teacher", "tiny", "--reward", "score",
         "--max-turns", "5", "--max-new-tokens", "8", "--micro-batch-tokens", "500", "--eval-episodes", "4",
         "--group-size", "4", "--anneal-iterations", "1", "--learning-rate", "1e-3"]


# ------------------------------------------------------------------------------------------ advantages
def test_grpo_advantages_on_hand_made_groups():
    adv = a.grpo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]), 4)
    # one success in four: mean 0.25, unbiased std 0.5; all equal: exactly 0 (no division by zero)
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5] + [0.0] * 8), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(8))
    two = a.grpo_advantages(torch.tensor([0.3, 0.7]), 2)
    assert torch.allclose(two, torch.tensor([-0.2, 0.2]) / (torch.tensor([0.3, 0.7]).std() + 1e-6))


def hand_made_turns():
    """One row: a prompt token, then turns 0 (2 tokens), 1 (1 token), 2 (2 tokens)."""
    logp_s = torch.tensor([[0.0, -1.0, -2.0, -0.5, -0.1, -3.0]])
    logp_t = torch.tensor([[0.0, -1.0, -1.0, -2.0, -0.1, -0.2]])
    turn_id = torch.tensor([[-1, 0, 0, 1, 2, 2]])
    return logp_s, logp_t, turn_id, turn_id >= 0


def test_tdur_weights_by_hand():
    logp_s, logp_t, turn_id, mask = hand_made_turns()
    # d = (0.5, 1.5, 1.4) -> (0, 1, 0.9); h = (1.5, 0.5, 1.55) -> (1/1.05, 0, 1); w = 1 - (1 - d)(1 - h)
    d, h = torch.tensor([0.0, 1.0, 0.9]), torch.tensor([1 / 1.05, 0.0, 1.0])
    w = 1 - (1 - d) * (1 - h)
    expected = torch.tensor([[0.0, w[0], w[0], w[1], w[2], w[2]]])
    assert torch.allclose(a.tdur_weights(logp_s, logp_t, turn_id, mask), expected, atol=1e-6)
    # renormalised: mean 1 over the row's tokens
    r = a.tdur_weights(logp_s, logp_t, turn_id, mask, renormalize=True)
    assert r[mask].mean().item() == pytest.approx(1.0) and torch.allclose(r / r[0, 1], expected / expected[0, 1])
    # per token: each token is its own unit; d = (0, 1, 1.5, 0, 2.8), h = (1, 2, 0.5, 0.1, 3)
    dt, ht = torch.tensor([0, 1, 1.5, 0, 2.8]) / 2.8, (torch.tensor([1, 2, 0.5, 0.1, 3]) - 0.1) / 2.9
    tok = a.tdur_weights(logp_s, logp_t, turn_id, mask, per="token")
    assert torch.allclose(tok[mask], 1 - (1 - dt) * (1 - ht), atol=1e-6)


def test_tdur_flat_case_is_one_half_each():
    """Turns that agree on d and h have a range below 1e-8: both normalise to 0.5, so w = 0.75; a row with
    one turn too; a row with no tokens gets no weight."""
    logp_s = torch.tensor([[0.0, -1.0, -1.0, -1.0], [0.0, -2.0, -3.0, 0.0], [0.0] * 4])
    logp_t = torch.tensor([[0.0, -2.0, -2.0, -2.0], [0.0, -1.0, -1.0, 0.0], [0.0] * 4])
    turn_id = torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, -1], [-1] * 4])
    w = a.tdur_weights(logp_s, logp_t, turn_id, turn_id >= 0)
    assert torch.allclose(w, torch.tensor([[0, 0.75, 0.75, 0.75], [0, 0.75, 0.75, 0], [0.0] * 4]))


def test_annealing_schedule():
    args = a.Args(anneal_iterations=80)
    values = {s: a.kappa_rho(s, args) for s in (0, 40, 80, 150)}
    assert values[0] == (1.0, 1.0) and values[80] == pytest.approx((0.1, 2.0)) and values[150] == pytest.approx((0.1, 2.0))
    assert values[40] == pytest.approx((0.55, 1.5))
    assert a.kappa_rho(10, a.Args(mode="opd", anneal_iterations=80)) == (1.0, 0.0)
    assert a.kappa_rho(10, a.Args(mode="grpo", anneal_iterations=80)) == (0.0, 1.0)
    assert a.kappa_rho(90, a.Args(mode="constant", anneal_iterations=80)) == (1.0, 1.0)
    assert round(a.PAPER_ANNEAL_FRACTION * 150) == 80 and round(a.PAPER_ANNEAL_FRACTION * a.TINY["total_iterations"]) == 16


def test_hybrid_advantage_and_its_baselines():
    logp_old, logp_t, turn_id, mask = hand_made_turns()
    w = a.tdur_weights(logp_old, logp_t, turn_id, mask)
    grpo = torch.tensor([0.7])
    hybrid = a.hybrid_advantages(logp_old, logp_t, w, grpo, mask, 0.55, 1.5)
    assert torch.allclose(hybrid, (0.55 * w * (logp_t - logp_old) + 1.5 * 0.7) * mask)
    assert hybrid[0, 0] == 0  # not an agent token
    # OPD only (rho = 0) and GRPO only (kappa = 0) reduce to their terms
    assert torch.allclose(a.hybrid_advantages(logp_old, logp_t, w, grpo, mask, 1.0, 0.0), w * (logp_t - logp_old) * mask)
    assert torch.allclose(a.hybrid_advantages(logp_old, logp_t, w, grpo, mask, 0.0, 1.0), 0.7 * mask.float())
    # --opd-loss full: the surrogate gets the GRPO term only
    assert torch.allclose(a.hybrid_advantages(logp_old, logp_t, w, grpo, mask, 0.55, 1.5, False), 1.05 * mask.float())


def test_clipped_surrogate():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5, 1.0])
    # at ratio 1 (first epoch, first mini-batch) the clipped surrogate is the unclipped -r A, gradient -A
    loss = a.clipped_surrogate(logp, logp.detach(), adv, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.allclose(loss, -adv) and torch.allclose(grad, -adv)
    # past 1 + eps with A > 0, or below 1 - eps with A < 0: clipped, no gradient; the other side still has one
    old = logp.detach() - torch.tensor([0.5, -0.5, -0.5, 0.5])  # ratios 1.65, 0.61, 0.61, 1.65
    (g2,) = torch.autograd.grad(a.clipped_surrogate(logp, old, adv, 0.2).sum(), logp)
    assert g2[0] == 0 and g2[1] == 0 and g2[2] != 0 and g2[3] == 0
    ratio = torch.exp(logp - old).detach()
    assert g2[2].item() == pytest.approx(-(ratio[2] * adv[2]).item())


def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return Qwen3ForCausalLM(cfg)


def synthetic_episodes(V=50, n=8):
    """Episodes of different lengths (1-3 turns), all student turns."""
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
            ep.role += [0] * len(obs) + [STUDENT] * len(reply)
        episodes.append(ep)
    return episodes


def prepared(episodes, args, kappa=0.55, rho=1.5, V=50):
    """What the main loop hands the training step: scores, advantages, KL coefficients."""
    batch = collate(episodes, 0)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    scores = score_teacher(tiny_model(V, seed=3).eval(), batch, batch["loss_mask"], full=args.opd_loss == "full")
    old = score_teacher(tiny_model(V, seed=2), batch, batch["loss_mask"]).logp
    w = a.tdur_weights(old, scores.logp, batch["turn_id"], mask)
    grpo = a.grpo_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0]), 4)
    adv = a.hybrid_advantages(old, scores.logp, w, grpo, mask, kappa, rho, args.opd_loss == "sampled")
    kl_coef = kappa * w if args.opd_loss == "full" else torch.zeros_like(w)
    return batch, mask, scores, old, adv, kl_coef


@pytest.mark.parametrize("opd_loss", ["sampled", "full"])
def test_loss_is_the_trajectory_mean_of_the_definition(opd_loss):
    """The loss of a batch, written out: per token the clipped surrogate of the hybrid advantage (plus kappa w
    KL(pi_s || pi_t) for --opd-loss full), a token mean per trajectory, summed."""
    args = a.Args(opd_loss=opd_loss)
    episodes = synthetic_episodes()
    batch, mask, scores, old, adv, kl_coef = prepared(episodes, args)
    student = tiny_model(50, seed=2)
    share = (1.0 / mask.sum(1).clamp(min=1).float())[:, None].expand(mask.shape)
    mb = {**batch, "teacher_logp": scores.logp, "old_logp": old, "advantages": adv, "kl_coef": kl_coef, "token_share": share}
    if opd_loss == "full":
        mb["teacher_full"] = scores.full
    loss, stats = a.atod_loss(student, mb, args)
    ls = torch.log_softmax(student(input_ids=batch["input_ids"]).logits.float(), -1)
    lt = torch.log_softmax(tiny_model(50, seed=3)(input_ids=batch["input_ids"]).logits.float(), -1)
    ref = 0.0
    for b in range(len(episodes)):
        pos = mask[b].nonzero().squeeze(-1).tolist()
        terms = []
        for t in pos:
            lp = ls[b, t - 1, batch["input_ids"][b, t]]
            r = torch.exp(lp - old[b, t])
            term = -torch.min(r * adv[b, t], r.clamp(0.8, 1.2) * adv[b, t])
            if opd_loss == "full":
                term = term + kl_coef[b, t] * (ls[b, t - 1].exp() * (ls[b, t - 1] - lt[b, t - 1])).sum()
            terms.append(term)
        ref = ref + sum(terms) / len(pos)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)  # a sum of terms of both signs
    assert stats["clipped"] == 0 and stats["approx_kl"] == pytest.approx(0, abs=1e-5)  # ratio 1: same weights as old
    (g1,) = torch.autograd.grad(loss, student.model.embed_tokens.weight)
    assert g1.abs().sum() > 0


# ------------------------------------------------------------------------------ the training step
@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one in this process (FSDP2 needs one), without touching os.environ."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def plans_of(episodes, args, group=4):
    """Whole groups of `group` per mini-batch, one plan per epoch (as the main loop draws them)."""
    for j, ep in enumerate(episodes):
        ep.slot = j
    rng = random.Random(0)
    return [minibatch_plan([j // group for j in range(len(episodes))], args.num_minibatches, rng, together=True)
            for _ in range(args.update_epochs)]


def run_train_step(args, episodes, V=50):
    student = a.shard(tiny_model(V, seed=2), torch.device("cpu"), trainable=True)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    batch, mask, scores, old, adv, kl_coef = prepared(episodes, args)
    stats = a.train_step(student, optimizer, episodes, batch, scores, old, adv, kl_coef, {}, plans_of(episodes, args), args,
                         1, torch.device("cpu"))
    grads = {n: p.grad.full_tensor().clone() for n, p in student.named_parameters()}
    return stats, grads


@pytest.mark.parametrize("opd_loss", ["sampled", "full"])
def test_gradient_accumulation_and_the_trajectory_mean(process_group, opd_loss):
    """One mini-batch in one micro-batch or in many: the same gradient, equal to that of the mean over
    trajectories of their token means (the loss written out in the previous test)."""
    episodes = synthetic_episodes()
    kw = dict(opd_loss=opd_loss, num_minibatches=1, max_grad_norm=1e9)
    one, g_one = run_train_step(a.Args(micro_batch_tokens=10**6, **kw), episodes)
    many, g_many = run_train_step(a.Args(micro_batch_tokens=20, **kw), episodes)
    assert one["grad_norm"] > 0 and one["grad_norm"] == pytest.approx(many["grad_norm"], rel=1e-5)
    args = a.Args(**kw)
    batch, mask, scores, old, adv, kl_coef = prepared(episodes, args)
    ref = tiny_model(50, seed=2)
    share = (1.0 / mask.sum(1).float())[:, None].expand(mask.shape)
    mb = {**batch, "teacher_logp": scores.logp, "old_logp": old, "advantages": adv, "kl_coef": kl_coef,
          "token_share": share, **({"teacher_full": scores.full} if opd_loss == "full" else {})}
    loss, _ = a.atod_loss(ref, mb, args)
    (loss / len(episodes)).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g_one[n], p.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(g_many[n], g_one[n], atol=1e-6, rtol=1e-5)


def test_mini_batch_without_signal_takes_no_step(process_group):
    """GRPO on flat groups: every advantage and KL weight zero, so a zero gradient. No optimizer step: after a
    step with signal, AdamW would still move the weights along its momentum. The skips are counted."""
    episodes = synthetic_episodes()
    args = a.Args(opd_loss="full", num_minibatches=2, max_grad_norm=1e9, micro_batch_tokens=10**6)
    student = a.shard(tiny_model(50, seed=2), torch.device("cpu"), trainable=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.01)
    batch, mask, scores, old, adv, kl_coef = prepared(episodes, args)
    plans = plans_of(episodes, args)
    stats = a.train_step(student, optimizer, episodes, batch, scores, old, adv, kl_coef, {}, plans, args, 1, torch.device("cpu"))
    assert stats["no_signal_steps"] == 0 and stats["grad_norm"] > 0  # momentum built up
    before = {n: p.full_tensor().detach().clone() for n, p in student.named_parameters()}
    stats = a.train_step(student, optimizer, episodes, batch, scores, old, adv * 0, kl_coef * 0, {}, plans, args, 1,
                         torch.device("cpu"))
    assert stats["no_signal_steps"] == 2 and stats["loss"] == 0
    assert all(torch.equal(before[n], p.full_tensor()) for n, p in student.named_parameters())


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_run_trains_and_saves_a_loadable_model(tmp_path):
    from common.models import load_model

    out = run(SMOKE + ["--total-iterations", "2"], tmp_path)
    assert "teacher tiny-expert:peckingorder-imperfect" in out.stdout  # the default env's imperfect teacher
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    for tag in ["charts/success_rate", "charts/turn_weight_mean", "charts/reward_std_in_group", "losses/clipfrac",
                "losses/approx_kl", "schedule/kappa", "schedule/rho", "eval/success_rate", "eval/best_success_rate",
                "time/rollout", "teacher/success_rate"]:
        assert scalars(run_dir, tag), tag
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    assert list(scalars(run_dir, "schedule/kappa").values()) == pytest.approx([1.0, 0.1])  # anneal auto: 1 of 2
    final = final_weights(run_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]
    initial = load_model("tiny")[0].state_dict()
    assert all(torch.equal(final[k], ckpt[k]) for k in ckpt)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_torchrun_two_ranks_gives_the_single_process_run(tmp_path):
    """The same 16 episodes (4 groups of 4, sampled at temperature 1 from per-group generators) as 1 rank x 16
    envs and 2 ranks x 8 envs, whole groups per rank: same losses, gradient norms and weights, with groups
    whose rewards differ and episodes that end at different turns."""
    common = MIXED + ["--total-iterations", "2", "--num-minibatches", "2", "--eval-interval", "2", "--update-epochs", "2"]
    run(common + ["--num-envs", "16", "--runs-dir", "one"], tmp_path)
    run(common + ["--num-envs", "8", "--runs-dir", "two"], tmp_path, torchrun=2)
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "two" / "*"))
    assert_same_run(one, two, ["losses/loss", "losses/grad_norm", "losses/reverse_kl", "losses/clipfrac",
                               "charts/episode_turns", "charts/reward_std_in_group", "charts/turn_weight_mean",
                               "eval/success_rate"])
    turns, std = scalars(one, "charts/episode_turns"), scalars(one, "charts/reward_std_in_group")
    assert 1 < turns[1] < 5 and all(s > 0 for s in std.values())  # not degenerate: early ends, rewards differ
    assert all(v > 0 for v in scalars(two, "losses/clipfrac").values())  # later mini-batches moved off ratio 1
    w1, w2 = final_weights(one), final_weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-5) for k in w1)


@pytest.mark.parametrize("ranks", [1, 2])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, ranks):
    """Killed after its first checkpoint (iteration 2 of 4) and resumed: the same logged numbers (the best
    held-out success included) and final weights as the uninterrupted run."""
    args = MIXED + ["--num-envs", str(8 // ranks), "--total-iterations", "4", "--num-minibatches", "2",
                    "--eval-interval", "1", "--save-interval", "2", "--anneal-iterations", "3"]
    run(args + ["--runs-dir", "full"], tmp_path, torchrun=ranks if ranks > 1 else 0)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    cut = kill_after_first_checkpoint(launcher + [os.path.join(ROOT, "atod.py")] + args + ["--runs-dir", "cut"],
                                       tmp_path, "cut")
    run(args + ["--runs-dir", "cut", "--resume", cut], tmp_path, torchrun=ranks if ranks > 1 else 0)
    (full,) = glob.glob(str(tmp_path / "full" / "*"))
    assert_same_run(full, cut, ["losses/loss", "losses/grad_norm", "charts/success_rate", "charts/episode_turns",
                                "schedule/kappa", "eval/success_rate", "eval/best_success_rate"])
    w1, w2 = final_weights(full), final_weights(cut)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


# (the arguments every script shares are checked in common/ and tested with guided_opd.py)
@pytest.mark.parametrize("args,expected", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--num-envs", "6", "--group-size", "4"], "--num-envs (6) must be a multiple of --group-size (4)"),
    (["--temperature", "0.7", "--opd-loss", "sampled"], "--temperature must be 1 with --opd-loss sampled"),
    (["--clip-eps", "0"], "--clip-eps must be positive"),
    (["--update-epochs", "0"], "--update-epochs at least 1"),
    (["--teacher", "nosuchmodel"], "unknown model"),
    (["--resume", "no/such/run"], "no checkpoint"),
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


def test_real_student_defaults():
    """A real student: the paper's rate (constant), 150 iterations, groups of 8, 4 mini-batches at most."""
    from common.models import fill_defaults

    args = a.Args(student="qwen3-1.7b", teacher="qwen3-8b", env="alfworld")
    fill_defaults(args, a.TINY, a.REAL, a.REAL_LOSSES, required=("env", "teacher"))
    assert (args.learning_rate, args.lr_schedule, args.total_iterations, args.group_size, args.num_minibatches,
            args.opd_loss) == (1e-6, "constant", 150, 8, 4, "topk")
    tiny = a.Args()
    fill_defaults(tiny, a.TINY, a.REAL, a.REAL_LOSSES, required=("env", "teacher"))
    assert (tiny.env, tiny.total_iterations, tiny.num_minibatches, tiny.group_size) == ("twx:peckingorder", 30, 4, 4)


def test_plan_prints_the_table_and_loads_no_weights(tmp_path, qwen3_shaped):
    m = qwen3_shaped
    p = run(["--student", m, "--teacher", m, "--env", "twx:peckingorder", "--plan"], tmp_path, timeout=120)
    assert "memory plan: student" in p.stdout and "peak" in p.stdout and "8 rank(s)" in p.stdout, p.stdout
    assert "Loading weights" not in p.stdout + p.stderr and not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("args,expected", [
    (["--env", "twx:peckingorder"], "needs --teacher"),
    ([], "needs --env and --teacher"),
])
def test_real_student_without_teacher_or_env_is_one_line(tmp_path, qwen3_shaped, args, expected):
    p = run(["--student", qwen3_shaped] + args, tmp_path, check=False, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and expected in last and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_more_minibatches_than_groups_is_one_line(tmp_path):
    """The tiny default's global batch holds 16 / 4 = 4 groups: a mini-batch holds whole groups, so 8 cannot be."""
    p = run(["--num-minibatches", "8"], tmp_path, check=False, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "--num-minibatches 8" in last and "4 groups" in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_qwen3_shaped_run_with_every_memory_saving(tmp_path, qwen3_shaped):
    """Qwen3-shaped student and teacher (the real defaults: top-k loss), rollouts gathering by layer one episode at
    a time, activation checkpointing: it trains and logs its measured peak memory beside the plan's. Auto
    mini-batches: the batch's single group, so no empty mini-batch (no step without signal)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m, teacher = qwen3_shaped, str(tmp_path / "teacher")  # the teacher: the student's weights, moved (a KL to learn)
    model = AutoModelForCausalLM.from_pretrained(m)
    torch.manual_seed(1)
    with torch.no_grad():
        model.model.norm.weight.add_(torch.randn_like(model.model.norm.weight))
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(m).save_pretrained(teacher)
    p = run(["--student", m, "--teacher", teacher, "--env", "twx:peckingorder", "--total-iterations", "2", "--num-envs", "2",
             "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "512",
             "--eval-episodes", "2", "--eval-interval", "2", "--rollout-gather", "layers", "--rollout-chunk", "1",
             "--activation-checkpointing"], tmp_path, timeout=300)
    assert "activation checkpointing on, rollouts gather by layer" in p.stdout and "1 episode(s) decoded at once" in p.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert all(v > 0 for v in scalars(run_dir, "memory/peak_gib").values()) and scalars(run_dir, "memory/plan_gib")
    assert list(scalars(run_dir, "losses/no_signal_steps").values()) == [0, 0]
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    assert os.path.exists(os.path.join(run_dir, "final", "config.json"))
