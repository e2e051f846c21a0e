"""Retriever speed: training throughput, evaluation throughput, candidate export time, peak memory.

    python bench/bench_retriever.py --dataset_code ml-100k --num_threads 2 --bench_epochs 1 --no-train_all_items \
        --label_smoothing 0

Uses the resolved config of train_retriever.py (any of its flags can be passed) on a freshly initialised
model; writes experiments/bench/retriever_<dataset>.json. Reference: the original code takes about 14 s per
ml-100k epoch (46 steps at batch 16, 2 torch threads) on a 2-core CPU (AMD EPYC); ml-100k's default
--train_all_items makes an epoch 53 steps, so compare epochs with --no-train_all_items (the original's windows)
and --label_smoothing 0 (the original's loss; smoothing costs no measurable time, see docs/performance.md).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import parse_config  # noqa: E402
from datasets import load_split  # noqa: E402
from trainer.retriever import (  # noqa: E402
    build_model,
    build_optimizer,
    build_scheduler,
    config_training_windows,
    epoch_batches,
    eval_data,
    evaluate,
    export_candidates,
    train_prefix_candidates,
    train_step,
)
from trainer.utils import (  # noqa: E402
    InputError,  # noqa: E402
    atomic_write_json,
    resolve_device,
    set_seed,
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(cfg: argparse.Namespace, bench_epochs: int, train_only: bool = False) -> dict:
    torch.set_num_threads(cfg.num_threads if cfg.num_threads > 0 else torch.get_num_threads())
    set_seed(cfg.seed)
    split = load_split(cfg)
    device = resolve_device(cfg.device)  # --device: auto (cuda if available), cpu or cuda
    model = build_model(cfg, split.num_items).to(device)
    max_len = cfg.bert_max_len
    tokens, labels = config_training_windows(cfg, split.train)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10**9)
    result = {
        "dataset": split.name,
        "retriever_model": cfg.retriever_model,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "train_sequences_per_epoch": len(tokens),
        "steps_per_epoch": len(epoch_batches(len(tokens), cfg.train_batch_size, cfg.seed, 0)),
        "batch_size": cfg.train_batch_size,
        "max_len": max_len,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
    }

    def step(index: torch.Tensor) -> None:
        train_step(
            model,
            optimizer,
            scheduler,
            tokens[index].to(device),
            labels[index].to(device),
            cfg.max_grad_norm,
            cfg.label_smoothing,
        )

    # Two warm-up steps (allocator, thread pool, CUDA kernels and their autotuning) outside the timing.
    batches = epoch_batches(len(tokens), cfg.train_batch_size, cfg.seed, 0)
    for index in batches[:2]:
        step(index)
    epoch_seconds = []
    for epoch in range(bench_epochs):
        synchronize(device)
        start = time.perf_counter()
        for index in epoch_batches(len(tokens), cfg.train_batch_size, cfg.seed, epoch):
            step(index)
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
    result["train_seconds_per_epoch"] = min(epoch_seconds)
    result["train_seconds_per_epoch_all"] = [round(s, 3) for s in epoch_seconds]
    result["train_sequences_per_second"] = len(tokens) / min(epoch_seconds)
    if train_only:
        result["peak_rss_mib"] = peak_rss_mib()
        return result

    val = eval_data(split, "val", max_len)
    start = time.perf_counter()
    evaluate(model, val, cfg.val_batch_size, cfg.metric_ks, device)
    result["eval_seconds"] = time.perf_counter() - start
    result["eval_users_per_second"] = val.num_users / result["eval_seconds"]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        export_candidates(cfg, split, model, Path(tmp), device)
        result["candidates_file_bytes"] = (Path(tmp) / "candidates.npz").stat().st_size
    result["export_seconds"] = time.perf_counter() - start
    result["retrieved_topk"] = min(cfg.retrieved_topk, split.num_items)
    # The training-prefix part of that export on its own (every prefix of every training sequence).
    start = time.perf_counter()
    prefixes = train_prefix_candidates(model, split.train, max_len, cfg.retrieved_train_topk, 256, device)
    result["train_prefix_seconds"] = time.perf_counter() - start
    result["train_prefixes"] = len(prefixes["users"])
    result["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench_epochs", type=int, default=1, help="timed training epochs (the fastest is reported)")
    parser.add_argument(
        "--train_only", action="store_true", help="time the training epochs only (no validation, export)"
    )
    own, rest = parser.parse_known_args(argv)
    try:
        cfg = parse_config(rest)
        if cfg.num_threads == 0:
            cfg.num_threads = 2  # the CPU the reference timings were measured on has 2 cores
        result = bench(cfg, own.bench_epochs, own.train_only)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [
        ("model", result["retriever_model"]),
        (
            "train s/epoch",
            f"{result['train_seconds_per_epoch']:.2f}  ({result['steps_per_epoch']} steps, batch {result['batch_size']})",
        ),
        ("train sequences/s", f"{result['train_sequences_per_second']:.1f}"),
    ]
    if not own.train_only:
        rows += [
            ("eval users/s", f"{result['eval_users_per_second']:.0f}"),
            (
                "export val+test+prefixes (s)",
                f"{result['export_seconds']:.2f}  (top-{result['retrieved_topk']}, {result['candidates_file_bytes'] / 1e6:.2f} MB)",
            ),
            (
                "  of which prefixes (s)",
                f"{result['train_prefix_seconds']:.2f}  ({result['train_prefixes']} training prefixes, "
                f"{result['train_prefixes'] / result['train_prefix_seconds']:.0f}/s)",
            ),
        ]
    rows += [
        ("peak RSS (MiB)", f"{result['peak_rss_mib']:.0f}"),
        ("torch threads / load", f"{result['torch_threads']} / {result['load_average_at_start']:.2f}"),
    ]
    if "peak_cuda_mib" in result:
        rows.append(("peak CUDA memory (MiB)", f"{result['peak_cuda_mib']:.0f}"))
    print(f"retriever bench: {result['dataset']} on {result['device']}")
    for name, value in rows:
        print(f"  {name:<22} {value}")
    suffix = ("" if cfg.retriever_model == "lru" else f"_{cfg.retriever_model}") + ("_train" if own.train_only else "")
    out = cfg.experiment_root / "bench" / f"retriever_{cfg.dataset_name}{suffix}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
