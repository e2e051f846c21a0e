"""config.py: booleans, lists, dataset defaults that never override the user, missing dataset code."""

import json
import subprocess
import sys

import pytest

from config import check_best_metric, parse_config, run_cli
from trainer.utils import REPO_ROOT, InputError


def test_dataset_defaults_apply_only_when_not_passed():
    ml = parse_config(["--dataset_code", "ml-100k"])
    assert (ml.bert_max_len, ml.train_batch_size) == (200, 16)
    other = parse_config(["--dataset_code", "custom", "--custom_path", "/tmp/x"])
    assert (other.bert_max_len, other.train_batch_size) == (50, 64)
    user = parse_config(["--dataset_code", "ml-100k", "--bert_max_len", "50", "--train_batch_size", "32"])
    assert (user.bert_max_len, user.train_batch_size) == (50, 32)
    assert (ml.bert_dropout, ml.bert_attn_dropout, other.bert_dropout, other.bert_attn_dropout) == (0.5, 0.5, 0.2, 0.2)
    user = parse_config(["--dataset_code", "ml-100k", "--bert_dropout", "0.2", "--bert_attn_dropout", "0.2"])
    assert (user.bert_dropout, user.bert_attn_dropout) == (0.2, 0.2)
    assert (ml.label_smoothing, other.label_smoothing) == (0.1, 0.0)
    assert (ml.val_iterations, other.val_iterations) == (50, 100)
    assert parse_config(["--dataset_code", "ml-100k", "--label_smoothing", "0"]).label_smoothing == 0.0


def test_user_lr_and_weight_decay_survive():
    cfg = parse_config(["--dataset_code", "ml-100k", "--lr", "0.005", "--weight_decay", "0"])
    assert (cfg.lr, cfg.weight_decay) == (0.005, 0.0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], False),
        (["--use_wandb"], True),
        (["--use_wandb", "False"], False),
        (["--use_wandb", "false"], False),
        (["--use_wandb", "True"], True),
        (["--use_wandb", "0"], False),
        (["--no-use_wandb"], False),
    ],
)
def test_booleans(argv, expected):
    assert parse_config(["--dataset_code", "ml-100k", *argv]).use_wandb is expected


def test_bad_boolean_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--dataset_code", "ml-100k", "--use_wandb", "maybe"])
    assert "expected a boolean" in capsys.readouterr().err


def test_lists():
    cfg = parse_config(
        ["--dataset_code", "ml-100k", "--lora_target_modules", "q_proj", "k_proj", "v_proj", "--metric_ks", "1", "5"]
        + ["--best_metric", "NDCG@5"]
    )
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.metric_ks == [1, 5]


def test_custom_dataset_name_carries_folder(tmp_path):
    cfg = parse_config(["--dataset_code", "custom", "--custom_path", str(tmp_path / "my_shop")])
    assert cfg.dataset_name == "custom-my_shop"
    with pytest.raises(InputError, match="--custom_path"):
        parse_config(["--dataset_code", "custom"])


def test_min_uc_below_three_is_rejected():
    with pytest.raises(InputError, match="--min_uc"):
        parse_config(["--dataset_code", "ml-100k", "--min_uc", "2"])


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_label_smoothing_outside_zero_one_is_rejected(value):
    with pytest.raises(InputError, match=f"--label_smoothing: expected a value in \\[0, 1\\), found {float(value)}"):
        parse_config(["--dataset_code", "ml-100k", "--label_smoothing", value])


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


@pytest.mark.parametrize("script", ["train_retriever.py", "train_ranker.py"])
def test_missing_dataset_code_exits_without_hanging(script):
    result = run_script(script)
    assert result.returncode != 0
    assert "--dataset_code" in result.stderr and "ml-100k, beauty, games, custom" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train_retriever.py", "train_ranker.py"])
def test_print_config(script):
    result = run_script(script, "--dataset_code", "beauty", "--print_config", "--use_wandb", "False")
    assert result.returncode == 0, result.stderr
    cfg = json.loads(result.stdout)
    assert cfg["use_wandb"] is False and cfg["bert_max_len"] == 50 and cfg["train_batch_size"] == 64
    assert cfg["lora_target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val_iterations", "0"], "--val_iterations: expected a positive integer, found 0"),
        (["--retrieved_topk", "-5"], "--retrieved_topk: expected a positive integer, found -5"),
        (["--train_batch_size", "0"], "--train_batch_size: expected a positive integer, found 0"),
        (["--llm_max_eval_users", "0"], "--llm_max_eval_users: expected a positive integer, found 0"),
        (["--metric_ks", "0", "10"], "--metric_ks: expected positive cut-offs"),
        (["--bert_dropout", "1"], "--bert_dropout: expected a value in [0, 1), found 1.0"),
        (["--lr", "0"], "--lr: expected a positive number, found 0.0"),
        (["--num_threads", "-1"], "--num_threads: expected 0 (torch's default) or more, found -1"),
        (["--sliding_window_size", "1.5"], "--sliding_window_size: expected (0, 1] with --train_all_items, found 1.5"),
        (["--sliding_window_size", "0"], "--sliding_window_size: expected (0, 1] with --train_all_items, found 0.0"),
    ],
)
def test_bad_numbers_are_rejected_with_the_flag_named(flags, message):
    with pytest.raises(InputError) as error:
        parse_config(["--dataset_code", "ml-100k", *flags])
    assert message in str(error.value)


def test_window_step_above_one_is_the_originals_choice_without_train_all_items():
    cfg = parse_config(["--dataset_code", "beauty", "--sliding_window_size", "1.5"])
    assert cfg.sliding_window_size == 1.5 and cfg.train_all_items is False


def test_help_shows_each_boolean_default_once_in_its_group():
    result = run_script("train_retriever.py", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--no-use_wandb set --use_wandb to False --wandb_project" in text  # no "(default: True)"
    assert "(default: None)" not in text
    retriever_group = text[text.index("retriever (LRURec, or a baseline") : text.index("ranker (LLM):")]
    assert "--train_all_items" in retriever_group


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--best_metric", "Recall@7"], "--best_metric: expected Recall@k, NDCG@k or MRR@k with k in --metric_ks"),
        (["--best_metric", "Hits@10"], "found 'Hits@10'"),
        (["--metric_ks", "1", "5"], "k in --metric_ks [1, 5], found 'Recall@10'"),
    ],
)
def test_retriever_best_metric_must_be_computed(flags, message):
    cfg = parse_config(["--dataset_code", "ml-100k", *flags])  # the ranker ignores --best_metric: no error here
    with pytest.raises(InputError) as error:
        check_best_metric(cfg)
    assert message in str(error.value)


def test_ctrl_c_ends_with_one_line_and_exit_130(capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    assert run_cli(interrupted, ["--dataset_code", "ml-100k"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
