"""recommend.py speed: users/s from a retriever run alone and re-ranked by a ranker run, on real histories.

    python -m bench.bench_recommend --retriever_run experiments/retriever/ml-100k/seed42 \
        --ranker_run experiments/ranker/ml-100k/seed42 --num_threads 2

Histories are the dataset's users' whole sequences (repeated to --retriever_users). Model loading is timed apart
from ranking; one untimed warm-up batch runs first. Writes experiments/bench/recommend_<dataset>.json.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from config import RANKER, RETRIEVER, data_config
from dataloader.histories import requests_for_users, resolve_items
from datasets import load_split
from recommend import Ranker, Retriever, check_candidates, finished_run, recommend
from utils.files import REPO_ROOT, atomic_write_json, read_json_object


def timed_recommend(requests, split, retriever, ranker, topk: int, batch_size: int) -> float:
    recommend(requests[:batch_size], split, retriever, ranker, topk, batch_size)  # warm-up
    start = time.perf_counter()
    recommend(requests, split, retriever, ranker, topk, batch_size)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retriever_run", type=Path, required=True)
    parser.add_argument("--ranker_run", type=Path, default=None)
    parser.add_argument("--retriever_users", type=int, default=6100, help="histories for the retriever-only timing")
    parser.add_argument("--ranker_users", type=int, default=32, help="histories for the timing with the ranker")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cpu")
    retriever_flags = finished_run(args.retriever_run, RETRIEVER, "retriever_run")
    split = load_split(data_config(retriever_flags))
    users = [split.user_raw_ids[k % split.num_users] for k in range(max(args.retriever_users, args.ranker_users))]
    requests = requests_for_users(split, users)
    resolve_items(requests, split)
    result = {"dataset": split.name, "torch_threads": torch.get_num_threads(), "device": str(device)}
    start = time.perf_counter()
    retriever = Retriever(args.retriever_run, retriever_flags, split, device)
    result["retriever_load_s"] = round(time.perf_counter() - start, 3)
    seconds = timed_recommend(requests[: args.retriever_users], split, retriever, None, args.topk, args.batch_size)
    result["retriever_users"] = args.retriever_users
    result["retriever_users_per_s"] = round(args.retriever_users / seconds, 1)
    if args.ranker_run is not None:
        start = time.perf_counter()
        ranker_flags = finished_run(args.ranker_run, RANKER, "ranker_run")
        metrics = read_json_object(args.ranker_run / "test_metrics.json")
        check_candidates(metrics, args.retriever_run)
        ranker = Ranker(args.ranker_run, ranker_flags, metrics, split, device)
        result["ranker_load_s"] = round(time.perf_counter() - start, 3)
        result["ranker_model"] = ranker_flags.llm_base_model
        seconds = timed_recommend(requests[: args.ranker_users], split, retriever, ranker, args.topk, args.batch_size)
        result["ranker_users"] = args.ranker_users
        result["ranker_users_per_s"] = round(args.ranker_users / seconds, 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"recommend bench: {split.name}")
    for name, value in result.items():
        print(f"  {name:<22} {value}")
    out = REPO_ROOT / "experiments" / "bench" / f"recommend_{split.name}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
