"""Metrics against cases computed by hand."""

import math

import pytest
import torch

from trainer.metrics import (
    batch_averaged_metrics,
    fuse_scores,
    label_ranks,
    metrics_from_ranks,
    paired_bootstrap,
    per_user_metric,
)


def ranking_metrics(scores, labels, ks):
    return metrics_from_ranks(label_ranks(scores, labels), ks)


def test_hand_computed_case():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # label 0 -> rank 0
            [0.9, 0.1, 0.5, 0.3],  # label 2 -> rank 1
            [0.9, 0.1, 0.5, 0.3],  # label 1 -> rank 3
        ]
    )
    labels = torch.tensor([0, 2, 1])
    assert label_ranks(scores, labels).tolist() == [0, 1, 3]
    m = ranking_metrics(scores, labels, [1, 2, 4])
    assert m["Recall@1"] == pytest.approx(1 / 3)
    assert m["Recall@2"] == pytest.approx(2 / 3)
    assert m["Recall@4"] == pytest.approx(1.0)
    assert m["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m["NDCG@4"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    assert m["MRR@2"] == pytest.approx((1 + 1 / 2) / 3)
    assert m["MRR@4"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)


def test_ties_are_pessimistic():
    scores = torch.zeros(2, 5)  # a constant scorer
    labels = torch.tensor([0, 3])
    assert label_ranks(scores, labels).tolist() == [4, 4]
    assert ranking_metrics(scores, labels, [1, 4])["Recall@4"] == 0.0
    # a tie with one other item costs one place
    tied = torch.tensor([[1.0, 1.0, 0.0]])
    assert label_ranks(tied, torch.tensor([0])).tolist() == [1]


def test_masked_items_rank_below_everything():
    scores = torch.tensor([[5.0, -math.inf, 1.0, 2.0]])
    assert label_ranks(scores, torch.tensor([2])).tolist() == [2]


def test_empty_ranks_give_nan():
    assert math.isnan(metrics_from_ranks(torch.tensor([], dtype=torch.long), [1])["Recall@1"])


def test_nan_label_score_ranks_last():
    # NaN compares false with everything: counted naively it would rank first (a hit at every k).
    scores = torch.tensor([[0.1, math.nan, 0.3, 0.2], [0.5, 0.2, 0.1, 0.0]])
    assert label_ranks(scores, torch.tensor([1, 1])).tolist() == [3, 1]
    assert ranking_metrics(scores, torch.tensor([1, 1]), [1, 4])["Recall@1"] == 0.0


def test_per_user_metric_by_hand():
    ranks = torch.tensor([0, 1, 3, 10])
    assert per_user_metric(ranks, "Recall@4").tolist() == [1, 1, 1, 0]
    assert per_user_metric(ranks, "NDCG@4").tolist() == pytest.approx([1, 1 / math.log2(3), 1 / math.log2(5), 0])
    assert per_user_metric(ranks, "MRR@2").tolist() == pytest.approx([1, 0.5, 0, 0])
    # the mean over users is the metric
    assert per_user_metric(ranks, "NDCG@4").mean().item() == pytest.approx(metrics_from_ranks(ranks, [4])["NDCG@4"])


def test_paired_bootstrap_covers_a_known_difference_and_zero():
    generator = torch.Generator().manual_seed(0)
    baseline = torch.rand(300, generator=generator)
    # known paired difference 0.05 plus zero-mean per-user noise (+-0.1, exactly balanced)
    noise = torch.tensor([0.1, -0.1]).repeat(150)
    result = paired_bootstrap(baseline + 0.05 + noise, baseline, resamples=1000, seed=1)
    assert result["diff"] == pytest.approx(0.05)
    low, high = result["ci95"]
    assert low < 0.05 < high and high - low < 0.05  # covers it, and is informative (the noise sd is 0.1)
    assert result == paired_bootstrap(baseline + 0.05 + noise, baseline, resamples=1000, seed=1)  # seeded
    same = paired_bootstrap(baseline, baseline, resamples=1000, seed=1)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
    balanced = paired_bootstrap(baseline + noise, baseline, resamples=1000, seed=2)
    assert balanced["ci95"][0] < 0 < balanced["ci95"][1]
    # a clear loss is reported as one: the whole interval below 0
    assert paired_bootstrap(baseline - 0.2 + noise, baseline, resamples=1000)["ci95"][1] < 0


def test_fusion_weight_zero_is_the_llm_and_inf_the_retriever():
    generator = torch.Generator().manual_seed(0)
    llm = torch.randn(50, 20, generator=generator) * 3
    retriever = torch.sort(torch.randn(50, 20, generator=generator), dim=1, descending=True).values
    labels = torch.randint(20, (50,), generator=generator)
    assert torch.equal(label_ranks(fuse_scores(llm, retriever, 0.0), labels), label_ranks(llm, labels))
    assert torch.equal(fuse_scores(llm, retriever, 0.0).argsort(dim=1), llm.double().argsort(dim=1))
    fused_inf = fuse_scores(llm, retriever, math.inf)
    assert torch.equal(fused_inf.argsort(dim=1, descending=True), torch.arange(20).expand(50, 20))
    # in between, the sum of the two log-softmaxes, by hand for one row
    row = torch.log_softmax(llm[0].double(), 0) + 2.0 * torch.log_softmax(retriever[0].double(), 0)
    assert torch.allclose(fuse_scores(llm, retriever, 2.0)[0], row)


def test_batch_averaged_metrics_weigh_a_short_last_batch_like_a_full_one():
    ranks = torch.tensor([0, 20, 5])  # Recall@10 per user: 1, 0, 1
    paper_way = batch_averaged_metrics(ranks, [10], batch_size=2)
    assert paper_way["Recall@10"] == pytest.approx((0.5 + 1.0) / 2)  # batches [0, 20] and [5]
    assert metrics_from_ranks(ranks, [10])["Recall@10"] == pytest.approx(2 / 3)
    # NDCG@10: batch 1 = (1 + 0) / 2, batch 2 = 1 / log2(7)
    assert paper_way["NDCG@10"] == pytest.approx((0.5 + 1 / math.log2(7)) / 2)
    assert batch_averaged_metrics(torch.tensor([], dtype=torch.long), [10]) == {}
