"""The sampled-token losses teach: averaged over many samplings of the student's tokens, their gradient at the
student's parameters tends to the exact loss's (benchmark/grad_check.py, which runs the scripts' own loss
functions on a batch replicated K times, replica k holding the k-th draw at every position).

Small random Qwen3 models (vocabulary 64, the teacher's head scaled so that the two differ) on synthetic
episodes: a few seconds per test. Fixed seeds; tolerances from measurement: the correct estimators reach a
cosine of 0.997 at K = 4096 and 1 - 1e-6 in expectation; the mutations (the advantage without stop-gradient,
its sign flipped, atod's log pi_old with the current student's gradient) stay at or below 0.80 at K = 4096 and
0.95 in expectation; after the student moved, the stale advantage without a ratio stays below 0.25 where the
scripts' estimators reach 0.9 to 0.98."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import atod
import guided_opd
import mopd
from common.teacher import score_teacher

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark"))
import grad_check as gc  # noqa: E402

VOCAB = 64
TOPK = 16


@pytest.fixture(scope="module")
def case():
    """The student and teacher, 12 episodes: the first 6 are the states of the on-policy checks; the even and
    odd ones are two mini-batches."""
    student, teacher = gc.random_pair(vocab=VOCAB, seed=0)
    episodes = gc.synthetic_episodes(VOCAB, 12, seed=0)
    st = gc.make_states(teacher, episodes[:6], 0, VOCAB)  # the teacher's whole ranking: any top-k is a prefix
    params = [p for p in student.parameters() if p.requires_grad]
    return SimpleNamespace(student=student, teacher=teacher, episodes=episodes, st=st, params=params,
                           F=gc.student_rows(student, st), s=gc.Setting(topk=TOPK))


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# ------------------------------------------------------------------------------ the check runs the scripts' loss
def scripts_loss_on_the_batch(script: str, form: str, student, teacher, old, episodes_states, s) -> torch.Tensor:
    """The script's loss on the real batch, the student scored by common.teacher.token_logprobs, the mini-batch
    built and reduced as its train_step does (one micro-batch, one rank): the reference for the check's path."""
    b = episodes_states.batch
    mask = b["loss_mask"]
    sc = score_teacher(teacher, b, mask, full=True, topk=TOPK)
    old_logp = score_teacher(old, b, mask).logp
    mb = {k: b[k] for k in ("input_ids", "attention_mask", "loss_mask", "role")}
    mb.update(teacher_logp=sc.logp, teacher_full=sc.full, old_logp=old_logp)
    if script == "guided_opd":
        args = guided_opd.Args(student_loss="full" if form == "full" else "sampled", teacher_loss="none",
                               ratio_clip=s.ratio_clip if form == "ratio" else 0.0, adv_baseline=form == "baseline",
                               ratio_max=s.ratio_max if form == "importance" else 0.0)
        pg, ce, _ = guided_opd.guided_opd_loss(student, mb, args)
        return (pg + ce) / episodes_states.n
    if script == "mopd":
        loss = {"full": "full", "topk": "topk", "topk-tail": "topk"}.get(form, "pg")
        args = mopd.Args(loss=loss, adv_clip=s.mopd_adv_clip, topk=TOPK, domains=("d",), topk_tail=form == "topk-tail",
                         ratio_clip=s.ratio_clip if form == "ratio" else 0.0, ratio_max=s.ratio_max if form == "importance" else 0.0)
        mb["domain"] = torch.zeros_like(mb["input_ids"])
        mb["teacher_topk_logp"], mb["teacher_topk_ids"] = sc.topk_logp, sc.topk_ids
        if loss != "full":
            del mb["teacher_full"]
        loss_sum, _ = mopd.mopd_loss(student, mb, args)
        return loss_sum / len(episodes_states.batch["input_ids"])
    args = atod.Args(opd_loss="full" if form == "full" else "sampled", clip_eps=s.ratio_clip, weighting="none")
    scored = mask.clone()
    scored[:, 0] = False
    weights = scored.float()
    sampled = form != "full"
    mb["advantages"] = atod.hybrid_advantages(old_logp, sc.logp, weights, torch.zeros(len(mask)), scored, s.kappa, 1.0, sampled)
    mb["kl_coef"] = torch.zeros_like(weights) if sampled else s.kappa * weights
    n = scored.sum(1)
    mb["token_share"] = (1.0 / n.clamp(min=1).float())[:, None].expand(mask.shape)
    loss_sum, _ = atod.atod_loss(student, mb, args)
    return loss_sum / int((n > 0).sum())


@pytest.mark.parametrize("script,form", [("guided_opd", "full"), ("guided_opd", "sampled"), ("guided_opd", "ratio"),
                                         ("guided_opd", "importance"), ("mopd", "importance"),
                                         ("guided_opd", "baseline"), ("mopd", "full"), ("mopd", "pg"), ("mopd", "ratio"), ("mopd", "topk"),
                                         ("mopd", "topk-tail"), ("atod", "full"), ("atod", "surrogate")])
def test_the_check_computes_the_scripts_own_loss(case, script, form):
    # the check's replicated, compact batch with one replica holding the sequences' own tokens = the script's loss
    # on the real batch; the rollout-time student differs from the current one (ratios other than 1)
    old = gc.move(case.student, case.st, 1, 1e-2)
    old_rows = gc.student_rows(old, case.st).detach()
    reference = scripts_loss_on_the_batch(script, form, case.student, case.teacher, old, case.st, case.s)
    expected = flat(torch.autograd.grad(reference, case.params))
    y = None if form in ("full", "topk", "topk-tail") else case.st.targets[None]
    got = gc.param_grad(case.F, case.params, lambda rows: gc.script_loss(script, form, rows, case.st, case.s, y, old_rows))
    assert expected.norm() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ convergence to the exact gradient
@pytest.mark.parametrize("script,form", [("guided_opd", "sampled"), ("guided_opd", "ratio"), ("mopd", "pg"),
                                         ("mopd", "ratio"), ("atod", "surrogate")])
def test_sampled_gradient_tends_to_the_exact_one(case, script, form):
    # at the first mini-batch (ratio 1): the cosine grows with the samples and tends to 1
    gen = torch.Generator().manual_seed(0)
    exact = gc.exact_grad(script, case.F, case.st, case.s, case.params)
    res = gc.agreement(script, form, case.F, case.st, case.s, case.params, exact, [16, 256, 4096], 8, 2, gen)
    assert res[16][0] < res[256][0] < res[4096][0]
    assert res[16][0] > 0.4 and res[4096][0] > 0.99
    assert res["E"][0] > 1 - 1e-5 and res["norm"] == pytest.approx(1.0, abs=1e-3)  # unbiased: its expectation is exact


def test_topk_with_the_whole_vocabulary_has_the_exact_gradient(case):
    exact = gc.exact_grad("mopd", case.F, case.st, case.s, case.params)
    whole = gc.param_grad(case.F, case.params, lambda rows: gc.script_loss("mopd", "topk", rows, case.st,
                                                                           dataclasses.replace(case.s, topk=VOCAB)))
    torch.testing.assert_close(whole, exact, rtol=1e-4, atol=1e-7)
    part = gc.param_grad(case.F, case.params, lambda rows: gc.script_loss("mopd", "topk", rows, case.st, case.s))
    assert gc.cosine(part, exact) < 0.999  # truncated to the teacher's top 16 of 64: not the exact gradient


# ------------------------------------------------------------------------------ the check catches wrong advantages
@pytest.mark.parametrize("script,form,mutation", [("guided_opd", "sampled", "nodetach"), ("guided_opd", "sampled", "flip"),
                                                  ("mopd", "pg", "nodetach"), ("mopd", "pg", "flip"),
                                                  ("atod", "surrogate", "flip"), ("atod", "surrogate", "old_nodetach")])
def test_a_wrong_advantage_is_caught(case, script, form, mutation):
    gen = torch.Generator().manual_seed(0)
    exact = gc.exact_grad(script, case.F, case.st, case.s, case.params)
    right = gc.agreement(script, form, case.F, case.st, case.s, case.params, exact, [4096], 1, 2, gen)
    wrong = gc.agreement(script, form, case.F, case.st, dataclasses.replace(case.s, mutation=mutation), case.params,
                         exact, [4096], 1, 2, gen)
    assert right[4096][0] > 0.99
    assert wrong[4096][0] < 0.9
    if not math.isnan(wrong["E"][0]):
        assert wrong["E"][0] < 0.99  # biased, not only noisier


def test_atods_advantage_needs_no_stop_gradient(case):
    # inside atod's surrogate -r A, r = 1 in value: an advantage that keeps its gradient adds -r grad A =
    # kappa grad log pi_s(y), zero in expectation, so the check cannot catch it (it only adds noise)
    gen = torch.Generator().manual_seed(0)
    exact = gc.exact_grad("atod", case.F, case.st, case.s, case.params)
    res = gc.agreement("atod", "surrogate", case.F, case.st, dataclasses.replace(case.s, mutation="nodetach"),
                       case.params, exact, [4096], 1, 2, gen)
    assert res[4096][0] > 0.95


# ------------------------------------------------------------------------------ several mini-batches
@pytest.fixture(scope="module")
def moved(case):
    """The second mini-batch after 3 AdamW steps at 3e-2 on the first: the student moved far (mean KL(pi_old ||
    pi_s) about 0.06 per position, about as large as its KL to the teacher)."""
    st1, st2 = (gc.make_states(case.teacher, case.episodes[i::2], 0, TOPK) for i in (0, 1))
    F_old = gc.student_rows(case.student, st2).detach()
    student = gc.move(case.student, st1, 3, 3e-2)
    params = [p for p in student.parameters() if p.requires_grad]
    F = gc.student_rows(student, st2)
    return SimpleNamespace(st=st2, F_old=F_old, F=F, params=params, drift=gc.drift(F_old, F.detach(), 0.2)[0])


@pytest.mark.parametrize("script,form,low", [("guided_opd", "sampled", 0.95), ("mopd", "pg", 0.95), ("atod", "surrogate", 0.8)])
def test_a_stale_advantage_without_ratio_is_caught(case, moved, script, form, low):
    # tokens from the rollout-time student, gradient at the moved one: the script's estimator (the plain form with
    # the advantage recomputed from the current student; atod: its PPO surrogate) stays near the exact gradient
    # here, where the student is close to its teacher; -A_old log pi_s (the advantage stored at rollout, no
    # ratio) does not
    assert moved.drift > 0.03
    gen = torch.Generator().manual_seed(0)
    exact = gc.exact_grad(script, moved.F, moved.st, case.s, moved.params)
    right = gc.agreement(script, form, moved.F, moved.st, case.s, moved.params, exact, [4096], 1, 2, gen, old=moved.F_old)
    stale = gc.agreement(script, "stale", moved.F, moved.st, case.s, moved.params, exact, [4096], 1, 2, gen, old=moved.F_old)
    assert right[4096][0] > low and right["E"][0] > low
    assert stale[4096][0] < 0.5 and stale["E"][0] < 0.5


@pytest.mark.parametrize("script,form", [("guided_opd", "ratio"), ("mopd", "ratio"), ("atod", "surrogate")])
def test_the_ratio_turns_old_samples_into_current_ones(case, moved, script, form):
    # the scripts' ratio forms, clip wide open: over tokens drawn from the rollout-time student, their expected
    # gradient is exactly that of -A_old log pi_s over tokens drawn from the current student (importance
    # sampling); without the ratio it is not
    wide = dataclasses.replace(case.s, ratio_clip=1e9)
    old_p, cur_p = moved.F_old.exp(), moved.F.detach().exp()

    def grad(form_, expect=None, y=None):
        return gc.param_grad(moved.F, moved.params, lambda rows: gc.script_loss(script, form_, rows, moved.st, wide, y,
                                                                                moved.F_old, expect))
    reference = grad("stale", expect=cur_p)
    torch.testing.assert_close(grad(form, expect=old_p), reference, rtol=1e-4, atol=1e-7)
    assert gc.cosine(grad("stale", expect=old_p), reference) < 0.98  # no ratio: the old student's weights
    y = gc.draw(old_p, 4096, torch.Generator().manual_seed(0))
    assert gc.cosine(grad(form, y=y), reference) > 0.99
    assert gc.cosine(grad("stale", y=y), reference) < 0.98


@pytest.mark.parametrize("script", ["guided_opd", "mopd"])
def test_the_truncated_ratio_is_the_on_policy_gradient_and_follows_the_student(case, moved, script, monkeypatch):
    # the scripts' default for later mini-batches (the importance ratio, --ratio-max inf): (1) on the first
    # mini-batch (ratio 1) its gradient is the plain on-policy form's, draw for draw; (2) over tokens drawn by the
    # rollout-time student its expected gradient is the on-policy gradient at the moved student; truncated at 2
    # it is another; (3) a mutation that drops the ratio no longer gives that gradient
    plain = "sampled" if script == "guided_opd" else "pg"
    y = gc.draw(case.F.detach().exp(), 64, torch.Generator().manual_seed(0))

    def at_start(form):
        return gc.param_grad(case.F, case.params, lambda rows: gc.script_loss(script, form, rows, case.st, case.s, y))
    torch.testing.assert_close(at_start("importance"), at_start(plain), rtol=1e-5, atol=1e-8)

    old_p, cur_p = moved.F_old.exp(), moved.F.detach().exp()
    capped = dataclasses.replace(case.s, ratio_max=2.0)

    def expected(form, s, expect):
        return gc.param_grad(moved.F, moved.params, lambda rows: gc.script_loss(script, form, rows, moved.st, s, None,
                                                                                moved.F_old, expect))
    on_policy = expected(plain, case.s, cur_p)  # the plain form over the current student's own tokens
    torch.testing.assert_close(expected("importance", case.s, old_p), on_policy, rtol=1e-4, atol=1e-7)
    assert gc.cosine(expected("importance", capped, old_p), on_policy) < 1 - 1e-4  # truncated: biased
    module = {"guided_opd": guided_opd, "mopd": mopd}[script]
    monkeypatch.setattr(module, "importance_sampled_reverse_kl",  # the mutation: the ratio dropped (weight 1)
                        lambda ls, lo, lt, c, ac=0.0, b=0.0: module.sampled_reverse_kl(ls, lt, ac, *((b,) if b else ())))
    dropped = expected("importance", case.s, old_p)
    assert (dropped - on_policy).norm() > 0.1 * on_policy.norm()  # the old student's tokens, unweighted: another gradient


def test_end_to_end_sampled_gradients_of_rollout_batches_average_to_the_exact_one():
    """benchmark/e2e_grad.py on the smoke models: rollout batches through collation, teacher scoring and the loss.
    One batch's sampled gradient is a noisy estimate; the mean over batches is close to the exact gradients' mean
    (it fails when the teacher's log-probs reach the loss one position off)."""
    import e2e_grad

    from common.models import load_model

    student, tok = load_model("tiny", trainable=True)
    teacher, _ = load_model("tiny-expert:simonsays")
    out = e2e_grad.measure(student, teacher, tok, "twx:simonsays", batches=8, seed=0, report=lambda *a: None)
    assert out["mean_cos"] > 0.9 and out["mean_cos"] > out["batch_cos"], out["mean_cos"]
    assert len(out["advantages"]) > 100 and all(p.grad is None for p in student.parameters())
