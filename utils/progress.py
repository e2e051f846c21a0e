"""One progress bar style for every phase that can take more than a few seconds on large data (training epochs,
validation, test, candidate export, prompt building, the ranker's test): a count, a rate and an ETA on stderr,
cleared when the phase ends, so the log keeps the phase's one-line result."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm


def progress(total: int, desc: str, unit: str = "it", disable: bool = False) -> tqdm:
    """A bar over `total` units; use it as a context manager so an error or Ctrl-C clears it before the message."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2, dynamic_ncols=True, disable=disable)


@contextmanager
def reading(path: Path, desc: str, min_bytes: int = 64 * 2**20) -> Iterator[BinaryIO]:
    """`path` opened for binary reading, with a progress bar by bytes read when the file has at least `min_bytes`
    (a 10M-interaction CSV takes tens of seconds to parse)."""
    size = os.path.getsize(path)
    with (
        open(path, "rb") as f,
        tqdm.wrapattr(
            f,
            "read",
            total=size,
            desc=desc,
            unit="B",
            unit_scale=True,
            leave=False,
            mininterval=2,
            disable=size < min_bytes,
        ) as wrapped,
    ):
        yield wrapped
