"""Score fusion (--llm_fusion linear): the weight chosen on validation, and shuffled candidates that keep their own
retriever scores."""

import math

import numpy as np
import pytest
import torch

from config import default_config
from dataloader.prompts import PromptBuilder, PromptConfig
from dataloader.ranker_data import EvalExample, eval_examples
from tests.test_prompts import llama2_bos, small_split  # noqa: F401 (llama2_bos is a fixture)
from trainer.metrics import fuse_scores, label_ranks
from trainer.ranker_eval import FUSION_WEIGHTS, choose_fusion_weight, subset_ranks


def examples_of(retriever_scores: list[list[float]], labels: list[int]) -> list[EvalExample]:
    return [
        EvalExample(user, [], list(range(1, len(scores) + 1)), label, 0, [], scores)
        for user, (scores, label) in enumerate(zip(retriever_scores, labels, strict=True))
    ]


def ndcg10(rank: int) -> float:
    return 1 / math.log2(rank + 2) if rank < 10 else 0.0


def test_the_llm_alone_wins_when_the_retriever_is_wrong_and_ties_go_to_the_smallest_weight():
    # 3 candidates, true item first. The LLM ranks it first; the retriever, with large gaps, last. Weights 0 and 0.25
    # keep the LLM's order (a tie at NDCG 1; from 0.5 on the retriever's gap wins): the smallest, 0, is chosen.
    llm = torch.tensor([[10.0, 0.0, 0.0]])
    examples = examples_of([[-30.0, 0.0, 0.0]], [0])
    chosen = choose_fusion_weight(llm, examples)
    grid = chosen["val_NDCG@10_by_weight"]
    assert chosen["weight"] == 0.0
    assert grid["0.0"] == grid["0.25"] == 1.0  # log-softmax gap 10 against 0.25 x 30
    assert grid["inf"] == pytest.approx(ndcg10(2))  # the retriever's order alone: third, ties counted against


def test_the_retriever_alone_wins_when_only_its_order_is_right():
    # The retriever prefers the true item by a hair (0.01); the LLM is strongly wrong. Only w = inf follows the
    # retriever exactly: at w = 8 the hair is worth 0.08 against the LLM's 10.
    llm = torch.tensor([[0.0, 10.0, 10.0]])
    examples = examples_of([[0.01, 0.0, 0.0]], [0])
    chosen = choose_fusion_weight(llm, examples)
    assert chosen["weight"] == "inf"
    assert chosen["val_NDCG@10_by_weight"]["inf"] == 1.0 and chosen["val_NDCG@10_by_weight"]["8.0"] < 1.0


def test_the_grid_is_the_fused_validation_ndcg_and_the_best_smallest_weight_is_chosen():
    rng = np.random.default_rng(0)
    llm = torch.tensor(rng.normal(size=(40, 20)) * 3)
    retriever = rng.normal(size=(40, 20)).tolist()
    labels = rng.integers(20, size=40).tolist()
    examples = examples_of(retriever, labels)
    chosen = choose_fusion_weight(llm, examples)
    expected = {}
    for weight in FUSION_WEIGHTS:
        fused = fuse_scores(llm, torch.tensor(retriever, dtype=torch.float64), weight)
        ranks = label_ranks(fused, torch.tensor(labels))
        expected[weight] = float(np.mean([ndcg10(int(r)) for r in ranks]))
        assert chosen["val_NDCG@10_by_weight"][str("inf" if math.isinf(weight) else weight)] == pytest.approx(
            expected[weight]
        )
    best = max(expected.values())
    assert chosen["weight"] == min(w for w in FUSION_WEIGHTS if expected[w] == best)


def test_shuffled_candidates_keep_their_retriever_scores_and_fused_ranks(llama2_bos):  # noqa: F811
    """With --llm_shuffle_eval_candidates each candidate keeps its own retriever score, so the fused ranking of the
    items is the unshuffled one, only listed in another order."""
    split = small_split()
    builder = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig))
    items = np.array([[21, *range(24, 43)], [*range(24, 43), 22], [23, *range(25, 44)]], dtype=np.int32)
    scores = np.sort(np.random.default_rng(1).normal(size=(3, 20)).astype(np.float32))[:, ::-1].copy()
    part = {"users": np.array([0, 1, 2]), "items": items, "labels": np.array([21, 22, 23]), "scores": scores}
    plain = eval_examples(builder, split, part, "val", 20, shuffle=False, seed=0)
    shuffled = eval_examples(builder, split, part, "val", 20, shuffle=True, seed=0)
    assert [e.candidates for e in shuffled] != [e.candidates for e in plain]  # the order did change
    for a, b in zip(plain, shuffled, strict=True):
        assert dict(zip(a.candidates, a.retriever_scores, strict=True)) == dict(
            zip(b.candidates, b.retriever_scores, strict=True)
        )
        assert a.candidates[a.label] == b.candidates[b.label] and a.retriever_rank == b.retriever_rank

    def llm_scores(examples):  # an LLM whose score depends on the item only, not on its letter
        return torch.tensor([[float((item * 7919) % 101) for item in e.candidates] for e in examples])

    plain_ranks = subset_ranks(llm_scores(plain), plain, 1.0, seed=0)
    shuffled_ranks = subset_ranks(llm_scores(shuffled), shuffled, 1.0, seed=0)
    for name in ("retriever", "llm", "fused"):
        assert plain_ranks[name].tolist() == shuffled_ranks[name].tolist(), name
