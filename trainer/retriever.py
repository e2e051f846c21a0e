"""Stage 1: train LRURec, rank all items for validation/test users, export candidates.

Training: every position of a (left-padded) window predicts its next item, cross-entropy over all items,
padding ignored. Evaluation: the user's history (validation: train[u]; test: train[u] + [val[u]]) and
padding are masked out of a full ranking over all items, at validation and at test alike (the original
masked only at test, so its model selection optimised another metric than the one it reported).
"""

import math
import random
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.split import SplitData
from model.bert4rec import BERT4Rec
from model.lru import LRURec, NextItemModel
from model.narm import NARM
from model.sasrec import SASRec
from trainer.candidates import save_candidates
from trainer.metrics import PAPER_BATCH_SIZE, batch_averaged_metrics, label_ranks, metrics_from_ranks
from trainer.utils import (
    InputError,
    append_jsonl,
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    truncate_history,
    write_run_info,
)

BEST, LAST, HISTORY = "checkpoint_best.pt", "checkpoint_last.pt", "val_history.jsonl"  # in the run folder


def build_model(cfg: Namespace, num_items: int) -> NextItemModel:
    """The --retriever_model with the run's sizes: LRURec (the paper's retriever) or a Table 1 baseline."""
    name = getattr(cfg, "retriever_model", "lru")  # run folders written before the flag existed are LRURec runs
    sizes = {"hidden_units": cfg.bert_hidden_units, "dropout": cfg.bert_dropout}
    if name == "lru":
        return LRURec(num_items, num_blocks=cfg.bert_num_blocks, attn_dropout=cfg.bert_attn_dropout, **sizes)
    if name == "narm":
        return NARM(num_items, **sizes)
    if cfg.bert_hidden_units % cfg.attn_heads:
        raise InputError(
            f"--attn_heads: expected a divisor of --bert_hidden_units {cfg.bert_hidden_units}, found {cfg.attn_heads}"
        )
    attention = {"max_len": cfg.bert_max_len, "num_blocks": cfg.bert_num_blocks, "heads": cfg.attn_heads}
    attention["attn_dropout"] = cfg.bert_attn_dropout
    if name == "sasrec":
        return SASRec(num_items, **attention, **sizes)
    return BERT4Rec(num_items, **attention, **sizes, mask_prob=cfg.bert_mask_prob)


# ---------------------------------------------------------------------------------------------- data


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


def config_training_windows(cfg: Namespace, train: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """training_windows with the run's --bert_max_len, --sliding_window_size and --train_all_items."""
    step = max(1, int(cfg.sliding_window_size * cfg.bert_max_len))
    return training_windows(train, cfg.bert_max_len, step, cfg.train_all_items)


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


# ------------------------------------------------------------------------------------------ evaluation


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
    the prefix's items are masked out. One forward pass of a user's first max_len items serves every prefix
    that fits in it (later positions never change earlier ones); each longer prefix needs its own window.
    Returns users, lengths (L; the label is train[u][L]), items [P, k] in retriever order (0 where fewer than k
    items lie outside the prefix), labels and label_ranks (0-based rank of the label in the full masked ranking), in (user, L) order.
    """
    model.eval()
    users, lengths, windows = [], [], []  # windows: (item ids, first prefix row, number of prefix rows it serves)
    for user, seq in enumerate(train):
        for length in range(1, len(seq)):
            users.append(user)
            lengths.append(length)
        if len(seq) < 2:
            continue
        first = len(users) - (len(seq) - 1)
        if not model.causal:  # every state sees the whole window: each prefix needs its own pass
            windows += [(seq[max(0, n - max_len) : n], first + n - 1, 0) for n in range(1, len(seq))]
            continue
        head = seq[: min(len(seq) - 1, max_len)]
        windows.append((head, first, len(head)))  # prefixes 1..len(head): every position of the head
        for length in range(max_len + 1, len(seq)):
            windows.append((seq[length - max_len : length], first + length - 1, 1))  # only its last position
    hidden = torch.empty(len(users), model.token.embedding_dim)
    order = sorted(range(len(windows)), key=lambda k: len(windows[k][0]))  # similar widths batch together
    for start in range(0, len(order), batch_size):
        batch = [windows[k] for k in order[start : start + batch_size]]
        width = max(len(items) for items, _, _ in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (items, _, _) in enumerate(batch):
            tokens[row, width - len(items) :] = torch.tensor(items)
        if not model.causal:  # count 0: the window's next_hidden (BERT4Rec: history + mask token)
            hidden[[first for _, first, _ in batch]] = model.next_hidden(tokens.to(device)).cpu()
            continue
        states = model.encode(tokens.to(device)).cpu()
        for row, (_, first, count) in enumerate(batch):
            hidden[first : first + count] = states[row, width - count :]
    users_t = torch.tensor(users, dtype=torch.long)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    # first_position[u][i] = index of item i in train[u] (repeats are dropped by preprocessing): item i is in
    # prefix L iff its index is < L. Built per chunk of users, so memory stays O(chunk x items).
    top_items, labels, ranks = [], [], []
    num_columns = model.token.num_embeddings
    chunk = max(1, batch_size)
    for start in range(0, len(users), chunk):
        rows = slice(start, min(start + chunk, len(users)))
        chunk_users, chunk_lengths = users_t[rows], lengths_t[rows]
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
        "users": users_t.numpy(),
        "lengths": lengths_t.numpy(),
        "items": (torch.cat(top_items) if top_items else torch.zeros(0, topk, dtype=torch.long)).numpy(),
        "labels": (torch.cat(labels) if labels else empty).numpy(),
        "label_ranks": (torch.cat(ranks) if ranks else empty).numpy(),
    }


# ------------------------------------------------------------------------------------------- training


def build_optimizer(model: NextItemModel, cfg: Namespace) -> torch.optim.AdamW:
    # As the original: no decay on parameters whose name contains "bias" or "layer_norm"; the LRU's
    # params_log (nu, theta, gamma) is decayed.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "bias" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters, ~3x faster than the default per-tensor loop on CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=cfg.adam_epsilon, fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Namespace, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear decay to 0 at total_steps; a constant factor 1 when disabled."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if not cfg.enable_lr_schedule:
            return 1.0
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch; a function of (seed, epoch) only, so resuming mid-epoch is exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(num_examples, generator=generator).split(batch_size))


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_key"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def train_step(
    model: NextItemModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float,
    label_smoothing: float = 0.0,
) -> float:
    model.train()
    # Drop the columns left of every row's first label (padding in every row; counting labels instead
    # would cut rows whose later labels are masked): real positions do not depend on padding (tested).
    width = labels.shape[1] - int((labels > 0).int().argmax(1).min())
    tokens, labels = model.training_inputs(tokens[:, -width:], labels[:, -width:])
    hidden = model.encode(tokens)
    real = labels > 0
    # Scores only at positions with a label: the [positions, items] product dominates the step's cost.
    loss = model.next_item_loss(hidden[real], labels[real], label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss.item()


def initial_state() -> dict:
    """The training state saved in checkpoint_last.pt: position in the data, best validation, early stopping."""
    return {
        "step": 0,
        "epoch": 0,
        "batch": 0,
        "best_value": -math.inf,
        "best_step": None,
        "patience": 0,
        "done": False,
        "loss_sum": 0.0,
        "loss_count": 0,
    }


def save_last_checkpoint(path: Path, model: NextItemModel, optimizer, scheduler, state: dict) -> None:
    """Everything --resume needs to continue exactly: weights, optimizer, schedule, RNGs, state."""
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "state": state,
        },
        path,
    )


def load_last_checkpoint(path: Path, model: NextItemModel, optimizer, scheduler, device: torch.device) -> dict:
    """Restore what save_last_checkpoint wrote; return the training state."""
    ckpt = load_checkpoint(path, device)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        return ckpt["state"]
    except (KeyError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: does not fit this run's model ({str(e)[:300]})") from None


def validate_and_checkpoint(
    cfg: Namespace,
    model: NextItemModel,
    val_data: EvalData,
    state: dict,
    run_dir: Path,
    device: torch.device,
    wandb_run,
) -> dict[str, float]:
    """One validation: update the best value and patience in `state` (state["done"] on early stopping), save
    checkpoint_best.pt on improvement, append to val_history.jsonl (and wandb). Returns the metrics."""
    start = time.time()
    metrics, _ = evaluate(model, val_data, cfg.val_batch_size, cfg.metric_ks, device)
    value = metrics[cfg.best_metric]
    improved = value > state["best_value"]
    if improved:
        state["best_value"], state["best_step"], state["patience"] = value, state["step"], 0
        atomic_torch_save({"model": model.state_dict(), "step": state["step"], "value": value}, run_dir / BEST)
    else:
        state["patience"] += 1
    record = {
        "step": state["step"],
        "epoch": state["epoch"],
        "train_loss": state["loss_sum"] / max(1, state["loss_count"]),
        **metrics,
        "best": improved,
        "val_seconds": round(time.time() - start, 3),
    }
    append_jsonl(run_dir / HISTORY, record)
    if wandb_run is not None:
        wandb_run.log(
            {"train/loss": record["train_loss"], **{f"val/{k}": v for k, v in metrics.items()}}, step=state["step"]
        )
    state["loss_sum"], state["loss_count"] = 0.0, 0
    tqdm.write(
        f"step {state['step']} (epoch {state['epoch']}): {cfg.best_metric} {value:.4f} "
        f"(best {state['best_value']:.4f} at {state['best_step']}) NDCG@10 {metrics.get('NDCG@10', math.nan):.4f}"
    )
    if cfg.early_stopping and state["patience"] >= cfg.early_stopping_patience:
        tqdm.write(f"early stopping: {state['patience']} validations without a better {cfg.best_metric}")
        state["done"] = True
    return metrics


def short_metrics(metrics: dict[str, float]) -> dict[str, str]:
    """R@10 / N@10 for the progress bar."""
    return {
        k.replace("Recall", "R").replace("NDCG", "N"): f"{metrics[k]:.4f}"
        for k in ("Recall@10", "NDCG@10")
        if k in metrics
    }


def train(cfg: Namespace, split: SplitData, model: NextItemModel, run_dir: Path, device: torch.device) -> dict:
    """Train with validation every cfg.val_iterations steps and early stopping; return the final state.

    Writes checkpoint_best.pt (best validation cfg.best_metric), checkpoint_last.pt (everything --resume
    needs, saved at each validation and when training stops) and val_history.jsonl. Stopping at
    cfg.max_steps leaves a state that --resume continues exactly as if it had not stopped.
    """
    tokens, labels = config_training_windows(cfg, split.train)
    val_data = eval_data(split, "val", cfg.bert_max_len)
    steps_per_epoch = math.ceil(len(tokens) / cfg.train_batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.num_epochs)
    state = initial_state()
    last_path = run_dir / LAST
    if cfg.resume and last_path.exists():
        state = load_last_checkpoint(last_path, model, optimizer, scheduler, device)
        truncate_history(run_dir / HISTORY, state["step"])
        print(f"resumed from {last_path} at step {state['step']} ({state['step'] / steps_per_epoch:.1f} epochs)")

    wandb_run = None
    if cfg.use_wandb:
        import wandb

        wandb_run = wandb.init(
            project=cfg.wandb_project,
            name=f"retriever-{cfg.dataset_name}-{cfg.run_name}",
            config=vars(cfg),
            dir=str(run_dir),
            resume="allow",
        )

    def reached_max_steps() -> bool:  # e.g. --resume of a run that stopped at this --max_steps
        return cfg.max_steps is not None and state["step"] >= cfg.max_steps

    last_val: dict[str, float] = {}
    while not state["done"] and not reached_max_steps() and state["epoch"] < cfg.num_epochs:
        batches = epoch_batches(len(tokens), cfg.train_batch_size, cfg.seed, state["epoch"])
        bar = tqdm(
            total=len(batches), initial=state["batch"], desc=f"epoch {state['epoch'] + 1}", leave=False, mininterval=2
        )
        while not state["done"] and not reached_max_steps():
            index = batches[state["batch"]]
            loss = train_step(
                model,
                optimizer,
                scheduler,
                tokens[index].to(device),
                labels[index].to(device),
                cfg.max_grad_norm,
                cfg.label_smoothing,
            )
            state["loss_sum"], state["loss_count"] = state["loss_sum"] + loss, state["loss_count"] + 1
            state["step"], state["batch"] = state["step"] + 1, state["batch"] + 1
            end_of_epoch = state["batch"] == len(batches)
            if end_of_epoch:  # the state a resumed run starts from: the next epoch's first batch
                state["epoch"], state["batch"] = state["epoch"] + 1, 0
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.3f}", **short_metrics(last_val)}, refresh=False)
            if state["step"] % cfg.val_iterations == 0:
                last_val = validate_and_checkpoint(cfg, model, val_data, state, run_dir, device, wandb_run)
                save_last_checkpoint(last_path, model, optimizer, scheduler, state)
            if end_of_epoch:
                break
        bar.close()
    if state["epoch"] >= cfg.num_epochs:
        state["done"] = True
    save_last_checkpoint(last_path, model, optimizer, scheduler, state)
    if wandb_run is not None:
        wandb_run.finish()
    return state


def fold_users(num_users: int, folds: int, seed: int) -> list[np.ndarray]:
    """A seeded partition of the users into `folds` disjoint sorted index arrays of near-equal size."""
    order = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(order[k::folds]) for k in range(folds)]


def held_out_prefix_candidates(
    cfg: Namespace, split: SplitData, run_dir: Path, topk: int, device: torch.device
) -> dict[str, np.ndarray]:
    """train_prefix_candidates for every user from a retriever that never saw that user.

    Users are split into cfg.retrieved_train_folds folds; for each fold a fresh model is trained with this run's
    flags (validation and early stopping on the other folds' users) and scores the fold's training prefixes. This
    makes training lists as hard as test lists: in-sample, the retriever has already fitted the very positions.
    Each fold's run lives in run_dir/folds/fold<k>/ and resumes like the main run.
    """
    parts = []
    for k, users in enumerate(fold_users(split.num_users, cfg.retrieved_train_folds, cfg.seed)):
        others = np.setdiff1d(np.arange(split.num_users), users)
        sub = SplitData(
            name=f"{split.name}-fold{k}",
            train=[split.train[u] for u in others],
            val=[split.val[u] for u in others],
            test=[split.test[u] for u in others],
            titles=split.titles,
            user_raw_ids=[split.user_raw_ids[u] for u in others],
            item_raw_ids=split.item_raw_ids,
            fingerprint=f"{split.fingerprint}-fold{k}",
        )
        fold_dir = run_dir / "folds" / f"fold{k}"
        fold_cfg = Namespace(**{**vars(cfg), "use_wandb": False, "resume": (fold_dir / LAST).exists()})
        fold_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + 1 + k)
        model = build_model(cfg, split.num_items).to(device)
        print(f"fold {k}: training on {len(others)} users to score the prefixes of {len(users)} others", flush=True)
        train(fold_cfg, sub, model, fold_dir, device)
        if (fold_dir / BEST).exists():
            model.load_state_dict(load_checkpoint(fold_dir / BEST, device)["model"])
        arrays = train_prefix_candidates(model, [split.train[u] for u in users], cfg.bert_max_len, topk, 256, device)
        arrays["users"] = users[arrays["users"]]
        parts.append(arrays)
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    order = np.lexsort((merged["lengths"], merged["users"]))  # (user, length) order, as train_prefix_candidates
    return {key: value[order] for key, value in merged.items()}


def export_candidates(
    cfg: Namespace, split: SplitData, model: NextItemModel, out_dir: Path, device: torch.device
) -> tuple[dict, dict]:
    """With `model` as it is: val/test metrics, test_metrics.json and candidates.npz (top cfg.retrieved_topk)."""
    topk = min(cfg.retrieved_topk, split.num_items)
    val_metrics, val_arrays = evaluate(
        model, eval_data(split, "val", cfg.bert_max_len), cfg.test_batch_size, cfg.metric_ks, device, topk
    )
    test_metrics, test_arrays = evaluate(
        model, eval_data(split, "test", cfg.bert_max_len), cfg.test_batch_size, cfg.metric_ks, device, topk
    )
    start = time.time()
    train_topk = min(cfg.retrieved_train_topk, split.num_items)
    if cfg.retrieved_train_folds > 1:
        train_arrays = held_out_prefix_candidates(cfg, split, out_dir, train_topk, device)
        source = f"{cfg.retrieved_train_folds} user-disjoint folds"
    else:
        train_arrays = train_prefix_candidates(model, split.train, cfg.bert_max_len, train_topk, 256, device)
        source = "in-sample"
    # In-sample, the retriever was trained on these very positions: how much better it looks there than at test
    # is what a ranker trained on these lists would learn to expect (docs/ranker.md, "Training candidates").
    train_metrics = metrics_from_ranks(torch.from_numpy(train_arrays["label_ranks"]), cfg.metric_ks)
    train_metrics["source"] = source
    print(
        f"training-prefix candidates: {len(train_arrays['users'])} prefixes x {train_topk} in "
        f"{time.time() - start:.1f} s; {source} Recall@20 {train_metrics.get('Recall@20', math.nan):.4f} "
        f"NDCG@20 {train_metrics.get('NDCG@20', math.nan):.4f} vs test {test_metrics.get('Recall@20', math.nan):.4f} "
        f"/ {test_metrics.get('NDCG@20', math.nan):.4f}",
        flush=True,
    )
    save_candidates(
        out_dir / "candidates.npz",
        split=split,
        topk=topk,
        val=val_arrays,
        test=test_arrays,
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        train=train_arrays,
        train_metrics=train_metrics,
    )
    write_batch_averaged(out_dir, cfg, torch.from_numpy(test_arrays["label_ranks"]))
    # Written last: a run folder with test_metrics.json also has its candidates.
    atomic_write_json(out_dir / "test_metrics.json", test_metrics)
    return val_metrics, test_metrics


def write_batch_averaged(out_dir: Path, cfg: Namespace, test_ranks: torch.Tensor) -> None:
    """test_metrics_batch16.json: the test metrics averaged over batches as the paper did, next to the true
    per-user means of test_metrics.json; for comparing with the paper only (nothing selects on it)."""
    metrics = batch_averaged_metrics(test_ranks, cfg.metric_ks)
    atomic_write_json(out_dir / f"test_metrics_batch{PAPER_BATCH_SIZE}.json", metrics)


def export(
    cfg: Namespace, split: SplitData, model: NextItemModel, run_dir: Path, device: torch.device
) -> tuple[dict, dict]:
    """Load the best checkpoint, then export_candidates into the run folder."""
    best_path = run_dir / BEST
    if best_path.exists():
        model.load_state_dict(load_checkpoint(best_path, device)["model"])
    else:
        print(f"warning: no validation ran, so no {best_path.name}; exporting the last model")
    return export_candidates(cfg, split, model, run_dir, device)


def evaluate_saved(cfg: Namespace, split: SplitData, device: torch.device) -> dict:
    """--eval_only: the saved checkpoint's val/test metrics (and, with --eval_export_candidates, its candidates) in
    <run folder>/eval/, without touching the training run's files."""
    run_dir = cfg.experiment_root / "retriever" / cfg.dataset_name / cfg.run_name
    checkpoint = cfg.eval_checkpoint or run_dir / BEST
    if not Path(checkpoint).is_file():
        raise InputError(
            f"--eval_checkpoint: {checkpoint} not found; pass a retriever checkpoint or the run's --run_name"
        )
    model = build_model(cfg, split.num_items).to(device)
    try:
        model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"{checkpoint}: does not fit a model with these flags ({str(e)[:300]})") from None
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(out_dir, cfg)
    if cfg.eval_export_candidates:
        val_metrics, test_metrics = export_candidates(cfg, split, model, out_dir, device)
    else:
        val_metrics, _ = evaluate(
            model, eval_data(split, "val", cfg.bert_max_len), cfg.test_batch_size, cfg.metric_ks, device
        )
        test_metrics, test_arrays = evaluate(
            model, eval_data(split, "test", cfg.bert_max_len), cfg.test_batch_size, cfg.metric_ks, device
        )
        write_batch_averaged(out_dir, cfg, torch.from_numpy(test_arrays["label_ranks"]))
        atomic_write_json(out_dir / "test_metrics.json", test_metrics)
    atomic_write_json(out_dir / "val_metrics.json", val_metrics)
    return {"checkpoint": str(checkpoint), "eval_dir": str(out_dir), "val": val_metrics, "test": test_metrics}
