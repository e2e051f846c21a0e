"""Recommendations for new user histories from trained runs: the retriever's top items, or, with a ranker run, the
retriever's candidates re-ranked by the LLM (and fused, if that run chose a fusion weight).

    python recommend.py --retriever_run experiments/retriever/ml-100k/seed42 --input histories.jsonl --topk 10
    python recommend.py --retriever_run ... --ranker_run experiments/ranker/ml-100k/seed42 --users 1 2 --output -

Output: one JSON line per user (see README, "Recommendations for new histories").
"""

import argparse
import json
import sys
import time

import torch

from config import build_parser
from datasets import load_split
from trainer.recommend import (
    Ranker,
    Retriever,
    load_run_config,
    read_requests,
    recommend,
    requests_for_users,
    resolve_items,
)
from trainer.utils import InputError, atomic_write_text, resolve_device


def run(args: argparse.Namespace) -> list[dict]:
    if args.retriever_run is None:
        raise InputError("--retriever_run: required (a folder written by train_retriever.py)")
    if (args.input is None) == (args.users is None):
        raise InputError("--input / --users: pass exactly one (a histories file, or existing user ids)")
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    retriever_cfg = load_run_config(args.retriever_run, "retriever")
    split = load_split(retriever_cfg)
    ranker_cfg = load_run_config(args.ranker_run, "ranker") if args.ranker_run else None
    if ranker_cfg is not None and ranker_cfg.dataset_name != retriever_cfg.dataset_name:
        raise InputError(
            f"--ranker_run: trained on {ranker_cfg.dataset_name!r}, but --retriever_run on {retriever_cfg.dataset_name!r}"
        )
    requests = read_requests(args.input) if args.input else requests_for_users(split, args.users)
    unknown = resolve_items(requests, split)
    if unknown:
        print(f"warning: {unknown} item ids unknown to dataset {split.name!r} were skipped", file=sys.stderr)
    retriever = Retriever(args.retriever_run, retriever_cfg, split, device)
    ranker = Ranker(args.ranker_run, ranker_cfg, split, device) if ranker_cfg is not None else None
    if ranker is not None and args.topk > ranker.num_candidates:
        raise InputError(f"--topk: the ranker orders {ranker.num_candidates} candidates, found {args.topk}")
    start = time.time()
    records = recommend(requests, split, retriever, ranker, args.topk, args.recommend_batch_size)
    seconds = time.time() - start
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if args.output == "-":
        sys.stdout.write(lines)
    else:
        atomic_write_text(args.output, lines)
    print(f"{len(records)} users in {seconds:.2f} s ({len(records) / max(seconds, 1e-9):.1f} users/s)", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
