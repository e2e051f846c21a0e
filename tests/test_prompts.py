"""Prompt text, truncation, letter tokens, training/eval examples and collation (real Llama-2 tokenizer)."""

import numpy as np
import pytest
import torch

from config import default_config
from dataloader.prompts import PromptBuilder, PromptConfig, candidate_letters
from dataloader.ranker_data import (
    TrainCollator,
    TrainPrompts,
    eval_examples,
    left_pad,
    retrieved_training_lists,
    sample_negatives,
    training_prefixes,
)
from datasets import SplitData
from trainer.verbalizer import check_training_target, letter_token_ids
from utils.errors import InputError


@pytest.fixture(scope="module")
def llama2_bos(llama2_tokenizer_path):
    """The Llama-2 tokenizer as Llama-2-7b-hf configures it (adds BOS; the bare .model file does not)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama2_tokenizer_path), add_bos_token=True)


def small_split(num_items: int = 50) -> SplitData:
    titles = [""] + [f"Movie {i} (19{i % 100:02d})" for i in range(1, num_items + 1)]
    return SplitData(
        name="small",
        train=[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]],
        val=[21, 22, 23],
        test=[31, 32, 33],
        titles=titles,
        user_raw_ids=["u1", "u2", "u3"],
        item_raw_ids=[""] + [f"m{i}" for i in range(1, num_items + 1)],
        fingerprint="0" * 64,
    )


GOLDEN = (
    "### Instruction:\n"
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
    "\n\n### Input:\n"
    "User history: (1) Toy Story (1995) \n (2) Heat (1995); \n"
    " Candidate pool: (A) Casino (1995) \n (B) Jumanji (1995) \n (C) Heat (1995)"
    "\n\n### Response:\n"
)


def test_golden_prompt_text(llama2_bos):
    titles = ["", "Toy Story (1995)", "Jumanji (1995)", "Heat (1995)", "Casino (1995)"]
    builder = PromptBuilder(llama2_bos, titles, default_config(PromptConfig))
    assert builder.text([1, 3], [4, 2, 3]) == GOLDEN
    ids = builder.encode([1, 3], [4, 2, 3])
    assert ids == llama2_bos(GOLDEN).input_ids  # exactly the whole-text tokenisation
    assert ids[0] == llama2_bos.bos_token_id


def test_history_keeps_the_last_items(llama2_bos):
    split = small_split()
    builder = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig, max_history=3))
    text = builder.text([1, 2, 3, 4, 5], [6])
    assert "(1) Movie 3 (1903) \n (2) Movie 4 (1904) \n (3) Movie 5 (1905);" in text
    assert "Movie 1 " not in text and "Movie 2 " not in text


def test_title_truncation(llama2_bos):
    long_title = "The " + " ".join(["Extraordinarily"] * 40) + " Movie (1999)"
    builder = PromptBuilder(llama2_bos, ["", long_title, "Short (2000)"], default_config(PromptConfig, max_title_len=8))
    cut = builder.title(1)
    assert long_title.startswith(cut) and len(cut) < len(long_title)
    assert len(llama2_bos(cut, add_special_tokens=False).input_ids) <= 8
    assert builder.title(2) == "Short (2000)"


def test_prompt_cut_from_the_left_keeps_bos_and_the_end(llama2_bos):
    split = small_split()
    builder = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig, max_text_len=60))
    full = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig)).encode(
        list(range(1, 21)), list(range(21, 41))
    )
    ids = builder.encode(list(range(1, 21)), list(range(21, 41)))
    assert len(full) > 60 and len(ids) == 60
    assert ids[0] == llama2_bos.bos_token_id
    assert ids[1:] == full[-59:]
    assert llama2_bos.decode(ids).endswith("(T) Movie 40 (1940)\n\n### Response:\n")


def test_letter_token_ids_are_the_in_context_tokens(llama2_bos):
    builder = PromptBuilder(llama2_bos, small_split().titles, default_config(PromptConfig))
    letters = letter_token_ids(builder, 20)
    assert list(letters) == candidate_letters(20)
    assert letters["A"] == 29909 and letters["B"] == 29933
    # the original's verbalizer token: '▁A', never trained after "### Response:\n"
    assert llama2_bos.encode("A", add_special_tokens=False) == [319]
    assert llama2_bos.convert_ids_to_tokens(letters["T"]) == "T"


@pytest.mark.parametrize("template", ["only {}", "{} {} {}", "{0} and {1}", "{x} {}", "{} {} {"])
def test_input_template_needs_exactly_two_empty_fields(llama2_bos, template):
    with pytest.raises(InputError, match="--llm_input_template: expected exactly two"):
        PromptBuilder(llama2_bos, ["", "t"], default_config(PromptConfig, input_template=template))


def test_too_many_candidates_is_an_input_error():
    with pytest.raises(InputError, match="llm_negative_sample_size"):
        candidate_letters(27)


def test_sample_negatives_distinct_and_unseen():
    rng = np.random.default_rng(0)
    for _ in range(50):
        negatives = sample_negatives(rng, 40, exclude={1, 2, 3, 4, 5}, count=19)
        assert len(set(negatives)) == 19
        assert not set(negatives) & {1, 2, 3, 4, 5}
        assert all(1 <= i <= 40 for i in negatives)
    with pytest.raises(InputError):
        sample_negatives(rng, 10, exclude={1, 2, 3}, count=8)


def test_training_prefixes_every_prefix_and_seeded_cap():
    train = [[1, 2, 3], [4, 5], [6]]
    assert training_prefixes(train, None, 0).tolist() == [[0, 1], [0, 2], [1, 1]]
    capped = training_prefixes([list(range(1, 30))] * 4, 10, seed=3).tolist()
    assert len(capped) == 10 and capped == training_prefixes([list(range(1, 30))] * 4, 10, seed=3).tolist()
    assert capped == sorted(capped) and len({tuple(p) for p in capped}) == 10  # (user, length) order, distinct


def test_training_example_and_target(llama2_bos):
    split = small_split()
    builder = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig))
    letters = letter_token_ids(builder, 20)
    eos = llama2_bos.eos_token_id
    pairs = training_prefixes(split.train, None, 0)
    dataset = TrainPrompts(builder, split.train, split.num_items, pairs, 19, list(letters.values()), eos, seed=1)
    for index, (user, length) in enumerate(pairs):
        history, candidates, label = dataset.example(index)
        assert history == split.train[user][:length]
        assert candidates[label] == split.train[user][length]
        assert len(set(candidates)) == 20 and not set(candidates) & set(history)
        item = dataset[index]
        assert item["targets"] == [letters[chr(ord("A") + label)], eos]
    assert dataset.example(2) == dataset.example(2)  # deterministic per (seed, user, prefix)
    check_training_target(dataset, letters)


def test_eval_examples_subset_history_and_order(llama2_bos):
    split = small_split()
    builder = PromptBuilder(llama2_bos, split.titles, default_config(PromptConfig))
    items = np.array([[21, *range(24, 43)], [*range(24, 43), 22], [*range(24, 44)]], dtype=np.int32)
    scores = -np.arange(20, dtype=np.float32)[None].repeat(3, 0)
    part = {"users": np.array([0, 1, 2]), "items": items, "labels": np.array([21, 22, 23]), "scores": scores}
    val = eval_examples(builder, split, part, "val", 20, shuffle=False, seed=0)
    assert [e.user for e in val] == [0, 1]  # user 2's true item is not retrieved
    assert val[0].label == 0 and val[1].label == 19 and val[1].retriever_rank == 19
    assert val[0].history == split.train[0] and val[0].candidates == items[0].tolist()
    test_part = {**part, "labels": np.array([21, 22, 23])}
    test = eval_examples(builder, split, test_part, "test", 20, shuffle=False, seed=0)
    assert test[0].history == split.train[0] + [split.val[0]]
    shuffled = eval_examples(builder, split, part, "val", 20, shuffle=True, seed=0)
    assert sorted(shuffled[1].candidates) == sorted(items[1].tolist())
    assert shuffled[1].candidates[shuffled[1].label] == 22 and shuffled[1].retriever_rank == 19
    with pytest.raises(InputError, match="at least 20 candidates"):
        eval_examples(builder, split, {**part, "items": items[:, :10]}, "val", 20, shuffle=False, seed=0)
    # a user with fewer than 20 items outside the history: the retriever's masked (-inf) items are not candidates
    masked = scores.copy()
    masked[2, 19] = -np.inf
    with pytest.raises(InputError, match="1 val users have fewer than 20 items outside"):
        eval_examples(builder, split, {**part, "scores": masked}, "val", 20, shuffle=False, seed=0)


def test_left_padding_and_collation():
    batch = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    collated = TrainCollator(pad_id=0)(
        [{"prompt_ids": [1, 5, 6], "targets": [29909, 2]}, {"prompt_ids": [1, 7], "targets": [29933, 2]}]
    )
    # the letter is the last input; EOS is only a target
    assert collated["input_ids"].tolist() == [[1, 5, 6, 29909], [0, 1, 7, 29933]]
    assert collated["targets"].tolist() == [[29909, 2], [29933, 2]]
    assert collated["targets"].dtype == torch.long


def retrieved_part() -> dict[str, np.ndarray]:
    """Training-prefix candidates of 3 prefixes, 5 retrieved each (ids 1..30); the retriever missed prefix 1's."""
    return {
        "users": np.array([0, 0, 1]),
        "lengths": np.array([1, 2, 1], dtype=np.int32),
        "items": np.array([[7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 0]], dtype=np.int32),
        "labels": np.array([9, 29, 18], dtype=np.int32),
        "label_ranks": np.array([2, 40, 1]),
    }


def test_retrieved_training_lists_drop_or_insert_the_missed_next_item():
    part = retrieved_part()
    pairs, lists = retrieved_training_lists(part, 4, "drop", None, seed=0)
    # prefix 1 missed (rank 40) is dropped; prefix 2's top 4 are all real items (the 0 is 5th)
    assert pairs.tolist() == [[0, 1], [1, 1]] and lists.tolist() == [[7, 8, 9, 10], [17, 18, 19, 20]]
    pairs, lists = retrieved_training_lists(part, 5, "drop", None, seed=0)
    assert pairs.tolist() == [[0, 1]]  # prefix 2 has only 4 items outside its history
    pairs, lists = retrieved_training_lists(part, 4, "insert", None, seed=0)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 1]]
    inserted = lists[1].tolist()
    assert 29 in inserted and [i for i in inserted if i != 29] == [12, 13, 14]  # retriever order kept around it
    assert (
        retrieved_training_lists(part, 4, "insert", 2, seed=0)[0].tolist()
        == retrieved_training_lists(part, 4, "insert", 2, seed=0)[0].tolist()
    )
    assert len(retrieved_training_lists(part, 4, "insert", 2, seed=0)[0]) == 2
    with pytest.raises(InputError, match="--retrieved_train_topk 6"):
        retrieved_training_lists(part, 6, "drop", None, seed=0)


def test_training_example_with_retrieved_candidates_keeps_retriever_order():
    train = [[5, 9, 29], [6, 18]]
    pairs, lists = retrieved_training_lists(retrieved_part(), 4, "insert", None, seed=0)
    dataset = TrainPrompts(None, train, 30, pairs, 3, list(range(100, 104)), 2, seed=0, lists=lists, shuffle=False)
    history, candidates, label = dataset.example(0)
    assert history == [5] and candidates == [7, 8, 9, 10] and label == 2  # letter C: the retriever's third
    assert dataset.example(2) == ([6], [17, 18, 19, 20], 1)
    shuffled = TrainPrompts(None, train, 30, pairs, 3, list(range(100, 104)), 2, seed=0, lists=lists, shuffle=True)
    orders = [shuffled.example(k)[1] for k in range(3)]
    assert any(o != lists[k].tolist() for k, o in enumerate(orders))
    assert all(sorted(o) == sorted(lists[k].tolist()) for k, o in enumerate(orders))
    assert all(
        o[shuffled.example(k)[2]] == train[u][n] for k, (o, (u, n)) in enumerate(zip(orders, pairs, strict=True))
    )
