"""Synthetic interaction data in the custom CSV format (interactions.csv + items.csv) with the shape of real
MovieLens-like data: Zipf item popularity, long-tailed (log-normal) sequence lengths, distinct items per user, and
titles of a realistic token length. Used by bench.bench_scale; any size, seeded, written atomically.

    python -m bench.synthetic --interactions 1000000 --output experiments/bench/scale_data/1M
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from utils.files import atomic_output

WORDS = (
    "night star river house dark love city lost war king girl man dead last day blue red secret story life road "
    "time world home dream fire ghost heart game water summer winter black white little big great return"
).split()


def shape_of(interactions: int) -> tuple[int, int]:
    """(users, items) for a target interaction count: ~150 items per user (ML-1M: 165, ML-20M: 144), and items
    growing sub-linearly as in MovieLens (3.4k at 1M, 27k at 20M interactions), between 2k and 30k."""
    users = max(50, round(interactions / 150))
    items = int(np.clip(3500 * (interactions / 1e6) ** 0.7, 2000, 30000))
    return users, items


def sequence_lengths(rng: np.random.Generator, users: int, interactions: int, items: int) -> np.ndarray:
    """Log-normal lengths (a long tail: a few users with thousands of items), at least 20 (as MovieLens), scaled to
    sum to about `interactions`, none above half the catalogue."""
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=users)
    lengths = 20 + raw / raw.sum() * max(0, interactions - 20 * users)
    return np.minimum(np.round(lengths).astype(np.int64), items // 2)


def user_items(rng: np.random.Generator, cdf: np.ndarray, length: int) -> np.ndarray:
    """`length` distinct items drawn by Zipf popularity, in draw order (more draws for long sequences, where the
    popular items repeat)."""
    draws = np.empty(0, dtype=np.int64)
    for size in (int(length * 1.6) + 16, length * 8, length * 64):
        draws = np.concatenate([draws, np.searchsorted(cdf, rng.random(size))])
        _, first = np.unique(draws, return_index=True)
        if len(first) >= length:
            break
    return draws[np.sort(first)][:length] + 1


def write_synthetic(folder: Path, interactions: int, seed: int = 0, zipf: float = 1.0) -> dict:
    """interactions.csv (user_id,item_id,timestamp) and items.csv (item_id,title) in `folder`; returns the shape."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    users, items = shape_of(interactions)
    popularity = 1.0 / np.arange(1, items + 1) ** zipf
    cdf = np.cumsum(popularity / popularity.sum())
    cdf[-1] = 1.0
    lengths = sequence_lengths(rng, users, interactions, items)
    written = 0
    with atomic_output(folder / "interactions.csv") as tmp, open(tmp, "w", newline="") as f:
        f.write("user_id,item_id,timestamp\n")
        for user, length in enumerate(lengths.tolist()):
            chosen = user_items(rng, cdf, length)
            start = 900_000_000 + int(rng.integers(0, 300_000_000))
            stamps = start + np.cumsum(rng.integers(1, 86_400, size=len(chosen)))
            f.write(
                "".join(
                    f"u{user},{item},{stamp}\n" for item, stamp in zip(chosen.tolist(), stamps.tolist(), strict=True)
                )
            )
            written += len(chosen)
    with atomic_output(folder / "items.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["item_id", "title"])
        for item in range(1, items + 1):
            words = rng.choice(WORDS, size=int(rng.integers(2, 6))).tolist()
            writer.writerow([item, f"The {' '.join(words).title()} {item} ({int(rng.integers(1930, 2020))})"])
    return {"users": users, "items": items, "interactions": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interactions", type=int, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic(args.output, args.interactions, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
