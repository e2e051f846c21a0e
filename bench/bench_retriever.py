"""Retriever speed: training throughput, evaluation throughput, candidate export time, peak memory.

    python -m bench.bench_retriever --dataset_code ml-100k --num_threads 2 --bench_epochs 1 --no-train_all_items \
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

from bench.roofline import RETRIEVER_SCORES, SQUARE, count_flops, cpu_features, machine_rates, share
from config import (
    RETRIEVER,
    build_parser,
    candidate_export,
    data_config,
    parse_flags,
    retriever_spec,
    retriever_training,
)
from dataloader.retriever_data import epoch_batches, eval_data, training_windows, window_step
from datasets import load_split
from model.retrievers import build_retriever
from trainer.retriever_eval import evaluate, train_prefix_candidates
from trainer.retriever_export import export_candidates
from trainer.retriever_train import build_optimizer, build_scheduler, train_step
from trainer.runtime import resolve_device, set_seed
from utils.errors import InputError
from utils.files import atomic_write_json


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(flags: argparse.Namespace, bench_epochs: int, train_only: bool = False) -> dict:
    torch.set_num_threads(flags.num_threads if flags.num_threads > 0 else torch.get_num_threads())
    set_seed(flags.seed)
    split = load_split(data_config(flags))
    device = resolve_device(flags.device)  # --device: auto (cuda if available), cpu or cuda
    spec, training = retriever_spec(flags), retriever_training(flags)
    model = build_retriever(spec, split.num_items).to(device)
    max_len = spec.max_len
    step_size = window_step(training.sliding_window_size, max_len)
    tokens, labels = training_windows(split.train, max_len, step_size, training.train_all_items)
    optimizer = build_optimizer(model, training.lr, training.weight_decay, training.adam_epsilon)
    scheduler = build_scheduler(optimizer, training.enable_lr_schedule, training.warmup_steps, 10**9)
    result = {
        "dataset": split.name,
        "retriever_model": spec.model,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "train_sequences_per_epoch": len(tokens),
        "steps_per_epoch": len(epoch_batches(len(tokens), training.batch_size, training.seed, 0)),
        "batch_size": training.batch_size,
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
            training.max_grad_norm,
            training.label_smoothing,
        )

    batches = epoch_batches(len(tokens), training.batch_size, training.seed, 0)
    result.update(time_epochs(step, batches, len(tokens), training, bench_epochs, device))
    if train_only:
        result["peak_rss_mib"] = peak_rss_mib()
        return result

    result.update(time_evaluation(model, split, spec, training, candidate_export(flags), device))
    result["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def time_epochs(step, batches: list, sequences: int, training, bench_epochs: int, device: torch.device) -> dict:
    """The fastest of `bench_epochs` training epochs (after two warm-up steps) and an epoch's FLOPs."""
    result = {}
    # Two warm-up steps (allocator, thread pool, CUDA kernels and their autotuning) outside the timing.
    for index in batches[:2]:
        step(index)
    # An epoch's FLOPs: every batch but the last has the first one's shape.
    full, last = count_flops(lambda: step(batches[0])), count_flops(lambda: step(batches[-1]))
    result["train_flops_per_epoch"] = full * (len(batches) - 1) + last
    epoch_seconds = []
    for epoch in range(bench_epochs):
        synchronize(device)
        start = time.perf_counter()
        for index in epoch_batches(sequences, training.batch_size, training.seed, epoch):
            step(index)
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
    result["train_seconds_per_epoch"] = min(epoch_seconds)
    result["train_seconds_per_epoch_all"] = [round(s, 3) for s in epoch_seconds]
    result["train_sequences_per_second"] = sequences / min(epoch_seconds)
    return result


def time_evaluation(model, split, spec, training, export, device: torch.device) -> dict:
    """Validation (full ranking) with its FLOPs, the candidate export, and its training-prefix part alone."""
    result, max_len = {}, spec.max_len
    val = eval_data(split, "val", max_len)
    start = time.perf_counter()
    evaluate(model, val, training.val_batch_size, list(training.metric_ks), device)
    result["eval_seconds"] = time.perf_counter() - start
    result["eval_flops"] = count_flops(
        lambda: evaluate(model, val, training.val_batch_size, list(training.metric_ks), device)
    )
    result["eval_users_per_second"] = val.num_users / result["eval_seconds"]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        export_candidates(model, split, spec, export, Path(tmp), device, (training, Path(tmp) / "folds"))
        result["candidates_file_bytes"] = (Path(tmp) / "candidates.npz").stat().st_size
    result["export_seconds"] = time.perf_counter() - start
    result["retrieved_topk"] = min(export.topk, split.num_items)
    # The training-prefix part of that export on its own (every prefix of every training sequence).
    start = time.perf_counter()
    prefixes = train_prefix_candidates(model, split.train, max_len, export.train_topk, 256, device)
    result["train_prefix_seconds"] = time.perf_counter() - start
    result["train_prefixes"] = len(prefixes["users"])
    return result


def add_roofline(result: dict, matmul_seconds: float) -> list[tuple[str, str]]:
    """The machine's fp32 matmul rates (at 2048^3 and at the score shape), each timing's achieved GFLOP/s and share
    of them; the rows to print."""
    rates = machine_rates({"2048^3": SQUARE, "retriever scores": RETRIEVER_SCORES}, matmul_seconds)
    result["machine"], result["matmul_gflops_per_s"] = cpu_features(), rates
    rows = [("matmul fp32 GFLOP/s", f"{rates['2048^3']['fp32']:.0f} at 2048^3, {rates['retriever scores']['fp32']:.0f} "
             f"at the score shape {'x'.join(map(str, RETRIEVER_SCORES))} (bf16: {rates['2048^3']['bf16']:.0f}, "
             f"{rates['retriever scores']['bf16']:.0f})")]  # fmt: skip
    for what, flops, seconds in (
        ("train", "train_flops_per_epoch", "train_seconds_per_epoch"),
        ("eval", "eval_flops", "eval_seconds"),
    ):
        if flops in result:
            at_shape = share(result[flops], result[seconds], rates["retriever scores"]["fp32"])
            at_square = share(result[flops], result[seconds], rates["2048^3"]["fp32"])
            result[f"{what}_roofline"] = {**at_shape, "share_of_2048": at_square["share"]}
            rows.append((f"{what} GFLOP/s (share)", f"{at_shape['gflops_per_s']:.0f} of {at_shape['gflop']:.1f} GFLOP: "
                         f"{at_shape['share']:.0%} of fp32 at the score shape, {at_square['share']:.0%} of 2048^3"))  # fmt: skip
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(RETRIEVER)  # every flag of train_retriever.py, plus the bench's own
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    group = parser.add_argument_group("bench")
    group.add_argument("--bench_epochs", type=int, default=1, help="timed training epochs (the fastest is reported)")
    group.add_argument("--matmul_seconds", type=float, default=1.0, help="time spent measuring each matmul rate")
    group.add_argument(
        "--train_only", action="store_true", help="time the training epochs only (no validation, export)"
    )
    try:
        flags = parse_flags(RETRIEVER, argv, parser)
        if flags.num_threads == 0:
            flags.num_threads = 2  # the CPU the reference timings were measured on has 2 cores
        result = bench(flags, flags.bench_epochs, flags.train_only)
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
    if not flags.train_only:
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
    if resolve_device(flags.device).type == "cpu":
        rows += add_roofline(result, flags.matmul_seconds)
    rows += [
        ("peak RSS (MiB)", f"{result['peak_rss_mib']:.0f}"),
        ("torch threads / load", f"{result['torch_threads']} / {result['load_average_at_start']:.2f}"),
    ]
    if "peak_cuda_mib" in result:
        rows.append(("peak CUDA memory (MiB)", f"{result['peak_cuda_mib']:.0f}"))
    print(f"retriever bench: {result['dataset']} on {result['device']}")
    for name, value in rows:
        print(f"  {name:<22} {value}")
    suffix = ("" if flags.retriever_model == "lru" else f"_{flags.retriever_model}") + (
        "_train" if flags.train_only else ""
    )
    out = flags.experiment_root / "bench" / f"retriever_{flags.dataset_name}{suffix}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
