"""Stage-2 training: HF Trainer + PEFT, loss on the answer letter (+EOS) only, verbalizer validation every
`val_iterations` steps, early stopping on NDCG@10, the best adapter kept."""

import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from dataloader.ranker_data import EvalExample, TrainCollator, TrainPrompts
from trainer.ranker_eval import rank_examples, subset_metrics
from trainer.run_state import (
    HISTORY,
    Clock,
    SessionClock,
    append_validation,
    clock_summary,
    truncate_history,
    write_summary,
)
from trainer.runtime import is_main_process, process_rank
from utils.errors import InputError
from utils.files import atomic_folder, atomic_write_json, read_json_object
from utils.settings import flag_field

SELECTION_METRIC = "NDCG@10"
CLOCK = "training_clock.json"  # in each HF checkpoint: the time spent up to it


@dataclass(frozen=True)
class RankerTraining:
    """How the LoRA adapter is trained and selected (the --lora_* training flags)."""

    seed: int
    micro_batch_size: int = flag_field("lora_micro_batch_size")
    gradient_accumulation_steps: int = flag_field("lora_gradient_accumulation_steps")
    global_batch_size: int | None = flag_field("lora_global_batch_size")  # replaces the accumulation (see below)
    num_epochs: float = flag_field("lora_num_epochs")
    max_steps: int = flag_field("lora_max_steps")  # -1: the epochs decide
    lr: float = flag_field("lora_lr")
    warmup_steps: int = flag_field("lora_warmup_steps")
    val_iterations: int = flag_field("lora_val_iterations")
    early_stopping_patience: int = flag_field("lora_early_stopping_patience")
    num_workers: int
    metric_ks: tuple[int, ...]
    llm_dtype: str  # bf16 or fp32: on CUDA, bf16 autocast goes with bf16 weights and NF4's bf16 compute
    wandb_project: str | None  # --wandb_project with --use_wandb, else None (no wandb)


def accumulation_steps(training: RankerTraining, processes: int) -> int:
    """Micro-batches per optimizer step: gradient_accumulation_steps, or what keeps global_batch_size (micro-batch x
    accumulation x processes) when that is given, so scaling out keeps the optimisation the same."""
    if training.global_batch_size is None:
        return training.gradient_accumulation_steps
    per_step = training.micro_batch_size * processes
    if training.global_batch_size % per_step:
        raise InputError(
            f"--lora_global_batch_size: expected a multiple of --lora_micro_batch_size x processes = "
            f"{training.micro_batch_size} x {processes} = {per_step}, found {training.global_batch_size}"
        )
    return training.global_batch_size // per_step


class RankerTrainer(Trainer):
    """Trainer whose loss reads the LM head at the answer positions only and whose evaluation ranks the
    validation users with the verbalizer (metrics averaged over users). It also keeps the run's clock: training
    and validation seconds summed over every session of an interrupted and resumed run."""

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
        self._loss_sum = 0.0  # since the last validation
        self._loss_count = 0
        self.clock = SessionClock()  # train_adapter continues the clock of the checkpoint a --resume starts from
        # the training loss summed over the run's earlier starts (before a --resume), then over this process's steps
        self.loss_before, self.session_loss_sum, self.session_loss_count = (0.0, 0), 0.0, 0

    def resume_clock(self, saved: dict) -> None:
        """Continue the run's clock and loss total from a checkpoint's training_clock.json (from now on)."""
        self.clock = SessionClock(Clock(saved["seconds"], saved["validation_seconds"], saved["sessions"]))
        # checkpoints saved before the loss total existed lack it
        self.loss_before = (saved.get("loss_sum", 0.0), saved.get("loss_count", 0))

    def elapsed(self) -> dict:
        """The run's clock and loss total up to now (what training_clock.json holds)."""
        return {
            **asdict(self.clock.elapsed()),
            "loss_sum": self.loss_before[0] + self.session_loss_sum,
            "loss_count": self.loss_before[1] + self.session_loss_count,
        }

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
        if model.training:
            self.session_loss_sum += loss.item()
            self.session_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        start = time.time()
        scores = rank_examples(
            self.model, self.val_examples, self.letter_ids, self.pad_id, self.eval_batch_size, self.args.device,
            "validation users",
        )  # fmt: skip
        seconds = time.time() - start
        self.clock.add_validation(seconds)
        metrics = subset_metrics(scores, self.val_examples, self.ks)
        train_loss = self._loss_sum / self._loss_count if self._loss_count else math.nan
        self._loss_sum, self._loss_count = 0.0, 0
        if is_main_process():
            append_validation(
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


class SaveClock(TrainerCallback):
    """Writes the run's clock into every checkpoint, so a --resume from it continues the count."""

    def __init__(self, trainer: RankerTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if is_main_process():
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_json(folder / CLOCK, self.trainer.elapsed())


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete HF Trainer checkpoint (trainer_state.json is written last)."""
    checkpoints = [
        p
        for p in folder.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "trainer_state.json").is_file()
    ]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[1])) if checkpoints else None


def training_arguments(
    training: RankerTraining, run_dir: Path, accumulation: int, device: torch.device, run_label: str
) -> TrainingArguments:
    """The HF Trainer's arguments: eval/save every val_iterations steps, best adapter (NDCG@10) loaded at the end."""
    cuda = device.type == "cuda"
    if training.wandb_project is not None:
        # transformers' wandb integration reads these; the retriever passes the same to wandb.init.
        os.environ.setdefault("WANDB_PROJECT", training.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps,
        learning_rate=training.lr,
        warmup_steps=training.warmup_steps,
        lr_scheduler_type="linear",
        # paged AdamW is a CUDA memory feature; on CPU plain AdamW (fused kernels need no GPU either)
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        bf16=cuda and training.llm_dtype == "bf16",  # autocast for 4-bit on GPU; a CPU runs its weights' dtype directly
        logging_steps=max(1, min(10, training.val_iterations)),
        eval_strategy="steps",
        eval_steps=training.val_iterations,
        save_strategy="steps",
        save_steps=training.val_iterations,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=SELECTION_METRIC,
        greater_is_better=True,
        # explicit: transformers 4.x read report_to=None as "every installed integration" and
        # crashed at wandb.init on offline machines
        report_to=["wandb"] if training.wandb_project is not None else "none",
        run_name=run_label,
        remove_unused_columns=False,
        dataloader_num_workers=training.num_workers,
        dataloader_pin_memory=cuda,
        use_cpu=not cuda,
        seed=training.seed,
        data_seed=training.seed,
        disable_tqdm=not sys.stderr.isatty(),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient at every step
    )


def ranker_trainer(
    model,
    training: RankerTraining,
    train_set: TrainPrompts,
    val_set: list[EvalExample],
    letter_ids: torch.Tensor,
    tokenizer,
    eval_batch: int,
    device: torch.device,
    run_dir: Path,
) -> RankerTrainer:
    """The run's RankerTrainer (DDP under torchrun / accelerate launch: one model copy per process, each on its own
    shard of the training prompts; the global batch is micro-batch x accumulation x processes)."""
    accumulation = accumulation_steps(training, process_rank()[1])
    run_label = f"ranker-{run_dir.parent.name}-{run_dir.name}"
    trainer = RankerTrainer(
        model=model,
        args=training_arguments(training, run_dir, accumulation, device, run_label),
        train_dataset=train_set,
        eval_dataset=val_set,  # only its presence is checked; evaluate() ranks val_examples itself
        data_collator=TrainCollator(tokenizer.pad_token_id),
        callbacks=[EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience)],
        val_examples=val_set,
        letter_ids=letter_ids,
        pad_id=tokenizer.pad_token_id,
        eval_batch_size=eval_batch,
        # NDCG@10 drives model selection, so 10 is always computed
        ks=sorted({k for k in training.metric_ks if k < len(letter_ids)} | {10}),
        history_path=run_dir / HISTORY,
    )
    trainer.add_callback(SaveClock(trainer))
    return trainer


def train_adapter(trainer: RankerTrainer, run_dir: Path, resume: bool) -> dict:
    """Train (continuing the newest checkpoint with resume), load the best adapter into trainer.model and return
    the training summary (training_summary.json, also in test_metrics.json's timing)."""
    resume_from = last_checkpoint(run_dir / "checkpoints") if resume else None
    if resume_from:
        print(f"--resume: continuing from {resume_from}", flush=True)
        if is_main_process():
            truncate_history(run_dir / HISTORY, int(resume_from.name.split("-")[1]))
    trainer.clock = SessionClock()  # this start of the run is timed from here, after loading the model and data
    if resume_from and (resume_from / CLOCK).is_file():
        trainer.resume_clock(read_json_object(resume_from / CLOCK))
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    best = trainer.state.best_model_checkpoint
    print(f"best adapter (validation {SELECTION_METRIC} {trainer.state.best_metric}): {best}", flush=True)
    return training_summary(trainer, output.global_step, len(trainer.train_dataset))


def training_summary(trainer: RankerTrainer, steps: int, prompts: int) -> dict:
    """training_summary.json: steps, samples, loss, the adapter kept, and the time over all sessions."""
    args, state, totals, clock = trainer.args, trainer.state, trainer.elapsed(), trainer.clock.elapsed()
    samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * process_rank()[1]
    samples = min(samples, math.ceil(prompts * args.num_train_epochs))
    losses = [record["loss"] for record in state.log_history if "loss" in record]
    best = state.best_model_checkpoint
    mean_loss = totals["loss_sum"] / totals["loss_count"] if totals["loss_count"] else None
    return {
        "train_steps": steps,
        "train_samples_seen": samples,
        "train_prompts_available": prompts,
        "train_s_per_sample": round((clock.seconds - clock.validation_seconds) / max(samples, 1), 3),
        "train_loss": mean_loss,  # over every micro-batch of every session (rank 0's under DDP)
        "train_loss_last_logged": losses[-1] if losses else None,
        "best_checkpoint": best,
        "best_step": int(best.rsplit("-", 1)[1]) if best else None,
        "best_val_metric": {SELECTION_METRIC: state.best_metric},
        **clock_summary(clock),
    }


def save_adapter(model, run_dir: Path, summary: dict) -> Path:
    """training_summary.json, then the LoRA adapter as run_dir/adapter: written beside and renamed, so an adapter/
    folder always means "training finished" (what --resume and recommend.py check)."""
    write_summary(run_dir, summary)
    with atomic_folder(run_dir / "adapter") as tmp:
        model.save_pretrained(str(tmp))
    return run_dir / "adapter"
