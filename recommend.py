"""Recommendations for user histories from finished runs: the retriever's top items, or, with a ranker run, the
retriever's candidates re-ranked by the LLM (and fused, if that run chose a fusion weight).

    python recommend.py --retriever_run experiments/retriever/ml-100k/seed42 --input histories.jsonl --topk 10
    python recommend.py --retriever_run ... --ranker_run experiments/ranker/ml-100k/seed42 --users 1 2 --output -

A history is a list of raw item ids, oldest first. Unknown ids are skipped (and counted); a history with no known
item gets an error record. Items of the history are never recommended. The retriever and the ranker run exactly as
at test time: the retriever reads the last --bert_max_len items and ranks every item with the history masked; the
ranker shows the LLM the retriever's top candidates as in its training run's prompts and scores the letters.
Only finished runs are served, and a ranker only with the retriever run whose candidates it was trained on.
Output: one JSON line per user (docs/using-runs.md).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from config import (
    RANKER,
    RECOMMEND,
    RETRIEVER,
    data_config,
    llm_spec,
    prompt_config,
    retriever_spec,
    run_cli,
    saved_flags,
)
from dataloader.candidates import FILE_NAME
from dataloader.histories import Request, read_requests, requests_for_users, resolve_items
from dataloader.retriever_data import EvalData
from datasets import load_split
from datasets.published import check_titles
from datasets.split import SplitData
from model.retrievers import build_retriever
from trainer.retriever_train import BEST
from trainer.runtime import resolve_device, set_threads
from utils.errors import InputError, one_line
from utils.files import atomic_write_text, load_checkpoint, read_json_object, sha256_file


def finished_run(run_dir: Path, script: str, flag: str) -> argparse.Namespace:
    """The saved flags of a finished run of `script` in run_dir; an error naming `flag` and the fix otherwise."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise InputError(
            f"--{flag} {run_dir}: expected a run folder written by {script} (with config.json), found none"
        )
    saved = read_json_object(config)
    kind_key = "llm_base_model" if script == RANKER else "bert_hidden_units"
    if kind_key not in saved:
        raise InputError(f"--{flag} {run_dir}: expected a run folder of {script}, found a run of the other stage")
    if not (run_dir / "test_metrics.json").is_file():
        raise InputError(
            f"--{flag} {run_dir}: the run has not finished (no test_metrics.json); finish it with {script} --resume "
            "and the run's own flags"
        )
    return saved_flags(config, script)


class Retriever:
    """A finished retriever run's model, ranking every item for a history as its evaluation does."""

    def __init__(self, run_dir: Path, flags: argparse.Namespace, split: SplitData, device: torch.device):
        self.max_len, self.split, self.device = flags.bert_max_len, split, device
        self.model = build_retriever(retriever_spec(flags), split.num_items).to(device).eval()
        checkpoint = Path(run_dir) / BEST
        try:
            self.model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
        except (KeyError, RuntimeError) as e:
            raise InputError(
                f"{checkpoint}: does not fit the run's own config.json and dataset {split.name!r} ({one_line(e)})"
            ) from None

    @torch.no_grad()
    def top(self, histories: list[list[int]], k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores [N, k] per history, history items and padding masked (-inf: fewer than k
        items lie outside the history).

        Histories are batched by length and each batch is cut to its longest history: real positions do not depend
        on the padding before them, so this is exact and saves the padded positions' work.
        """
        data = EvalData(histories, [0] * len(histories), self.max_len)
        k = min(k, self.split.num_items)
        lengths = [min(len(h), self.max_len) for h in histories]
        order = sorted(range(len(histories)), key=lambda row: lengths[row])
        items = torch.zeros(len(histories), k, dtype=torch.long)
        scores = torch.zeros(len(histories), k)
        for start in range(0, len(order), batch_size):
            rows = torch.tensor(order[start : start + batch_size])
            width = max(1, max(lengths[row] for row in rows.tolist()))
            logits = self.model(data.tokens[rows, -width:].to(self.device))
            for local, row in enumerate(rows.tolist()):  # each row's history items (EvalData's CSR layout)
                logits[local, data.history_items[data.offsets[row] : data.offsets[row + 1]].to(self.device)] = -math.inf
            logits[:, 0] = -math.inf
            values, indices = logits.topk(k, dim=1)
            items[rows], scores[rows] = indices.cpu(), values.cpu()
        return items.numpy(), scores.numpy()


class Ranker:
    """A finished ranker run's LLM (+ its adapter, if it trained one) with the run's prompts and fusion weight."""

    def __init__(
        self, run_dir: Path, flags: argparse.Namespace, metrics: dict, split: SplitData, device: torch.device
    ) -> None:
        from dataloader.prompts import PromptBuilder, candidate_letters
        from model.llm import load_adapter, load_model, load_tokenizer
        from trainer.ranker_eval import eval_batch_size
        from trainer.verbalizer import letter_token_ids

        run_dir, llm = Path(run_dir), llm_spec(flags)
        adapter = run_dir / "adapter"
        if metrics.get("trained", True) and not (adapter / "adapter_config.json").is_file():
            raise InputError(
                f"--ranker_run {run_dir}: trained, but its adapter/ is missing; rerun train_ranker.py --resume"
            )
        self.device = device
        self.num_candidates = flags.llm_negative_sample_size + 1
        tokenizer = load_tokenizer(llm.tokenizer, llm.cache_dir)
        self.pad_id = tokenizer.pad_token_id
        check_titles(split, None)
        self.builder = PromptBuilder(tokenizer, split.titles, prompt_config(flags))
        letters = letter_token_ids(self.builder, self.num_candidates)
        self.letter_ids = torch.tensor([letters[c] for c in candidate_letters(self.num_candidates)])
        # the run's own dtype (config.json), so its scores are the run's
        model = load_model(llm.base_model, device, llm.quantized_on(device), llm.cache_dir, llm.dtype_on(device))
        self.model = load_adapter(model, adapter) if metrics.get("trained", True) else model
        if not metrics.get("trained", True):
            print(f"note: --ranker_run {run_dir} is a zero-shot run: the base model ranks", file=sys.stderr)
        weight = metrics.get("fusion", {}).get("weight")
        self.fusion_weight = None if weight is None else float(weight)
        self.eval_batch = eval_batch_size(flags.llm_eval_batch_size, flags.lora_micro_batch_size, device)

    def scores(self, histories: list[list[int]], candidates: np.ndarray) -> torch.Tensor:
        """Verbalizer scores [N, num_candidates] of each history's candidates (in the given order)."""
        from dataloader.ranker_data import EvalExample
        from trainer.ranker_eval import rank_examples

        examples = [
            EvalExample(k, history, row.tolist(), 0, 0, self.builder.encode(history, row.tolist()), [])
            for k, (history, row) in enumerate(zip(histories, candidates, strict=True))
        ]
        return rank_examples(self.model, examples, self.letter_ids, self.pad_id, self.eval_batch, self.device)


def check_candidates(ranker_metrics: dict, retriever_run: Path) -> None:
    """A ranker (and its fusion weight) is served only with the retriever run whose candidates it was trained on."""
    path = Path(retriever_run) / FILE_NAME
    recorded, used = ranker_metrics.get("candidates_sha256"), ranker_metrics.get("candidates_file")
    if recorded is not None and (not path.is_file() or sha256_file(path) != recorded):
        raise InputError(
            f"--ranker_run: trained on the candidates {used}, not on those of --retriever_run {retriever_run} "
            "(their fingerprints differ); pass the retriever run it was trained with"
        )
    if recorded is None and (used is None or Path(used).resolve() != path.resolve()):
        raise InputError(f"--ranker_run: trained on the candidates {used}, not on {path}; pass that retriever run")


def recommendation_lists(
    histories: list[list[int]], retriever: Retriever, ranker: Ranker | None, topk: int, batch_size: int
) -> list[list[dict] | str]:
    """Per history its ordered (item index, scores) entries, or an error text; never a history item or padding."""
    depth = max(topk, ranker.num_candidates) if ranker else topk
    items, retriever_scores = retriever.top(histories, depth, batch_size)
    if ranker is None:
        lists = [
            [{"item": int(i), "retriever_score": float(s)} for i, s in zip(row, scores, strict=True) if s > -math.inf]
            for row, scores in zip(items, retriever_scores, strict=True)
        ]
        return [entries[:topk] or "no item outside the history: it holds the whole catalogue" for entries in lists]
    from trainer.metrics import fuse_scores

    count = ranker.num_candidates
    items, retriever_scores = items[:, :count], retriever_scores[:, :count]
    complete = np.isfinite(retriever_scores).all(axis=1)  # fewer than `count` items outside the history otherwise
    lists: list[list[dict] | str] = [f"fewer than {count} items outside the history: the ranker needs {count}"] * len(
        histories
    )
    rows = np.flatnonzero(complete)
    if len(rows):
        llm = ranker.scores([histories[r] for r in rows], items[rows])
        fused = None
        if ranker.fusion_weight is not None:
            fused = fuse_scores(llm, torch.from_numpy(retriever_scores[rows]).double(), ranker.fusion_weight)
        order_by = fused if fused is not None else llm
        for k, row in enumerate(rows):
            columns = sorted(range(count), key=lambda c: -float(order_by[k, c]))  # stable: ties keep retriever order
            entries = []
            for c in columns[:topk]:
                entry = {"item": int(items[row, c]), "retriever_score": float(retriever_scores[row, c])}
                entry["llm_score"] = float(llm[k, c])
                if fused is not None:
                    entry["fused_score"] = float(fused[k, c])
                entries.append(entry)
            lists[row] = entries
    return lists


def recommend(
    requests: list[Request], split: SplitData, retriever: Retriever, ranker: Ranker | None, topk: int, batch_size: int
) -> list[dict]:
    """One JSON-ready record per request, in input order."""
    valid = [r for r in requests if r.known]
    lists = recommendation_lists([r.known for r in valid], retriever, ranker, topk, batch_size) if valid else []
    by_request = {id(request): entries for request, entries in zip(valid, lists, strict=True)}
    records = []
    for request in requests:
        record = {"user": request.user, "history_items": len(request.known), "unknown_items": request.unknown}
        entries = by_request.get(id(request), f"no known item in the history ({request.unknown} unknown ids)")
        if isinstance(entries, str):
            record["error"] = entries
        else:
            record["recommendations"] = [
                {"item": split.item_raw_ids[e["item"]], "title": split.titles[e["item"]]}
                | {key: value for key, value in e.items() if key != "item"}
                for e in entries
            ]
        records.append(record)
    return records


def run(flags: argparse.Namespace) -> list[dict]:
    set_threads(flags.num_threads)
    device = resolve_device(flags.device)
    retriever_flags = finished_run(flags.retriever_run, RETRIEVER, "retriever_run")
    ranker_flags = finished_run(flags.ranker_run, RANKER, "ranker_run") if flags.ranker_run else None
    if ranker_flags is not None and ranker_flags.dataset_name != retriever_flags.dataset_name:
        raise InputError(
            f"--ranker_run: trained on {ranker_flags.dataset_name!r}, but --retriever_run on {retriever_flags.dataset_name!r}"
        )
    if ranker_flags is not None and flags.topk > ranker_flags.llm_negative_sample_size + 1:
        raise InputError(
            f"--topk: the ranker orders {ranker_flags.llm_negative_sample_size + 1} candidates, found {flags.topk}"
        )
    split = load_split(data_config(retriever_flags))
    requests = read_requests(flags.input) if flags.input else requests_for_users(split, flags.users)
    unknown = resolve_items(requests, split)
    if unknown:
        print(f"warning: {unknown} item ids unknown to dataset {split.name!r} were skipped", file=sys.stderr)
    retriever = Retriever(flags.retriever_run, retriever_flags, split, device)
    ranker = None
    if ranker_flags is not None:
        metrics = read_json_object(Path(flags.ranker_run) / "test_metrics.json")
        check_candidates(metrics, flags.retriever_run)
        ranker = Ranker(flags.ranker_run, ranker_flags, metrics, split, device)
    start = time.time()
    records = recommend(requests, split, retriever, ranker, flags.topk, flags.recommend_batch_size)
    seconds = time.time() - start
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if flags.output == "-":
        sys.stdout.write(lines)
    else:
        atomic_write_text(flags.output, lines)
    print(f"{len(records)} users in {seconds:.2f} s ({len(records) / max(seconds, 1e-9):.1f} users/s)", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    return run_cli(RECOMMEND, run, argv)


if __name__ == "__main__":
    sys.exit(main())
