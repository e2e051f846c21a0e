"""Published splits: another paper's train/validation/test lists used exactly as published.

`python -m datasets.llamarec_pickle` converts a LlamaRec or LRURec `dataset.pkl` into a folder holding

  interactions.csv   user_id,item_id,timestamp,split  (timestamp: the item's position in the user's sequence;
                     split: train, val or test)
  items.csv          item_id,title (optional: without it the retriever trains, the ranker refuses)
  published_split.json  this marker: {"format", "source", "sha256", "dataset", "users", "items", ...}

Such a folder is read here, never through the k-core and leave-one-out of datasets/split.py: every sequence is kept
item for item (repeats included), users without a validation and test item (the LRURec splits have some) are trained
on and never evaluated, and no item or user is dropped. `--dataset_code custom --custom_path FOLDER` and the
`lrurec-*` codes both read it this way.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from datasets.sources import read_csv_checked, read_titles_csv
from datasets.split import SplitData, sorted_ids, split_fingerprint
from utils.errors import InputError
from utils.files import read_json_object

MARKER = "published_split.json"
FORMAT = "llamarec-published-split-v1"
SPLIT_NAMES = ("train", "val", "test")


def is_published(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / MARKER).is_file()


def read_marker(folder: Path) -> dict:
    path = Path(folder) / MARKER
    marker = read_json_object(path)
    if marker.get("format") != FORMAT:
        raise InputError(f"{path}: expected format {FORMAT!r}, found {marker.get('format')!r}")
    return marker


def read_published(folder: Path, name: str) -> SplitData:
    """The split in `folder` (written by datasets.llamarec_pickle) exactly as published."""
    folder = Path(folder)
    marker = read_marker(folder)
    path = folder / "interactions.csv"
    df = read_csv_checked(path, {"user_id": "user", "item_id": "item", "timestamp": "timestamp", "split": "split"})
    bad = ~df["split"].isin(SPLIT_NAMES)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0]) + 1
        raise InputError(
            f"{path}: column 'split' must be train, val or test, found {df['split'].iloc[row - 1]!r} in data row {row}"
        )
    user_raw_ids, item_raw_ids = sorted_ids(df["user"]), sorted_ids(df["item"])
    users = pd.Series(np.arange(len(user_raw_ids)), index=user_raw_ids)[df["user"].to_numpy()].to_numpy()
    items = pd.Series(np.arange(1, len(item_raw_ids) + 1), index=item_raw_ids)[df["item"].to_numpy()].to_numpy()
    part = pd.Series(np.arange(3), index=list(SPLIT_NAMES))[df["split"].to_numpy()].to_numpy()
    order = np.lexsort((df["timestamp"].to_numpy(), users))
    users, items, part = users[order], items[order], part[order]
    train: list[list[int]] = [[] for _ in user_raw_ids]
    val, test = [0] * len(user_raw_ids), [0] * len(user_raw_ids)
    bounds = np.flatnonzero(np.diff(users)) + 1
    for user_rows in np.split(np.arange(len(users)), bounds):
        u = int(users[user_rows[0]])
        kinds, user_items = part[user_rows], items[user_rows].tolist()
        n_train, n_val, n_test = (int((kinds == k).sum()) for k in range(3))
        # train items first, then at most one val and one test item, both or neither
        if n_val != n_test or n_val > 1 or kinds.tolist() != [0] * n_train + [1] * n_val + [2] * n_test:
            raise InputError(
                f"{path}: user {user_raw_ids[u]!r}: expected its train rows, then one val and one test row (or "
                f"neither) in timestamp order, found {n_train} train, {n_val} val, {n_test} test rows in that order "
                f"{[SPLIT_NAMES[k] for k in kinds.tolist()][-4:]} (last four)"
            )
        if n_train == 0:
            raise InputError(f"{path}: user {user_raw_ids[u]!r} has no train row")
        train[u] = user_items[:n_train]
        if n_val:
            val[u], test[u] = user_items[n_train], user_items[n_train + 1]
    titles = read_titles_csv(folder / "items.csv") if (folder / "items.csv").is_file() else {}
    return SplitData(
        name=name,
        train=train,
        val=val,
        test=test,
        titles=[""] + [titles.get(raw, "") for raw in item_raw_ids],
        user_raw_ids=list(user_raw_ids),
        item_raw_ids=[""] + list(item_raw_ids),
        fingerprint=split_fingerprint(train, val, test, list(user_raw_ids), [""] + list(item_raw_ids)),
        published=marker,
    )


def check_titles(split: SplitData, folder: Path | None) -> None:
    """The ranker shows titles: refuse a split whose items lack them, naming the file to add."""
    missing = sum(1 for title in split.titles[1:] if not title)
    if missing:
        where = f"{Path(folder) / 'items.csv'}" if folder is not None else "the dataset's titles"
        raise InputError(
            f"{split.name}: {missing} of {split.num_items} items have no title in {where}; the ranker shows titles: "
            "convert the split again with --titles FILE (or --placeholder_titles to title them 'item <raw id>')"
        )


def marker_record(source: Path, sha256: str, dataset: str | None, stats: dict, titles: str | None) -> str:
    """published_split.json's text."""
    return json.dumps(
        {"format": FORMAT, "source": str(source), "sha256": sha256, "dataset": dataset, **stats, "titles": titles},
        indent=2,
    )
