"""Small helpers shared by both stages: atomic result files, seeding, devices, run folders."""

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from config import InputError


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line (a log: a crash can at worst lose the line being written)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


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
