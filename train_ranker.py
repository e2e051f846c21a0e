"""Stage 2 of LlamaRec: an LLM (QLoRA) ranks the retriever's top-20 candidates with a verbalizer.

    python train_ranker.py --dataset_code ml-100k --llm_base_model smollm2-135m [caps]

Run folder experiments/ranker/<dataset>/<run_name>/: config.json, environment.json, verbalizer.json,
prompts_sample.jsonl, checkpoints/ (Trainer, for --resume), adapter/ (best LoRA, PEFT format),
val_history.jsonl, test_metrics.json, test_rankings.jsonl.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from config import CPU_EVAL_BATCH, InputError, run_cli, write_run_info
from dataloader.prompts import PromptBuilder, candidate_letters
from dataloader.ranker_data import (
    EvalExample,
    TrainCollator,
    TrainPrompts,
    eval_examples,
    retrieved_training_lists,
    training_prefixes,
    true_letter,
)
from datasets.split import SplitData
from trainer.candidates import load_candidates
from trainer.ranker_report import build_test_report, choose_fusion_weight, compare_with_retriever, format_table
from trainer.utils import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    prepare_run_dir,
    resolve_device,
    set_seed,
    truncate_history,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

REPORT_KS = (1, 5, 10)
# Flags that define the training of a ranker run: --resume refuses to change them (--lora_max_steps too: the
# learning-rate schedule decays over it).
RESUME_KEYS = (
    "dataset_name", "min_rating", "min_uc", "min_sc", "seed", "llm_base_model", "llm_base_tokenizer",
    "llm_retrieved_path", "llm_max_title_len", "llm_max_text_len", "llm_max_history", "llm_negative_sample_size",
    "llm_system_template", "llm_input_template", "llm_load_in_4bit", "llm_max_train_samples", "llm_max_eval_users",
    "llm_shuffle_eval_candidates", "llm_train_candidates", "llm_train_missed", "llm_shuffle_train_candidates",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_num_epochs",
    "lora_lr", "lora_warmup_steps", "lora_micro_batch_size", "lora_gradient_accumulation_steps",
    "lora_val_iterations", "lora_max_steps",
)  # fmt: skip


def write_prompts_sample(path: Path, examples: list[EvalExample], builder: PromptBuilder, split: SplitData) -> None:
    """The exact prompt text of the first 20 test users, with raw user/item ids (what the LLM sees)."""
    lines = []
    for e in examples[:20]:
        record = {
            "user": split.user_raw_ids[e.user],
            "candidates": [split.item_raw_ids[i] for i in e.candidates],
            "true_item": split.item_raw_ids[e.candidates[e.label]],
            "true_letter": true_letter(e),
            "prompt_tokens": len(e.input_ids),
            "prompt": builder.tokenizer.decode(e.input_ids, skip_special_tokens=True)
            if len(e.input_ids) >= builder.max_text_len
            else builder.text(e.history, e.candidates),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (trainer_state.json is written last)."""
    checkpoints = [
        p
        for p in folder.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1])) if checkpoints else None


def run(cfg: argparse.Namespace) -> dict:
    from datasets import load_split
    from model.llm import add_lora, load_adapter, load_model, load_tokenizer, resolve_model_path
    from trainer.ranker import rank_examples
    from trainer.verbalizer import check_training_target, letter_token_ids

    device = resolve_device(cfg.device)
    set_seed(cfg.seed)
    if cfg.num_threads > 0:
        # On a CPU shared with other jobs, 1 thread avoids OpenMP oversubscription, which was measured
        # 5-7x slower than 1 thread for a forward pass here.
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
    run_dir = prepare_run_dir(cfg.experiment_root, "ranker", cfg.dataset_name, cfg.run_name, cfg.resume, cfg.overwrite)
    if cfg.resume:
        check_resume_config(run_dir, cfg, RESUME_KEYS)
    write_run_info(run_dir, cfg)
    print(f"run folder: {run_dir}", flush=True)

    tokenizer = load_tokenizer(cfg.llm_base_tokenizer or cfg.llm_base_model, cfg.llm_cache_dir)
    builder = PromptBuilder(
        tokenizer,
        split.titles,
        system=cfg.llm_system_template,
        input_template=cfg.llm_input_template,
        max_title_len=cfg.llm_max_title_len,
        max_text_len=cfg.llm_max_text_len,
        max_history=cfg.llm_max_history,
    )
    letters = letter_token_ids(builder, num_candidates)
    atomic_write_json(
        run_dir / "verbalizer.json",
        {
            "letters": letters,
            "eos_token_id": tokenizer.eos_token_id,
            "derived_from": "tokenise(prompt + letter): the token after the prompt's '### Response:\\n'",
            "tokenizer": cfg.llm_base_tokenizer or cfg.llm_base_model,
        },
    )
    letter_ids = torch.tensor([letters[c] for c in candidate_letters(num_candidates)], dtype=torch.long)

    start = time.time()
    test_set = eval_examples(
        builder, split, candidates.test, "test", num_candidates, cfg.llm_shuffle_eval_candidates, cfg.seed
    )
    write_prompts_sample(run_dir / "prompts_sample.jsonl", test_set, builder, split)
    val_set = eval_examples(
        builder, split, candidates.val, "val", num_candidates, cfg.llm_shuffle_eval_candidates, cfg.seed
    )
    if cfg.llm_max_eval_users is not None and cfg.llm_max_eval_users < len(val_set):
        keep = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(cfg.seed))
        val_set = [val_set[k] for k in sorted(keep[: cfg.llm_max_eval_users].tolist())]
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

    lists = None
    if cfg.llm_train_candidates == "retrieved":
        pairs, lists = retrieved_training_lists(
            candidates.require_train(), num_candidates, cfg.llm_train_missed, cfg.llm_max_train_samples, cfg.seed
        )
    else:
        pairs = training_prefixes(split.train, cfg.llm_max_train_samples, cfg.seed)
    print(f"training prompts: {len(pairs)} ({cfg.llm_train_candidates} candidates)", flush=True)
    train_set = TrainPrompts(
        builder,
        split.train,
        split.num_items,
        pairs,
        cfg.llm_negative_sample_size,
        letter_ids.tolist(),
        tokenizer.eos_token_id,
        cfg.seed,
        lists=lists,
        shuffle=cfg.llm_shuffle_train_candidates,
    )
    check_training_target(train_set, letters)

    model = load_model(cfg.llm_base_model, device, load_in_4bit, cfg.llm_cache_dir)
    print(
        f"model: {cfg.llm_base_model} ({type(model).__name__}, {'NF4 4-bit' if load_in_4bit else model.dtype}) "
        f"on {device}",
        flush=True,
    )
    eval_batch = cfg.llm_eval_batch_size or (cfg.lora_micro_batch_size if device.type == "cuda" else CPU_EVAL_BATCH)
    adapter_dir = run_dir / "adapter"
    timing: dict = {}
    if cfg.resume and (adapter_dir / "adapter_config.json").is_file():
        print(f"--resume: training finished before; loading the best adapter from {adapter_dir}", flush=True)
        model = load_adapter(model, adapter_dir)
        trained = True
    elif cfg.lora_max_steps == 0 or not pairs:
        why = "--lora_max_steps 0" if cfg.lora_max_steps == 0 else "no training prefixes in the data"
        print(f"{why}: no training; the test below is ZERO-SHOT (base model, no adapter)", flush=True)
        trained = False
    else:
        model = add_lora(
            model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, quantized=load_in_4bit
        )
        if not val_set:
            raise InputError(f"{retrieved}: no validation user has the true item among the top {num_candidates}")
        model, timing = train(cfg, model, train_set, val_set, letter_ids, tokenizer, eval_batch, device, run_dir)
        # written beside and renamed, so an adapter/ folder always means "training finished" (--resume)
        tmp_dir = run_dir / "adapter.tmp"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.save_pretrained(str(tmp_dir))
        tmp_dir.rename(adapter_dir)
        trained = True

    # The final validation: the comparison with the retriever on validation users, and the fusion weight.
    val_scores = rank_examples(model, val_set, letter_ids, tokenizer.pad_token_id, eval_batch, device)
    fusion = choose_fusion_weight(val_scores, val_set) if cfg.llm_fusion == "linear" else None
    start = time.time()
    scores = rank_examples(model, test_set, letter_ids, tokenizer.pad_token_id, eval_batch, device)
    test_seconds = time.time() - start
    report, rankings = build_test_report(
        scores, test_set, candidates.test, split, REPORT_KS, fusion["weight"] if fusion else None, cfg.seed
    )
    report["val"] = compare_with_retriever(val_scores, val_set, fusion["weight"] if fusion else None, cfg.seed)
    if fusion:
        report["fusion"] = fusion
    timing.update({"test_seconds": round(test_seconds, 2), "test_users_per_s": round(len(test_set) / test_seconds, 3)})
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
    atomic_write_json(run_dir / "test_metrics.json", result)
    atomic_write_text(run_dir / "test_rankings.jsonl", "\n".join(rankings) + "\n")
    name = Path(cfg.llm_base_model).name + ("" if trained else " (zero-shot)")
    print(format_table(report, REPORT_KS, name), flush=True)
    print(f"test: {len(test_set)} users in {test_seconds:.1f} s ({len(test_set) / test_seconds:.2f} users/s)")
    print(f"results: {run_dir / 'test_metrics.json'}", flush=True)
    return result


def train(
    cfg: argparse.Namespace,
    model: "PeftModel",
    train_set: TrainPrompts,
    val_set: list[EvalExample],
    letter_ids: torch.Tensor,
    tokenizer: "PreTrainedTokenizerBase",
    eval_batch: int,
    device: torch.device,
    run_dir: Path,
) -> tuple["PeftModel", dict]:
    """HF Trainer run: eval/save every --lora_val_iterations steps, best adapter (NDCG@10) loaded at the end."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    from model.llm import bf16_supported
    from trainer.ranker import SELECTION_METRIC, RankerTrainer

    cuda = device.type == "cuda"
    if cfg.use_wandb:
        # transformers' wandb integration reads these; the retriever passes the same to wandb.init.
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.lora_micro_batch_size,
        gradient_accumulation_steps=cfg.lora_gradient_accumulation_steps,
        num_train_epochs=cfg.lora_num_epochs,
        max_steps=cfg.lora_max_steps,
        learning_rate=cfg.lora_lr,
        warmup_steps=cfg.lora_warmup_steps,
        lr_scheduler_type="linear",
        # paged AdamW is a CUDA memory feature; on CPU plain AdamW (fused kernels need no GPU either)
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        bf16=cuda and bf16_supported(device),  # autocast for 4-bit on GPU; CPU runs bf16 weights directly
        logging_steps=max(1, min(10, cfg.lora_val_iterations)),
        eval_strategy="steps",
        eval_steps=cfg.lora_val_iterations,
        save_strategy="steps",
        save_steps=cfg.lora_val_iterations,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=SELECTION_METRIC,
        greater_is_better=True,
        # explicit: transformers 4.x read report_to=None as "every installed integration" and
        # crashed at wandb.init on offline machines
        report_to=["wandb"] if cfg.use_wandb else "none",
        run_name=f"ranker-{cfg.dataset_name}-{cfg.run_name}",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = RankerTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,  # only its presence is checked; evaluate() ranks val_examples itself
        data_collator=TrainCollator(tokenizer.pad_token_id),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=cfg.lora_early_stopping_patience)],
        val_examples=val_set,
        letter_ids=letter_ids,
        pad_id=tokenizer.pad_token_id,
        eval_batch_size=eval_batch,
        # NDCG@10 drives model selection, so 10 is always computed
        ks=sorted({k for k in cfg.metric_ks if k < len(letter_ids)} | {10}),
        history_path=run_dir / "val_history.jsonl",
    )
    resume_from = last_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if resume_from:
        print(f"--resume: continuing from {resume_from}", flush=True)
        truncate_history(run_dir / "val_history.jsonl", int(resume_from.name.split("-")[1]))
        resume_from = str(resume_from)
    start = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - start
    steps = output.global_step
    samples = steps * cfg.lora_micro_batch_size * cfg.lora_gradient_accumulation_steps
    best = trainer.state.best_model_checkpoint
    print(f"best adapter (validation {SELECTION_METRIC} {trainer.state.best_metric}): {best}", flush=True)
    samples = min(samples, math.ceil(len(train_set) * cfg.lora_num_epochs))
    train_seconds = seconds - trainer.eval_seconds
    timing = {
        "train_steps": steps,
        "train_samples_seen": samples,
        "train_prompts_available": len(train_set),
        "train_seconds_incl_validation": round(seconds, 2),
        "validation_seconds": round(trainer.eval_seconds, 2),
        "train_s_per_sample": round(train_seconds / max(samples, 1), 3),
        "best_checkpoint": best,
        "best_val_metric": {SELECTION_METRIC: trainer.state.best_metric},
    }
    return trainer.model, timing


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
