"""Scoring with a retriever: full-ranking evaluation of validation/test users (history and padding masked, at
validation and at test alike: the original masked only at test, so its model selection optimised another metric
than the one it reported), and the masked top-k of every training prefix."""

import math

import numpy as np
import torch

from dataloader.retriever_data import EvalData
from model.layers import NextItemModel
from trainer.metrics import label_ranks, metrics_from_ranks


@torch.no_grad()
def evaluate(
    model: NextItemModel, data: EvalData, batch_size: int, ks: list[int], device: torch.device, topk: int = 0
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Full-ranking metrics (means over users) and, with topk > 0, each user's top-k items and scores.

    Scores exist for one batch of users at a time: memory is O(batch x items + users x topk).
    """
    model.eval()
    ranks, top_items, top_scores = [], [], []
    for start in range(0, data.num_users, batch_size):
        end = min(start + batch_size, data.num_users)
        scores = model(data.tokens[start:end].to(device))
        rows, items = data.history_mask_index(start, end)
        scores[rows.to(device), items.to(device)] = -math.inf
        scores[:, 0] = -math.inf  # padding id
        ranks.append(label_ranks(scores, data.labels[start:end].to(device)).cpu())
        if topk:
            values, indices = scores.topk(topk, dim=1)
            top_items.append(indices.cpu())
            top_scores.append(values.cpu())
    ranks = torch.cat(ranks)
    arrays = {"labels": data.labels.numpy(), "label_ranks": ranks.numpy(), "users": np.arange(data.num_users)}
    if topk:
        arrays["items"] = torch.cat(top_items).numpy()
        arrays["scores"] = torch.cat(top_scores).numpy()
    return metrics_from_ranks(ranks, ks), arrays


@torch.no_grad()
def train_prefix_candidates(
    model: NextItemModel, train: list[list[int]], max_len: int, topk: int, batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """The retriever's masked top-k for every training prefix train[u][:L], 1 <= L < len(train[u]).

    Each prefix is scored exactly as evaluation scores a history: the model reads its last max_len items and
    the prefix's items are masked out. Returns users, lengths (L; the label is train[u][L]), items [P, k] in
    retriever order (0 where fewer than k items lie outside the prefix), labels and label_ranks (0-based rank of
    the label in the full masked ranking), in (user, L) order.
    """
    model.eval()
    users, lengths, windows = prefix_windows(train, max_len, model.causal)
    hidden = prefix_states(model, windows, len(users), batch_size, device)
    return masked_prefix_top_k(
        model, hidden, train, torch.tensor(users, dtype=torch.long), torch.tensor(lengths, dtype=torch.long),
        topk, batch_size, device,
    )  # fmt: skip


def prefix_windows(
    train: list[list[int]], max_len: int, causal: bool
) -> tuple[list[int], list[int], list[tuple[list[int], int, int]]]:
    """(users, lengths) of every prefix, and the windows whose forward passes give their states: (item ids, first
    prefix row, number of prefix rows it serves). With a causal model, one pass of a user's first max_len items
    serves every prefix that fits in it (later positions never change earlier ones); each longer prefix needs its
    own window. A bidirectional model needs one pass per prefix (count 0: the window's next_hidden)."""
    users, lengths, windows = [], [], []
    for user, seq in enumerate(train):
        for length in range(1, len(seq)):
            users.append(user)
            lengths.append(length)
        if len(seq) < 2:
            continue
        first = len(users) - (len(seq) - 1)
        if not causal:
            windows += [(seq[max(0, n - max_len) : n], first + n - 1, 0) for n in range(1, len(seq))]
            continue
        head = seq[: min(len(seq) - 1, max_len)]
        windows.append((head, first, len(head)))  # prefixes 1..len(head): every position of the head
        for length in range(max_len + 1, len(seq)):
            windows.append((seq[length - max_len : length], first + length - 1, 1))  # only its last position
    return users, lengths, windows


def prefix_states(
    model: NextItemModel, windows: list, num_prefixes: int, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The hidden state [P, d] that predicts each prefix's next item, from the windows of prefix_windows."""
    hidden = torch.empty(num_prefixes, model.token.embedding_dim)
    order = sorted(range(len(windows)), key=lambda k: len(windows[k][0]))  # similar widths batch together
    for start in range(0, len(order), batch_size):
        batch = [windows[k] for k in order[start : start + batch_size]]
        width = max(len(items) for items, _, _ in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (items, _, _) in enumerate(batch):
            tokens[row, width - len(items) :] = torch.tensor(items)
        if not model.causal:  # BERT4Rec: history + mask token
            hidden[[first for _, first, _ in batch]] = model.next_hidden(tokens.to(device)).cpu()
            continue
        states = model.encode(tokens.to(device)).cpu()
        for row, (_, first, count) in enumerate(batch):
            hidden[first : first + count] = states[row, width - count :]
    return hidden


def masked_prefix_top_k(
    model: NextItemModel,
    hidden: torch.Tensor,
    train: list[list[int]],
    users: torch.Tensor,
    lengths: torch.Tensor,
    topk: int,
    chunk: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Score every prefix's state over all items, mask the prefix's own items and padding; keep the top-k."""
    # first_position[u][i] = index of item i in train[u] (repeats are dropped by preprocessing): item i is in
    # prefix L iff its index is < L. Built per chunk of users, so memory stays O(chunk x items).
    top_items, labels, ranks = [], [], []
    num_columns = model.token.num_embeddings
    chunk = max(1, chunk)
    for start in range(0, len(users), chunk):
        rows = slice(start, min(start + chunk, len(users)))
        chunk_users, chunk_lengths = users[rows], lengths[rows]
        present = torch.unique(chunk_users)
        first_position = torch.full((len(present), num_columns), torch.iinfo(torch.long).max, dtype=torch.long)
        for k, user in enumerate(present.tolist()):
            first_position[k, torch.tensor(train[user])] = torch.arange(len(train[user]))
        local = torch.searchsorted(present, chunk_users)
        scores = model.score(hidden[rows].to(device)).cpu()
        scores[first_position[local] < chunk_lengths[:, None]] = -math.inf
        scores[:, 0] = -math.inf  # padding id
        chunk_labels = torch.tensor(
            [train[u][n] for u, n in zip(chunk_users.tolist(), chunk_lengths.tolist(), strict=True)]
        )
        ranks.append(label_ranks(scores, chunk_labels))
        labels.append(chunk_labels)
        values, indices = scores.topk(topk, dim=1)
        top_items.append(indices.masked_fill(values == -math.inf, 0))  # 0: fewer than k items outside the prefix
    empty = torch.zeros(0, dtype=torch.long)
    return {
        "users": users.numpy(),
        "lengths": lengths.numpy(),
        "items": (torch.cat(top_items) if top_items else torch.zeros(0, topk, dtype=torch.long)).numpy(),
        "labels": (torch.cat(labels) if labels else empty).numpy(),
        "label_ranks": (torch.cat(ranks) if ranks else empty).numpy(),
    }
