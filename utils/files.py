"""Files that are written whole or not at all (a crash or Ctrl-C never leaves a half-written one), and readers that
turn a damaged file into an InputError naming it."""

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch

from utils.errors import InputError, WriteError, describe_os_error, one_line

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_error(e: OSError, path: Path) -> WriteError:
    """The one-line error of a write that failed with `e`; the caller has removed what it had half written."""
    blocking = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir's "File exists" / "Not a directory" would not say which part of the path
        return WriteError(f"could not write {path}: {blocking} is a file, not a folder; pass another path")
    return WriteError(f"could not write {describe_os_error(e, path)} (nothing was left half written)")


@contextmanager
def atomic_output(
    path: Path, folder: bool = False, keep_existing: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Yield a temp file (or, with folder=True, an empty temp folder) beside `path`; on success it is renamed to
    `path`, replacing what was there, on any error (Ctrl-C included) it is deleted and `path` stays as it was. An
    OSError (disk full, permission denied) becomes a WriteError naming `path`.

    keep_existing: when a folder already stands at `path` (another process wrote the same one first) and
    keep_existing(path) is true, that one is kept and the new one deleted."""
    path = Path(path)
    if not folder and path.is_dir():
        raise InputError(f"{path}: expected a file to write, found a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _make_temp(path, folder)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700; results are meant to be read by others
        os.chmod(tmp, 0o755 if folder else 0o644)
        _rename_into_place(tmp, path, keep_existing)
    except OSError as e:
        _remove(tmp)
        raise write_error(e, path) from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_folder(path: Path, keep_existing: Callable[[Path], bool] | None = None) -> AbstractContextManager[Path]:
    """atomic_output(path, folder=True): `path` never mixes the files of two writes."""
    return atomic_output(path, folder=True, keep_existing=keep_existing)


def _make_temp(path: Path, folder: bool) -> Path:
    # Beside `path` (same file system: the rename is atomic) and hidden, with a unique name (parallel writers).
    if folder:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _remove(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _rename_into_place(tmp: Path, path: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    try:
        os.replace(tmp, path)  # atomic; a folder only replaces an absent or empty one
        return
    except OSError:
        if not path.exists():
            raise
    if keep_existing is not None and keep_existing(path):
        _remove(tmp)
        return
    # A non-empty folder cannot be renamed over: move it aside, put the new one in, then delete the old one.
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    try:
        os.replace(path, old / path.name)
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old / path.name, path)  # put the old one back: `path` stays as it was
        old.rmdir()  # (were that to fail too, the old one would stay in `old`, never deleted)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_output(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (e.g. a full disk) as a RuntimeError
            free = shutil.disk_usage(Path(path).parent).free
            reason = f"torch.save failed ({one_line(e, 120)}); {free / 2**20:.0f} MiB free on that disk"
            raise OSError(errno.EIO, reason) from None


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load(weights_only=True) with a clear error for a file that is not one of our checkpoints."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # unpickling, zip and I/O errors all mean "not a readable checkpoint"
        reason = one_line(str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        if "weights_only" in str(e):  # torch then advises weights_only=False: never for a file of unknown origin
            reason = "it is not a torch file of tensors and plain values"
        raise InputError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    return checkpoint


def read_json_object(path: Path) -> dict:
    """A JSON object from path; InputError naming the file when it is missing, unreadable or anything else."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: expected a JSON object, found an unreadable file ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line (a log: a crash can at worst lose the line being written)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    except OSError as e:
        raise WriteError(f"could not append to {describe_os_error(e, path)} (--resume drops a cut line)") from None


def sha256_file(path: Path) -> str:
    """A file's content fingerprint (raw data files in the dataset cache key; the candidates file a ranker was
    trained on, which recommend.py checks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
