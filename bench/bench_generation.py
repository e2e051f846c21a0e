"""The paper's Figure 3: ranking 20 candidates with one verbalizer forward pass vs generating the ranked list.

    python -m bench.bench_generation --llm_base_model smollm2-135m --num_threads 2          # CPU
    python -m bench.bench_generation --random_init llama-2-7b --no-load_in_4bit             # GPU, 7B shapes

For each average title length L (tokens), a prompt shows 20 history titles and 20 candidate titles of L tokens
each (random token ids: only the lengths matter for speed) plus the template. The verbalizer reads the letter
logits of one forward pass; generation greedily writes the ranked list, 20 titles of L tokens (20 x L new tokens,
KV cache on), as a generative ranker must. Seconds per user at batch 1: the median of --repeats after one untimed
run of each shape. Writes experiments/bench/generation_<model>.json and, with matplotlib, a PNG of time vs L.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.bench_capacity import LETTERS, llm_dtype, random_model, synchronize
from config import SETTING, add_bool_arg
from model.llm import load_model
from trainer.runtime import resolve_device
from utils.files import REPO_ROOT, atomic_write_json

TEMPLATE_TOKENS = 60  # instruction, field names, letters and separators around the 40 titles
CANDIDATES = 20


def seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # untimed: kernels, allocator, KV-cache shapes
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_base_model", default="smollm2-135m")
    parser.add_argument("--random_init", default=None, help="shapes of bench_capacity.py's SHAPES instead")
    add_bool_arg(parser, "load_in_4bit", None, "NF4 4-bit base model (default: on iff CUDA)", role=SETTING)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--llm_dtype", choices=("auto", "bf16", "fp32"), default="auto", help="as train_ranker.py's")
    parser.add_argument("--title_lengths", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per shape (generation: 1 is plenty)")
    parser.add_argument("--generation_repeats", type=int, default=1)
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="default experiments/bench/generation_<model>.json")
    return parser.parse_args(argv)


def time_title_length(model, length: int, args: argparse.Namespace, device: torch.device, generator) -> dict:
    """One row: the verbalizer's pass against generating the ranked list, for titles of `length` tokens."""
    vocab = model.config.vocab_size
    letter_ids = torch.tensor([i % vocab for i in LETTERS[:CANDIDATES]], device=device)
    prompt_tokens = 2 * CANDIDATES * length + TEMPLATE_TOKENS
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=generator).to(device)
    new_tokens = CANDIDATES * length

    @torch.no_grad()
    def verbalize() -> None:
        model(input_ids=prompt, logits_to_keep=1).logits[:, -1, letter_ids].float().cpu()

    @torch.no_grad()
    def generate() -> None:
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        assert out.shape[1] - prompt.shape[1] == new_tokens, "generation stopped early"

    verbalizer_s = seconds(verbalize, args.repeats, device)
    generation_s = seconds(generate, args.generation_repeats, device)
    return {
        "title_tokens": length,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": new_tokens,
        "verbalizer_s": round(verbalizer_s, 4),
        "generation_s": round(generation_s, 3),
        "ratio": round(generation_s / verbalizer_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    load_in_4bit = args.load_in_4bit if args.load_in_4bit is not None else device.type == "cuda"
    dtype = llm_dtype(args.llm_dtype, device)
    if args.random_init:
        model = random_model(args.random_init, device, load_in_4bit, dtype)
    else:
        model = load_model(args.llm_base_model, device, load_in_4bit, dtype=dtype)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in args.title_lengths:
        rows.append(time_title_length(model, length, args, device, generator))
        print(rows[-1], flush=True)
    result = {
        "model": f"random {args.random_init}" if args.random_init else args.llm_base_model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "weights": "NF4 4-bit" if load_in_4bit else str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    print(f"\n{result['model']} on {result['device']} ({result['weights']}), seconds per user at batch 1")
    print(f"{'title tokens':>12} {'prompt':>7} {'generated':>9} {'verbalizer s':>12} {'generation s':>12} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['title_tokens']:>12} {row['prompt_tokens']:>7} {row['generated_tokens']:>9} "
            f"{row['verbalizer_s']:>12.4f} {row['generation_s']:>12.2f} {row['ratio']:>6.0f}x"
        )
    name = args.random_init or Path(args.llm_base_model).name
    out = args.output or REPO_ROOT / "experiments" / "bench" / f"generation_{name}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))
    return 0


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -r requirements-dev.txt)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [row["title_tokens"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(lengths, [row["generation_s"] for row in result["rows"]], "o-", label="generate the ranked list")
    ax.plot(lengths, [row["verbalizer_s"] for row in result["rows"]], "s-", label="verbalizer (one forward pass)")
    ax.set_yscale("log")
    ax.set_xlabel("average title length (tokens)")
    ax.set_ylabel("seconds per user")
    ax.set_title(f"{result['model']}, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
