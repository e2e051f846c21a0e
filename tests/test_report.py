"""The results report (python report.py) over small run folders written in the real formats."""

import csv
import io
import json
import math
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from report import main
from utils.files import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    stage: str,
    dataset: str,
    name: str,
    config: dict,
    test: dict | None,
    history: list[dict],
    recorded_dataset: str | None = None,
):
    """A run folder ROOT/stage/dataset/name; its config.json says `recorded_dataset` (default: the folder's)."""
    run_dir = root / stage / dataset / name
    run_dir.mkdir(parents=True)
    config = {**config, "run_name": name, "dataset_name": recorded_dataset or dataset}
    (run_dir / "config.json").write_text(json.dumps(config))
    if test is not None:
        (run_dir / "test_metrics.json").write_text(json.dumps(test))
    (run_dir / "val_history.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
    (run_dir / "checkpoints").mkdir()  # sub-folders of a run are not runs


def ranker_test_metrics(llm_ndcg: float, llm_recall: float) -> dict:
    retriever = {"NDCG@10": 0.30, "Recall@10": 0.60}
    return {
        "subset": {"retriever": retriever, "llm": {"NDCG@10": llm_ndcg, "Recall@10": llm_recall}, "random": {}},
        "overall": {"retriever": {"NDCG@10": 0.06}, "llm": {"NDCG@10": llm_ndcg / 5}},
        "users_subset": 100,
        "users_all": 500,
        "test_vs_retriever": {"llm": {"NDCG@10": {"diff": llm_ndcg - 0.30, "ci95": [-0.1, 0.1]}}},
        "val": {"metrics": {"retriever": {"NDCG@10": 0.33}}},
        "trained": True,
    }


def ranker_history(values: list[float]) -> list[dict]:
    return [{"step": 16 * (i + 1), "NDCG@10": value, "Recall@10": 0.5} for i, value in enumerate(values)]


@pytest.fixture
def root(tmp_path) -> Path:
    """ml-100k: two seeds of lora_lr=0.001 (llm NDCG@10 0.30 / 0.34), one lora_lr=0.0001 run, a finished
    retriever and an unfinished one; a bench file beside, which is not a run."""
    root = tmp_path / "experiments"
    ranker = {"lora_lr": 0.001, "lora_r": 8, "llm_train_candidates": "retrieved", "seed": 1, "num_threads": 1}
    write_run(
        root, "ranker", "ml-100k", "a_seed1", ranker, ranker_test_metrics(0.30, 0.62), ranker_history([0.31, 0.35])
    )
    seed2 = {**ranker, "seed": 2, "num_threads": 4}  # the thread count does not define the experiment either
    write_run(
        root, "ranker", "ml-100k", "a_seed2", seed2, ranker_test_metrics(0.34, 0.66), ranker_history([0.36, 0.32])
    )
    slow = {**ranker, "lora_lr": 0.0001}
    write_run(root, "ranker", "ml-100k", "b_slow", slow, ranker_test_metrics(0.28, 0.58), ranker_history([0.29]))
    retriever = {"lr": 0.001, "seed": 42, "best_metric": "NDCG@10"}
    test = {"Recall@10": 0.13, "NDCG@10": 0.064, "Recall@20": 0.21, "MRR@10": 0.04}
    history = [{"step": 50, "Recall@10": 0.05, "NDCG@10": 0.02, "best": True}]
    history.append({"step": 100, "Recall@10": 0.04, "NDCG@10": 0.03, "best": True})
    write_run(root, "retriever", "ml-100k", "seed42", retriever, test, history)
    write_run(root, "retriever", "ml-100k", "seed43", {**retriever, "seed": 43}, None, history)
    (root / "bench").mkdir()
    (root / "bench" / "retriever_ml-100k.json").write_text("{}")
    return root


def run_report(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_seeds_pool_into_one_row_and_a_different_lora_lr_into_another(root, capsys):
    code, out, _ = run_report(capsys, root, "--format", "json")
    assert code == 0
    rows = {(row["stage"], row["group"]): row for row in json.loads(out)}
    assert set(rows) == {("ranker", "lora_lr=0.001"), ("ranker", "lora_lr=0.0001"), ("retriever", "defaults")}
    pooled = rows[("ranker", "lora_lr=0.001")]
    assert pooled["n"] == 2 and pooled["runs"] == ["a_seed1", "a_seed2"]
    # mean (0.30 + 0.34) / 2 = 0.32; sample sd sqrt((0.02² + 0.02²) / (2 - 1)) = sqrt(0.0008)
    assert pooled["llm NDCG@10 mean"] == pytest.approx(0.32)
    assert pooled["llm NDCG@10 sd"] == pytest.approx(math.sqrt(0.0008))
    assert pooled["llm Recall@10 mean"] == pytest.approx(0.64)
    assert pooled["llm-retriever NDCG@10 mean"] == pytest.approx(0.02)
    assert pooled["retriever NDCG@10 sd"] == pytest.approx(0.0)
    assert pooled["fused NDCG@10 mean"] is None  # no run has a fused score
    single = rows[("ranker", "lora_lr=0.0001")]
    assert single["n"] == 1 and single["llm NDCG@10 mean"] == pytest.approx(0.28) and single["llm NDCG@10 sd"] is None
    assert pooled["paper llm NDCG@10"] == 0.3766 and pooled["paper source"].startswith("Table 3")
    assert rows[("retriever", "defaults")]["paper Recall@10"] == 0.1426


def test_rows_come_in_stage_dataset_and_group_order(root, capsys):
    """Catches the groups' sort reversed or dropped (rows would then follow the run folders' names): a table lists
    the retriever before the ranker, then datasets, then groups by their label."""
    code, out, _ = run_report(capsys, root, "--format", "json")
    assert code == 0
    assert [(row["stage"], row["group"]) for row in json.loads(out)] == [
        ("retriever", "defaults"),
        ("ranker", "lora_lr=0.0001"),  # b_slow: its folder name sorts after the a_seed runs of lora_lr=0.001
        ("ranker", "lora_lr=0.001"),
    ]


def test_runs_that_differ_in_llm_dtype_are_not_pooled(root, capsys):
    """The LLM's dtype changes the ranker's digits: two seeds run in bf16 and fp32 are two experiments."""
    ranker = {"lora_lr": 0.01, "lora_r": 8, "llm_train_candidates": "retrieved", "num_threads": 1}
    for seed, dtype in ((1, "bf16"), (2, "fp32")):
        config = {**ranker, "seed": seed, "llm_dtype": dtype}
        write_run(root, "ranker", "ml-100k", f"d_{dtype}", config, ranker_test_metrics(0.3, 0.6), ranker_history([0.3]))
    code, out, _ = run_report(capsys, root, "--format", "json")
    assert code == 0
    groups = {row["group"]: row["runs"] for row in json.loads(out) if row["stage"] == "ranker"}
    bf16 = next(runs for group, runs in groups.items() if "llm_dtype=bf16" in group)
    fp32 = next(runs for group, runs in groups.items() if "llm_dtype=fp32" in group)
    assert bf16 == ["d_bf16"] and fp32 == ["d_fp32"]


def test_unfinished_run_is_listed_apart(root, capsys):
    code, out, _ = run_report(capsys, root)
    assert code == 0
    unfinished = out[out.index("## Unfinished runs") :]
    assert "retriever / ml-100k / seed43: 2 validations, last at step 100" in unfinished
    retriever_table = out[out.index("## retriever / ml-100k") : out.index("## ranker / ml-100k")]
    assert "| defaults | 1 | seed42 | 0.1300 ± - | 0.0640 ± - | 0.2100 ± - |" in retriever_table
    assert "seed43" not in retriever_table

    code, _, err = run_report(capsys, root, "--format", "csv")
    assert code == 0 and "unfinished run retriever / ml-100k / seed43" in err


def test_md_csv_and_json_hold_the_same_numbers(root, capsys, tmp_path):
    _, md, _ = run_report(capsys, root)
    _, csv_text, _ = run_report(capsys, root, "--format", "csv")
    _, json_text, _ = run_report(capsys, root, "--format", "json")
    rows = json.loads(json_text)
    csv_rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert len(csv_rows) == len(rows) == 3
    for row, csv_row in zip(rows, csv_rows, strict=True):
        assert (csv_row["stage"], csv_row["group"], int(csv_row["n"])) == (row["stage"], row["group"], row["n"])
        assert json.loads(csv_row["runs"]) == row["runs"]
        for key, value in row.items():
            if key.endswith((" mean", " sd")) and value is not None:
                assert float(csv_row[key]) == value
    pooled = next(row for row in rows if row["group"] == "lora_lr=0.001")
    md_line = next(line for line in md.splitlines() if line.startswith("| lora_lr=0.001 |"))
    assert "| 2 | a_seed1, a_seed2 |" in md_line
    assert f"{pooled['llm NDCG@10 mean']:.4f} ± {pooled['llm NDCG@10 sd']:.4f}" in md_line
    assert "0.3200 ± 0.0283" in md_line  # sqrt(0.0008) = 0.02828...
    assert "| paper (Table 3, overall: Table 1) |  |  | 0.3766 | 0.7560 | 0.3367 | 0.6654 | 0.0399 | 0.0759 |" in md

    output = tmp_path / "out" / "report.md"
    assert main([str(root), "--output", str(output)]) == 0
    assert capsys.readouterr().out == "" and output.read_text(encoding="utf-8") == md


def test_plots_writes_one_png_per_run(root, tmp_path, capsys):
    plot_dir = tmp_path / "plots"
    code, _, _ = run_report(capsys, root, "--plots", plot_dir)
    assert code == 0
    expected = {
        "ranker-ml-100k-a_seed1.png",
        "ranker-ml-100k-a_seed2.png",
        "ranker-ml-100k-b_slow.png",
        "retriever-ml-100k-seed42.png",
        "retriever-ml-100k-seed43.png",
    }
    assert {path.name for path in plot_dir.iterdir()} == expected
    for path in plot_dir.iterdir():
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 1000


def best_marker_label(run_dir: Path, stage: str) -> str:
    """The legend text of the best-step marker on the run's validation curve (what --plots and html draw)."""
    from report import curve_figure, load_pyplot
    from trainer.run_folder import load_run

    plt = load_pyplot()
    fig = curve_figure(plt, load_run(stage, run_dir))
    try:
        labels = fig.axes[0].get_legend_handles_labels()[1]
    finally:
        plt.close(fig)
    return next(label for label in labels if label.startswith("best: "))


def test_the_curve_marks_the_model_each_stage_kept(tmp_path):
    """Catches the best-step marker put on the lowest validation value (min for max), or on the retriever's first
    marked validation instead of its last (the model in checkpoint_best.pt)."""
    # ranker: the highest NDCG@10, the first of a tie (HF keeps a model only for a strictly better value)
    write_run(tmp_path, "ranker", "ml-100k", "r", {"seed": 1}, None, ranker_history([0.31, 0.35, 0.35, 0.20]))
    assert best_marker_label(tmp_path / "ranker" / "ml-100k" / "r", "ranker") == "best: step 32, 0.3500"
    # retriever: its last validation marked best (each mark was a new best when written)
    history = [
        {"step": 50, "NDCG@10": 0.02, "best": True},
        {"step": 100, "NDCG@10": 0.03, "best": True},
        {"step": 150, "NDCG@10": 0.01, "best": False},
    ]
    write_run(tmp_path, "retriever", "ml-100k", "s", {"seed": 1, "best_metric": "NDCG@10"}, None, history)
    assert best_marker_label(tmp_path / "retriever" / "ml-100k" / "s", "retriever") == "best: step 100, 0.0300"


def test_malformed_json_skips_the_run_with_a_warning(root, capsys):
    broken = root / "ranker" / "ml-100k" / "b_slow" / "test_metrics.json"
    broken.write_text('{"subset": ')
    code, out, err = run_report(capsys, root)
    assert code == 0
    assert f"warning: {broken}" in err
    assert "b_slow" not in out and "lora_lr=0.001" not in out  # the pooled seeds are now the only ranker group


def test_missing_or_empty_root_is_an_error(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    code, out, err = run_report(capsys, missing)
    assert code == 2 and out == ""
    assert err.startswith("error:") and str(missing) in err

    empty = tmp_path / "empty"
    (empty / "bench").mkdir(parents=True)
    code, _, err = run_report(capsys, empty)
    assert code == 2 and err.startswith("error:") and "found none" in err


def run_with_file_size_limit(script: str, argv: list, limit: int) -> subprocess.CompletedProcess:
    """`python script argv` in a process that cannot write a file past `limit` bytes: such a write fails with a real
    OSError (EFBIG, SIGXFSZ ignored), the code path a full disk (ENOSPC) takes, without filling one."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored signals stay ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, argv)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )


def only_error_line(err: str) -> str:
    """stderr must be exactly one `error:` line (no traceback, nothing else); returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_runs_are_tabled_by_what_their_config_json_says(root, capsys):
    """A custom-data run filed under retriever/ml-100k/ is tabled as custom-data (never beside the paper's ml-100k
    numbers), a ranker filed under retriever/ as a ranker; one warning names each such folder."""
    test = {"Recall@10": 0.5, "NDCG@10": 0.25, "Recall@20": 0.6}
    write_run(root, "retriever", "ml-100k", "mine", {"lr": 0.001, "seed": 42}, test, [], recorded_dataset="custom-data")
    ranker = {"llm_base_model": "smollm2-135m", "lora_lr": 0.001}
    misfiled = ranker_test_metrics(0.5, 0.7)
    write_run(root, "retriever", "games", "r1", ranker, misfiled, [], recorded_dataset="custom-games")
    # an unfinished run without config.json: only its folder names say what it is
    no_config = root / "retriever" / "other-data" / "no_config"
    no_config.mkdir(parents=True)
    (no_config / "val_history.jsonl").write_text('{"step": 5, "NDCG@10": 0.1}\n')

    code, out, err = run_report(capsys, root, "--format", "json")
    assert code == 0
    rows = {(row["stage"], row["dataset"], tuple(row["runs"])): row for row in json.loads(out)}
    ml100k = rows[("retriever", "ml-100k", ("seed42",))]
    assert ml100k["paper Recall@10"] == 0.1426 and ml100k["Recall@10 mean"] == pytest.approx(0.13)
    custom = rows[("retriever", "custom-data", ("mine",))]
    assert custom["Recall@10 mean"] == pytest.approx(0.5) and custom["paper Recall@10"] is None
    assert rows[("ranker", "custom-games", ("r1",))]["llm NDCG@10 mean"] == pytest.approx(0.5)
    assert not any(key[:2] == ("retriever", "games") for key in rows)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: {root / 'retriever' / 'games' / 'r1'}: the folder says retriever / games")
    assert "its config.json says ranker / custom-games" in warnings[0]
    assert warnings[1].startswith(f"warning: {root / 'retriever' / 'ml-100k' / 'mine'}: the folder says retriever")
    assert "its config.json says retriever / custom-data" in warnings[1]

    _, md, _ = run_report(capsys, root)
    assert "- retriever / other-data / no_config: 1 validation, last at step 5" in md


def test_a_run_one_level_too_deep_is_named_in_a_note(root, capsys):
    """A run made with --run_name a/b (ROOT/ranker/ml-100k/a/b/) is not read, but never left out unsaid."""
    write_run(root, "ranker", "ml-100k", "a/b", {"lora_lr": 0.5}, ranker_test_metrics(0.9, 0.9), [])
    code, out, err = run_report(capsys, root, "--format", "json")
    assert code == 0
    nested, moved = root / "ranker" / "ml-100k" / "a" / "b", root / "ranker" / "ml-100k" / "b"
    assert err.strip().splitlines() == [
        f"note: {nested}: a run folder one level below ROOT/<stage>/<dataset>/<run>/ is not reported; "
        f"move it to {moved} to include it",
        "note: unfinished run retriever / ml-100k / seed43: 2 validations, last at step 100",
    ]
    assert len(json.loads(out)) == 3 and "lora_lr=0.5" not in out


def test_plots_into_an_existing_file_is_one_error_and_writes_nothing(root, tmp_path, capsys):
    target, output = tmp_path / "plots.png", tmp_path / "report.md"
    target.write_bytes(b"not a folder")
    code, out, err = run_report(capsys, root, "--plots", target, "--output", output)
    assert code == 2 and out == ""
    line = only_error_line(err)
    assert line == f"error: --plots {target}: expected a folder for the PNG files, found a file; pass another folder"
    assert not output.exists() and target.read_bytes() == b"not a folder"


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_a_plots_folder_that_cannot_be_made_is_one_error_and_writes_nothing(root, tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("x")
    plot_dir = Path("/proc/plots") if where == "proc" else tmp_path / "a_file" / "plots"
    output = tmp_path / "out" / "report.md"
    code, out, err = run_report(capsys, root, "--plots", plot_dir, "--output", output)
    assert code == 1 and out == ""
    line = only_error_line(err)
    assert line.startswith(f"error: --plots: could not create the folder {plot_dir}: ")
    assert line.endswith("; pass a folder you can create and write to")
    assert not output.parent.exists() and not plot_dir.exists()


@pytest.mark.parametrize("fmt", ["md", "csv", "json"])
def test_a_folder_name_that_is_not_utf8_is_shown_escaped(root, tmp_path, capsys, fmt):
    """A run folder named in Latin-1 bytes ("caf\\xe9") is reported in every format, its byte shown as \\xe9."""
    name = os.fsdecode(b"caf\xe9")
    test = {"Recall@10": 0.15, "NDCG@10": 0.07, "Recall@20": 0.25}
    write_run(root, "retriever", "ml-100k", name, {"lr": 0.001, "seed": 7, "best_metric": "NDCG@10"}, test, [])
    output = tmp_path / f"report.{fmt}"
    code, _, err = run_report(capsys, root, "--format", fmt, "--output", output)
    assert code == 0, err
    text = output.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    escaped = "caf\\xe9"  # the six characters c a f \ x e 9
    if fmt == "json":
        row = next(row for row in json.loads(text) if row["stage"] == "retriever")
        assert row["runs"] == [escaped, "seed42"] and row["n"] == 2
    elif fmt == "csv":
        row = next(row for row in csv.DictReader(io.StringIO(text)) if row["stage"] == "retriever")
        assert json.loads(row["runs"]) == [escaped, "seed42"]
    else:
        assert f"| defaults | 2 | {escaped}, seed42 |" in text
    shown = str(root / "retriever" / "ml-100k" / escaped)
    assert f"note: {shown}: the folder name is not UTF-8; the report shows its bytes escaped as \\xNN" in err


def test_a_full_disk_on_output_is_one_error_and_leaves_no_file(root, tmp_path):
    output = tmp_path / "out" / "report.md"
    output.parent.mkdir()
    result = run_with_file_size_limit("report.py", [root, "--output", output], limit=200)  # the report is larger
    assert result.returncode == 1 and result.stdout == ""
    line = only_error_line(result.stderr)
    assert line.startswith(f"error: could not write {output}: File too large; ")
    assert "(ulimit -f)" in line and line.endswith("(nothing was left half written)")
    assert list(output.parent.iterdir()) == []  # neither the report nor its temp file


def test_an_output_path_that_cannot_be_written_is_one_error(root, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    output = tmp_path / "a_file" / "sub" / "report.md"  # its parent is a regular file: NotADirectoryError
    code, out, err = run_report(capsys, root, "--output", output)
    assert code == 1 and out == ""
    assert (
        only_error_line(err)
        == f"error: could not write {output}: {tmp_path / 'a_file'} is a file, not a folder; pass another path"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "experiments"]
