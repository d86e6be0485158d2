"""Checkpoints that survive a crash and resume to the same result, and the final Hugging Face save.

A checkpoint holds the student's full state dict, the optimizer's, the iteration, the run name, every
rank's random states (Python, NumPy, torch, CUDA and the script's own generators) and whatever else the
script passes in `extra` (e.g. the training phase). It is written by rank 0 to a temporary file and
renamed, so a crash mid-write never leaves a broken checkpoint. Loading works for any number of ranks
with the same world size (each rank gets back its own random states).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory


def rng_state(generators: dict) -> dict:
    """This rank's random states: the global ones, and each named `random.Random` / `torch.Generator`."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    for name, g in generators.items():
        state[name] = g.getstate() if isinstance(g, random.Random) else g.get_state()
    return state


def set_rng_state(state: dict, generators: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, g in generators.items():
        g.setstate(state[name]) if isinstance(g, random.Random) else g.set_state(state[name])


def resolve(resume: str) -> str:
    """`--resume` (a run folder or its checkpoint.pt) -> the checkpoint file, or a one-line error."""
    path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {resume!r}: pass the folder of an earlier run (runs/<run_name>) "
                         "or its checkpoint.pt")
    return path


def save(path: str, model, optimizer, iteration: int, run_name: str, generators: dict, extra: dict | None = None,
         rngs: dict | None = None):
    """Write the checkpoint atomically (every rank calls this: gathering the state dicts is collective), with this
    rank's random states now, or `rngs` (`rng_state` taken earlier: at the start of an iteration abandoned since)."""
    model_sd = get_model_state_dict(model, options=FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL)
    mine, rngs = rngs or rng_state(generators), [None] * dist.get_world_size()
    dist.all_gather_object(rngs, mine)
    if dist.get_rank() == 0:
        tmp = path + ".tmp"
        torch.save({"model": model_sd, "optimizer": optim_sd, "iteration": iteration, "run_name": run_name,
                    "rngs": rngs, "extra": extra or {}}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint
    dist.barrier()


def load(path: str, model, optimizer, generators: dict) -> tuple[int, str, dict]:
    """Restore model, optimizer and this rank's random states; returns (iteration, run_name, extra)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if len(ckpt["rngs"]) != dist.get_world_size():
        raise SystemExit(f"error: the checkpoint {path!r} was written by {len(ckpt['rngs'])} rank(s) and this run has "
                         f"{dist.get_world_size()}: resume with the same number of processes")
    set_model_state_dict(model, ckpt["model"], options=FULL)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=FULL)
    set_rng_state(ckpt["rngs"][dist.get_rank()], generators)
    return ckpt["iteration"], ckpt["run_name"], ckpt.get("extra", {})


def save_final(model, tokenizer, folder: str) -> None:
    """The full model on rank 0 in Hugging Face format (`AutoModelForCausalLM.from_pretrained(folder)`)."""
    full_sd = get_model_state_dict(model, options=FULL)
    if dist.get_rank() == 0:
        model.save_pretrained(folder, state_dict=full_sd)
        tokenizer.save_pretrained(folder)
