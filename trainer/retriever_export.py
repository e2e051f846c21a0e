"""The end of a retriever run: validation/test metrics of the kept model and the candidates every later stage reads
(candidates.npz: each validation/test user's top items and each training prefix's), optionally the training-prefix
candidates of retrievers trained on user-disjoint folds."""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataloader.candidates import save_candidates
from dataloader.retriever_data import eval_data, sample_prefixes
from datasets.split import SplitData
from model.interface import NextItemModel
from model.retrievers import RetrieverSpec, build_retriever
from trainer.metrics import PAPER_BATCH_SIZE, batch_averaged_metrics, metrics_from_ranks, per_user_metric
from trainer.retriever_eval import evaluate, train_prefix_candidates
from trainer.retriever_train import BEST, LAST, RetrieverTraining, train
from utils.files import atomic_write_json, load_checkpoint
from utils.settings import flag_field

# Training-prefix windows per forward pass: on a CPU, smaller batches ran faster per position (docs/performance.md).
PREFIX_BATCH = 64


@dataclass(frozen=True)
class CandidateExport:
    """What a finished retriever run writes (the --retrieved_* flags, the test batch size and cut-offs)."""

    topk: int = flag_field("retrieved_topk")  # candidates kept per validation/test user
    train_topk: int = flag_field("retrieved_train_topk")  # per training prefix
    train_folds: int = flag_field("retrieved_train_folds")  # 0 in-sample, K >= 2 user-disjoint folds
    train_max_prefixes: int = flag_field("retrieved_train_max_prefixes")  # a seeded sample above this many (0: all)
    seed: int  # the sample's
    batch_size: int = flag_field("test_batch_size")
    metric_ks: tuple[int, ...]


def load_best(model: NextItemModel, run_dir: Path, device: torch.device) -> NextItemModel:
    """The run's kept model (checkpoint_best.pt) into `model`."""
    model.load_state_dict(load_checkpoint(Path(run_dir) / BEST, device)["model"])
    return model


def fold_users(num_users: int, folds: int, seed: int) -> list[np.ndarray]:
    """A seeded partition of the users into `folds` disjoint sorted index arrays of near-equal size."""
    order = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(order[k::folds]) for k in range(folds)]


def user_subset(split: SplitData, users: np.ndarray, name: str) -> SplitData:
    return SplitData(
        name=f"{split.name}-{name}",
        train=[split.train[u] for u in users],
        val=[split.val[u] for u in users],
        test=[split.test[u] for u in users],
        titles=split.titles,
        user_raw_ids=[split.user_raw_ids[u] for u in users],
        item_raw_ids=split.item_raw_ids,
        fingerprint=f"{split.fingerprint}-{name}",
    )


def held_out_prefix_candidates(
    spec: RetrieverSpec,
    training: RetrieverTraining,
    split: SplitData,
    prefixes: tuple[np.ndarray, np.ndarray],
    folds: int,
    folds_dir: Path,
    topk: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """train_prefix_candidates for the prefixes (users, lengths), each from a retriever that never saw its user.

    Users are split into `folds` folds; for each fold a fresh model is trained with the run's spec and training
    (validation and early stopping on the other folds' users) and scores the fold's training prefixes. This makes
    training lists as hard as test lists: in-sample, the retriever has already fitted the very positions. Each
    fold's run lives in folds_dir/fold<k>/ and resumes like the main run.
    """
    parts = []
    for k, users in enumerate(fold_users(split.num_users, folds, training.seed)):
        others = np.setdiff1d(np.arange(split.num_users), users)
        fold_dir = Path(folds_dir) / f"fold{k}"
        resume = (fold_dir / LAST).exists()
        fold_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(training.seed + 1 + k)
        model = build_retriever(spec, split.num_items).to(device)
        print(f"fold {k}: training on {len(others)} users to score the prefixes of {len(users)} others", flush=True)
        train(model, user_subset(split, others, f"fold{k}"), training, fold_dir, device, resume=resume)
        load_best(model, fold_dir, device)
        mine = np.isin(prefixes[0], users)
        mine = (prefixes[0][mine], prefixes[1][mine])
        parts.append(train_prefix_candidates(model, split.train, spec.max_len, topk, PREFIX_BATCH, device, mine))
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.lexsort((merged["lengths"], merged["users"]))  # (user, length) order, as train_prefix_candidates
    return {key: value[order] for key, value in merged.items()}


def evaluate_splits(
    model: NextItemModel, split: SplitData, max_len: int, export: CandidateExport, device: torch.device, topk: int = 0
) -> tuple[dict, dict, dict, dict]:
    """(val metrics, val arrays, test metrics, test arrays) of the full ranking; with topk, each user's top items."""
    ks = list(export.metric_ks)
    val_metrics, val_arrays = evaluate(
        model, eval_data(split, "val", max_len), export.batch_size, ks, device, topk, desc="validation users"
    )
    test_metrics, test_arrays = evaluate(
        model, eval_data(split, "test", max_len), export.batch_size, ks, device, topk, "test users", window_ranks=True
    )
    return val_metrics, val_arrays, test_metrics, test_arrays


def export_candidates(
    model: NextItemModel,
    split: SplitData,
    spec: RetrieverSpec,
    export: CandidateExport,
    out_dir: Path,
    device: torch.device,
    fold_training: tuple[RetrieverTraining, Path] | None = None,
    seconds: dict[str, float] | None = None,
) -> tuple[dict, dict]:
    """With `model` as it is: val/test metrics, the test files (write_test_metrics) and candidates.npz.
    fold_training = (the run's training, the folds' folder) when export.train_folds > 1. `seconds`, if given, gets
    the time of each part: evaluation (val + test), train_prefixes, files."""
    seconds = {} if seconds is None else seconds
    start = time.time()
    topk = min(export.topk, split.num_items)
    val_metrics, val_arrays, test_metrics, test_arrays = evaluate_splits(
        model, split, spec.max_len, export, device, topk
    )
    seconds["evaluation"] = time.time() - start
    train_arrays, train_metrics = (
        prefix_candidates(model, split, spec, export, device, fold_training, test_metrics)
        if export.train_topk > 0
        else (None, None)
    )
    seconds["train_prefixes"] = time.time() - start - seconds["evaluation"]
    save_candidates(
        out_dir / "candidates.npz",
        split=split,
        topk=topk,
        val=val_arrays,
        test=test_arrays,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        train=train_arrays,
        train_metrics=train_metrics,
    )
    write_test_metrics(out_dir, test_metrics, test_arrays, export, split)
    seconds["files"] = time.time() - start - seconds["evaluation"] - seconds["train_prefixes"]
    return val_metrics, test_metrics


def prefix_candidates(
    model: NextItemModel,
    split: SplitData,
    spec: RetrieverSpec,
    export: CandidateExport,
    device: torch.device,
    fold_training: tuple[RetrieverTraining, Path] | None,
    test_metrics: dict,
) -> tuple[dict[str, np.ndarray], dict]:
    """Every training prefix's top export.train_topk items (in-sample, or from user-disjoint folds) and their metrics."""
    start = time.time()
    train_topk = min(export.train_topk, split.num_items)
    users, lengths, total = sample_prefixes(split.train, export.train_max_prefixes, export.seed)
    if export.train_folds > 1:
        training, folds_dir = fold_training
        train_arrays = held_out_prefix_candidates(
            spec, training, split, (users, lengths), export.train_folds, folds_dir, train_topk, device
        )
        source = f"{export.train_folds} user-disjoint folds"
    else:
        train_arrays = train_prefix_candidates(
            model, split.train, spec.max_len, train_topk, PREFIX_BATCH, device, (users, lengths)
        )
        source = "in-sample"
    # In-sample, the retriever was trained on these very positions: how much better it looks there than at test
    # is what a ranker trained on these lists would learn to expect (docs/ranker.md, "Training candidates").
    train_metrics = metrics_from_ranks(torch.from_numpy(train_arrays["label_ranks"]), list(export.metric_ks))
    train_metrics["source"] = source
    # what stage 2 can train on: every prefix, or a seeded sample of them (the ranker reads this from the meta)
    train_metrics["prefixes_total"] = total
    train_metrics["prefixes_exported"] = len(users)
    train_metrics["sample_seed"] = export.seed if len(users) < total else None
    print(
        f"training-prefix candidates: {len(train_arrays['users'])} of {total} prefixes x {train_topk} in "
        f"{time.time() - start:.1f} s; {source} Recall@20 {train_metrics.get('Recall@20', math.nan):.4f} "
        f"NDCG@20 {train_metrics.get('NDCG@20', math.nan):.4f} vs test {test_metrics.get('Recall@20', math.nan):.4f} "
        f"/ {test_metrics.get('NDCG@20', math.nan):.4f}",
        flush=True,
    )
    return train_arrays, train_metrics


def write_test_metrics(
    out_dir: Path, test_metrics: dict, test_arrays: dict, export: CandidateExport, split: SplitData
) -> None:
    """The test files, test_metrics.json last (a folder with it is complete):
    - test_metrics_batch16.json: the ranks averaged over batches of 16 users as the LlamaRec paper's code did;
    - test_metrics_original.json: the LRURec/LlamaRec code's evaluation (only the input window's items masked, the
      mean of per-batch means over batches of --test_batch_size);
    - test_metrics.json: the metrics (means over users), each one's standard error over users (sample sd /
      sqrt(n)), the number of test users and the data's record (statistics, fingerprint, a published split's sha256).
    The first two are for comparing with the papers only: nothing selects on them."""
    ks = list(export.metric_ks)
    ranks = torch.from_numpy(np.asarray(test_arrays["label_ranks"]))
    atomic_write_json(out_dir / f"test_metrics_batch{PAPER_BATCH_SIZE}.json", batch_averaged_metrics(ranks, ks))
    if "window_label_ranks" in test_arrays:
        window = torch.from_numpy(np.asarray(test_arrays["window_label_ranks"]))
        original = {
            "masking": "the input window's items (the last --bert_max_len history items) and padding",
            "averaging": f"the mean of per-batch means over batches of {export.batch_size} users (--test_batch_size)",
            **batch_averaged_metrics(window, ks, export.batch_size),
            "per_user_mean": metrics_from_ranks(window, ks),
        }
        atomic_write_json(out_dir / "test_metrics_original.json", original)
    atomic_write_json(
        out_dir / "test_metrics.json",
        {
            **test_metrics,
            "standard_errors": standard_errors(ranks, [name for name in test_metrics if "@" in name]),
            "users": len(ranks),
            "data": {**split.stats(), "fingerprint": split.fingerprint},
        },
    )


def standard_errors(ranks: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Each metric's standard error over users: the sample sd of the per-user values / sqrt(users)."""
    if len(ranks) < 2:
        return {name: math.nan for name in names}
    return {name: (per_user_metric(ranks, name).std() / math.sqrt(len(ranks))).item() for name in names}
