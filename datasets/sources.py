"""Readers for the raw files of each dataset: ml-100k (ml-latest-small 2018), Amazon beauty/games, custom.

Each reader returns (interactions, titles, raw_files): a DataFrame with string columns user, item,
a numeric timestamp and an optional rating; a dict raw item id -> title; and the files it read.
"""

import ast
import gzip
import json
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from utils.errors import InputError
from utils.files import REPO_ROOT, atomic_output, sha256_file
from utils.progress import reading

# (interactions, titles: raw item id -> title, the raw files read)
RawData = tuple[pd.DataFrame, dict[str, str], list[Path]]

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
ML_100K_SHIPPED = REPO_ROOT / "data" / "ml-latest-small"
SNAP = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
AMAZON_FILES = {
    "beauty": {
        "ratings_Beauty.csv": f"{SNAP}/ratings_Beauty.csv",
        "meta_Beauty.json.gz": f"{SNAP}/meta_Beauty.json.gz",
    },
    "games": {
        "ratings_Video_Games.csv": f"{SNAP}/ratings_Video_Games.csv",
        # The 2014 SNAP metadata lacks most Games titles; the original uses the 2018 release.
        "meta_Video_Games.json.gz": "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/metaFiles2/meta_Video_Games.json.gz",
    },
}


def download(url: str, dest: Path, sha256: str | None = None) -> None:
    """Download with a progress bar into a temp file, check its sha256 when one is pinned, then rename: no
    half-written or unverified file is ever left at `dest`."""
    with atomic_output(dest) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError) as e:  # raised here: a failed download is not a failed write
            raise InputError(f"{dest}: download from {url} failed ({e})") from None
        if sha256 is not None and (digest := sha256_file(tmp)) != sha256:
            raise InputError(
                f"{url}: the download's sha256 is {digest}, expected the published {sha256} (a corrupted or "
                "changed file); it was not kept"
            )


def fetch_zip_members(url: str, sha256: str | None, zip_folder: str, members: tuple[str, ...], folder: Path) -> None:
    """Download the zip at `url` (checked against `sha256` when given) and extract `zip_folder/<member>` of each
    member into `folder`. Each member is extracted beside its place and all are renamed into place only once every
    one is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch, ExitStack() as outputs:
        archive = Path(scratch) / url.rsplit("/", 1)[-1]  # deleted with the scratch folder
        download(url, archive, sha256)
        try:
            with zipfile.ZipFile(archive) as zf:
                for member in members:
                    tmp = outputs.enter_context(atomic_output(folder / member))
                    with zf.open(f"{zip_folder}/{member}") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise InputError(f"{url}: expected a zip with {zip_folder}/{{{','.join(members)}}} ({e})") from None


# ---------------------------------------------------------------- MovieLens (GroupLens releases)


@dataclass(frozen=True)
class MovieLensRelease:
    """One GroupLens zip: where it is, what is pinned, which files are read and how."""

    name: str  # the zip's top folder
    url: str
    zip_sha256: str | None  # the published archive's; None: the URL serves changing releases
    ratings: str  # ratings.csv (userId,movieId,rating,timestamp; UTF-8) or ratings.dat (user::item::rating::time)
    movies: str  # movies.csv (movieId,title,genres; UTF-8) or movies.dat (item::title::genres; latin-1)
    extra: tuple[str, ...] = ()  # extracted too: the README is the license
    file_sha256: dict[str, str] | None = None  # per-file pins of the release the paper used, where known


MOVIELENS = {
    # ml-latest-small, September 2018 (the paper's "ML-100k"). The URL now serves newer releases, so the files,
    # not the zip, are pinned, and the 2018 files are shipped.
    "ml-100k": MovieLensRelease(
        "ml-latest-small",
        f"{GROUPLENS}/ml-latest-small.zip",
        None,
        "ratings.csv",
        "movies.csv",
        ("README.txt",),
        {
            "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
        },
    ),
    # Fixed releases: each archive's sha256 (5,917,549 / 198,702,078 bytes) as recorded by independent dataset
    # registries; GroupLens itself publishes their MD5s: c4d9eecfca2ab87c1945afe126590906 (ml-1m),
    # cd245b17a1ae2cc31bb14903e1204af3 (ml-20m).
    "ml-1m": MovieLensRelease(
        "ml-1m",
        f"{GROUPLENS}/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        "ratings.dat",
        "movies.dat",
        ("README",),
    ),
    "ml-20m": MovieLensRelease(
        "ml-20m",
        f"{GROUPLENS}/ml-20m.zip",
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        "ratings.csv",
        "movies.csv",
        ("README.txt",),
    ),
}


def clean_movielens_title(title: str) -> str:
    """'Matrix, The (1999)' -> 'The Matrix (1999)': the paper's title cleaning.

    The trailing year is split off, other parenthesised parts are removed, a trailing English
    article (", The" / ", A" / ", An") moves to the front, and the year is re-appended.
    """
    title = title.strip()
    match = re.search(r"\s*(\(\d{4}\))$", title)
    year = ""
    if match:
        year = " " + match.group(1)
        title = title[: match.start()]
    title = " ".join(re.sub(r"\(.*?\)", "", title).split())
    match = re.search(r", (the|a|an)$", title, flags=re.IGNORECASE)
    if match:
        title = f"{title[match.start() + 2 :]} {title[: match.start()]}"
    return title + year


def read_dat(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A GroupLens '::'-separated file without header (ml-1m's ratings.dat, movies.dat): latin-1, the files'
    encoding (every byte decodes, so a title is never refused, only the field count is checked)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        lines = path.read_text(encoding="latin-1").splitlines()
    except OSError as e:
        raise InputError(f"{path}: not readable ({e})") from None
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != len(columns):
            raise InputError(
                f"{path}:{line_no}: expected {len(columns)} '::'-separated fields ({'::'.join(columns)}), "
                f"found {len(fields)}"
            )
        rows.append(fields)
    if not rows:
        raise InputError(f"{path}: file is empty; expected lines {'::'.join(columns)}")
    return pd.DataFrame(rows, columns=list(columns))


def read_movielens_titles(path: Path) -> dict[str, str]:
    """movie id -> cleaned title, from movies.dat (ml-1m) or movies.csv (ml-latest-small, ml-20m)."""
    if path.suffix == ".dat":
        movies = read_dat(path, ("item", "title", "genres"))
    else:
        movies = read_csv_checked(path, {"movieId": "item", "title": "title"})
    return {
        item: clean_movielens_title(title)
        for item, title in zip(movies["item"], movies["title"], strict=True)
        if title.strip()
    }


def read_movielens_ratings(path: Path) -> pd.DataFrame:
    if path.suffix != ".dat":
        return read_csv_checked(
            path, {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "timestamp"}
        )
    ratings = read_dat(path, ("user", "item", "rating", "timestamp"))
    _require_ids(ratings, path, ("user", "item"))
    return _numeric_columns(ratings, path, ("rating", "timestamp"))


def read_movielens(release: MovieLensRelease, folder: Path, allow_download: bool, shipped: bool = False) -> RawData:
    """The ratings and titles of `release` in `folder`, downloaded there when missing (unless `allow_download` is
    False, or `shipped`: the repository's own copy, never downloaded into)."""
    folder = Path(folder)
    files = [folder / release.ratings, folder / release.movies]
    restore = f"`git checkout -- {folder.relative_to(REPO_ROOT)}`" if shipped else ""
    missing = ", ".join(f.name for f in files if not f.is_file())
    if missing:
        wanted = f"{release.ratings} and {release.movies} of {release.name}"
        if shipped:
            raise InputError(f"{folder}: missing {missing}; restore the shipped copy with {restore}")
        if not allow_download:
            raise InputError(
                f"{folder}: missing {missing} (--no-download given); expected {wanted}: download {release.url} and "
                f"put the files of its {release.name}/ folder there, or drop --no-download"
            )
        try:
            fetch_zip_members(
                release.url, release.zip_sha256, release.name, (release.ratings, release.movies, *release.extra), folder
            )
        except InputError as e:
            raise InputError(
                f"{folder}: missing {missing}, and fetching {release.name} failed: {e}. Place {wanted} there by hand "
                f"(from {release.url}) or pass --no-download"
            ) from None
    for f in files if release.file_sha256 else ():
        digest = sha256_file(f)
        if digest != release.file_sha256[f.name]:
            if shipped:
                raise InputError(
                    f"{f}: sha256 {digest} differs from the shipped 2018 release ({release.file_sha256[f.name]}); "
                    f"restore it with {restore}"
                )
            print(
                f"note: {f} is not the September 2018 release the paper used; numbers will differ from the paper",
                file=sys.stderr,
            )
    return read_movielens_ratings(files[0]), read_movielens_titles(files[1]), files


# ---------------------------------------------------------------- Amazon (SNAP 2014 ratings + metadata)


def parse_amazon_meta(path: Path) -> dict[str, str]:
    """asin -> title from a gzipped metadata file: JSON lines (2018) or Python dict literals (2014).

    The 2014 files are not JSON; they are parsed with ast.literal_eval, never eval().
    """
    titles = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError):
                        raise InputError(f"{path}:{line_no}: expected a JSON object or Python dict literal") from None
                if not isinstance(record, dict) or "asin" not in record:
                    raise InputError(f"{path}:{line_no}: expected a record with an 'asin' field")
                title = record.get("title")
                if isinstance(title, str) and title.strip():
                    titles[str(record["asin"]).strip()] = title.strip()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip text file ({e})") from None
    return titles


def read_amazon_ratings(path: Path) -> pd.DataFrame:
    """SNAP ratings CSV without header: user,item,rating,unix_timestamp."""
    try:
        df = pd.read_csv(path, header=None, dtype={0: str, 1: str}, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: file is empty") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from None
    if df.shape[1] != 4:
        raise InputError(f"{path}: expected 4 columns (user,item,rating,timestamp) without header, found {df.shape[1]}")
    df.columns = ["user", "item", "rating", "timestamp"]
    _require_ids(df, path, ("user", "item"))
    return _numeric_columns(df, path, ("rating", "timestamp"))


def read_amazon(code: str, data_root: Path, allow_download: bool) -> RawData:
    folder = Path(data_root) / code
    files = {name: folder / name for name in AMAZON_FILES[code]}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing and not allow_download:
        sources = "; ".join(f"{name} from {AMAZON_FILES[code][name]}" for name in missing)
        raise InputError(f"{folder}: missing {', '.join(missing)} (--no-download given); get {sources}")
    for name in missing:
        try:
            download(AMAZON_FILES[code][name], files[name])
        except InputError as e:
            raise InputError(
                f"{e}. Place the files by hand: {', '.join(str(p) for p in files.values())} "
                f"(sources: {', '.join(AMAZON_FILES[code].values())})"
            ) from None
    ratings_path, meta_path = files.values()
    return read_amazon_ratings(ratings_path), parse_amazon_meta(meta_path), list(files.values())


# ---------------------------------------------------------------- custom: interactions.csv + items.csv


def _first_bad_row(bad: pd.Series) -> int:
    """1-based data row (header not counted) of the first True in `bad`."""
    return int(bad.to_numpy().nonzero()[0][0]) + 1


def _require_ids(df: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    for column in columns:
        empty = df[column].str.strip() == ""
        if empty.any():
            raise InputError(
                f"{path}: column {column!r} must not be empty, found an empty value in data row {_first_bad_row(empty)}"
            )


def _numeric_columns(df: pd.DataFrame, path: Path, columns) -> pd.DataFrame:
    for column in columns:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = _first_bad_row(bad)
            raise InputError(
                f"{path}: column {column!r} must be numeric, found {df[column].iloc[row - 1]!r} in data row {row}"
            )
        df[column] = values
    return df


def read_csv_checked(path: Path, columns: dict[str, str], optional: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV with a header, require `columns` (renamed as mapped), keep `optional` when present."""
    optional = optional or {}
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with reading(path, f"reading {path.name}") as f:
            df = pd.read_csv(f, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: file is empty; expected a header with {', '.join(columns)}") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: expected columns {', '.join(columns)}, found {', '.join(map(str, df.columns))}")
    if df.empty:
        raise InputError(f"{path}: has a header but no rows")
    keep = {**columns, **{c: name for c, name in optional.items() if c in df.columns}}
    df = df[list(keep)].rename(columns=keep)
    _require_ids(df, path, tuple(c for c in ("user", "item") if c in df.columns))
    numeric = [c for c in ("timestamp", "rating") if c in df.columns]
    return _numeric_columns(df, path, numeric)


def read_titles_csv(path: Path) -> dict[str, str]:
    """item_id -> title from a CSV with the header item_id,title (UTF-8); empty titles are left out."""
    items = read_csv_checked(path, {"item_id": "item", "title": "title"})
    conflicting = items.groupby("item")["title"].nunique()
    conflicting = conflicting[conflicting > 1]
    if len(conflicting):
        raise InputError(
            f"{path}: expected one title per item_id, found {len(conflicting)} item_id(s) with several "
            f"different titles (first: {conflicting.index[0]!r})"
        )
    return {item: title.strip() for item, title in zip(items["item"], items["title"], strict=True) if title.strip()}


def read_custom(folder: Path) -> RawData:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--custom_path: {folder} is not a folder (expected interactions.csv and items.csv in it)")
    interactions_path, items_path = folder / "interactions.csv", folder / "items.csv"
    interactions = read_csv_checked(
        interactions_path, {"user_id": "user", "item_id": "item", "timestamp": "timestamp"}, {"rating": "rating"}
    )
    titles = read_titles_csv(items_path)
    used = set(interactions["item"])
    untitled = len(used - titles.keys())
    if untitled == len(used):
        raise InputError(f"{items_path}: has titles for none of the {len(used)} items in {interactions_path}")
    if untitled:
        print(f"note: {untitled} of {len(used)} items have no title in {items_path}; dropped", file=sys.stderr)
    return interactions, titles, [interactions_path, items_path]
