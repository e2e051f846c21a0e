"""Stage 1 of LlamaRec: train the LRURec retriever (or a Table 1 baseline) and export candidates for the ranker.

    python train_retriever.py --dataset_code ml-100k

Run folder: experiments/retriever/<dataset_name>/<run_name>/ (files: README, "Output folders"; details: docs/retriever.md).
"""

import argparse
import sys
import time
from pathlib import Path

from config import RETRIEVER, candidate_export, data_config, resume_keys, retriever_spec, retriever_training, run_cli
from datasets import load_split
from model.retrievers import build_retriever
from trainer.retriever_export import evaluate_splits, export_candidates, load_best, write_test_metrics
from trainer.retriever_train import BEST, train
from trainer.run_folder import check_resume_config, prepare_run_dir, run_folder, start_wandb, write_run_info
from trainer.run_lock import run_lock
from trainer.runtime import limit_onednn_cache, resolve_device, set_seed, set_threads
from utils.errors import InputError, one_line
from utils.files import atomic_folder, atomic_write_json, load_checkpoint

SUMMARY_METRICS = ("Recall@10", "NDCG@10", "Recall@20")


def rounded(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in SUMMARY_METRICS if k in metrics}


def run(flags: argparse.Namespace) -> dict:
    limit_onednn_cache()
    set_threads(flags.num_threads)
    set_seed(flags.seed)
    device = resolve_device(flags.device)
    run_dir = run_folder(flags.experiment_root, "retriever", flags.dataset_name, flags.run_name)
    with run_lock(run_dir, flags.take_over):  # one writer per run folder, until this process ends
        if not flags.eval_only:  # refused before the preprocessing, which takes minutes on large data
            prepare_run_dir(run_dir, "retriever", flags.resume, flags.overwrite, create=False)
        split = load_split(data_config(flags))
        if flags.eval_only:
            return evaluate_saved(flags, split, run_dir, device)
        return train_and_export(flags, split, run_dir, device)


def train_and_export(flags: argparse.Namespace, split, run_dir: Path, device) -> dict:
    prepare_run_dir(run_dir, "retriever", flags.resume, flags.overwrite)
    if flags.resume:
        # With the schedule on, the learning rate decays over --num_epochs: then it defines the training too.
        schedule_keys = ("num_epochs",) if flags.enable_lr_schedule else ()
        check_resume_config(run_dir, vars(flags), resume_keys(RETRIEVER) + schedule_keys)
    write_run_info(run_dir, vars(flags), flags.seed)
    spec, training = retriever_spec(flags), retriever_training(flags)
    model = build_retriever(spec, split.num_items).to(device)
    wandb_run = start_wandb(flags.wandb_project, run_dir, vars(flags)) if flags.use_wandb else None
    start = time.time()
    state = train(model, split, training, run_dir, device, resume=flags.resume, wandb_run=wandb_run)
    train_seconds = time.time() - start
    if wandb_run is not None:
        wandb_run.finish()
    load_best(model, run_dir, device)
    fold_training = (training, run_dir / "folds")
    export_seconds: dict[str, float] = {}
    val_metrics, test_metrics = export_candidates(
        model, split, spec, candidate_export(flags), run_dir, device, fold_training, export_seconds
    )
    earlier_eval = run_dir / "eval" / "test_metrics.json"
    if earlier_eval.exists() and earlier_eval.stat().st_mtime < (run_dir / BEST).stat().st_mtime:
        # e.g. --eval_only of a run cut by a cap, then --resume: eval/ no longer describes the best checkpoint
        print(f"note: {earlier_eval.parent} is older than this run's best checkpoint; rerun --eval_only to refresh it")
    summary = {
        "run_dir": str(run_dir),
        "steps": state["step"],
        "best_step": state["best_step"],
        "train_seconds_this_session": round(train_seconds, 1),
        "export_seconds": {part: round(seconds, 1) for part, seconds in export_seconds.items()},
        "val": rounded(val_metrics),
        "test": rounded(test_metrics),
    }
    print(summary)
    return summary


def evaluate_saved(flags: argparse.Namespace, split, run_dir: Path, device) -> dict:
    """--eval_only: the saved checkpoint's val/test metrics (and, with --eval_export_candidates, its candidates) in
    <run folder>/eval/, written whole or not at all, without touching the training run's files."""
    checkpoint = flags.eval_checkpoint or run_dir / BEST
    if flags.eval_checkpoint is None:
        check_finished(run_dir)
    elif not Path(checkpoint).is_file():
        raise InputError(f"--eval_checkpoint: {checkpoint} not found; pass a retriever checkpoint file")
    spec, export = retriever_spec(flags), candidate_export(flags)
    model = build_retriever(spec, split.num_items).to(device)
    try:
        model.load_state_dict(load_checkpoint(checkpoint, device)["model"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"{checkpoint}: does not fit a model with these flags ({one_line(e, 300)})") from None
    with atomic_folder(run_dir / "eval") as out_dir:
        write_run_info(out_dir, vars(flags), flags.seed)
        if flags.eval_export_candidates:
            fold_training = (retriever_training(flags), run_dir / "folds")
            val_metrics, test_metrics = export_candidates(model, split, spec, export, out_dir, device, fold_training)
        else:
            val_metrics, _, test_metrics, test_arrays = evaluate_splits(model, split, spec.max_len, export, device)
            write_test_metrics(out_dir, test_metrics, test_arrays, export, split)
        atomic_write_json(out_dir / "val_metrics.json", val_metrics)
    result = {
        "checkpoint": str(checkpoint),
        "eval_dir": str(run_dir / "eval"),
        "val": val_metrics,
        "test": test_metrics,
    }
    print({**result, "val": rounded(val_metrics), "test": rounded(test_metrics)})
    return result


def check_finished(run_dir: Path) -> None:
    """A retriever run is served or evaluated only once training has ended (its test_metrics.json is written last)."""
    if not (run_dir / "config.json").is_file():
        raise InputError(f"{run_dir}: no retriever run there (no config.json); pass the run's --run_name")
    if not (run_dir / BEST).is_file() or not (run_dir / "test_metrics.json").is_file():
        raise InputError(
            f"{run_dir}: the run has not finished (no {BEST} or test_metrics.json); finish it with "
            "--resume and its own flags (add --max_steps N to stop at step N), or pass --eval_checkpoint"
        )


def main(argv: list[str] | None = None) -> int:
    return run_cli(RETRIEVER, run, argv)


if __name__ == "__main__":
    sys.exit(main())
