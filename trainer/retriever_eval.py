"""Scoring with a retriever: full-ranking evaluation of validation/test users (the whole history and padding masked,
at validation and at test alike: the LlamaRec code masked only at test, so its model selection optimised another
metric than the one it reported; the LRURec code masks only the input window's items), and the masked top-k of every
training prefix."""

import math

import numpy as np
import torch

from dataloader.retriever_data import EvalData, all_prefixes
from model.interface import NextItemModel
from trainer.metrics import label_ranks, metrics_from_ranks
from utils.progress import progress


@torch.no_grad()
def evaluate(
    model: NextItemModel,
    data: EvalData,
    batch_size: int,
    ks: list[int],
    device: torch.device,
    topk: int = 0,
    desc: str = "evaluate",
    window_ranks: bool = False,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Full-ranking metrics (means over users) and, with topk > 0, each user's top-k items and scores. With
    window_ranks, arrays["window_label_ranks"] also holds each label's rank when only the items of the model's input
    window (the last max_len history items) and padding are masked: the LRURec and LlamaRec code's way, where older
    history items stay rankable (for comparing with their papers only).

    Scores exist for one batch of users at a time: memory is O(batch x items + users x topk).
    """
    model.eval()
    ranks, top_items, top_scores, windowed = [], [], [], []
    with progress(data.num_users, desc, unit="user") as bar:
        for start in range(0, data.num_users, batch_size):
            end = min(start + batch_size, data.num_users)
            tokens = data.tokens[start:end].to(device)
            scores = model(tokens)
            labels = data.labels[start:end].to(device)
            if window_ranks:
                window_masked = scores.scatter(1, tokens, -math.inf)  # column 0 (padding) included
                windowed.append(label_ranks(window_masked, labels).cpu())
            rows, items = data.history_mask_index(start, end)
            scores[rows.to(device), items.to(device)] = -math.inf
            scores[:, 0] = -math.inf  # padding id
            ranks.append(label_ranks(scores, labels).cpu())
            if topk:
                values, indices = scores.topk(topk, dim=1)
                top_items.append(indices.cpu())
                top_scores.append(values.cpu())
            bar.update(end - start)
    ranks = torch.cat(ranks)
    arrays = {"labels": data.labels.numpy(), "label_ranks": ranks.numpy(), "users": data.users}
    if window_ranks:
        arrays["window_label_ranks"] = torch.cat(windowed).numpy()
    if topk:
        arrays["items"] = torch.cat(top_items).numpy()
        arrays["scores"] = torch.cat(top_scores).numpy()
    return metrics_from_ranks(ranks, ks), arrays


PREFIX_CHUNK = 4096  # training prefixes scored at once: memory O(chunk x items), whatever the data's size


@torch.no_grad()
def train_prefix_candidates(
    model: NextItemModel,
    train: list[list[int]],
    max_len: int,
    topk: int,
    batch_size: int,
    device: torch.device,
    prefixes: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = PREFIX_CHUNK,
) -> dict[str, np.ndarray]:
    """The retriever's masked top-k for training prefixes train[u][:L] (`prefixes` = (users, lengths) in (user, L)
    order; default: every prefix, 1 <= L < len(train[u])).

    Each prefix is scored exactly as evaluation scores a history: the model reads its last max_len items and
    the prefix's items are masked out. Returns users, lengths (L; the label is train[u][L]), items [P, k] in
    retriever order (0 where fewer than k items lie outside the prefix), labels and label_ranks (0-based rank of
    the label in the full masked ranking), in (user, L) order. Prefixes are scored in chunks of about `chunk`
    prefixes of whole users, so memory stays O(chunk x items) besides the [P, k] result.
    """
    model.eval()
    users, lengths = all_prefixes(train) if prefixes is None else (np.asarray(p, dtype=np.int64) for p in prefixes)
    parts = []
    with progress(len(users), "training-prefix candidates", unit="prefix") as bar:
        for rows in user_chunks(users, chunk):
            windows = prefix_windows(train, users[rows], lengths[rows], max_len, model.causal)
            hidden = prefix_states(model, windows, len(users[rows]), batch_size, device)
            parts.append(
                masked_prefix_top_k(
                    model, hidden, train, torch.from_numpy(users[rows]), torch.from_numpy(lengths[rows]), topk,
                    batch_size, device,
                )
            )  # fmt: skip
            bar.update(len(users[rows]))
    if not parts:  # no prefix at all: empty arrays of the right shapes
        nothing = torch.zeros(0, dtype=torch.long)
        hidden = torch.zeros(0, model.token.embedding_dim)
        parts.append(masked_prefix_top_k(model, hidden, train, nothing, nothing, topk, batch_size, device))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def user_chunks(users: np.ndarray, size: int) -> list[slice]:
    """Consecutive slices of about `size` rows of a (user-sorted) array, never splitting one user's rows."""
    chunks, start = [], 0
    while start < len(users):
        end = min(start + size, len(users))
        end = int(np.searchsorted(users, users[end - 1], side="right"))  # the whole of the last user
        chunks.append(slice(start, end))
        start = end
    return chunks


def prefix_windows(
    train: list[list[int]], users: np.ndarray, lengths: np.ndarray, max_len: int, causal: bool
) -> list[tuple[list[int], list[int], list[int]]]:
    """The windows whose forward passes give the states of the prefixes (users[r], lengths[r]) (sorted by user):
    (item ids, the prefix rows it serves, the window position whose state each row takes; -1: the window's
    next_hidden). With a causal model, one pass of a user's first items serves every prefix that fits in max_len
    (later positions never change earlier ones); each longer prefix needs its own window of its last max_len items.
    A bidirectional model needs one pass per prefix."""
    windows = []
    bounds = np.flatnonzero(np.diff(users)) + 1
    for rows in np.split(np.arange(len(users)), bounds):
        if not len(rows):
            continue
        seq = train[int(users[rows[0]])]
        if not causal:
            windows += [
                (seq[max(0, n - max_len) : n], [int(r)], [-1])
                for r, n in zip(rows, lengths[rows].tolist(), strict=True)
            ]
            continue
        short = rows[lengths[rows] <= max_len]
        if len(short):
            head = seq[: int(lengths[short].max())]
            windows.append((head, short.tolist(), (lengths[short] - 1).tolist()))
        for r in rows[lengths[rows] > max_len].tolist():
            n = int(lengths[r])
            windows.append((seq[n - max_len : n], [r], [max_len - 1]))
    return windows


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
            hidden[[rows[0] for _, rows, _ in batch]] = model.next_hidden(tokens.to(device)).cpu()
            continue
        states = model.encode(tokens.to(device)).cpu()
        for row, (items, rows, positions) in enumerate(batch):
            hidden[rows] = states[row, [width - len(items) + p for p in positions]]
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
    # first_position[u][i] = index of item i's first occurrence in train[u] (a published split may repeat items):
    # item i is in prefix L iff that index is < L. Built per chunk of users, so memory stays O(chunk x items).
    top_items, labels, ranks = [], [], []
    num_columns = model.token.num_embeddings
    chunk = max(1, chunk)
    for start in range(0, len(users), chunk):
        rows = slice(start, min(start + chunk, len(users)))
        chunk_users, chunk_lengths = users[rows], lengths[rows]
        present = torch.unique(chunk_users)
        first_position = torch.full((len(present), num_columns), torch.iinfo(torch.long).max, dtype=torch.long)
        for k, user in enumerate(present.tolist()):
            first_position[k].scatter_reduce_(
                0, torch.tensor(train[user], dtype=torch.long), torch.arange(len(train[user])), reduce="amin"
            )
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
