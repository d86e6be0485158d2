"""The real-model default losses of the four scripts (the top-k reverse KL with its tail bucket for student
turns, cross-entropy for teacher turns), `--real-losses` (those losses on a tiny student), and atod.py's
term-by-term gradient norms. Small random Qwen3 models on synthetic episodes: seconds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen3Config, Qwen3ForCausalLM

import atod
import guided_opd
import mopd
import two_phase
from common.episode import collate
from common.models import fill_defaults
from common.teacher import score_teacher
from test_atod import synthetic_episodes

V = 50


def tiny_model(seed: int):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, intermediate_size=64)
    return Qwen3ForCausalLM(cfg)


def episodes():
    """test_atod's 8 synthetic episodes (1-3 student turns each), each in its own slot of the batch."""
    out = synthetic_episodes()
    for j, ep in enumerate(out):
        ep.slot = j
    return out


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the top-k loss of every script
@pytest.mark.parametrize("module", [guided_opd, two_phase, atod])
def test_each_scripts_topk_is_mopds_with_the_tail(module):
    # one definition in four files (each file keeps its loss): they must agree, and with k = the vocabulary
    # each is the exact reverse KL
    s, t = torch.log_softmax(torch.randn(7, V), -1), torch.log_softmax(3 * torch.randn(7, V), -1)
    for k in (1, 5, V):
        top_t, ids = t.topk(k, dim=-1)
        torch.testing.assert_close(module.topk_reverse_kl(s.gather(-1, ids), top_t),
                                   mopd.topk_reverse_kl(s.gather(-1, ids), top_t, tail=True))
    top_t, ids = t.topk(V, dim=-1)
    torch.testing.assert_close(module.topk_reverse_kl(s.gather(-1, ids), top_t), mopd.full_reverse_kl(s, t),
                               atol=1e-5, rtol=1e-4)


def student_grad(module, args, eps, micro_batch_tokens: int):
    """The gradient of one mini-batch (every episode) through the script's train_step, the teacher's top-k scored
    as its main loop scores it."""
    student = module.shard(tiny_model(2), torch.device("cpu"), trainable=True)
    teacher = tiny_model(3).eval().requires_grad_(False)
    batch = collate(eps, 0)
    scores = score_teacher(teacher, batch, batch["loss_mask"], topk=args.topk)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    plan = [0] * len(eps)
    args.micro_batch_tokens = micro_batch_tokens
    if module is atod:
        mask = batch["loss_mask"].clone()
        mask[:, 0] = False
        w = mask.float()
        zeros = torch.zeros_like(w)
        module.train_step(student, optimizer, eps, batch, scores, score_teacher(tiny_model(2), batch, batch["loss_mask"]).logp,
                          zeros, 0.5 * w, {}, [plan], args, 1, torch.device("cpu"))
    elif module is guided_opd:
        module.train_step(student, optimizer, eps, batch, scores, None, 0.0, plan, args, 1, torch.device("cpu"))
    else:
        module.train_step(student, optimizer, eps, batch, scores, None, plan, args, 1, torch.device("cpu"))
    return torch.cat([p.grad.full_tensor().reshape(-1) for p in student.parameters()])


@pytest.mark.parametrize("module", [guided_opd, two_phase, atod])
def test_topk_trains_through_the_training_step_and_its_micro_batches(process_group, module):
    kw = dict(opd_loss="topk") if module is atod else dict(student_loss="topk", teacher_loss="ce")
    args = module.Args(topk=7, num_minibatches=1, max_grad_norm=1e9, **kw)
    eps = episodes()
    one, many = student_grad(module, args, eps, 10**6), student_grad(module, args, eps, 20)
    assert one.norm() > 0
    torch.testing.assert_close(many, one, atol=1e-6, rtol=1e-5)
    # the hand-written loss: the top-k term of every student token, reduced as the script reduces
    ref = tiny_model(2)
    batch = collate(eps, 0)
    sc = score_teacher(tiny_model(3).eval(), batch, batch["loss_mask"], topk=7)
    at = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    at = torch.cat([torch.zeros_like(at[:, :1]), at[:, :-1]], 1).gather(-1, sc.topk_ids)  # position t predicts token t
    mask = batch["loss_mask"].clone()
    terms = mopd.topk_reverse_kl(at, sc.topk_logp, tail=True)
    if module is atod:  # kappa w = 0.5, a token mean per trajectory, the mean over trajectories
        mask[:, 0] = False
        loss = ((0.5 * terms * mask).sum(1) / mask.sum(1)).mean()
    else:  # one token mean over the mini-batch
        loss = (terms * mask).sum() / mask.sum()
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(one, expected, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------ --real-losses
@pytest.mark.parametrize("module,keys", [(guided_opd, {"student_loss": "topk", "teacher_loss": "ce"}),
                                         (mopd, {"loss": "topk"}), (atod, {"opd_loss": "topk"}),
                                         (two_phase, {"student_loss": "topk", "teacher_loss": "ce"})])
def test_real_losses_take_the_real_losses_and_nothing_else(module, keys):
    tiny, real = module.Args(), module.Args(real_losses=True)
    fill_defaults(tiny, module.TINY, module.REAL, module.REAL_LOSSES)
    fill_defaults(real, module.TINY, module.REAL, module.REAL_LOSSES)
    assert {k: getattr(real, k) for k in keys} == keys == {k: module.REAL[k] for k in keys}
    assert any(getattr(tiny, k) != v for k, v in keys.items())  # the tiny default's own losses differ
    for k in module.TINY:  # everything else stays tiny: the learning rate, the lengths, the batch
        if k not in keys:
            assert getattr(real, k) == getattr(tiny, k) == module.TINY[k], k


def test_real_losses_with_a_real_student_is_one_line():
    args = guided_opd.Args(student="qwen3-1.7b", real_losses=True)
    with pytest.raises(SystemExit, match="drop --real-losses"):
        fill_defaults(args, guided_opd.TINY, guided_opd.REAL, guided_opd.REAL_LOSSES)


# ------------------------------------------------------------------------------ atod.py's terms
@pytest.mark.parametrize("opd_loss", ["sampled", "full"])
def test_atods_term_norms_are_the_norms_of_each_terms_gradient(process_group, opd_loss):
    """On the first mini-batch (ratio 1) the surrogate is linear in the advantage: the OPD term's and the GRPO
    term's gradients add up to the step's, and train_step logs the norm of each."""
    eps = episodes()
    args = atod.Args(opd_loss=opd_loss, num_minibatches=1, max_grad_norm=1e9, micro_batch_tokens=30,
                     term_grad_norms=True)
    batch = collate(eps, 0)
    mask = batch["loss_mask"].clone()
    mask[:, 0] = False
    teacher = tiny_model(3).eval()
    scores = score_teacher(teacher, batch, batch["loss_mask"], full=opd_loss == "full")
    old = score_teacher(tiny_model(2), batch, batch["loss_mask"]).logp  # the student itself: ratio 1
    w = atod.tdur_weights(old, scores.logp, batch["turn_id"], mask, renormalize=True)
    grpo = atod.grpo_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 1]), 4)
    sampled = opd_loss == "sampled"
    kappa, rho = 0.55, 1.5
    parts = {"opd": (atod.hybrid_advantages(old, scores.logp, w, grpo, mask, kappa, 0.0, sampled),
                     torch.zeros_like(w) if sampled else kappa * w),
             "grpo": (atod.hybrid_advantages(old, scores.logp, w, grpo, mask, 0.0, rho), torch.zeros_like(w))}
    adv = parts["opd"][0] + parts["grpo"][0]

    def grad(advantages, kl_coef, terms=None):
        student = atod.shard(tiny_model(2), torch.device("cpu"), trainable=True)
        stats = atod.train_step(student, torch.optim.SGD(student.parameters(), lr=0.0), eps, batch, scores, old,
                                advantages, kl_coef, terms or {}, [[0] * len(eps)], args, 1, torch.device("cpu"))
        return torch.cat([p.grad.full_tensor().reshape(-1) for p in student.parameters()]), stats

    g_opd, _ = grad(*parts["opd"])
    g_grpo, _ = grad(*parts["grpo"])
    g_all, stats = grad(adv, parts["opd"][1], parts)
    torch.testing.assert_close(g_opd + g_grpo, g_all, atol=1e-6, rtol=1e-4)
    assert stats["term_norms"]["opd"] == pytest.approx(float(g_opd.norm()), rel=1e-4)
    assert stats["term_norms"]["grpo"] == pytest.approx(float(g_grpo.norm()), rel=1e-4)
    assert g_opd.norm() > 0 and g_grpo.norm() > 0


def test_renormalised_tdur_weights_average_one_per_trajectory():
    logp_s, logp_t = -torch.rand(3, 9) * 3, -torch.rand(3, 9) * 3
    turn = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]] * 3)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    plain = atod.tdur_weights(logp_s, logp_t, turn, mask)
    w = atod.tdur_weights(logp_s, logp_t, turn, mask, renormalize=True)
    assert (plain * mask).sum(1).div(mask.sum(1)).lt(1).all()  # as written: below 1 on average
    torch.testing.assert_close((w * mask).sum(1) / mask.sum(1), torch.ones(3))
    torch.testing.assert_close(w / w.sum(1, keepdim=True), plain / plain.sum(1, keepdim=True))  # the same shape
