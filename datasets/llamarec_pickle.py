"""Convert the original LlamaRec code's preprocessed `dataset.pkl` (or LRURec's) into this repository's custom CSV
format.

    python -m datasets.llamarec_pickle data/preprocessed/beauty_min_rating0-min_uc5-min_sc5/dataset.pkl out/beauty
    python -m datasets.llamarec_pickle ml-1m_min_rating0-min_uc5-min_sc5-leave_one_out/dataset.pkl out/ml-1m \
        --titles ml-1m/movies.dat

The original code's preprocessing (raw files -> 5-core -> leave-one-out) writes a pickle with train/val/test item
lists per user, the item titles (`meta`) and the raw-id maps (`umap`, `smap`); LRURec's pickles have no `meta`, so
their titles come from a file (`--titles`: GroupLens' movies.dat, or a CSV item_id,title keyed by the raw ids of
`smap`). Its tie order among same-day interactions depends on Python's set order, so only that file pins the paper's
exact splits. This writes interactions.csv (user_id,item_id,timestamp; timestamp = the item's position in the user's
sequence, so sorting by it gives the paper's order) and items.csv (item_id,title); `--dataset_code custom
--custom_path out/beauty` then reproduces the pickle's splits exactly (a 5-core of a 5-core keeps everything; a
pickle that is not one is reported with the --min_uc/--min_sc that keep it whole).

The pickle is read by an unpickler that builds only dicts, lists, tuples, strings and numbers: any other object in
the file (the way a malicious pickle runs code) is refused.
"""

import argparse
import csv
import importlib
import numbers
import pickle
import sys
from collections import Counter
from pathlib import Path

from datasets.sources import read_movielens_titles, read_titles_csv
from utils.errors import InputError, WriteError
from utils.files import atomic_output

# numpy integers appear when a list was built from a pandas column; nothing else is ever constructed.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to build {module}.{name}")
        return getattr(importlib.import_module(module), name)


def read_llamarec_pickle(path: Path) -> dict:
    """The pickle's dict, with every value checked to be the LlamaRec layout."""
    try:
        with open(path, "rb") as f:
            data = DataOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise InputError(f"{path}: not a readable LlamaRec dataset.pkl ({type(e).__name__}: {e})") from None
    expected = ("train", "val", "test", "umap", "smap")  # and 'meta' (titles) in LlamaRec's, not in LRURec's
    if (
        not isinstance(data, dict)
        or any(not isinstance(data.get(key), dict) for key in expected)
        or not isinstance(data.get("meta", {}), dict)
    ):
        found = sorted(data, key=str) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected a dict with dict values {list(expected)} (and 'meta'), found {found}")
    for name in ("train", "val", "test"):
        for uid, items in data[name].items():
            if not is_id(uid) or not isinstance(items, list | tuple) or not all(is_id(i) for i in items):
                raise InputError(f"{path}: {name!r} must map user ids to lists of item ids, found {uid!r}: {items!r}")
    for name in ("umap", "smap"):
        for raw, index in data[name].items():
            if not is_id(index):
                raise InputError(f"{path}: {name!r} must map raw ids to integer ids, found {raw!r}: {index!r}")
    for sid, title in data.get("meta", {}).items():
        if not is_id(sid) or not isinstance(title, str):
            raise InputError(f"{path}: 'meta' must map item ids to title strings, found {sid!r}: {title!r}")
    return data


def is_id(value) -> bool:
    """An integer id as the original code writes them (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def read_titles(path: Path) -> dict[str, str]:
    """raw item id -> title: GroupLens' movies.dat (latin-1, titles cleaned as for --dataset_code ml-1m) or a CSV
    with the header item_id,title (titles kept as they are)."""
    return read_movielens_titles(path) if path.suffix == ".dat" else read_titles_csv(path)


def kept_whole_by(rows: list[tuple[str, str, int]]) -> str | None:
    """None when the default 5-core keeps every row; else the --min_uc/--min_sc that do (or why none can)."""
    users, items = Counter(user for user, _, _ in rows), Counter(item for _, item, _ in rows)
    min_user, min_item = min(users.values()), min(items.values())
    if min_user >= 5 and min_item >= 5:
        return None
    if min_user < 3:
        return f"{sum(n < 3 for n in users.values())} users have fewer than 3 items and cannot be kept (--min_uc >= 3)"
    return f"load it with --min_uc {min(min_user, 5)} --min_sc {min(min_item, 5)} to keep it whole"


def interaction_rows(data: dict, raw_item: dict[int, str], path: Path) -> list[tuple[str, str, int]]:
    """(raw user, raw item, position) of every interaction, each user's train + val + test in order."""
    raw_user = {int(uid): str(raw) for raw, uid in data["umap"].items()}
    rows = []
    for uid in sorted(data["train"], key=int):
        sequence = [*data["train"][uid], *data["val"].get(uid, []), *data["test"].get(uid, [])]
        if int(uid) not in raw_user:
            raise InputError(f"{path}: user {uid} of 'train' is missing from 'umap'")
        for position, sid in enumerate(sequence):
            if int(sid) not in raw_item:
                raise InputError(f"{path}: item {sid} of user {uid} is missing from 'smap'")
            rows.append((raw_user[int(uid)], raw_item[int(sid)], position))
    if not rows:
        raise InputError(f"{path}: 'train' holds no users")
    return rows


def note_repeats_and_cores(rows: list[tuple[str, str, int]], path: Path) -> None:
    """Say when loading the converted files will not give back the pickle's split exactly."""
    repeats = len(rows) - len({(user, item) for user, item, _ in rows})
    if repeats:
        print(
            f"note: {repeats} repeated (user, item) pairs; loading keeps the first of each, so the split will differ",
            file=sys.stderr,
        )
    advice = kept_whole_by(rows)
    if advice:
        print(f"note: {path} is not a 5-core: {advice}", file=sys.stderr)


def convert(path: Path, out_dir: Path, titles_path: Path | None = None, placeholder_titles: bool = False) -> dict:
    """Write out_dir/interactions.csv and out_dir/items.csv; return counts (users, items, interactions, and how many
    items got a placeholder title). Titles: `titles_path` when given, else the pickle's 'meta'."""
    data = read_llamarec_pickle(path)
    raw_item = {int(sid): str(raw) for raw, sid in data["smap"].items()}
    rows = interaction_rows(data, raw_item, path)
    used = {item for _, item, _ in rows}
    if titles_path is not None:
        titles, source = read_titles(titles_path), str(titles_path)
    elif "meta" in data:
        titles = {
            raw_item[int(sid)]: title.strip()
            for sid, title in data["meta"].items()
            if int(sid) in raw_item and title.strip()
        }
        source = f"{path}'s 'meta'"
    else:
        raise InputError(f"{path}: has no 'meta' (titles); pass --titles FILE (movies.dat, or a CSV item_id,title)")
    untitled = sorted(used - titles.keys())
    if untitled and not placeholder_titles:
        raise InputError(
            f"{source}: no title for {len(untitled)} of the {len(used)} items (first: {untitled[:3]}); the ranker "
            "shows titles, so fix the file, or pass --placeholder_titles to title them 'item <raw id>'"
        )
    titles |= {item: f"item {item}" for item in untitled}
    if untitled:
        print(
            f"note: {len(untitled)} of {len(used)} items have no title in {source}: titled 'item <raw id>'",
            file=sys.stderr,
        )
    note_repeats_and_cores(rows, path)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: expected an output folder, found a file there")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "interactions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows(rows)
    with atomic_output(out_dir / "items.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title"])
        writer.writerows(sorted((item, titles[item]) for item in used))
    return {
        "users": len(data["train"]),
        "items": len(used),
        "interactions": len(rows),
        "placeholder_titles": len(untitled),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LlamaRec/LRURec dataset.pkl -> interactions.csv + items.csv")
    parser.add_argument(
        "pickle", type=Path, help="dataset.pkl written by the original LlamaRec or LRURec preprocessing"
    )
    parser.add_argument("out_dir", type=Path, help="folder for interactions.csv and items.csv (--custom_path)")
    parser.add_argument(
        "--titles",
        type=Path,
        default=None,
        help="titles by the raw item ids of 'smap': GroupLens' movies.dat (latin-1, '::'-separated) or "
        "a CSV with the header item_id,title; needed for a pickle without 'meta' (LRURec's)",
    )
    parser.add_argument(
        "--placeholder_titles",
        action="store_true",
        help="title items without one 'item <raw id>' instead of refusing (keeps the split whole; "
        "the ranker then sees no real title for them)",
    )
    args = parser.parse_args(argv)
    try:
        print(convert(args.pickle, args.out_dir, args.titles, args.placeholder_titles))
    except (InputError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
