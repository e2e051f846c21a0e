"""Datasets: raw files -> 5-core leave-one-out splits (cached). Entry point: `load_split(config.data_config(flags))`.

This package is named `datasets` (the layout our users asked for), which shadows Hugging Face's
`datasets` package. When HF `datasets` is installed, transformers' Trainer imports `datasets`
(it gets this package) and only ever checks `isinstance(x, datasets.Dataset)` and the like to
treat HF datasets specially. Our data are plain torch datasets, so the module-level `__getattr__`
below answers those names with a class nothing is an instance of, and those checks are False.
tests/test_datasets.py runs a Trainer step with HF `datasets` installed to prove it.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from datasets.cache import cache_key, load_cached_split, save_split
from datasets.sources import AMAZON_FILES, ML_100K_SHIPPED, MOVIELENS, read_amazon, read_custom, read_movielens
from datasets.split import SplitData, make_split
from utils.files import sha256_file
from utils.settings import flag_field

__all__ = ["DataConfig", "SplitData", "load_split", "make_split"]

DATASET_CODES = ("ml-100k", "ml-1m", "ml-20m", "beauty", "games", "custom")
_HF_DATASET_CLASSES = {"Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict"}


class _NotAHuggingFaceDataset:
    """Placeholder for Hugging Face dataset classes; never instantiated."""


def __getattr__(name: str):
    if name in _HF_DATASET_CLASSES:
        return _NotAHuggingFaceDataset
    raise AttributeError(f"module {__name__!r} (LlamaRec's datasets, not Hugging Face's) has no attribute {name!r}")


@dataclass(frozen=True)
class DataConfig:
    """Which data and how it is preprocessed (the data flags)."""

    code: str = flag_field("dataset_code")  # one of DATASET_CODES
    custom_path: Path | None  # folder with interactions.csv and items.csv (custom)
    data_root: Path  # raw files of the downloaded datasets and the preprocessed cache
    ml_100k_path: Path | None  # ml-latest-small ratings.csv/movies.csv (None: the shipped release)
    movielens_path: Path | None  # ml-1m / ml-20m files (None: <data_root>/<code>)
    download: bool
    min_rating: float
    min_uc: int
    min_sc: int

    @property
    def name(self) -> str:
        """Name of the run and cache folders; custom datasets carry their folder's name."""
        if self.code != "custom":
            return self.code
        return f"custom-{Path(self.custom_path).resolve().name or 'data'}"


def _movielens_folder(data: DataConfig) -> Path:
    if data.code == "ml-100k":
        return Path(data.ml_100k_path or ML_100K_SHIPPED)
    return Path(data.movielens_path or Path(data.data_root) / data.code)


def _read_raw(data: DataConfig):
    if data.code in MOVIELENS:
        shipped = data.code == "ml-100k" and data.ml_100k_path is None
        return read_movielens(MOVIELENS[data.code], _movielens_folder(data), data.download, shipped)
    if data.code in ("beauty", "games"):
        return read_amazon(data.code, data.data_root, data.download)
    return read_custom(data.custom_path)


def _raw_paths(data: DataConfig) -> list[Path]:
    if data.code in MOVIELENS:
        release = MOVIELENS[data.code]
        return [_movielens_folder(data) / release.ratings, _movielens_folder(data) / release.movies]
    if data.code in ("beauty", "games"):
        return [Path(data.data_root) / data.code / name for name in AMAZON_FILES[data.code]]
    return [Path(data.custom_path) / "interactions.csv", Path(data.custom_path) / "items.csv"]


def load_split(data: DataConfig) -> SplitData:
    """The preprocessed split of `data`: from the cache when the raw files and options match."""
    options = {"minrating": data.min_rating, "uc": data.min_uc, "sc": data.min_sc}
    cache_root = Path(data.data_root) / "preprocessed"
    paths = _raw_paths(data)
    if all(p.is_file() for p in paths):
        raw_hashes = {p.name: sha256_file(p) for p in paths}
        cached = load_cached_split(cache_root / cache_key(data.name, options, raw_hashes))
        if cached is not None:
            return cached
    interactions, titles, files = _read_raw(data)
    split = make_split(
        interactions,
        titles,
        name=data.name,
        min_rating=data.min_rating,
        min_uc=data.min_uc,
        min_sc=data.min_sc,
        source=", ".join(str(f) for f in files),
    )
    raw_hashes = {p.name: sha256_file(p) for p in files}
    folder = cache_root / cache_key(data.name, options, raw_hashes)
    save_split(folder, split, {"options": options, "raw_files": {str(p): raw_hashes[p.name] for p in files}})
    print(f"preprocessed {split.name}: {split.stats()} -> {folder}", file=sys.stderr)
    return split
