"""Preprocessed splits cached as .npz + JSON (no pickle), keyed by dataset, options and raw-file hashes."""

import hashlib
import json
from pathlib import Path

import numpy as np

from datasets.split import SplitData
from utils.files import atomic_folder

# Bump when preprocessing changes what it produces, so old caches are not reused.
PREPROCESS_VERSION = 2  # 2: repeated (user, item) interactions keep the first


def cache_key(name: str, options: dict, raw_hashes: dict[str, str]) -> str:
    payload = json.dumps({"version": PREPROCESS_VERSION, "options": options, "raw": raw_hashes}, sort_keys=True)
    opts = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    return f"{name}_{opts}_{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def save_split(folder: Path, split: SplitData, extra: dict) -> None:
    """Write into a temp folder, then rename: a crash never leaves a half-written cache. When another process (e.g.
    a parallel sweep trial) wrote the same key first, its copy is the same split: it is kept (a process may be
    reading it); an unreadable one is replaced."""
    with atomic_folder(folder, keep_existing=lambda path: load_cached_split(path) is not None) as tmp:
        lengths = np.array([len(seq) for seq in split.train], dtype=np.int64)
        flat = np.fromiter((i for seq in split.train for i in seq), dtype=np.int32, count=int(lengths.sum()))
        np.savez(
            tmp / "split.npz",
            train_items=flat,
            train_lengths=lengths,
            val=np.asarray(split.val, dtype=np.int32),
            test=np.asarray(split.test, dtype=np.int32),
        )
        meta = {
            "name": split.name,
            "fingerprint": split.fingerprint,
            "titles": split.titles,
            "user_raw_ids": split.user_raw_ids,
            "item_raw_ids": split.item_raw_ids,
            "stats": split.stats(),
            **extra,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


def load_cached_split(folder: Path) -> SplitData | None:
    """The cached split, or None when absent or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        with np.load(folder / "split.npz", allow_pickle=False) as data:
            flat, lengths = data["train_items"], data["train_lengths"]
            val, test = data["val"].tolist(), data["test"].tolist()
    except (OSError, ValueError, KeyError):
        return None
    if (
        not isinstance(meta, dict)
        or not {"name", "titles", "user_raw_ids", "item_raw_ids", "fingerprint"} <= meta.keys()
    ):
        return None
    train = [seq.tolist() for seq in np.split(flat, np.cumsum(lengths)[:-1])]
    return SplitData(
        name=meta["name"],
        train=train,
        val=val,
        test=test,
        titles=meta["titles"],
        user_raw_ids=meta["user_raw_ids"],
        item_raw_ids=meta["item_raw_ids"],
        fingerprint=meta["fingerprint"],
    )
