"""End-to-end helpers shared by the algorithm scripts' tests: run a script in a subprocess (optionally under
torchrun), read its tensorboard scalars and final weights, compare two runs, interrupt one after its first
checkpoint."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(script: str, torchrun: int = 0) -> list[str]:
    """The command line that starts `script` (a file at the repository root), under torchrun with that many ranks."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return launcher + [os.path.join(ROOT, script)]


def run_script(script: str, args, tmp_path, torchrun=0, timeout=600, check=True):
    """Run `script` with `args` in tmp_path (one thread per process); with check, it must succeed."""
    p = subprocess.run(command(script, torchrun) + args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def final_weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final")).state_dict()


def assert_same_run(a, b, tags, rel=1e-5):
    for tag in tags:
        x, y = scalars(a, tag), scalars(b, tag)
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=rel, abs=1e-7) for k in x), (tag, x, y)


def kill_after_first_checkpoint(cmd, tmp_path, folder):
    p = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(str(tmp_path / folder / "*" / "checkpoint.pt")) and time.time() < deadline:
        if p.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
    p.wait()
    (cut,) = glob.glob(str(tmp_path / folder / "*"))
    return cut
