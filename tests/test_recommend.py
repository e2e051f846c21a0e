"""recommend.py on a tiny custom dataset: a real retriever run, a real ranker run (tiny random Llama-2 + LoRA)."""

import json

import numpy as np
import pytest
import torch

import recommend
import train_ranker
import train_retriever
from config import parse_config
from datasets import load_split
from tests.test_ranker import tokenizer, write_tiny_project  # noqa: F401 (tokenizer is a fixture)
from trainer.retriever import EvalData, build_model, evaluate
from trainer.utils import load_checkpoint

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
    split = load_split(parse_config(data_flags))
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
    cfg = json.loads((retriever_run / "config.json").read_text())
    model = build_model(argparse_namespace(cfg), split.num_items)
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


def argparse_namespace(saved: dict):
    from argparse import Namespace

    return Namespace(**saved)


def test_ranker_recommendations_follow_the_verbalizer(runs, capsys):
    """With a ranker run: the retriever's top candidates, ordered by the fused score the run chose, whose LLM part
    is the verbalizer's letter logits of the prompt."""
    from dataloader.prompts import PromptBuilder, candidate_letters
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
    builder = PromptBuilder(tok, split.titles, max_history=5)
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
