"""recommend.py on a tiny custom dataset: a real retriever run, a real ranker run (tiny random Llama-2 + LoRA)."""

import json
import shutil

import numpy as np
import pytest
import torch

import recommend
import train_ranker
import train_retriever
from config import RETRIEVER, default_config, retriever_spec, saved_flags
from dataloader.retriever_data import EvalData
from model.retrievers import build_retriever
from tests.conftest import split_of
from tests.test_ranker import tokenizer, write_tiny_project  # noqa: F401 (tokenizer is a fixture)
from tests.test_report import only_error_line, run_with_file_size_limit
from trainer.retriever_eval import evaluate
from utils.files import load_checkpoint

RETRIEVER_CAPS = ["--bert_max_len", "8", "--bert_hidden_units", "8", "--train_batch_size", "8", "--num_epochs", "3"]
RETRIEVER_CAPS += ["--val_iterations", "5", "--val_batch_size", "8", "--test_batch_size", "8"]
RANKER_CAPS = ["--lora_max_steps", "2", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2"]
RANKER_CAPS += ["--llm_max_history", "5", "--num_threads", "1", "--lora_warmup_steps", "1", "--llm_max_eval_users", "4"]
RANKER_CAPS += ["--llm_max_train_samples", "4", "--llm_fusion", "linear"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):  # noqa: F811
    root = tmp_path_factory.mktemp("recommend")
    flags = write_tiny_project(root, tokenizer)
    data_flags = flags[: flags.index("--llm_retrieved_path")]
    experiments = ["--experiment_root", str(root / "experiments")]
    threads = torch.get_num_threads()
    assert train_retriever.main(data_flags + experiments + RETRIEVER_CAPS) == 0
    retriever_run = root / "experiments" / "retriever" / "custom-data" / "seed42"
    ranker_flags = flags.copy()
    ranker_flags[flags.index("--llm_retrieved_path") + 1] = str(retriever_run)
    assert train_ranker.main(ranker_flags + RANKER_CAPS) == 0
    torch.set_num_threads(threads)
    split = split_of(data_flags)
    return root, retriever_run, root / "experiments" / "ranker" / "custom-data" / "seed42", split


def write_histories(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_retriever_recommendations(runs, tmp_path, capsys):
    root, retriever_run, _, split = runs
    history = [split.item_raw_ids[i] for i in split.train[0][:5]]
    write_histories(
        tmp_path / "h.jsonl",
        [
            {"user": "a", "history": history + ["no-such-item"]},
            {"user": "b", "history": ["unknown-1", "unknown-2"]},
            {"user": "c", "history": history[:2]},
        ],
    )
    out = tmp_path / "out.jsonl"
    argv = ["--retriever_run", str(retriever_run), "--input", str(tmp_path / "h.jsonl"), "--topk", "7"]
    assert recommend.main(argv + ["--output", str(out)]) == 0
    assert "3 item ids unknown" in capsys.readouterr().err
    a, b, c = [json.loads(line) for line in out.read_text().splitlines()]
    assert a["unknown_items"] == 1 and a["history_items"] == 5 and len(a["recommendations"]) == 7
    assert "error" in b and b["unknown_items"] == 2 and "recommendations" not in b
    assert len(c["recommendations"]) == 7
    recommended = [r["item"] for r in a["recommendations"]]
    assert not set(recommended) & set(history)
    # the same ranking as the retriever's evaluation of that history
    model = build_retriever(retriever_spec(saved_flags(retriever_run / "config.json", RETRIEVER)), split.num_items)
    model.load_state_dict(load_checkpoint(retriever_run / "checkpoint_best.pt")["model"])
    _, arrays = evaluate(model, EvalData([split.train[0][:5]], [1], 8), 1, [1], torch.device("cpu"), topk=7)
    assert recommended == [split.item_raw_ids[i] for i in arrays["items"][0]]
    assert [r["retriever_score"] for r in a["recommendations"]] == pytest.approx(arrays["scores"][0].tolist())
    # CSV input gives the same result; a missing --retriever_run is a clear error
    (tmp_path / "h.csv").write_text("user_id,item_id\n" + "".join(f"a,{item}\n" for item in history))
    assert recommend.main(argv[:2] + ["--input", str(tmp_path / "h.csv"), "--topk", "7"]) == 0
    from_csv = json.loads(capsys.readouterr().out)["recommendations"]
    assert [r["item"] for r in from_csv] == recommended  # scores agree to float noise (another batch composition)
    assert [r["retriever_score"] for r in from_csv] == pytest.approx(
        [r["retriever_score"] for r in a["recommendations"]]
    )
    assert recommend.main(["--input", str(tmp_path / "h.csv")]) == 2
    assert "--retriever_run" in capsys.readouterr().err


def test_a_csv_history_is_read_in_timestamp_order(runs, tmp_path, capsys):
    """Catches a CSV read newest first (the timestamp sort reversed) or its timestamps compared as text: the model
    would be given the history backwards or shuffled. Rows out of order in the file, timestamps whose text order
    is not their numeric order: the recommendations must be those of the same history given in order as JSONL."""
    _, retriever_run, _, split = runs
    history = [split.item_raw_ids[i] for i in split.train[0][:6]]
    timestamps = [5, 40, 300, 1000, 2000, 9999]  # as text: 1000 < 2000 < 300 < 40 < 5 < 9999
    rows = [f"a,{item},{time}\n" for item, time in zip(history, timestamps, strict=True)]
    (tmp_path / "h.csv").write_text("user_id,item_id,timestamp\n" + "".join(rows[k] for k in (3, 0, 5, 1, 4, 2)))
    base = ["--retriever_run", str(retriever_run), "--topk", "10"]

    def recommendations(path) -> list[dict]:
        assert recommend.main(base + ["--input", str(path)]) == 0
        return json.loads(capsys.readouterr().out)["recommendations"]

    write_histories(tmp_path / "h.jsonl", [{"user": "a", "history": history}])
    in_order = recommendations(tmp_path / "h.jsonl")
    assert recommendations(tmp_path / "h.csv") == in_order
    # the guard has teeth: this model's recommendations do depend on the order it reads the history in
    write_histories(tmp_path / "backwards.jsonl", [{"user": "a", "history": history[::-1]}])
    assert recommendations(tmp_path / "backwards.jsonl") != in_order


def test_ranker_recommendations_follow_the_verbalizer(runs, capsys):
    """With a ranker run: the retriever's top candidates, ordered by the fused score the run chose, whose LLM part
    is the verbalizer's letter logits of the prompt."""
    from dataloader.prompts import PromptBuilder, PromptConfig, candidate_letters
    from model.llm import load_adapter, load_model, load_tokenizer
    from trainer.metrics import fuse_scores
    from trainer.verbalizer import letter_token_ids

    root, retriever_run, ranker_run, split = runs
    users = [split.user_raw_ids[u] for u in (0, 1)]
    argv = ["--retriever_run", str(retriever_run), "--ranker_run", str(ranker_run), "--users", *users]
    assert recommend.main(argv + ["--topk", "20", "--num_threads", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    weight = json.loads((ranker_run / "test_metrics.json").read_text())["fusion"]["weight"]
    tok = load_tokenizer(str(root / "llm"))
    builder = PromptBuilder(tok, split.titles, default_config(PromptConfig, max_history=5))
    letters = letter_token_ids(builder, 20)
    letter_ids = torch.tensor([letters[c] for c in candidate_letters(20)])
    # the weights as the ranker run loads them (dtype, fp32 LM head), then its adapter
    model = load_adapter(load_model(str(root / "llm"), torch.device("cpu"), False), ranker_run / "adapter").eval()
    item_index = {raw: i for i, raw in enumerate(split.item_raw_ids)}
    for u, record in zip((0, 1), records, strict=True):
        recs = record["recommendations"]
        assert len(recs) == 20
        history = [*split.train[u], split.val[u], split.test[u]]
        assert not {item_index[r["item"]] for r in recs} & set(history)
        # candidates in the retriever's order, as the prompt shows them
        retriever_order = sorted(recs, key=lambda r: -r["retriever_score"])
        candidates = [item_index[r["item"]] for r in retriever_order]
        with torch.no_grad():
            logits = model(torch.tensor([builder.encode(history, candidates)])).logits[0, -1]
        llm = logits[letter_ids].float()
        assert [r["llm_score"] for r in retriever_order] == pytest.approx(llm.tolist(), abs=1e-4)
        retriever = torch.tensor([r["retriever_score"] for r in retriever_order])
        fused = fuse_scores(llm, retriever, float(weight))
        assert [r["fused_score"] for r in retriever_order] == pytest.approx(fused.tolist(), abs=1e-4)
        assert [r["fused_score"] for r in recs] == sorted((r["fused_score"] for r in recs), reverse=True)
    assert np.isfinite([r["llm_score"] for r in records[0]["recommendations"]]).all()


def recommend_error(capsys, argv: list[str]) -> str:
    """recommend.py's exit code must be 2 with a one-line error; returns that line."""
    assert recommend.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def copy_run(run, folder):
    shutil.copytree(run, folder)
    return folder


def test_unfinished_or_mismatched_runs_are_refused(runs, tmp_path, capsys):
    root, retriever_run, ranker_run, split = runs
    users = ["--users", split.user_raw_ids[0]]
    # a ranker run interrupted during training: no adapter, no test results yet
    cut = copy_run(ranker_run, tmp_path / "cut")
    for name in ("adapter", "test_metrics.json", "test_rankings.jsonl"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    line = recommend_error(capsys, ["--retriever_run", retriever_run, "--ranker_run", cut, *users])
    assert "the run has not finished" in line and "--resume" in line
    # its adapter gone but test_metrics.json saying it trained
    no_adapter = copy_run(ranker_run, tmp_path / "no_adapter")
    shutil.rmtree(no_adapter / "adapter")
    assert "trained, but its adapter/ is missing" in recommend_error(
        capsys, ["--retriever_run", retriever_run, "--ranker_run", no_adapter, *users]
    )
    # another retriever's candidates (same data, other file content): the fusion weight was chosen on others
    other = copy_run(retriever_run, tmp_path / "other_retriever")
    with np.load(other / "candidates.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["test_scores"] = arrays["test_scores"] + 1.0
    np.savez_compressed(other / "candidates.npz", **arrays)
    line = recommend_error(capsys, ["--retriever_run", other, "--ranker_run", ranker_run, *users])
    assert "fingerprints differ" in line
    # a folder of the other stage, at once (no model download attempted)
    line = recommend_error(capsys, ["--retriever_run", retriever_run, "--ranker_run", retriever_run, *users])
    assert "expected a run folder of train_ranker.py, found a run of the other stage" in line
    line = recommend_error(capsys, ["--retriever_run", ranker_run, *users])
    assert "expected a run folder of train_retriever.py" in line
    # a corrupt test_metrics.json, a truncated adapter, a checkpoint of another dataset
    corrupt = copy_run(ranker_run, tmp_path / "corrupt")
    (corrupt / "test_metrics.json").write_text('{"subset": ')
    assert "test_metrics.json: expected a JSON object" in recommend_error(
        capsys, ["--retriever_run", retriever_run, "--ranker_run", corrupt, *users]
    )
    truncated = copy_run(ranker_run, tmp_path / "truncated")
    weights = truncated / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "not a readable LoRA adapter" in recommend_error(
        capsys, ["--retriever_run", retriever_run, "--ranker_run", truncated, *users]
    )
    foreign = copy_run(retriever_run, tmp_path / "foreign")
    spec = retriever_spec(saved_flags(retriever_run / "config.json", RETRIEVER))
    torch.save({"model": build_retriever(spec, split.num_items + 7).state_dict()}, foreign / "checkpoint_best.pt")
    assert "does not fit the run's own config.json" in recommend_error(capsys, ["--retriever_run", foreign, *users])
    random_bytes = copy_run(retriever_run, tmp_path / "random_bytes")
    (random_bytes / "checkpoint_best.pt").write_bytes(bytes(range(256)) * 4)
    line = recommend_error(capsys, ["--retriever_run", random_bytes, *users])
    assert "not a readable checkpoint" in line and "weights_only" not in line


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"user": "s", "history": "2571"}\n', "line 1: history is a str, not a list of item ids"),
        ('{"user": "d", "history": {"1": 2}}\n', "line 1: history is a dict"),
        ('{"user": "a", "history": ["1"]}\nnot json\n{"history": []}\n', "line 2: Expecting value"),
        ('{"user": "a", "history": [null]}\n', "history holds None"),
    ],
)
def test_malformed_histories_reject_the_file_naming_every_bad_line(runs, tmp_path, capsys, content, message):
    _, retriever_run, _, _ = runs
    (tmp_path / "h.jsonl").write_text(content)
    line = recommend_error(capsys, ["--retriever_run", retriever_run, "--input", tmp_path / "h.jsonl"])
    assert message in line and str(tmp_path / "h.jsonl") in line
    if "not json" in content:
        assert "line 3: not an object with 'user' and 'history'" in line


def test_bad_input_files_and_outputs_are_one_line_errors(runs, tmp_path, capsys):
    _, retriever_run, _, split = runs
    base = ["--retriever_run", retriever_run]
    (tmp_path / "latin1.jsonl").write_bytes('{"user": "é", "history": ["1"]}\n'.encode("latin-1"))
    assert "expected UTF-8 text" in recommend_error(capsys, base + ["--input", tmp_path / "latin1.jsonl"])
    (tmp_path / "h.csv").write_text("user_id,item_id,timestamp\na,1,5\nb,2\n")
    assert "line 3: no timestamp" in recommend_error(capsys, base + ["--input", tmp_path / "h.csv"])
    good = tmp_path / "good.jsonl"
    write_histories(good, [{"user": "a", "history": [split.item_raw_ids[1]]}])
    (tmp_path / "out_dir").mkdir()
    line = recommend_error(capsys, base + ["--input", good, "--output", tmp_path / "out_dir"])
    assert "expected a file to write, found a folder" in line
    for flags in (["--topk", "0"], ["--topk", "-1"], ["--recommend_batch_size", "-2"], ["--recommend_batch_size", "0"]):
        assert "expected a positive integer" in recommend_error(capsys, base + ["--input", good, *flags])


def test_standard_input_and_a_catalogue_that_runs_out(runs, capsys, monkeypatch):
    import io

    _, retriever_run, ranker_run, split = runs
    everything = split.item_raw_ids[1:]
    lines = [
        {"user": "most", "history": everything[:-3]},  # 3 items left outside the history
        {"user": "all", "history": everything},
    ]
    monkeypatch.setattr(
        "sys.stdin", io.TextIOWrapper(io.BytesIO("".join(json.dumps(r) + "\n" for r in lines).encode()))
    )
    assert recommend.main(["--retriever_run", str(retriever_run), "--input", "-", "--topk", "100000"]) == 0
    most, full = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["item"] for r in most["recommendations"]) == sorted(everything[-3:])  # never a history item
    assert all(np.isfinite(r["retriever_score"]) for r in most["recommendations"])
    assert "recommendations" not in full and "no item outside the history" in full["error"]
    # the ranker needs 20 candidates outside the history: a per-user error, the others are served
    monkeypatch.setattr(
        "sys.stdin", io.TextIOWrapper(io.BytesIO("".join(json.dumps(r) + "\n" for r in lines).encode()))
    )
    argv = ["--retriever_run", str(retriever_run), "--ranker_run", str(ranker_run), "--input", "-", "--topk", "3"]
    assert recommend.main(argv + ["--num_threads", "1"]) == 0
    most, full = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "fewer than 20 items outside the history" in most["error"] and "error" in full


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_input_starting_with_a_byte_order_mark_is_read(runs, tmp_path, capsys, monkeypatch, fmt, via):
    """Excel writes UTF-8 with a byte order mark: the same recommendations as without it, from a file or stdin."""
    import io

    _, retriever_run, _, split = runs
    history = [split.item_raw_ids[i] for i in split.train[0][:5]]
    if fmt == "csv":
        text = "user_id,item_id\n" + "".join(f"a,{item}\n" for item in history)
    else:
        text = json.dumps({"user": "a", "history": history}) + "\n"
    plain = tmp_path / f"plain.{fmt}"
    plain.write_text(text, encoding="utf-8")
    base = ["--retriever_run", str(retriever_run), "--topk", "5"]
    assert recommend.main(base + ["--input", str(plain)]) == 0
    expected = capsys.readouterr().out
    data = b"\xef\xbb\xbf" + text.encode("utf-8")
    if via == "file":
        (tmp_path / f"bom.{fmt}").write_bytes(data)
        argv = base + ["--input", str(tmp_path / f"bom.{fmt}")]
    else:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
        argv = base + ["--input", "-"]
    assert recommend.main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads(out)
    assert record["user"] == "a" and record["history_items"] == 5 and len(record["recommendations"]) == 5
    assert out == expected


def test_a_failing_output_write_is_one_error_and_leaves_no_file(runs, tmp_path, capsys):
    """A full disk (here: a file size limit, the same OSError path) and a path under a regular file: one error
    line naming --output, exit code 1, and neither the output nor its temp file left."""
    _, retriever_run, _, split = runs
    good = tmp_path / "good.jsonl"
    write_histories(good, [{"user": "a", "history": [split.item_raw_ids[i] for i in split.train[0][:5]]}])
    output = tmp_path / "out" / "recs.jsonl"
    output.parent.mkdir()
    argv = ["--retriever_run", retriever_run, "--input", good, "--num_threads", "1", "--output", output]
    result = run_with_file_size_limit("recommend.py", argv, limit=100)  # one user's 10 recommendations are larger
    assert result.returncode == 1 and result.stdout == ""
    line = only_error_line(result.stderr)
    assert line.startswith(f"error: could not write {output}: File too large; ") and "(ulimit -f)" in line
    assert list(output.parent.iterdir()) == []

    (tmp_path / "a_file").write_text("x")
    under_a_file = tmp_path / "a_file" / "sub" / "recs.jsonl"
    assert recommend.main([str(a) for a in argv[:-1]] + [str(under_a_file)]) == 1
    assert only_error_line(capsys.readouterr().err).startswith(f"error: could not write {under_a_file}: ")
    assert (tmp_path / "a_file").read_text() == "x"
