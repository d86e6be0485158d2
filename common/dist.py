"""Process groups and rank reductions, so one code path runs as a plain process and under torchrun.

`setup()` starts the process group: under `torchrun` the one it describes; as a plain `python script.py` a
group of one rank on a free local port, so FSDP2 and the reductions below work unchanged. The reductions
take and return dicts of named numbers (the training scripts log named sums, never list positions), and
skip the collective when there is only one rank.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist

_DEVICE = torch.device("cpu")  # where the reduction tensors live: the rank's GPU with NCCL, else the CPU


# Running out of GPU memory ends a run with one line that names what to lower, found from the function the
# allocation failed in (the outermost of these on the stack), instead of a CUDA traceback.
OUT_OF_MEMORY_HINTS = (
    ("rollout", "rollouts: lower --num-envs, --rollout-chunk or --max-seq-len, or use --rollout-gather layers or --no-cache-turns"),
    ("score_teacher", "teacher scoring: lower --micro-batch-tokens"),
    ("train_step", "the training step: lower --micro-batch-tokens or turn on --activation-checkpointing"),
)


def out_of_memory_hook(kind, value, tb, fallback=sys.excepthook) -> None:
    """sys.excepthook: torch.OutOfMemoryError as a one-line error; anything else as before."""
    if not isinstance(value, torch.OutOfMemoryError):
        return fallback(kind, value, tb)
    names = [frame.name for frame in traceback.extract_tb(tb)]
    where = next((hint for name in names for fn, hint in OUT_OF_MEMORY_HINTS if name == fn),
                 "lower --num-envs, --max-seq-len or --micro-batch-tokens")
    print(f"error: out of GPU memory in {where}", file=sys.stderr)


def setup() -> tuple[int, int, torch.device]:
    """Start the process group; returns (rank, world size, this rank's device). Also makes running out of GPU
    memory a one-line error that names the flag to lower (out_of_memory_hook)."""
    global _DEVICE
    sys.excepthook = out_of_memory_hook
    if "RANK" not in os.environ:  # plain `python script.py`: a process group of one, on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    else:  # ranks on one CPU share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        return_freed_memory()
    _DEVICE = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), _DEVICE


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """On a CPU (glibc), serve every allocation of `threshold` bytes or more with its own mapping, so that a freed
    tensor's memory goes back to the system at once. glibc's default raises that threshold as large blocks are
    freed (up to 32 MiB), after which a model's layer-sized tensors come from the heap, and memory a phase frees
    (loading, a rollout's caches) stays in the process while the next phase allocates anew: a rank's resident
    memory then grows past what it holds at any moment, and past its memory plan."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixed: no more dynamic raising)
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD: give back the heap's free top too
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reduce(values: dict[str, float], op) -> dict[str, float]:
    if world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Each named number summed over the ranks (every rank must call it with the same names)."""
    return _reduce(values, dist.ReduceOp.SUM if dist.is_available() else None)


def all_max(value: int) -> int:
    """The largest of the ranks' values: how many collective calls every rank must make to stay in step."""
    return int(_reduce({"v": value}, dist.ReduceOp.MAX if dist.is_available() else None)["v"])


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
