"""Convert the original LlamaRec code's preprocessed `dataset.pkl` into this repository's custom CSV format.

    python -m datasets.llamarec_pickle data/preprocessed/beauty_min_rating0-min_uc5-min_sc5/dataset.pkl out/beauty

The original code's preprocessing (raw Amazon files -> 5-core -> leave-one-out) writes a pickle with train/val/test
item lists per user, the item titles (`meta`) and the raw-id maps (`umap`, `smap`). Its tie order among same-day
interactions depends on Python's set order, so only that file pins the paper's exact splits. This writes
interactions.csv (user_id,item_id,timestamp; timestamp = the item's position in the user's sequence, so sorting by
it gives the paper's order) and items.csv (item_id,title); `--dataset_code custom --custom_path out/beauty` then
reproduces the pickle's splits exactly (a 5-core of a 5-core keeps everything).

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

from utils.errors import InputError
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
    expected = ("train", "val", "test", "meta", "umap", "smap")
    if not isinstance(data, dict) or any(not isinstance(data.get(key), dict) for key in expected):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{path}: expected a dict with dict values {list(expected)}, found {found}")
    for name in ("train", "val", "test"):
        for uid, items in data[name].items():
            if not is_id(uid) or not isinstance(items, list | tuple) or not all(is_id(i) for i in items):
                raise InputError(f"{path}: {name!r} must map user ids to lists of item ids, found {uid!r}: {items!r}")
    for name in ("umap", "smap"):
        for raw, index in data[name].items():
            if not is_id(index):
                raise InputError(f"{path}: {name!r} must map raw ids to integer ids, found {raw!r}: {index!r}")
    for sid, title in data["meta"].items():
        if not is_id(sid) or not isinstance(title, str):
            raise InputError(f"{path}: 'meta' must map item ids to title strings, found {sid!r}: {title!r}")
    return data


def is_id(value) -> bool:
    """An integer id as the original code writes them (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def convert(path: Path, out_dir: Path) -> dict:
    """Write out_dir/interactions.csv and out_dir/items.csv; return counts (users, items, interactions)."""
    data = read_llamarec_pickle(path)
    raw_user = {int(uid): str(raw) for raw, uid in data["umap"].items()}
    raw_item = {int(sid): str(raw) for raw, sid in data["smap"].items()}
    rows = []
    for uid in sorted(data["train"], key=int):
        sequence = [*data["train"][uid], *data["val"].get(uid, []), *data["test"].get(uid, [])]
        if int(uid) not in raw_user:
            raise InputError(f"{path}: user {uid} of 'train' is missing from 'umap'")
        for position, sid in enumerate(sequence):
            if int(sid) not in raw_item:
                raise InputError(f"{path}: item {sid} of user {uid} is missing from 'smap'")
            rows.append((raw_user[int(uid)], raw_item[int(sid)], position))
    used = {item for _, item, _ in rows}
    titles = {raw_item[int(sid)]: str(title) for sid, title in data["meta"].items() if int(sid) in raw_item}
    untitled = sorted(used - titles.keys())
    if untitled:
        raise InputError(f"{path}: {len(untitled)} items have no title in 'meta' (first: {untitled[0]!r})")
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
    return {"users": len(data["train"]), "items": len(used), "interactions": len(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LlamaRec dataset.pkl -> interactions.csv + items.csv")
    parser.add_argument("pickle", type=Path, help="dataset.pkl written by the original LlamaRec preprocessing")
    parser.add_argument("out_dir", type=Path, help="folder for interactions.csv and items.csv (--custom_path)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.pickle, args.out_dir))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
