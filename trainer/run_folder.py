"""Run folders experiments/<stage>/<dataset>/<run>/: creating one, checking a --resume against the flags it was
started with, the records every run writes (config.json: the resolved flags; environment.json), and reading finished
and unfinished runs back (the results report)."""

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from utils.errors import InputError, WriteError, describe_os_error
from utils.files import REPO_ROOT, atomic_write_json, read_json_object


def run_folder(root: Path, stage: str, dataset_name: str, run_name: str) -> Path:
    return Path(root) / stage / dataset_name / run_name


def config_stage(config: dict) -> str | None:
    """The stage whose script wrote this config.json, from a flag only that stage has (every retriever config.json has
    --bert_max_len, every ranker's --llm_base_model); None for a config of neither or both."""
    ranker, retriever = "llm_base_model" in config, "bert_max_len" in config
    return None if ranker == retriever else ("ranker" if ranker else "retriever")


def check_run_name(name: str) -> None:
    """--run_name is one plain folder name: the run folder is experiments/<stage>/<dataset>/<name>, never a folder
    above, beside or outside it (which --overwrite would delete)."""
    if (
        not name
        or name in (".", "..")
        or name != name.strip()
        or any(sep in name for sep in ("/", "\\", os.sep, "\0"))
        or Path(name).is_absolute()
    ):
        raise InputError(
            f"--run_name: expected one plain folder name (no '/' or '\\', not '.' or '..', no surrounding spaces), "
            f"found {name!r}; the run folder is <experiment_root>/<stage>/<dataset>/<run_name>"
        )


def run_stage_of(folder: Path) -> str | None:
    """The stage whose run folder `folder` is, from its config.json; None when it is no run folder of ours."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = read_json_object(path)
    except InputError:
        return None
    return config_stage(config)


def prepare_run_dir(run_dir: Path, stage: str, resume: bool, overwrite: bool, create: bool = True) -> Path:
    """An existing, non-empty run folder needs --resume or --overwrite. --overwrite deletes a folder only when it is
    a run folder of `stage` (its config.json says so): anything else is refused, naming the path.

    create=False only checks (what every process of a multi-process launch does before rank 0 creates it).
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        found = "a symbolic link" if run_dir.is_symlink() else "a file"
        raise InputError(f"{run_dir}: expected a run folder, found {found}; move it away or pass another --run_name")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (overwrite or resume):
            raise InputError(
                f"{run_dir}: run folder exists; pass --resume to continue it, --overwrite to replace it, "
                "or --run_name to start another"
            )
        found = run_stage_of(run_dir)
        if found != stage:
            what = f"a {found} run folder" if found else f"a folder that is not a {stage} run (no {stage} config.json)"
            action = "--overwrite deletes" if overwrite else "--resume continues"
            raise InputError(
                f"{run_dir}: expected a {stage} run folder, found {what}; {action} only {stage} run folders, so "
                "nothing was touched: move its files away or pass another --run_name"
            )
        if overwrite and create:
            shutil.rmtree(run_dir)
    elif resume:
        raise InputError(f"--resume: no run folder to resume at {run_dir}")
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"could not create the run folder {describe_os_error(e, run_dir)}") from None
    return run_dir


def flag_record(values: dict) -> dict:
    """The flags as JSON values (paths as strings), sorted: what config.json holds."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in sorted(values.items())}


RESUME_KEY_NAMES = {"dataset_name": "dataset", "processes": "launched processes"}  # resume keys that are not flags


def check_resume_config(run_dir: Path, current: dict, keys: tuple[str, ...]) -> None:
    """--resume continues the run in run_dir only with the values of `keys` it was started with (its config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    saved = read_json_object(path)
    current = flag_record(current)
    changed = [key for key in keys if key in saved and saved[key] != current.get(key)]
    if changed:
        details = ", ".join(
            f"{RESUME_KEY_NAMES.get(key, '--' + key)} {saved[key]!r} -> {current.get(key)!r}" for key in changed
        )
        raise InputError(
            f"--resume: {run_dir} was started with other flags ({details}); pass the run's own flags "
            f"(see {path}) or start another run (--run_name, --overwrite)"
        )


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


def environment_info(seed: int, extra: dict | None = None) -> dict:
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
        "seed": seed,
        "argv": sys.argv,
        **(extra or {}),
    }


def write_run_info(run_dir: Path, flags: dict, seed: int, environment: dict | None = None) -> None:
    """config.json (the resolved flags) and environment.json (versions, commit, device, seed, and the stage's own
    `environment` facts) in run_dir."""
    atomic_write_json(Path(run_dir) / "config.json", flag_record(flags))
    atomic_write_json(Path(run_dir) / "environment.json", environment_info(seed, environment))


def start_wandb(project: str, run_dir: Path, flags: dict):
    """A Weights & Biases run named <stage>-<dataset>-<run> in run_dir/wandb/ (works with WANDB_MODE=offline)."""
    import wandb

    run_dir = Path(run_dir)
    return wandb.init(
        project=project,
        name=f"{run_dir.parent.parent.name}-{run_dir.parent.name}-{run_dir.name}",
        config=flag_record(flags),
        dir=str(run_dir),
        resume="allow",
    )


# ---------------------------------------------------------------------------------------------- reading runs back

STAGES = ("retriever", "ranker")
RUN_FILES = ("config.json", "test_metrics.json", "val_history.jsonl")


@dataclass
class Run:
    stage: str
    dataset: str
    name: str
    path: Path
    config: dict | None
    test: dict | None  # None: unfinished
    history: list[dict]


def _read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []  # zero-shot rankers and runs stopped before their first validation have none
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: expected JSON lines, found an unreadable file ({e})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise InputError(f"{path}: line {number}: expected a JSON object, found unreadable JSON ({e})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
    return records


def _recorded_dataset(config: dict, test: dict | None) -> str | None:
    """The dataset a run was made on as its files record it (config.json, else a ranker's test_metrics.json)."""
    for value in (config.get("dataset_name"), (test or {}).get("dataset")):
        if isinstance(value, str) and value.strip():
            return value
    return None


def load_run(stage: str, run_dir: Path) -> Run | None:
    """The run in run_dir, or None (after a warning) when one of its files is malformed.

    Its stage and dataset are what its config.json records; the folder names (`stage`, run_dir's parent) only stand
    in where it records none, and a warning names a folder whose names say otherwise (a custom-data run moved
    under ml-100k/ must not be tabled beside the paper's ml-100k numbers).
    """
    try:
        config_path, test_path = run_dir / "config.json", run_dir / "test_metrics.json"
        config = read_json_object(config_path) if config_path.is_file() else None
        test = read_json_object(test_path) if test_path.is_file() else None
        history = _read_history(run_dir / "val_history.jsonl")
    except InputError as e:
        print(f"warning: {e}; run skipped", file=sys.stderr)
        return None
    if test is not None and config is None:
        print(
            f"warning: {run_dir}: has test_metrics.json but no config.json, so its flags are unknown; run skipped",
            file=sys.stderr,
        )
        return None
    folder = (stage, run_dir.parent.name)
    recorded = folder
    if config is not None:
        recorded = (config_stage(config) or folder[0], _recorded_dataset(config, test) or folder[1])
    if recorded != folder:
        print(
            f"warning: {run_dir}: the folder says {folder[0]} / {folder[1]}, its config.json says "
            f"{recorded[0]} / {recorded[1]}; tabled as {recorded[0]} / {recorded[1]} (move the folder to "
            f"<root>/{recorded[0]}/{recorded[1]}/ to silence this)",
            file=sys.stderr,
        )
    return Run(recorded[0], recorded[1], run_dir.name, run_dir, config, test, history)


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in RUN_FILES)


def _note_nested_runs(folder: Path) -> None:
    """Run folders one level too deep (ROOT/<stage>/<dataset>/a/b/, once made by --run_name a/b) are not read;
    a note names each, so a run is never left out of the report unsaid."""
    for child in sorted(folder.iterdir()):
        if _is_run_dir(child):
            print(
                f"note: {child}: a run folder one level below ROOT/<stage>/<dataset>/<run>/ is not reported; "
                f"move it to {folder.parent / child.name} to include it",
                file=sys.stderr,
            )


def find_runs(root: Path) -> list[Run]:
    """Every readable run folder ROOT/<stage>/<dataset>/<run>/; anything else under ROOT is ignored."""
    root = Path(root)
    if not root.is_dir():
        found = "a file" if root.exists() else "nothing"
        raise InputError(f"ROOT {root}: expected an experiments folder, found {found} there")
    run_dirs = []
    for stage in STAGES:
        dataset_dirs = sorted((root / stage).iterdir()) if (root / stage).is_dir() else []
        for dataset_dir in (path for path in dataset_dirs if path.is_dir()):
            for folder in sorted(dataset_dir.iterdir()):
                if _is_run_dir(folder):
                    run_dirs.append((stage, folder))
                elif folder.is_dir():
                    _note_nested_runs(folder)
    if not run_dirs:
        raise InputError(
            f"ROOT {root}: expected run folders ROOT/retriever/<dataset>/<run>/ or ROOT/ranker/<dataset>/<run>/ "
            f"(with a config.json, test_metrics.json or val_history.jsonl), found none"
        )
    runs = [run for stage, run_dir in run_dirs if (run := load_run(stage, run_dir)) is not None]
    if not runs:
        raise InputError(f"ROOT {root}: found {len(run_dirs)} run folders, none readable (see the warnings above)")
    return runs


def describe_unfinished(run: Run) -> str:
    steps = [record["step"] for record in run.history if "step" in record]
    plural = "" if len(steps) == 1 else "s"
    progress = f"{len(steps)} validation{plural}, last at step {steps[-1]}" if steps else "no validation yet"
    return f"{run.stage} / {run.dataset} / {run.name}: {progress}"
