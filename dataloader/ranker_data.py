"""Ranker examples: training prompts (every prefix + sampled negatives) and val/test prompts (retrieved
candidates), with left-padding collation so every prompt ends at the last position."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from dataloader.candidates import Candidates
from dataloader.prompts import PromptBuilder, candidate_letters
from dataloader.retriever_data import all_prefixes
from datasets.split import SplitData
from utils.errors import InputError
from utils.progress import progress
from utils.settings import flag_field


def sample_negatives(rng: np.random.Generator, num_items: int, exclude: set[int], count: int) -> list[int]:
    """`count` distinct items from 1..num_items, none in `exclude` (uniform, without replacement).

    The original sampled with replacement, so ~5% of its ML-100k prompts listed an item twice.
    """
    if num_items - len(exclude) < count:
        raise InputError(
            f"--llm_negative_sample_size: expected at most {num_items - len(exclude)} negatives for a user "
            f"who has seen {len(exclude)} of {num_items} items, found {count}"
        )
    chosen: list[int] = []
    seen = set(exclude)
    while len(chosen) < count:
        for item in rng.integers(1, num_items + 1, size=2 * count).tolist():
            if item not in seen:
                seen.add(item)
                chosen.append(item)
                if len(chosen) == count:
                    break
    return chosen


def training_prefixes(train: Sequence[Sequence[int]], max_samples: int | None, seed: int) -> np.ndarray:
    """(user, prefix length) rows [P, 2] for every prefix of every training sequence, or a seeded random subset,
    in (user, length) order. An array, not a list of pairs: an every-prefix epoch of ML-20M has 20M of them."""
    users, lengths = all_prefixes(train)
    if max_samples is not None and max_samples < len(users):
        if max_samples < 1:
            raise InputError(f"--llm_max_train_samples: expected >= 1, found {max_samples}")
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(users), size=max_samples, replace=False))
        users, lengths = users[keep], lengths[keep]
    return np.stack([users, lengths], axis=1)


def retrieved_training_lists(
    part: dict[str, np.ndarray], num_candidates: int, missed: str, max_samples: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(user, prefix length) rows [P, 2] and their candidate lists [P, num_candidates] from the retriever's
    training-prefix candidates, in retriever order, the true item always among them.

    missed="drop" keeps only the prefixes whose true item the retriever put in its top num_candidates (as the
    val/test subset, which holds only such users); "insert" also keeps the others, with the true item put at a
    seeded uniform position in place of the last candidate. A seeded random subset of max_samples follows.
    """
    items = part["items"]
    if items.shape[1] < num_candidates:
        raise InputError(
            f"--llm_train_candidates retrieved: expected at least {num_candidates} training candidates per prefix "
            f"(--llm_negative_sample_size + 1), found {items.shape[1]}; re-run train_retriever.py with "
            f"--retrieved_train_topk {num_candidates}"
        )
    lists = items[:, :num_candidates].astype(np.int64)
    hit = part["label_ranks"] < num_candidates
    complete = (lists > 0).all(axis=1)  # 0 = fewer items than candidates outside the prefix
    keep = np.flatnonzero(complete & (hit if missed == "drop" else True))
    if max_samples is not None and max_samples < len(keep):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(keep, size=max_samples, replace=False))
    lists = lists[keep].copy()
    rng = np.random.default_rng((seed, 2))
    for row in np.flatnonzero(~hit[keep]):  # only with missed="insert"
        position = int(rng.integers(num_candidates))
        rest = lists[row, : num_candidates - 1].tolist()
        lists[row] = rest[:position] + [int(part["labels"][keep[row]])] + rest[position:]
    pairs = np.stack([part["users"][keep], part["lengths"][keep]], axis=1).astype(np.int64)
    return pairs, lists


class TrainPrompts(Dataset):
    """One training prompt per (user, prefix): the next item among candidates; target = its letter.

    Candidates: with `lists` None, the next item plus uniformly sampled negatives, shuffled (the paper); else
    the given list of that prefix (retrieved, retriever order), shuffled only with `shuffle`. Negatives and
    order come from a generator seeded by (seed, user, prefix length), so an example is the same whichever
    subset or order it is drawn in, and nothing is kept in memory per example.
    """

    def __init__(
        self,
        builder: PromptBuilder,
        train: Sequence[Sequence[int]],
        num_items: int,
        pairs: np.ndarray,
        num_negatives: int,
        letter_ids: Sequence[int],
        eos_id: int,
        seed: int,
        lists: np.ndarray | None = None,
        shuffle: bool = True,
    ) -> None:
        if lists is not None and len(lists) != len(pairs):
            raise ValueError(f"TrainPrompts: {len(lists)} candidate lists for {len(pairs)} prefixes")
        self.lists = lists
        self.shuffle = shuffle
        self.builder = builder
        self.train = train
        self.num_items = num_items
        self.pairs = pairs
        self.num_negatives = num_negatives
        self.letter_ids = list(letter_ids)
        self.eos_id = eos_id
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def example(self, index: int) -> tuple[list[int], list[int], int]:
        """(history, candidates, index of the true item among the candidates)."""
        user, length = (int(v) for v in self.pairs[index])
        history = list(self.train[user][:length])
        target = self.train[user][length]
        rng = np.random.default_rng((self.seed, user, length))
        if self.lists is None:
            candidates = [target] + sample_negatives(rng, self.num_items, set(history) | {target}, self.num_negatives)
        else:
            candidates = self.lists[index].tolist()
        if self.lists is None or self.shuffle:
            candidates = [candidates[k] for k in rng.permutation(len(candidates)).tolist()]
        return history, candidates, candidates.index(target)

    def __getitem__(self, index: int) -> dict:
        history, candidates, label = self.example(index)
        prompt_ids = self.builder.encode(history, candidates)
        # Trained tokens: the answer letter (predicted at the last prompt position) and EOS (after it).
        return {"prompt_ids": prompt_ids, "targets": [self.letter_ids[label], self.eos_id]}


@dataclass
class EvalExample:
    user: int  # user index (SplitData order)
    history: list[int]
    candidates: list[int]  # as shown to the LLM (retriever order unless shuffled)
    label: int  # index of the true item in `candidates`
    retriever_rank: int  # 0-based rank of the true item in the retriever's own order
    input_ids: Sequence[int]  # the prompt's token ids (an int32 array from eval_examples)
    retriever_scores: list[float]  # the retriever's score of each of `candidates` (same order)


def eval_examples(
    builder: PromptBuilder,
    split: SplitData,
    part: dict[str, np.ndarray],
    which: str,
    num_candidates: int,
    shuffle: bool,
    seed: int,
) -> list[EvalExample]:
    """Prompts for the users whose true item is among the retriever's top `num_candidates`.

    Validation history = train[u]; test history = train[u] + [val[u]].
    """
    items = part["items"]
    if items.shape[1] < num_candidates:
        raise InputError(
            f"--llm_retrieved_path: expected at least {num_candidates} candidates per user "
            f"(--llm_negative_sample_size + 1), found {items.shape[1]}"
        )
    masked = np.isneginf(part["scores"][:, :num_candidates]).any(axis=1)
    if masked.any():
        raise InputError(
            f"--llm_retrieved_path: {int(masked.sum())} {which} users have fewer than {num_candidates} items outside "
            "their history, so their candidates would include masked (history or padding) items; lower "
            "--llm_negative_sample_size"
        )
    rng = np.random.default_rng((seed, 1 if which == "test" else 0))
    examples = []
    retrieved = np.flatnonzero((items[:, :num_candidates] == part["labels"][:, None]).any(axis=1))
    with progress(len(retrieved), f"{which} prompts", unit="prompt") as bar:
        for row in retrieved.tolist():
            examples.append(eval_example(builder, split, part, row, which, num_candidates, rng if shuffle else None))
            bar.update(1)
    return examples


def eval_example(
    builder: PromptBuilder,
    split: SplitData,
    part: dict[str, np.ndarray],
    row: int,
    which: str,
    num_candidates: int,
    rng: np.random.Generator | None,
) -> EvalExample:
    """The prompt of row `row` of the retriever's val/test candidates (whose true item is among them); `rng`
    shuffles the candidates."""
    user = int(part["users"][row])
    candidates = part["items"][row, :num_candidates].tolist()
    scores = part["scores"][row, :num_candidates].tolist()
    true_item = int(part["labels"][row])
    retriever_rank = candidates.index(true_item)
    if rng is not None:
        order = rng.permutation(num_candidates).tolist()
        candidates, scores = [candidates[k] for k in order], [scores[k] for k in order]
    history = list(split.train[user]) + ([split.val[user]] if which == "test" else [])
    return EvalExample(
        user=user,
        history=history,
        candidates=candidates,
        label=candidates.index(true_item),
        retriever_rank=retriever_rank,
        # int32: tens of thousands of ~700-token prompts stay small (Python ints take 9x the memory)
        input_ids=np.asarray(builder.encode(history, candidates), dtype=np.int32),
        retriever_scores=scores,
    )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to a rectangle; position ids count real tokens only, so padding shifts nothing."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


class TrainCollator:
    """Batch = prompt + answer letter (EOS is only a target: no position predicts anything after it)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [f["prompt_ids"] + f["targets"][:-1] for f in features]
        batch = left_pad(sequences, self.pad_id)
        batch["targets"] = torch.tensor([f["targets"] for f in features], dtype=torch.long)
        return batch


def eval_batches(examples: list[EvalExample], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar prompt length (longest first), so batches carry little padding."""
    order = sorted(range(len(examples)), key=lambda k: -len(examples[k].input_ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def true_letter(example: EvalExample) -> str:
    return candidate_letters(len(example.candidates))[example.label]


@dataclass(frozen=True)
class RankerData:
    """Which prompts a ranker run trains and is validated on (the ranker's data flags)."""

    seed: int
    num_negatives: int = flag_field("llm_negative_sample_size")  # candidates = this + 1
    max_train_samples: int | None = flag_field("llm_max_train_samples")
    max_eval_users: int | None = flag_field("llm_max_eval_users")  # validation users ranked during training
    shuffle_eval_candidates: bool = flag_field("llm_shuffle_eval_candidates")
    train_candidates: str = flag_field("llm_train_candidates")  # uniform (the paper) or retrieved
    train_missed: str = flag_field("llm_train_missed")  # retrieved: drop or insert the prefixes the retriever missed
    shuffle_train_candidates: bool = flag_field("llm_shuffle_train_candidates")

    @property
    def num_candidates(self) -> int:
        return self.num_negatives + 1


def build_eval_sets(
    builder: PromptBuilder, split: SplitData, candidates: Candidates, data: RankerData
) -> tuple[list[EvalExample], list[EvalExample]]:
    """(validation, test) prompts of the users whose true item was retrieved; validation capped at
    data.max_eval_users (a seeded subset)."""
    num, shuffle = data.num_candidates, data.shuffle_eval_candidates
    test_set = eval_examples(builder, split, candidates.test, "test", num, shuffle, data.seed)
    val_set = eval_examples(builder, split, candidates.val, "val", num, shuffle, data.seed)
    if data.max_eval_users is not None and data.max_eval_users < len(val_set):
        keep = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(data.seed))
        val_set = [val_set[k] for k in sorted(keep[: data.max_eval_users].tolist())]
    return val_set, test_set


def build_train_set(
    builder: PromptBuilder,
    split: SplitData,
    candidates: Candidates,
    data: RankerData,
    letter_ids: list[int],
    eos_id: int,
) -> TrainPrompts:
    """The training prompts of data.train_candidates (uniform negatives or retrieved lists), capped at
    data.max_train_samples."""
    lists = None
    if data.train_candidates == "retrieved":
        pairs, lists = retrieved_training_lists(
            candidates.require_train(), data.num_candidates, data.train_missed, data.max_train_samples, data.seed
        )
    else:
        pairs = training_prefixes(split.train, data.max_train_samples, data.seed)
    return TrainPrompts(
        builder,
        split.train,
        split.num_items,
        pairs,
        data.num_negatives,
        letter_ids,
        eos_id,
        data.seed,
        lists=lists,
        shuffle=data.shuffle_train_candidates,
    )
