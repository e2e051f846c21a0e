import errno


class InputError(Exception):
    """Bad user input (a flag, a file): the message names it, what was expected and what was found."""


class WriteError(Exception):
    """A file or folder could not be written (disk full, permission denied, read-only file system): the message
    names it and says that nothing was left half written."""


def one_line(text: str, limit: int = 200) -> str:
    """A library's (often multi-line) message as one line, cut to `limit` characters: errors stay one line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


FIXES = {
    errno.ENOSPC: "free space on that disk (or pass another output path) and rerun",
    errno.EDQUOT: "free space within your disk quota and rerun",
    errno.EACCES: "check the permissions of that path, or pass another one",
    errno.EPERM: "check the permissions of that path, or pass another one",
    errno.EROFS: "the file system is read-only; pass a path on a writable one",
    errno.EFBIG: "the file exceeds the size limit of this process or file system (ulimit -f)",
}


def describe_os_error(e: OSError, path=None) -> str:
    """One line for an OSError the user can meet (disk full, no permission, missing folder): the path, the reason
    and, where one is known, the fix."""
    where = path if path is not None else e.filename
    reason = e.strerror or one_line(str(e)) or type(e).__name__
    fix = FIXES.get(e.errno)
    return ("" if where is None else f"{where}: ") + reason + (f"; {fix}" if fix else "")
