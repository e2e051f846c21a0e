"""Learning works through the real training code: a retriever trained by train_retriever.py's own training function
learns a planted next-item rule that popularity cannot, and the ranker's Trainer makes the same update whatever
split of a batch into micro-batches and accumulation steps is used."""

import numpy as np
import pandas as pd
import pytest
import torch

from config import default_config
from dataloader.prompts import PromptBuilder, PromptConfig
from dataloader.ranker_data import EvalExample, TrainPrompts, training_prefixes
from dataloader.retriever_data import eval_data
from datasets import make_split
from model.retrievers import RetrieverSpec, build_retriever
from tests.conftest import tiny_llama
from tests.test_ranker import tokenizer  # noqa: F401 (a fixture)
from trainer.metrics import label_ranks, metrics_from_ranks
from trainer.retriever_eval import evaluate
from trainer.retriever_train import RetrieverTraining, train

NUM_ITEMS, NUM_USERS, LENGTH = 30, 90, 10


def planted_split(num_cycles: int = 2):
    """Users walk one of `num_cycles` fixed cycles through the items, each from a random start. With two cycles the
    next item follows from the last two (which cycle the pair belongs to), not from the last one alone nor from
    popularity (every item is about equally frequent); a model that sees the future during training can copy its
    label instead of learning this, and fails at test, where there is no future to copy."""
    rng = np.random.default_rng(0)
    cycles = [rng.permutation(NUM_ITEMS) for _ in range(num_cycles)]
    rows = []
    for user in range(NUM_USERS):
        cycle, position = cycles[user % num_cycles], int(rng.integers(NUM_ITEMS))
        for t in range(LENGTH):
            rows.append((f"u{user}", f"i{cycle[(position + t) % NUM_ITEMS]}", t))
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    return make_split(interactions, {f"i{i}": f"Item {i}" for i in range(NUM_ITEMS)}, name="planted", min_sc=1)


def popularity_test_metrics(split) -> dict[str, float]:
    """A popularity ranking of the test users' items (training counts; history masked as the evaluation does)."""
    counts = np.bincount([i for seq in split.train for i in seq], minlength=split.num_items + 1).astype(float)
    scores = torch.tensor(counts).repeat(split.num_users, 1)
    scores[:, 0] = -np.inf
    for u in range(split.num_users):
        scores[u, split.train[u] + [split.val[u]]] = -np.inf
    return metrics_from_ranks(label_ranks(scores, torch.tensor(split.test)), [1, 10])


# BERT4Rec's cloze task learns the two-cycle rule far more slowly: it gets the one-cycle (first-order) rule.
@pytest.mark.parametrize(
    "name, num_cycles, min_recall", [("lru", 2, 0.8), ("sasrec", 2, 0.8), ("narm", 2, 0.8), ("bert4rec", 1, 0.4)]
)
def test_a_retriever_trained_by_the_run_code_learns_a_planted_rule(name, num_cycles, min_recall, tmp_path):
    """An optimizer that updates nothing, a wrong loss target, or a scan that reads the future during training all
    leave the test metrics near popularity's."""
    torch.manual_seed(0)
    split = planted_split(num_cycles)
    spec = default_config(
        RetrieverSpec, model=name, max_len=LENGTH, hidden_units=32, num_blocks=1, dropout=0.0, attn_dropout=0.0
    )
    model = build_retriever(spec, split.num_items)
    training = default_config(  # the defaults of datasets without their own: plain cross-entropy, original windows
        RetrieverTraining,
        "beauty",
        batch_size=16,
        lr=5e-3,
        max_steps=300,
        max_len=LENGTH,
        val_iterations=100,
        val_batch_size=64,
        metric_ks=(1, 10),
    )
    state = train(model, split, training, tmp_path, torch.device("cpu"))
    assert state["step"] == 300
    model.load_state_dict(torch.load(tmp_path / "checkpoint_best.pt", weights_only=True)["model"])
    learned, _ = evaluate(model, eval_data(split, "test", LENGTH), 64, [1, 10], torch.device("cpu"))
    popular = popularity_test_metrics(split)
    assert popular["Recall@1"] < 0.2 and popular["NDCG@10"] < 0.3
    assert learned["Recall@1"] > min_recall, (learned, popular)
    assert learned["NDCG@10"] > popular["NDCG@10"] + 0.4, (learned, popular)


def ranker_step(micro_batch: int, accumulation: int, llm_tokenizer, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    """One optimizer step of train_ranker.py's Trainer on the same two prompts: (its first log, the LoRA weights)."""
    from model.llm import LoraSettings, add_lora
    from trainer.ranker_train import RankerTraining, ranker_trainer
    from trainer.verbalizer import letter_token_ids

    builder = PromptBuilder(
        llm_tokenizer, [""] + [f"Film {i}" for i in range(1, 41)], default_config(PromptConfig, max_history=3)
    )
    letters = letter_token_ids(builder, 20)
    letter_ids = torch.tensor(list(letters.values()))
    train = [list(range(1, 12)), list(range(12, 20))]
    pairs = training_prefixes(train, None, 0)[:2]
    prompts = TrainPrompts(builder, train, 40, pairs, 19, letter_ids.tolist(), llm_tokenizer.eos_token_id, seed=0)
    val = [EvalExample(0, [1, 2], list(range(21, 41)), 0, 0, builder.encode([1, 2], list(range(21, 41))), [0.0] * 20)]
    torch.manual_seed(0)
    model = add_lora(tiny_llama(), default_config(LoraSettings, dropout=0.0), quantized=False)
    training = default_config(
        RankerTraining,
        micro_batch_size=micro_batch, gradient_accumulation_steps=accumulation, max_steps=1, lr=1e-2, warmup_steps=0,
        val_iterations=1,
    )  # fmt: skip
    trainer = ranker_trainer(model, training, prompts, val, letter_ids, llm_tokenizer, 1, torch.device("cpu"), tmp_path)
    trainer.train()
    first_log = next(record for record in trainer.state.log_history if "grad_norm" in record)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return first_log, weights


def test_accumulation_gives_the_update_of_one_larger_batch(tokenizer, tmp_path):  # noqa: F811
    """Micro-batch 1 x accumulation 2 and micro-batch 2 x accumulation 1 see the same two prompts: the same loss, the
    same (pre-clipping) gradient norm and the same LoRA update; a loss not scaled for accumulation doubles both."""
    accumulated, weights_accumulated = ranker_step(1, 2, tokenizer, tmp_path / "a")
    whole, weights_whole = ranker_step(2, 1, tokenizer, tmp_path / "b")
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    assert weights_accumulated.keys() == weights_whole.keys() and len(weights_whole) > 0
    for name, value in weights_whole.items():
        torch.testing.assert_close(weights_accumulated[name], value, rtol=1e-4, atol=1e-6)
