"""Guards against one-line mistakes that a manual mutation analysis found no other test would catch.

Each test pins one behaviour with hand-computed values; its docstring names the mistake it catches.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from config import default_config
from dataloader.candidates import Candidates, load_candidates, save_candidates
from dataloader.prompts import PromptBuilder, PromptConfig, candidate_letters
from dataloader.ranker_data import (
    EvalExample,
    RankerData,
    build_eval_sets,
    eval_examples,
    retrieved_training_lists,
    sample_negatives,
)
from dataloader.retriever_data import EvalData, training_windows, window_step
from datasets import SplitData
from model.retrievers import RetrieverSpec, build_retriever
from tests.conftest import run_dir_of, split_of
from train_retriever import main
from trainer.metrics import paired_bootstrap
from trainer.ranker_eval import _ci_text, build_test_report, ranking_records
from trainer.retriever_eval import evaluate
from trainer.retriever_export import CandidateExport, fold_users, write_test_metrics
from trainer.retriever_train import RetrieverTraining, Session, train
from trainer.run_state import HISTORY, read_history, read_summary
from utils.files import load_checkpoint

CPU = torch.device("cpu")


def split_with(num_users: int, num_items: int = 12) -> SplitData:
    """num_users users with 3 training items each (ids 1..num_items), val/test items after them."""
    return SplitData(
        name="guard",
        train=[[1 + (u % 3), 4 + (u % 2), 6] for u in range(num_users)],
        val=[7] * num_users,
        test=[8] * num_users,
        titles=[""] + [f"Film {i}" for i in range(1, num_items + 1)],
        user_raw_ids=[f"u{u}" for u in range(num_users)],
        item_raw_ids=[""] + [f"m{i}" for i in range(1, num_items + 1)],
        fingerprint="f" * 64,
    )


# trainer/metrics.py


def test_bootstrap_interval_is_the_central_95_percent():
    """Catches a 90% (5%/95%) interval, or resampling fewer users than there are, passed off as the 95% one."""
    # 400 users with paired differences +1/-1: the mean's bootstrap sd is 1/sqrt(400) = 0.05, the 95% interval
    # about +-1.96 x 0.05 = +-0.098 (a 90% one is +-0.082; resampling half the users widens it to +-0.139).
    diff = torch.tensor([1.0, -1.0]).repeat(200)
    widths = []
    for seed in range(4):
        low, high = paired_bootstrap(diff, torch.zeros(400), resamples=2000, seed=seed)["ci95"]
        assert -0.12 < low < -0.085 and 0.085 < high < 0.12
        widths.append(high - low)
    assert 0.18 < np.mean(widths) < 0.215


# trainer/ranker_eval.py

DESCENDING = [float(20 - k) for k in range(20)]


def test_overall_metrics_map_subset_users_through_the_candidates_file_rows():
    """Catches indexing the all-users rank array by user id instead of by the user's row in the candidates file."""
    split = split_with(4, num_items=30)
    examples = [
        EvalExample(0, [], list(range(1, 21)), 2, 2, [], DESCENDING),
        EvalExample(2, [], list(range(1, 21)), 0, 0, [], DESCENDING),
    ]
    scores = torch.zeros(2, 20)
    scores[0, 2] = 1.0  # user 0: LLM rank 0 (retriever 2)
    scores[1, 5] = 1.0  # user 2: LLM rank 19 (all 19 others tie at 0) (retriever 0)
    # rows in reverse user order: user 3 rank 45, user 2 rank 0, user 1 rank 30, user 0 rank 2
    part = {"users": np.array([3, 2, 1, 0]), "label_ranks": np.array([45, 0, 30, 2])}
    report, _ = build_test_report(scores, examples, part, split, (1, 5))
    # overall LLM ranks per user: u0 0, u1 30, u2 19, u3 45 -> only u0 hits
    assert report["overall"]["llm"]["Recall@1"] == pytest.approx(0.25)
    assert report["overall"]["llm"]["NDCG@5"] == pytest.approx(0.25)
    assert report["overall"]["retriever"]["Recall@5"] == pytest.approx(0.5)  # u0 (rank 2) and u2 (rank 0)


def test_ranking_records_name_the_true_item_by_label_not_retriever_rank():
    """Catches taking the true item at the retriever's rank, which is wrong once candidates are shuffled."""
    split = split_with(1)
    # shown order [5, 3, 9]: the true item 9 is letter C (label 2) but was the retriever's first (rank 0)
    example = EvalExample(0, [1], [5, 3, 9], 2, 0, [], [2.0, 1.0, 3.0])
    scores = torch.tensor([[0.1, 0.7, 0.4]])
    ranks = {"llm": torch.tensor([1]), "retriever": torch.tensor([0])}
    record = json.loads(ranking_records(scores, [example], ranks, split)[0])
    assert record["true_item"] == "m9" and record["retriever_rank"] == 0 and record["llm_rank"] == 1
    assert [(c["item"], c["letter"], c["retriever_score"]) for c in record["candidates"]] == [
        ("m3", "B", 1.0),
        ("m9", "C", 3.0),
        ("m5", "A", 2.0),
    ]


def test_confidence_interval_verdict_needs_the_whole_interval_on_one_side():
    """Catches calling a difference 'better'/'worse' when its interval still straddles zero."""
    assert _ci_text({"diff": 0.1, "ci95": [0.02, 0.2]}).endswith(" better")
    assert _ci_text({"diff": -0.2, "ci95": [-0.3, -0.1]}).endswith(" worse")
    assert _ci_text({"diff": 0.05, "ci95": [-0.1, 0.2]}).endswith("no clear difference")
    assert _ci_text({"diff": -0.05, "ci95": [-0.2, 0.1]}).endswith("no clear difference")


# dataloader/ranker_data.py


def test_sample_negatives_can_draw_the_last_item():
    """Catches an exclusive upper bound that never samples item num_items."""
    rng = np.random.default_rng(0)
    drawn = {item for _ in range(200) for item in sample_negatives(rng, 5, set(), 1)}
    assert drawn == {1, 2, 3, 4, 5}


def test_retrieved_lists_treat_rank_equal_to_the_list_size_as_missed():
    """Catches `<=` in the hit test: a label at 0-based rank num_candidates is NOT among the top num_candidates."""
    part = {
        "users": np.array([0]),
        "lengths": np.array([1], dtype=np.int32),
        "items": np.array([[7, 8, 9, 10, 11]], dtype=np.int32),
        "labels": np.array([11], dtype=np.int32),
        "label_ranks": np.array([4]),
    }
    assert len(retrieved_training_lists(part, 4, "drop", None, seed=0)[0]) == 0
    pairs, lists = retrieved_training_lists(part, 4, "insert", None, seed=0)
    assert pairs.tolist() == [[0, 1]] and 11 in lists[0].tolist()


def test_inserted_true_item_can_land_at_every_position_including_the_last():
    """Catches drawing the insert position from num_candidates - 1 slots (never last)."""
    size = 60
    part = {
        "users": np.arange(size),
        "lengths": np.ones(size, dtype=np.int32),
        "items": np.tile(np.array([1, 2, 3, 4, 5], dtype=np.int32), (size, 1)),
        "labels": np.full(size, 20, dtype=np.int32),
        "label_ranks": np.full(size, 50),
    }
    _, lists = retrieved_training_lists(part, 4, "insert", None, seed=0)
    positions = [row.tolist().index(20) for row in lists]
    assert set(positions) == {0, 1, 2, 3}
    assert all([i for i in row.tolist() if i != 20] == [1, 2, 3] for row in lists)


def guard_candidates(num_users: int) -> tuple[SplitData, Candidates]:
    split = split_with(num_users)
    items = np.array([[7, 9, 10]] * num_users, dtype=np.int32)
    part = {
        "users": np.arange(num_users),
        "items": items,
        "scores": np.tile(np.array([3.0, 2.0, 1.0], dtype=np.float32), (num_users, 1)),
        "labels": np.full(num_users, 7, dtype=np.int32),
        "label_ranks": np.zeros(num_users, dtype=np.int64),
    }
    test_part = {**part, "items": np.array([[8, 9, 10]] * num_users, dtype=np.int32), "labels": np.full(num_users, 8)}
    return split, Candidates(path=Path("guard.npz"), meta={}, val=part, test=test_part, train=None)


def test_max_eval_users_keeps_exactly_that_many_validation_users(llama2_tokenizer):
    """Catches an off-by-one in the --llm_max_eval_users cap (one user too few, or no cap at len - 1)."""
    split, candidates = guard_candidates(5)
    builder = PromptBuilder(llama2_tokenizer, split.titles, default_config(PromptConfig))
    for cap, expected in ((None, 5), (5, 5), (4, 4), (2, 2)):
        val_set, test_set = build_eval_sets(
            builder, split, candidates, default_config(RankerData, num_negatives=2, max_eval_users=cap)
        )
        users = [e.user for e in val_set]
        assert len(users) == expected and users == sorted(set(users)), cap
        assert len(test_set) == 5  # the test set is never capped


def test_test_candidates_are_shuffled_independently_of_validation(llama2_tokenizer):
    """Catches the test shuffle reusing the validation stream (the same letter order for a user in both)."""
    split, candidates = guard_candidates(6)
    builder = PromptBuilder(llama2_tokenizer, split.titles, default_config(PromptConfig))
    part = candidates.val
    val = eval_examples(builder, split, part, "val", 3, shuffle=True, seed=0)
    test = eval_examples(builder, split, part, "test", 3, shuffle=True, seed=0)
    assert [e.candidates for e in val] != [e.candidates for e in test]
    assert all(sorted(e.candidates) == [7, 9, 10] and e.candidates[e.label] == 7 for e in val + test)


# dataloader/retriever_data.py


def test_sequence_of_exactly_max_len_plus_step_is_cut_into_windows():
    """Catches `<=` at the one-example boundary, or a window loop that never reaches start 0."""
    tokens, labels = training_windows([list(range(1, 9))], max_len=4, sliding_step=4)
    assert labels.tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert tokens.tolist() == [[0, 5, 6, 7], [0, 1, 2, 3]]
    # one item longer: windows start at 5 and 1; the leftover head (item 1) is never a label
    _, labels = training_windows([list(range(1, 10))], max_len=4, sliding_step=4)
    assert labels.tolist() == [[6, 7, 8, 9], [2, 3, 4, 5]]


def test_window_step_truncates_the_fraction():
    """Catches rounding --sliding_window_size x max_len instead of truncating it (the original's int())."""
    assert window_step(0.75, 10) == 7
    assert window_step(0.5, 7) == 3
    assert window_step(0.01, 50) == 1


# dataloader/prompts.py


def test_twenty_six_candidates_get_a_to_z():
    """Catches an upper bound that refuses the 26th candidate (--llm_negative_sample_size 25)."""
    assert candidate_letters(26) == [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    assert candidate_letters(1) == ["A"]


def test_max_history_zero_shows_no_history(llama2_tokenizer):
    """Catches list[-0:] showing the whole history when --llm_max_history is 0."""
    builder = PromptBuilder(
        llama2_tokenizer, ["", "Alpha", "Beta", "Gamma"], default_config(PromptConfig, max_history=0)
    )
    text = builder.text([1, 2], [3])
    assert "User history: ; \n Candidate pool: (A) Gamma" in text
    assert "Alpha" not in text and "Beta" not in text


def test_title_one_token_too_long_is_cut(llama2_tokenizer):
    """Catches an off-by-one that keeps a title of max_title_len + 1 tokens whole."""
    title = "The Extraordinarily Movie (1999)"
    length = len(llama2_tokenizer(title, add_special_tokens=False).input_ids)
    builder = PromptBuilder(llama2_tokenizer, ["", title], default_config(PromptConfig, max_title_len=length - 1))
    cut = builder.title(1)
    assert cut != title and title.startswith(cut)
    assert len(llama2_tokenizer(cut, add_special_tokens=False).input_ids) <= length - 1
    assert (
        PromptBuilder(llama2_tokenizer, ["", title], default_config(PromptConfig, max_title_len=length)).title(1)
        == title
    )


def test_left_cut_adds_no_bos_when_the_tokenizer_adds_none(llama2_tokenizer):
    """Catches prepending BOS to a cut prompt whose tokenizer never put one there."""
    titles = [""] + [f"Movie {i}" for i in range(1, 31)]
    full_builder = PromptBuilder(llama2_tokenizer, titles, default_config(PromptConfig))
    full = full_builder.encode(list(range(1, 11)), list(range(11, 21)))
    assert full[0] != llama2_tokenizer.bos_token_id and len(full) > 40
    ids = PromptBuilder(llama2_tokenizer, titles, default_config(PromptConfig, max_text_len=40)).encode(
        list(range(1, 11)), list(range(11, 21))
    )
    assert ids == full[-40:]


# dataloader/candidates.py


def test_candidates_round_trip_keeps_large_ranks_and_lengths(tmp_path):
    """Catches too narrow integer dtypes for label ranks (catalogue-sized) or prefix lengths (long histories)."""
    split = split_with(2)
    part = {
        "users": np.array([0, 1]),
        "items": np.array([[3, 4], [5, 6]]),
        "scores": np.array([[0.5, 0.25], [1.5, -2.0]]),
        "labels": np.array([3, 9]),
        "label_ranks": np.array([0, 100_000]),
    }
    train = {
        "users": np.array([0, 1]),
        "lengths": np.array([1, 300]),
        "items": np.array([[2], [7]]),
        "labels": np.array([2, 8]),
        "label_ranks": np.array([70_000, 1]),
    }
    path = tmp_path / "candidates.npz"
    save_candidates(path, split=split, topk=2, val=part, test=part, val_metrics={}, test_metrics={}, train=train)
    loaded = load_candidates(path, split)
    assert loaded.test["label_ranks"].tolist() == [0, 100_000]
    assert loaded.train["lengths"].tolist() == [1, 300]
    assert loaded.train["label_ranks"].tolist() == [70_000, 1]


# trainer/retriever_train.py


def decay_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[float, set[str]]:
    """The optimizer's parameters by name, keyed by their group's weight decay."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        groups.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    return groups


def training_session(model, tmp_path) -> Session:
    """A training run's Session as train() starts it (weight decay 0.01, lr 0.1), on a 4-user split."""
    training = default_config(RetrieverTraining, max_len=5, lr=0.1, weight_decay=0.01)
    return Session(model, split_with(4), training, tmp_path, CPU, resume=False, wandb_run=None)


def test_the_retriever_s_optimizer_decays_weight_matrices_but_not_layer_norms_or_biases(tmp_path):
    """Catches LayerNorm gains and shifts (or biases) put in the weight-decay group: the original and the paper decay
    only the weight matrices (and the LRU's params_log)."""
    spec = default_config(RetrieverSpec, model="lru", max_len=5, hidden_units=8, num_blocks=1)
    model = build_retriever(spec, 12)
    session = training_session(model, tmp_path)
    block = "blocks.0."
    assert decay_groups(model, session.optimizer) == {
        0.01: {"token.weight"}
        | {block + name for name in ("lru_layer.params_log", "lru_layer.in_proj.weight", "lru_layer.out_proj.weight")}
        | {block + f"feed_forward.{w}.weight" for w in ("w_1", "w_2")},
        0.0: {"bias", "layer_norm.weight", "layer_norm.bias"}
        | {block + f"lru_layer.{layer}.bias" for layer in ("in_proj", "out_proj")}
        | {block + f"feed_forward.{w}.bias" for w in ("w_1", "w_2")}
        | {
            block + f"{norm}.{part}"
            for norm in ("lru_layer.layer_norm", "feed_forward.layer_norm")
            for part in ("weight", "bias")
        },
    }
    # What the groups do: a step with zero gradients moves nothing but the decay, which shrinks a weight matrix
    # by lr x weight_decay and leaves a LayerNorm gain at exactly 1.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    session.optimizer.step()
    gain = before["layer_norm.weight"]
    assert bool((gain == 1).all()) and torch.equal(model.layer_norm.weight, gain)
    assert torch.allclose(model.token.weight, before["token.weight"] * (1 - 0.1 * 0.01))


@pytest.mark.parametrize("name", ["lru", "sasrec", "bert4rec", "narm"])
def test_no_retriever_s_layer_norm_is_weight_decayed(tmp_path, name):
    """Catches LayerNorms in the decay group for every retriever, and a model whose LayerNorm would escape the rule
    (which goes by parameter name): here LayerNorms and weight matrices are found by module type instead."""
    spec = default_config(RetrieverSpec, model=name, max_len=5, hidden_units=8, num_blocks=2, heads=2)
    model = build_retriever(spec, 12)
    groups = decay_groups(model, training_session(model, tmp_path).optimizer)
    norms = {
        f"{module_name}.{part}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for part in ("weight", "bias")
    }
    matrices = {
        f"{module_name}.weight"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding)
    }
    assert (name == "narm" or norms) and norms <= groups[0.0]
    assert matrices and matrices <= groups[0.01]


def test_retriever_stops_after_exactly_patience_validations_without_a_better_one(tmp_path):
    """Catches an off-by-one in early stopping (`>` for `>=`: one validation too many), or a summary that does not say
    early stopping ended the run."""
    spec = default_config(RetrieverSpec, model="lru", max_len=5, hidden_units=8, num_blocks=1)
    # lr 1e-12 moves no float32 weight: every validation equals the first (the best; equal is not better)
    training = default_config(
        RetrieverTraining, max_len=5, batch_size=2, lr=1e-12, val_iterations=1, early_stopping_patience=2, num_epochs=5
    )
    train(build_retriever(spec, 12), split_with(8), training, tmp_path, CPU)
    history = read_history(tmp_path / HISTORY)
    assert [(row["step"], row["best"]) for row in history] == [(1, True), (2, False), (3, False)]
    assert len({row["Recall@10"] for row in history}) == 1
    summary = read_summary(tmp_path)
    assert (summary["steps"], summary["best_step"], summary["stopped_by"]) == (3, 1, "early stopping")


# trainer/retriever_export.py


def test_test_files_average_batches_the_papers_way_and_give_standard_errors(tmp_path):
    """Catches test_metrics_batch16.json / test_metrics_original.json holding the per-user mean instead of the
    papers' batch-averaged figures, the original file masking the whole history, and a wrong standard error."""
    ranks = np.array([0] * 16 + [100] * 4)  # batch 1: 16 hits at rank 0; batch 2: 4 misses
    window_ranks = np.array([0] * 16 + [1] * 4)  # with only the input window masked: 4 users rank 2nd
    split = SplitData("s", [[1]] * 20, [2] * 20, [3] * 20, ["", "a", "b", "c"], [str(u) for u in range(20)],
                      ["", "1", "2", "3"], "f")  # fmt: skip
    export = default_config(CandidateExport, metric_ks=(1, 10), batch_size=16)
    arrays = {"label_ranks": ranks, "window_label_ranks": window_ranks}
    write_test_metrics(tmp_path, {"Recall@1": 0.8}, arrays, export, split)
    paper_way = json.loads((tmp_path / "test_metrics_batch16.json").read_text())
    assert paper_way["Recall@1"] == pytest.approx((1.0 + 0.0) / 2)
    assert paper_way["NDCG@10"] == pytest.approx(0.5) and paper_way["MRR@10"] == pytest.approx(0.5)
    original = json.loads((tmp_path / "test_metrics_original.json").read_text())
    assert original["Recall@1"] == pytest.approx((1.0 + 0.0) / 2)  # batches of 16: 16/16, then 0/4
    assert original["MRR@10"] == pytest.approx((1.0 + 0.5) / 2)
    assert original["per_user_mean"]["MRR@10"] == pytest.approx((16 + 4 * 0.5) / 20)
    saved = json.loads((tmp_path / "test_metrics.json").read_text())
    assert saved["Recall@1"] == 0.8 and saved["users"] == 20 and saved["data"]["fingerprint"] == "f"
    # 16 ones and 4 zeros: sample sd sqrt(0.8 * 0.2 * 20 / 19), over sqrt(20)
    assert saved["standard_errors"]["Recall@1"] == pytest.approx((0.16 * 20 / 19) ** 0.5 / 20**0.5)


def test_fold_models_train_and_validate_on_the_other_folds_users_only(tmp_path, tiny_args):  # noqa: F811
    """Catches a fold model trained (and validated) on all users, its own fold's included."""
    assert main(tiny_args + ["--retrieved_train_folds", "2"]) == 0
    run = run_dir_of(tmp_path)
    split = split_of(tiny_args)
    for k, users in enumerate(fold_users(split.num_users, 2, 42)):
        fold_run = run / "folds" / f"fold{k}"
        others = np.setdiff1d(np.arange(split.num_users), users)
        # 6 other users -> 6 windows / batch 4 = 2 steps per epoch, 4 epochs (all 12 users would be 3 per epoch)
        assert json.loads((fold_run / "training_summary.json").read_text())["steps"] == 8
        history = [json.loads(line) for line in (fold_run / "val_history.jsonl").read_text().splitlines()]
        assert [row["step"] for row in history] == [2, 4, 6, 8]
        # the last validation is the last model's on the other users' validation items
        spec = default_config(RetrieverSpec, model="lru", max_len=5, hidden_units=8, num_blocks=2)
        model = build_retriever(spec, split.num_items)
        model.load_state_dict(load_checkpoint(fold_run / "checkpoint_last.pt", CPU)["model"])
        data = EvalData([split.train[u] for u in others], [split.val[u] for u in others], 5)
        metrics, _ = evaluate(model, data, 5, [1, 5, 10], CPU)
        for name, value in metrics.items():
            assert history[-1][name] == pytest.approx(value), name
        assert not math.isnan(history[-1]["NDCG@10"])


def test_file_fingerprint_covers_the_whole_file(tmp_path):
    """Catches a fingerprint of the first block only: two candidates files differing after 1 MiB must differ."""
    import hashlib

    from utils.files import sha256_file

    data = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a whole number of blocks
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data[:-1] + b"x")
    assert sha256_file(tmp_path / "a") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "a") != sha256_file(tmp_path / "b")
