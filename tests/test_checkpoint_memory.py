"""Checkpoints are written streaming: `checkpoint.save` gathers one tensor at a time from the FSDP2 shards and writes
it into the file before gathering the next, yet the file is the one `torch.save` of the full state dicts would
write (`torch.load` reads back {"model": full tensors, "optimizer": the full optimizer state dict, ...}), and
`checkpoint.load` (memory-mapped) resumes a run exactly. Saving takes about the largest tensor of extra host memory,
not the whole model and optimizer state (12 bytes a parameter with AdamW).

This file is also the worker the tests start in subprocesses: `python tests/test_checkpoint_memory.py round-trip
DIR` (under torch.distributed.run for two ranks) and `... memory DIR`."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import checkpoint  # noqa: E402


class Tiny(nn.Module):
    """Odd sizes (uneven shards over 2 ranks), a parameter of one row (no rows on rank 1), tied input / output
    embeddings (one storage for two keys) and plain (unsharded) buffers, one of a dtype torch.save pickles apart."""

    def __init__(self, vocab=101, width=24, hidden=37):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                                  nn.Linear(hidden, width)) for _ in range(2))
        self.gain = nn.Parameter(torch.ones(1, width))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("table", torch.arange(6, dtype=torch.bfloat16))
        self.register_buffer("counts", torch.arange(5).to(torch.uint16))  # torch.save: _rebuild_tensor_v3

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x * self.gain)


def build(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = Tiny()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    for _ in range(steps):
        ids = torch.randint(0, 101, (3, 5), generator=g)
        nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()


def full_dicts(model, optimizer):
    """The full state dicts as the checkpoints held them before streaming (gathered on rank 0, on the CPU)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model, options=checkpoint.FULL), get_optimizer_state_dict(model, optimizer,
                                                                                          options=checkpoint.FULL)


def assert_same(a, b, where="ckpt", sequences=False):
    """Equal structure (dict keys in the same order), equal tensors (dtype, shape, values, requires_grad).
    `sequences`: a list and a tuple of the same items count as equal (a restored optimizer's betas are a list)."""
    if sequences and isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]", sequences)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", sequences)
    else:
        assert a == b, where


def records(path: str) -> dict[str, bytes]:
    """The records of a torch.save zip file, named without the archive's folder."""
    with zipfile.ZipFile(path) as z:
        return {name.split("/", 1)[1]: z.read(name) for name in z.namelist()}


EXTRA = {"phase": 2, "baseline": {"t": 0.5}, "seen": torch.tensor([3, 4])}


def round_trip(folder: str) -> None:
    """Save after a few AdamW steps: the file is byte for byte what torch.save of the full state dicts writes;
    load into a model and optimizer of other values: the next step gives the same weights and moments."""
    rank = dist.get_rank()
    path = os.path.join(folder, "checkpoint.pt")
    model, optimizer = build(0)
    train(model, optimizer, 3, seed=1)
    generators = {"sampler": torch.Generator().manual_seed(5 + rank)}
    rngs = checkpoint.rng_state(generators)
    full_model, full_optim = full_dicts(model, optimizer)
    checkpoint.save(path, model, optimizer, 3, "a-run", generators, EXTRA, rngs)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rngs)
    if rank == 0:
        ckpt = torch.load(path, weights_only=False)
        assert list(ckpt) == ["model", "optimizer", "iteration", "run_name", "rngs", "extra"]
        assert_same(ckpt["model"], full_model, "model")
        assert_same(ckpt["optimizer"], full_optim, "optimizer")
        assert ckpt["model"]["head.weight"].data_ptr() == ckpt["model"]["embed.weight"].data_ptr()  # tied: one storage
        assert (ckpt["iteration"], ckpt["run_name"]) == (3, "a-run")
        assert_same(ckpt["extra"], EXTRA, "extra")
        reference = os.path.join(folder, "reference", "checkpoint.pt.tmp")  # the same archive name as save's
        os.makedirs(os.path.dirname(reference))
        torch.save({"model": full_model, "optimizer": full_optim, "iteration": 3, "run_name": "a-run",
                    "rngs": everyone, "extra": EXTRA}, reference)
        if dist.get_world_size() == 1:  # every record (data.pkl, data/<key>, ...) the same bytes
            assert records(path) == records(reference)
        else:  # torch.save of gathered tensors also wrote their padding, and the tied weights twice
            assert os.path.getsize(path) < os.path.getsize(reference)
        assert not os.path.exists(path + ".tmp")
    del full_model, full_optim

    resumed, resumed_optimizer = build(7)
    resumed.table.zero_()
    resumed.counts.zero_()
    other = {"sampler": torch.Generator().manual_seed(99)}
    iteration, name, extra = checkpoint.load(path, resumed, resumed_optimizer, other)
    assert (iteration, name) == (3, "a-run")
    assert_same(extra, EXTRA, "extra")
    assert torch.equal(other["sampler"].get_state(), generators["sampler"].get_state())
    gc.collect()
    with open("/proc/self/maps") as f:  # loaded memory-mapped, and nothing left mapped (it would hold the file)
        assert os.path.realpath(path) not in f.read()
    train(model, optimizer, 1, seed=2)
    train(resumed, resumed_optimizer, 1, seed=2)
    a, b = full_dicts(model, optimizer), full_dicts(resumed, resumed_optimizer)
    if rank == 0:
        assert_same(a, b, "after the next step", sequences=True)
        assert a[1]["state"]["embed.weight"]["step"].item() == 4


def memory(folder: str) -> dict:
    """Peak extra host memory (bytes) of saving a ~400 MB fp32 model of 6 equal tensors with its AdamW state."""
    width = 4096  # 6 x 4096 x 4096 fp32: 64 MiB each, 384 MiB in all; with AdamW's moments 1.2 GB of state
    torch.manual_seed(0)
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(6)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, width)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) starts again from now
    before, start = rss("VmRSS"), time.perf_counter()
    checkpoint.save(os.path.join(folder, "checkpoint.pt"), model, optimizer, 1, "big", {})
    return {"extra": rss("VmHWM") - before, "largest": width * width * 4,
            "file": os.path.getsize(os.path.join(folder, "checkpoint.pt")), "seconds": time.perf_counter() - start}


def run_worker(mode: str, folder: str, ranks: int = 1, timeout: int = 120) -> subprocess.CompletedProcess:
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                                   if ranks > 1 else [])
    p = subprocess.run(launcher + [os.path.abspath(__file__), mode, str(folder)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


# ------------------------------------------------------------------------------------------- the tests
def test_round_trip_one_rank(tmp_path, monkeypatch):
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("mmap")) or load(*a, **kw))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        round_trip(str(tmp_path))
    finally:
        dist.destroy_process_group()
    assert loads[-1] is True  # checkpoint.load memory-maps the file


def test_a_failed_save_leaves_the_last_checkpoint(tmp_path):
    """Rank 0 failing mid-save (here: an `extra` pickle refuses) raises on every rank, after the gathers (the other
    ranks are not left waiting in one); the last checkpoint stays, and no temporary file."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, optimizer = build(0)
        path = str(tmp_path / "checkpoint.pt")
        checkpoint.save(path, model, optimizer, 1, "a-run", {})
        with pytest.raises(Exception, match="pickle"):
            checkpoint.save(path, model, optimizer, 2, "a-run", {}, {"f": lambda: 0})
        assert torch.load(path, weights_only=False)["iteration"] == 1
        assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "pg"]
    finally:
        dist.destroy_process_group()


def test_round_trip_two_ranks(tmp_path):
    """Uneven shards over two ranks (torch.distributed.run): the same file, the same resumed step."""
    run_worker("round-trip", tmp_path, ranks=2)
    assert os.path.isfile(tmp_path / "checkpoint.pt")


def test_save_takes_about_the_largest_tensor_of_extra_memory(tmp_path):
    """Two ranks: the old save gathered the whole model and optimizer state (1.2 GB here) on rank 0 before writing
    it, and each tensor twice over on the other rank (all-gather); now rank 0 holds one tensor at a time."""
    ranks = json.loads(run_worker("memory", tmp_path, ranks=2).stdout.strip().splitlines()[-1])
    largest = ranks[0]["largest"]
    assert ranks[0]["file"] > 3 * 6 * largest  # the weights and both moments are in the file
    assert ranks[0]["extra"] < 1.5 * largest, f"rank 0 took {ranks[0]['extra'] / 2**20:.0f} MiB more to save"
    assert ranks[1]["extra"] < 0.5 * largest, f"rank 1 took {ranks[1]['extra'] / 2**20:.0f} MiB more to save"


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'pg')}", rank=0, world_size=1)
    try:
        result, results = round_trip(folder) if mode == "round-trip" else memory(folder), [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        if dist.get_rank() == 0:
            print(json.dumps(results))
    finally:
        dist.destroy_process_group()
