"""The retriever's data: left-padded training windows over each user's training sequence, shuffled batches of
them, and the evaluation inputs (history, label, the history items to mask)."""

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
    examples = []
    for seq in train:
        if all_items:
            label_end = len(seq)  # items at index >= label_end are labels of a later window
            for end in range(len(seq), 0, -sliding_step):
                start = max(0, end - max_len)
                context = seq[max(0, start - 1) : end - 1]
                targets = [item if start + i < label_end else 0 for i, item in enumerate(seq[start:end])]
                examples.append((context, targets))
                label_end = start
                if start == 0:
                    break
        elif len(seq) < max_len + sliding_step:
            examples.append((seq[:-1][-max_len:], seq[-max_len:]))
        else:
            for start in range(len(seq) - max_len, -1, -sliding_step):
                window = seq[start : start + max_len]
                examples.append((window[:-1], window))
    tokens = torch.zeros(len(examples), max_len, dtype=torch.long)
    labels = torch.zeros(len(examples), max_len, dtype=torch.long)
    for row, (context, targets) in enumerate(examples):
        if context:
            tokens[row, -len(context) :] = torch.tensor(context)
        labels[row, -len(targets) :] = torch.tensor(targets)
    return tokens, labels


def window_step(sliding_window_size: float, max_len: int) -> int:
    """--sliding_window_size (a fraction of max_len) as the number of items consecutive windows step back by."""
    return max(1, int(sliding_window_size * max_len))


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so resuming mid-epoch is exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(num_examples, generator=generator).split(batch_size))


class EvalData:
    """Inputs of one evaluation split: left-padded last max_len history items, labels, masked history (CSR)."""

    def __init__(self, histories: list[list[int]], labels: list[int], max_len: int):
        self.num_users = len(histories)
        self.tokens = torch.zeros(self.num_users, max_len, dtype=torch.long)
        for u, hist in enumerate(histories):
            tail = hist[-max_len:]
            if tail:
                self.tokens[u, -len(tail) :] = torch.tensor(tail)
        self.labels = torch.tensor(labels, dtype=torch.long)
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.history_items = torch.tensor([i for h in histories for i in h], dtype=torch.long)

    def history_mask_index(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) index pairs of the full histories of users start..end-1, rows relative to start."""
        lengths = self.offsets[start + 1 : end + 1] - self.offsets[start:end]
        rows = torch.repeat_interleave(torch.arange(end - start), lengths)
        return rows, self.history_items[self.offsets[start] : self.offsets[end]]


def eval_data(split: SplitData, mode: str, max_len: int) -> EvalData:
    if mode == "val":
        return EvalData(split.train, split.val, max_len)
    return EvalData([seq + [v] for seq, v in zip(split.train, split.val, strict=True)], split.test, max_len)
