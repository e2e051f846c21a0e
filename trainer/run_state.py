"""What both training stages keep the same way in a run folder, so that a run stopped at any point and continued
with --resume ends with the files of a run that never stopped:

- the validation history (val_history.jsonl): one line per validation, appended; --resume drops the lines after
  the checkpoint it continues from, since that part is trained (and validated) again;
- the run's clock: seconds of training (validation included) and of validation, summed over every session;
- the training summary (training_summary.json), written when training ends and read back by a later --resume.
"""

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils.files import append_jsonl, atomic_write_json, atomic_write_text, read_json_object

HISTORY, SUMMARY = "val_history.jsonl", "training_summary.json"  # in the run folder


def append_validation(path: Path, record: dict) -> None:
    """Add one validation's record to the history at `path` (a crash can at worst cut this line: readers skip it)."""
    append_jsonl(path, record)


def _lines(path: Path) -> list[tuple[str, dict]]:
    # (line, record) of every whole record; a line cut off by an interruption (or being written) is skipped
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append((line, record))
    return records


def read_history(path: Path) -> list[dict]:
    """The validation records at `path` in order ([] when there is none yet)."""
    return [record for _, record in _lines(path)]


def truncate_history(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the checkpoint --resume continues from): the later ones belong to the
    part of the run that is trained again. The kept lines are kept byte for byte."""
    if not path.exists():
        return
    kept = [line if line.endswith("\n") else line + "\n" for line, r in _lines(path) if r.get("step", math.inf) <= step]
    atomic_write_text(path, "".join(kept))


@dataclass(frozen=True)
class Clock:
    """A run's time over its sessions (a fresh start, then one per --resume)."""

    seconds: float = 0.0  # training, validation included
    validation_seconds: float = 0.0
    sessions: int = 0


class SessionClock:
    """The run's clock while a session runs: the sessions before it (saved in the checkpoint it continues from)
    plus this one, counted from when it is made."""

    def __init__(self, before: Clock | None = None) -> None:
        self.before = before or Clock()
        self.start = time.time()
        self.validation_seconds = 0.0  # since this process started the run (or resumed it)

    def add_validation(self, seconds: float) -> None:
        self.validation_seconds += seconds

    def elapsed(self) -> Clock:
        """The run's clock up to now, this start included (what a checkpoint saves for a later --resume)."""
        return Clock(
            seconds=self.before.seconds + time.time() - self.start,
            validation_seconds=self.before.validation_seconds + self.validation_seconds,
            sessions=self.before.sessions + 1,
        )


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def clock_summary(clock: Clock) -> dict:
    """The training summary's time keys (the same in both stages)."""
    return {
        "train_seconds_incl_validation": round(clock.seconds, 2),
        "validation_seconds": round(clock.validation_seconds, 2),
        "sessions": clock.sessions,
    }


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_json(run_dir / SUMMARY, summary)


def read_summary(run_dir: Path) -> dict | None:
    """training_summary.json of a run whose training ended (None when it has none: an older or unfinished run)."""
    path = run_dir / SUMMARY
    return read_json_object(path) if path.is_file() else None
