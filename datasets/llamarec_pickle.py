"""Convert the original LlamaRec code's preprocessed `dataset.pkl` (or LRURec's) into this repository's custom CSV
format.

    python -m datasets.llamarec_pickle data/preprocessed/beauty_min_rating0-min_uc5-min_sc5/dataset.pkl out/beauty
    python -m datasets.llamarec_pickle ml-1m_min_rating0-min_uc5-min_sc5-leave_one_out/dataset.pkl out/ml-1m \
        --titles ml-1m/movies.dat

The original code's preprocessing (raw files -> 5-core -> leave-one-out) writes a pickle with train/val/test item
lists per user, the item titles (`meta`) and the raw-id maps (`umap`, `smap`); LRURec's pickles have no `meta`, so
their titles come from a file (`--titles`: GroupLens' movies.dat, or a CSV item_id,title keyed by the raw ids of
`smap`) or are left out (stage 1 needs none). Its tie order among same-day interactions depends on Python's set
order, so only that file pins the paper's exact splits. This writes a published-split folder (datasets/published.py:
interactions.csv with each row's split, items.csv, published_split.json with the pickle's sha256);
`--dataset_code custom --custom_path OUT` (or an `lrurec-*` code) then uses the pickle's split exactly as published,
training-only users and repeated items included, with no filter applied again.

The pickle is read by an unpickler that builds only dicts, lists, tuples, strings and numbers: any other object in
the file (the way a malicious pickle runs code) is refused.
"""

import argparse
import csv
import importlib
import numbers
import pickle
import sys
from pathlib import Path

from datasets.published import MARKER, marker_record
from datasets.sources import read_movielens_titles, read_titles_csv
from utils.errors import InputError, WriteError
from utils.files import atomic_output, sha256_file

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


def interaction_rows(data: dict, raw_item: dict[int, str], path: Path) -> list[tuple[str, str, int, str]]:
    """(raw user, raw item, position, split) of every interaction, each user's train + val + test in order."""
    raw_user = {int(uid): str(raw) for raw, uid in data["umap"].items()}
    rows = []
    for uid in sorted(data["train"], key=int):
        parts = [(part, sid) for part in ("train", "val", "test") for sid in data[part].get(uid, [])]
        if int(uid) not in raw_user:
            raise InputError(f"{path}: user {uid} of 'train' is missing from 'umap'")
        for position, (part, sid) in enumerate(parts):
            if int(sid) not in raw_item:
                raise InputError(f"{path}: item {sid} of user {uid} is missing from 'smap'")
            rows.append((raw_user[int(uid)], raw_item[int(sid)], position, part))
    if not rows:
        raise InputError(f"{path}: 'train' holds no users")
    return rows


def pickle_titles(data: dict, raw_item: dict[int, str]) -> dict[str, str]:
    return {
        raw_item[int(sid)]: title.strip()
        for sid, title in data["meta"].items()
        if int(sid) in raw_item and title.strip()
    }


def guess_dataset(path: Path) -> str | None:
    """'video' from .../video_min_rating0-min_uc5-min_sc5-leave_one_out/dataset.pkl (the original folders' names)."""
    folder = Path(path).resolve().parent.name
    return folder.split("_min_rating")[0] if "_min_rating" in folder else None


def convert(
    path: Path,
    out_dir: Path,
    titles_path: Path | None = None,
    placeholder_titles: bool = False,
    dataset: str | None = None,
) -> dict:
    """Write out_dir/interactions.csv (with each row's split), out_dir/items.csv (when there are titles) and
    out_dir/published_split.json; return the split's counts. Titles: `titles_path` when given, else the pickle's
    'meta', else none (the retriever trains without them; the ranker refuses)."""
    data = read_llamarec_pickle(path)
    raw_item = {int(sid): str(raw) for raw, sid in data["smap"].items()}
    rows = interaction_rows(data, raw_item, path)
    used = sorted({item for _, item, _, _ in rows})
    if titles_path is not None:
        titles, source = read_titles(titles_path), str(titles_path)
    elif "meta" in data:
        titles, source = pickle_titles(data, raw_item), f"{path}'s 'meta'"
    else:
        titles, source = {}, None
    untitled = [item for item in used if item not in titles]
    if source is not None and untitled and not placeholder_titles:
        raise InputError(
            f"{source}: no title for {len(untitled)} of the {len(used)} items (first: {untitled[:3]}); the ranker "
            "shows titles, so fix the file, or pass --placeholder_titles to title them 'item <raw id>'"
        )
    if placeholder_titles:
        titles = {**titles, **{item: f"item {item}" for item in untitled}}
        print(f"note: {len(untitled)} of {len(used)} items titled 'item <raw id>'", file=sys.stderr)
    elif source is None:
        print(
            f"note: {path} has no titles ('meta') and no --titles was given: no items.csv; the retriever trains on "
            "this split, the ranker needs titles (--titles FILE or --placeholder_titles)",
            file=sys.stderr,
        )
    evaluated = sum(1 for uid in data["train"] if data["val"].get(uid))
    stats = {
        "users": len(data["train"]),
        "evaluated_users": evaluated,
        "items": len(used),
        "interactions": len(rows),
        "placeholder_titles": len(untitled) if placeholder_titles else 0,
    }
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: expected an output folder, found a file there")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)  # until the new one is written, the folder is no published split
    with atomic_output(out_dir / "interactions.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp", "split"])
        writer.writerows(rows)
    if titles:
        with atomic_output(out_dir / "items.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["item_id", "title"])
            writer.writerows((item, titles[item]) for item in used if item in titles)
    elif (out_dir / "items.csv").exists():
        (out_dir / "items.csv").unlink()  # an earlier conversion's titles are not this split's
    # the marker last: a folder with it is complete
    marker = marker_record(
        Path(path).name, sha256_file(path), dataset or guess_dataset(path), stats, source and Path(source).name
    )
    with atomic_output(out_dir / MARKER) as tmp:
        tmp.write_text(marker, encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="LlamaRec/LRURec dataset.pkl -> a published-split folder (interactions.csv with each row's split, "
        "items.csv when there are titles, published_split.json), used exactly as published"
    )
    parser.add_argument(
        "pickle", type=Path, help="dataset.pkl written by the original LlamaRec or LRURec preprocessing"
    )
    parser.add_argument(
        "out_dir",
        type=Path,
        help="the folder to write (--custom_path, or data/lrurec-<name>/ for --dataset_code lrurec-<name>)",
    )
    parser.add_argument(
        "--titles",
        type=Path,
        default=None,
        help="titles by the raw item ids of 'smap': GroupLens' movies.dat (latin-1, '::'-separated) or "
        "a CSV with the header item_id,title; without it and without 'meta' (LRURec's pickles) no items.csv is "
        "written: the retriever trains, the ranker refuses",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the dataset's name recorded in published_split.json (default: from the pickle's folder name, e.g. "
        "'video' for video_min_rating0-min_uc5-min_sc5-leave_one_out/)",
    )
    parser.add_argument(
        "--placeholder_titles",
        action="store_true",
        help="title items without one 'item <raw id>' instead of refusing (keeps the split whole; "
        "the ranker then sees no real title for them)",
    )
    args = parser.parse_args(argv)
    try:
        print(convert(args.pickle, args.out_dir, args.titles, args.placeholder_titles, args.dataset))
    except (InputError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
