"""Where and how a run executes: seeds and RNG states, the device, and the processes of a torchrun / accelerate
launch (rank 0 alone writes the run folder)."""

import os
import random
from collections.abc import Callable

import numpy as np
import torch

from utils.errors import InputError


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """torch CPU threads; 0 keeps torch's default."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


# oneDNN (torch's CPU kernels) keeps a compiled primitive, with its buffers, for every distinct operator shape it has
# run, up to 1,024 of them. A retriever's training batches change shape at every step (the labelled positions, the
# trimmed width), so that cache only fills: the process's memory grew by gigabytes over a long run at the same speed
# as with a small cache (docs/performance.md, "Scale"). oneDNN reads the capacity at its first operation.
RETRIEVER_ONEDNN_CACHE = "16"


def limit_onednn_cache(capacity: str = RETRIEVER_ONEDNN_CACHE) -> None:
    """Cap oneDNN's primitive cache (unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is set); call before any torch operator."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", capacity)


def rng_state() -> dict:
    """Every RNG a training step draws from (torch, CUDA, numpy, Python), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def resolve_device(name: str) -> torch.device:
    """--device as a torch device; under torchrun / accelerate launch, the GPU of this process's LOCAL_RANK."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return device_for(name, int(os.environ.get("LOCAL_RANK", 0)), cuda_count)


def device_for(name: str, local_rank: int, cuda_count: int) -> torch.device:
    """Process `local_rank` of a node with `cuda_count` GPUs uses GPU `local_rank`, so N processes use N GPUs
    instead of all landing on GPU 0; CPU processes share the CPU."""
    if name == "auto":
        name = "cuda" if cuda_count else "cpu"
    if name != "cuda":
        return torch.device(name)
    if not cuda_count:
        raise InputError("--device: cuda requested, but torch sees no CUDA device")
    if local_rank >= cuda_count:
        raise InputError(f"LOCAL_RANK {local_rank}: expected one process per GPU at most, found {cuda_count} GPUs")
    return torch.device("cuda", local_rank)


# ------------------------------------------------------------------------------------- several processes


def launched_processes() -> int:
    """WORLD_SIZE of a torchrun / accelerate launch (1 for a plain `python` run)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> None:
    """Join the launch's process group (NCCL on GPUs, gloo on CPUs); nothing for a single process. The HF Trainer
    and accelerate reuse this group."""
    if launched_processes() > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def process_rank() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 alone writes the run folder, its files and logs."""
    return process_rank()[0] == 0


def barrier() -> None:
    if process_rank()[1] > 1:
        torch.distributed.barrier()


def on_main_process(write: Callable[[], object]) -> None:
    """Run `write` on rank 0 only, then hold every process until it is done: the one way a multi-process run
    touches its run folder, so no process reads a file another is still writing."""
    if is_main_process():
        write()
    barrier()


def share_from_main(value: object) -> object:
    """Rank 0's `value`, on every process (a decision only rank 0 can make, e.g. whether it got the run's lock)."""
    if process_rank()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def leave_process_group() -> None:
    """Close the launch's process group before an early exit: a process that exits holding it can be aborted
    (SIGABRT, "terminate called without an active exception") while its peers close theirs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(count: int, rank: int, processes: int) -> list[int]:
    """The indices of `count` items that process `rank` of `processes` handles: every index exactly once."""
    return list(range(rank, count, processes))


def gather_rows(rows: torch.Tensor, indices: list[int], count: int) -> torch.Tensor:
    """Each process holds `rows` for its shard `indices`; every process gets all `count` rows, in order."""
    if process_rank()[1] == 1:
        return rows
    parts: list = [None] * process_rank()[1]
    torch.distributed.all_gather_object(parts, (indices, rows.cpu()))
    full = torch.empty((count, *rows.shape[1:]), dtype=rows.dtype)
    for part_indices, part_rows in parts:
        full[part_indices] = part_rows
    return full
