"""Checkpoints that survive a crash and resume to the same result, and the final Hugging Face save.

A checkpoint holds the student's full state dict, the optimizer's, the iteration, the run name, every
rank's random states (Python, NumPy, torch, CUDA and the script's own generators) and whatever else the
script passes in `extra` (e.g. the training phase: plain values and tensors, no DTensors). It is written by rank 0
to a temporary file and renamed, so a crash mid-write never leaves a broken checkpoint. Loading works for any
number of ranks with the same world size (each rank gets back its own random states).

The file is the one `torch.save` of those full state dicts would write (`torch.load` reads it back as such), but
written streaming: one tensor at a time is gathered from the shards, written and freed, so rank 0 needs about the
largest tensor of extra memory, not the whole model and optimizer state (12 bytes a parameter with AdamW). This
builds torch.save's zip format (torch.serialization._save, torch 2.13) with its private writer. Loading maps the
file into memory, so the ranks share the page cache instead of each reading a copy.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
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


class _Storage:
    """A storage record `data/<key>` of the checkpoint file: the full tensor of `source` (a DTensor shard, or a plain
    tensor), gathered and written when its turn comes, after `data.pkl`, which names it by its key."""
    __slots__ = ("key", "source", "dtype", "numel")

    def __init__(self, key: str, source: torch.Tensor):
        self.key, self.source, self.dtype, self.numel = key, source, source.dtype, source.numel()

    def full(self) -> torch.Tensor | None:
        """The whole tensor, contiguous, in CPU memory on rank 0 (None on the others). For a DTensor every rank
        must call this, in the same order: it is a collective."""
        t, rank = self.source, dist.get_rank()
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            if t.device.type != mesh.device_type:  # offloaded shards: gathered on the mesh's device (as torch does)
                t = t.to(mesh.device_type)
            if mesh.device_type == "cpu" and mesh.ndim == 1 and t.placements == (Shard(0),) and mesh.mesh[0] == 0:
                return _gather_rows(t)  # FSDP2's sharding on CPU (gloo)
            t = t.full_tensor()
        elif rank != 0:
            return None
        return t.detach().cpu().contiguous() if rank == 0 else None


def _gather_rows(t: DTensor) -> torch.Tensor | None:
    """A CPU DTensor sharded by rows (Shard(0), as FSDP2 does) whole on mesh rank 0 (global rank 0): each rank
    sends its rows straight into their place in the one full tensor (a collective all-gather would take twice
    its memory on every rank). Rank 0 gets the tensor, the others None."""
    mesh, local = t.device_mesh, t.to_local().detach()
    ranks, me, rows = mesh.mesh.tolist(), mesh.get_local_rank(), t.shape[0]
    chunk = -(-rows // len(ranks))  # rows per rank, the last ones fewer or none (torch.chunk's split, as Shard(0))
    inner = math.prod(t.shape[1:])
    spans = [(r * chunk, min(rows, (r + 1) * chunk)) for r in range(len(ranks))]
    if len(ranks) == 1:
        return local.contiguous()
    if me != 0:
        if local.shape[0] * inner:
            dist.send(local.contiguous(), dst=ranks[0], group=mesh.get_group())
        return None
    full = torch.empty(t.shape, dtype=t.dtype)
    full[:local.shape[0]].copy_(local)
    works = [dist.irecv(full[start:end], src=ranks[r], group=mesh.get_group())
             for r, (start, end) in enumerate(spans) if r and (end - start) * inner > 0]
    for work in works:
        work.wait()
    return full


class _Tensor:
    """Stands in for a tensor of the checkpoint while `data.pkl` is pickled: pickles to what torch.save writes for
    a contiguous CPU tensor of that dtype and shape whose data lies in `storage`'s record."""
    __slots__ = ("storage", "shape", "requires_grad", "metadata")

    def __init__(self, storage: _Storage, t: torch.Tensor):
        self.storage, self.shape, self.requires_grad = storage, tuple(t.shape), t.requires_grad
        self.metadata = torch._utils.get_tensor_metadata(t.to_local() if isinstance(t, DTensor) else t)

    def __reduce__(self):  # as torch.Tensor._reduce_ex_internal for a dense tensor (torch 2.13)
        stride = tuple(torch.empty(self.shape, device="meta").stride())
        if self.storage.dtype in torch.storage._new_dtypes():
            rebuild, args = torch._utils._rebuild_tensor_v3, (self.storage, 0, self.shape, stride, self.requires_grad,
                                                              OrderedDict(), self.storage.dtype)
        else:
            rebuild, args = torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, self.requires_grad,
                                                              OrderedDict())
        return rebuild, args + ((self.metadata,) if self.metadata else ())


def _stand_ins(obj, stand_in, plain: bool = False):
    """`obj` with each tensor in its dicts, lists and tuples replaced by `stand_in(tensor)`, called in the order
    pickle meets them. `plain`: every mapping becomes a dict, as in the full state dicts that
    get_*_state_dict(full_state_dict=True) return."""
    if isinstance(obj, torch.Tensor):
        return stand_in(obj)
    if isinstance(obj, dict) and plain or type(obj) in (dict, OrderedDict):
        return (dict if plain else type(obj))((k, _stand_ins(v, stand_in, plain)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_stand_ins(v, stand_in, plain) for v in obj)
    return obj


def _shared(tensors: list[torch.Tensor]) -> list[int]:
    """For each tensor, the index of the storage record it goes to: views of the same data (tied weights) share one."""
    index: dict = {}
    out = []
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        ident = (local.untyped_storage()._cdata, local.storage_offset(), tuple(local.shape), local.stride(), t.dtype,
                 tuple(t.shape), str(getattr(t, "placements", t.device)))
        out.append(index.setdefault(ident, len(index)))
    return out


class _Pickler(pickle.Pickler):
    """torch.save's pickler: storages by reference (persistent_id), their data in records of their own. Our
    `_Storage`s are named by their key; a real storage (a tensor inside some other object of `extra`) as torch.save
    names it, and is kept in `others` to be written at the end."""

    def __init__(self, file, others: dict, first_key: int):
        super().__init__(file, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.others, self.first_key = others, first_key

    def persistent_id(self, obj):
        if type(obj) is _Storage:
            if obj.dtype in torch.storage._new_dtypes():
                return "storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize
            return ("storage", getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype]), obj.key, "cpu",
                    obj.numel)
        if isinstance(obj, torch.storage.TypedStorage):
            storage, kind, numel = obj._untyped_storage, getattr(torch, obj._pickle_storage_type()), obj._size()
        elif torch.is_storage(obj):
            storage, kind, numel = obj, torch.UntypedStorage, obj.nbytes()
        else:
            return None
        key = next((k for k, s in self.others.items() if s._cdata == storage._cdata), None)
        if key is None:
            key = str(self.first_key + len(self.others))
            self.others[key] = storage
        return "storage", kind, key, torch.serialization.location_tag(storage), numel


def _write(zip_file, name: str, t: torch.Tensor) -> None:
    """Write the bytes of a contiguous CPU tensor as the record `name`, straight from its memory."""
    data, start = t.untyped_storage(), t.storage_offset() * t.element_size()
    if start or data.nbytes() != t.nbytes:
        data = data[start:start + t.nbytes]  # a view of the tensor's bytes, no copy
    zip_file.write_record(name, data, t.nbytes)


def save(path: str, model, optimizer, iteration: int, run_name: str, generators: dict, extra: dict | None = None,
         rngs: dict | None = None):
    """Write the checkpoint atomically (every rank calls this: gathering the state dicts is collective), with this
    rank's random states now, or `rngs` (`rng_state` taken earlier: at the start of an iteration abandoned since).

    The file is what `torch.save` of {"model", "optimizer", "iteration", "run_name", "rngs", "extra"} writes, with
    the full state dicts (`torch.load` reads it back so), but written streaming: from the sharded state dicts, one
    tensor at a time is gathered, written by rank 0 and freed before the next, so saving takes about the largest
    tensor of extra memory instead of the whole model and optimizer state (12 bytes a parameter with AdamW)."""
    model_sd = get_model_state_dict(model)  # sharded: DTensors of the parameters and the optimizer state, no copy
    optim_sd = get_optimizer_state_dict(model, optimizer)
    mine, rngs = rngs or rng_state(generators), [None] * dist.get_world_size()
    dist.all_gather_object(rngs, mine)
    # A record per tensor, in the order pickle meets them; the sharded state dicts are alike on every rank, and
    # so are the gathers (collectives) in this order: which entries share a record is rank 0's word for all.
    tensors: list[torch.Tensor] = []
    _stand_ins([model_sd, optim_sd], tensors.append, plain=True)
    plan = [_shared(tensors) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(plan, src=0)
    storages: list[_Storage] = []
    indices = iter(plan[0])

    def shared(t: torch.Tensor) -> _Tensor:
        i = next(indices)
        if i == len(storages):
            storages.append(_Storage(str(i), t))
        return _Tensor(storages[i], t)

    def own(t: torch.Tensor) -> _Tensor:  # rngs and extra: plain tensors, each its own record, written by rank 0
        storages.append(_Storage(str(len(storages)), t))
        return _Tensor(storages[-1], t)

    ckpt = {"model": _stand_ins(model_sd, shared, plain=True), "optimizer": _stand_ins(optim_sd, shared, plain=True),
            "iteration": iteration, "run_name": run_name, "rngs": _stand_ins(rngs, own),
            "extra": _stand_ins(extra or {}, own)}
    tmp, writer, error = path + ".tmp", None, None
    if dist.get_rank() == 0:
        try:
            writer = torch.serialization._open_zipfile_writer(tmp)  # torch.save's: CRC32 and alignment as configured
            zip_file, others, data = writer.__enter__(), {}, io.BytesIO()
            _Pickler(data, others, len(storages)).dump(ckpt)
            # the records torch.serialization._save writes first (torch 2.13), then one data/<key> per storage
            alignment = str(torch.serialization._get_storage_alignment())
            for name, value in (("data.pkl", data.getvalue()), (".format_version", "1"),
                                (".storage_alignment", alignment), ("byteorder", sys.byteorder)):
                zip_file.write_record(name, value, len(value))
        except Exception as e:  # noqa: BLE001  (the other ranks are gathering: take part, then raise everywhere)
            error = e
    for storage in storages:
        t = storage.full()
        if t is not None and error is None:
            try:
                _write(zip_file, f"data/{storage.key}", t)
            except Exception as e:  # noqa: BLE001
                error = e
        del t  # freed before the next is gathered
    if writer is not None:
        try:
            if error is None:
                for key, storage in others.items():
                    storage = storage.cpu()
                    zip_file.write_record(f"data/{key}", storage, storage.nbytes())
            writer.__exit__(None, None, None)
            if error is None:
                os.replace(tmp, path)  # a crash mid-write never leaves a broken checkpoint
        except Exception as e:  # noqa: BLE001
            error = error or e
        if error is not None and os.path.exists(tmp):
            os.remove(tmp)
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)  # also waits for the rename, as a barrier would
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 could not write the checkpoint {path!r}: {status[0]}")


def load(path: str, model, optimizer, generators: dict) -> tuple[int, str, dict]:
    """Restore model, optimizer and this rank's random states; returns (iteration, run_name, extra). The file is
    memory-mapped: the ranks read it through the one page cache instead of each holding a copy."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if len(ckpt["rngs"]) != dist.get_world_size():
        raise SystemExit(f"error: the checkpoint {path!r} was written by {len(ckpt['rngs'])} rank(s) and this run has "
                         f"{dist.get_world_size()}: resume with the same number of processes")
    set_model_state_dict(model, ckpt["model"], options=FULL)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=FULL)
    _unmap(optimizer, ckpt)
    set_rng_state(ckpt["rngs"][dist.get_rank()], generators)
    return ckpt["iteration"], ckpt["run_name"], _owned(ckpt.get("extra", {}))


def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)


def _unmap(optimizer, ckpt: dict) -> None:
    """Copy the optimizer state that loading left as views of the memory-mapped file (the step counts; with one rank
    the moments too): else the file stays mapped as long as the run, and its disk space taken after the next
    checkpoint replaces it. (The model's parameters are copied into, never views.)"""
    spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in _leaves(ckpt) if t.numel()]
    if not spans:
        return
    low, high = min(a for a, _ in spans), max(b for _, b in spans)  # the mapping: nothing else lies inside
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel():
                local = value.to_local() if isinstance(value, DTensor) else value
                if low <= local.data_ptr() < high:
                    state[key] = value.clone()


def _owned(obj):
    """`obj` with each tensor in its dicts, lists and tuples copied out of the memory-mapped file."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, _owned(v)) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(_owned(v) for v in obj)
    return obj


def save_final(model, tokenizer, folder: str) -> None:
    """The full model on rank 0 in Hugging Face format (`AutoModelForCausalLM.from_pretrained(folder)`)."""
    full_sd = get_model_state_dict(model, options=FULL)
    if dist.get_rank() == 0:
        model.save_pretrained(folder, state_dict=full_sd)
        tokenizer.save_pretrained(folder)
