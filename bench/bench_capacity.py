"""Capacity check before a long ranker run: load time, training s/sample, eval users/s, peak memory and the
projected wall time of one epoch, for the model and batch sizes you are about to use.

    python -m bench.bench_capacity --random_init llama-2-7b --micro_batch_size 16 --eval_batch_sizes 16 32
    python -m bench.bench_capacity --llm_base_model meta-llama/Llama-2-7b-hf --no-load_in_4bit --gradient_checkpointing off
    python -m bench.bench_capacity --llm_base_model smollm2-135m --micro_batch_size 1 --eval_batch_sizes 1   # CPU

--random_init builds a randomly initialised model of the named shapes on the device (no download; the weights do not
change the speed). Prompts are random token ids of --prompt_tokens (the paper's ml-100k prompts are ~700 Llama-2
tokens); the step is the ranker's: LoRA on q/v, loss on the answer letter and EOS, AdamW. Every timing follows
--warmup_steps untimed steps of the same shape and is the median of --steps timed ones. Writes
experiments/bench/capacity_<model>.json.
"""

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from config import SETTING, add_bool_arg, default_config
from model.llm import (
    TORCH_DTYPES,
    LoraSettings,
    add_lora,
    fp32_lm_head,
    load_model,
    resolve_llm_dtype,
    training_memory_bytes,
    use_gradient_checkpointing,
)
from trainer.runtime import resolve_device
from utils.errors import InputError
from utils.files import REPO_ROOT, atomic_write_json

SHAPES = {  # LlamaConfig arguments
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "llama-2-13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
LETTERS = list(range(29909, 29929))  # Llama-2's in-context letter tokens A..T (any 20 ids time the same)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llm_dtype(asked: str, device: torch.device) -> torch.dtype:
    """--llm_dtype as train_ranker.py resolves it (auto: bf16 where the GPU or CPU computes it natively)."""
    return TORCH_DTYPES[resolve_llm_dtype(asked, device.type)]


def random_model(shape: str, device: torch.device, load_in_4bit: bool, dtype: torch.dtype):
    """A randomly initialised Llama of the named shapes in `dtype`: built on the device, or, for 4-bit, saved and
    reloaded through the ranker's own loading path so it is quantized exactly as a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    if not load_in_4bit:
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        model.config.use_cache = False
        fp32_lm_head(model)
        return model
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
        return load_model(folder, device, True, dtype=dtype)


def timed(fn, warmup: int, steps: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_base_model", default="smollm2-135m", help="as train_ranker.py's")
    parser.add_argument("--random_init", choices=sorted(SHAPES), default=None, help="instead of --llm_base_model")
    add_bool_arg(parser, "load_in_4bit", None, "NF4 4-bit base model (default: on iff CUDA)", role=SETTING)
    parser.add_argument("--gradient_checkpointing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--llm_dtype", choices=("auto", "bf16", "fp32"), default="auto", help="as train_ranker.py's")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--eval_batch_sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--prompt_tokens", type=int, default=700)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--epoch_prompts", type=int, default=88444, help="training prompts of one epoch (ml-100k)")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--output", type=Path, default=None, help="default experiments/bench/capacity_<model>.json")
    args = parser.parse_args(argv)
    try:
        result = bench(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"capacity check: {result['model']} on {result['device']}")
    for key, value in result.items():
        print(f"  {key:<34} {value}")
    name = (args.random_init or Path(args.llm_base_model).name).replace("/", "_")
    out = args.output or REPO_ROOT / "experiments" / "bench" / f"capacity_{name}.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


def bench(args: argparse.Namespace) -> dict:
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    load_in_4bit = args.load_in_4bit if args.load_in_4bit is not None else cuda
    dtype = llm_dtype(args.llm_dtype, device)
    start = time.perf_counter()
    if args.random_init:
        model = random_model(args.random_init, device, load_in_4bit, dtype)
    else:
        model = load_model(args.llm_base_model, device, load_in_4bit, dtype=dtype)
    result = {
        "model": f"random {args.random_init}" if args.random_init else args.llm_base_model,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "weights": f"NF4 4-bit, computing in {dtype}" if load_in_4bit else str(dtype),
        "load_seconds": round(time.perf_counter() - start, 1),
        "prompt_tokens": args.prompt_tokens,
        "micro_batch_size": args.micro_batch_size,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        result["gpu_memory_total_gib"] = round(total / 2**30, 1)
    tokens = args.prompt_tokens + 2  # prompt + letter (+ EOS target)
    checkpointing = use_gradient_checkpointing(args.gradient_checkpointing, model, args.micro_batch_size, tokens)
    result["gradient_checkpointing"] = "on" if checkpointing else "off"
    result["estimated_step_memory_gib_without_checkpointing"] = round(
        training_memory_bytes(model, args.micro_batch_size, tokens) / 2**30, 1
    )
    model = add_lora(model, default_config(LoraSettings), quantized=load_in_4bit, gradient_checkpointing=checkpointing)
    generator = torch.Generator().manual_seed(0)
    result.update(time_training(model, args, device, generator, dtype))
    result.update(time_evaluation(model, args, device, generator))
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["epoch_prompts"] = args.epoch_prompts
    hours = args.epoch_prompts * result["train_s_per_sample"] / 3600
    result["projected_epoch_hours"] = round(hours, 2)
    return result


def time_training(
    model, args: argparse.Namespace, device: torch.device, generator: torch.Generator, dtype: torch.dtype
) -> dict:
    """Seconds per training sample of the ranker's step (LoRA on q/v, loss on letter and EOS, AdamW; bf16 autocast on
    a GPU with bf16 weights or compute, as the ranker's Trainer)."""
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    batch = torch.randint(3, vocab, (args.micro_batch_size, args.prompt_tokens + 1), generator=generator).to(device)
    targets = torch.tensor([[LETTERS[0] % vocab, 2]] * args.micro_batch_size, device=device)

    def train_step() -> None:
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and dtype == torch.bfloat16):
            logits = model(input_ids=batch, logits_to_keep=2).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step_seconds = timed(train_step, args.warmup_steps, args.steps, device)
    except torch.OutOfMemoryError:
        raise InputError(
            f"--micro_batch_size {args.micro_batch_size}: a training step ran out of GPU memory; lower it, or pass "
            "--gradient_checkpointing on / --load_in_4bit"
        ) from None
    result = {
        "train_step_seconds": [round(s, 3) for s in step_seconds],
        "train_s_per_sample": round(statistics.median(step_seconds) / args.micro_batch_size, 4),
    }
    if cuda:
        result["train_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def time_evaluation(model, args: argparse.Namespace, device: torch.device, generator: torch.Generator) -> dict:
    """Users per second of the verbalizer at each of --eval_batch_sizes."""
    model.eval()
    vocab = model.config.vocab_size
    letter_ids = torch.tensor([i % vocab for i in LETTERS], device=device)
    result = {}
    for size in args.eval_batch_sizes:
        prompts = torch.randint(3, vocab, (size, args.prompt_tokens), generator=generator).to(device)

        @torch.no_grad()
        def eval_step(prompts: torch.Tensor = prompts) -> None:
            model(input_ids=prompts, logits_to_keep=1).logits[:, -1, letter_ids].float().cpu()

        seconds = statistics.median(timed(eval_step, args.warmup_steps, args.steps, device))
        result[f"eval_users_per_s_batch_{size}"] = round(size / seconds, 2)
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


if __name__ == "__main__":
    sys.exit(main())
