"""The results report (python report.py) over small run folders written in the real formats."""

import csv
import io
import json
import math
from pathlib import Path

import pytest

from report import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, stage: str, dataset: str, name: str, config: dict, test: dict | None, history: list[dict]):
    run_dir = root / stage / dataset / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**config, "run_name": name, "dataset_name": dataset}))
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
