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
        details = ", ".join(f"--{key} {saved[key]!r} -> {current.get(key)!r}" for key in changed)
        raise InputError(
            f"--resume: {run_dir} was started with other flags ({details}); pass the run's own flags "
            f"(see {path}) or start another run (--run_name, --overwrite)"
        )


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: cuda requested, but torch sees no CUDA device")
    return torch.device(name)


def prepare_run_dir(root: Path, stage: str, dataset_name: str, run_name: str, resume: bool, overwrite: bool) -> Path:
    """experiments/<stage>/<dataset>/<run_name>; an existing folder needs --resume or --overwrite."""
    run_dir = Path(root) / stage / dataset_name / run_name
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise InputError(
                f"{run_dir}: run folder exists; pass --resume to continue it, --overwrite to replace it, "
                "or --run_name to start another"
            )
    elif resume:
        raise InputError(f"--resume: no run folder to resume at {run_dir}")
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
