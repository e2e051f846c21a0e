"""Retriever training/evaluation/export on tiny data: windows, masking, run folder, export round trip, resume."""

import json
import os

import numpy as np
import pytest
import torch

from config import default_config
from dataloader.candidates import load_candidates
from dataloader.retriever_data import EvalData, sample_prefixes, training_windows
from model.lru import LRURec
from model.retrievers import RetrieverSpec, build_retriever
from tests.conftest import run_dir_of, split_of
from train_retriever import main
from trainer.metrics import batch_averaged_metrics
from trainer.retriever_eval import evaluate, train_prefix_candidates
from trainer.retriever_export import fold_users
from trainer.retriever_train import train_step
from utils.errors import InputError


def test_training_windows_match_the_original_layout():
    tokens, labels = training_windows([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], max_len=4, sliding_step=4)
    # short sequence: first item predicted from padding
    assert tokens[0].tolist() == [0, 0, 1, 2] and labels[0].tolist() == [0, 1, 2, 3]
    # 9 items >= max_len + step: windows of 4 ending at the last item, stepping back by 4 (item 4 is dropped)
    assert labels[1:].tolist() == [[9, 10, 11, 12], [5, 6, 7, 8]]
    assert tokens[1:].tolist() == [[0, 9, 10, 11], [0, 5, 6, 7]]
    # between max_len and max_len + step: one example of the last max_len labels, full context
    tokens, labels = training_windows([[1, 2, 3, 4, 5, 6]], max_len=4, sliding_step=4)
    assert tokens.tolist() == [[2, 3, 4, 5]] and labels.tolist() == [[3, 4, 5, 6]]


def test_training_windows_all_items_label_every_item_once_with_its_real_context():
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    tokens, labels = training_windows(seqs, max_len=4, sliding_step=4, all_items=True)
    assert labels.tolist() == [
        [0, 1, 2, 3],
        [9, 10, 11, 12],
        [5, 6, 7, 8],
        [0, 0, 0, 4],  # the head the original drops
        [15, 16, 17, 18],
        [0, 0, 13, 14],
    ]
    # only a sequence's own first item is predicted from padding; window starts see the item before
    assert tokens.tolist() == [
        [0, 0, 1, 2],
        [8, 9, 10, 11],
        [4, 5, 6, 7],
        [0, 0, 0, 0],
        [14, 15, 16, 17],
        [0, 0, 0, 13],
    ]
    # overlapping windows (step 2): context overlaps, labels do not
    tokens, labels = training_windows([[1, 2, 3, 4, 5, 6, 7]], max_len=4, sliding_step=2, all_items=True)
    assert labels.tolist() == [[4, 5, 6, 7], [2, 3, 0, 0], [0, 1, 0, 0]]
    assert tokens.tolist() == [[3, 4, 5, 6], [1, 2, 3, 4], [0, 0, 1, 2]]
    every_label = sorted(x for row in labels.tolist() for x in row if x)
    assert every_label == list(range(1, 8))


def test_train_step_loss_covers_every_label_of_the_batch():
    # train_step drops columns left of the first label; masked labels (all_items windows) must not
    # make it drop real ones. With dropout 0, its loss equals the loss over the full-width batch.
    seqs = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    tokens, labels = training_windows(seqs, max_len=6, sliding_step=3, all_items=True)
    assert labels[1:].tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 0, 8, 9, 10]]
    tokens, labels = tokens[1:], labels[1:]  # a batch whose widest row has fewer labels than its span
    torch.manual_seed(0)
    model = LRURec(num_items=12, hidden_units=8, num_blocks=1, dropout=0.0, attn_dropout=0.0)
    real = labels > 0
    expected = model.next_item_loss(model.encode(tokens)[real], labels[real]).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = train_step(model, optimizer, scheduler, tokens, labels, max_grad_norm=5.0)
    assert loss == pytest.approx(expected, rel=1e-6)


def test_evaluate_masks_full_history_and_padding():
    torch.manual_seed(0)
    model = LRURec(num_items=20, hidden_units=8, num_blocks=1)
    # user 0's history (7 items) is longer than max_len (3): all 7 must be masked, not only the last 3
    histories = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]
    data = EvalData(histories, labels=[11, 12], max_len=3)
    metrics, arrays = evaluate(model, data, batch_size=1, ks=[1, 5, 10], device=torch.device("cpu"), topk=13)
    for u, hist in enumerate(histories):
        items = arrays["items"][u]
        real = items[np.isfinite(arrays["scores"][u])]
        assert not set(real.tolist()) & (set(hist) | {0})
        rank = arrays["label_ranks"][u]
        assert items[rank] == data.labels[u]  # the label's rank in the full ranking agrees with the top-k list
        assert np.all(np.diff(arrays["scores"][u][np.isfinite(arrays["scores"][u])]) <= 0)
    assert metrics["Recall@10"] == np.mean(arrays["label_ranks"] < 10)


def test_evaluate_is_a_mean_over_users_not_over_batches():
    """Uneven batches (4, 4, 2 users) give the mean over the 10 users (the original averaged batch means)."""
    torch.manual_seed(0)
    model = LRURec(num_items=30, hidden_units=8, num_blocks=1)
    histories = [list(range(1 + u, 6 + u)) for u in range(10)]
    data = EvalData(histories, labels=[20 + u for u in range(10)], max_len=4)
    uneven, arrays = evaluate(model, data, batch_size=4, ks=[5, 10, 20], device=torch.device("cpu"))
    whole, _ = evaluate(model, data, batch_size=10, ks=[5, 10, 20], device=torch.device("cpu"))
    assert uneven == pytest.approx(whole)
    assert uneven["Recall@20"] == pytest.approx(np.mean(arrays["label_ranks"] < 20))
    ndcg = np.where(arrays["label_ranks"] < 10, 1 / np.log2(arrays["label_ranks"] + 2), 0)
    assert uneven["NDCG@10"] == pytest.approx(ndcg.mean())


def val_history(run, drop=("val_seconds",)):
    """val_history.jsonl rows of a run folder, without the keys in `drop` (timings differ between runs)."""
    rows = [json.loads(line) for line in (run / "val_history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def test_end_to_end_run_folder_and_candidates_round_trip(tmp_path, tiny_args):
    assert main(tiny_args) == 0
    run = run_dir_of(tmp_path)
    for name in ("config.json", "environment.json", "checkpoint_best.pt", "checkpoint_last.pt", "val_history.jsonl"):
        assert (run / name).is_file(), name
    # 12 windows / batch 4 = 3 steps per epoch, 4 epochs, validation every 2 steps
    history = [json.loads(line) for line in (run / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6, 8, 10, 12]
    saved = json.loads((run / "test_metrics.json").read_text())
    names = {f"{m}@{k}" for m in ("Recall", "NDCG", "MRR") for k in (1, 5, 10, 20, 50)}
    assert set(saved) == names | {"standard_errors", "users", "data"} and set(saved["standard_errors"]) == names
    assert saved["users"] == 12 and saved["data"]["fingerprint"] == split_of(tiny_args).fingerprint
    test_metrics = {name: saved[name] for name in names}
    for path in run.glob("*.pt"):
        torch.load(path, weights_only=True)

    split = split_of(tiny_args)
    cands = load_candidates(run, split)
    assert cands.meta["topk"] == 6 and cands.meta["test_metrics"] == test_metrics
    assert cands.test["items"].shape == (12, 6) and cands.test["items"].dtype == np.int32
    # the paper's batch-averaged figure, from the same test ranks
    paper_way = json.loads((run / "test_metrics_batch16.json").read_text())
    assert paper_way == pytest.approx(
        batch_averaged_metrics(torch.from_numpy(cands.test["label_ranks"]), [1, 5, 10, 20, 50])
    )
    assert paper_way == pytest.approx(test_metrics)  # 12 users are one batch: the two ways agree
    assert cands.val["labels"].tolist() == split.val and cands.test["labels"].tolist() == split.test
    for u in range(12):  # test candidates exclude the test history: train[u] + [val[u]]
        assert not set(cands.test["items"][u].tolist()) & set(split.train[u] + [split.val[u]])
    hits = cands.test["label_ranks"] < 6
    assert np.all(cands.test["items"][hits, cands.test["label_ranks"][hits]] == cands.test["labels"][hits])
    # every training prefix, with its next item as label and the prefix masked out of its candidates
    prefixes = [(u, n) for u, seq in enumerate(split.train) for n in range(1, len(seq))]
    assert list(zip(cands.train["users"].tolist(), cands.train["lengths"].tolist(), strict=True)) == prefixes
    assert cands.train["labels"].tolist() == [split.train[u][n] for u, n in prefixes]
    assert cands.meta["format"] == "llamarec-candidates-v2" and "Recall@20" in cands.meta["train_metrics"]
    for row, (u, n) in enumerate(prefixes):
        assert not set(cands.train["items"][row].tolist()) & set(split.train[u][:n])

    # an existing run folder needs --resume or --overwrite
    assert main(tiny_args) == 2

    # --eval_only re-evaluates the saved checkpoint into eval/: the same test metrics and candidates, and the
    # training run's files untouched
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    assert main(tiny_args + ["--eval_only", "--eval_export_candidates"]) == 0
    assert json.loads((run / "eval" / "test_metrics.json").read_text()) == saved
    again = load_candidates(run / "eval", split)
    for name in ("val", "test", "train"):
        for key, value in getattr(cands, name).items():
            np.testing.assert_array_equal(getattr(again, name)[key], value)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    # --eval_only of a folder that holds no finished run, or of a checkpoint that is not there: one line, exit 2
    assert main(tiny_args + ["--eval_only", "--run_name", "none"]) == 2
    assert main(tiny_args + ["--eval_only", "--eval_checkpoint", str(tmp_path / "none.pt")]) == 2

    # a file missing an array is refused by name, not with a KeyError
    with np.load(run / "candidates.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if key != "test_label_ranks"}
    with pytest.raises(InputError, match=r"config.json: not a readable candidates file \(not a numpy .npz archive\)"):
        load_candidates(run / "config.json", split)
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(InputError, match=r"incomplete candidates file, missing \['test_label_ranks'\]"):
        load_candidates(tmp_path / "partial.npz", split)


def test_resume_ends_with_the_same_best_model(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--run_name", "full"]) == 0
    # interrupted mid-epoch and between validations (step 5 of 12), then resumed
    assert main(tiny_args + ["--run_name", "cut", "--max_steps", "5"]) == 0
    full, cut = run_dir_of(tmp_path, "full"), run_dir_of(tmp_path, "cut")
    # resuming with the same cap trains nothing more
    assert main(tiny_args + ["--run_name", "cut", "--max_steps", "5", "--resume"]) == 0
    assert torch.load(cut / "checkpoint_last.pt", weights_only=True)["state"]["step"] == 5
    assert main(tiny_args + ["--run_name", "cut", "--eval_only"]) == 0  # eval/ of the step-5 best checkpoint
    # a line cut off by the interruption is dropped, not a crash
    with open(cut / "val_history.jsonl", "a") as f:
        f.write('{"step": 6, "Recall@1')
    capsys.readouterr()
    assert main(tiny_args + ["--run_name", "cut", "--resume"]) == 0
    # eval/ is newer than the best checkpoint (the best stayed at step 4): no note; once older, a note
    note = f"note: {cut / 'eval'} is older than this run's best checkpoint"
    assert note not in capsys.readouterr().out
    best_time = (cut / "checkpoint_best.pt").stat().st_mtime
    os.utime(cut / "eval" / "test_metrics.json", (best_time - 10, best_time - 10))
    assert main(tiny_args + ["--run_name", "cut", "--resume"]) == 0
    assert note in capsys.readouterr().out
    best_full = torch.load(full / "checkpoint_best.pt", weights_only=True)
    best_cut = torch.load(cut / "checkpoint_best.pt", weights_only=True)
    assert best_full["step"] == best_cut["step"]
    for key, value in best_full["model"].items():
        assert torch.equal(value, best_cut["model"][key]), key
    assert val_history(full) == val_history(cut)
    assert json.loads((full / "test_metrics.json").read_text()) == json.loads((cut / "test_metrics.json").read_text())
    # the training summary adds up the sessions: the same steps, best step and last loss as the uninterrupted run
    summary_full = json.loads((full / "training_summary.json").read_text())
    summary_cut = json.loads((cut / "training_summary.json").read_text())
    for key in ("steps", "epochs", "best_step", "best_value", "train_loss", "stopped_by"):
        assert summary_cut[key] == summary_full[key], key
    assert (summary_full["sessions"], summary_cut["sessions"]) == (1, 4)
    assert summary_cut["train_seconds_incl_validation"] >= summary_cut["validation_seconds"] > 0


def test_a_run_killed_after_training_keeps_its_summary_and_eval_is_replaced_whole(tmp_path, tiny_args):
    assert main(tiny_args) == 0
    run = run_dir_of(tmp_path)
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_step"] in (2, 4, 6, 8, 10, 12) and summary["train_loss"] > 0
    # killed after training, before the export: --resume exports, and the summary still covers the training
    (run / "test_metrics.json").unlink()
    (run / "candidates.npz").unlink()
    assert main(tiny_args + ["--resume"]) == 0
    again = json.loads((run / "training_summary.json").read_text())
    assert again["steps"] == 12 and again["sessions"] == 2 and again["train_loss"] == summary["train_loss"]
    seconds = summary["train_seconds_incl_validation"]
    assert seconds <= again["train_seconds_incl_validation"] < seconds + 5
    # eval/ is written whole: a later evaluation without candidates leaves none of the earlier ones behind
    assert main(tiny_args + ["--eval_only", "--eval_export_candidates"]) == 0
    assert (run / "eval" / "candidates.npz").is_file()
    assert main(tiny_args + ["--eval_only"]) == 0
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "config.json", "environment.json", "test_metrics.json", "test_metrics_batch16.json",
        "test_metrics_original.json", "val_metrics.json",
    ]  # fmt: skip
    assert not list(run.glob(".eval.*"))  # no temporary folder left


def test_a_run_without_validation_keeps_its_last_model_and_says_so(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--max_steps", "1", "--val_iterations", "50"]) == 0
    run = run_dir_of(tmp_path)
    assert "no validation ran (--val_iterations 50); the last model is checkpoint_best.pt" in capsys.readouterr().out
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["best_is_last_model"] and summary["best_step"] is None and summary["steps"] == 1
    best = torch.load(run / "checkpoint_best.pt", weights_only=True)["model"]
    last = torch.load(run / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(value, last[key]) for key, value in best.items())
    assert main(tiny_args + ["--eval_only"]) == 0  # servable and evaluable like any finished run
    # killed before its test results: not evaluated as if finished
    (run / "test_metrics.json").unlink()
    capsys.readouterr()
    assert main(tiny_args + ["--eval_only"]) == 2
    assert "the run has not finished" in capsys.readouterr().err


def test_validation_frequency_does_not_change_training(tmp_path, tiny_args):
    # The defaults validate more often than the paper (50/100 steps, not 500) on the grounds that this only
    # refines model selection: validation must not consume the training RNG (dropout > 0 here) or state.
    assert main(tiny_args + ["--run_name", "every2"]) == 0
    assert main(tiny_args + ["--run_name", "every4", "--val_iterations", "4"]) == 0

    def metrics_by_step(run):  # train_loss averages over the steps since the previous validation
        return {
            r["step"]: r for r in val_history(run_dir_of(tmp_path, run), drop=("train_loss", "best", "val_seconds"))
        }

    every2, every4 = metrics_by_step("every2"), metrics_by_step("every4")
    assert sorted(every4) == [4, 8, 12] and set(every4) < set(every2)
    assert all(every4[step] == every2[step] for step in every4)
    last2 = torch.load(run_dir_of(tmp_path, "every2") / "checkpoint_last.pt", weights_only=True)["model"]
    last4 = torch.load(run_dir_of(tmp_path, "every4") / "checkpoint_last.pt", weights_only=True)["model"]
    assert all(torch.equal(value, last4[key]) for key, value in last2.items())


def test_resume_refuses_other_flags_and_unreadable_checkpoints(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--max_steps", "3"]) == 0
    capsys.readouterr()
    assert main(tiny_args + ["--resume", "--bert_hidden_units", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "--bert_hidden_units 8 -> 16" in err
    # flags that do not define the training may change
    assert main(tiny_args + ["--resume", "--max_steps", "4", "--early_stopping_patience", "50"]) == 0
    last = run_dir_of(tmp_path) / "checkpoint_last.pt"
    last.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(tiny_args + ["--resume"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {last}: not a readable checkpoint")


def test_metric_ks_without_10_works_with_a_matching_best_metric(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--metric_ks", "1", "5", "--best_metric", "NDCG@5", "--max_steps", "4"]) == 0
    assert set(json.loads((run_dir_of(tmp_path) / "test_metrics.json").read_text())["standard_errors"]) == {
        f"{m}@{k}" for m in ("Recall", "NDCG", "MRR") for k in (1, 5)
    }
    assert main(tiny_args + ["--metric_ks", "1", "5", "--run_name", "other"]) == 2  # Recall@10 is not computed
    assert "error: --best_metric" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lru", "sasrec", "bert4rec", "narm"])
def test_training_prefix_candidates_equal_the_masked_top_k_of_each_prefix(name):
    """Every prefix (short ones from one shared window, long ones from their own; a bidirectional model: each its
    own) gets exactly what evaluate() gives for that prefix as a history: its top-k with the prefix masked."""
    torch.manual_seed(0)
    spec = default_config(
        RetrieverSpec, model=name, max_len=6, hidden_units=8, num_blocks=2, dropout=0.0, attn_dropout=0.0
    )
    model = build_retriever(spec, 30).eval()
    rng = np.random.default_rng(0)
    train = [rng.choice(np.arange(1, 31), size=n, replace=False).tolist() for n in (2, 5, 9, 13, 1)]
    got = train_prefix_candidates(model, train, max_len=6, topk=4, batch_size=3, device=torch.device("cpu"))
    pairs = [(u, n) for u, seq in enumerate(train) for n in range(1, len(seq))]
    assert list(zip(got["users"].tolist(), got["lengths"].tolist(), strict=True)) == pairs
    histories = [train[u][:n] for u, n in pairs]
    labels = [train[u][n] for u, n in pairs]
    metrics, expected = evaluate(model, EvalData(histories, labels, 6), 5, [20], torch.device("cpu"), topk=4)
    if name == "lru":  # exact: LRURec's scan is the same computation however the window is cut
        assert got["items"].tolist() == expected["items"].tolist()
    else:  # other batch shapes and paddings: equal scores to float noise, so near-ties may swap
        assert (got["items"] == expected["items"]).mean() > 0.95
    assert got["labels"].tolist() == labels and got["label_ranks"].tolist() == expected["label_ranks"].tolist()
    for row, (u, n) in enumerate(pairs):
        assert not set(got["items"][row].tolist()) & set(train[u][:n])


def test_user_disjoint_fold_candidates(tmp_path, tiny_args):
    """--retrieved_train_folds 2: each user's training-prefix candidates come from the fold model that was trained
    without that user, exactly as that model ranks the prefix; every prefix appears once, in (user, length) order."""
    assert main(tiny_args + ["--retrieved_train_folds", "2"]) == 0
    run = run_dir_of(tmp_path)
    split = split_of(tiny_args)
    cands = load_candidates(run, split)
    assert cands.meta["train_metrics"]["source"] == "2 user-disjoint folds"
    prefixes = [(u, n) for u, seq in enumerate(split.train) for n in range(1, len(seq))]
    assert list(zip(cands.train["users"].tolist(), cands.train["lengths"].tolist(), strict=True)) == prefixes
    folds = fold_users(split.num_users, 2, 42)
    assert sorted(np.concatenate(folds).tolist()) == list(range(split.num_users))
    for k, users in enumerate(folds):
        model = LRURec(num_items=split.num_items, hidden_units=8, num_blocks=2)
        fold_run = run / "folds" / f"fold{k}"
        model.load_state_dict(torch.load(fold_run / "checkpoint_best.pt", weights_only=True)["model"])
        # the fold model validated on the other users only
        assert len(val_history(fold_run)) > 0
        topk = cands.train["items"].shape[1]
        expected = train_prefix_candidates(model, [split.train[u] for u in users], 5, topk, 7, torch.device("cpu"))
        rows = np.isin(cands.train["users"], users)
        np.testing.assert_array_equal(cands.train["items"][rows], expected["items"])
        np.testing.assert_array_equal(cands.train["label_ranks"][rows], expected["label_ranks"])
    # in-sample candidates (the default) differ: another model ranked them
    assert main(tiny_args + ["--overwrite"]) == 0
    assert not np.array_equal(load_candidates(run, split).train["items"], cands.train["items"])


def test_sampled_prefixes_in_small_chunks_equal_the_rows_of_every_prefix():
    """A sample of training prefixes, scored in chunks of a few users, gets exactly the rows the every-prefix export
    gives them (the short ones still share their user's first window, the long ones get their own)."""
    torch.manual_seed(0)
    spec = default_config(
        RetrieverSpec, model="lru", max_len=6, hidden_units=8, num_blocks=2, dropout=0.0, attn_dropout=0.0
    )
    model = build_retriever(spec, 40).eval()
    rng = np.random.default_rng(1)
    train = [rng.choice(np.arange(1, 41), size=n, replace=False).tolist() for n in (2, 5, 9, 13, 1, 20, 3)]
    cpu = torch.device("cpu")
    full = train_prefix_candidates(model, train, max_len=6, topk=4, batch_size=3, device=cpu)
    every = list(zip(full["users"].tolist(), full["lengths"].tolist(), strict=True))
    users, lengths, total = sample_prefixes(train, 15, seed=3)
    sample = list(zip(users.tolist(), lengths.tolist(), strict=True))
    assert total == len(every) == 46 and len(sample) == 15 and sample == sorted(set(sample))  # distinct, in order
    assert set(sample) <= set(every) and any(n > 6 for _, n in sample) and any(n <= 6 for _, n in sample)
    assert sample_prefixes(train, 15, seed=3)[1].tolist() == lengths.tolist()  # seeded
    assert sample_prefixes(train, 15, seed=4)[1].tolist() != lengths.tolist()
    for chunk in (1, 4, 1000):
        got = train_prefix_candidates(model, train, 6, 4, 3, cpu, prefixes=(users, lengths), chunk=chunk)
        rows = [every.index(pair) for pair in sample]
        for key, value in full.items():
            np.testing.assert_array_equal(got[key], value[rows])
    # no cap (0), or a cap at the prefix count: every prefix, in order
    assert sample_prefixes(train, 0, seed=3)[0].tolist() == sample_prefixes(train, 46, seed=3)[0].tolist()
    assert list(zip(*(a.tolist() for a in sample_prefixes(train, 0, seed=3)[:2]), strict=True)) == every


def test_prefix_sample_is_uniform_over_prefixes_not_over_users():
    """A user with 29 of 30 prefixes holds ~29/30 of a sample (drawing users first would give them half)."""
    train = [[1, 2], list(range(1, 31))]
    shares = [np.mean(sample_prefixes(train, 10, seed)[0] == 1) for seed in range(300)]
    assert np.mean(shares) == pytest.approx(29 / 30, abs=0.01)


def test_export_keeps_a_recorded_sample_of_training_prefixes(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--retrieved_train_max_prefixes", "10"]) == 0
    err = capsys.readouterr().err
    for bar in ("validation users", "test users", "training-prefix candidates"):  # each phase shows its progress
        assert bar in err
    split = split_of(tiny_args)
    cands = load_candidates(run_dir_of(tmp_path), split)
    users, lengths, total = sample_prefixes(split.train, 10, seed=42)
    assert cands.train["users"].tolist() == users.tolist() and cands.train["lengths"].tolist() == lengths.tolist()
    info = cands.meta["train_metrics"]
    assert (info["prefixes_total"], info["prefixes_exported"], info["sample_seed"]) == (total, 10, 42) and total > 10
    # the default cap is far above this data's prefixes: every prefix, no sample
    assert main(tiny_args + ["--overwrite"]) == 0
    info = load_candidates(run_dir_of(tmp_path), split).meta["train_metrics"]
    assert (info["prefixes_exported"], info["sample_seed"]) == (total, None)
    assert main(tiny_args + ["--retrieved_train_topk", "0", "--retrieved_train_max_prefixes", "5"]) == 2
