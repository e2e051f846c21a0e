"""Stage-2 training and evaluation: HF Trainer + PEFT, loss on the answer letter (+EOS) only,
verbalizer evaluation every --lora_val_iterations steps, early stopping on NDCG@10."""

import argparse
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from dataloader.ranker_data import EvalExample, TrainCollator, TrainPrompts, eval_batches, left_pad
from model.llm import bf16_supported
from trainer.metrics import label_ranks, metrics_from_ranks
from trainer.utils import (
    InputError,
    append_jsonl,
    gather_rows,
    is_main_process,
    process_rank,
    shard,
    truncate_history,
)
from trainer.verbalizer import verbalizer_scores

SELECTION_METRIC = "NDCG@10"


@torch.no_grad()
def rank_examples(
    model,
    examples: list[EvalExample],
    letter_ids: torch.Tensor,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Verbalizer scores [N, num_candidates] (fp32, in `examples` order); one forward pass per batch,
    the LM head only at the last position (logits_to_keep=1).

    With several processes, each ranks its shard of the examples (every example exactly once) and all of them get
    every score, so every process computes the same metrics and takes the same early-stopping decision.
    """
    was_training = model.training
    model.eval()
    mine = shard(len(examples), *process_rank())
    own = [examples[k] for k in mine]
    scores = torch.empty(len(own), len(letter_ids))
    letter_ids = letter_ids.to(device)
    for indices in eval_batches(own, batch_size):
        batch = left_pad([own[k].input_ids for k in indices], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        scores[indices] = verbalizer_scores(logits, letter_ids).cpu()
    model.train(was_training)
    return gather_rows(scores, mine, len(examples))


def subset_metrics(scores: torch.Tensor, examples: list[EvalExample], ks: list[int]) -> dict[str, float]:
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return metrics_from_ranks(label_ranks(scores, labels), ks)


class RankerTrainer(Trainer):
    """Trainer whose loss reads the LM head at the answer positions only and whose evaluation ranks the
    validation users with the verbalizer (metrics averaged over users)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(
        self,
        *args,
        val_examples: list[EvalExample],
        letter_ids: torch.Tensor,
        pad_id: int,
        eval_batch_size: int,
        ks: list[int],
        history_path: Path,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.val_examples = val_examples
        self.letter_ids = letter_ids
        self.pad_id = pad_id
        self.eval_batch_size = eval_batch_size
        self.ks = ks
        self.history_path = history_path
        self._loss_sum = 0.0
        self._loss_count = 0
        self.eval_seconds = 0.0  # validation time, to report training speed without it

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["targets"]  # [B, T]: answer letter, EOS
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            # Left padding puts the T positions that predict the targets last for every row, so the
            # full-vocabulary LM head runs at T positions instead of ~700.
            logits_to_keep=targets.shape[1],
        )
        logits = outputs.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self._loss_sum += loss.item()
        self._loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        start = time.time()
        scores = rank_examples(
            self.model, self.val_examples, self.letter_ids, self.pad_id, self.eval_batch_size, self.args.device
        )
        seconds = time.time() - start
        self.eval_seconds += seconds
        metrics = subset_metrics(scores, self.val_examples, self.ks)
        train_loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        if is_main_process():
            append_jsonl(
                self.history_path,
                {
                    "step": self.state.global_step,
                    "epoch": self.state.epoch,
                    "train_loss_since_last_eval": train_loss,
                    "val_users": len(self.val_examples),
                    "eval_seconds": round(seconds, 2),
                    "users_per_s": round(len(self.val_examples) / max(seconds, 1e-9), 3),
                    **metrics,
                },
            )
        metrics = {f"{metric_key_prefix}_{key}": value for key, value in metrics.items()}
        metrics[f"{metric_key_prefix}_users_per_s"] = len(self.val_examples) / max(seconds, 1e-9)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (trainer_state.json is written last)."""
    checkpoints = [
        p
        for p in folder.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1])) if checkpoints else None


def train_adapter(
    cfg: argparse.Namespace,
    model,
    train_set: TrainPrompts,
    val_set: list[EvalExample],
    letter_ids: torch.Tensor,
    tokenizer,
    eval_batch: int,
    device: torch.device,
    run_dir: Path,
) -> tuple[torch.nn.Module, dict]:
    """HF Trainer run: eval/save every --lora_val_iterations steps, best adapter (NDCG@10) loaded at the end.

    Under torchrun / accelerate launch the Trainer runs DDP (one model copy per process, each on its own shard of
    the training prompts); the global batch is micro-batch x accumulation x processes.
    """
    cuda = device.type == "cuda"
    processes = process_rank()[1]
    accumulation = accumulation_steps(cfg, processes)
    if cfg.use_wandb:
        # transformers' wandb integration reads these; the retriever passes the same to wandb.init.
        os.environ.setdefault("WANDB_PROJECT", cfg.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.lora_micro_batch_size,
        gradient_accumulation_steps=accumulation,
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
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient at every step
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
        if is_main_process():
            truncate_history(run_dir / "val_history.jsonl", int(resume_from.name.split("-")[1]))
        resume_from = str(resume_from)
    start = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.time() - start
    steps = output.global_step
    samples = steps * cfg.lora_micro_batch_size * accumulation * processes
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


def accumulation_steps(cfg: argparse.Namespace, processes: int) -> int:
    """Micro-batches per optimizer step: --lora_gradient_accumulation_steps, or what keeps --lora_global_batch_size
    (micro-batch x accumulation x processes) when that is given, so scaling out keeps the optimisation the same."""
    if cfg.lora_global_batch_size is None:
        return cfg.lora_gradient_accumulation_steps
    per_step = cfg.lora_micro_batch_size * processes
    if cfg.lora_global_batch_size % per_step:
        raise InputError(
            f"--lora_global_batch_size: expected a multiple of --lora_micro_batch_size x processes = "
            f"{cfg.lora_micro_batch_size} x {processes} = {per_step}, found {cfg.lora_global_batch_size}"
        )
    return cfg.lora_global_batch_size // per_step


def save_adapter(model, run_dir: Path) -> Path:
    """Save the LoRA adapter as run_dir/adapter; written beside and renamed, so an adapter/ folder always means
    "training finished" (what --resume checks)."""
    adapter_dir, tmp_dir = run_dir / "adapter", run_dir / "adapter.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(str(tmp_dir))
    tmp_dir.rename(adapter_dir)
    return adapter_dir
