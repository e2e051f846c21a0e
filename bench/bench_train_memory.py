"""Retriever training memory over many steps: the process's resident memory every --report_every steps of real
training steps (train_step, the run's batches), with oneDNN's primitive cache at a given capacity.

    python -m bench.bench_train_memory --dataset_code custom --custom_path experiments/bench/scale_data/1M \
        --bert_max_len 200 --train_batch_size 128 --steps 300 --onednn_cache 16

--onednn_cache is what train_retriever.py sets (trainer/runtime.py: RETRIEVER_ONEDNN_CACHE); 1024 is oneDNN's own
default. Writes experiments/bench/train_memory_<dataset>_cache<N>.json.
"""

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

from config import RETRIEVER, build_parser, data_config, parse_flags, retriever_spec, retriever_training
from utils.errors import InputError
from utils.files import atomic_write_json


def rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(RETRIEVER)
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    group = parser.add_argument_group("bench")
    group.add_argument("--steps", type=int, default=300)
    group.add_argument("--report_every", type=int, default=50)
    group.add_argument("--onednn_cache", type=int, default=16, help="oneDNN primitive cache capacity (1024: oneDNN's)")
    try:
        flags = parse_flags(RETRIEVER, argv, parser)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(flags.onednn_cache)  # before torch's first operator
    import torch

    from dataloader.retriever_data import epoch_batches, training_windows, window_step
    from datasets import load_split
    from model.retrievers import build_retriever
    from trainer.retriever_train import build_optimizer, build_scheduler, train_step

    torch.set_num_threads(flags.num_threads or 2)
    torch.manual_seed(flags.seed)
    split = load_split(data_config(flags))
    spec, training = retriever_spec(flags), retriever_training(flags)
    model = build_retriever(spec, split.num_items)
    tokens, labels = training_windows(
        split.train, spec.max_len, window_step(training.sliding_window_size, spec.max_len), training.train_all_items
    )
    optimizer = build_optimizer(model, training.lr, training.weight_decay, training.adam_epsilon)
    scheduler = build_scheduler(optimizer, False, 0, 10**9)
    start_rss, rows, seconds, step, epoch = rss_mib(), [], [], 0, 0
    while step < flags.steps:
        for index in epoch_batches(len(tokens), training.batch_size, training.seed, epoch):
            start = time.perf_counter()
            train_step(model, optimizer, scheduler, tokens[index], labels[index], training.max_grad_norm)
            seconds.append(time.perf_counter() - start)
            step += 1
            if step % flags.report_every == 0:
                rows.append({"step": step, "rss_mib": round(rss_mib())})
                print(f"step {step}: {rows[-1]['rss_mib']} MiB", flush=True)
            if step == flags.steps:
                break
        epoch += 1
    result = {
        "dataset": split.name,
        "onednn_cache": flags.onednn_cache,
        "threads": torch.get_num_threads(),
        "rss_before_training_mib": round(start_rss),
        "rss": rows,
        "median_step_seconds": round(statistics.median(seconds[5:] or seconds), 4),
    }
    print(f"median step {result['median_step_seconds']} s; before training {result['rss_before_training_mib']} MiB")
    out = flags.experiment_root / "bench" / f"train_memory_{split.name}_cache{flags.onednn_cache}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
