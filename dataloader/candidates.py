"""The stage-1 -> stage-2 interface: each validation/test user's top-K retrieved items.

One `candidates.npz` (numpy arrays, read with allow_pickle=False) per retriever run:
  {split}_users int64 [U], {split}_items int32 [U, K] (retriever order, history masked),
  {split}_scores float32 [U, K], {split}_labels int32 [U], {split}_label_ranks int64 [U]
  (0-based rank of the true item in the full masked ranking), for split in (val, test),
  and `meta`, a JSON string: format, dataset, fingerprint, num_users, num_items, topk, train_topk, metrics.
Training prefixes (format v2): train_users int64 [P], train_lengths int32 [P] (prefix length L: the history is
train[u][:L], the label train[u][L]), train_items int32 [P, K'] (retriever order, prefix masked), train_labels
int32 [P], train_label_ranks int64 [P], for every prefix of every training sequence.
Memory and disk are O((users + prefixes) x K), never users x items.
"""

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.split import SplitData
from utils.errors import InputError
from utils.files import atomic_output

FORMAT = "llamarec-candidates-v2"
OLD_FORMATS = ("llamarec-candidates-v1",)  # val/test only: readable, but without training-prefix candidates
FILE_NAME = "candidates.npz"
ARRAYS = {"users": np.int64, "items": np.int32, "scores": np.float32, "labels": np.int32, "label_ranks": np.int64}
TRAIN_ARRAYS = {"users": np.int64, "lengths": np.int32, "items": np.int32, "labels": np.int32, "label_ranks": np.int64}


@dataclass
class Candidates:
    path: Path  # the candidates.npz file read
    meta: dict
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    train: dict[str, np.ndarray] | None  # training-prefix candidates; None in a v1 file

    def require_train(self) -> dict[str, np.ndarray]:
        if self.train is None:
            raise InputError(
                f"{self.path}: has no training-prefix candidates (written by an older train_retriever.py), which "
                "--llm_train_candidates retrieved needs; re-export them with train_retriever.py on the same run "
                "(--resume on a finished run only re-exports)"
            )
        return self.train


def save_candidates(
    path: Path,
    *,
    split: SplitData,
    topk: int,
    val: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    val_metrics: dict,
    test_metrics: dict,
    train: dict[str, np.ndarray] | None = None,
    train_metrics: dict | None = None,
) -> None:
    """Write candidates.npz atomically; `val`/`test` map the keys of ARRAYS to arrays, `train` (optional, the
    training prefixes) those of TRAIN_ARRAYS."""
    arrays = {}
    for split_name, part in (("val", val), ("test", test)):
        missing = set(ARRAYS) - set(part)
        if missing:
            raise ValueError(f"save_candidates: {split_name} lacks {sorted(missing)}")
        for key, dtype in ARRAYS.items():
            arrays[f"{split_name}_{key}"] = np.ascontiguousarray(np.asarray(part[key]).astype(dtype, copy=False))
        if arrays[f"{split_name}_items"].shape[1] != topk:
            raise ValueError(
                f"save_candidates: {split_name}_items has {arrays[f'{split_name}_items'].shape[1]} columns, topk={topk}"
            )
    if train is not None:
        missing = set(TRAIN_ARRAYS) - set(train)
        if missing:
            raise ValueError(f"save_candidates: train lacks {sorted(missing)}")
        for key, dtype in TRAIN_ARRAYS.items():
            arrays[f"train_{key}"] = np.ascontiguousarray(np.asarray(train[key]).astype(dtype, copy=False))
    meta = {
        "format": FORMAT,
        "dataset": split.name,
        "fingerprint": split.fingerprint,
        "num_users": split.num_users,
        "num_items": split.num_items,
        "topk": topk,
        "train_topk": None if train is None else int(arrays["train_items"].shape[1]),
        "val_metrics": val_metrics,
        "test_metrics": test_metrics,
        "train_metrics": train_metrics,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_output(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz" to a path
        np.savez_compressed(f, **arrays)


def load_candidates(path: Path, split: SplitData | None = None) -> Candidates:
    """Read a candidates file (or a retriever run folder holding one); with `split`, refuse other data."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise InputError(f"{path}: candidates file not found; run train_retriever.py first (it writes {FILE_NAME})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        # numpy's own message for a non-.npz file suggests allow_pickle=True, which we never do
        reason = "not a numpy .npz archive" if "pickle" in str(e) else str(e)
        raise InputError(
            f"{path}: not a readable candidates file ({reason}); expected a retriever run folder or its {FILE_NAME}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *OLD_FORMATS):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InputError(f"{path}: expected format {FORMAT}, found {found!r}")
    expected = {f"{name}_{key}" for name in ("val", "test") for key in ARRAYS}
    missing = sorted(expected - arrays.keys()) + sorted({"fingerprint", "dataset"} - meta.keys())
    if missing:
        raise InputError(f"{path}: incomplete candidates file, missing {missing}")
    if split is not None and (meta["fingerprint"] != split.fingerprint or meta["dataset"] != split.name):
        raise InputError(
            f"{path}: built from dataset {meta['dataset']!r} (fingerprint {meta['fingerprint'][:16]}), but the data "
            f"now give {split.name!r} (fingerprint {split.fingerprint[:16]}): use a retriever run on the same data and "
            "preprocessing flags (or rerun it if its data changed)"
        )
    parts = {name: {key: arrays[f"{name}_{key}"] for key in ARRAYS} for name in ("val", "test")}
    train = None
    if f"train_{next(iter(TRAIN_ARRAYS))}" in arrays:
        missing = sorted(f"train_{key}" for key in TRAIN_ARRAYS if f"train_{key}" not in arrays)
        if missing:
            raise InputError(f"{path}: incomplete candidates file, missing {missing}")
        train = {key: arrays[f"train_{key}"] for key in TRAIN_ARRAYS}
    return Candidates(path=path, meta=meta, val=parts["val"], test=parts["test"], train=train)
