"""Ranking metrics with one held-out item per user (Recall@k is then the hit rate).

Ties are counted pessimistically: the label's rank is the number of OTHER entries scoring at
least as high as it, so a scorer that gives every item the same score earns 0, not 1.
All metrics are means over users (never means of per-batch means).
"""

import math
from collections.abc import Sequence

import torch


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each user's label among its row of scores, ties pessimistic. [N, C], [N] -> [N]."""
    label_scores = scores.gather(1, labels.view(-1, 1).long())
    # Counting beats sorting: O(C) per row and no [N, C] index tensor.
    ranks = (scores >= label_scores).sum(dim=1) - 1
    # NaN compares false with everything, so a NaN label score would rank first: rank it last.
    return torch.where(label_scores.squeeze(1).isnan(), scores.shape[1] - 1, ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k, NDCG@k, MRR@k: means over users of per_user_metric (NaN for no users)."""
    return {
        f"{name}@{k}": per_user_metric(ranks, f"{name}@{k}").mean().item() if len(ranks) else math.nan
        for k in ks
        for name in ("Recall", "NDCG", "MRR")
    }


PAPER_BATCH_SIZE = 16  # the original's test batch size


def batch_averaged_metrics(ranks: torch.Tensor, ks: Sequence[int], batch_size: int = PAPER_BATCH_SIZE) -> dict:
    """The paper's way, for comparison only: the mean over consecutive batches of `batch_size` users (in user
    order) of each batch's mean, so a short last batch weighs as much as a full one."""
    batches = [metrics_from_ranks(ranks[i : i + batch_size], ks) for i in range(0, len(ranks), batch_size)]
    return {name: sum(b[name] for b in batches) / len(batches) for name in batches[0]} if batches else {}


def per_user_metric(ranks: torch.Tensor, name: str) -> torch.Tensor:
    """One user's Recall@k / NDCG@k / MRR@k (name like "NDCG@10") for each 0-based rank: [N] -> [N] float64."""
    metric, k = name.split("@")
    ranks = ranks.double()
    hit = ranks < int(k)
    value = {"Recall": torch.ones_like(ranks), "NDCG": 1.0 / torch.log2(ranks + 2.0), "MRR": 1.0 / (ranks + 1.0)}
    return torch.where(hit, value[metric], 0.0)


def paired_bootstrap(
    values: torch.Tensor, baseline: torch.Tensor, resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | list[float]]:
    """Mean paired difference values - baseline over users and its 95% percentile bootstrap interval.

    The same users are resampled (with replacement) for both, so what user-to-user spread the two share
    cancels out; `resamples` draws from a generator seeded by `seed`, so the interval is repeatable.
    """
    diff = (values.double() - baseline.double()).flatten()
    if len(diff) == 0:
        return {"diff": math.nan, "ci95": [math.nan, math.nan], "resamples": resamples, "users": 0}
    generator = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for start in range(0, resamples, 500):  # [500, N] index blocks bound the memory
        count = min(500, resamples - start)
        index = torch.randint(len(diff), (count, len(diff)), generator=generator)
        means[start : start + count] = diff[index].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": diff.mean().item(), "ci95": [low, high], "resamples": resamples, "users": len(diff)}


def fuse_scores(llm_scores: torch.Tensor, retriever_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """log_softmax(LLM verbalizer scores) + weight x log_softmax(retriever scores), over each row's candidates.

    weight = 0 is the LLM alone; weight = inf is the retriever alone (its order exactly, whatever the LLM says).
    """
    retriever = torch.log_softmax(retriever_scores.double(), dim=-1)
    if math.isinf(weight):
        return retriever
    return torch.log_softmax(llm_scores.double(), dim=-1) + weight * retriever
