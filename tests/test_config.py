"""config.py: each script's own flags (a flag of another script is an error naming its script), booleans, lists,
dataset defaults that never override the user, value checks, the missing dataset code, the typed configs."""

import io
import json
import subprocess
import sys

import pytest

from config import (
    PREPARE,
    RANKER,
    RECOMMEND,
    RETRIEVER,
    ask_dataset_code,
    build_parser,
    parse_flags,
    retriever_spec,
    retriever_training,
    run_cli,
)
from utils.errors import InputError
from utils.files import REPO_ROOT


def retriever_flags(*argv: str):
    return parse_flags(RETRIEVER, ["--dataset_code", "ml-100k", *argv])


def ranker_flags(*argv: str):
    return parse_flags(RANKER, ["--dataset_code", "ml-100k", *argv])


def test_dataset_defaults_apply_only_when_not_passed():
    ml = retriever_flags()
    assert (ml.bert_max_len, ml.train_batch_size) == (200, 16)
    other = parse_flags(RETRIEVER, ["--dataset_code", "custom", "--custom_path", "/tmp/x"])
    assert (other.bert_max_len, other.train_batch_size) == (50, 64)
    user = retriever_flags("--bert_max_len", "50", "--train_batch_size", "32")
    assert (user.bert_max_len, user.train_batch_size) == (50, 32)
    assert (ml.bert_dropout, ml.bert_attn_dropout, other.bert_dropout, other.bert_attn_dropout) == (0.5, 0.5, 0.2, 0.2)
    user = retriever_flags("--bert_dropout", "0.2", "--bert_attn_dropout", "0.2")
    assert (user.bert_dropout, user.bert_attn_dropout) == (0.2, 0.2)
    assert (ml.label_smoothing, other.label_smoothing) == (0.1, 0.0)
    assert (ml.val_iterations, other.val_iterations) == (50, 100)
    assert retriever_flags("--label_smoothing", "0").label_smoothing == 0.0
    assert ranker_flags().lora_micro_batch_size == 16
    assert parse_flags(RANKER, ["--dataset_code", "beauty"]).lora_micro_batch_size == 12


def test_user_lr_and_weight_decay_survive_into_the_typed_config():
    training = retriever_training(retriever_flags("--lr", "0.005", "--weight_decay", "0"))
    assert (training.lr, training.weight_decay) == (0.005, 0.0)
    spec = retriever_spec(retriever_flags("--bert_hidden_units", "32", "--retriever_model", "sasrec"))
    assert (spec.hidden_units, spec.model, spec.max_len, spec.dropout) == (32, "sasrec", 200, 0.5)


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
    assert retriever_flags(*argv).use_wandb is expected


def test_bad_boolean_is_rejected(capsys):
    with pytest.raises(SystemExit):
        retriever_flags("--use_wandb", "maybe")
    assert "expected a boolean" in capsys.readouterr().err


def test_lists():
    flags = ranker_flags("--lora_target_modules", "q_proj", "k_proj", "v_proj", "--metric_ks", "1", "5")
    assert flags.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert flags.metric_ks == [1, 5]


def test_custom_dataset_name_carries_folder(tmp_path):
    flags = parse_flags(RETRIEVER, ["--dataset_code", "custom", "--custom_path", str(tmp_path / "my_shop")])
    assert flags.dataset_name == "custom-my_shop"
    with pytest.raises(InputError, match="--custom_path"):
        parse_flags(RETRIEVER, ["--dataset_code", "custom"])


@pytest.mark.parametrize(
    "script, flag, owner",
    [
        (RETRIEVER, "--lora_lr", RANKER),
        (RETRIEVER, "--llm_base_model=x", RANKER),
        (RETRIEVER, "--topk", RECOMMEND),
        (RANKER, "--bert_hidden_units", RETRIEVER),
        (RANKER, "--best_metric", RETRIEVER),
        (RANKER, "--eval_checkpoint", RETRIEVER),
        (RECOMMEND, "--seed", f"{RETRIEVER} / {RANKER}"),
        (RECOMMEND, "--dataset_code", f"{RETRIEVER} / {RANKER} / {PREPARE}"),
    ],
)
def test_a_flag_of_another_script_is_refused_with_its_owner_named(script, flag, owner):
    argv = ["--dataset_code", "ml-100k"] if script != RECOMMEND else ["--retriever_run", "x", "--users", "1"]
    name = flag.split("=")[0]
    value = [] if "=" in flag else ["5"]
    with pytest.raises(InputError) as error:
        parse_flags(script, argv + [flag, *value])
    assert str(error.value).startswith(f"{name} is a {owner} flag; {script} does not read it")


def test_an_unknown_flag_and_an_abbreviation_are_argparse_errors(capsys):
    for argv in (["--no_such_flag", "1"], ["--bert_drop", "0.3"]):  # no silent prefix match either
        with pytest.raises(SystemExit):
            retriever_flags(*argv)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_min_uc_below_three_is_rejected():
    with pytest.raises(InputError, match="--min_uc: expected 3 or more, found 2"):
        retriever_flags("--min_uc", "2")


@pytest.mark.parametrize("value", ["1", "-0.1"])
def test_label_smoothing_outside_zero_one_is_rejected(value):
    with pytest.raises(InputError, match=f"--label_smoothing: expected a value in \\[0, 1\\), found {float(value)}"):
        retriever_flags("--label_smoothing", value)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )


@pytest.mark.parametrize("script", ["train_retriever.py", "train_ranker.py"])
def test_missing_dataset_code_exits_without_hanging(script):
    result = run_script(script)
    assert result.returncode != 0
    assert "--dataset_code" in result.stderr and "ml-100k, ml-1m, ml-20m, beauty, games, custom" in result.stderr
    assert "Traceback" not in result.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("answers, expected", [(["1"], "ml-100k"), (["B"], "beauty"), (["x", "g"], "games")])
def test_the_dataset_prompt_takes_the_originals_answers(monkeypatch, answers, expected):
    replies = iter(answers)
    monkeypatch.setattr("builtins.input", lambda prompt: next(replies))
    assert ask_dataset_code(Terminal()) == expected


def test_end_of_input_at_the_dataset_prompt_is_a_one_line_error(monkeypatch):
    def eof(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    with pytest.raises(InputError, match="--dataset_code: missing \\(end of input at the prompt\\)"):
        ask_dataset_code(Terminal())


@pytest.mark.parametrize("script, ranker", [("train_retriever.py", False), ("train_ranker.py", True)])
def test_print_config_holds_only_the_scripts_flags(script, ranker):
    result = run_script(script, "--dataset_code", "beauty", "--print_config", "--use_wandb", "False")
    assert result.returncode == 0, result.stderr
    flags = json.loads(result.stdout)
    assert flags["use_wandb"] is False and flags["dataset_name"] == "beauty"
    assert ("lora_target_modules" in flags) is ranker and ("bert_max_len" in flags) is not ranker
    if ranker:
        assert flags["lora_target_modules"] == ["q_proj", "v_proj"] and flags["lora_micro_batch_size"] == 12
    else:
        assert flags["bert_max_len"] == 50 and flags["train_batch_size"] == 64


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val_iterations", "0"], "--val_iterations: expected a positive integer, found 0"),
        (["--retrieved_topk", "-5"], "--retrieved_topk: expected a positive integer, found -5"),
        (["--train_batch_size", "0"], "--train_batch_size: expected a positive integer, found 0"),
        (["--metric_ks", "0", "10"], "--metric_ks: expected positive values, found [0, 10]"),
        (["--bert_dropout", "1"], "--bert_dropout: expected a value in [0, 1), found 1.0"),
        (["--lr", "0"], "--lr: expected a positive number, found 0.0"),
        (["--num_threads", "-1"], "--num_threads: expected 0 or more, found -1"),
        (["--sliding_window_size", "1.5"], "--sliding_window_size: expected (0, 1] with --train_all_items, found 1.5"),
        (["--sliding_window_size", "0"], "--sliding_window_size: expected (0, 1] with --train_all_items, found 0.0"),
        (["--retrieved_train_folds", "1"], "--retrieved_train_folds: expected 0 (in-sample) or >= 2, found 1"),
        (["--warmup_steps", "10"], "--warmup_steps: only used with --enable_lr_schedule"),
        (["--eval_export_candidates"], "--eval_export_candidates: only used with --eval_only"),
        (["--wandb_project", "x"], "--wandb_project: only used with --use_wandb"),
        (["--resume", "--overwrite"], "--resume and --overwrite: pass at most one"),
    ],
)
def test_bad_retriever_values_are_rejected_with_the_flag_named(flags, message):
    with pytest.raises(InputError) as error:
        retriever_flags(*flags)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--llm_max_eval_users", "0"], "--llm_max_eval_users: expected a positive integer, found 0"),
        (["--llm_negative_sample_size", "26"], "--llm_negative_sample_size: expected 1..25"),
        (["--lora_max_steps", "-2"], "--lora_max_steps: expected -1 or more, found -2"),
        (["--llm_train_missed", "insert"], "--llm_train_missed: only used with --llm_train_candidates retrieved"),
        (["--llm_shuffle_train_candidates"], "--llm_shuffle_train_candidates: only used with --llm_train_candidates"),
        (["--lora_global_batch_size", "8", "--lora_gradient_accumulation_steps", "2"], "pass one"),
        (["--eval_adapter", "none"], "--eval_adapter: only used with --eval_only"),
    ],
)
def test_bad_ranker_values_are_rejected_with_the_flag_named(flags, message):
    with pytest.raises(InputError) as error:
        ranker_flags(*flags)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topk", "0"], "--topk: expected a positive integer, found 0"),
        (["--topk", "-1"], "--topk: expected a positive integer, found -1"),
        (["--recommend_batch_size", "-2"], "--recommend_batch_size: expected a positive integer, found -2"),
        (["--recommend_batch_size", "0"], "--recommend_batch_size: expected a positive integer, found 0"),
        (["--num_threads", "-1"], "--num_threads: expected 0 or more, found -1"),
    ],
)
def test_every_numeric_recommend_flag_is_range_checked(flags, message):
    with pytest.raises(InputError) as error:
        parse_flags(RECOMMEND, ["--retriever_run", "x", "--users", "1", *flags])
    assert message in str(error.value)


def test_window_step_above_one_is_the_originals_choice_without_train_all_items():
    flags = parse_flags(RETRIEVER, ["--dataset_code", "beauty", "--sliding_window_size", "1.5"])
    assert flags.sliding_window_size == 1.5 and flags.train_all_items is False


def test_each_help_lists_only_its_own_flags():
    retriever = " ".join(run_script("train_retriever.py", "--help").stdout.split())
    assert "--no-use_wandb set --use_wandb to False --wandb_project" in retriever  # no "(default: True)"
    assert "(default: None)" not in retriever
    assert "--train_all_items" in retriever and "--lora_lr" not in retriever and "--topk" not in retriever
    assert "size every retriever" in retriever  # the --bert_* names, explained
    ranker = " ".join(run_script("train_ranker.py", "--help").stdout.split())
    assert "--lora_lr" in ranker and "--bert_hidden_units" not in ranker and "--best_metric" not in ranker
    recommend = run_script("recommend.py", "--help").stdout
    assert "--retriever_run" in recommend and "--seed" not in recommend and "--lora_lr" not in recommend


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--best_metric", "Recall@7"], "--best_metric: expected Recall@k, NDCG@k or MRR@k with k in --metric_ks"),
        (["--best_metric", "Hits@10"], "found 'Hits@10'"),
        (["--metric_ks", "1", "5"], "k in --metric_ks [1, 5], found 'Recall@10'"),
    ],
)
def test_retriever_best_metric_must_be_computed(flags, message):
    with pytest.raises(InputError) as error:
        retriever_flags(*flags)
    assert message in str(error.value)
    ranker_flags("--metric_ks", "1", "5")  # the ranker has no --best_metric: always NDCG@10


def test_every_flag_of_every_script_has_a_role_and_no_script_accepts_what_it_ignores():
    for script in (RETRIEVER, RANKER, RECOMMEND, PREPARE):
        for action in build_parser(script)._actions:
            assert action.dest == "help" or action.role in ("training", "outcome", "repeat", "setting"), action.dest


def test_ctrl_c_ends_with_one_line_and_exit_130(capsys):
    def interrupted(flags):
        raise KeyboardInterrupt

    assert run_cli(RETRIEVER, interrupted, ["--dataset_code", "ml-100k"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
