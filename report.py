"""Results report over every run under an experiments folder: one table per (stage, dataset), runs that differ only
by seed (or other flags that do not define the experiment) pooled into one row as mean ± sample sd, the paper's
numbers beside them, unfinished runs listed apart, and optional validation curves (--plots).

    python report.py [ROOT] [--format md|csv|json] [--output FILE] [--plots DIR]

Which flags make two runs repeats of one experiment comes from the flags' own declarations in config.py (the same
ones --resume checks): runs are pooled when they agree in every TRAINING and OUTCOME flag.
"""

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from pathlib import Path

from config import RANKER, RETRIEVER, experiment_keys
from trainer.run_folder import STAGES, Run, describe_unfinished, find_runs
from utils.errors import FIXES, InputError, WriteError, describe_os_error
from utils.files import atomic_output, atomic_write_text

STAGE_SCRIPTS = {"retriever": RETRIEVER, "ranker": RANKER}

# column -> where test_metrics.json keeps it
RETRIEVER_METRICS = {
    "Recall@10": ("Recall@10",),
    "NDCG@10": ("NDCG@10",),
    "Recall@20": ("Recall@20",),
}
# "subset": the test users whose target is among the retriever's candidates (the only ones the ranker can help)
RANKER_METRICS = {
    "llm NDCG@10": ("subset", "llm", "NDCG@10"),
    "llm Recall@10": ("subset", "llm", "Recall@10"),
    "retriever NDCG@10": ("subset", "retriever", "NDCG@10"),
    "retriever Recall@10": ("subset", "retriever", "Recall@10"),
    "fused NDCG@10": ("subset", "fused", "NDCG@10"),
    "fused Recall@10": ("subset", "fused", "Recall@10"),
    "llm-retriever NDCG@10": ("test_vs_retriever", "llm", "NDCG@10", "diff"),
    "overall llm NDCG@10": ("overall", "llm", "NDCG@10"),
}
STAGE_METRICS = {"retriever": RETRIEVER_METRICS, "ranker": RANKER_METRICS}
# the columns the paper reports a number for
PAPER_COLUMNS = {
    "retriever": ("Recall@10", "NDCG@10"),
    "ranker": tuple(c for c in RANKER_METRICS if "fused" not in c),
}

# The LlamaRec paper, Table 1: all test users, LRURec (the retriever) and LlamaRec (the ranker).
PAPER_TABLE1 = {
    "ml-100k": {
        "LRURec": {"Recall@10": 0.1426, "NDCG@10": 0.0705},
        "LlamaRec": {"Recall@10": 0.1524, "NDCG@10": 0.0759},
    },
    "beauty": {
        "LRURec": {"Recall@10": 0.0916, "NDCG@10": 0.0533},
        "LlamaRec": {"Recall@10": 0.0971, "NDCG@10": 0.0554},
    },
    "games": {"LRURec": {"Recall@10": 0.1463, "NDCG@10": 0.0800}, "LlamaRec": {"Recall@10": 0.1599, "NDCG@10": 0.0887}},
}
# The LlamaRec paper, Table 3: the subset of test users whose target is among LRURec's candidates.
PAPER_TABLE3 = {
    "ml-100k": {
        "LRURec": {"Recall@10": 0.6654, "NDCG@10": 0.3367},
        "LlamaRec": {"Recall@10": 0.7560, "NDCG@10": 0.3766},
    },
    "beauty": {
        "LRURec": {"Recall@10": 0.7170, "NDCG@10": 0.4168},
        "LlamaRec": {"Recall@10": 0.7600, "NDCG@10": 0.4337},
    },
    "games": {"LRURec": {"Recall@10": 0.6879, "NDCG@10": 0.3760}, "LlamaRec": {"Recall@10": 0.7522, "NDCG@10": 0.4173}},
}
# Our dataset names -> the paper's (custom-beauty / custom-games are the paper's splits loaded as custom CSV).
PAPER_DATASETS = {"ml-100k": "ml-100k", "custom-beauty": "beauty", "custom-games": "games"}


def _flag_text(config: dict, key: str) -> str:
    if key not in config:
        return "unset"  # a flag added after this run was made
    value = config[key]
    return value if isinstance(value, str) else json.dumps(value)


def differing_flags(stage: str, configs: list[dict]) -> list[str]:
    """The experiment-defining flags of `stage` whose values are not the same in all configs."""
    keys = sorted(experiment_keys(STAGE_SCRIPTS[stage]))
    return [key for key in keys if len({_flag_text(config, key) for config in configs}) > 1]


def group_label(config: dict, flags: list[str]) -> str:
    return " ".join(f"{key}={_flag_text(config, key)}" for key in flags) or "defaults"


def printable(text: str) -> str:
    """`text` with every byte of a name that is not UTF-8 (Python holds it as a lone surrogate) shown as \\xNN, so
    that every format is written as valid UTF-8 and a JSON or CSV reader gets the name as shown."""
    return re.sub("[\ud800-\udfff]", _escape_surrogate, text)


def _escape_surrogate(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _lookup(obj: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    is_number = isinstance(obj, int | float) and not isinstance(obj, bool) and math.isfinite(obj)
    return float(obj) if is_number else None


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd; both None unless every run reports the metric, so a row's numbers always cover its n
    runs; sd None for a single run."""
    if not values or any(value is None for value in values):
        return None, None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), sd


def paper_numbers(stage: str, dataset: str) -> dict | None:
    """The paper's numbers in this stage's columns, with their source; None for datasets the paper lacks."""
    name = PAPER_DATASETS.get(dataset)
    if name is None:
        return None
    table1 = PAPER_TABLE1[name]
    if stage == "retriever":
        return {"source": "Table 1", **table1["LRURec"]}
    lrurec, llamarec = PAPER_TABLE3[name]["LRURec"], PAPER_TABLE3[name]["LlamaRec"]
    return {
        "source": "Table 3, overall: Table 1",
        "llm NDCG@10": llamarec["NDCG@10"],
        "llm Recall@10": llamarec["Recall@10"],
        "retriever NDCG@10": lrurec["NDCG@10"],
        "retriever Recall@10": lrurec["Recall@10"],
        "llm-retriever NDCG@10": round(llamarec["NDCG@10"] - lrurec["NDCG@10"], 4),
        "overall llm NDCG@10": table1["LlamaRec"]["NDCG@10"],
    }


def build_rows(runs: list[Run]) -> list[dict]:
    """One flat row per (stage, dataset, group) of finished runs: stage, dataset, group, n, runs,
    '<metric> mean', '<metric> sd', 'paper <metric>' and 'paper source'."""
    tables: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.test is not None:
            tables.setdefault((run.stage, run.dataset), []).append(run)
    rows = []
    for (stage, dataset), table_runs in sorted(tables.items(), key=lambda item: (STAGES.index(item[0][0]), item[0][1])):
        flags = differing_flags(stage, [run.config for run in table_runs])
        groups: dict[str, list[Run]] = {}
        for run in table_runs:
            groups.setdefault(group_label(run.config, flags), []).append(run)
        paper = paper_numbers(stage, dataset) or {}
        for label, group in sorted(groups.items()):
            row = {
                "stage": stage,
                "dataset": printable(dataset),
                "group": printable(label),
                "n": len(group),
                "runs": [printable(r.name) for r in group],
            }
            for column, path in STAGE_METRICS[stage].items():
                row[f"{column} mean"], row[f"{column} sd"] = mean_sd([_lookup(r.test, path) for r in group])
            for column in PAPER_COLUMNS[stage]:
                row[f"paper {column}"] = paper.get(column)
            row["paper source"] = paper.get("source")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- output formats


def _md_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _md_mean_sd(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {_md_value(sd)}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_runs(names: list[str], shown: int = 3) -> str:
    if len(names) <= shown + 1:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f", … (+{len(names) - shown} more)"


def _md_table(stage: str, rows: list[dict]) -> list[str]:
    # fused columns only where some run has a fused score (runs made with --llm_fusion none have none)
    columns = [c for c in STAGE_METRICS[stage] if "fused" not in c or any(r[f"{c} mean"] is not None for r in rows)]
    lines = ["| group | n | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for row in rows:
        cells = [_md_mean_sd(row[f"{c} mean"], row[f"{c} sd"]) for c in columns]
        lines.append(
            f"| {_md_cell(row['group'])} | {row['n']} | {_md_cell(_md_runs(row['runs']))} | {' | '.join(cells)} |"
        )
    paper = rows[0]
    if paper["paper source"] is not None:
        cells = [_md_value(paper.get(f"paper {c}")) for c in columns]
        lines.append(f"| paper ({paper['paper source']}) |  |  | {' | '.join(cells)} |")
    return lines


def render_md(rows: list[dict], unfinished: list[Run], root: Path) -> str:
    lines = [
        "# Results report",
        "",
        f"Runs under `{printable(str(root))}`. A row pools the runs that differ only in flags that do not define "
        "the experiment (seed, run name, paths, threads ...); cells are mean ± sample sd over its n runs (sd `-` for "
        "one run; `-` alone where not every run reports the metric).",
    ]
    notes = {
        "retriever": "Test metrics over all test users.",
        "ranker": "Test metrics on the subset of test users whose target is among the retriever's candidates; "
        "`llm-retriever` is the ranker's gain over the retriever's own order on those users; `overall` covers "
        "all test users.",
    }
    tables: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        tables.setdefault((row["stage"], row["dataset"]), []).append(row)
    for (stage, dataset), table_rows in tables.items():
        lines += ["", f"## {stage} / {dataset}", "", notes[stage], "", *_md_table(stage, table_rows)]
    if unfinished:
        lines += ["", "## Unfinished runs (no test_metrics.json)", ""]
        lines += [f"- {printable(describe_unfinished(run))}" for run in unfinished]
    return "\n".join(lines) + "\n"


def csv_columns() -> list[str]:
    columns = ["stage", "dataset", "group", "n", "runs"]
    for metrics in STAGE_METRICS.values():
        columns += [f"{c} {part}" for c in metrics for part in ("mean", "sd")]
    for paper_columns in PAPER_COLUMNS.values():
        columns += [f"paper {c}" for c in paper_columns if f"paper {c}" not in columns]
    return [*columns, "paper source"]


def render_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=csv_columns(), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {**row, "runs": json.dumps(row["runs"])}  # a JSON list: names holding commas survive
        writer.writerow({key: "" if value is None else value for key, value in cells.items()})
    return out.getvalue()


def render_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------------------ plots


def import_pyplot():
    """matplotlib's pyplot (file output only); it is a dev requirement, needed for --plots alone."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(
            "--plots: expected matplotlib to be installed, found it missing (pip install matplotlib, "
            "or pip install -r requirements-dev.txt)"
        ) from None
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def best_index(run: Run, points: list[tuple[float, float, dict]]) -> int:
    """The validation whose model was kept: the retriever marks it ("best"); the ranker keeps the first best
    NDCG@10."""
    marked = [i for i, (_, _, record) in enumerate(points) if record.get("best") is True]
    if run.stage == "retriever" and marked:
        return marked[-1]
    values = [value for _, value, _ in points]
    return values.index(max(values))


def plot_run(plt, run: Run, path: Path) -> bool:
    """The run's validation curve with its best step marked; False (nothing written) when it has none."""
    metric = "NDCG@10" if run.stage == "ranker" else (run.config or {}).get("best_metric", "Recall@10")
    points = [
        (float(record["step"]), value, record)
        for record in run.history
        if _lookup(record, ("step",)) is not None and (value := _lookup(record, (metric,))) is not None
    ]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        _draw_curve(ax, run, metric, points)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # the temp name has no .png suffix to infer the format from
    finally:
        plt.close(fig)  # figures stay in memory until closed
    return True


def _draw_curve(ax, run: Run, metric: str, points: list[tuple[float, float, dict]]) -> None:
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=f"validation {metric}")
    step, value, _ = points[best_index(run, points)]
    ax.scatter([step], [value], color="red", zorder=3, label=f"best: step {step:g}, {value:.4f}")
    baseline = _lookup(run.test or {}, ("val", "metrics", "retriever", "NDCG@10"))
    if run.stage == "ranker" and baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"retriever's own order: {baseline:.4f}")
    title = printable(f"{run.stage} / {run.dataset} / {run.name}")
    ax.set(xlabel="step", ylabel=f"validation {metric}", title=title)
    ax.legend(fontsize="small")


def make_plot_dir(plot_dir: Path) -> None:
    """--plots DIR, created before the report is written: a DIR that cannot be made fails the command at once."""
    plot_dir = Path(plot_dir)
    if plot_dir.exists() and not plot_dir.is_dir():
        raise InputError(f"--plots {plot_dir}: expected a folder for the PNG files, found a file; pass another folder")
    try:
        plot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fix = "" if e.errno in FIXES else "; pass a folder you can create and write to"
        raise WriteError(f"--plots: could not create the folder {describe_os_error(e, plot_dir)}{fix}") from None


def write_plots(plt, runs: list[Run], plot_dir: Path) -> list[Path]:
    written = []
    for run in runs:
        # named after the run's folder (ROOT/<stage>/<dataset>/<run>), which is unique even where config.json
        # moves two runs of one name into one table
        path = Path(plot_dir) / f"{run.path.parent.parent.name}-{run.path.parent.name}-{run.name}.png"
        if plot_run(plt, run, path):
            written.append(path)
        else:
            print(f"note: {run.path}: no validation history, so no plot", file=sys.stderr)
    return written


# -------------------------------------------------------------------------------------------------------- CLI


def note_escaped_names(runs: list[Run]) -> None:
    for run in runs:
        shown = printable(str(run.path))
        if shown != str(run.path):
            print(
                f"note: {shown}: the folder name is not UTF-8; the report shows its bytes escaped as \\xNN",
                file=sys.stderr,
            )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python report.py", description="Results report over every run under ROOT.")
    parser.add_argument("root", nargs="?", type=Path, default=Path("experiments"), help="experiments folder")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    parser.add_argument("--output", type=Path, help="write the report to this file instead of stdout")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write one validation-curve PNG per run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plt = import_pyplot() if args.plots else None  # before any output: fail whole, not half-done
        runs = find_runs(args.root)
        note_escaped_names(runs)
        unfinished = [run for run in runs if run.test is None]
        rows = build_rows(runs)
        if args.format == "md":
            text = render_md(rows, unfinished, args.root)
        else:
            text = render_csv(rows) if args.format == "csv" else render_json(rows)
            for run in unfinished:  # the table formats hold finished runs only
                print(f"note: unfinished run {describe_unfinished(run)}", file=sys.stderr)
        if plt is not None:
            make_plot_dir(args.plots)  # before the report is written: fail whole, not half-done
        if args.output:
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)
        if plt is not None:
            written = write_plots(plt, runs, args.plots)
            print(f"{len(written)} plots written to {args.plots}", file=sys.stderr)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:  # disk full, permission denied: the file being written was removed
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder that cannot be listed or read
        print(f"error: {printable(describe_os_error(e))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
