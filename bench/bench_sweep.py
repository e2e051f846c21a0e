"""Sweep throughput: the same trials with K workers x 1 thread against 1 worker x K threads, and what pruning saved.

    python -m bench.bench_sweep [--trials 4] [--cores 2] [--max_steps 150]
    python -m bench.bench_sweep --pruned_study experiments/sweeps/<study>     # only the pruning part

Runs `sweep.py train_retriever.py` twice on ml-100k in a temporary experiments folder, with the random sampler on one
seed, so both layouts run the same trials (checked: the flags of every trial number agree). Each trial trains
--max_steps steps and evaluates. Wall time of each sweep, one run each, back to back on the same machine.

With --pruned_study (a finished study folder), it reads what pruning saved there: the pruned trials' seconds
against the mean seconds of the trials that ran to the end (an estimate: a pruned trial might have stopped early
anyway). Writes experiments/bench/sweep.json.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

import sweep
from utils.files import REPO_ROOT, atomic_write_json


def timed_sweep(root: Path, name: str, trials: int, workers: int, threads: int, max_steps: int) -> dict:
    args = [
        "train_retriever.py", "--study", name, "--space", "bert_dropout=float:0.1:0.6", "label_smoothing=float:0:0.2",
        "--trials", str(trials), "--workers", str(workers), "--threads_per_worker", str(threads), "--sampler",
        "random", "--", "--dataset_code", "ml-100k", "--experiment_root", str(root), "--max_steps", str(max_steps),
        "--val_iterations", "50", "--retrieved_train_topk", "0",
    ]  # fmt: skip
    start = time.perf_counter()
    if sweep.main(args) != 0:
        sys.exit(f"sweep {name} failed")
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / name / 'study.db'}")
    done = sorted(study.get_trials(), key=lambda t: t.number)
    return {
        "layout": f"{workers} workers x {threads} threads",
        "wall_s": round(wall, 1),
        "trial_s": [t.user_attrs["seconds"] for t in done],
        "flags": [t.user_attrs["flags"] for t in done],
    }


def pruning_saving(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    trials = summary["trials"]
    complete = [t["seconds"] for t in trials if t["state"] == "COMPLETE"]
    pruned = [t["seconds"] for t in trials if t["state"] == "PRUNED"]
    full = statistics.mean(complete)
    spent = sum(complete) + sum(pruned)
    without = sum(complete) + full * len(pruned)
    return {
        "study": summary["study"],
        "complete_trials": len(complete),
        "pruned_trials": len(pruned),
        "mean_complete_trial_s": round(full, 1),
        "pruned_trials_s": [round(s, 1) for s in pruned],
        "trial_s_spent": round(spent, 1),
        "trial_s_estimated_without_pruning": round(without, 1),
        "saved_share": round(1 - spent / without, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--cores", type=int, default=2, help="K: workers x 1 thread against 1 worker x K threads")
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--pruned_study", type=Path, default=None, help="a finished study folder (pruning only)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "experiments" / "bench" / "sweep.json")
    args = parser.parse_args(argv)
    result: dict = {}
    if args.pruned_study is None:
        with tempfile.TemporaryDirectory() as tmp:
            parallel = timed_sweep(Path(tmp), "workers", args.trials, args.cores, 1, args.max_steps)
            threaded = timed_sweep(Path(tmp), "threads", args.trials, 1, args.cores, args.max_steps)
        if parallel["flags"] != threaded["flags"]:
            sys.exit("the two sweeps ran different trials; the comparison is void")
        result["layouts"] = [parallel, threaded]
        result["speedup_workers_over_threads"] = round(threaded["wall_s"] / parallel["wall_s"], 2)
        print(f"{'layout':<26} {'wall s':>8} {'mean trial s':>13}")
        for row in result["layouts"]:
            print(f"{row['layout']:<26} {row['wall_s']:>8.1f} {statistics.mean(row['trial_s']):>13.1f}")
        print(f"{args.trials} trials, {args.max_steps} steps each: workers are "
              f"{result['speedup_workers_over_threads']:.2f}x faster than threads")  # fmt: skip
    else:
        saving = result["pruning"] = pruning_saving(args.pruned_study)
        print(
            f"{saving['study']}: {saving['pruned_trials']} of {saving['complete_trials'] + saving['pruned_trials']} "
            f"trials pruned; trial time {saving['trial_s_spent']:.0f} s against an estimated "
            f"{saving['trial_s_estimated_without_pruning']:.0f} s without pruning ({saving['saved_share']:.0%} saved)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.output.read_text()) if args.output.is_file() else {}
    atomic_write_json(args.output, {**previous, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
