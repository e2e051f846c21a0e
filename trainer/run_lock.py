"""One writer per run folder. Every process that writes a run folder (training, --resume, --eval_only, a sweep's
trial, rank 0 of a torchrun launch) holds the folder's lock for as long as it runs; a second process is refused
before it touches anything, with one line naming the holder.

The lock is the OS's own: an flock on <stage>/<dataset>/.<run>.lock, a file beside the run folder, not in it, so
that --overwrite's delete and the folder's first creation happen under it. The kernel drops an flock when its
process ends, however it ends (kill -9, a crash), so a killed run never blocks the next --resume. The file also
records its holder (host, pid, start, a heartbeat every HEARTBEAT_SECONDS): for the refusal's message, and for what
flock alone cannot settle, a holder on another machine on a network file system that may not share locks between
machines. A clean exit, Ctrl-C or an error deletes the file.
"""

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.errors import InputError, WriteError, describe_os_error

HEARTBEAT_SECONDS = 30
STALE_SECONDS = 300  # 10 missed heartbeats: the holder is probably gone (killed, or its machine went down)

LOCKED, BUSY, NO_LOCKS = "locked", "busy", "no locks"  # what flock answered: ours, another process's, unsupported


@dataclass
class Holder:
    """The process that holds (or last held) a run folder's lock, as its lock file records it."""

    host: str
    pid: int
    command: str
    started: float  # unix time
    heartbeat: float  # unix time of its last heartbeat

    def text(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"{self.command}, host {self.host}, pid {self.pid}, since {since}"


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / f".{Path(run_dir).name}.lock"


def this_process() -> Holder:
    now = time.time()
    return Holder(socket.gethostname(), os.getpid(), Path(sys.argv[0]).name or "python", now, now)


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def check_holder(run_dir: Path, state: str, holder: Holder | None, take_over: bool, now: float) -> str | None:
    """Whether this process may write run_dir, given what flock answered (`state`) and the holder its lock file
    records: None or a note when it may; an InputError naming the holder and what to do when it may not."""
    if holder is None:
        if state == BUSY:  # it has just taken the lock and not yet recorded itself
            raise InputError(
                f"{run_dir}: another process is writing this run folder (it has not yet recorded itself in "
                f"{lock_path(run_dir)}); nothing was touched: rerun once it ends"
            )
        return None
    if holder.host == socket.gethostname():
        return check_same_machine(run_dir, state, holder)
    return check_other_machine(run_dir, state, holder, take_over, now)


def check_same_machine(run_dir: Path, state: str, holder: Holder) -> str:
    """On this machine flock answers (or, on a file system without it, whether the pid runs): a live holder is
    refused whatever the flags, a dead one's run is taken over with a note."""
    if state == BUSY and not pid_alive(holder.pid):  # a child it forked shares its lock, and outlived it
        raise InputError(
            f"{run_dir}: its last writer ({holder.text()}) has ended, but a process it started still holds the run "
            f"folder's lock; nothing was touched: rerun in a moment, or stop that process (fuser -v "
            f"{lock_path(run_dir)} names it)"
        )
    if state == BUSY or (state == NO_LOCKS and pid_alive(holder.pid)):
        raise InputError(
            f"{run_dir}: another process is writing this run folder ({holder.text()}); nothing was touched: "
            f"wait for it to end, or stop it (kill {holder.pid}), then rerun"
        )
    # the lock was free, so its holder is gone even if its pid now names another process (a reboot, say)
    gone = f"pid {holder.pid} is not running" if not pid_alive(holder.pid) else "the system released its lock"
    return (
        f"note: {run_dir}: its last writer ({holder.text()}) ended without a clean exit ({gone}); taking the run over"
    )


def check_other_machine(run_dir: Path, state: str, holder: Holder, take_over: bool, now: float) -> str:
    """A holder on another machine: its pid cannot be checked from here, and a network file system may not share
    flocks between machines. Only a held lock with a live heartbeat is sure; the rest is the user's call
    (--take_over)."""
    beat = now - holder.heartbeat
    stale = beat >= STALE_SECONDS
    where = f"{holder.text()}, last heartbeat {ago(beat)}"
    if state == BUSY and not stale:
        raise InputError(
            f"{run_dir}: a process on another machine is writing this run folder ({where}); nothing was touched: "
            f"wait for it to end, or stop it on {holder.host}, then rerun"
        )
    if take_over:
        return f"note: {run_dir}: --take_over: taking the run over from ({where})"
    if state == BUSY:
        why = f"holds this run folder's lock ({where}) but has stopped its heartbeat"
        raise InputError(
            f"{run_dir}: a process on another machine {why}; nothing was touched: if it is gone (its machine went "
            "down), pass --take_over to take the run over"
        )
    if stale:
        raise InputError(
            f"{run_dir}: its last writer, on another machine ({where}), stopped its heartbeat without a clean exit; "
            "its pid cannot be checked from here, so nothing was touched: if it is gone, pass --take_over to take "
            "the run over"
        )
    raise InputError(
        f"{run_dir}: a process on another machine may be writing this run folder ({where}); this file system may "
        f"not share file locks between machines, so nothing was touched: stop it on {holder.host}, or if it is gone, "
        "pass --take_over to take the run over"
    )


def try_flock(fd: int) -> str:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return BUSY
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # a file system without flock
            return NO_LOCKS
        raise
    return LOCKED


def open_lock(path: Path) -> tuple[int, str]:
    """The lock file, opened and flocked if possible. A holder deletes the file before it lets go of it, so a lock
    taken on a file that is no longer `path` guards nothing: then the file is opened anew."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # its folder was removed in between (left empty by a refused process)
            continue
        state = try_flock(fd)
        try:
            current = os.stat(path)
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                return fd, state
        except FileNotFoundError:
            pass
        os.close(fd)


def read_holder(fd: int) -> Holder | None:
    """The record in the lock file; None for an empty or unreadable one. A record caught half written (its holder
    rewrites it at every heartbeat) is read again."""
    for _ in range(5):
        data = os.pread(fd, 4096, 0)
        if not data:
            return None
        try:
            record = json.loads(data)
            holder = Holder(**record)
        except (ValueError, TypeError):
            time.sleep(0.05)
            continue
        types = {"host": str, "pid": int, "command": str, "started": (int, float), "heartbeat": (int, float)}
        if not all(isinstance(record[key], kind) for key, kind in types.items()):
            return None
        return holder if 0 < holder.pid and 0 <= holder.started < 1e11 and 0 <= holder.heartbeat < 1e11 else None
    return None


def write_holder(fd: int, holder: Holder) -> None:
    data = json.dumps(asdict(holder)).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)  # a network file system shows other machines the heartbeat only once flushed


def beat(fd: int, holder: Holder, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        holder.heartbeat = time.time()
        try:
            write_holder(fd, holder)
        except OSError:
            pass  # a full disk must not end the run; the lock itself still holds


def created_parents(folder: Path) -> list[Path]:
    """The folders mkdir will create for `folder`, deepest first: removed again if the run leaves them empty."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run made its folder, or another process its lock), or gone already
            return


@contextmanager
def run_lock(run_dir: Path, take_over: bool = False) -> Iterator[None]:
    """Hold run_dir's lock while the block runs; InputError (nothing touched) when another process holds it. A note
    says when a killed writer's run is taken over."""
    path = lock_path(run_dir)
    made = created_parents(path.parent)
    try:
        fd, state = open_lock(path)
    except OSError as e:
        remove_if_empty(made)
        raise WriteError(f"could not create the run folder's lock file {describe_os_error(e, path)}") from None
    me = this_process()
    try:
        note = check_holder(run_dir, state, read_holder(fd), take_over, me.started)
        try:
            write_holder(fd, me)
        except OSError as e:
            raise WriteError(f"could not write the run folder's lock file {describe_os_error(e, path)}") from None
    except BaseException:
        os.close(fd)  # refused: the file, and its record of the holder, stay as they were
        remove_if_empty(made)
        raise
    if note:
        print(note, file=sys.stderr, flush=True)
    stop = threading.Event()
    heart = threading.Thread(target=beat, args=(fd, me, stop), daemon=True)
    heart.start()
    try:
        yield
    finally:
        stop.set()
        heart.join()
        try:  # deleted while still held, so a process waiting on this file sees it is gone (open_lock)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        remove_if_empty(made)
