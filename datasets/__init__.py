"""Datasets: raw files -> 5-core leave-one-out splits (cached). Entry point: `load_split(cfg)`.

This package is named `datasets` (the layout our users asked for), which shadows Hugging Face's
`datasets` package. When HF `datasets` is installed, transformers' Trainer imports `datasets`
(it gets this package) and only ever checks `isinstance(x, datasets.Dataset)` and the like to
treat HF datasets specially. Our data are plain torch datasets, so the module-level `__getattr__`
below answers those names with a class nothing is an instance of, and those checks are False.
tests/test_datasets.py runs a Trainer step with HF `datasets` installed to prove it.
"""

import sys
from argparse import Namespace

from datasets.cache import cache_key, load_cached_split, save_split
from datasets.sources import read_amazon, read_custom, read_movielens, sha256_file
from datasets.split import SplitData, make_split

__all__ = ["SplitData", "load_split", "make_split"]

_HF_DATASET_CLASSES = {"Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict"}


class _NotAHuggingFaceDataset:
    """Placeholder for Hugging Face dataset classes; never instantiated."""


def __getattr__(name: str):
    if name in _HF_DATASET_CLASSES:
        return _NotAHuggingFaceDataset
    raise AttributeError(f"module {__name__!r} (LlamaRec's datasets, not Hugging Face's) has no attribute {name!r}")


def _read_raw(cfg: Namespace):
    if cfg.dataset_code == "ml-100k":
        return read_movielens(cfg.ml_100k_path, cfg.download)
    if cfg.dataset_code in ("beauty", "games"):
        return read_amazon(cfg.dataset_code, cfg.data_root, cfg.download)
    return read_custom(cfg.custom_path)


def _raw_paths(cfg: Namespace) -> list:
    from datasets.sources import AMAZON_FILES, ML_100K_SHIPPED

    if cfg.dataset_code == "ml-100k":
        folder = cfg.ml_100k_path or ML_100K_SHIPPED
        return [folder / "ratings.csv", folder / "movies.csv"]
    if cfg.dataset_code in ("beauty", "games"):
        return [cfg.data_root / cfg.dataset_code / name for name in AMAZON_FILES[cfg.dataset_code]]
    return [cfg.custom_path / "interactions.csv", cfg.custom_path / "items.csv"]


def load_split(cfg: Namespace) -> SplitData:
    """The preprocessed split for cfg.dataset_code: from the cache when the raw files and options match."""
    options = {"minrating": cfg.min_rating, "uc": cfg.min_uc, "sc": cfg.min_sc}
    paths = _raw_paths(cfg)
    if all(p.is_file() for p in paths):
        raw_hashes = {p.name: sha256_file(p) for p in paths}
        folder = cfg.data_root / "preprocessed" / cache_key(cfg.dataset_name, options, raw_hashes)
        cached = load_cached_split(folder)
        if cached is not None:
            return cached
    interactions, titles, files = _read_raw(cfg)
    source = ", ".join(str(f) for f in files)
    split = make_split(
        interactions,
        titles,
        name=cfg.dataset_name,
        min_rating=cfg.min_rating,
        min_uc=cfg.min_uc,
        min_sc=cfg.min_sc,
        source=source,
    )
    raw_hashes = {p.name: sha256_file(p) for p in files}
    folder = cfg.data_root / "preprocessed" / cache_key(cfg.dataset_name, options, raw_hashes)
    save_split(folder, split, {"options": options, "raw_files": {str(p): raw_hashes[p.name] for p in files}})
    print(f"preprocessed {split.name}: {split.stats()} -> {folder}", file=sys.stderr)
    return split
