"""The memory plan (common/memory.py): shapes from configs, the measured activation coefficients, the choices it
makes, and the scripts' --plan and one-line errors. Whole plans against measured peaks at Qwen3-0.6B shapes are
benchmark/real_shapes.py's (minutes, gigabytes): here the parts, and the real path at a 2-layer Qwen3 shape."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from common import memory
from common.memory import GiB
from end_to_end import ROOT, run_script, scalars


def test_published_shapes_counted_from_their_configs():
    s = memory.shape_of("qwen3-0.6b")
    assert (s.params, s.layers, s.hidden, s.kv_bytes(2)) == (596_049_920, 28, 1024, 112 * 1024)
    assert memory.shape_of("qwen3-8b").params == 8_190_735_360  # untied: embeddings and LM head apart
    moe = memory.shape_of("qwen3-30b-a3b")
    assert 30.4e9 < moe.params < 30.6e9 and moe.kv_bytes(2) == 96 * 1024 and moe.mlp == 8 * 768


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_bytes_are_what_a_layer_saves_for_backward(dtype):
    """ACTIVATION_BYTES against the tensors a Qwen3 decoder layer actually saves (a shape the coefficients were not
    fitted on); a wrong coefficient or dtype table fails it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=768, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    T = 128
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 64, (1, T)), use_cache=False, logits_to_keep=1)
    shape = memory.Shape("x", 0, 0, 2, 768, 2048, 8 * 128, 2 * 128, 64)
    planned = memory._act_bytes(shape, 4 if dtype == torch.float32 else 2) * T * 2
    assert sum(saved.values()) == pytest.approx(planned, rel=0.1)


def _run(student="qwen3-0.6b", episodes=16, **kw):
    s = memory.shape_of(student)
    t = replace(memory.shape_of("qwen3-1.7b"), name="teacher")
    return memory.Run(student=s, teachers=[t], generate=[[s, t]], episodes=episodes, max_seq_len=16384, max_new_tokens=512,
                      micro_batch_tokens=16384, topk=64, gpu=True, **kw)


def test_choose_takes_the_fastest_setting_that_fits():
    r = _run()
    roomy = memory.choose(r, {}, 1000 * GiB, tiny=False)
    assert (roomy.run.activation_checkpointing, roomy.run.gather, roomy.run.cache_turns, roomy.run.chunk) == (False, "whole", True, 16)
    # 16 episodes of 16k tokens: the caches are the peak, and the plan gives up what shrinks them
    fast = memory.make_plan(r)
    tight = memory.choose(r, {}, 80 * GiB, tiny=False)
    assert fast.peak_phase == "rollout" and tight.peak <= 80 * GiB and tight.run.chunk < 16
    # two episodes: a training micro-batch is the peak, and checkpointing is the first thing it gives up
    r2 = _run(episodes=2)
    fast = memory.make_plan(r2)
    tight = memory.choose(r2, {}, fast.peak - GiB, tiny=False)
    assert fast.peak_phase == "training micro-batch" and tight.run.activation_checkpointing and tight.run.gather == "whole"
    # what the user forced stays, and a tiny student keeps the fastest setting whatever the budget
    assert memory.choose(r, {"cache_turns": False}, 1000 * GiB, tiny=False).run.cache_turns is False
    assert memory.choose(r, {}, GiB, tiny=True).run.activation_checkpointing is False


def test_checkpointing_and_layers_shrink_what_they_should():
    r = _run()
    base = memory.make_plan(r)
    ckpt = memory.make_plan(replace(r, activation_checkpointing=True))
    assert ckpt.phase_total("training micro-batch") < base.phase_total("training micro-batch") / 4
    layers = memory.make_plan(replace(r, gather="layers"))
    assert layers.phase_total("rollout") < base.phase_total("rollout") - 2 * 1.7e9  # the teacher is not gathered whole
    half = memory.make_plan(replace(r, cache_turns=False, chunk=8))
    assert half.phase_total("rollout") < base.phase_total("rollout")
    # twice the ranks, half the sharded state
    two = memory.make_plan(replace(r, world=2))
    assert two.kept_total == pytest.approx(base.kept_total / 2, rel=0.01)


def test_a_plan_that_cannot_fit_is_one_line_naming_its_biggest_term():
    plan = memory.make_plan(_run("qwen3-8b"))
    with pytest.raises(SystemExit) as e:
        memory.check(plan, 10 * GiB)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("error: the memory plan needs") and plan.biggest()[0] in msg


def _script(args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "guided_opd.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_plan_of_a_real_run_loads_no_weights():
    """The must-have: a real run's plan from the published configs alone, offline, in seconds; 8 ranks of 80 GiB."""
    p = _script(["--student", "qwen3-8b", "--teacher", "qwen3-32b", "--env", "alfworld", "--plan"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "8 rank(s)" in p.stdout and "student weights, gradients and AdamW state" in p.stdout and "peak" in p.stdout


def test_plan_of_a_folder_with_only_a_config(tmp_path, qwen3_shaped):
    """--plan reads config.json and never the weights: a folder without them plans all the same."""
    import shutil

    folder = tmp_path / "config-only"
    shutil.copytree(qwen3_shaped, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    p = _script(["--student", str(folder), "--teacher", str(folder), "--env", "twx:simonsays", "--plan",
                 "--device-memory", "cpu:8"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CPU (fp32) of 8.0 GiB" in p.stdout


@pytest.mark.parametrize("args, words", [
    (["--student", "qwen3-0.6b"], "needs --env and --teacher"),
    (["--student", "qwen3-0.6b", "--env", "alfworld"], "needs --teacher"),
    (["--student", "qwen3-8b", "--teacher", "qwen3-32b", "--env", "alfworld", "--device-memory", "gpu:20"],
     "error: the memory plan needs"),
    (["--device-memory", "lots"], "--device-memory 'lots'"),
])
def test_real_runs_refuse_in_one_line(args, words):
    p = _script(args)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode != 0 and words in lines[-1], lines


def test_real_path_at_a_qwen3_shape_with_every_memory_saving(tmp_path, qwen3_shaped):
    """The real path end to end (a 2-layer Qwen3 shape, the real tokenizer): rollouts by layer, one episode decoded at
    a time, caches rebuilt each turn, activation checkpointing; the peak is logged beside the plan."""
    m = qwen3_shaped
    out = run_script("guided_opd.py", ["--student", m, "--teacher", m, "--env", "twx:simonsays", "--num-envs", "2",
                                       "--max-turns", "2", "--max-new-tokens", "8", "--max-seq-len", "512",
                                       "--total-iterations", "2", "--eval-episodes", "2", "--rollout-gather", "layers",
                                       "--rollout-chunk", "1", "--no-cache-turns", "--activation-checkpointing",
                                       "--device-memory", "cpu:16"], tmp_path)
    assert "rollouts gather by layer, caches rebuilt each turn, 1 episode(s) decoded at once" in out.stdout
    assert "activation checkpointing on" in out.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    peak, plan = scalars(str(run_dir), "memory/peak_gib"), scalars(str(run_dir), "memory/plan_gib")
    assert set(peak) == {1, 2} and all(0 < v for v in peak.values()) and plan[2] > 0


def test_a_cpu_rank_gives_freed_tensors_back():
    """common.dist.return_freed_memory: after it, freeing every other of 200 tensors of 4 MiB gives their 400 MiB
    back to the system; with glibc's default (its threshold raised by the first large free) nothing comes back, and
    a rank's resident memory outgrows its plan."""
    script = """
import sys, torch
from common.dist import return_freed_memory
if sys.argv[1] == "1":
    return_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
warm = [torch.ones(1 << 20) for _ in range(4)]
del warm
ts = [torch.ones(1 << 20) for _ in range(200)]
before = rss()
del ts[::2]
print((before - rss()) / 2**20)
"""
    freed = {on: float(subprocess.run([sys.executable, "-c", script, on], capture_output=True, text=True, cwd=ROOT,
                                      check=True).stdout) for on in ("0", "1")}
    assert freed["1"] > 350 and freed["0"] < 100, freed
