"""guided_opd.py: the losses against their definitions, the curriculum, and end-to-end runs in a
subprocess (single process, torchrun with 2 ranks, interrupted and resumed, bad input)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import guided_opd as g
from common.episode import STUDENT, TEACHER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--num-envs", "2", "--num-minibatches", "2", "--eval-episodes", "2", "--max-turns", "4", "--max-new-tokens", "8",
         "--eval-interval", "2", "--save-interval", "2"]


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


def tiny_student(vocab=50):
    torch.manual_seed(0)
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
    model, mb = tiny_student(), micro_batch(TEACHER)
    loss_sum, stats = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="ce"))
    logits = model(input_ids=mb["input_ids"]).logits[:, :-1]
    target, mask = mb["input_ids"][:, 1:], mb["loss_mask"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
    assert torch.allclose(loss_sum, ce, atol=1e-4) and stats["student_tokens"] == 0


def test_student_turn_loss_and_full_variants():
    model, mb = tiny_student(), micro_batch(STUDENT)
    logp = torch.log_softmax(model(input_ids=mb["input_ids"]).logits.float(), -1)
    lp = logp[:, :-1].gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    mask = mb["loss_mask"][:, 1:]
    loss_sum, stats = g.guided_opd_loss(model, mb, g.Args(student_loss="sampled", teacher_loss="ce"))
    ref = (-(mb["teacher_logp"][:, 1:] - lp).detach() * lp)[mask].sum()
    assert torch.allclose(loss_sum, ref, atol=1e-4)
    assert stats["reverse_kl"] == pytest.approx((lp - mb["teacher_logp"][:, 1:])[mask].sum().item(), abs=1e-3)
    # the exact variant: teacher == student distribution gives zero loss
    mb["teacher_full"] = logp[:, :-1][mask].detach()
    loss_full, _ = g.guided_opd_loss(model, mb, g.Args(student_loss="full", teacher_loss="ce"))
    assert abs(loss_full.item()) < 1e-4


def test_beta_curriculum():
    a = g.Args(total_iterations=100)
    assert g.beta_schedule(0, a) == 1.0
    assert g.beta_schedule(40, a) == pytest.approx(0.5)  # half-way through the 80% curriculum (cosine)
    assert g.beta_schedule(80, a) == pytest.approx(0.0, abs=1e-12) and g.beta_schedule(99, a) == 0.0
    lin = g.Args(total_iterations=100, curriculum="linear")
    assert g.beta_schedule(20, lin) == pytest.approx(0.75)
    assert g.beta_schedule(50, g.Args(curriculum="constant", beta_start=0.3)) == 0.3
    assert g.beta_schedule(10, g.Args(beta_start=0.0)) == 0.0  # vanilla OPD
    values = [g.beta_schedule(i, a) for i in range(100)]
    assert all(x >= y for x, y in zip(values, values[1:]))


# ---------------------------------------------------------------------------------------------- runs
def run(args, tmp_path, torchrun=0, timeout=600, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable]) + [os.path.join(ROOT, "guided_opd.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_smoke_run_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run(SMOKE + ["--total-iterations", "2"], tmp_path)
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"))
    assert os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    for tag in ["charts/success_rate", "losses/reverse_kl", "schedule/beta", "eval/success_rate", "time/rollout"]:
        assert scalars(run_dir, tag), tag
    assert scalars(run_dir, "teacher/success_rate")


def test_env_of_another_suite_picks_that_suites_tiny_models(tmp_path):
    """--env gem:... with the default --student tiny --teacher tiny-expert: the GEM suite's student and
    expert, which share their own tokenizer."""
    out = run(SMOKE + ["--total-iterations", "1", "--env", "gem:guessthenumber:hard", "--no-cache-turns"], tmp_path)
    assert "student tiny:gem, teacher tiny-expert:guessthenumber" in out.stdout


def test_torchrun_two_ranks_gives_the_single_process_loss(tmp_path):
    # greedy rollouts of the same 4 seeds: 1 rank x 4 envs, then 2 ranks x 2 envs
    common = ["--max-turns", "3", "--max-new-tokens", "6", "--eval-episodes", "2", "--total-iterations", "1",
              "--temperature", "0", "--beta-start", "0.0", "--num-minibatches", "2"]
    run(common + ["--num-envs", "4", "--runs-dir", "one"], tmp_path)
    run(common + ["--num-envs", "2", "--runs-dir", "two"], tmp_path, torchrun=2)
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*")), glob.glob(str(tmp_path / "two" / "*"))
    for tag in ["losses/loss", "losses/reverse_kl", "charts/episode_turns"]:
        assert scalars(one, tag)[1] == pytest.approx(scalars(two, tag)[1], rel=1e-4, abs=1e-6), tag


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    args = SMOKE + ["--total-iterations", "4", "--beta-start", "0.7"]
    run(args + ["--runs-dir", "full"], tmp_path)
    # the same run, killed once its first checkpoint (after iteration 2) exists, then resumed
    cmd = [sys.executable, os.path.join(ROOT, "guided_opd.py")] + args + ["--runs-dir", "cut"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / "cut" / "*" / "checkpoint.pt")) and time.time() < deadline:
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (cut,) = glob.glob(str(tmp_path / "cut" / "*"))
    run(args + ["--runs-dir", "cut", "--resume", cut], tmp_path)
    (full,) = glob.glob(str(tmp_path / "full" / "*"))
    for tag in ["losses/loss", "charts/success_rate", "eval/success_rate", "losses/grad_norm"]:
        a, b = scalars(full, tag), scalars(cut, tag)
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a), tag


@pytest.mark.parametrize("args,expected", [
    (["--env", "twx:nosuchgame"], "unknown env"),
    (["--teacher", "nosuchmodel"], "unknown model"),
    (["--resume", "no/such/run"], "no checkpoint"),
    (["--max-seq-len", "100000"], "lower --max-seq-len"),
    (["--num-minibatches", "5"], "--num-minibatches must be between 1 and --num-envs"),
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
    other = tiny_student(vocab=len(tok) + 7)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    p = run(SMOKE + ["--teacher", str(tmp_path / "other")], tmp_path, check=False, timeout=300)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "vocabulary" in last and str(len(tok) + 7) in last, p.stderr[-2000:]
