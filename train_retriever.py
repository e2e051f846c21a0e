"""Stage 1 of LlamaRec: train the LRURec retriever and export candidates for the ranker.

    python train_retriever.py --dataset_code ml-100k

Run folder: experiments/retriever/<dataset_name>/<run_name>/ (files: README, "Output folders"; details: docs/retriever.md).
"""

import argparse
import sys
import time

import torch

from config import check_best_metric, resume_keys, run_cli
from datasets import load_split
from trainer.retriever import build_model, evaluate_saved, export, train
from trainer.utils import check_resume_config, prepare_run_dir, resolve_device, set_seed, write_run_info

SUMMARY_METRICS = ("Recall@10", "NDCG@10", "Recall@20")


def rounded(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in SUMMARY_METRICS if k in metrics}


def run(cfg: argparse.Namespace) -> dict:
    check_best_metric(cfg)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    split = load_split(cfg)
    if cfg.eval_only:
        result = evaluate_saved(cfg, split, device)
        print({**result, "val": rounded(result["val"]), "test": rounded(result["test"])})
        return result
    run_dir = prepare_run_dir(
        cfg.experiment_root, "retriever", cfg.dataset_name, cfg.run_name, cfg.resume, cfg.overwrite
    )
    if cfg.resume:
        # With the schedule on, the learning rate decays over --num_epochs: then it defines the training too.
        schedule_keys = ("num_epochs",) if cfg.enable_lr_schedule else ()
        check_resume_config(run_dir, cfg, resume_keys("retriever") + schedule_keys)
    write_run_info(run_dir, cfg)
    model = build_model(cfg, split.num_items).to(device)
    start = time.time()
    state = train(cfg, split, model, run_dir, device)
    train_seconds = time.time() - start
    val_metrics, test_metrics = export(cfg, split, model, run_dir, device)
    earlier_eval, best = run_dir / "eval" / "test_metrics.json", run_dir / "checkpoint_best.pt"
    if earlier_eval.exists() and best.exists() and earlier_eval.stat().st_mtime < best.stat().st_mtime:
        # e.g. --eval_only of a run cut by a cap, then --resume: eval/ no longer describes the best checkpoint
        print(f"note: {earlier_eval.parent} is older than this run's best checkpoint; rerun --eval_only to refresh it")
    summary = {
        "run_dir": str(run_dir),
        "steps": state["step"],
        "best_step": state["best_step"],
        "train_seconds_this_session": round(train_seconds, 1),
        "val": rounded(val_metrics),
        "test": rounded(test_metrics),
    }
    print(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
