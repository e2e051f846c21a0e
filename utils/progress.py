"""One progress bar style for every phase that can take more than a few seconds on large data (training epochs,
validation, test, candidate export, prompt building, the ranker's test): a count, a rate and an ETA on stderr,
cleared when the phase ends, so the log keeps the phase's one-line result."""

from tqdm import tqdm


def progress(total: int, desc: str, unit: str = "it", disable: bool = False) -> tqdm:
    """A bar over `total` units; use it as a context manager so an error or Ctrl-C clears it before the message."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2, dynamic_ncols=True, disable=disable)
