"""Results report over every run under an experiments folder: one table per (stage, dataset), runs that differ only
by seed (or other flags that do not define the experiment) pooled into one row as mean ± sample sd, the paper's
numbers beside them, unfinished runs listed apart, and optional validation curves (--plots). The html format is one
self-contained page: the same tables, each run's validation curve (PNG data) and the ranker's confidence intervals
(inline SVG).

    python report.py [ROOT] [--format md|csv|json|html] [--output FILE] [--plots DIR]

Which flags make two runs repeats of one experiment comes from the flags' own declarations in config.py (the same
ones --resume checks): runs are pooled when they agree in every TRAINING and OUTCOME flag.
"""

import argparse
import base64
import csv
import html
import io
import json
import math
import re
import statistics
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from config import RANKER, RETRIEVER, experiment_keys
from trainer.metrics import paired_bootstrap, per_user_metric
from trainer.run_folder import STAGES, Run, describe_unfinished, find_runs
from utils.errors import FIXES, InputError, WriteError, describe_os_error
from utils.files import atomic_output, atomic_write_text

STAGE_SCRIPTS = {"retriever": RETRIEVER, "ranker": RANKER}

# column -> where test_metrics.json keeps it
RETRIEVER_METRICS = {
    "Recall@10": ("Recall@10",),
    "NDCG@10": ("NDCG@10",),
    "Recall@20": ("Recall@20",),
    "NDCG@20": ("NDCG@20",),
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
    "retriever": ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20"),
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

# The LRURec paper (Yue et al., WSDM 2024), Table 3, on its own published splits (the lrurec-* dataset codes):
# NDCG@10, NDCG@20, Recall@10, Recall@20 per model (GRU4Rec has no implementation here).
LRUREC_TABLE3 = {
    "lrurec-ml-1m": {
        "narm": (0.16649, 0.19337, 0.28644, 0.39293),
        "sasrec": (0.19021, 0.21860, 0.31810, 0.43050),
        "bert4rec": (0.16377, 0.19118, 0.30894, 0.41738),
        "lru": (0.19298, 0.21990, 0.32636, 0.43313),
    },
    "lrurec-beauty": {
        "narm": (0.01887, 0.02239, 0.03312, 0.04708),
        "sasrec": (0.02917, 0.03403, 0.05043, 0.06965),
        "bert4rec": (0.02422, 0.02937, 0.04679, 0.06727),
        "lru": (0.03088, 0.03560, 0.05284, 0.07161),
    },
    "lrurec-video": {
        "narm": (0.05329, 0.06512, 0.09777, 0.14488),
        "sasrec": (0.05829, 0.07111, 0.10910, 0.15989),
        "bert4rec": (0.05600, 0.06958, 0.11252, 0.16640),
        "lru": (0.06198, 0.07547, 0.11337, 0.16705),
    },
    "lrurec-sports": {
        "narm": (0.01117, 0.01414, 0.02087, 0.03265),
        "sasrec": (0.01236, 0.01520, 0.02294, 0.03428),
        "bert4rec": (0.01457, 0.01813, 0.02879, 0.04295),
        "lru": (0.01815, 0.02149, 0.03148, 0.04477),
    },
    "lrurec-steam": {
        "narm": (0.06480, 0.07996, 0.12166, 0.18199),
        "sasrec": (0.06759, 0.08298, 0.12597, 0.18716),
        "bert4rec": (0.06433, 0.08117, 0.12188, 0.18245),
        "lru": (0.06934, 0.08508, 0.12831, 0.19082),
    },
}
MODEL_NAMES = {"lru": "LRURec", "sasrec": "SASRec", "bert4rec": "BERT4Rec", "narm": "NARM"}


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


def _number(value) -> float | None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if is_number else None


def _lookup(obj: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return _number(obj)


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample sd; both None unless every run reports the metric, so a row's numbers always cover its n
    runs; sd None for a single run."""
    if not values or any(value is None for value in values):
        return None, None
    sd = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), sd


def paper_numbers(stage: str, dataset: str, config: dict | None = None) -> dict | None:
    """The paper's numbers in this stage's columns, with their source; None for datasets the paper lacks. On the
    LRURec paper's splits, the row of the run's retriever model (`config`'s retriever_model) in that paper's Table 3."""
    if stage == "retriever" and dataset in LRUREC_TABLE3:
        model = (config or {}).get("retriever_model", "lru")
        if model not in LRUREC_TABLE3[dataset]:
            return None
        ndcg10, ndcg20, recall10, recall20 = LRUREC_TABLE3[dataset][model]
        return {
            "source": f"LRURec paper Table 3, {MODEL_NAMES[model]}",
            "Recall@10": recall10,
            "NDCG@10": ndcg10,
            "Recall@20": recall20,
            "NDCG@20": ndcg20,
        }
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
        for label, group in sorted(groups.items()):
            paper = paper_numbers(stage, dataset, group[0].config) or {}
            row = {
                "stage": stage,
                "dataset": printable(dataset),
                "group": printable(label),
                "n": len(group),
                "runs": [printable(r.name) for r in group],
            }
            for column, path in STAGE_METRICS[stage].items():
                row[f"{column} mean"], row[f"{column} sd"] = mean_sd([_lookup(r.test, path) for r in group])
                if stage == "retriever":  # each run's standard error over its test users, averaged over the runs
                    row[f"{column} se"] = mean_sd([_lookup(r.test, ("standard_errors", *path)) for r in group])[0]
            for column in PAPER_COLUMNS[stage]:
                row[f"paper {column}"] = paper.get(column)
            row["paper source"] = paper.get("source")
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ model comparisons

COMPARED_METRICS = ("NDCG@10", "Recall@10")


def per_user_test_values(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(users, per-user metric) of a finished retriever run's test users, from its candidates.npz; None without."""
    path = run.path / "candidates.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            users, ranks = data["test_users"], data["test_label_ranks"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return users, per_user_metric(torch.from_numpy(ranks), metric).numpy()


def group_values(runs: list[Run], metric: str) -> np.ndarray | None:
    """Each test user's metric averaged over the runs (seeds); None unless every run has the same test users."""
    values = [per_user_test_values(run, metric) for run in runs]
    if any(v is None for v in values) or any(not np.array_equal(v[0], values[0][0]) for v in values):
        return None
    return np.mean([v[1] for v in values], axis=0)


def model_comparisons(runs: list[Run]) -> list[dict]:
    """LRURec minus every other retriever model on each dataset where both ran with otherwise equal experiment flags:
    the paired difference of per-user test metrics (each user's mean over a model's seeds) with a 95% bootstrap
    interval over users."""
    finished = [r for r in runs if r.stage == "retriever" and r.test is not None and r.config]
    found = []
    for dataset in sorted({r.dataset for r in finished}):
        models: dict[str, list[Run]] = {}
        for run in (r for r in finished if r.dataset == dataset):
            models.setdefault(run.config.get("retriever_model", "lru"), []).append(run)
        for model, other in sorted(models.items()):
            lru = models.get("lru")
            if model == "lru" or lru is None:
                continue
            if differing_flags("retriever", [r.config for r in lru + other]) != ["retriever_model"]:
                continue  # other flags differ too (or a model's seeds disagree): not one comparison
            row = {"dataset": printable(dataset), "model": model, "lru_runs": len(lru), "other_runs": len(other)}
            for metric in COMPARED_METRICS:
                ours, theirs = group_values(lru, metric), group_values(other, metric)
                if ours is None or theirs is None or len(ours) != len(theirs):
                    break
                result = paired_bootstrap(torch.from_numpy(ours), torch.from_numpy(theirs))
                row[metric] = {**result, "relative": result["diff"] / float(theirs.mean()) if theirs.mean() else None}
            else:
                found.append(row)
    return found


def comparison_lines(comparisons: list[dict]) -> list[str]:
    lines = []
    for c in comparisons:
        parts = []
        for metric in COMPARED_METRICS:
            r = c[metric]
            low, high = r["ci95"]
            word = "LRURec higher" if low > 0 else "LRURec lower" if high < 0 else "no clear difference"
            relative = "" if r["relative"] is None else f" ({100 * r['relative']:+.2f}%)"
            parts.append(f"{metric} {r['diff']:+.4f}{relative} [{low:+.4f}, {high:+.4f}] {word}")
        lines.append(
            f"{c['dataset']}: LRURec ({c['lru_runs']} runs) minus {MODEL_NAMES.get(c['model'], c['model'])} "
            f"({c['other_runs']} runs), {c[COMPARED_METRICS[0]]['users']} test users: " + "; ".join(parts)
        )
    return lines


COMPARISON_NOTE = (
    "Per-user test metrics of each model (the mean over its runs), paired by user; 95% percentile bootstrap "
    "interval of the mean difference over users (2,000 resamples). Seeds enter only through each user's mean, so "
    "the interval is over users, not over trainings."
)


# ---------------------------------------------------------------------------------------------- output formats


def _md_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _md_mean_sd(mean: float | None, sd: float | None, se: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f} ± {_md_value(sd)}" + ("" if se is None else f" (se {se:.4f})")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_runs(names: list[str], shown: int = 3) -> str:
    if len(names) <= shown + 1:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f", … (+{len(names) - shown} more)"


def table_columns(stage: str, rows: list[dict]) -> list[str]:
    # fused columns only where some run has a fused score (runs made with --llm_fusion none have none)
    return [c for c in STAGE_METRICS[stage] if "fused" not in c or any(r[f"{c} mean"] is not None for r in rows)]


def _md_table(stage: str, rows: list[dict]) -> list[str]:
    columns = table_columns(stage, rows)
    lines = ["| group | n | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for row in rows:
        cells = [_md_mean_sd(row[f"{c} mean"], row[f"{c} sd"], row.get(f"{c} se")) for c in columns]
        lines.append(
            f"| {_md_cell(row['group'])} | {row['n']} | {_md_cell(_md_runs(row['runs']))} | {' | '.join(cells)} |"
        )
    for paper in paper_rows(rows):
        cells = [_md_value(paper.get(f"paper {c}")) for c in columns]
        lines.append(f"| paper ({paper['paper source']}) |  |  | {' | '.join(cells)} |")
    return lines


def paper_rows(rows: list[dict]) -> list[dict]:
    """The rows whose paper numbers differ (one per model on the LRURec paper's splits), each once."""
    seen, kept = set(), []
    for row in rows:
        if row["paper source"] is not None and row["paper source"] not in seen:
            seen.add(row["paper source"])
            kept.append(row)
    return kept


REPORT_INTRO = (
    "A row pools the runs that differ only in flags that do not define the experiment (seed, run name, paths, "
    "threads ...); cells are mean ± sample sd over its n runs (sd `-` for one run; `-` alone where not every run "
    "reports the metric)."
)
TABLE_NOTES = {
    "retriever": "Test metrics over all test users; (se x): the standard error over test users (sample sd / "
    "sqrt(users), the mean of the runs' own).",
    "ranker": "Test metrics on the subset of test users whose target is among the retriever's candidates; "
    "`llm-retriever` is the ranker's gain over the retriever's own order on those users; `overall` covers "
    "all test users.",
}


def tables_of(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The rows of each (stage, dataset) table, in the rows' order."""
    tables: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        tables.setdefault((row["stage"], row["dataset"]), []).append(row)
    return tables


def render_md(rows: list[dict], unfinished: list[Run], root: Path, comparisons: list[dict] | None = None) -> str:
    lines = ["# Results report", "", f"Runs under `{printable(str(root))}`. {REPORT_INTRO}"]
    for (stage, dataset), table_rows in tables_of(rows).items():
        lines += ["", f"## {stage} / {dataset}", "", TABLE_NOTES[stage], "", *_md_table(stage, table_rows)]
    if comparisons:
        lines += ["", "## Retriever models compared per user", "", COMPARISON_NOTE, ""]
        lines += [f"- {line}" for line in comparison_lines(comparisons)]
    if unfinished:
        lines += ["", "## Unfinished runs (no test_metrics.json)", ""]
        lines += [f"- {printable(describe_unfinished(run))}" for run in unfinished]
    return "\n".join(lines) + "\n"


def csv_columns() -> list[str]:
    columns = ["stage", "dataset", "group", "n", "runs"]
    for stage, metrics in STAGE_METRICS.items():
        parts = ("mean", "sd", "se") if stage == "retriever" else ("mean", "sd")
        columns += [f"{c} {part}" for c in metrics for part in parts]
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


INSTALL_MATPLOTLIB = "pip install matplotlib, or pip install -r requirements-dev.txt"


def load_pyplot():
    """matplotlib's pyplot (file output only), or None where matplotlib is not installed: it is a dev requirement,
    needed for the curves of --plots and of the html format alone."""
    try:
        import matplotlib
    except ImportError:
        return None
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


def curve_figure(plt, run: Run):
    """A figure of the run's validation curve with its best step marked; None when the run has no validation."""
    metric = "NDCG@10" if run.stage == "ranker" else (run.config or {}).get("best_metric", "Recall@10")
    points = [
        (float(record["step"]), value, record)
        for record in run.history
        if _lookup(record, ("step",)) is not None and (value := _lookup(record, (metric,))) is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        _draw_curve(ax, run, metric, points)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)  # figures stay in memory until closed
        raise
    return fig


def plot_run(plt, run: Run, path: Path) -> bool:
    """The run's validation curve as a PNG file; False (nothing written) when it has none."""
    fig = curve_figure(plt, run)
    if fig is None:
        return False
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # the temp name has no .png suffix to infer the format from
    finally:
        plt.close(fig)
    return True


def curve_png(plt, run: Run) -> bytes | None:
    """The run's validation curve as PNG bytes (the html format embeds them); None when it has none."""
    fig = curve_figure(plt, run)
    if fig is None:
        return None
    try:
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=80)
    finally:
        plt.close(fig)
    return out.getvalue()


def _draw_curve(ax, run: Run, metric: str, points: list[tuple[float, float, dict]]) -> None:
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=f"validation {metric}")
    step, value, _ = points[best_index(run, points)]
    ax.scatter([step], [value], color="red", zorder=3, label=f"best: step {step:g}, {value:.4f}")
    baseline = _lookup(run.test or {}, ("val", "metrics", "retriever", "NDCG@10"))
    if run.stage == "ranker" and baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"retriever's own order: {baseline:.4f}")
    ax.set(xlabel="step", ylabel=f"validation {metric}")
    # parse_math off: a run name holding "$...$" is a name, not a formula
    ax.set_title(printable(f"{run.stage} / {run.dataset} / {run.name}"), parse_math=False)
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


# -------------------------------------------------------------------------------------------------- html page

HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1400px; margin: 1.5em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; vertical-align: middle; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.paper td { background: #fff6dc; }
table.intervals td { white-space: nowrap; }
table.intervals td.num { font-size: 0.92em; }
td.interval { padding: 0 4px; }
.note { color: #555; }
.curves figure { display: inline-block; margin: 0.3em; }
.curves img { width: 420px; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
svg text { font: 11px system-ui, sans-serif; fill: #555; }
line.zero { stroke: #888; stroke-dasharray: 3 2; }
line.ci { stroke-width: 3; stroke-linecap: round; }
.better { stroke: #1a7f37; fill: #1a7f37; color: #1a7f37; }
.worse { stroke: #c62828; fill: #c62828; color: #c62828; }
.unclear { stroke: #666; fill: #666; }
"""
CI_METRICS = ("NDCG@10", "Recall@10")
CI_ORDERINGS = (("llm", "ranker"), ("fused", "fused"))  # test_metrics.json's name -> the label shown
CI_WIDTH, CI_HEIGHT, CI_MARGIN = 200, 18, 26  # px: the margin leaves room for the axis labels


def _h(text: str) -> str:
    """`text` as HTML: every name and flag value comes from run folders and their files."""
    return html.escape(printable(str(text)))


def _h_md(text: str) -> str:
    """A sentence written for the Markdown report, its `code` spans as <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_table(stage: str, rows: list[dict]) -> list[str]:
    columns = table_columns(stage, rows)
    head = "".join(f"<th>{_h(c)}</th>" for c in ("group", "n", "runs", *columns))
    lines = ['<table class="results">', f"<tr>{head}</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{_md_mean_sd(row[f"{c} mean"], row[f"{c} sd"], row.get(f"{c} se"))}</td>' for c in columns
        )
        runs = f'<td title="{_h(", ".join(row["runs"]))}">{_h(_md_runs(row["runs"]))}</td>'
        lines.append(f'<tr><td>{_h(row["group"])}</td><td class="num">{row["n"]}</td>{runs}{cells}</tr>')
    for paper in paper_rows(rows):
        cells = "".join(f'<td class="num">{_md_value(paper.get(f"paper {c}"))}</td>' for c in columns)
        lines.append(f'<tr class="paper"><td>paper ({_h(paper["paper source"])})</td><td></td><td></td>{cells}</tr>')
    return [*lines, "</table>"]


def verdict(low: float, high: float) -> tuple[str, str]:
    """What an interval of (ranker - retriever) says, as the ranker's test table words it, and its CSS class."""
    said = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
    return said, said if low > 0 or high < 0 else "unclear"


def _interval(comparisons: dict, name: str, metric: str) -> tuple[float, float, float] | None:
    """(diff, low, high) of test_metrics.json's paired bootstrap `comparisons[name][metric]`; None if absent."""
    stats = comparisons.get(name)
    stats = stats.get(metric) if isinstance(stats, dict) else None
    if not isinstance(stats, dict) or not isinstance(stats.get("ci95"), list) or len(stats["ci95"]) != 2:
        return None
    values = (_number(stats.get("diff")), _number(stats["ci95"][0]), _number(stats["ci95"][1]))
    return None if None in values else values


def ci_rows(run: Run) -> list[dict]:
    """A ranker run's paired bootstrap intervals against the retriever's own order, test then validation: one dict
    per (split, ordering): run, ordering, split and, per metric of CI_METRICS, (diff, low, high) or None."""
    test = run.test or {}
    val = test.get("val") if isinstance(test.get("val"), dict) else {}
    splits = [
        (f"test ({test.get('users_subset', '?')} users)", test.get("test_vs_retriever")),
        (f"validation ({val.get('users', '?')} users)", val.get("vs_retriever")),
    ]
    rows = []
    for split, comparisons in splits:
        for name, label in CI_ORDERINGS if isinstance(comparisons, dict) else ():
            intervals = {metric: _interval(comparisons, name, metric) for metric in CI_METRICS}
            if any(intervals.values()):
                rows.append({"run": run.name, "ordering": label, "split": split, **intervals})
    return rows


def _x_scale(values: list[float]):
    """Pixel x of a value on an axis holding `values` and 0."""
    low, high = min(0.0, *values), max(0.0, *values)
    span = (high - low) or 1.0
    return lambda value: round(CI_MARGIN + (value - low) / span * (CI_WIDTH - 2 * CI_MARGIN), 1)


def _ci_svg(x, interval: tuple[float, float, float]) -> str:
    diff, low, high = interval
    said, kind = verdict(low, high)
    text = f"{diff:+.4f} [{low:+.4f}, {high:+.4f}] {said}"
    y = CI_HEIGHT / 2
    return (
        f'<svg class="interval" width="{CI_WIDTH}" height="{CI_HEIGHT}" role="img" aria-label="{text}">'
        f"<title>{text}</title>"
        f'<line class="zero" x1="{x(0.0)}" x2="{x(0.0)}" y1="0" y2="{CI_HEIGHT}"/>'
        f'<line class="ci {kind}" x1="{x(low)}" x2="{x(high)}" y1="{y}" y2="{y}"/>'
        f'<circle class="diff {kind}" cx="{x(diff)}" cy="{y}" r="3.5"/></svg>'
    )


def _axis_svg(x, values: list[float]) -> str:
    ticks: list[float] = []
    for value in (0.0, min(values), max(values)):  # 0 first; a tick too close to one already drawn is left out
        if all(abs(x(value) - x(t)) >= 36 for t in ticks):
            ticks.append(value)
    marks = "".join(
        f'<line x1="{x(v)}" x2="{x(v)}" y1="0" y2="5" stroke="#888"/>'
        f'<text x="{x(v)}" y="16" text-anchor="middle">{"0" if v == 0 else f"{v:+.3f}"}</text>'
        for v in sorted(ticks)
    )
    return f'<svg class="axis" width="{CI_WIDTH}" height="20">{marks}</svg>'


def _html_intervals(runs: list[Run]) -> list[str]:
    rows = [row for run in runs for row in ci_rows(run)]
    if not rows:
        return []
    scales = {}
    for metric in CI_METRICS:
        values = [v for row in rows if row[metric] for v in row[metric]]
        scales[metric] = (_x_scale(values), values) if values else None
    head = "".join(f'<th colspan="2">{metric}</th>' for metric in CI_METRICS)
    lines = [
        "<h3>Minus the retriever's own order: mean over users, 95% paired bootstrap interval</h3>",
        '<p class="note">Each line is one interval; the dot is the mean difference, the dashed line zero. Left of '
        "zero: worse than the retriever's order on the same users; right: better.</p>",
        '<table class="intervals">',
        f"<tr><th>run</th><th>ordering</th><th>users</th>{head}</tr>",
    ]
    for row in rows:
        cells = ""
        for metric in CI_METRICS:
            interval = row[metric]
            if interval is None:
                cells += '<td class="num">-</td><td></td>'
                continue
            diff, low, high = interval
            said, kind = verdict(low, high)
            cells += (
                f'<td class="num {kind}">{diff:+.4f} [{low:+.4f}, {high:+.4f}] {said}</td>'
                f'<td class="interval">{_ci_svg(scales[metric][0], interval)}</td>'
            )
        lines.append(f"<tr><td>{_h(row['run'])}</td><td>{row['ordering']}</td><td>{_h(row['split'])}</td>{cells}</tr>")
    axes = "".join(f"<td></td><td>{_axis_svg(*scales[metric]) if scales[metric] else ''}</td>" for metric in CI_METRICS)
    lines.append(f'<tr class="axis"><td colspan="3"></td>{axes}</tr>')
    return [*lines, "</table>"]


def _html_curves(plt, runs: list[Run]) -> list[str]:
    if plt is None or not runs:
        return []
    figures, without = [], []
    for run in runs:
        png = curve_png(plt, run)
        if png is None:
            without.append(run.name)
            continue
        name, data = _h(run.name), base64.b64encode(png).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="validation curve of {name}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    lines = ["<h3>Validation curves</h3>"] if figures else []
    if figures:
        lines += ['<div class="curves">', *figures, "</div>"]
    if without:
        lines.append(f'<p class="note">No validation history, so no curve: {_h(", ".join(without))}</p>')
    return lines


def render_html(rows: list[dict], runs: list[Run], root: Path, plt) -> str:
    """One self-contained page (no network resources): the Markdown report's tables, the ranker's intervals as
    inline SVG, each run's validation curve as PNG data (none when `plt` is None: matplotlib not installed)."""
    body = [
        "<h1>Results report</h1>",
        f"<p>Runs under <code>{_h(str(root))}</code>. {_h_md(REPORT_INTRO)}</p>",
    ]
    if plt is None:
        body.append(f'<p class="note">No validation curves: matplotlib is not installed ({INSTALL_MATPLOTLIB}).</p>')
    finished = [run for run in runs if run.test is not None]
    for (stage, dataset), table_rows in tables_of(rows).items():
        in_table = [run for run in finished if (run.stage, printable(run.dataset)) == (stage, dataset)]
        body += [f"<h2>{_h(stage)} / {_h(dataset)}</h2>", f"<p>{_h_md(TABLE_NOTES[stage])}</p>"]
        body += _html_table(stage, table_rows)
        if stage == "ranker":
            body += _html_intervals(in_table)
        body += _html_curves(plt, in_table)
    comparisons = model_comparisons(runs)
    if comparisons:
        body += ["<h2>Retriever models compared per user</h2>", f"<p>{_h(COMPARISON_NOTE)}</p>", "<ul>"]
        body += [f"<li>{_h(line)}</li>" for line in comparison_lines(comparisons)]
        body.append("</ul>")
    unfinished = [run for run in runs if run.test is None]
    if unfinished:
        body += ["<h2>Unfinished runs (no test_metrics.json)</h2>", '<ul class="unfinished">']
        body += [f"<li>{_h(describe_unfinished(run))}</li>" for run in unfinished]
        body += ["</ul>", *_html_curves(plt, unfinished)]
    head = f'<meta charset="utf-8"><title>Results report</title><style>{HTML_STYLE}</style>'
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>{head}</head>\n<body>\n' + "\n".join(body) + "\n</body>\n</html>\n"
    )


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
    parser.add_argument(
        "--format", choices=("md", "csv", "json", "html"), default="md", help="output format (default md)"
    )
    parser.add_argument("--output", type=Path, help="write the report to this file instead of stdout")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write one validation-curve PNG per run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plt = load_pyplot() if args.plots or args.format == "html" else None
        if args.plots and plt is None:  # before any output: fail whole, not half-done
            raise InputError(f"--plots: expected matplotlib to be installed, found it missing ({INSTALL_MATPLOTLIB})")
        runs = find_runs(args.root)
        note_escaped_names(runs)
        unfinished = [run for run in runs if run.test is None]
        rows = build_rows(runs)
        if args.format == "md":
            text = render_md(rows, unfinished, args.root, model_comparisons(runs))
        elif args.format == "html":
            if plt is None:
                no_curves = "note: matplotlib is not installed, so the html report has no validation curves"
                print(f"{no_curves} ({INSTALL_MATPLOTLIB})", file=sys.stderr)
            text = render_html(rows, runs, args.root, plt)
        else:
            text = render_csv(rows) if args.format == "csv" else render_json(rows)
            for run in unfinished:  # the table formats hold finished runs only
                print(f"note: unfinished run {describe_unfinished(run)}", file=sys.stderr)
        if args.plots:
            make_plot_dir(args.plots)  # before the report is written: fail whole, not half-done
        if args.output:
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)
        if args.plots:
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
