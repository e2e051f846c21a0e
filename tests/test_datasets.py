"""datasets/: real data statistics (paper Table 2), the preprocessing rules, the cache, raw formats, bad input."""

import gzip
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from config import default_config
from datasets import DataConfig, load_split, make_split
from datasets.llamarec_pickle import convert as convert_llamarec_pickle
from datasets.sources import clean_movielens_title, parse_amazon_meta
from tests.conftest import split_of
from utils.errors import InputError
from utils.files import REPO_ROOT


def prepare(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "datasets", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_ml100k_matches_paper_table2(ml100k_split):
    assert ml100k_split.stats() == {
        "dataset": "ml-100k",
        "users": 610,
        "evaluated_users": 610,
        "items": 3650,
        "interactions": 90274,
        "avg_length": 147.99,
    }
    # UTF-8 decoding: the original's ISO-8859-1 garbled 15 titles ("LÃ©on")
    assert "Léon: The Professional (1994)" in ml100k_split.titles
    assert not any("Ã" in title for title in ml100k_split.titles)


def llamarec_pickle(split) -> dict:
    """A split in the layout of the original LlamaRec's dataset.pkl: 1-based ids, raw-id maps, titles."""
    return {
        "train": {u + 1: list(seq) for u, seq in enumerate(split.train)},
        "val": {u + 1: [v] for u, v in enumerate(split.val)},
        "test": {u + 1: [t] for u, t in enumerate(split.test)},
        "meta": {i: split.titles[i] for i in range(1, split.num_items + 1)},
        "umap": {raw: u + 1 for u, raw in enumerate(split.user_raw_ids)},
        "smap": {raw: i for i, raw in enumerate(split.item_raw_ids) if i},
    }


def test_llamarec_pickle_converts_to_the_same_split(tiny_split, tmp_path):
    """The original code's dataset.pkl -> custom CSVs -> --dataset_code custom gives back its exact sequences."""
    import pickle

    data = llamarec_pickle(tiny_split)
    data["train"][1] = [np.int64(i) for i in data["train"][1]]  # lists built from a pandas column hold numpy ints
    with open(tmp_path / "dataset.pkl", "wb") as f:
        pickle.dump(data, f)
    counts = convert_llamarec_pickle(tmp_path / "dataset.pkl", tmp_path / "csv")
    assert counts == {
        "users": 12,
        "evaluated_users": 12,
        "items": tiny_split.num_items,
        "interactions": 12 * 9,
        "placeholder_titles": 0,
    }
    split = load_split(default_config(DataConfig, code="custom", custom_path=tmp_path / "csv", data_root=tmp_path))

    def raw_sequences(s):
        return {
            s.user_raw_ids[u]: [s.item_raw_ids[i] for i in [*s.train[u], s.val[u], s.test[u]]]
            for u in range(s.num_users)
        }

    assert raw_sequences(split) == raw_sequences(tiny_split)
    titles = dict(zip(split.item_raw_ids, split.titles, strict=True))
    assert all(titles[raw] == tiny_split.titles[i] for i, raw in enumerate(tiny_split.item_raw_ids) if i)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {1: 5}}, "'train' must map user ids to lists of item ids, found 1: 5"),
        ({"val": {"1": [3]}}, "'val' must map user ids to lists of item ids, found '1': [3]"),
        ({"umap": {"userX": "abc"}}, "'umap' must map raw ids to integer ids, found 'userX': 'abc'"),
        ({"meta": {1: None}}, "'meta' must map item ids to title strings, found 1: None"),
    ],
)
def test_llamarec_pickle_with_wrong_value_types_is_one_clear_error(tiny_split, tmp_path, change, message):
    import pickle

    with open(tmp_path / "dataset.pkl", "wb") as f:
        pickle.dump({**llamarec_pickle(tiny_split), **change}, f)
    with pytest.raises(InputError) as error:
        convert_llamarec_pickle(tmp_path / "dataset.pkl", tmp_path / "csv")
    assert message in str(error.value) and str(tmp_path / "dataset.pkl") in str(error.value)
    (tmp_path / "taken").write_text("a file")
    with open(tmp_path / "dataset.pkl", "wb") as f:
        pickle.dump(llamarec_pickle(tiny_split), f)
    with pytest.raises(InputError, match="taken: expected an output folder, found a file there"):
        convert_llamarec_pickle(tmp_path / "dataset.pkl", tmp_path / "taken")


def test_llamarec_pickle_refuses_code(tmp_path):
    """A pickle that would run a command when loaded is refused before it runs, with the file named."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"train": Payload()}, f)
    with pytest.raises(InputError, match="evil.pkl.*refused"):
        convert_llamarec_pickle(tmp_path / "evil.pkl", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out" / "interactions.csv").exists()


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Matrix, The (1999)", "The Matrix (1999)"),
        ("City of Lost Children, The (Cité des enfants perdus, La) (1995)", "The City of Lost Children (1995)"),
        ("Léon: The Professional (a.k.a. The Professional) (Léon) (1994)", "Léon: The Professional (1994)"),
        ("American President, The (1995)", "The American President (1995)"),
        ("Babylon 5", "Babylon 5"),
        ("Toy Story (1995)", "Toy Story (1995)"),
        ("Bourne, Abc (2001)", "Bourne, Abc (2001)"),  # not an article: the original would have rotated it
        ("Christmas Carol, A (1938)", "A Christmas Carol (1938)"),
    ],
)
def test_movielens_title_cleaning(raw, clean):
    assert clean_movielens_title(raw) == clean


def frame(rows, columns=("user", "item", "timestamp")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


def test_leave_one_out_order_and_tie_break():
    # user a: items at t=1,2,2(tie: '10' < '9'? numeric ids -> 9 before 10),3
    rows = [("a", "10", 2), ("a", "9", 2), ("a", "3", 1), ("a", "4", 3), ("b", "3", 5), ("b", "9", 1), ("b", "4", 7)]
    split = make_split(frame(rows), {i: f"t{i}" for i in ("3", "4", "9", "10")}, name="x", min_uc=3, min_sc=1)
    assert split.item_raw_ids == ["", "3", "4", "9", "10"]  # numeric, not lexicographic or set() order
    a, b = split.user_raw_ids.index("a"), split.user_raw_ids.index("b")
    ids = {raw: i for i, raw in enumerate(split.item_raw_ids)}
    assert split.train[a] == [ids["3"], ids["9"]] and split.val[a] == ids["10"] and split.test[a] == ids["4"]
    assert split.train[b] == [ids["9"]] and split.val[b] == ids["3"] and split.test[b] == ids["4"]


def test_iterative_k_core_and_title_filter():
    # With min_uc=3, min_sc=2: item z has one user -> dropped; then user c has 2 items -> dropped;
    # then item y (only a, c) keeps a only -> dropped; then user a has 2 items -> dropped... until stable.
    rows = [("a", "x", 1), ("a", "w", 2), ("a", "y", 3)]
    rows += [("b", "x", 1), ("b", "w", 2), ("b", "v", 3), ("b", "u", 4)]
    rows += [("c", "y", 1), ("c", "z", 2), ("c", "v", 3)]
    rows += [("d", "x", 1), ("d", "w", 2), ("d", "v", 3), ("d", "u", 4), ("d", "notitle", 5)]
    titles = {i: i.upper() for i in "uvwxyz"}
    split = make_split(frame(rows), titles, name="x", min_uc=3, min_sc=2)
    assert split.user_raw_ids == ["b", "d"]
    assert split.item_raw_ids == ["", "u", "v", "w", "x"]
    assert split.stats()["interactions"] == 8


def test_repeated_interactions_keep_the_first():
    # b re-buys p last: kept, p would be b's test item, masked as history at test time: a certain miss.
    rows = [("a", "p", 1), ("a", "q", 2), ("a", "r", 3), ("b", "p", 1), ("b", "q", 2), ("b", "r", 3), ("b", "p", 4)]
    split = make_split(frame(rows), {i: i for i in "pqr"}, name="x", min_uc=3, min_sc=1)
    ids = {raw: i for i, raw in enumerate(split.item_raw_ids)}
    b = split.user_raw_ids.index("b")
    assert split.train[b] == [ids["p"]] and split.val[b] == ids["q"] and split.test[b] == ids["r"]


def test_min_rating_filter():
    rows = [(u, i, t, 1.0 if i == "low" else 5.0) for u in "ab" for t, i in enumerate(["p", "q", "low", "r"])]
    df = frame(rows, ("user", "item", "timestamp", "rating"))
    split = make_split(df, {i: i for i in ("p", "q", "r", "low")}, name="x", min_rating=3, min_uc=3, min_sc=1)
    assert "low" not in split.item_raw_ids
    with pytest.raises(InputError, match="--min_rating 3: expected a rating column in interactions, found none"):
        make_split(df.drop(columns="rating"), {i: i for i in ("p", "q", "r", "low")}, name="x", min_rating=3)


def test_fingerprint_independent_of_hash_seed(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [(f"user{u}", f"sku{(u * 7 + k) % 11}", k // 2) for u in range(8) for k in range(6)]
    frame(rows, ("user_id", "item_id", "timestamp")).to_csv(folder / "interactions.csv", index=False)
    pd.DataFrame({"item_id": [f"sku{i}" for i in range(11)], "title": [f"T{i}" for i in range(11)]}).to_csv(
        folder / "items.csv", index=False
    )
    code = (
        "from pathlib import Path; from config import default_config; from datasets import DataConfig, load_split; "
        f"print(load_split(default_config(DataConfig, code='custom', custom_path=Path({str(folder)!r}), "
        f"data_root=Path({str(tmp_path / 'cache')!r}), min_sc=1)).fingerprint)"
    )
    prints = set()
    for seed in ("1", "2", "3"):
        (tmp_path / "cache").mkdir(exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        prints.add(result.stdout.strip())
        subprocess.run(["rm", "-rf", str(tmp_path / "cache")], check=True)
    assert len(prints) == 1


def write_custom(folder: Path, interactions: str, items: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "interactions.csv").write_text(interactions)
    (folder / "items.csv").write_text(items)
    return folder


GOOD_ITEMS = "item_id,title\n" + "".join(f"{i},Title {i}\n" for i in range(6))
GOOD_INTERACTIONS = "user_id,item_id,timestamp\n" + "".join(f"{u},{i},{i}\n" for u in range(6) for i in range(6))


def test_cache_reused_and_invalidated(tmp_path):
    folder = write_custom(tmp_path / "shop", GOOD_INTERACTIONS, GOOD_ITEMS)
    argv = ["--dataset_code", "custom", "--custom_path", str(folder), "--data_root", str(tmp_path / "root")]
    first = split_of(argv)
    caches = list((tmp_path / "root" / "preprocessed").iterdir())
    assert len(caches) == 1
    again = split_of(argv)
    assert again == first
    # another option -> another cache entry
    split_of([*argv, "--min_sc", "1"])
    assert len(list((tmp_path / "root" / "preprocessed").iterdir())) == 2
    # an edited raw file -> preprocessed anew, with the new content
    (folder / "items.csv").write_text(GOOD_ITEMS.replace("Title 0", "Renamed"))
    changed = split_of(argv)
    assert "Renamed" in changed.titles
    assert len(list((tmp_path / "root" / "preprocessed").iterdir())) == 3


@pytest.mark.parametrize(
    "interactions, items, message",
    [
        (None, GOOD_ITEMS, "interactions.csv: file not found"),
        ("", GOOD_ITEMS, "interactions.csv: file is empty"),
        ("user,item,time\n1,2,3\n", GOOD_ITEMS, "interactions.csv: expected columns user_id, item_id, timestamp"),
        (GOOD_INTERACTIONS.replace("0,1,1\n", "0,1,yesterday\n"), GOOD_ITEMS, "'timestamp' must be numeric"),
        (GOOD_INTERACTIONS, "item_id,title\n99,Other\n", "items.csv: has titles for none of the 6 items"),
        (GOOD_INTERACTIONS, "item_id,name\n1,x\n", "items.csv: expected columns item_id, title"),
        ("user_id,item_id,timestamp\n1,1,1\n1,2,2\n", GOOD_ITEMS, "no interactions left after the k-core filter"),
        (GOOD_INTERACTIONS, GOOD_ITEMS + "0,Another title\n", "items.csv: expected one title per item_id, found 1"),
        (
            GOOD_INTERACTIONS.replace("0,1,1\n", ",1,1\n"),
            GOOD_ITEMS,
            "'user' must not be empty, found an empty value in data row 2",
        ),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, interactions, items, message):
    folder = write_custom(tmp_path / "bad", interactions or "", items)
    if interactions is None:
        (folder / "interactions.csv").unlink()
    result = prepare("--dataset_code", "custom", "--custom_path", str(folder), "--data_root", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_missing_custom_folder_is_named(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        split_of(["--dataset_code", "custom", "--custom_path", str(tmp_path / "nope")])


def write_amazon_raw(root: Path) -> None:
    """Tiny files in the raw SNAP formats: a headerless ratings CSV and a gzipped meta file."""
    folder = root / "beauty"
    folder.mkdir(parents=True)
    rows = [f"U{u},B{i:03d},{(u + i) % 5 + 1}.0,{1_300_000_000 + 86400 * i}" for u in range(6) for i in range(7)]
    (folder / "ratings_Beauty.csv").write_text("\n".join(rows) + "\n")
    with gzip.open(folder / "meta_Beauty.json.gz", "wt", encoding="utf-8") as f:
        for i in range(7):
            if i == 6:  # no title -> item dropped
                f.write(f"{{'asin': 'B{i:03d}', 'categories': [['Beauty']]}}\n")
            else:  # 2014 files hold Python dict literals, not JSON
                f.write(f"{{'asin': 'B{i:03d}', 'title': \"Crème n°{i} 'Deluxe'\", 'price': 9.99}}\n")


def test_amazon_raw_formats(tmp_path):
    write_amazon_raw(tmp_path)
    split = load_split(default_config(DataConfig, code="beauty", data_root=tmp_path, download=False, min_sc=1))
    assert split.stats()["users"] == 6 and split.num_items == 6  # B006 has no title
    assert split.titles[1] == "Crème n°0 'Deluxe'"
    assert split.item_raw_ids[1:] == [f"B{i:03d}" for i in range(6)]


def test_amazon_meta_json_lines(tmp_path):
    path = tmp_path / "meta_Video_Games.json.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"asin": "X1", "title": "Zelda", "also_buy": []}) + "\n")
        f.write(json.dumps({"asin": "X2", "title": ""}) + "\n")
    assert parse_amazon_meta(path) == {"X1": "Zelda"}


def test_amazon_meta_refuses_code(tmp_path):
    path = tmp_path / "meta.json.gz"
    with gzip.open(path, "wt") as f:
        f.write("__import__('os').system('echo pwned')\n")
    with pytest.raises(InputError, match="meta.json.gz:1"):
        parse_amazon_meta(path)


def test_amazon_offline_names_files_and_sources(tmp_path):
    result = prepare("--dataset_code", "games", "--data_root", str(tmp_path), "--no-download")
    assert result.returncode == 2
    assert "ratings_Video_Games.csv" in result.stderr and "meta_Video_Games.json.gz" in result.stderr
    assert "snap.stanford.edu" in result.stderr


def test_shipped_movielens_is_checked(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    shipped = REPO_ROOT / "data" / "ml-latest-small"
    (folder / "movies.csv").write_bytes((shipped / "movies.csv").read_bytes())
    (folder / "ratings.csv").write_bytes((shipped / "ratings.csv").read_bytes()[:-200])  # another copy
    result = prepare("--dataset_code", "ml-100k", "--ml_100k_path", str(folder), "--data_root", str(tmp_path))
    assert "not the September 2018 release" in result.stderr


def test_transformers_trainer_beside_hf_datasets(tmp_path):
    """Our package shadows HF `datasets`; transformers' Trainer must still train and evaluate."""
    try:
        metadata.version("datasets")
    except metadata.PackageNotFoundError:
        pytest.skip("Hugging Face `datasets` is not installed here (requirements-dev.txt installs it)")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    data = [{"input_ids": torch.arange(6) + i, "labels": torch.arange(6) + i} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert "eval_loss" in trainer.evaluate()


def test_cache_written_twice_keeps_one_whole_copy_and_replaces_an_unreadable_one(tmp_path, tiny_split):
    """A cache written again onto a whole one keeps it and leaves no temporary folder (what the loser of two
    parallel sweep trials preparing the same dataset does); an unreadable cache is replaced."""
    from datasets.cache import load_cached_split, save_split

    split, folder = tiny_split, tmp_path / "preprocessed" / "key"
    save_split(folder, split, {})
    save_split(folder, split, {})
    assert load_cached_split(folder).train == split.train
    assert [p.name for p in folder.parent.iterdir()] == ["key"]  # no temporary folder left behind
    (folder / "meta.json").write_text("{not json")
    save_split(folder, split, {})
    assert load_cached_split(folder).fingerprint == split.fingerprint


def test_reading_a_large_file_shows_a_progress_bar_by_bytes(tmp_path, capsys):
    from utils.progress import reading

    path = tmp_path / "interactions.csv"
    path.write_bytes(b"user_id,item_id,timestamp\n" + b"u1,i1,1\n" * 5000)
    with reading(path, "reading interactions.csv", min_bytes=0) as f:
        assert f.read() == path.read_bytes()  # the wrapper passes every byte through
    assert "reading interactions.csv" in capsys.readouterr().err
    with reading(path, "reading interactions.csv") as f:  # below the default size: no bar
        f.read()
    assert capsys.readouterr().err == ""
