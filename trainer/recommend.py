"""Recommendations for new histories from trained runs: the retriever's top items, optionally re-ranked by a ranker run.

A history is a list of raw item ids, oldest first. Unknown ids are skipped (and counted); a history with no known
item gets an error record. Items of the history are never recommended. The retriever and the ranker run exactly as
at test time: the retriever reads the last --bert_max_len items and ranks every item with the history masked; the
ranker shows the LLM the retriever's top candidates as in its training run's prompts and scores the letters.
"""

import csv
import json
import math
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datasets.split import SplitData
from trainer.retriever import BEST, EvalData, build_model
from trainer.utils import InputError, load_checkpoint

PATH_KEYS = ("custom_path", "data_root", "ml_100k_path", "experiment_root", "llm_cache_dir", "llm_retrieved_path")


@dataclass
class Request:
    user: str
    items: list[str]  # raw item ids, oldest first
    known: list[int] = field(default_factory=list)  # their item indices (unknown ids dropped)
    unknown: int = 0


def load_run_config(run_dir: Path, stage: str) -> Namespace:
    """The resolved flags a training run saved in its config.json."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--{stage}_run: expected a {stage} run folder with config.json, found {path} ({e})") from None
    for key in PATH_KEYS:
        if saved.get(key) is not None:
            saved[key] = Path(saved[key])
    return Namespace(**saved)


def read_requests(path: Path) -> list[Request]:
    """JSONL ({"user": id, "history": [item ids, oldest first]} per line) or CSV (user_id,item_id[,timestamp];
    without timestamp, rows are taken in file order)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--input: {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        requests = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                requests.append(Request(str(record["user"]), [str(i) for i in record["history"]]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(
                    f'{path}:{number}: expected {{"user": id, "history": [item ids]}}, found {line[:80]!r} ({e})'
                ) from None
        return requests
    rows = list(csv.DictReader(text.splitlines()))
    columns = set(rows[0]) if rows else set()
    if not {"user_id", "item_id"} <= columns:
        raise InputError(f"{path}: expected CSV columns user_id,item_id[,timestamp], found {sorted(columns)}")
    if "timestamp" in columns:
        try:
            rows.sort(key=lambda row: float(row["timestamp"]))  # stable: equal timestamps keep file order
        except ValueError as e:
            raise InputError(f"{path}: timestamp must be a number ({e})") from None
    by_user: dict[str, list[str]] = {}
    for row in rows:
        by_user.setdefault(row["user_id"], []).append(row["item_id"])
    return [Request(user, items) for user, items in by_user.items()]


def requests_for_users(split: SplitData, users: list[str]) -> list[Request]:
    """Existing users: their whole known sequence (training items, then validation and test items)."""
    index = {raw: u for u, raw in enumerate(split.user_raw_ids)}
    missing = [user for user in users if user not in index]
    if missing:
        raise InputError(f"--users: {len(missing)} ids not in dataset {split.name!r} (first: {missing[0]!r})")
    requests = []
    for user in users:
        u = index[user]
        requests.append(Request(user, [split.item_raw_ids[i] for i in [*split.train[u], split.val[u], split.test[u]]]))
    return requests


def resolve_items(requests: list[Request], split: SplitData) -> int:
    """Fill each request's known item indices; return the number of unknown ids skipped."""
    index = {raw: i for i, raw in enumerate(split.item_raw_ids) if i}
    for request in requests:
        request.known = [index[item] for item in request.items if item in index]
        request.unknown = len(request.items) - len(request.known)
    return sum(request.unknown for request in requests)


class Retriever:
    def __init__(self, run_dir: Path, cfg: Namespace, split: SplitData, device: torch.device):
        self.cfg, self.split, self.device = cfg, split, device
        self.model = build_model(cfg, split.num_items).to(device).eval()
        checkpoint = Path(run_dir) / BEST
        self.model.load_state_dict(load_checkpoint(checkpoint, device)["model"])

    @torch.no_grad()
    def top(self, histories: list[list[int]], k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores [N, k] per history, history items and padding masked.

        Histories are batched by length and each batch is cut to its longest history: real positions do not depend
        on the padding before them, so this is exact and saves the padded positions' work.
        """
        data = EvalData(histories, [0] * len(histories), self.cfg.bert_max_len)
        k = min(k, self.split.num_items)
        lengths = [min(len(h), self.cfg.bert_max_len) for h in histories]
        order = sorted(range(len(histories)), key=lambda row: lengths[row])
        items = torch.zeros(len(histories), k, dtype=torch.long)
        scores = torch.zeros(len(histories), k)
        for start in range(0, len(order), batch_size):
            rows = torch.tensor(order[start : start + batch_size])
            width = max(1, max(lengths[row] for row in rows.tolist()))
            logits = self.model(data.tokens[rows, -width:].to(self.device))
            # history items of each row: the CSV-like (offsets, items) layout of EvalData, row by row
            for local, row in enumerate(rows.tolist()):
                logits[local, data.history_items[data.offsets[row] : data.offsets[row + 1]].to(self.device)] = -math.inf
            logits[:, 0] = -math.inf
            values, indices = logits.topk(k, dim=1)
            items[rows], scores[rows] = indices.cpu(), values.cpu()
        return items.numpy(), scores.numpy()


class Ranker:
    """A ranker run's LLM (+ its adapter, if it trained one) with the run's prompt settings and fusion weight."""

    def __init__(self, run_dir: Path, cfg: Namespace, split: SplitData, device: torch.device):
        from dataloader.prompts import candidate_letters, prompt_builder
        from model.llm import load_adapter, load_model, load_tokenizer
        from trainer.verbalizer import letter_token_ids

        self.cfg, self.device = cfg, device
        self.num_candidates = cfg.llm_negative_sample_size + 1
        tokenizer = load_tokenizer(cfg.llm_base_tokenizer or cfg.llm_base_model, cfg.llm_cache_dir)
        self.pad_id = tokenizer.pad_token_id
        self.builder = prompt_builder(cfg, tokenizer, split.titles)
        letters = letter_token_ids(self.builder, self.num_candidates)
        self.letter_ids = torch.tensor([letters[c] for c in candidate_letters(self.num_candidates)])
        load_in_4bit = cfg.llm_load_in_4bit if cfg.llm_load_in_4bit is not None else device.type == "cuda"
        model = load_model(cfg.llm_base_model, device, load_in_4bit, cfg.llm_cache_dir)
        adapter = Path(run_dir) / "adapter"
        self.model = load_adapter(model, adapter) if (adapter / "adapter_config.json").is_file() else model
        self.fusion_weight = None
        metrics_path = Path(run_dir) / "test_metrics.json"
        if metrics_path.is_file():
            weight = json.loads(metrics_path.read_text(encoding="utf-8")).get("fusion", {}).get("weight")
            self.fusion_weight = None if weight is None else float(weight)
        self.eval_batch = cfg.llm_eval_batch_size or (cfg.lora_micro_batch_size if device.type == "cuda" else 1)

    def scores(self, histories: list[list[int]], candidates: np.ndarray) -> torch.Tensor:
        """Verbalizer scores [N, num_candidates] of each history's candidates (in the given order)."""
        from dataloader.ranker_data import EvalExample
        from trainer.ranker import rank_examples

        examples = [
            EvalExample(k, history, row.tolist(), 0, 0, self.builder.encode(history, row.tolist()), [])
            for k, (history, row) in enumerate(zip(histories, candidates, strict=True))
        ]
        return rank_examples(self.model, examples, self.letter_ids, self.pad_id, self.eval_batch, self.device)


def recommend(
    requests: list[Request],
    split: SplitData,
    retriever: Retriever,
    ranker: Ranker | None,
    topk: int,
    batch_size: int,
) -> list[dict]:
    """One JSON-ready record per request, in input order."""
    valid = [r for r in requests if r.known]
    by_user: dict[int, dict] = {}
    if valid:
        histories = [r.known for r in valid]
        depth = max(topk, ranker.num_candidates) if ranker else topk
        items, retriever_scores = retriever.top(histories, depth, batch_size)
        llm = fused = None
        if ranker is not None:
            items, retriever_scores = items[:, : ranker.num_candidates], retriever_scores[:, : ranker.num_candidates]
            llm = ranker.scores(histories, items)
            if ranker.fusion_weight is not None:
                from trainer.metrics import fuse_scores

                fused = fuse_scores(llm, torch.from_numpy(retriever_scores).double(), ranker.fusion_weight)
        order_by = fused if fused is not None else llm
        for row, request in enumerate(valid):
            columns = list(range(items.shape[1]))
            if order_by is not None:
                columns.sort(key=lambda c: -float(order_by[row, c]))  # stable: ties keep the retriever's order
            recommendations = []
            for c in columns[:topk]:
                item = int(items[row, c])
                entry = {"item": split.item_raw_ids[item], "title": split.titles[item]}
                entry["retriever_score"] = float(retriever_scores[row, c])
                if llm is not None:
                    entry["llm_score"] = float(llm[row, c])
                if fused is not None:
                    entry["fused_score"] = float(fused[row, c])
                recommendations.append(entry)
            by_user[id(request)] = {"recommendations": recommendations}
    records = []
    for request in requests:
        record = {"user": request.user, "history_items": len(request.known), "unknown_items": request.unknown}
        if request.known:
            record.update(by_user[id(request)])
        else:
            record["error"] = f"no known item in the history ({request.unknown} unknown ids)"
        records.append(record)
    return records
