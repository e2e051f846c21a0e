"""Verbalizer scoring, training loss, test report and whole ranker runs with a tiny random Llama-2
(real Llama-2 tokenizer, vocab 32000) on a small custom dataset."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import train_ranker
from config import RANKER, default_config
from dataloader.candidates import load_candidates, save_candidates
from dataloader.prompts import PromptBuilder, PromptConfig
from dataloader.ranker_data import EvalExample, TrainCollator, TrainPrompts, training_prefixes
from tests.conftest import split_of, tiny_llama
from trainer.metrics import metrics_from_ranks
from trainer.ranker_eval import build_test_report, rank_examples
from trainer.ranker_train import RankerTrainer, last_checkpoint
from trainer.verbalizer import letter_token_ids, verbalizer_scores


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama2_tokenizer_path), add_bos_token=True)
    tok.padding_side = "left"
    tok.pad_token = tok.unk_token
    return tok


DESCENDING = [float(20 - k) for k in range(20)]  # retriever scores of candidates listed in retriever order


def test_verbalizer_reads_the_letter_logits():
    logits = torch.zeros(2, 32000)
    letter_ids = torch.tensor([29909, 29933, 29907])
    logits[0, 29933] = 5.0  # 'B' in context
    logits[0, 319] = 9.0  # '▁A' (the original's token): must be ignored
    logits[1, 29907] = 1.0
    scores = verbalizer_scores(logits, letter_ids)
    assert scores.tolist() == [[0.0, 5.0, 0.0], [0.0, 0.0, 1.0]]


def test_rank_examples_left_padding_matches_single_prompts(tokenizer):
    model = tiny_llama()
    builder = PromptBuilder(tokenizer, [""] + [f"Film {i}" for i in range(1, 31)], default_config(PromptConfig))
    letters = letter_token_ids(builder, 20)
    letter_ids = torch.tensor(list(letters.values()))
    histories = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    examples = [
        EvalExample(u, h, list(range(11, 31)), 0, 0, builder.encode(h, list(range(11, 31))), DESCENDING)
        for u, h in enumerate(histories)
    ]
    batched = rank_examples(model, examples, letter_ids, tokenizer.pad_token_id, 3, torch.device("cpu"))
    for k, example in enumerate(examples):
        with torch.no_grad():
            full = model(torch.tensor([example.input_ids])).logits[0, -1]
        assert torch.allclose(batched[k], full[letter_ids], atol=1e-4), k


def ranker_trainer(model, tmp_path, dataset=None) -> RankerTrainer:
    """The run's own Trainer subclass, as train_adapter builds it (CPU, no logging integrations)."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", learning_rate=1e-2)
    return RankerTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        val_examples=[],
        letter_ids=torch.tensor([29909]),
        pad_id=0,
        eval_batch_size=1,
        ks=[10],
        history_path=tmp_path / "val_history.jsonl",
    )


def answer_batch(tokenizer, count: int = 4):
    builder = PromptBuilder(
        tokenizer, [""] + [f"Film {i}" for i in range(1, 41)], default_config(PromptConfig, max_history=3)
    )
    letters = letter_token_ids(builder, 20)
    train = [list(range(1, 12)), list(range(12, 20))]
    pairs = training_prefixes(train, None, 0)[:count]
    dataset = TrainPrompts(builder, train, 40, pairs, 19, list(letters.values()), tokenizer.eos_token_id, seed=0)
    features = [dataset[k] for k in range(len(dataset))]
    return dataset, features, TrainCollator(tokenizer.pad_token_id)(features)


def test_trainer_loss_is_cross_entropy_of_letter_then_eos(tokenizer, tmp_path):
    """RankerTrainer.compute_loss on a left-padded batch equals the loss computed by hand from each unpadded
    prompt: the last prompt position must predict the true letter, the letter's position must predict EOS."""
    model = tiny_llama()
    _, features, batch = answer_batch(tokenizer)
    loss = ranker_trainer(model, tmp_path).compute_loss(model, batch)
    expected = []
    with torch.no_grad():
        for feature in features:
            prompt, (letter, eos) = feature["prompt_ids"], feature["targets"]
            assert letter != eos and eos == tokenizer.eos_token_id
            logits = model(torch.tensor([prompt + [letter]])).logits[0].float()
            expected.append(
                torch.nn.functional.cross_entropy(logits[-2:], torch.tensor([letter, eos]), reduction="sum")
            )
    assert loss.item() == pytest.approx((sum(expected) / (2 * len(features))).item(), rel=1e-4)


def test_training_steps_lower_the_loss(tokenizer, tmp_path):
    from model.llm import LoraSettings, add_lora

    model = add_lora(tiny_llama(), default_config(LoraSettings, dropout=0.0), quantized=False)
    _, _, batch = answer_batch(tokenizer)
    trainer = ranker_trainer(model, tmp_path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15 and losses[-1] == min(losses), losses


def test_the_ranker_keeps_the_adapter_with_the_highest_validation_ndcg(tokenizer, tmp_path):
    """Catches greater_is_better=False, or selection on another metric than NDCG@10: the HF Trainer would keep (and
    early stopping would wait for) the adapter with the lowest validation NDCG@10; or load_best_model_at_end off,
    which saves the last adapter instead of the kept one."""
    from transformers import EarlyStoppingCallback

    from trainer import ranker_train

    dataset, _, _ = answer_batch(tokenizer)
    training = default_config(ranker_train.RankerTraining, early_stopping_patience=2, val_iterations=2)
    trainer = ranker_train.ranker_trainer(
        tiny_llama(), training, dataset, [], torch.tensor([29909]), tokenizer, 1, torch.device("cpu"), tmp_path
    )
    assert any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    kept = []
    # Validations as RankerTrainer.evaluate reports them (Recall@10 falling as NDCG@10 rises), through the HF Trainer's
    # own steps: early stopping hears the metrics first, then the trainer records a new best, the checkpoint that
    # load_best_model_at_end loads (_determine_best_metric: private, transformers is pinned).
    for step, ndcg in ((2, 0.2), (4, 0.5), (6, 0.3), (8, 0.4)):
        assert not trainer.control.should_training_stop, step
        trainer.state.global_step = step
        metrics = {"eval_NDCG@10": ndcg, "eval_Recall@10": 1.0 - ndcg}
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        if trainer._determine_best_metric(metrics, trial=None):
            kept.append(step)
    assert kept == [2, 4] and (trainer.state.best_metric, trainer.state.best_global_step) == (0.5, 4)
    assert trainer.control.should_training_stop  # two validations (0.3, 0.4) without beating 0.5: patience 2
    assert trainer.args.load_best_model_at_end  # so the adapter saved at the end is the kept one, not the last


def test_the_ranker_trains_only_the_lora_matrices_without_weight_decay(tokenizer, tmp_path):
    """Catches weight decay added to the ranker's optimizer (the original trains LoRA with plain AdamW), or a base
    weight (embeddings, norms, LM head) left trainable: the optimizer the run's HF Trainer builds holds exactly the
    LoRA A and B matrices of q_proj and v_proj in every layer, none of them decayed."""
    from model.llm import LoraSettings, add_lora
    from trainer import ranker_train

    model = add_lora(tiny_llama(), default_config(LoraSettings), quantized=False)
    dataset, _, _ = answer_batch(tokenizer)
    training = default_config(ranker_train.RankerTraining)
    trainer = ranker_train.ranker_trainer(
        model, training, dataset, [], torch.tensor([29909]), tokenizer, 1, torch.device("cpu"), tmp_path
    )
    names = {id(p): name for name, p in model.named_parameters()}
    groups: dict[float, set[str]] = {}
    for group in trainer.create_optimizer().param_groups:
        groups.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    lora = {
        f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{part}.default.weight"
        for layer in range(2)
        for proj in ("q_proj", "v_proj")
        for part in ("A", "B")
    }
    assert groups == {0.0: lora}


def test_test_report_overall_formula():
    split = type("S", (), {"user_raw_ids": ["a", "b", "c", "d"], "item_raw_ids": [""] + [str(i) for i in range(30)]})
    examples = [
        EvalExample(0, [], list(range(1, 21)), 2, 2, [], DESCENDING),
        EvalExample(2, [], list(range(1, 21)), 0, 0, [], DESCENDING),
    ]
    scores = torch.zeros(2, 20)
    scores[0, 2] = 1.0  # LLM puts user 0's item first (retriever had it third)
    scores[1, 5] = 1.0  # and user 2's item (retriever first) sixth... ties: 0-based rank counts equal scores
    part = {"users": np.array([0, 1, 2, 3]), "label_ranks": np.array([2, 30, 0, 45])}
    report, rankings = build_test_report(scores, examples, part, split, (1, 5, 10))
    assert report["coverage"] == 0.5
    assert report["subset"]["llm"]["Recall@1"] == 0.5
    assert report["subset"]["retriever"]["Recall@1"] == 0.5
    # paper formula: subset metric x subset share (others contribute 0 at k <= 20)
    assert report["overall"]["llm"]["Recall@1"] == pytest.approx(0.5 * 0.5)
    assert report["overall"]["retriever"]["NDCG@5"] == pytest.approx((1 / np.log2(4) + 1) / 4)
    first = json.loads(rankings[0])
    assert first["llm_rank"] == 0 and first["candidates"][0]["item"] == "2"
    assert json.loads(rankings[1])["llm_rank"] == 19  # pessimistic ties: 19 other candidates score 0


def write_tiny_project(root, tokenizer, num_users: int = 40, num_items: int = 36):
    """A custom dataset, a popularity 'retriever' candidates file and a tiny Llama-2 folder."""
    rng = np.random.default_rng(0)
    rows = [
        (f"u{u}", f"i{i}", t)
        for u in range(num_users)
        for t, i in enumerate(rng.choice(num_items, size=int(rng.integers(7, 12)), replace=False))
    ]
    data = root / "data"
    data.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(data / "interactions.csv", index=False)
    titles = [(f"i{i}", f"Movie number {i} (19{i:02d})") for i in range(num_items)]
    pd.DataFrame(titles, columns=["item_id", "title"]).to_csv(data / "items.csv", index=False)
    flags = ["--dataset_code", "custom", "--custom_path", str(data), "--data_root", str(root / "cache")]
    split = split_of(flags, RANKER)
    popularity = np.bincount([i for s in split.train for i in s], minlength=split.num_items + 1).astype(float)

    def part(which):
        out = {"users": [], "items": [], "scores": [], "labels": [], "label_ranks": []}
        for u in range(split.num_users):
            seen = set(split.train[u]) | ({split.val[u]} if which == "test" else set())
            scores = popularity + rng.random(len(popularity)) * 0.01
            scores[0] = -np.inf
            scores[list(seen)] = -np.inf
            label = split.test[u] if which == "test" else split.val[u]
            top = np.argsort(-scores)[:20]
            out["users"].append(u)
            out["items"].append(top)
            out["scores"].append(scores[top])
            out["labels"].append(label)
            out["label_ranks"].append(int((scores > scores[label]).sum()))
        return {key: np.array(value) for key, value in out.items()}

    def train_part():
        out = {"users": [], "lengths": [], "items": [], "labels": [], "label_ranks": []}
        for u, seq in enumerate(split.train):
            for length in range(1, len(seq)):
                scores = popularity + rng.random(len(popularity)) * 0.01
                scores[0] = -np.inf
                scores[seq[:length]] = -np.inf
                out["users"].append(u)
                out["lengths"].append(length)
                out["items"].append(np.argsort(-scores)[:20])
                out["labels"].append(seq[length])
                out["label_ranks"].append(int((scores > scores[seq[length]]).sum()))
        return {key: np.array(value) for key, value in out.items()}

    save_candidates(
        root / "retriever" / "candidates.npz",
        split=split,
        topk=20,
        val=part("val"),
        test=part("test"),
        val_metrics={},
        test_metrics={},
        train=train_part(),
    )
    tiny_llama().save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return flags + [
        "--llm_retrieved_path",
        str(root / "retriever"),
        "--llm_base_model",
        str(root / "llm"),
        "--experiment_root",
        str(root / "experiments"),
    ]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the run below sets 1 thread for speed on a shared CPU


def check_rankings_and_metrics(run, flags, metrics) -> None:
    """What a finished run wrote says the right thing: each test user's true item is its split test item, its
    ranking is a permutation of its test candidates ordered by score, its ranks match that order, and the
    retriever rows of test_metrics.json are the candidates file's own ranks."""
    split = split_of(flags, RANKER)
    test = load_candidates(flags[flags.index("--llm_retrieved_path") + 1], split).test
    user_index = {raw: u for u, raw in enumerate(split.user_raw_ids)}
    rankings = [json.loads(line) for line in (run / "test_rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == metrics["users_subset"]
    subset_retriever_ranks = []
    for record in rankings:
        u = user_index[record["user"]]
        assert record["true_item"] == split.item_raw_ids[split.test[u]]
        row = int(np.flatnonzero(test["users"] == u)[0])
        retrieved = [split.item_raw_ids[i] for i in test["items"][row, :20]]
        shown = [c["item"] for c in record["candidates"]]
        assert sorted(shown) == sorted(retrieved)  # a permutation of the user's test candidates
        scores = [c["score"] for c in record["candidates"]]
        assert scores == sorted(scores, reverse=True)
        true_score = scores[shown.index(record["true_item"])]
        assert record["llm_rank"] == sum(score >= true_score for score in scores) - 1  # ties count against it
        assert record["retriever_rank"] == retrieved.index(record["true_item"]) == test["label_ranks"][row]
        subset_retriever_ranks.append(record["retriever_rank"])
    expected = metrics_from_ranks(torch.tensor(subset_retriever_ranks), [1, 5, 10])
    for key, value in expected.items():
        assert metrics["subset"]["retriever"][key] == pytest.approx(value)
    overall = metrics_from_ranks(torch.as_tensor(test["label_ranks"]), [1, 5, 10])
    for key, value in overall.items():
        assert metrics["overall"]["retriever"][key] == pytest.approx(value)


def test_ranker_run_end_to_end(tmp_path, tokenizer, capsys, restore_threads):
    flags = write_tiny_project(tmp_path, tokenizer)
    caps = [
        "--lora_max_steps",
        "4",
        "--lora_val_iterations",
        "2",
        "--lora_micro_batch_size",
        "2",
        "--llm_max_history",
        "5",
        "--llm_max_eval_users",
        "6",
        "--num_threads",
        "1",
    ]
    caps += ["--lora_warmup_steps", "1", "--llm_max_train_samples", "16"]
    assert train_ranker.main(flags + caps) == 0
    out, err = capsys.readouterr()
    assert "LlamaRec (retriever + ranker), all" in out
    for bar in ("val prompts", "test prompts", "validation users", "test users"):  # every long phase shows progress
        assert bar in err
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    assert f"results: {run / 'test_metrics.json'}\n" in out
    for name in ("config.json", "verbalizer.json", "prompts_sample.jsonl", "val_history.jsonl", "test_rankings.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "verbalizer.json").read_text())["letters"]["A"] == 29909
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["trained"] and metrics["timing"]["train_steps"] == 4
    assert 0 < metrics["users_subset"] <= metrics["users_all"] == 40
    history = [json.loads(line) for line in (run / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4]  # no validation of the untrained model
    check_rankings_and_metrics(run, flags, metrics)
    sample = [json.loads(line) for line in (run / "prompts_sample.jsonl").read_text().splitlines()]
    assert sample[0]["prompt"].endswith("### Response:\n") and sample[0]["user"].startswith("u")
    assert sample[0]["candidates"][ord(sample[0]["true_letter"]) - ord("A")] == sample[0]["true_item"]
    # --eval_only evaluates the saved adapter into eval/ and reproduces the run's results exactly
    capsys.readouterr()
    assert train_ranker.main(flags + caps + ["--eval_only"]) == 0
    # the message names the file as it ends up, not the temporary folder it was written in
    assert f"results: {run / 'eval' / 'test_metrics.json'}\n" in capsys.readouterr().out
    evaluated = json.loads((run / "eval" / "test_metrics.json").read_text())
    assert {k: v for k, v in evaluated.items() if k != "timing"} == {k: v for k, v in metrics.items() if k != "timing"}
    assert (run / "eval" / "test_rankings.jsonl").read_text() == (run / "test_rankings.jsonl").read_text()
    assert train_ranker.main(flags + caps + ["--eval_only", "--eval_adapter", "none"]) == 0
    assert json.loads((run / "eval" / "test_metrics.json").read_text())["trained"] is False
    assert train_ranker.main(flags + caps + ["--eval_only", "--eval_adapter", str(tmp_path)]) == 2
    assert "--eval_adapter: expected a PEFT adapter folder" in capsys.readouterr().err
    # a truncated adapter is one error line, and eval/ keeps the earlier evaluation whole (written all or nothing)
    before = {path.name: path.read_bytes() for path in (run / "eval").iterdir()}
    truncated = tmp_path / "truncated"
    shutil.copytree(run / "adapter", truncated)
    (truncated / "adapter_model.safetensors").write_bytes(b"\0" * 50)
    assert train_ranker.main(flags + caps + ["--eval_only", "--eval_adapter", str(truncated)]) == 2
    assert "not a readable LoRA adapter" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (run / "eval").iterdir()} == before
    # an existing run folder needs --resume or --overwrite; --resume reuses the finished adapter
    assert train_ranker.main(flags + caps) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_ranker.main(flags + caps + ["--resume"]) == 0
    # ... but only with the flags the run was trained with
    capsys.readouterr()
    assert train_ranker.main(flags + caps + ["--resume", "--lora_r", "4"]) == 2
    assert "--lora_r 8 -> 4" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, other", [("fp32", "bf16"), ("bf16", "fp32")])
def test_ranker_trains_and_tests_in_each_llm_dtype_and_records_it(tmp_path, tokenizer, capsys, restore_threads, dtype,
                                                                   other):  # fmt: skip
    """--llm_dtype sets the weights the run trains and tests in; the run records it (config.json, environment.json with
    what auto picks here and why, test_metrics.json), and a --resume in the other dtype is refused: it changes the
    ranker's digits, so it is another experiment."""
    flags = write_tiny_project(tmp_path, tokenizer)
    caps = ["--lora_max_steps", "2", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2", "--num_threads", "1"]
    caps += ["--llm_max_history", "5", "--llm_max_eval_users", "4", "--llm_max_train_samples", "4"]
    assert train_ranker.main(flags + caps + ["--llm_dtype", dtype]) == 0
    out = capsys.readouterr().out
    torch_dtype = {"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype]
    assert f"LLM dtype: {dtype} (--llm_dtype auto picks " in out and f"(LlamaForCausalLM, {torch_dtype})" in out
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    assert json.loads((run / "config.json").read_text())["llm_dtype"] == dtype
    environment = json.loads((run / "environment.json").read_text())["llm_dtype"]
    assert environment["dtype"] == dtype and environment["auto_picks"] in ("bf16", "fp32") and environment["why"]
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["llm_dtype"] == dtype and metrics["trained"] and metrics["timing"]["train_steps"] == 2
    check_rankings_and_metrics(run, flags, metrics)
    assert train_ranker.main(flags + caps + ["--llm_dtype", other, "--resume"]) == 2
    assert f"--llm_dtype {dtype!r} -> {other!r}" in capsys.readouterr().err


def test_ranker_refuses_a_mismatched_candidates_file(tmp_path, tokenizer, capsys):
    flags = write_tiny_project(tmp_path, tokenizer)
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    interactions = pd.read_csv(tmp_path / "data" / "interactions.csv")
    interactions[interactions["user_id"] != "u0"].to_csv(other / "data" / "interactions.csv", index=False)
    (other / "data" / "items.csv").write_text((tmp_path / "data" / "items.csv").read_text())
    flags[flags.index("--custom_path") + 1] = str(other / "data")
    assert train_ranker.main(flags + ["--lora_max_steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "fingerprint" in err


def test_ranker_resumes_an_interrupted_training(tmp_path, tokenizer, capsys, restore_threads):
    flags = write_tiny_project(tmp_path, tokenizer)
    caps = ["--lora_val_iterations", "2", "--lora_micro_batch_size", "2", "--llm_max_history", "5"]
    caps += ["--llm_max_eval_users", "4", "--num_threads", "1", "--llm_max_train_samples", "16"]
    caps += ["--lora_max_steps", "4"]
    assert train_ranker.main(flags + caps) == 0
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    uninterrupted = json.loads((run / "test_metrics.json").read_text())
    # simulate an interruption after the checkpoint at step 2: no later checkpoint, no final adapter yet, and
    # the validation line of step 4 (logged before its checkpoint) plus a cut-off line
    for path in (run / "adapter", run / "checkpoints" / "checkpoint-4", run / "test_metrics.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run / "training_summary.json").unlink()
    with open(run / "val_history.jsonl", "a") as f:
        f.write('{"step": 6, "ND')
    clock_at_2 = json.loads((run / "checkpoints" / "checkpoint-2" / "training_clock.json").read_text())
    capsys.readouterr()
    # the learning-rate schedule decays over --lora_max_steps, so it is one of the flags a resume must keep
    assert train_ranker.main(flags + caps[:-2] + ["--lora_max_steps", "6", "--resume"]) == 2
    assert "--lora_max_steps 4 -> 6" in capsys.readouterr().err
    assert train_ranker.main(flags + caps + ["--resume"]) == 0
    assert "continuing from" in capsys.readouterr().out
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["timing"]["train_steps"] == 4
    assert [json.loads(line)["step"] for line in (run / "val_history.jsonl").read_text().splitlines()] == [2, 4]
    assert metrics["subset"] == uninterrupted["subset"]
    # the summary covers both sessions: the time up to the checkpoint resumed from, plus the resumed part
    timing = metrics["timing"]
    assert timing["sessions"] == 2 and clock_at_2["sessions"] == 1
    assert timing["train_seconds_incl_validation"] > clock_at_2["seconds"] > 0
    assert timing["train_loss"] == pytest.approx(uninterrupted["timing"]["train_loss"], rel=1e-4)
    assert timing["best_step"] == uninterrupted["timing"]["best_step"]


def test_ranker_killed_after_training_keeps_its_summary(tmp_path, tokenizer, capsys, restore_threads):
    flags = write_tiny_project(tmp_path, tokenizer)
    caps = ["--lora_val_iterations", "2", "--lora_micro_batch_size", "2", "--llm_max_history", "5"]
    caps += ["--llm_max_eval_users", "4", "--num_threads", "1", "--llm_max_train_samples", "8", "--lora_max_steps", "2"]
    assert train_ranker.main(flags + caps) == 0
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    finished = json.loads((run / "test_metrics.json").read_text())["timing"]
    assert finished["train_loss"] > 0 and finished["train_steps"] == 2 and finished["sessions"] == 1
    assert finished["train_seconds_incl_validation"] > finished["validation_seconds"] > 0
    # killed after the adapter was saved, before the test results were written
    (run / "test_metrics.json").unlink()
    (run / "test_rankings.jsonl").unlink()
    assert train_ranker.main(flags + caps + ["--resume"]) == 0
    resumed = json.loads((run / "test_metrics.json").read_text())["timing"]
    for key in ("train_steps", "train_seconds_incl_validation", "validation_seconds", "train_loss", "best_step"):
        assert resumed[key] == finished[key], key


def test_last_checkpoint_skips_incomplete_and_foreign_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12", "checkpoint-best"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-best"):
        (tmp_path / name / "trainer_state.json").write_text("{}")
    # checkpoint-12 has no trainer_state.json (written last): an interrupted save
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert last_checkpoint(tmp_path / "none") is None


def test_ranker_retrieved_training_candidates_and_fusion(tmp_path, tokenizer, capsys, restore_threads):
    flags = write_tiny_project(tmp_path, tokenizer)
    caps = ["--lora_max_steps", "2", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2"]
    caps += ["--llm_max_history", "5", "--num_threads", "1", "--lora_warmup_steps", "1"]
    caps += ["--llm_train_candidates", "retrieved", "--llm_fusion", "linear", "--llm_max_train_samples", "8"]
    assert train_ranker.main(flags + caps) == 0
    out = capsys.readouterr().out
    assert "training prompts: 8 (retrieved candidates)" in out
    assert "fused (w=" in out and "minus the retriever's order" in out
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    metrics = json.loads((run / "test_metrics.json").read_text())
    fusion = metrics["fusion"]
    grid = fusion["val_NDCG@10_by_weight"]
    assert set(grid) == {"0.0", "0.25", "0.5", "1.0", "2.0", "4.0", "8.0", "inf"}
    assert grid[str(fusion["weight"])] == max(grid.values())
    # w = inf is the retriever's order exactly, so its validation NDCG@10 is the retriever's there
    assert grid["inf"] == pytest.approx(metrics["val"]["metrics"]["retriever"]["NDCG@10"])
    assert grid["0.0"] == pytest.approx(metrics["val"]["metrics"]["llm"]["NDCG@10"])
    for name in ("llm", "fused", "random"):
        ci = metrics["test_vs_retriever"][name]["NDCG@10"]
        assert ci["resamples"] == 2000 and ci["users"] == metrics["users_subset"]
        assert ci["ci95"][0] <= ci["diff"] <= ci["ci95"][1]
        assert ci["diff"] == pytest.approx(
            metrics["subset"][name]["NDCG@10"] - metrics["subset"]["retriever"]["NDCG@10"]
        )
    rankings = [json.loads(line) for line in (run / "test_rankings.jsonl").read_text().splitlines()]
    assert all("fused_rank" in r for r in rankings)


def test_ranker_explains_a_candidates_file_without_training_candidates(tmp_path, tokenizer, capsys):
    """A file written before training-prefix candidates existed (format v1) still serves uniform training and
    fails with the documented error for --llm_train_candidates retrieved."""
    flags = write_tiny_project(tmp_path, tokenizer)
    path = tmp_path / "retriever" / "candidates.npz"
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files if not key.startswith("train_")}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "format": "llamarec-candidates-v1"}))
    np.savez_compressed(path, **arrays)
    capsys.readouterr()
    assert train_ranker.main(flags + ["--llm_train_candidates", "retrieved"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no training-prefix candidates" in err and "--llm_train_candidates retrieved" in err
    assert "train_retriever.py" in err and str(path) in err
