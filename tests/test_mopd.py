"""mopd.py: the losses against their definitions, the sequence-mean reduction, routing, the batch's domain mix,
the training step under FSDP2 in-process, and end-to-end runs in a subprocess (single process, torchrun with
2 ranks, interrupted and resumed, bad input).

The end-to-end comparisons use a smoke-recipe expert as the student (`--student tiny-expert:coin`): it writes
valid, mostly wrong actions, so greedy episodes end at different turns (a wrong action ends a simonsays or
peckingorder game) and ranks get uneven work; the other domains' experts teach it."""

from __future__ import annotations

import glob
import math
import os
import random
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import mopd as m
from common.episode import STUDENT, Episode, collate
from common.runs import minibatch_plan
from common.teacher import Teachers, score_teacher

from end_to_end import assert_same_run, final_weights, kill_after_first_checkpoint, run_script, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, torchrun=0, timeout=600, check=True):
    """mopd.py in a subprocess (see end_to_end.run_script)."""
    return run_script("mopd.py", args, tmp_path, torchrun, timeout, check)


SMOKE = ["--num-envs", "3", "--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4", "--max-new-tokens", "8",
         "--eval-interval", "2", "--save-interval", "2"]
# not degenerate: episodes that end early, several micro-batches per mini-batch (ranks with fewer join with an
# empty one), greedy so that runs can be compared exactly
MIXED = ["--student", "tiny-expert:coin", "--temperature", "0", "--max-turns", "5", "--max-new-tokens", "8",
         "--micro-batch-tokens", "500", "--eval-episodes", "2"]


# ---------------------------------------------------------------------------------------------- losses
def test_losses_are_zero_when_teacher_is_student():
    logp = torch.log_softmax(torch.randn(5, 7), -1)
    lp = logp[:, 0].clone().requires_grad_()
    loss = m.sampled_reverse_kl(lp, lp.detach(), adv_clip=5.0).sum()
    loss.backward()
    assert loss.item() == 0 and torch.all(lp.grad == 0)
    assert torch.allclose(m.full_reverse_kl(logp, logp), torch.zeros(5), atol=1e-6)
    assert torch.allclose(m.topk_reverse_kl(logp[:, :3], logp[:, :3]), torch.zeros(5), atol=1e-6)


def test_clipped_advantage_clips():
    logp_s = torch.tensor([-1.0, -2.0, -0.5, -3.0, -9.0], requires_grad=True)
    logp_t = torch.tensor([-9.0, -1.0, -0.5, -1.0, -1.0])  # advantages -8, 1, 0, 2, 8
    (grad,) = torch.autograd.grad(m.sampled_reverse_kl(logp_s, logp_t, adv_clip=5.0).sum(), logp_s)
    assert torch.allclose(grad, torch.tensor([5.0, -1.0, 0.0, -2.0, -5.0]))  # -A_t, with A_t within +-5
    (grad,) = torch.autograd.grad(m.sampled_reverse_kl(logp_s, logp_t, adv_clip=0.0).sum(), logp_s)
    assert torch.allclose(grad, torch.tensor([8.0, -1.0, 0.0, -2.0, -8.0]))  # 0 = no clip


def test_pg_has_the_reverse_kl_gradient_in_expectation():
    # E_{y ~ pi_s}[grad of -A(y) log pi_s(y)] = grad KL(pi_s || pi_t): enumerate y exactly (no clip reached)
    torch.manual_seed(0)
    theta = torch.randn(11, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(11), -1)
    logp_s = torch.log_softmax(theta, -1)
    expected = sum(logp_s[y].exp().detach() * m.sampled_reverse_kl(logp_s[y], teacher[y], 5.0) for y in range(11))
    (grad_pg,) = torch.autograd.grad(expected, theta)
    (grad_full,) = torch.autograd.grad(m.full_reverse_kl(torch.log_softmax(theta, -1), teacher), theta)
    assert torch.allclose(grad_pg, grad_full, atol=1e-6)


def test_topk_with_the_whole_vocabulary_is_the_full_reverse_kl():
    torch.manual_seed(0)
    s, t = torch.log_softmax(torch.randn(6, 9), -1), torch.log_softmax(2 * torch.randn(6, 9), -1)
    topk_t, ids = t.topk(9, dim=-1)
    assert torch.allclose(m.topk_reverse_kl(s.gather(-1, ids), topk_t), m.full_reverse_kl(s, t), atol=1e-6)
    assert m.full_reverse_kl(s, t).min() > 0.05


def test_topk_truncated_on_a_toy_case():
    # p_s = (0.5, 0.3, 0.2), p_t = (0.6, 0.3, 0.1), k = 2: the teacher's top 2 are tokens 0 and 1, so
    # 0.5 log(0.5/0.6) - 0.5 + 0.6 + 0.3 log(0.3/0.3) - 0.3 + 0.3 = 0.5 log(5/6) + 0.1
    s, t = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.6, 0.3, 0.1]).log()
    topk_t, ids = t.topk(2)
    value = m.topk_reverse_kl(s[ids], topk_t)
    assert value.item() == pytest.approx(0.5 * math.log(5 / 6) + 0.1, abs=1e-6)
    assert value.item() == pytest.approx(0.0088392, abs=1e-6)
    # not renormalised: the truncated sum differs from the KL of the renormalised top-k
    s2, t2 = torch.log_softmax(s[ids], -1), torch.log_softmax(topk_t, -1)
    assert abs(value.item() - m.full_reverse_kl(s2, t2).item()) > 1e-3


def test_topk_tail_is_the_kl_of_the_buckets_on_a_toy_case():
    # the same toy with the tail bucket: tokens {0}, {1}, rest {2} -> the whole KL here (the tail is one token)
    s, t = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.6, 0.3, 0.1]).log()
    topk_t, ids = t.topk(2)
    value = m.topk_reverse_kl(s[ids], topk_t, tail=True)
    assert value.item() == pytest.approx(m.full_reverse_kl(s, t).item(), abs=1e-6)
    # with the whole vocabulary the tail is empty (floored at 1e-6 on both sides: a zero term)
    torch.manual_seed(0)
    s, t = torch.log_softmax(torch.randn(6, 9), -1), torch.log_softmax(2 * torch.randn(6, 9), -1)
    topk_t, ids = t.topk(9, dim=-1)
    assert torch.allclose(m.topk_reverse_kl(s.gather(-1, ids), topk_t, tail=True), m.full_reverse_kl(s, t), atol=1e-5)


def test_topk_tail_holds_the_mass_outside_the_teachers_topk_down():
    """A near one-hot teacher and a student with much of its mass outside the teacher's top 4: without the tail
    bucket the truncated loss raises every token outside (the drift that collapsed the tiny student); with it
    they all fall, as under the exact reverse KL."""
    V, k = 200, 4
    torch.manual_seed(0)
    z_t = torch.randn(V)
    z_t[0] = 25.0
    logp_t = torch.log_softmax(z_t, -1)
    z = torch.randn(V)
    z[0] = 2.0
    z.requires_grad_(True)
    top = logp_t.topk(k).indices
    outside = torch.ones(V, dtype=torch.bool)
    outside[top] = False
    grads = {}
    for tail in (False, True):
        (grads[tail],) = torch.autograd.grad(m.topk_reverse_kl(torch.log_softmax(z, -1)[top], logp_t[top], tail), z)
    (exact,) = torch.autograd.grad(m.full_reverse_kl(torch.log_softmax(z, -1)[None], logp_t[None]).sum(), z)
    (tail_mass,) = torch.autograd.grad(torch.softmax(z, -1)[outside].sum(), z)
    # a small step against each gradient changes the mass outside the top-k by -lr * <grad of that mass, g>
    assert (tail_mass @ exact) > 0             # the exact loss lowers it
    assert (grads[False][outside] < 0).all()   # the paper's truncated form raises every token outside
    assert (tail_mass @ grads[True]) > 0       # the tail bucket lowers their mass, as the exact loss does
    cos = {tail: torch.cosine_similarity(g, exact, 0).item() for tail, g in grads.items()}
    assert cos[True] > 0.9 and cos[True] - cos[False] > 0.3  # 0.96 and 0.54 here


def filled(**kw):
    """Args as a tiny run has them after fill_defaults (its three domains among them), with `kw` set."""
    return m.Args(**{**m.TINY, **kw})


def tiny_model(vocab=50, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return Qwen3ForCausalLM(cfg)


def hand_made_batch(V=50, T=14):
    """Three trajectories with 5, 1 and 2 trained tokens, in separate runs, from domains 0, 1 and 0."""
    ids = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.zeros(3, T, dtype=torch.bool)
    loss_mask[0, 3:5] = loss_mask[0, 9:12] = loss_mask[1, 13] = loss_mask[2, 6:8] = True
    domain = torch.tensor([0, 1, 0])[:, None].expand(3, T)
    return {"input_ids": ids, "attention_mask": torch.ones(3, T, dtype=torch.long), "loss_mask": loss_mask, "domain": domain}


@pytest.mark.parametrize("loss, tail", [("pg", True), ("topk", False), ("topk", True), ("full", True)])
def test_loss_is_the_mean_over_trajectories_of_their_token_means(loss, tail):
    """The micro-batch loss = sum over trajectories of (1/|y|) sum_t loss_t, position by position against the
    definitions written out with plain forward passes (position t is predicted from t - 1)."""
    V = 50
    student, teacher = tiny_model(V, 0), tiny_model(V, 1).eval()
    batch = hand_made_batch(V)
    k = 5
    scores = score_teacher(teacher, batch, batch["loss_mask"], topk=k if loss == "topk" else 0, full=loss == "full")
    mb = {**batch, "teacher_logp": scores.logp, "teacher_full": scores.full, "teacher_topk_logp": scores.topk_logp,
          "teacher_topk_ids": scores.topk_ids}
    mb = {key: v for key, v in mb.items() if v is not None}
    args = filled(loss=loss, topk=k, adv_clip=0.5, topk_tail=tail)
    total, stats = m.mopd_loss(student, mb, args)
    ls = torch.log_softmax(student(input_ids=batch["input_ids"]).logits.float(), -1)
    lt = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits.float(), -1)
    ref = 0.0
    for b in range(3):
        per_token = []
        for t in batch["loss_mask"][b].nonzero().squeeze(-1).tolist():
            p_s, p_t, y = ls[b, t - 1], lt[b, t - 1], batch["input_ids"][b, t]
            if loss == "pg":
                per_token.append(-(p_t[y] - p_s[y]).detach().clamp(-0.5, 0.5) * p_s[y])
            elif loss == "full":
                per_token.append((p_s.exp() * (p_s - p_t)).sum())
            else:
                top, ids = p_t.topk(k)
                term = (p_s[ids].exp() * (p_s[ids] - top) - p_s[ids].exp() + top.exp()).sum()
                if tail:  # the bucket of the other tokens: q_s = 1 - sum p_s(top), q_t the same
                    q_s, q_t = 1 - p_s[ids].exp().sum(), 1 - top.exp().sum()
                    term = term + q_s * (q_s.log() - q_t.log()) - q_s + q_t
                per_token.append(term)
        ref = ref + sum(per_token) / len(per_token)
    assert torch.allclose(total, ref, atol=1e-5) and stats["sequences"] == 3 and stats["tokens"] == 8
    (g1,) = torch.autograd.grad(total, student.lm_head.weight)
    (g2,) = torch.autograd.grad(ref, student.lm_head.weight)
    assert torch.allclose(g1, g2, atol=1e-6)
    # the per-domain statistics split the trajectories by domain
    assert stats["0/sequences"] == 2 and stats["1/sequences"] == 1
    assert stats["0/reverse_kl"] + stats["1/reverse_kl"] == pytest.approx(stats["reverse_kl"], abs=1e-5)


# ------------------------------------------------------------------------------ routing and domains
def test_each_trajectory_is_scored_by_its_domains_teacher():
    V = 50
    domains = [("simonsays", "twx:simonsays", "A"), ("coin", "twx:coin", "B"), ("peckingorder", "twx:peckingorder", "C")]
    models = {"A": tiny_model(V, 1).eval(), "B": tiny_model(V, 2).eval(), "C": tiny_model(V, 3).eval()}
    batch = hand_made_batch(V)
    rows = ["coin", "simonsays", "coin"]
    for route, expected in [("domain", ["B", "A", "B"]), ("peckingorder", ["C", "C", "C"])]:
        table = m.routing(domains, route)
        names = [table[d] for d in rows]
        assert names == expected
        scores = Teachers(models).score(batch, batch["loss_mask"], names, topk=3, full=True)
        fulls = []
        for b, name in enumerate(names):
            alone = score_teacher(models[name], {k: v[b:b + 1] for k, v in batch.items()}, batch["loss_mask"][b:b + 1],
                                  topk=3, full=True)
            assert torch.allclose(scores.logp[b], alone.logp[0], atol=1e-6)
            assert torch.equal(scores.topk_ids[b], alone.topk_ids[0])
            fulls.append(alone.full)
        assert torch.allclose(scores.full, torch.cat(fulls), atol=1e-6)  # full rows in the batch's mask order
    with pytest.raises(SystemExit, match="--route must be `domain` or a domain's name"):
        m.routing(domains, "sorting")


def test_parse_domains_names_and_teachers():
    parsed = m.parse_domains(["twx:simonsays", "twx:coin:numLocations=4,includeDoors=0@some/teacher"], "tiny")
    assert parsed == [("simonsays", "twx:simonsays", "tiny-expert:simonsays"),
                      ("coin", "twx:coin:numLocations=4,includeDoors=0", "some/teacher")]
    # two specs of one game keep their whole spec as the name
    two = m.parse_domains(["twx:coin:includeDoors=0@a/b", "twx:coin:includeDoors=1@a/b"], "qwen3-1.7b")
    assert [n for n, _, _ in two] == ["twx:coin:includeDoors=0", "twx:coin:includeDoors=1"]
    with pytest.raises(SystemExit, match="domain 'alfworld' has no teacher: pass it as alfworld@TEACHER"):
        m.parse_domains(["alfworld"], "qwen3-1.7b")


def test_domain_draws_have_fixed_ratios_and_do_not_depend_on_ranks():
    draws = m.domain_draws(3, 16, [1, 1, 1], seed=1)
    assert sorted(draws.count(d) for d in range(3)) == [5, 5, 6]
    assert draws == m.domain_draws(3, 16, [1, 1, 1], seed=1)  # every rank computes the same list
    paper = m.domain_draws(0, 20, [0.35, 0.35, 0.30], seed=1)
    assert [paper.count(d) for d in range(3)] == [7, 7, 6]
    # over many iterations the odd episode goes to every domain alike
    counts = [sum(m.domain_draws(i, 16, [1, 1, 1], seed=2).count(d) for i in range(300)) for d in range(3)]
    assert max(counts) - min(counts) < 100 and sum(counts) == 4800


def test_a_failing_environment_ends_its_episode_named_by_its_domain():
    """The episode is marked failed (Run.drop_failed drops it, tests/test_faults.py), the others play on."""
    from transformers import AutoTokenizer

    from common import tiny

    tok = AutoTokenizer.from_pretrained(tiny.model_path("tokenizer"))

    class Env:
        concurrent = True  # stepped in threads (envs.call_all): the error still reaches its episode

        def __init__(self, broken: bool):
            self.broken = broken

        def reset(self, seed):
            return "You are in the kitchen.", {"task": "twx:coin"}

        def system_prompt(self):
            return "Find the coin."

        def step(self, action):
            if self.broken:
                raise RuntimeError("the game server went away")
            return "Nothing happens.", 0.0, False, {"success": False, "score": 0.0, "invalid": False}

    args = filled(max_new_tokens=4, max_seq_len=512)
    episodes = m.rollout(tiny_model(len(tok)), tok, [Env(False), Env(True), Env(False)], ["simonsays", "coin", "simonsays"],
                         [0, 1, 2], args, torch.Generator(), 1.0, max_turns=2)
    assert [(ep.task, ep.error) for ep in episodes] == [("simonsays", ""), ("coin", "RuntimeError: the game server went away"),
                                                        ("simonsays", "")]


# ------------------------------------------------------------------------------ the training step
@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one in this process (FSDP2 needs one), without touching os.environ."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def synthetic_episodes(V=50, n=6):
    """Student episodes of different lengths and turns, from two domains."""
    rng = torch.Generator().manual_seed(0)
    episodes = []
    for i in range(n):
        ep = Episode(ids=[], loss_mask=[], turn_id=[], role=[], task=str(i % 2))
        for turn in range(1 + i % 3):
            obs = torch.randint(1, V, (int(torch.randint(2, 6, (1,), generator=rng)),), generator=rng).tolist()
            reply = torch.randint(1, V, (int(torch.randint(1, 5, (1,), generator=rng)),), generator=rng).tolist()
            ep.ids += obs + reply
            ep.loss_mask += [0] * len(obs) + [1] * len(reply)
            ep.turn_id += [-1] * len(obs) + [turn] * len(reply)
            ep.role += [0] * len(obs) + [STUDENT] * len(reply)
        episodes.append(ep)
    return episodes


def run_train_step(args, episodes, V=50):
    student = m.shard(tiny_model(V, seed=2), torch.device("cpu"), trainable=True)
    teacher = tiny_model(V, seed=3).eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = collate(episodes, 0)
    batch["domain"] = torch.tensor([int(e.task) for e in episodes])[:, None].expand_as(batch["input_ids"])
    scores = score_teacher(teacher, batch, batch["loss_mask"], topk=args.topk if args.loss == "topk" else 0,
                           full=args.loss == "full")
    for j, ep in enumerate(episodes):
        ep.slot = j
    plan = minibatch_plan([ep.task for ep in episodes], args.num_minibatches, random.Random(0))
    stats = m.train_step(student, optimizer, episodes, batch, scores, None, plan, args, 1, torch.device("cpu"))
    grads = {n: p.grad.full_tensor().clone() for n, p in student.named_parameters()}
    return stats, grads, batch, scores


@pytest.mark.parametrize("loss", ["pg", "full", "topk"])
def test_gradient_accumulation_equals_the_mean_over_trajectories(process_group, loss):
    """One mini-batch in many micro-batches: the gradient of the hand-written loss, the mean over all its
    trajectories of their token means (not the token mean of the batch)."""
    episodes = synthetic_episodes()
    args = filled(loss=loss, topk=7, num_minibatches=1, max_grad_norm=1e9, micro_batch_tokens=20, adv_clip=1.0)
    _, grads, batch, scores = run_train_step(args, episodes)
    ref = tiny_model(50, seed=2)
    mb = {**batch, "teacher_logp": scores.logp, "teacher_full": scores.full, "teacher_topk_logp": scores.topk_logp,
          "teacher_topk_ids": scores.topk_ids}
    total, stats = m.mopd_loss(ref, {k: v for k, v in mb.items() if v is not None}, args)
    (total / stats["sequences"]).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-4)
    token_mean_differs = stats["tokens"] != stats["sequences"]
    assert token_mean_differs and stats["sequences"] == len(episodes)


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_run_trains_and_saves_a_loadable_model(tmp_path):
    from common.models import load_model

    out = run(SMOKE + ["--total-iterations", "2"], tmp_path)
    assert "coin (twx:coin:numLocations=4,includeDoors=0) scored by tiny-expert:coin-same-origin" in out.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    for tag in ["charts/success_rate", "charts/coin/success_rate", "losses/reverse_kl", "losses/simonsays/reverse_kl",
                "eval/success_rate", "eval/normalised_mean", "eval/normalised_min", "eval/peckingorder/success_rate",
                "eval/peckingorder/normalised", "teacher/simonsays/success_rate", "time/rollout"]:
        assert scalars(run_dir, tag), tag
    assert all(v > 0 for v in scalars(run_dir, "losses/grad_norm").values())
    # the final save is the checkpoint's model, and training moved it away from the initial student
    final = final_weights(run_dir)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    initial = load_model("tiny")[0].state_dict()
    assert all(torch.equal(final[k], ckpt["model"][k]) for k in ckpt["model"])
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    assert set(ckpt["extra"]["baseline"]) == {"simonsays", "peckingorder", "coin"}


@pytest.mark.parametrize("loss", ["full", "topk"])
def test_torchrun_two_ranks_gives_the_single_process_run(tmp_path, loss):
    """The same 8 episodes a step (greedy) as 1 rank x 8 envs and 2 ranks x 4 envs: same losses, gradient
    norms and weights, with episodes ending at different turns and uneven work per rank."""
    common = MIXED + ["--total-iterations", "2", "--num-minibatches", "2", "--eval-interval", "2", "--loss", loss]
    run(common + ["--num-envs", "8", "--runs-dir", "one"], tmp_path)
    run(common + ["--num-envs", "4", "--runs-dir", "two"], tmp_path, torchrun=2)
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "two" / "*"))
    assert_same_run(one, two, ["losses/loss", "losses/reverse_kl", "losses/grad_norm", "losses/coin/reverse_kl",
                               "charts/episode_turns", "charts/simonsays/episode_turns", "eval/success_rate"])
    turns = scalars(one, "charts/episode_turns")
    assert 1 < turns[1] < 5  # not degenerate: some episodes of the first iteration end early
    assert all(v > 0 for v in scalars(two, "losses/grad_norm").values())
    w1, w2 = final_weights(one), final_weights(two)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6, rtol=1e-5) for k in w1)


@pytest.mark.parametrize("ranks", [1, 2])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, ranks):
    """Killed after its first checkpoint (iteration 2 of 4) and resumed: the same logged numbers (normalised
    scores from the baseline kept in the checkpoint) and final weights as the uninterrupted run; with sampling
    (temperature 1), so every rank's random states matter."""
    args = SMOKE + ["--total-iterations", "4", "--micro-batch-tokens", "300", "--loss", "pg"]
    run(args + ["--runs-dir", "full"], tmp_path, torchrun=ranks if ranks > 1 else 0)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1 else [sys.executable])
    cut = kill_after_first_checkpoint(launcher + [os.path.join(ROOT, "mopd.py")] + args + ["--runs-dir", "cut"],
                                       tmp_path, "cut")
    run(args + ["--runs-dir", "cut", "--resume", cut], tmp_path, torchrun=ranks if ranks > 1 else 0)
    (full,) = glob.glob(str(tmp_path / "full" / "*"))
    assert_same_run(full, cut, ["losses/loss", "charts/success_rate", "charts/episode_turns", "eval/success_rate",
                                "losses/grad_norm", "eval/coin/success_rate"])
    w1, w2 = final_weights(full), final_weights(cut)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("args,expected", [
    (["--student", "qwen3-1.7b", "--domains", "twx:simonsays"], "domain 'twx:simonsays' has no teacher"),
    (["--domains", "twx:sorting"], "domain 'twx:sorting' has no teacher: pass it as twx:sorting@TEACHER"),
    (["--domains", "twx:simonsays", "twx:simonsays@tiny-expert:coin"], "--domains needs distinct environments"),
    (["--domain-weights", "1", "2"], "--domain-weights needs 3 positive numbers"),
    (["--domain-weights", "1", "0", "1"], "--domain-weights needs 3 positive numbers"),
    (["--domains", "twx:simonsays@nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["--domains", "twx:nosuchgame@tiny-expert:coin"], "unknown env"),
    (["--route", "sorting"], "--route must be `domain` or a domain's name"),
    (["--temperature", "0.7", "--loss", "pg"], "--temperature must be 1 with --loss pg"),
    (["--topk", "0"], "--topk at least 1"),
    (["--resume", "no/such/run"], "no checkpoint"),
    (["--num-minibatches", "5"], "--num-minibatches must be between 1 and --num-envs"),
    (["--user-model", "tiny"], "--user-model is for conversational envs"),
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
    p = run(SMOKE + ["--domains", "twx:simonsays", f"twx:coin@{tmp_path / 'other'}"], tmp_path, check=False, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "vocabulary" in last and str(len(tok) + 7) in last, p.stderr[-2000:]


@pytest.mark.needs_env("tau2")
def test_tau2_domain_beside_a_game_with_a_model_customer(tmp_path, qwen3_shaped):
    """A conversational domain (tau2:airline) beside a game, with the Qwen3 token format: the customer played by a
    model (`--user-model`), given to the tau2 domain's envs only (a game takes no customer); --loss pg (real)."""
    m = qwen3_shaped
    p = run(["--domains", f"tau2:airline@{m}", f"twx:simonsays@{m}", "--student", m, "--user-model", m, "--num-envs", "2",
             "--total-iterations", "1", "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "9000",
             "--num-minibatches", "1", "--eval-episodes", "1", "--learning-rate", "1e-3"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert "airline success" in p.stdout and os.path.exists(os.path.join(run_dir, "final", "config.json"))
    assert set(scalars(run_dir, "eval/airline/success_rate")) == {0, 1}
    import envs  # the customer's opening in the logged episode is the model's, not the scripted stand-in's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    acc.Reload()
    shown = acc.Tensors("eval/airline/trajectory/text_summary")[-1].tensor_proto.string_val[0].decode()
    scripted, _ = envs.make("tau2:airline", seed=1, split="heldout").reset(0)
    assert "airline" in shown and scripted not in shown


# ------------------------------------------------------------------------- real students: plan and memory
def test_plan_prints_the_table_and_loads_no_weights(tmp_path, qwen3_shaped):
    m_ = qwen3_shaped
    p = run(["--student", m_, "--domains", f"twx:simonsays@{m_}", "--plan"], tmp_path, timeout=120)
    out = p.stdout + p.stderr
    for row in ("GiB per rank", "student weights, gradients and AdamW state", "teacher scoring:", "peak", "fits",
                "rollout gather", "rollout chunk"):
        assert row in out, out[-3000:]
    assert "Loading weights" not in out and not (tmp_path / "runs").exists()  # configs only: no model, no run


def test_a_real_student_needs_domains(tmp_path):
    p = run(["--student", "qwen3-1.7b"], tmp_path, check=False, timeout=120)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "needs --domains" in lines[0], p.stderr[-2000:]


@pytest.mark.parametrize("ranks", [1])  # 2 ranks at this shape: two_phase's test (the suite's time)
def test_real_shaped_run_with_the_least_memory_settings(tmp_path, qwen3_shaped, ranks):
    """A Qwen3-shaped student and teacher (the same model: the loss and its gradient are 0, so the run must end
    with the model it started from) with rollouts gathered by layer, one episode decoded at a time and
    activation checkpointing."""
    m_ = qwen3_shaped
    p = run(["--student", m_, "--domains", f"twx:simonsays@{m_}", "--num-envs", "2", "--total-iterations", "2",
             "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "512", "--eval-episodes", "2",
             "--rollout-gather", "layers", "--rollout-chunk", "1", "--activation-checkpointing"], tmp_path,
             torchrun=ranks if ranks > 1 else 0)
    assert "activation checkpointing on, rollouts gather by layer" in p.stdout and "1 episode(s) decoded at once" in p.stdout
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    peak, planned = scalars(run_dir, "memory/peak_gib"), scalars(run_dir, "memory/plan_gib")
    assert set(peak) == set(planned) == {1, 2} and all(v > 0 for v in peak.values())
    assert all(abs(v) < 1e-5 for v in scalars(run_dir, "losses/reverse_kl").values())
    start = Qwen3ForCausalLM.from_pretrained(m_).state_dict()
    final = final_weights(run_dir)
    assert all(torch.equal(final[k], start[k]) for k in start)
