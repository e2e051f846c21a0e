"""Stage 2 of LlamaRec: an LLM (QLoRA) ranks the retriever's top-20 candidates with a verbalizer.

    python train_ranker.py --dataset_code ml-100k --llm_base_model smollm2-135m [caps]

Run folder: experiments/ranker/<dataset_name>/<run_name>/ (files: README, "Output folders"; details: docs/ranker.md).

Four modes: train an adapter (the default), finish a --resume of a run whose training had ended, test the base model
zero-shot (--lora_max_steps 0), and --eval_only. Under torchrun every process runs the same code; only rank 0 writes
(through `on_main_process`) and prints (`say`).
"""

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from config import (
    RANKER,
    data_config,
    llm_spec,
    lora_settings,
    prompt_config,
    ranker_data,
    ranker_training,
    resume_keys,
    run_cli,
)
from dataloader.candidates import Candidates, load_candidates
from dataloader.prompts import PromptBuilder, candidate_letters
from datasets import load_split, published_folder
from datasets.published import check_titles
from datasets.split import SplitData
from model.llm import LLMSpec
from trainer.run_folder import check_resume_config, prepare_run_dir, run_folder, write_run_info
from trainer.run_lock import run_lock
from trainer.run_state import SUMMARY, read_summary
from trainer.runtime import (
    init_distributed,
    is_main_process,
    leave_process_group,
    on_main_process,
    process_rank,
    resolve_device,
    set_seed,
    set_threads,
    share_from_main,
)
from utils.errors import InputError, WriteError
from utils.files import atomic_folder, sha256_file


def say(text: str) -> None:
    """Print on rank 0 only: one line per event, whatever the process count."""
    if is_main_process():
        print(text, flush=True)


@dataclass
class Setup:
    """What every mode shares: the data, the candidates, the tokenizer and prompts, the verbalizer's letters, the
    validation and test prompts."""

    device: torch.device
    split: SplitData
    candidates: Candidates
    llm: LLMSpec
    tokenizer: object
    builder: PromptBuilder
    letters: dict[str, int]
    letter_ids: torch.Tensor
    val_set: list
    test_set: list
    eval_batch: int


def run(flags: argparse.Namespace) -> dict:
    device = resolve_device(flags.device)  # under torchrun: the GPU of this process's LOCAL_RANK
    init_distributed(device)
    flags.processes = process_rank()[1]
    set_seed(flags.seed)
    set_threads(flags.num_threads)
    record = llm_dtype_record(flags.llm_dtype, device)
    say(f"LLM dtype: {record['dtype']} (--llm_dtype auto picks {record['auto_picks']} here: {record['why']})")
    run_dir = run_folder(flags.experiment_root, "ranker", flags.dataset_name, flags.run_name)
    with main_process_lock(run_dir, flags.take_over):  # one writer per run folder, until this process ends
        return run_in_folder(flags, device, run_dir)


def run_in_folder(flags: argparse.Namespace, device: torch.device, run_dir: Path) -> dict:
    """The mode the flags ask for, in the run folder this launch holds the lock of."""
    if flags.eval_only:
        adapter = saved_adapter(flags, run_dir)  # checked before the slow preparation
        return evaluate_saved(flags, prepare(flags, device), run_dir, adapter)
    check_run_folder(flags, run_dir)
    setup = prepare(flags, device)
    on_main_process(lambda: prepare_run_dir(run_dir, "ranker", flags.resume, flags.overwrite))
    on_main_process(lambda: write_shared_files(run_dir, flags, setup))
    say(f"run folder: {run_dir}")
    if flags.resume and (run_dir / "adapter" / "adapter_config.json").is_file():
        model, trained, summary = resume_finished(setup, run_dir)
    elif flags.lora_max_steps == 0:
        model, trained, summary = zero_shot(setup, "--lora_max_steps 0")
    else:
        model, trained, summary = train_new(flags, setup, run_dir)
    result, rankings = test(flags, setup, model, trained, summary)
    on_main_process(lambda: write_test_files(run_dir, result, rankings))
    say(f"results: {run_dir / 'test_metrics.json'}")
    return result


@contextmanager
def main_process_lock(run_dir: Path, take_over: bool) -> Iterator[None]:
    """Rank 0 holds the run folder's lock: it alone writes the folder, and the other processes of its launch would be
    refused by its lock. Every process learns whether rank 0 got it, so a refusal ends them all with its error line
    instead of leaving them waiting at the next barrier."""
    with ExitStack() as held:
        refused = None
        if is_main_process():
            try:
                held.enter_context(run_lock(run_dir, take_over))
            except (InputError, WriteError) as e:
                refused = e
        refused = share_from_main(refused)
        if refused is not None:
            leave_process_group()
            raise refused
        yield


def prepare(flags: argparse.Namespace, device: torch.device) -> Setup:
    # transformers and peft cost seconds to import: only here, so --help and bad flags answer at once
    from dataloader.ranker_data import build_eval_sets
    from model.llm import load_tokenizer, resolve_model_path
    from trainer.ranker_eval import eval_batch_size
    from trainer.verbalizer import letter_token_ids

    llm, data = llm_spec(flags), ranker_data(flags)
    for name in (llm.base_model, llm.tokenizer):
        resolve_model_path(name)  # a missing .gguf / embedded model fails before any run folder exists
    split = load_split(data_config(flags))
    check_titles(split, published_folder(data_config(flags)))  # before any run folder exists
    retrieved = (
        flags.llm_retrieved_path or flags.experiment_root / "retriever" / flags.dataset_name / f"seed{flags.seed}"
    )
    candidates = load_candidates(retrieved, split=split)
    tokenizer = load_tokenizer(llm.tokenizer, llm.cache_dir)
    builder = PromptBuilder(tokenizer, split.titles, prompt_config(flags))
    letters = letter_token_ids(builder, data.num_candidates)
    letter_ids = torch.tensor([letters[c] for c in candidate_letters(data.num_candidates)], dtype=torch.long)
    start = time.time()
    val_set, test_set = build_eval_sets(builder, split, candidates, data)
    say(
        f"prompts: {len(val_set)} validation users, {len(test_set)}/{len(candidates.test['users'])} test users "
        f"with the true item among the {data.num_candidates} candidates ({time.time() - start:.1f} s)"
    )
    if not test_set:
        raise InputError(f"{candidates.path}: no test user has the true item among the top {data.num_candidates}")
    if flags.llm_fusion == "linear" and not val_set:
        raise InputError(
            f"--llm_fusion linear: expected validation users to choose the weight on, found none of "
            f"{len(candidates.val['users'])} with the true item among the top {data.num_candidates} in {candidates.path}"
        )
    eval_batch = eval_batch_size(flags.llm_eval_batch_size, flags.lora_micro_batch_size, device)
    return Setup(device, split, candidates, llm, tokenizer, builder, letters, letter_ids, val_set, test_set, eval_batch)


def check_run_folder(flags: argparse.Namespace, run_dir: Path) -> None:
    """Every process checks the folder and the --resume flags, before anything slow and before rank 0 creates (or,
    with --overwrite, clears) the folder."""
    prepare_run_dir(run_dir, "ranker", flags.resume, flags.overwrite, create=False)
    if flags.resume:
        # a resumed DDP run needs the process count it started with: its data order and RNG states depend on it
        check_resume_config(run_dir, vars(flags), resume_keys(RANKER))


def llm_dtype_record(dtype: str, device: torch.device) -> dict:
    """The dtype that runs, and what --llm_dtype auto picks on this machine and why (the CPU's flags, the GPU, or a
    timed product): environment.json's `llm_dtype`, printed at the start."""
    from model.llm import auto_dtype

    picked, why = auto_dtype(device.type)
    return {"dtype": dtype, "auto_picks": picked, "why": why}


def write_shared_files(folder: Path, flags: argparse.Namespace, setup: Setup) -> None:
    """config.json, environment.json, verbalizer.json and prompts_sample.jsonl (a run folder's and eval/'s)."""
    from trainer.ranker_eval import write_prompts_sample
    from trainer.verbalizer import save_verbalizer

    write_run_info(folder, vars(flags), flags.seed, {"llm_dtype": llm_dtype_record(flags.llm_dtype, setup.device)})
    save_verbalizer(folder / "verbalizer.json", setup.letters, setup.tokenizer.eos_token_id, setup.llm.tokenizer)
    write_prompts_sample(folder / "prompts_sample.jsonl", setup.test_set, setup.builder, setup.split)


def load_base(setup: Setup):
    from model.llm import load_model

    quantized = setup.llm.quantized_on(setup.device)
    model = load_model(
        setup.llm.base_model, setup.device, quantized, setup.llm.cache_dir, setup.llm.dtype_on(setup.device)
    )
    precision = f"NF4 4-bit, computing in {setup.llm.dtype}" if quantized else model.dtype
    say(f"model: {setup.llm.base_model} ({type(model).__name__}, {precision}) on {setup.device}")
    return model


def load_trained(setup: Setup, adapter: Path):
    from model.llm import load_adapter

    return load_adapter(load_base(setup), adapter)


def resume_finished(setup: Setup, run_dir: Path) -> tuple[object, bool, dict]:
    """--resume of a run whose training had ended: its best adapter and its training summary, then the test."""
    say(f"--resume: training finished before; loading the best adapter from {run_dir / 'adapter'}")
    summary = read_summary(run_dir)
    if summary is None:
        summary = {"note": f"no {SUMMARY} (an older run)"}
    return load_trained(setup, run_dir / "adapter"), True, summary


def zero_shot(setup: Setup, why: str) -> tuple[object, bool, dict]:
    say(f"{why}: no training; the test below is ZERO-SHOT (base model, no adapter)")
    return load_base(setup), False, {}


def train_new(flags: argparse.Namespace, setup: Setup, run_dir: Path) -> tuple[object, bool, dict]:
    """Train an adapter (continuing the newest checkpoint with --resume), save the best one, return it."""
    from dataloader.ranker_data import build_train_set
    from model.llm import add_lora, use_gradient_checkpointing
    from trainer.ranker_train import accumulation_steps, ranker_trainer, save_adapter, train_adapter
    from trainer.verbalizer import check_training_target

    data, training = ranker_data(flags), ranker_training(flags)
    train_set = build_train_set(
        setup.builder, setup.split, setup.candidates, data, setup.letter_ids.tolist(), setup.tokenizer.eos_token_id
    )
    say(f"training prompts: {len(train_set)} ({data.train_candidates} candidates)")
    if len(train_set) == 0:
        return zero_shot(setup, "no training prefixes in the data")
    if not setup.val_set:
        raise InputError(
            f"{setup.candidates.path}: no validation user has the true item among the top {data.num_candidates}"
        )
    check_training_target(train_set, setup.letters)
    processes = process_rank()[1]
    accumulation = accumulation_steps(training, processes)
    say(
        f"global batch: {processes} process(es) x micro-batch {training.micro_batch_size} x accumulation "
        f"{accumulation} = {processes * training.micro_batch_size * accumulation} prompts per step"
    )
    model = load_base(setup)
    # prompt + answer letter: validation prompts are built like training ones and are already tokenised
    longest = max(len(e.input_ids) for e in setup.val_set) + 2
    checkpointing = use_gradient_checkpointing(flags.gradient_checkpointing, model, training.micro_batch_size, longest)
    model = add_lora(
        model,
        lora_settings(flags),
        quantized=setup.llm.quantized_on(setup.device),
        gradient_checkpointing=checkpointing,
    )
    trainer = ranker_trainer(
        model,
        training,
        train_set,
        setup.val_set,
        setup.letter_ids,
        setup.tokenizer,
        setup.eval_batch,
        setup.device,
        run_dir,
    )
    summary = train_adapter(trainer, run_dir, flags.resume)
    on_main_process(lambda: save_adapter(trainer.model, run_dir, summary))
    return trainer.model, True, summary


def test(flags: argparse.Namespace, setup: Setup, model, trained: bool, summary: dict) -> tuple[dict, list[str]]:
    """The final validation (fusion weight) and the test: test_metrics.json's content and test_rankings.jsonl's
    lines."""
    from trainer.ranker_eval import REPORT_KS, format_table, test_and_report

    report, rankings = test_and_report(
        model, setup.val_set, setup.test_set, setup.candidates.test, setup.split, setup.letter_ids,
        setup.tokenizer.pad_token_id, setup.eval_batch, setup.device, fusion=flags.llm_fusion == "linear", seed=flags.seed,
    )  # fmt: skip
    timing = {**summary, **report.pop("timing")}
    say(format_table(report, REPORT_KS, Path(setup.llm.base_model).name + ("" if trained else " (zero-shot)")))
    say(
        f"test: {len(setup.test_set)} users in {timing['test_seconds']:.1f} s ({timing['test_users_per_s']:.2f} users/s)"
    )
    result = {
        "dataset": setup.split.name,
        "llm": setup.llm.base_model,
        "load_in_4bit": setup.llm.quantized_on(setup.device),
        "llm_dtype": setup.llm.dtype,
        "trained": trained,
        "num_candidates": len(setup.letter_ids),
        "candidates_file": str(setup.candidates.path),
        "candidates_sha256": sha256_file(setup.candidates.path),
        **report,
        "timing": timing,
    }
    return result, rankings


def write_test_files(folder: Path, result: dict, rankings: list[str]) -> None:
    from trainer.ranker_eval import write_results

    write_results(folder, result, rankings)


def evaluate_saved(flags: argparse.Namespace, setup: Setup, run_dir: Path, adapter: Path | None) -> dict:
    """--eval_only: the saved adapter (None: the base model) tested into <run folder>/eval/, written whole or not at
    all; the run's own files stay untouched."""
    say(f"--eval_only: {'the base model (zero-shot)' if adapter is None else adapter}")
    if adapter is None:
        model, trained, _ = zero_shot(setup, "--eval_adapter none")
    else:
        model, trained = load_trained(setup, adapter), True
    result, rankings = test(flags, setup, model, trained, {})
    on_main_process(lambda: write_eval_folder(run_dir / "eval", flags, setup, result, rankings))
    return result


def write_eval_folder(folder: Path, flags: argparse.Namespace, setup: Setup, result: dict, rankings: list[str]) -> None:
    with atomic_folder(folder) as tmp:
        write_shared_files(tmp, flags, setup)
        write_test_files(tmp, result, rankings)
    say(f"results: {folder / 'test_metrics.json'}")  # after the rename: the path as it ends up


def saved_adapter(flags: argparse.Namespace, run_dir: Path) -> Path | None:
    """The adapter folder --eval_only evaluates: --eval_adapter, else the finished run's adapter/; None = zero-shot."""
    if flags.eval_adapter == "none":
        return None
    if flags.eval_adapter is not None:
        path = Path(flags.eval_adapter)
    else:
        check_finished(run_dir)
        path = run_dir / "adapter"
        if not path.is_dir():
            raise InputError(
                f"{run_dir}: a zero-shot run (no adapter/); pass --eval_adapter none to test the base model"
            )
    if not (path / "adapter_config.json").is_file():
        raise InputError(
            f"--eval_adapter: expected a PEFT adapter folder (with adapter_config.json) at {path}; pass the run's "
            "--run_name, an adapter folder, or 'none' for the base model"
        )
    return path


def check_finished(run_dir: Path) -> None:
    """A ranker run is evaluated or served only once it has ended: its test_metrics.json is written last."""
    if not (run_dir / "config.json").is_file():
        raise InputError(f"{run_dir}: no ranker run there (no config.json); pass the run's --run_name")
    if not (run_dir / "test_metrics.json").is_file():
        raise InputError(
            f"{run_dir}: the run has not finished (no test_metrics.json); finish it with --resume and its own flags"
        )


def main(argv: list[str] | None = None) -> int:
    return run_cli(RANKER, run, argv)


if __name__ == "__main__":
    sys.exit(main())
