"""The retriever's data: left-padded training windows over each user's training sequence, shuffled batches of
them, and the evaluation inputs (history, label, the history items to mask)."""

import itertools

import numpy as np
import torch

from datasets.split import SplitData


def training_windows(
    train: list[list[int]], max_len: int, sliding_step: int, all_items: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (tokens, labels) [N, max_len] training examples.

    all_items=False is the original LRURec dataloader: a sequence shorter than max_len + sliding_step is
    one example (labels = its last max_len items, tokens = the items before each label, padding before the
    first item, so the first item is predicted from an empty history). Longer sequences are cut into windows
    of max_len items ending at the last item, stepping back by sliding_step; a window's first item is
    predicted from padding and a leftover head shorter than a window is never a label.

    all_items=True makes every training item a label exactly once: windows end at the last item and step
    back by sliding_step until the sequence start is covered; labels already used by a later window are
    masked (0), and every label is predicted from the items actually before it (only the sequence's own
    first item is predicted from padding).
    """
    # Each example as (user, context start, context end, label start, label end, first masked label position):
    # index ranges into the user's sequence, so no per-example list is held (memory O(examples x max_len) once).
    spans = []
    for user, seq in enumerate(train):
        n = len(seq)
        if all_items:
            label_end = n  # items at index >= label_end are labels of a later window
            for end in range(n, 0, -sliding_step):
                start = max(0, end - max_len)
                spans.append((user, max(0, start - 1), end - 1, start, end, label_end))
                label_end = start
                if start == 0:
                    break
        elif n < max_len + sliding_step:
            spans.append((user, max(0, n - 1 - max_len), n - 1, max(0, n - max_len), n, n))
        else:
            for start in range(n - max_len, -1, -sliding_step):
                spans.append((user, start, start + max_len - 1, start, start + max_len, n))
    tokens = np.zeros((len(spans), max_len), dtype=np.int64)
    labels = np.zeros((len(spans), max_len), dtype=np.int64)
    sequences: dict[int, np.ndarray] = {}
    for row, (user, context_start, context_end, label_start, label_end, masked_from) in enumerate(spans):
        seq = sequences.get(user)
        if seq is None:
            sequences.clear()  # spans come user by user: keep one user's array
            seq = sequences[user] = np.asarray(train[user], dtype=np.int64)
        if context_end > context_start:
            tokens[row, max_len - (context_end - context_start) :] = seq[context_start:context_end]
        width = label_end - label_start
        labels[row, max_len - width :] = seq[label_start:label_end]
        if masked_from < label_end:
            labels[row, max_len - (label_end - masked_from) :] = 0
    return torch.from_numpy(tokens), torch.from_numpy(labels)


def window_step(sliding_window_size: float, max_len: int) -> int:
    """--sliding_window_size (a fraction of max_len) as the number of items consecutive windows step back by."""
    return max(1, int(sliding_window_size * max_len))


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so resuming mid-epoch is exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(num_examples, generator=generator).split(batch_size))


def all_prefixes(train: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(users, lengths) of every training prefix train[u][:L], 1 <= L < len(train[u]), in (user, L) order."""
    counts = np.maximum(np.array([len(seq) for seq in train], dtype=np.int64) - 1, 0)
    users = np.repeat(np.arange(len(train), dtype=np.int64), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return users, np.arange(len(users), dtype=np.int64) - starts + 1


def sample_prefixes(train: list[list[int]], max_prefixes: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(users, lengths, total): every training prefix, or a seeded uniform sample of max_prefixes of them when there
    are more (max_prefixes 0: no cap), in (user, L) order; total = how many prefixes the data has."""
    users, lengths = all_prefixes(train)
    total = len(users)
    if 0 < max_prefixes < total:
        keep = np.sort(np.random.default_rng((seed, 7)).choice(total, size=max_prefixes, replace=False))
        users, lengths = users[keep], lengths[keep]
    return users, lengths, total


class EvalData:
    """Inputs of one evaluation split: left-padded last max_len history items, labels, masked history (CSR), and the
    dataset's user index of each row (`users`: default 0..N-1)."""

    def __init__(self, histories: list[list[int]], labels: list[int], max_len: int, users: np.ndarray | None = None):
        self.num_users = len(histories)
        self.users = np.arange(self.num_users) if users is None else np.asarray(users, dtype=np.int64)
        lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=self.num_users)
        flat = np.fromiter(itertools.chain.from_iterable(histories), dtype=np.int64, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.zeros((self.num_users, max_len), dtype=np.int64)
        for u in range(self.num_users):
            tail = flat[max(offsets[u], offsets[u + 1] - max_len) : offsets[u + 1]]
            if len(tail):
                tokens[u, max_len - len(tail) :] = tail
        self.tokens = torch.from_numpy(tokens)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.offsets = torch.from_numpy(offsets)
        self.history_items = torch.from_numpy(flat)

    def history_mask_index(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) index pairs of the full histories of users start..end-1, rows relative to start."""
        lengths = self.offsets[start + 1 : end + 1] - self.offsets[start:end]
        rows = torch.repeat_interleave(torch.arange(end - start), lengths)
        return rows, self.history_items[self.offsets[start] : self.offsets[end]]


def eval_data(split: SplitData, mode: str, max_len: int) -> EvalData:
    """The validation (history: train) or test (history: train + val) inputs of the users that have a held-out item."""
    users = split.eval_users()
    if mode == "val":
        return EvalData([split.train[u] for u in users], [split.val[u] for u in users], max_len, users)
    histories = [split.train[u] + [split.val[u]] for u in users]
    return EvalData(histories, [split.test[u] for u in users], max_len, users)
