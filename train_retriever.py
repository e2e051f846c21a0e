"""Stage 1 of LlamaRec: train the LRURec retriever and export candidates for the ranker.

    python train_retriever.py --dataset_code ml-100k

Run folder: experiments/retriever/<dataset_name>/<run_name>/ (see README, "Retriever").
"""

import argparse
import sys
import time

import torch

from config import check_best_metric, run_cli, write_run_info
from datasets import load_split
from trainer.retriever import build_model, export, train
from trainer.utils import check_resume_config, prepare_run_dir, resolve_device, set_seed

SUMMARY_METRICS = ("Recall@10", "NDCG@10", "Recall@20")
# Flags that define the training of a run: --resume refuses to change them (others, e.g. --max_steps,
# --val_iterations or --early_stopping_patience, may change).
RESUME_KEYS = (
    "dataset_name", "min_rating", "min_uc", "min_sc", "seed", "bert_max_len", "bert_hidden_units",
    "bert_num_blocks", "bert_dropout", "bert_attn_dropout", "sliding_window_size", "train_all_items",
    "train_batch_size", "lr", "weight_decay", "adam_epsilon", "max_grad_norm", "label_smoothing",
    "enable_lr_schedule", "warmup_steps", "best_metric",
)  # fmt: skip


def run(cfg: argparse.Namespace) -> dict:
    check_best_metric(cfg)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    split = load_split(cfg)
    run_dir = prepare_run_dir(
        cfg.experiment_root, "retriever", cfg.dataset_name, cfg.run_name, cfg.resume, cfg.overwrite
    )
    if cfg.resume:
        check_resume_config(run_dir, cfg, RESUME_KEYS + (("num_epochs",) if cfg.enable_lr_schedule else ()))
    write_run_info(run_dir, cfg)
    model = build_model(cfg, split.num_items).to(device)
    start = time.time()
    state = train(cfg, split, model, run_dir, device)
    train_seconds = time.time() - start
    val_metrics, test_metrics = export(cfg, split, model, run_dir, device)
    summary = {
        "run_dir": str(run_dir),
        "steps": state["step"],
        "best_step": state["best_step"],
        "train_seconds_this_session": round(train_seconds, 1),
        "val": {k: round(val_metrics[k], 4) for k in SUMMARY_METRICS if k in val_metrics},
        "test": {k: round(test_metrics[k], 4) for k in SUMMARY_METRICS if k in test_metrics},
    }
    print(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
