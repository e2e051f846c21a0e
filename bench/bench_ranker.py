"""Ranker speed on the machine it runs on: evaluation users/s (verbalizer, several batch sizes) and LoRA training
seconds per sample, with peak memory, on real ml-100k prompts.

    python bench/bench_ranker.py [--llm_base_model smollm2-135m] [--num_threads 1] [--train_batch_size 1]

Prompts are the paper's (20 history items, 20 candidates = the most popular unseen items, as a
retriever stand-in; only the prompt lengths matter for speed). Writes experiments/bench/ranker.json.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import parse_config  # noqa: E402
from dataloader.prompts import PromptBuilder  # noqa: E402
from dataloader.ranker_data import EvalExample, TrainCollator, TrainPrompts, training_prefixes  # noqa: E402
from trainer.utils import REPO_ROOT, atomic_write_json, set_seed  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def popular_candidates(history: list[int], popularity: np.ndarray, count: int) -> list[int]:
    seen = set(history)
    return [int(i) for i in np.argsort(-popularity) if i != 0 and i not in seen][:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_base_model", default="smollm2-135m")
    parser.add_argument("--eval_users", type=int, default=24)
    parser.add_argument("--eval_batch_sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--load_in_4bit", action="store_true", help="NF4 base model (slower on CPU)")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments" / "bench" / "ranker.json")
    args = parser.parse_args(argv)

    from datasets import load_split
    from model.llm import add_lora, load_model, load_tokenizer
    from trainer.ranker import rank_examples
    from trainer.verbalizer import letter_token_ids

    set_seed(0)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    cfg = parse_config(["--dataset_code", "ml-100k"])
    split = load_split(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    tokenizer = load_tokenizer(args.llm_base_model, cfg.llm_cache_dir)
    model = load_model(args.llm_base_model, device, args.load_in_4bit, cfg.llm_cache_dir)
    load_seconds = time.time() - start
    builder = PromptBuilder(tokenizer, split.titles)
    popularity = np.bincount([i for seq in split.train for i in seq], minlength=split.num_items + 1)
    examples = []
    for user in range(args.eval_users):
        history = split.train[user] + [split.val[user]]
        candidates = popular_candidates(history, popularity, 20)
        examples.append(
            EvalExample(user, history, candidates, 0, 0, builder.encode(history, candidates), [0.0] * len(candidates))
        )
    letters = letter_token_ids(builder, 20)
    letter_ids = torch.tensor(list(letters.values()))
    lengths = [len(e.input_ids) for e in examples]
    rows = []
    rank_examples(model, examples[:2], letter_ids, tokenizer.pad_token_id, 2, device)  # warm-up
    for batch_size in args.eval_batch_sizes:
        start = time.time()
        rank_examples(model, examples, letter_ids, tokenizer.pad_token_id, batch_size, device)
        seconds = time.time() - start
        rows.append({"what": f"eval batch {batch_size}", "users_per_s": len(examples) / seconds})
        print(f"eval batch {batch_size}: {len(examples) / seconds:.2f} users/s", flush=True)

    model = add_lora(model, 8, 32, 0.05, ["q_proj", "v_proj"], quantized=args.load_in_4bit)
    pairs = training_prefixes(split.train, args.train_steps * args.train_batch_size, seed=0)
    eos = tokenizer.eos_token_id
    dataset = TrainPrompts(builder, split.train, split.num_items, pairs, 19, letter_ids.tolist(), eos, seed=0)
    collate = TrainCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    train_lengths = []
    for step in range(args.train_steps):
        features = [dataset[k] for k in range(step * args.train_batch_size, (step + 1) * args.train_batch_size)]
        batch = collate(features)
        train_lengths += [len(f["prompt_ids"]) for f in features]
        start = time.time()
        targets = batch.pop("targets")
        logits = model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=targets.shape[1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.time() - start)
        print(f"train step {step}: {times[-1]:.2f} s, loss {loss.item():.3f}", flush=True)
    # the first step pays one-off allocation costs; report the rest when there are any
    steady = times[1:] or times
    s_per_sample = sum(steady) / (len(steady) * args.train_batch_size)
    rows.append({"what": f"train batch {args.train_batch_size}", "s_per_sample": s_per_sample})
    result = {
        "model": args.llm_base_model,
        "device": str(device),
        "dtype": "nf4" if args.load_in_4bit else str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(load_seconds, 2),
        "eval_users": len(examples),
        "eval_prompt_tokens_mean": float(np.mean(lengths)),
        "train_prompt_tokens_mean": float(np.mean(train_lengths)),
        "rows": rows,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "original_reference": {"eval_users_per_s_fp32": 0.7, "eval_users_per_s_bf16": 0.9, "train_s_per_sample": 3.0},
    }
    atomic_write_json(args.out, result)
    print(f"\n{'measure':22}{'value':>12}{'original':>12}")
    for row in rows:
        if "users_per_s" in row:
            print(f"{row['what'] + ' users/s':22}{row['users_per_s']:12.2f}{0.9:12.2f}")
        else:
            print(f"{row['what'] + ' s/sample':22}{row['s_per_sample']:12.3f}{3.0:12.2f}")
    print(f"peak RSS {result['peak_rss_mib']} MiB; mean prompt {result['eval_prompt_tokens_mean']:.0f} tokens")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
