"""How each stage's cost grows with the data: synthetic MovieLens-shaped data (bench/synthetic.py) at several sizes,
every stage timed through the project's own code, with its peak memory.

    python -m bench.bench_scale --sizes 100000 1000000 10000000 --num_threads 2

Per size, in this order:
- preprocess: `python -m datasets` on the custom CSV files (a fresh cache), in its own process;
- retriever: a run folder made as train_retriever.py makes it (the LRURec paper's ML-1M recipe: max_len 200, batch
  128, dropout 0.2, evaluation batch 256), --bench_steps training steps ending with one full-ranking validation, then
  the export (val + test evaluation, training-prefix candidates, files), in one process per size;
- ranker data: the val/test prompts (the shipped Llama-2 tokenizer) and the training sets (uniform negatives over
  every prefix, and retrieved candidates), 1,000 training prompts built;
- recommend: recommend.py for --recommend_users existing users, in its own process.
Peak memory is each phase's own peak RSS (the kernel's high-water mark, reset before the phase; a process's whole
peak for the ones run apart). The log-log slope between consecutive sizes is taken against interactions and against
each stage's own work (positions x items for training, users x items for full ranking, ...). Writes
experiments/bench/scale.json, and with --plot a PNG (matplotlib).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.synthetic import write_synthetic
from utils.files import REPO_ROOT, atomic_write_json

LLAMA2_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "llama-2-tokenizer"
RECIPE = [  # the LRURec paper's ML-1M recipe (the ml-1m / ml-20m defaults)
    "--bert_max_len", "200", "--train_batch_size", "128", "--val_batch_size", "256", "--test_batch_size", "256",
    "--bert_dropout", "0.2", "--bert_attn_dropout", "0.2", "--no-train_all_items", "--label_smoothing", "0",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """This process's peak resident memory since the last reset_peak_rss()."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts from the current RSS


def timed_child(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # not child.wait(): wait4 also gives the child's own peak RSS
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ...: exit {child.returncode}; see {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- phases


@contextmanager
def phase(results: dict, name: str, work: float, unit: str) -> Iterator[None]:
    """Time a phase of this process; record its seconds, its own peak RSS and its work under results[name]."""
    reset_peak_rss()
    start = time.perf_counter()
    yield
    results[name] = {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "work": work, "unit": unit}


def in_process_phases(args: argparse.Namespace) -> dict:
    """The retriever and ranker-data phases of one size (run in a child process: `--phases`)."""
    results: dict = {}
    split, candidates, seed = retriever_phases(args, results)
    ranker_prompt_phase(split, candidates, seed, results)
    return results


def retriever_phases(args: argparse.Namespace, results: dict) -> tuple:
    """Preprocessed data, --bench_steps of training with one validation, and the candidate export, as
    train_retriever.py runs them; returns (split, candidates, seed)."""
    import torch

    from config import RETRIEVER, candidate_export, data_config, parse_flags, retriever_spec, retriever_training
    from dataloader.candidates import load_candidates
    from dataloader.retriever_data import training_windows, window_step
    from datasets import load_split
    from model.retrievers import build_retriever
    from trainer.retriever_export import export_candidates, load_best
    from trainer.retriever_train import train
    from trainer.run_folder import prepare_run_dir, run_folder, write_run_info
    from trainer.runtime import limit_onednn_cache

    argv = ["--dataset_code", "custom", "--custom_path", str(args.phases), "--data_root", str(args.data_root),
            "--experiment_root", str(args.experiment_root), "--run_name", "bench", "--max_steps", str(args.bench_steps),
            "--val_iterations", str(args.bench_steps), "--num_threads", str(args.num_threads), *RECIPE]  # fmt: skip
    flags = parse_flags(RETRIEVER, argv)
    limit_onednn_cache()  # as train_retriever.py does
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    split = load_split(data_config(flags))
    spec, training = retriever_spec(flags), retriever_training(flags)
    tokens, _ = training_windows(split.train, spec.max_len, window_step(training.sliding_window_size, spec.max_len))
    steps_per_epoch = math.ceil(len(tokens) / training.batch_size)
    results["shape"] = {**split.stats(), "training_windows": len(tokens), "steps_per_epoch": steps_per_epoch}
    results["recommend_users"] = [split.user_raw_ids[k % split.num_users] for k in range(args.recommend_users)]
    del tokens
    run_dir = run_folder(flags.experiment_root, "retriever", flags.dataset_name, flags.run_name)
    shutil.rmtree(run_dir, ignore_errors=True)
    prepare_run_dir(run_dir, "retriever", resume=False, overwrite=False)
    write_run_info(run_dir, vars(flags), flags.seed)
    model, device = build_retriever(spec, split.num_items), torch.device("cpu")
    positions = args.bench_steps * training.batch_size * spec.max_len
    with phase(results, "train_steps_and_validation", positions * split.num_items, "positions x items"):
        train(model, split, training, run_dir, device)
    steps_and_validation = record_training(results, run_dir, split, positions, steps_per_epoch, args.bench_steps)
    load_best(model, run_dir, device)
    parts: dict[str, float] = {}
    with phase(results, "export", split.num_users * split.num_items, "users x items"):
        export_candidates(model, split, spec, candidate_export(flags), run_dir, device, None, parts)
    candidates = load_candidates(run_dir, split)
    record_export(results, parts, run_dir, split, candidates, steps_and_validation)
    return split, candidates, flags.seed


def record_training(
    results: dict, run_dir: Path, split, positions: int, steps_per_epoch: int, bench_steps: int
) -> float:
    """The training phase's parts from the run's training_summary.json; returns the seconds of the steps and the
    validation (what the export is compared with)."""
    summary = json.loads((run_dir / "training_summary.json").read_text())
    validation = summary["validation_seconds"]
    steps = summary["train_seconds_incl_validation"] - validation
    session_setup = results["train_steps_and_validation"]["seconds"] - summary["train_seconds_incl_validation"]
    per_step = positions / bench_steps * split.num_items
    results["train_setup"] = {"seconds": session_setup, "work": split.stats()["interactions"], "unit": "interactions"}
    results["train_step"] = {"seconds": steps / bench_steps, "work": per_step, "unit": "positions x items"}
    results["train_epoch_projected"] = {
        "seconds": steps / bench_steps * steps_per_epoch, "work": steps_per_epoch * per_step, "unit": "positions x items"
    }  # fmt: skip
    results["validation"] = {"seconds": validation, "work": split.num_users * split.num_items, "unit": "users x items"}
    for name in ("train_setup", "train_step", "train_epoch_projected", "validation"):
        results[name]["peak_rss_mib"] = results["train_steps_and_validation"]["peak_rss_mib"]
    return steps + validation


def record_export(results: dict, parts: dict, run_dir: Path, split, candidates, steps_and_validation: float) -> None:
    """The export's parts (export_candidates' `parts`), and its ratio to the training steps and validation."""
    pairs, exported = split.num_users * split.num_items, len(candidates.train["users"])
    results["export_evaluation"] = {"seconds": parts["evaluation"], "work": 2 * pairs, "unit": "users x items"}
    results["export_train_prefixes"] = {"seconds": parts["train_prefixes"], "work": exported * split.num_items,
                                        "unit": "prefixes x items", "prefixes": exported,
                                        "prefixes_total": candidates.meta["train_metrics"]["prefixes_total"]}  # fmt: skip
    results["export_files"] = {"seconds": parts["files"], "work": (run_dir / "candidates.npz").stat().st_size,
                               "unit": "bytes"}  # fmt: skip
    for name in ("export_evaluation", "export_train_prefixes", "export_files"):
        results[name]["peak_rss_mib"] = results["export"]["peak_rss_mib"]
    results["after_training"] = {
        "seconds": results["export"]["seconds"],
        "vs_train_steps_and_validation": results["export"]["seconds"] / steps_and_validation,
    }


def ranker_prompt_phase(split, candidates, seed: int, results: dict) -> None:
    """Validation/test prompts and both kinds of training sets, as train_ranker.py builds them (1,000 prompts read)."""
    from config import default_config
    from dataloader.prompts import PromptBuilder, PromptConfig
    from dataloader.ranker_data import RankerData, build_eval_sets, build_train_set
    from model.llm import load_tokenizer
    from trainer.verbalizer import letter_token_ids

    tokenizer = load_tokenizer(str(LLAMA2_TOKENIZER))
    data = default_config(RankerData, seed=seed)
    with phase(results, "ranker_prompts", split.num_users, "users"):
        builder = PromptBuilder(tokenizer, split.titles, default_config(PromptConfig))
        letters = list(letter_token_ids(builder, 20).values())
        val_set, test_set = build_eval_sets(builder, split, candidates, data)
        uniform = build_train_set(builder, split, candidates, data, letters, 2)
        retrieved_data = dataclasses.replace(data, train_candidates="retrieved")
        retrieved = build_train_set(builder, split, candidates, retrieved_data, letters, 2)
        for index in np.random.default_rng(0).choice(len(uniform), size=min(1000, len(uniform)), replace=False):
            uniform[int(index)]
    results["ranker_prompts"].update(
        val_prompts=len(val_set), test_prompts=len(test_set), uniform_train=len(uniform), retrieved_train=len(retrieved)
    )


def one_size(args: argparse.Namespace, interactions: int) -> dict:
    label = f"{interactions / 1e6:g}M"
    data = args.data_dir / label
    if not (data / "items.csv").is_file():
        shape = write_synthetic(data, interactions, seed=0)
        print(f"{label}: wrote {shape}", file=sys.stderr)
    root = args.work_dir / label
    shutil.rmtree(root, ignore_errors=True)
    result = {"label": label, "target_interactions": interactions}
    seconds, rss = timed_child(
        [sys.executable, "-m", "datasets", "--dataset_code", "custom", "--custom_path", str(data), "--data_root",
         str(root / "data")], root / "preprocess.log"
    )  # fmt: skip
    result["preprocess"] = {"seconds": seconds, "peak_rss_mib": rss, "work": interactions, "unit": "interactions"}
    print(f"{label}: preprocess {seconds:.1f} s, {rss:.0f} MiB", file=sys.stderr)
    output = root / "phases.json"
    timed_child(
        [sys.executable, "-m", "bench.bench_scale", "--phases", str(data), "--data_root", str(root / "data"),
         "--experiment_root", str(root / "experiments"), "--num_threads", str(args.num_threads),
         "--bench_steps", str(args.bench_steps), "--recommend_users", str(args.recommend_users), "--output",
         str(output)], root / "phases.log"
    )  # fmt: skip
    result.update(json.loads(output.read_text()))
    result["preprocess"]["work"] = result["shape"]["interactions"]
    run = root / "experiments" / "retriever" / f"custom-{label}" / "bench"
    users = result.pop("recommend_users")
    seconds, rss = timed_child(
        [sys.executable, "recommend.py", "--retriever_run", str(run), "--users", *users, "--output",
         str(root / "recommendations.jsonl"), "--num_threads", str(args.num_threads)], root / "recommend.log"
    )  # fmt: skip
    result["recommend"] = {"seconds": seconds, "peak_rss_mib": rss, "work": result["shape"]["interactions"],
                           "unit": f"interactions ({args.recommend_users} users)"}  # fmt: skip
    return result


STAGES = ("preprocess", "train_setup", "train_step", "validation", "export_evaluation", "export_train_prefixes",
          "export_files", "ranker_prompts", "recommend")  # fmt: skip


def slopes(results: list[dict]) -> list[dict]:
    """The log-log slope of each stage's time between consecutive sizes, against interactions and its own work."""
    rows = []
    for small, large in zip(results, results[1:], strict=False):
        ratio = large["shape"]["interactions"] / small["shape"]["interactions"]
        for stage in STAGES:
            a, b = small[stage], large[stage]
            time_ratio = b["seconds"] / a["seconds"]
            rss_ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
            rows.append({
                "stage": stage, "from": small["label"], "to": large["label"],
                "slope_vs_interactions": math.log(time_ratio) / math.log(ratio),
                "slope_vs_work": math.log(time_ratio) / math.log(b["work"] / a["work"]) if b["work"] != a["work"] else None,
                "work_unit": a["unit"], "rss_slope_vs_interactions": math.log(rss_ratio) / math.log(ratio),
            })  # fmt: skip
    return rows


def print_table(results: list[dict], slope_rows: list[dict]) -> None:
    print("size  users   items  interactions | " + " | ".join(f"{s} s / MiB" for s in STAGES))
    for r in results:
        shape = r["shape"]
        cells = " | ".join(f"{r[s]['seconds']:.2f} / {r[s]['peak_rss_mib']:.0f}" for s in STAGES)
        print(f"{r['label']:<5} {shape['users']:<7} {shape['items']:<6} {shape['interactions']:<12} | {cells}")
    for r in results:
        print(
            f"{r['label']}: after training {r['after_training']['seconds']:.1f} s = "
            f"{r['after_training']['vs_train_steps_and_validation']:.2f}x the training steps + one "
            f"validation; epoch projected {r['train_epoch_projected']['seconds']:.0f} s"
        )
    print("slopes (log-log): stage, sizes, vs interactions, vs own work (unit), peak RSS vs interactions")
    for row in slope_rows:
        work = "-" if row["slope_vs_work"] is None else f"{row['slope_vs_work']:.2f}"
        print(
            f"  {row['stage']:<22} {row['from']}->{row['to']}: {row['slope_vs_interactions']:.2f}, {work} "
            f"({row['work_unit']}), RSS {row['rss_slope_vs_interactions']:.2f}"
        )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["shape"]["interactions"] for r in results]
    for stage in STAGES:
        left.plot(sizes, [r[stage]["seconds"] for r in results], marker="o", label=stage)
        right.plot(sizes, [r[stage]["peak_rss_mib"] / 1024 for r in results], marker="o", label=stage)
    reference = np.array([sizes[0], sizes[-1]], dtype=float)
    first = results[0]["preprocess"]["seconds"]
    left.plot(reference, first * reference / reference[0], "k--", linewidth=0.8, label="slope 1")
    left.set(xscale="log", yscale="log", xlabel="interactions", ylabel="seconds", title="time per stage")
    right.axhline(8, color="gray", linestyle=":", linewidth=0.8)
    right.text(sizes[0], 8.3, "8 GiB", fontsize="x-small", color="gray")
    right.set(xscale="log", yscale="log", xlabel="interactions", ylabel="GiB", title="peak RSS per stage")
    left.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--bench_steps", type=int, default=20, help="training steps timed (then one validation)")
    parser.add_argument("--recommend_users", type=int, default=1000)
    parser.add_argument("--data_dir", type=Path, default=REPO_ROOT / "experiments" / "bench" / "scale_data")
    parser.add_argument("--work_dir", type=Path, default=REPO_ROOT / "experiments" / "bench" / "scale_work")
    parser.add_argument("--plot", type=Path, default=None, help="write the time/memory plot (PNG) here")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "experiments" / "bench" / "scale.json")
    parser.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --json")
    parser.add_argument("--phases", type=Path, help=argparse.SUPPRESS)  # internal: one size's in-process phases
    parser.add_argument("--data_root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--experiment_root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phases is not None:
        atomic_write_json(args.output, in_process_phases(args))
        return 0
    if args.replot:
        record = json.loads(args.json.read_text())
        print_table(record["sizes"], record["slopes"])
        plot(record["sizes"], args.plot)
        return 0
    results = []
    for size in sorted(args.sizes):
        results.append(one_size(args, size))
        record = {"sizes": results, "slopes": slopes(results), "num_threads": args.num_threads}
        atomic_write_json(args.json, record)  # after every size: a long run keeps what it measured
    print_table(results, record["slopes"])
    print(f"wrote {args.json}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
