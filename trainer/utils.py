"""Small helpers shared by every part: the input-error type, atomic result files, seeding, devices, run folders
and the environment record. Imports no other module of this project, so anything can import it."""

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


class InputError(Exception):
    """Bad user input (a flag, a file): the message names it, what was expected and what was found."""


def config_to_dict(cfg: argparse.Namespace) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in sorted(vars(cfg).items())}


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it to `path`, on any error delete it, so a crash or
    Ctrl-C never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load(weights_only=True) with a clear error for a file that is not one of our checkpoints."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # unpickling, zip and I/O errors all mean "not a readable checkpoint"
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line (a log: a crash can at worst lose the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def truncate_history(path: Path, max_step: int) -> None:
    """Keep the validation lines of steps <= max_step: the rest belong to the part of an interrupted run that
    --resume repeats. A line cut off by the interruption is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= max_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


RESUME_KEY_NAMES = {"dataset_name": "dataset", "processes": "launched processes"}  # resume keys that are not flags


def check_resume_config(run_dir: Path, cfg, keys: tuple[str, ...]) -> None:
    """--resume continues the run in run_dir only with the flags it started with (those in `keys`)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e}); cannot check that --resume uses the run's flags") from None
    current = config_to_dict(cfg)
    changed = [key for key in keys if key in saved and saved[key] != current.get(key)]
    if changed:
        details = ", ".join(
            f"{RESUME_KEY_NAMES.get(key, '--' + key)} {saved[key]!r} -> {current.get(key)!r}" for key in changed
        )
        raise InputError(
            f"--resume: {run_dir} was started with other flags ({details}); pass the run's own flags "
            f"(see {path}) or start another run (--run_name, --overwrite)"
        )


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def prepare_run_dir(
    root: Path, stage: str, dataset_name: str, run_name: str, resume: bool, overwrite: bool, create: bool = True
) -> Path:
    """experiments/<stage>/<dataset>/<run_name>; an existing folder needs --resume or --overwrite.

    create=False only checks (what every process of a multi-process launch does before rank 0 creates it).
    """
    run_dir = Path(root) / stage / dataset_name / run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (overwrite or resume):
            raise InputError(
                f"{run_dir}: run folder exists; pass --resume to continue it, --overwrite to replace it, "
                "or --run_name to start another"
            )
        if overwrite and create:
            shutil.rmtree(run_dir)
    elif resume:
        raise InputError(f"--resume: no run folder to resume at {run_dir}")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment_info(cfg: argparse.Namespace) -> dict:
    packages = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "pandas", "gguf"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "argv": sys.argv,
    }


def write_run_info(run_dir: Path, cfg: argparse.Namespace) -> None:
    """Write the resolved config and the environment (versions, commit, device, seed) into the run folder."""
    atomic_write_json(run_dir / "config.json", config_to_dict(cfg))
    atomic_write_json(run_dir / "environment.json", environment_info(cfg))
