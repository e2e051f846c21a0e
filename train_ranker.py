"""Stage 2 of LlamaRec: an LLM (QLoRA) ranks the retriever's top-20 candidates with a verbalizer.

    python train_ranker.py --dataset_code ml-100k --llm_base_model smollm2-135m [caps]

Run folder: experiments/ranker/<dataset_name>/<run_name>/ (files: README, "Output folders"; details: docs/ranker.md).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from config import CPU_EVAL_BATCH, resume_keys, run_cli
from dataloader.prompts import candidate_letters, prompt_builder
from trainer.candidates import load_candidates
from trainer.utils import (
    InputError,
    barrier,
    check_resume_config,
    init_distributed,
    is_main_process,
    prepare_run_dir,
    process_rank,
    resolve_device,
    set_seed,
    write_run_info,
)


def run(cfg: argparse.Namespace) -> dict:
    # transformers and peft cost seconds to import: only here, so --help and bad flags answer at once
    from dataloader.ranker_data import build_eval_sets, build_train_set
    from datasets import load_split
    from model.llm import (
        add_lora,
        load_adapter,
        load_model,
        load_tokenizer,
        resolve_model_path,
        use_gradient_checkpointing,
    )
    from trainer.ranker import accumulation_steps, save_adapter, train_adapter
    from trainer.ranker_report import REPORT_KS, format_table, test_and_report, write_prompts_sample, write_results
    from trainer.verbalizer import check_training_target, letter_token_ids, save_verbalizer

    device = resolve_device(cfg.device)  # under torchrun: the GPU of this process's LOCAL_RANK
    init_distributed(device)
    main_process = is_main_process()
    cfg.processes = process_rank()[1]
    set_seed(cfg.seed)
    if cfg.num_threads > 0:
        # On a CPU shared with other jobs, 1 thread avoids OpenMP oversubscription (5-7x slower when oversubscribed).
        torch.set_num_threads(cfg.num_threads)
    load_in_4bit = cfg.llm_load_in_4bit if cfg.llm_load_in_4bit is not None else device.type == "cuda"
    num_candidates = cfg.llm_negative_sample_size + 1
    candidate_letters(num_candidates)  # validates the count early
    for name in (cfg.llm_base_model, cfg.llm_base_tokenizer):
        if name:
            resolve_model_path(name)  # a missing .gguf / embedded model fails before any run folder exists

    split = load_split(cfg)
    retrieved = cfg.llm_retrieved_path or cfg.experiment_root / "retriever" / cfg.dataset_name / f"seed{cfg.seed}"
    candidates = load_candidates(retrieved, split=split)
    if cfg.eval_only:  # evaluate a saved adapter: everything goes to <run folder>/eval/, nothing else is touched
        adapter = saved_adapter(cfg)
        run_dir = cfg.experiment_root / "ranker" / cfg.dataset_name / cfg.run_name / "eval"
    else:
        # every process checks the folder and the --resume flags before rank 0 changes anything
        folder = (cfg.experiment_root, "ranker", cfg.dataset_name, cfg.run_name, cfg.resume, cfg.overwrite)
        run_dir = prepare_run_dir(*folder, create=False)
        if cfg.resume:
            # a resumed DDP run needs the process count it started with: its data order and RNG states depend on it
            check_resume_config(run_dir, cfg, resume_keys("ranker") + ("processes",))
        barrier()
        if main_process:
            prepare_run_dir(*folder)
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, cfg)
    barrier()
    print(f"run folder: {run_dir}", flush=True)

    tokenizer_name = cfg.llm_base_tokenizer or cfg.llm_base_model
    tokenizer = load_tokenizer(tokenizer_name, cfg.llm_cache_dir)
    builder = prompt_builder(cfg, tokenizer, split.titles)
    letters = letter_token_ids(builder, num_candidates)
    if main_process:
        save_verbalizer(run_dir / "verbalizer.json", letters, tokenizer.eos_token_id, tokenizer_name)
    letter_ids = torch.tensor([letters[c] for c in candidate_letters(num_candidates)], dtype=torch.long)

    start = time.time()
    val_set, test_set = build_eval_sets(cfg, builder, split, candidates, num_candidates)
    if main_process:
        write_prompts_sample(run_dir / "prompts_sample.jsonl", test_set, builder, split)
    print(
        f"prompts: {len(val_set)} validation users, {len(test_set)}/{len(candidates.test['users'])} test users "
        f"with the true item among the {num_candidates} candidates ({time.time() - start:.1f} s)",
        flush=True,
    )
    if not test_set:
        raise InputError(f"{retrieved}: no test user has the true item among the top {num_candidates}")
    if cfg.llm_fusion == "linear" and not val_set:
        raise InputError(
            f"--llm_fusion linear: expected validation users to choose the weight on, found none of "
            f"{len(candidates.val['users'])} with the true item among the top {num_candidates} in {retrieved}"
        )
    if not cfg.eval_only:
        train_set = build_train_set(cfg, builder, split, candidates, letter_ids.tolist(), tokenizer.eos_token_id)
        print(f"training prompts: {len(train_set)} ({cfg.llm_train_candidates} candidates)", flush=True)
        check_training_target(train_set, letters)
        accumulation = accumulation_steps(cfg, cfg.processes)
        if main_process:
            print(
                f"global batch: {cfg.processes} process(es) x micro-batch {cfg.lora_micro_batch_size} x accumulation "
                f"{accumulation} = {cfg.processes * cfg.lora_micro_batch_size * accumulation} prompts per step",
                flush=True,
            )

    model = load_model(cfg.llm_base_model, device, load_in_4bit, cfg.llm_cache_dir)
    print(
        f"model: {cfg.llm_base_model} ({type(model).__name__}, {'NF4 4-bit' if load_in_4bit else model.dtype}) "
        f"on {device}",
        flush=True,
    )
    eval_batch = cfg.llm_eval_batch_size or (cfg.lora_micro_batch_size if device.type == "cuda" else CPU_EVAL_BATCH)
    timing: dict = {}
    if cfg.eval_only:
        print(f"--eval_only: {'the base model (zero-shot)' if adapter is None else adapter}", flush=True)
        model, trained = (model, False) if adapter is None else (load_adapter(model, adapter), True)
    elif cfg.resume and (run_dir / "adapter" / "adapter_config.json").is_file():
        print(f"--resume: training finished before; loading the best adapter from {run_dir / 'adapter'}", flush=True)
        model, trained = load_adapter(model, run_dir / "adapter"), True
    elif cfg.lora_max_steps == 0 or len(train_set) == 0:
        why = "--lora_max_steps 0" if cfg.lora_max_steps == 0 else "no training prefixes in the data"
        print(f"{why}: no training; the test below is ZERO-SHOT (base model, no adapter)", flush=True)
        trained = False
    else:
        if not val_set:
            raise InputError(f"{retrieved}: no validation user has the true item among the top {num_candidates}")
        # prompt + answer letter: validation prompts are built like training ones and are already tokenised
        longest = max(len(e.input_ids) for e in val_set) + 2
        checkpointing = use_gradient_checkpointing(
            cfg.gradient_checkpointing, model, cfg.lora_micro_batch_size, longest
        )
        model = add_lora(
            model,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_target_modules,
            quantized=load_in_4bit,
            gradient_checkpointing=checkpointing,
        )
        model, timing = train_adapter(
            cfg, model, train_set, val_set, letter_ids, tokenizer, eval_batch, device, run_dir
        )
        if main_process:
            save_adapter(model, run_dir)
        barrier()
        trained = True

    report, rankings = test_and_report(
        model,
        val_set,
        test_set,
        candidates.test,
        split,
        letter_ids,
        tokenizer.pad_token_id,
        eval_batch,
        device,
        fusion=cfg.llm_fusion == "linear",
        seed=cfg.seed,
    )
    timing.update(report.pop("timing"))
    result = {
        "dataset": split.name,
        "llm": cfg.llm_base_model,
        "load_in_4bit": load_in_4bit,
        "trained": trained,
        "num_candidates": num_candidates,
        "candidates_file": str(candidates.path),
        **report,
        "timing": timing,
    }
    if main_process:
        write_results(run_dir, result, rankings)
        print(format_table(report, REPORT_KS, Path(cfg.llm_base_model).name + ("" if trained else " (zero-shot)")))
        print(
            f"test: {len(test_set)} users in {timing['test_seconds']:.1f} s ({timing['test_users_per_s']:.2f} users/s)"
        )
        print(f"results: {run_dir / 'test_metrics.json'}", flush=True)
    return result


def saved_adapter(cfg: argparse.Namespace) -> Path | None:
    """The adapter folder --eval_only evaluates: --eval_adapter, else the run folder's adapter/; None = zero-shot."""
    if cfg.eval_adapter == "none":
        return None
    path = Path(cfg.eval_adapter or cfg.experiment_root / "ranker" / cfg.dataset_name / cfg.run_name / "adapter")
    if not (path / "adapter_config.json").is_file():
        raise InputError(
            f"--eval_adapter: expected a PEFT adapter folder (with adapter_config.json) at {path}; pass the run's "
            "--run_name, an adapter folder, or 'none' for the base model"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
