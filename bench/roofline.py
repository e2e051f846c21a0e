"""The machine's own matmul rate, the yardstick of every bench: FLOPs of the timed work, achieved GFLOP/s, and their
share of what this machine's matmul reaches in the same precision. A share compares across machines (with or
without AMX / AVX-512 bf16) where seconds do not.

    python -m bench.roofline [--num_threads 2]      # the machine's rates alone

FLOPs are counted by torch's FlopCounterMode (matmuls, attention; forward and backward), so they are the work the
model's code asks for, not an estimate by formula.
"""

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from utils.files import REPO_ROOT, atomic_write_json

# (m, k, n) of C[m, n] = A[m, k] @ B[k, n]
SQUARE = (2048, 2048, 2048)
RETRIEVER_SCORES = (1730, 64, 3651)  # a training batch's labelled positions x d x items (ml-100k, --train_all_items)
LLM_PROJECTION = (615, 576, 1536)  # a 615-token prompt through SmolLM2-135M's MLP up-projection
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_features() -> dict:
    """The CPU, and the matmul instructions torch can use on it."""
    flags, name = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": name,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "threads": torch.get_num_threads(),
    }


def matmul_rate(shape: tuple[int, int, int], dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of torch.mm at this shape and dtype: the median of runs over about `seconds`, after a warm-up."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def machine_rates(
    shapes: dict[str, tuple[int, int, int]] | None = None, seconds: float = 1.0
) -> dict[str, dict[str, float]]:
    """{shape name: {"fp32": GFLOP/s, "bf16": GFLOP/s}} at the current thread count."""
    shapes = shapes or {"2048^3": SQUARE, "retriever scores": RETRIEVER_SCORES, "LLM projection": LLM_PROJECTION}
    return {
        name: {dtype_name: matmul_rate(shape, dtype, seconds) for dtype_name, dtype in DTYPES.items()}
        for name, shape in shapes.items()
    }


def _attended_pairs(query_length: int, key_length: int, is_causal: bool) -> int:
    """(query, key) pairs an attention computes: all, or with is_causal the ones torch's top-left causal mask keeps
    (query i sees keys 0..i), which is all a causal flash kernel computes up to its block edges."""
    if not is_causal:
        return query_length * key_length
    return sum(min(key_length, i + 1) for i in range(query_length))


def _cpu_flash_attention_flops(query, key, value, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """Forward: scores (d per pair) and the weighted sum of values (d_v per pair), 2 FLOPs per multiply-add."""
    batch, heads, query_length, d = query
    return 2 * batch * heads * _attended_pairs(query_length, key[-2], is_causal) * (d + value[-1])


def _cpu_flash_attention_backward_flops(
    grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *args, **kwargs
) -> int:
    """Backward, as torch counts it for the GPU kernels: the scores recomputed, then the gradients of the values
    and of the weights (d_v per pair each), of the queries and of the keys (d per pair each)."""
    batch, heads, query_length, d = query
    return 2 * batch * heads * _attended_pairs(query_length, key[-2], is_causal) * (3 * d + 2 * value[-1])


# torch's FlopCounterMode counts the GPU attention kernels but not the CPU flash kernel that
# scaled_dot_product_attention runs on a CPU: without these, attention would count as no work at all.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def count_flops(work: Callable[[], object]) -> int:
    """The FLOPs `work` runs (matmuls and attention, forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        work()
    return counter.get_total_flops()


def share(flops: float, seconds: float, rate_gflops: float) -> dict:
    """Achieved GFLOP/s of `flops` done in `seconds`, and its share of `rate_gflops`."""
    achieved = flops / seconds / 1e9
    return {
        "gflop": round(flops / 1e9, 2),
        "gflops_per_s": round(achieved, 1),
        "share": round(achieved / rate_gflops, 3),
    }


def print_rates(features: dict, rates: dict[str, dict[str, float]]) -> None:
    print(
        f"machine: {features['cpu']} ({features['threads']} threads; torch {features['torch_cpu_capability']}, "
        f"AMX bf16 {'yes' if features['amx_bf16'] else 'no'}, AVX-512 bf16 {'yes' if features['avx512_bf16'] else 'no'})"
    )
    print(f"  {'matmul':<18} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13}")
    for name, rate in rates.items():
        print(f"  {name:<18} {rate['fp32']:>13.0f} {rate['bf16']:>13.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "experiments" / "bench" / "roofline.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    features, rates = cpu_features(), machine_rates()
    print_rates(features, rates)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output, {"machine": features, "matmul_gflops_per_s": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
