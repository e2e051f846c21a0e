"""ml-1m and ml-20m: GroupLens' zips downloaded from a local HTTP server (the real layouts and encodings, tiny
contents), the checksum and archive checks, the offline error, the dataset defaults; and LRURec's dataset.pkl (no
titles inside) converted with a titles file into a custom dataset with the authors' exact split."""

import dataclasses
import functools
import hashlib
import http.server
import io
import pickle
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from config import RANKER, RETRIEVER, default_config, parse_flags
from datasets import DataConfig, load_split
from datasets.llamarec_pickle import convert, main
from datasets.published import check_titles
from datasets.sources import MOVIELENS, read_movielens
from tests.test_datasets import prepare
from utils.errors import InputError

USERS, ITEMS = 40, 30
# The raw titles: latin-1 bytes in movies.dat (ml-1m), UTF-8 in movies.csv (ml-20m); cleaned as the paper does.
RAW_TITLES = {1: "Léon: The Professional (a.k.a. The Professional) (1994)", 2: "Matrix, The (1999)"}
CLEAN_TITLES = ["Léon: The Professional (1994)", "The Matrix (1999)"]


def movie_title(item: int) -> str:
    return RAW_TITLES.get(item, f"Movie {item} (2000)")


def ratings_rows() -> list[tuple[int, int, int, int]]:
    """(user, item, rating, timestamp): 40 users x 25 of 30 items pass the 5-core; item 31 (2 users) and user 41
    (3 items) do not."""
    rows = [
        (u, (u + k) % ITEMS + 1, (u + k) % 5 + 1, 978_300_000 + 60 * k) for u in range(1, USERS + 1) for k in range(25)
    ]
    rows += [(1, 31, 5, 978_400_000), (2, 31, 4, 978_400_000)]
    rows += [(USERS + 1, item, 3, 978_500_000 + item) for item in (1, 2, 3)]
    return rows


def release_files(code: str) -> dict[str, bytes]:
    """The members of GroupLens' zip for `code`, in its real formats."""
    items = range(1, ITEMS + 3)  # item 32 has a title and no rating
    if code == "ml-1m":
        return {
            "ratings.dat": "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings_rows()).encode("ascii"),
            "movies.dat": "".join(f"{i}::{movie_title(i)}::Drama\n" for i in items).encode("latin-1"),
            "users.dat": "".join(f"{u}::F::25::1::55455\n" for u in range(1, USERS + 2)).encode("ascii"),
            "README": b"SUMMARY\nUSAGE LICENSE\n",
        }
    quoted = {i: f'"{movie_title(i)}"' if "," in movie_title(i) else movie_title(i) for i in items}
    return {
        "ratings.csv": (
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in ratings_rows())
        ).encode(),
        "movies.csv": ("movieId,title,genres\n" + "".join(f"{i},{quoted[i]},Drama\n" for i in items)).encode("utf-8"),
        "README.txt": b"Summary\nUsage License\n",
    }


def zip_bytes(code: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(f"{code}/{name}", data)
    return buffer.getvalue()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, its base URL) on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def serve(server, code: str, data: bytes, sha256: str | None = None):
    """The release of `code` pointed at `data` on the local server, pinned to `sha256` (default: data's own)."""
    root, base = server
    (root / f"{code}.zip").write_bytes(data)
    return dataclasses.replace(
        MOVIELENS[code], url=f"{base}/{code}.zip", zip_sha256=sha256 or hashlib.sha256(data).hexdigest()
    )


@pytest.mark.parametrize("code", ["ml-1m", "ml-20m"])
def test_download_fills_the_folder_and_the_split_reads_it(server, tmp_path, code):
    release = serve(server, code, zip_bytes(code, release_files(code)))
    folder = tmp_path / "data" / code
    read_movielens(release, folder, allow_download=True)
    expected = {release.ratings, release.movies, *release.extra}
    assert {p.name for p in folder.iterdir()} == expected  # no archive, temp folder or users.dat left
    for name in expected:
        assert (folder / name).read_bytes() == release_files(code)[name]
    # the default folder of --dataset_code ml-1m / ml-20m is <data_root>/<code>; offline now, it reads those files
    split = load_split(default_config(DataConfig, code=code, data_root=tmp_path / "data", download=False))
    assert split.stats()["users"] == USERS and split.num_items == ITEMS  # item 31 and user 41 left by the 5-core
    assert split.item_raw_ids[1:] == [str(i) for i in range(1, ITEMS + 1)]
    assert split.titles[1:3] == CLEAN_TITLES  # latin-1 (ml-1m) / UTF-8 (ml-20m) decoded, then cleaned
    assert not any("Ã" in title or "\ufffd" in title for title in split.titles)
    # user 1's last two ratings are validation and test: (u + k) % 30 + 1 for k = 23, 24
    assert [split.item_raw_ids[split.val[0]], split.item_raw_ids[split.test[0]]] == ["25", "26"]


@pytest.mark.parametrize(
    "make_zip, sha256, message",
    [
        (lambda files: zip_bytes("ml-1m", files), "0" * 64, "expected the published " + "0" * 64),
        (lambda files: zip_bytes("ml-1m", files)[:-300], None, "expected a zip with ml-1m/{ratings.dat,movies.dat"),
        (lambda files: zip_bytes("ml-1m", {"ratings.dat": files["ratings.dat"]}), None, "expected a zip with ml-1m/"),
        (lambda files: b"<html>moved</html>", None, "expected a zip with ml-1m/"),
    ],
    ids=["wrong-checksum", "truncated", "member-missing", "not-a-zip"],
)
def test_a_bad_download_is_refused_and_leaves_nothing(server, tmp_path, make_zip, sha256, message):
    release = serve(server, "ml-1m", make_zip(release_files("ml-1m")), sha256)
    folder = tmp_path / "ml-1m"
    with pytest.raises(InputError, match="fetching ml-1m failed") as error:
        read_movielens(release, folder, allow_download=True)
    assert message in str(error.value) and str(folder) in str(error.value)
    assert list(folder.iterdir()) == []  # no partial file, archive or temp folder


def test_an_unreachable_url_is_one_clear_error(server, tmp_path):
    release = dataclasses.replace(MOVIELENS["ml-1m"], url=f"{server[1]}/nothing-here.zip")
    with pytest.raises(InputError, match=r"download from http://127.0.0.1:\d+/nothing-here.zip failed.*404"):
        read_movielens(release, tmp_path / "ml-1m", allow_download=True)


@pytest.mark.parametrize(
    "code, extra, folder, names",
    [
        ("ml-1m", [], "data/ml-1m", "ratings.dat, movies.dat"),
        ("ml-20m", ["--movielens_path", "mine"], "mine", "ratings.csv, movies.csv"),
    ],
)
def test_offline_and_missing_names_the_folder_and_the_url(tmp_path, code, extra, folder, names):
    extra = [str(tmp_path / a) if a == "mine" else a for a in extra]
    result = prepare("--dataset_code", code, "--data_root", str(tmp_path / "data"), "--no-download", *extra)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / folder}: missing {names} (--no-download given)")
    assert f"https://files.grouplens.org/datasets/movielens/{code}.zip" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / folder).exists()


def test_defaults_follow_the_lrurec_ml1m_recipe_and_passed_flags_win():
    for code in ("ml-1m", "ml-20m"):
        flags = parse_flags(RETRIEVER, ["--dataset_code", code])
        assert (flags.bert_max_len, flags.train_batch_size, flags.val_batch_size, flags.val_iterations) == (
            200,
            128,
            256,
            500,
        )
        assert (flags.bert_dropout, flags.bert_attn_dropout, flags.label_smoothing) == (0.2, 0.2, 0.0)
        assert flags.train_all_items is False
        assert parse_flags(RANKER, ["--dataset_code", code]).lora_micro_batch_size == 12
    assert parse_flags(RETRIEVER, ["--dataset_code", "ml-1m", "--bert_max_len", "50"]).bert_max_len == 50
    assert parse_flags(RETRIEVER, ["--dataset_code", "ml-100k"]).train_batch_size == 16
    assert parse_flags(RETRIEVER, ["--dataset_code", "beauty"]).bert_max_len == 50
    with pytest.raises(InputError, match="--movielens_path: only used with --dataset_code ml-1m or ml-20m"):
        parse_flags(RETRIEVER, ["--dataset_code", "ml-100k", "--movielens_path", "x"])
    with pytest.raises(InputError, match="--ml_100k_path: only used with --dataset_code ml-100k"):
        parse_flags(RETRIEVER, ["--dataset_code", "ml-1m", "--ml_100k_path", "x"])


# ---------------------------------------------------------------- LRURec's dataset.pkl + a titles file


def lrurec_pickle(path: Path) -> dict:
    """A dataset.pkl in LRURec's layout: no 'meta'; raw ids are ints (ml-1m's), mapped to shuffled dense ids."""
    rng = np.random.default_rng(3)
    raw_users = [int(u) for u in rng.permutation(np.arange(101, 109))]
    raw_items = [10 * (i + 1) for i in range(12)]
    umap = {raw: uid for uid, raw in enumerate(raw_users, start=1)}
    smap = {raw: sid for sid, raw in enumerate(rng.permutation(raw_items).tolist(), start=1)}
    train, val, test = {}, {}, {}
    for u, raw in enumerate(raw_users):
        items = [raw_items[(u + k) % 12] for k in range(9)]  # every item has >= 5 users: a 5-core
        sequence = [smap[i] for i in rng.permutation(items).tolist()]
        uid = umap[raw]
        train[uid], val[uid], test[uid] = sequence[:-2], sequence[-2:-1], sequence[-1:]
    data = {"train": train, "val": val, "test": test, "umap": umap, "smap": smap}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data


def write_titles(path: Path, items: list[int]) -> Path:
    titles = {10: "Léon: The Professional (a.k.a. The Professional) (1994)", 20: "Matrix, The (1999)"}
    if path.suffix == ".dat":
        path.write_bytes("".join(f"{i}::{titles.get(i, f'Film {i} (1990)')}::Drama\n" for i in items).encode("latin-1"))
    else:
        path.write_text("item_id,title\n" + "".join(f"{i},Film {i}\n" for i in items), encoding="utf-8")
    return path


@pytest.mark.parametrize("titles_name", ["movies.dat", "titles.csv"])
def test_lrurec_pickle_with_a_titles_file_keeps_the_authors_split(tmp_path, titles_name):
    data = lrurec_pickle(tmp_path / "dataset.pkl")
    titles = write_titles(tmp_path / titles_name, [10 * (i + 1) for i in range(13)])
    assert main([str(tmp_path / "dataset.pkl"), str(tmp_path / "csv"), "--titles", str(titles)]) == 0
    split = load_split(
        default_config(DataConfig, code="custom", custom_path=tmp_path / "csv", data_root=tmp_path)
    )  # default 5-core

    raw_user = {uid: str(raw) for raw, uid in data["umap"].items()}
    raw_item = {sid: str(raw) for raw, sid in data["smap"].items()}

    def pickle_part(part):
        return {raw_user[uid]: [raw_item[s] for s in items] for uid, items in data[part].items()}

    def split_part(values, wrap):
        return {split.user_raw_ids[u]: [split.item_raw_ids[i] for i in wrap(v)] for u, v in enumerate(values)}

    assert split_part(split.train, list) == pickle_part("train")
    assert split_part(split.val, lambda v: [v]) == pickle_part("val")
    assert split_part(split.test, lambda v: [v]) == pickle_part("test")
    title_of = dict(zip(split.item_raw_ids, split.titles, strict=True))
    if titles_name == "movies.dat":  # latin-1, cleaned as --dataset_code ml-1m cleans it
        assert title_of["10"] == "Léon: The Professional (1994)" and title_of["20"] == "The Matrix (1999)"
    else:
        assert title_of["10"] == "Film 10"


def test_lrurec_pickle_without_titles_trains_stage_1_and_refuses_the_ranker(tmp_path, capsys):
    """A pickle without 'meta' converts without titles (the retriever needs none); a titles file that misses an
    item is refused unless placeholders are asked for."""
    lrurec_pickle(tmp_path / "dataset.pkl")
    counts = convert(tmp_path / "dataset.pkl", tmp_path / "csv")
    assert counts == {"users": 8, "evaluated_users": 8, "items": 12, "interactions": 72, "placeholder_titles": 0}
    assert not (tmp_path / "csv" / "items.csv").exists() and "no items.csv" in capsys.readouterr().err
    split = load_split(default_config(DataConfig, code="custom", custom_path=tmp_path / "csv", data_root=tmp_path))
    assert split.num_items == 12 and set(split.titles) == {""}
    with pytest.raises(InputError, match=r"12 of 12 items have no title in .*csv/items.csv; the ranker shows titles"):
        check_titles(split, tmp_path / "csv")
    titles = write_titles(tmp_path / "movies.dat", [10 * (i + 1) for i in range(11)])  # item 120 has none
    with pytest.raises(InputError, match=r"movies.dat: no title for 1 of the 12 items \(first: \['120'\]\)"):
        convert(tmp_path / "dataset.pkl", tmp_path / "csv", titles)
    counts = convert(tmp_path / "dataset.pkl", tmp_path / "csv", titles, placeholder_titles=True)
    assert counts["placeholder_titles"] == 1
    assert "120,item 120\n" in (tmp_path / "csv" / "items.csv").read_text()
    split = load_split(default_config(DataConfig, code="custom", custom_path=tmp_path / "csv", data_root=tmp_path))
    check_titles(split, tmp_path / "csv")  # every item titled now
    assert split.num_items == 12
