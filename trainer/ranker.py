"""Stage-2 training and evaluation: HF Trainer + PEFT, loss on the answer letter (+EOS) only,
verbalizer evaluation every --lora_val_iterations steps, early stopping on NDCG@10."""

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from dataloader.ranker_data import EvalExample, eval_batches, left_pad
from trainer.metrics import label_ranks, metrics_from_ranks
from trainer.utils import append_jsonl
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
    the LM head only at the last position (logits_to_keep=1)."""
    was_training = model.training
    model.eval()
    scores = torch.empty(len(examples), len(letter_ids))
    letter_ids = letter_ids.to(device)
    for indices in eval_batches(examples, batch_size):
        batch = left_pad([examples[k].input_ids for k in indices], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        scores[indices] = verbalizer_scores(logits, letter_ids).cpu()
    model.train(was_training)
    return scores


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
