"""Ranker speed on the machine it runs on: evaluation users/s (verbalizer, several batch sizes; the base model and
with a LoRA adapter attached, as the test runs) and LoRA training seconds per sample, with peak memory, on real
ml-100k prompts; on a CPU, each beside its FLOPs, achieved GFLOP/s and share of the machine's own matmul rate in the
model's precision (bench/roofline.py). Useful FLOPs only: padding of a batch counts as time, not as work. The first
row times the model's linear projections alone at the mean prompt length: the share a forward would reach if its
attention and elementwise work cost nothing. Every row is timed for both precisions --llm_dtype can pick, bf16 and
fp32, one after the other in this process, with how many times faster fp32 ran, and what auto picks here and why.

    python -m bench.bench_ranker [--llm_base_model smollm2-135m] [--num_threads 1] [--llm_dtypes bf16 fp32]

Prompts are the paper's (20 history items, 20 candidates = the most popular unseen items, as a
retriever stand-in; only the prompt lengths matter for speed). Writes experiments/bench/ranker.json.
"""

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.roofline import LLM_PROJECTION, SQUARE, count_flops, cpu_features, machine_rates, share
from config import default_config
from dataloader.prompts import PromptBuilder, PromptConfig
from dataloader.ranker_data import EvalExample, TrainCollator, TrainPrompts, training_prefixes
from datasets import DataConfig, load_split
from model.llm import LLM_CACHE_DIR, LoraSettings
from trainer.runtime import set_seed
from utils.files import REPO_ROOT, atomic_write_json

ORIGINAL = {"eval_users_per_s_fp32": 0.7, "eval_users_per_s_bf16": 0.9, "train_s_per_sample": 3.0}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def popular_candidates(history: list[int], popularity: np.ndarray, count: int) -> list[int]:
    seen = set(history)
    return [int(i) for i in np.argsort(-popularity) if i != 0 and i not in seen][:count]


def bench_eval(
    model, builder, split, letter_ids, users: int, batch_sizes: list[int], device, label: str = "eval"
) -> tuple[list, list]:
    """Users/s of the verbalizer at each batch size (after a warm-up) with the useful FLOPs of those users (at
    batch 1: no padding), and the prompts' lengths."""
    from trainer.ranker_eval import rank_examples

    popularity = np.bincount([i for seq in split.train for i in seq], minlength=split.num_items + 1)
    examples = []
    for user in range(users):
        history = split.train[user] + [split.val[user]]
        candidates = popular_candidates(history, popularity, 20)
        examples.append(
            EvalExample(user, history, candidates, 0, 0, builder.encode(history, candidates), [0.0] * len(candidates))
        )
    pad_id = builder.tokenizer.pad_token_id
    rank_examples(model, examples[:2], letter_ids, pad_id, 2, device)  # warm-up
    flops = count_flops(lambda: rank_examples(model, examples, letter_ids, pad_id, 1, device))
    rows = []
    for batch_size in batch_sizes:
        start = time.time()
        rank_examples(model, examples, letter_ids, pad_id, batch_size, device)
        seconds = time.time() - start
        rows.append({"what": f"{label} batch {batch_size}", "users_per_s": len(examples) / seconds, "flops": flops,
                     "seconds": seconds})  # fmt: skip
        print(f"{label} batch {batch_size}: {len(examples) / seconds:.2f} users/s", flush=True)
    return rows, [len(e.input_ids) for e in examples]


def bench_projections(model: torch.nn.Module, length: int, device: torch.device, repeats: int = 3) -> dict:
    """The model's linear projections alone: every nn.Linear but the LM head, in order, once each on a [1, length, in]
    input in the model's dtype, as one prompt's forward runs them; the median of `repeats` timings after a warm-up.
    The weights come from memory as in the forward (no layer is run twice in a row), so this is the most the forward
    could reach if attention and the elementwise work between the projections cost nothing."""
    layers = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())  # NF4 layers compute in it too
    inputs = {n: torch.randn(1, length, n, dtype=dtype, device=device) for n in {m.in_features for m in layers}}

    @torch.no_grad()
    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    run()
    flops = count_flops(run)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(f"projections alone: {seconds * 1e3:.0f} ms per {length}-token prompt", flush=True)
    return {"what": "projections alone", "ms_per_prompt": seconds * 1e3, "flops": flops, "seconds": seconds}


def bench_train(model, builder, split, letter_ids, steps: int, batch_size: int, device) -> tuple[float, list, float]:
    """Seconds per training sample of LoRA steps on real prompts (the first step excluded when there are more), the
    prompts' lengths, and the FLOPs per sample of the timed steps (forward and backward)."""
    pairs = training_prefixes(split.train, steps * batch_size, seed=0)
    eos = builder.tokenizer.eos_token_id
    dataset = TrainPrompts(builder, split.train, split.num_items, pairs, 19, letter_ids.tolist(), eos, seed=0)
    collate = TrainCollator(builder.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, lengths, batches = [], [], []

    def forward_backward(batch: dict) -> torch.Tensor:
        targets = batch["targets"]
        inputs = {k: v.to(device) for k, v in batch.items() if k != "targets"}
        logits = model(**inputs, logits_to_keep=targets.shape[1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
        loss.backward()
        return loss

    for step in range(steps):
        features = [dataset[k] for k in range(step * batch_size, (step + 1) * batch_size)]
        batches.append(collate(features))
        lengths += [len(f["prompt_ids"]) for f in features]
        start = time.time()
        loss = forward_backward(batches[-1])
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.time() - start)
        print(f"train step {step}: {times[-1]:.2f} s, loss {loss.item():.3f}", flush=True)
    first = 1 if len(times) > 1 else 0  # the first step pays one-off allocation costs
    flops = sum(count_flops(lambda b=b: forward_backward(b)) for b in batches[first:])
    optimizer.zero_grad()
    samples = (len(times) - first) * batch_size
    return sum(times[first:]) / samples, lengths, flops / samples


def machine_roofline(device: torch.device, matmul_seconds: float) -> dict | None:
    """On a CPU: the CPU's features and its matmul rates in both precisions (the yardsticks of the shares)."""
    if device.type != "cpu":
        return None
    rates = machine_rates({"2048^3": SQUARE, "LLM projection": LLM_PROJECTION}, matmul_seconds)
    return {"machine": cpu_features(), "matmul_gflops_per_s": rates}


def add_shares(run: dict, roofline: dict | None) -> dict | None:
    """Each of the run's rows with its achieved GFLOP/s and share of the machine's rate at the LLM's projection shape
    in the precision the model computes in (its --llm_dtype: NF4 computes in it too); the rate used."""
    if roofline is None:
        return None
    rates, precision = roofline["matmul_gflops_per_s"], run["llm_dtype"]
    rate = rates["LLM projection"][precision]
    for row in run["rows"]:
        row.update(share(row.pop("flops"), row.pop("seconds"), rate))
        row["share_of_2048"] = round(row["gflops_per_s"] / rates["2048^3"][precision], 3)
    return {"name": f"{precision} matmul at {'x'.join(map(str, LLM_PROJECTION))}", "gflops_per_s": rate}


def print_table(rows: list[dict], rate: dict | None, dtype: str) -> None:
    print(f"\n{'measure':28}{'value':>10}{'original':>10}{'GFLOP/s':>9}{'share':>7}")
    for row in rows:
        roof = f"{row['gflops_per_s']:9.0f}{row['share']:7.0%}" if "share" in row else ""
        if "ms_per_prompt" in row:
            print(f"{row['what'] + ' ms/prompt':28}{row['ms_per_prompt']:10.1f}{'-':>10}{roof}")
        elif "users_per_s" in row:
            value, original = f"{row['users_per_s']:10.2f}", f"{ORIGINAL['eval_users_per_s_bf16']:10.2f}"
            print(f"{row['what'] + ' users/s':28}{value}{original}{roof}")
        else:
            value, original = f"{row['s_per_sample']:10.3f}", f"{ORIGINAL['train_s_per_sample']:10.2f}"
            print(f"{row['what'] + ' s/sample':28}{value}{original}{roof}")
    if rate is not None:
        print(f"share: of {rate['name']} ({rate['gflops_per_s']:.0f} GFLOP/s, {dtype} like the model)")


def row_seconds(row: dict) -> float:
    """A row's time per unit of work (a prompt, a user, a training sample): lower is faster."""
    if "ms_per_prompt" in row:
        return row["ms_per_prompt"] / 1e3
    return 1 / row["users_per_s"] if "users_per_s" in row else row["s_per_sample"]


def speedups(runs: list[dict]) -> list[dict]:
    """Per measurement, how many times faster fp32 ran than bf16 (below 1: bf16 was faster), where both dtypes ran."""
    by_dtype = {run["llm_dtype"]: {row["what"]: row for row in run["rows"]} for run in runs}
    if set(by_dtype) != {"bf16", "fp32"}:
        return []
    return [
        {"what": what, "fp32_speedup": round(row_seconds(row) / row_seconds(by_dtype["fp32"][what]), 2)}
        for what, row in by_dtype["bf16"].items()
        if what in by_dtype["fp32"]
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_base_model", default="smollm2-135m")
    parser.add_argument("--llm_dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"],
                        help="the precisions timed, one after the other in this process")  # fmt: skip
    parser.add_argument("--eval_users", type=int, default=24)
    parser.add_argument("--eval_batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--no_merged", action="store_true", help="skip the rows of the adapter merged into the weights")
    parser.add_argument("--load_in_4bit", action="store_true", help="NF4 base model (slower on CPU)")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--matmul_seconds", type=float, default=1.0, help="time spent measuring each matmul rate")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments" / "bench" / "ranker.json")
    return parser.parse_args(argv)


def bench_dtype(args: argparse.Namespace, dtype: str, device: torch.device, split, builder, letter_ids) -> dict:
    """Every row for the model loaded in `dtype` (bf16 or fp32; NF4 computing in it with --load_in_4bit)."""
    from model.llm import TORCH_DTYPES, add_lora, load_model

    set_seed(0)
    start = time.time()
    model = load_model(args.llm_base_model, device, args.load_in_4bit, LLM_CACHE_DIR, TORCH_DTYPES[dtype])
    load_seconds = time.time() - start
    print(f"--- {dtype}: loaded in {load_seconds:.1f} s", flush=True)
    rows, lengths = bench_eval(model, builder, split, letter_ids, args.eval_users, args.eval_batch_sizes, device)
    rows.insert(0, bench_projections(model, round(float(np.mean(lengths))), device))
    model = add_lora(model, default_config(LoraSettings, dropout=0.05), quantized=args.load_in_4bit)
    rows += bench_eval(model, builder, split, letter_ids, args.eval_users, args.eval_batch_sizes, device, "eval+LoRA")[
        0
    ]
    s_per_sample, train_lengths, train_flops = bench_train(
        model, builder, split, letter_ids, args.train_steps, args.train_batch_size, device
    )
    rows.append({"what": f"train batch {args.train_batch_size}", "s_per_sample": s_per_sample,
                 "flops": train_flops, "seconds": s_per_sample})  # fmt: skip
    if not (args.load_in_4bit or args.no_merged):  # the adapter merged into the weights: no LoRA matmuls
        rows += bench_eval(
            model.merge_and_unload(), builder, split, letter_ids, args.eval_users, args.eval_batch_sizes, device,
            "eval+LoRA merged",
        )[0]  # fmt: skip
    return {
        "llm_dtype": dtype,
        "weights": "nf4" if args.load_in_4bit else dtype,
        "load_seconds": round(load_seconds, 2),
        "eval_users": len(lengths),
        "eval_prompt_tokens_mean": float(np.mean(lengths)),
        "train_prompt_tokens_mean": float(np.mean(train_lengths)),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from model.llm import auto_dtype, load_tokenizer
    from trainer.verbalizer import letter_token_ids

    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    split = load_split(default_config(DataConfig, code="ml-100k"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto, why = auto_dtype(device.type)
    print(f"--llm_dtype auto picks {auto} here: {why}", flush=True)
    tokenizer = load_tokenizer(args.llm_base_model, LLM_CACHE_DIR)
    builder = PromptBuilder(tokenizer, split.titles, default_config(PromptConfig))
    letter_ids = torch.tensor(list(letter_token_ids(builder, 20).values()))
    runs = [bench_dtype(args, dtype, device, split, builder, letter_ids) for dtype in args.llm_dtypes]
    roofline = machine_roofline(device, args.matmul_seconds)
    rates = [add_shares(run, roofline) for run in runs]
    result = {
        "model": args.llm_base_model,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "auto": {"llm_dtype": auto, "why": why},
        "runs": runs,
        "fp32_speedup": speedups(runs),
        **(roofline or {}),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "original_reference": ORIGINAL,
    }
    atomic_write_json(args.out, result)
    for run, rate in zip(runs, rates, strict=True):
        print(
            f"\n{run['llm_dtype']} ({run['weights']} weights), mean prompt {run['eval_prompt_tokens_mean']:.0f} tokens"
        )
        print_table(run["rows"], rate, run["llm_dtype"])
    for row in result["fp32_speedup"]:
        print(f"fp32 against bf16, {row['what']}: {row['fp32_speedup']:.2f}x as fast")
    print(f"--llm_dtype auto picks {auto} here: {why}")
    print(f"peak RSS {result['peak_rss_mib']} MiB (the process, both dtypes)")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
