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
from datasets.published import MARKER, is_published, read_marker, read_published
from datasets.sources import AMAZON_FILES, ML_100K_SHIPPED, MOVIELENS, read_amazon, read_custom, read_movielens
from datasets.split import SplitData, make_split
from utils.errors import InputError
from utils.files import sha256_file
from utils.settings import flag_field

__all__ = ["DataConfig", "SplitData", "load_split", "make_split", "published_folder"]

# The LRURec paper's own splits (its repository's dataset.pkl files), converted by datasets.llamarec_pickle.
LRUREC_CODES = ("lrurec-ml-1m", "lrurec-beauty", "lrurec-video", "lrurec-sports", "lrurec-steam")
DATASET_CODES = ("ml-100k", "ml-1m", "ml-20m", "beauty", "games", "custom", *LRUREC_CODES)
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
    custom_path: Path | None  # folder with interactions.csv and items.csv (custom), or a published split (lrurec-*)
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
            return self.code  # lrurec-* included: their runs sit beside the LRURec paper's rows
        return f"custom-{Path(self.custom_path).resolve().name or 'data'}"


def published_folder(data: DataConfig) -> Path | None:
    """The folder of a published split (datasets/published.py) that `data` reads, or None."""
    if data.code in LRUREC_CODES:
        return Path(data.custom_path or Path(data.data_root) / data.code)
    return Path(data.custom_path) if data.code == "custom" and is_published(data.custom_path) else None


def load_published(data: DataConfig, folder: Path) -> SplitData:
    """A published split as published: the filter flags cannot apply, so a value other than the default is refused."""
    if not is_published(folder):
        name = data.code.removeprefix("lrurec-")
        raise InputError(
            f"--dataset_code {data.code}: expected the LRURec {name} split in {folder} ({MARKER} and interactions.csv), "
            f"found none; convert its dataset.pkl first: python -m datasets.llamarec_pickle "
            f"<LRURec>/data/preprocessed/{name}_min_rating0-min_uc5-min_sc5-leave_one_out/dataset.pkl {folder} "
            f"(or pass --custom_path FOLDER)"
        )
    for flag, value, default in (
        ("min_uc", data.min_uc, 5),
        ("min_sc", data.min_sc, 5),
        ("min_rating", data.min_rating, 0),
    ):
        if value != default:
            raise InputError(
                f"--{flag} {value}: {folder} is a published split ({MARKER}), used exactly as published; the filter "
                f"flags do not apply to it: drop --{flag}"
            )
    marker = read_marker(folder)
    expected = data.code.removeprefix("lrurec-")
    if data.code in LRUREC_CODES and marker.get("dataset") not in (None, expected):
        raise InputError(
            f"--dataset_code {data.code}: {folder / MARKER} holds the split of {marker['dataset']!r}, expected "
            f"{expected!r}; pass the folder of the {expected} split (--custom_path)"
        )
    return read_published(folder, data.name)


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
    """The preprocessed split of `data`: from the cache when the raw files and options match; a published split
    as published."""
    folder = published_folder(data)
    if folder is not None:
        return load_published(data, folder)
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
