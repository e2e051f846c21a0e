"""Published splits (datasets/published.py): a paper's own dataset.pkl used exactly as published, through the
converter, `python -m datasets`, train_retriever.py and train_ranker.py."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets.__main__ as prepare_main
import train_ranker
import train_retriever
from config import PREPARE, RETRIEVER, default_config, parse_flags
from dataloader.candidates import load_candidates
from dataloader.retriever_data import eval_data
from datasets import DataConfig, load_split
from datasets.llamarec_pickle import convert
from datasets.published import MARKER
from model.retrievers import RetrieverSpec, build_retriever
from trainer.retriever_eval import train_prefix_candidates
from utils.errors import InputError

# LRURec's layout (no 'meta'). Raw ids are strings, as in its Amazon pickles.
TRAIN = {
    1: [1, 2, 3, 4, 5, 2],  # item 2 repeated
    2: [2, 3, 4, 5, 1, 6],
    3: [3, 4, 5, 1],
    4: [4, 5, 1, 2, 3],  # a training-only user: no val, no test
    5: [5],  # one training item
}
VAL = {1: [7], 2: [1], 3: [2], 4: [], 5: [3]}  # item 7 occurs once in the whole split: no 5-core keeps it
TEST = {1: [3], 2: [2], 3: [6], 4: [], 5: [4]}
UMAP = {f"U{u}": u for u in TRAIN}
SMAP = {f"B00{i}": i for i in range(1, 8)}


def write_pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"train": TRAIN, "val": VAL, "test": TEST, "umap": UMAP, "smap": SMAP}, f)
    return path


@pytest.fixture
def published(tmp_path) -> Path:
    source = write_pickle(tmp_path / "video_min_rating0-min_uc5-min_sc5-leave_one_out" / "dataset.pkl")
    convert(source, tmp_path / "video")
    return tmp_path / "video"


def as_raw(split, u: int) -> tuple[list[str], list[str], list[str]]:
    def raw(items):
        return [split.item_raw_ids[i] for i in items]

    return (
        raw(split.train[u]),
        raw([split.val[u]] if split.val[u] else []),
        raw([split.test[u]] if split.test[u] else []),
    )


def test_the_split_is_used_item_for_item_as_published(published, tmp_path):
    marker = json.loads((published / MARKER).read_text())
    pickle_bytes = (tmp_path / "video_min_rating0-min_uc5-min_sc5-leave_one_out" / "dataset.pkl").read_bytes()
    assert marker["sha256"] == hashlib.sha256(pickle_bytes).hexdigest() and marker["dataset"] == "video"
    for code in ("custom", "lrurec-video"):
        split = load_split(default_config(DataConfig, code=code, custom_path=published, data_root=tmp_path))
        index = {raw: u for u, raw in enumerate(split.user_raw_ids)}
        for uid, raw_user in ((uid, f"U{uid}") for uid in TRAIN):
            expected = tuple([f"B00{i}" for i in part[uid]] for part in (TRAIN, VAL, TEST))
            assert as_raw(split, index[raw_user]) == expected  # order, repeats and the once-seen item 7 kept
        assert split.eval_users().tolist() == [index[f"U{u}"] for u in (1, 2, 3, 5)]  # not the training-only U4
        assert split.stats() == {
            "dataset": "custom-video" if code == "custom" else "lrurec-video",
            "users": 5,
            "evaluated_users": 4,
            "items": 7,
            "interactions": 22 + 2 * 4,
            "avg_length": 6.0,
            "published": {"source": "dataset.pkl", "sha256": marker["sha256"]},
        }
        # evaluation: only users with held-out items, each with its own history and label
        test = eval_data(split, "test", max_len=3)
        u1 = index["U1"]
        assert test.users.tolist() == split.eval_users().tolist()
        assert test.labels.tolist()[0] == split.test[u1] and test.tokens[0].tolist() == [
            split.item_raw_ids.index(raw) for raw in ("B005", "B002", "B007")
        ]


def test_python_m_datasets_prints_the_published_statistics(published, tmp_path, capsys):
    assert prepare_main.main(["--dataset_code", "custom", "--custom_path", str(published)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["evaluated_users"], stats["items"], stats["interactions"]) == (5, 4, 7, 30)


def test_filters_do_not_apply_to_a_published_split(published, tmp_path):
    for flag, value in (("min_uc", 3), ("min_sc", 1), ("min_rating", 4.0)):
        data = default_config(DataConfig, code="custom", custom_path=published, data_root=tmp_path, **{flag: value})
        with pytest.raises(InputError, match=f"--{flag} .*is a published split.*do not apply to it: drop --{flag}"):
            load_split(data)
    beauty = default_config(DataConfig, code="lrurec-beauty", custom_path=published, data_root=tmp_path)
    with pytest.raises(InputError, match="holds the split of 'video', expected 'beauty'"):
        load_split(beauty)
    missing = default_config(DataConfig, code="lrurec-ml-1m", data_root=tmp_path)
    with pytest.raises(InputError, match="lrurec-ml-1m.*convert its dataset.pkl first: python -m datasets.llamarec"):
        load_split(missing)


def test_lrurec_codes_give_the_lrurec_recipe():
    ml1m = parse_flags(RETRIEVER, ["--dataset_code", "lrurec-ml-1m"])
    video = parse_flags(RETRIEVER, ["--dataset_code", "lrurec-video", "--early_stopping_patience", "3"])
    steam = parse_flags(RETRIEVER, ["--dataset_code", "lrurec-steam"])
    recipe = ("bert_max_len", "val_iterations", "train_batch_size", "val_batch_size", "early_stopping_patience")
    assert [getattr(ml1m, k) for k in recipe] == [200, 500, 128, 256, 10]
    assert [getattr(video, k) for k in recipe] == [50, 1000, 128, 256, 3]  # a flag still overrides
    assert [getattr(steam, k) for k in recipe] == [50, 2000, 128, 256, 10]
    assert (ml1m.lr, ml1m.weight_decay, ml1m.bert_dropout, ml1m.bert_attn_dropout) == (1e-3, 0.01, 0.2, 0.2)
    assert ml1m.best_metric == "Recall@10" and not ml1m.train_all_items and ml1m.label_smoothing == 0
    assert parse_flags(RETRIEVER, ["--dataset_code", "ml-1m"]).early_stopping_patience == 20
    with pytest.raises(InputError, match="--custom_path: only used with --dataset_code custom or lrurec"):
        parse_flags(PREPARE, ["--dataset_code", "ml-1m", "--custom_path", "x"])


def test_the_retriever_trains_on_every_user_and_evaluates_the_published_ones(published, tmp_path):
    args = [
        "--dataset_code", "lrurec-video", "--custom_path", str(published), "--data_root", str(tmp_path / "data"),
        "--experiment_root", str(tmp_path / "exp"), "--bert_max_len", "4", "--bert_hidden_units", "8",
        "--train_batch_size", "2", "--val_iterations", "2", "--max_steps", "4", "--retrieved_topk", "3",
        "--num_threads", "1",
    ]  # fmt: skip
    assert train_retriever.main(args) == 0
    run_dir = tmp_path / "exp" / "retriever" / "lrurec-video" / "seed42"
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    marker = json.loads((published / MARKER).read_text())
    assert metrics["users"] == 4 and metrics["data"]["published"]["sha256"] == marker["sha256"]
    assert set(metrics["standard_errors"]) >= {"NDCG@10", "Recall@10", "NDCG@20", "Recall@20"}
    original = json.loads((run_dir / "test_metrics_original.json").read_text())
    assert original["averaging"].endswith("batches of 256 users (--test_batch_size)")
    split = load_split(default_config(DataConfig, code="lrurec-video", custom_path=published, data_root=tmp_path))
    candidates = load_candidates(run_dir, split)
    evaluated = split.eval_users().tolist()
    assert candidates.val["users"].tolist() == evaluated and candidates.test["users"].tolist() == evaluated
    labels = [split.test[u] for u in evaluated]
    assert candidates.test["labels"].tolist() == labels
    # the training-only user's prefixes are training data like any other's
    assert split.user_raw_ids.index("U4") in candidates.train["users"].tolist()


def test_the_ranker_refuses_a_split_without_titles_in_one_line(published, tmp_path, capsys):
    args = [
        "--dataset_code", "lrurec-video", "--custom_path", str(published), "--data_root", str(tmp_path / "data"),
        "--experiment_root", str(tmp_path / "exp"), "--llm_base_model", "smollm2-135m",
    ]  # fmt: skip
    assert train_ranker.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: lrurec-video: 7 of 7 items have no title in ")
    assert str(published / "items.csv") in err[0] and not (tmp_path / "exp").exists()


def test_prefix_masking_counts_a_repeated_item_from_its_first_occurrence():
    """With train = [1, 2, 1, 3], the prefix [1] holds item 1: it must be masked there although it recurs later."""
    torch.manual_seed(0)
    spec = default_config(RetrieverSpec, max_len=4, hidden_units=8)
    model = build_retriever(spec, num_items=5)
    train = [[1, 2, 1, 3]]
    out = train_prefix_candidates(model, train, 4, topk=5, batch_size=2, device=torch.device("cpu"))
    assert out["lengths"].tolist() == [1, 2, 3]
    for row, length in enumerate(out["lengths"].tolist()):
        kept = [i for i in out["items"][row].tolist() if i]
        assert not set(kept) & set(train[0][:length]) and len(kept) == 5 - len(set(train[0][:length]))
    assert np.all(out["labels"] == np.array([2, 1, 3]))


def test_report_sets_the_lrurec_papers_rows_beside_runs_and_compares_models_per_user(published, tmp_path):
    import report

    base = [
        "--dataset_code", "lrurec-video", "--custom_path", str(published), "--data_root", str(tmp_path / "data"),
        "--experiment_root", str(tmp_path / "exp"), "--bert_max_len", "4", "--bert_hidden_units", "8",
        "--train_batch_size", "2", "--val_iterations", "2", "--max_steps", "2", "--retrieved_topk", "3",
        "--retrieved_train_topk", "0", "--num_threads", "1",
    ]  # fmt: skip
    for model, seed in (("lru", 1), ("lru", 2), ("sasrec", 1)):
        assert (
            train_retriever.main(
                [*base, "--retriever_model", model, "--seed", str(seed), "--run_name", f"{model}{seed}"]
            )
            == 0
        )
    runs = report.find_runs(tmp_path / "exp")
    rows = report.build_rows(runs)
    by_model = {row["group"]: row for row in rows}
    assert by_model["retriever_model=lru"]["paper NDCG@10"] == 0.06198
    assert by_model["retriever_model=sasrec"]["paper Recall@20"] == 0.15989
    assert by_model["retriever_model=lru"]["NDCG@10 se"] is not None
    md = report.render_md(rows, [], tmp_path / "exp", report.model_comparisons(runs))
    assert "| paper (LRURec paper Table 3, LRURec) |" in md and "| paper (LRURec paper Table 3, SASRec) |" in md
    # the comparison: each user's NDCG@10 averaged over the two LRURec seeds, minus SASRec's, averaged over users
    (comparison,) = report.model_comparisons(runs)
    run = tmp_path / "exp" / "retriever" / "lrurec-video"

    def ndcg10(name):
        with np.load(run / name / "candidates.npz") as data:
            ranks = data["test_label_ranks"]
        return np.where(ranks < 10, 1 / np.log2(ranks + 2.0), 0.0)

    expected = ((ndcg10("lru1") + ndcg10("lru2")) / 2 - ndcg10("sasrec1")).mean()
    assert expected != 0  # so that the sign and the pairing are checked
    assert comparison["model"] == "sasrec" and comparison["NDCG@10"]["diff"] == pytest.approx(expected)
    assert comparison["lru_runs"] == 2 and comparison["NDCG@10"]["users"] == 4
    assert "lrurec-video: LRURec (2 runs) minus SASRec (1 runs), 4 test users: NDCG@10" in md
    assert "paper NDCG@20" in report.render_csv(rows).splitlines()[0]
