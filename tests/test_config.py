"""config.py: each script's own flags (a flag of another script is an error naming its script), booleans, lists,
dataset defaults that never override the user, value checks, the missing dataset code, the typed configs."""

import argparse
import dataclasses
import errno
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import (
    DATASET_DEFAULTS,
    PREPARE,
    RANKER,
    RECOMMEND,
    RETRIEVER,
    STAGE_CONFIGS,
    add_flag,
    ask_dataset_code,
    build_parser,
    candidate_export,
    default_config,
    flag_actions,
    llm_spec,
    lora_settings,
    parse_flags,
    ranker_data,
    ranker_training,
    retriever_spec,
    retriever_training,
    run_cli,
    saved_flags,
)
from trainer.retriever_train import RetrieverTraining
from trainer.run_folder import flag_record
from utils.errors import FIXES, InputError, WriteError
from utils.files import REPO_ROOT
from utils.settings import flag_name


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


@pytest.mark.parametrize(
    "error, code, line",
    [
        (
            InputError("experiments/x: another process is writing this run folder"),
            2,
            "error: experiments/x: another process is writing this run folder\n",
        ),
        (
            WriteError("experiments/x/config.json: disk full; nothing was left half written"),
            1,
            "error: experiments/x/config.json: disk full; nothing was left half written\n",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "data/x.csv"),
            1,
            "error: data/x.csv: Permission denied; " + FIXES[errno.EACCES] + "\n",
        ),
    ],
    ids=["bad input", "a write of ours", "another OSError"],
)
def test_an_error_line_is_one_write_so_ranks_sharing_stderr_cannot_interleave_it(monkeypatch, error, code, line):
    """print() writes the text and the newline in two calls; on an unbuffered stderr shared by a torchrun launch's
    ranks, one rank's line then ran into the other's ("...then rerunerror: ..."). Each of run_cli's error branches."""
    writes = []

    class RecordingStream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return super().write(text)

    def refused(flags):
        raise error

    monkeypatch.setattr(sys, "stderr", RecordingStream())
    assert run_cli(RETRIEVER, refused, ["--dataset_code", "ml-100k"]) == code
    assert writes == [line]


# ---------------------------------------------------------------------------------------------- one declaration


def test_every_typed_config_field_is_set_by_a_flag_of_its_script_and_repeats_no_default():
    """A field is either named like its flag or names it (flag_field); none carries a default of its own, so a
    default lives only in the flag's declaration."""
    for name, (script, _) in STAGE_CONFIGS.items():
        dests = {action.dest for action in flag_actions(script)}
        cls = stage_class(name)
        derived = {"LLMSpec": {"tokenizer"}, "RankerTraining": {"wandb_project"}}.get(name, set())
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, field
            assert field.name in derived or flag_name(field) in dests, (name, field.name)


def stage_class(name: str) -> type:
    for module in ("datasets", "model.retrievers", "trainer.retriever_train", "trainer.retriever_export", "model.llm",
                   "dataloader.prompts", "dataloader.ranker_data", "trainer.ranker_train"):  # fmt: skip
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise LookupError(name)


def test_a_typed_config_takes_each_value_from_its_own_flag():
    """Every field gets a distinct value through its flag: a field wired to the wrong flag (or to a default) fails."""
    argv = ["--dataset_code", "beauty", "--seed", "7", "--train_batch_size", "3", "--lr", "0.25", "--weight_decay",
            "0.125", "--adam_epsilon", "1e-5", "--max_grad_norm", "2.5", "--label_smoothing", "0.375",
            "--enable_lr_schedule", "--warmup_steps", "11", "--num_epochs", "13", "--max_steps", "17",
            "--bert_max_len", "19", "--sliding_window_size", "0.75", "--train_all_items", "--val_iterations", "23",
            "--val_batch_size", "29", "--no-early_stopping", "--early_stopping_patience", "31", "--best_metric",
            "NDCG@5", "--metric_ks", "5", "37"]  # fmt: skip
    training = retriever_training(parse_flags(RETRIEVER, argv))
    assert dataclasses.astuple(training) == (
        7,
        3,
        0.25,
        0.125,
        1e-5,
        2.5,
        0.375,
        True,
        11,
        13,
        17,
        19,
        0.75,
        True,
        23,
        29,
        False,
        31,
        "NDCG@5",
        (5, 37),
    )
    flags = parse_flags(RANKER, ["--dataset_code", "beauty", "--seed", "3", "--llm_negative_sample_size", "4",
                                 "--llm_max_train_samples", "5", "--llm_max_eval_users", "6",
                                 "--llm_shuffle_eval_candidates", "--llm_train_candidates", "retrieved",
                                 "--llm_train_missed", "insert", "--llm_shuffle_train_candidates", "--lora_r", "2",
                                 "--lora_alpha", "9", "--lora_dropout", "0.5", "--lora_target_modules", "a", "b",
                                 "--llm_base_model", "m", "--use_wandb", "--wandb_project", "p"])  # fmt: skip
    assert dataclasses.astuple(ranker_data(flags)) == (3, 4, 5, 6, True, "retrieved", "insert", True)
    assert dataclasses.astuple(lora_settings(flags)) == (2, 9, 0.5, ("a", "b"))
    assert (llm_spec(flags).base_model, llm_spec(flags).tokenizer) == ("m", "m")
    assert ranker_training(flags).wandb_project == "p"
    assert ranker_training(ranker_flags()).wandb_project is None  # no --use_wandb: no project, though it has a default


def test_default_config_is_the_flags_defaults_with_fields_replaced():
    assert default_config(RetrieverTraining, "ml-100k").val_iterations == 50  # the dataset's, not a dataclass's
    assert default_config(RetrieverTraining, "ml-1m", lr=0.5).lr == 0.5
    assert default_config(RetrieverTraining, "ml-1m").batch_size == 128


def test_each_dataset_default_is_declared_once_and_stated_in_the_help():
    """DATASET_DEFAULTS is the only place of a dataset-dependent default: its flags default to None (resolved after
    parsing) and their help is generated from it, so it can never disagree with the table."""
    keys = set(DATASET_DEFAULTS["other"])
    assert all(set(defaults) == keys for defaults in DATASET_DEFAULTS.values())
    text = build_parser(RETRIEVER).format_help() + build_parser(RANKER).format_help()
    text = " ".join(text.split())
    for dest in keys:
        script = RANKER if dest.startswith("lora_") else RETRIEVER
        assert {action.dest: action.default for action in flag_actions(script)}[dest] is None, dest
    assert "(default: 16 ml-100k, 128 ml-1m, ml-20m and lrurec-*, else 64)" in text  # --train_batch_size
    assert "(default: 10 lrurec-*, else 20)" in text  # --early_stopping_patience
    assert "(default: 200 ml-100k, ml-1m, ml-20m and lrurec-ml-1m, else 50)" in text  # --bert_max_len
    assert "(default: 0.1 ml-100k, else 0.0)" in text  # --label_smoothing
    with pytest.raises(ValueError, match="DATASET_DEFAULTS"):
        add_flag(argparse.ArgumentParser(), "--bert_max_len", type=int, default=7, role="training", help="x")


def test_device_and_threads_are_declared_once():
    source = (REPO_ROOT / "config.py").read_text()
    assert source.count('"--device"') == 1 and source.count('"--num_threads"') == 1
    assert build_parser(RECOMMEND).get_default("device") == build_parser(RETRIEVER).get_default("device") == "auto"


# ---------------------------------------------------------------------------------------------- --config


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_a_runs_own_config_reproduces_its_flags_and_later_flags_override(tmp_path):
    original = retriever_flags("--lr", "0.003", "--metric_ks", "1", "10", "--no-train_all_items", "--seed", "5",
                               "--run_name", "r", "--max_steps", "7", "--bert_dropout", "0.1")  # fmt: skip
    saved = write_json(tmp_path / "config.json", flag_record(vars(original)))
    again = parse_flags(RETRIEVER, ["--config", saved])
    assert vars(again) == {**vars(original), "config": Path(saved)}
    # later flags override, including a boolean the file sets (no "not allowed with" clash) and a list
    later = parse_flags(RETRIEVER, [f"--config={saved}", "--lr", "0.5", "--train_all_items", "--metric_ks", "5", "10"])
    assert (later.lr, later.train_all_items, later.metric_ks, later.seed) == (0.5, True, [5, 10], 5)
    # the command line wins wherever --config stands
    before = parse_flags(RETRIEVER, ["--lr", "0.5", "--config", saved])
    assert before.lr == 0.5


def test_config_values_are_checked_like_flags(tmp_path, capsys):
    ok = {"dataset_code": "ml-100k"}
    with pytest.raises(InputError, match=r"--config .*bad.json: expected flags of train_retriever.py, found unknown "
                                         r"keys bogus, lora_r; --lora_r is a train_ranker.py flag"):  # fmt: skip
        parse_flags(RETRIEVER, ["--config", write_json(tmp_path / "bad.json", {**ok, "lora_r": 4, "bogus": 1})])
    with pytest.raises(InputError, match="--bert_dropout: expected a value in"):
        parse_flags(RETRIEVER, ["--config", write_json(tmp_path / "c.json", {**ok, "bert_dropout": 1.5})])
    with pytest.raises(SystemExit):  # argparse's own error for a value of the wrong type or outside the choices
        parse_flags(RETRIEVER, ["--config", write_json(tmp_path / "c.json", {**ok, "retriever_model": "gru"})])
    assert "--retriever_model: invalid choice: 'gru'" in capsys.readouterr().err
    with pytest.raises(InputError, match="lr: expected a value, found null"):
        parse_flags(RETRIEVER, ["--config", write_json(tmp_path / "c.json", {**ok, "lr": None})])
    with pytest.raises(InputError, match="c.json: expected a JSON object, found list"):
        parse_flags(RETRIEVER, ["--config", write_json(tmp_path / "c.json", [1])])
    with pytest.raises(InputError, match="missing.json: expected a JSON object, found an unreadable file"):
        parse_flags(RETRIEVER, ["--config", str(tmp_path / "missing.json")])
    with pytest.raises(InputError, match="--config: expected one file, found 2"):
        parse_flags(RETRIEVER, ["--config", "a.json", "--config=b.json"])
    with pytest.raises(InputError, match="--config: expected a JSON file, found nothing"):
        parse_flags(RETRIEVER, ["--config"])


def test_config_never_resumes_overwrites_or_only_evaluates(tmp_path):
    path = write_json(tmp_path / "c.json", {"dataset_code": "ml-100k", "overwrite": True, "resume": True,
                                            "eval_only": True, "print_config": True, "dataset_name": "ml-100k"})  # fmt: skip
    flags = parse_flags(RETRIEVER, ["--config", path])
    assert not (flags.overwrite or flags.resume or flags.eval_only or flags.print_config)
    assert parse_flags(RETRIEVER, ["--config", path, "--overwrite"]).overwrite


def test_ranker_and_recommend_read_config_files(tmp_path):
    ranker = ranker_flags("--lora_target_modules", "q_proj", "k_proj", "--llm_train_candidates", "retrieved")
    record = {**flag_record(vars(ranker)), "processes": 1}
    again = parse_flags(RANKER, ["--config", write_json(tmp_path / "r.json", record)])
    assert vars(again) == {**vars(ranker), "config": tmp_path / "r.json"}
    path = write_json(tmp_path / "rec.json", {"retriever_run": "runs/r", "users": ["1", "2"], "topk": 5})
    recommend = parse_flags(RECOMMEND, ["--config", path, "--topk", "3"])
    assert (recommend.retriever_run, recommend.users, recommend.topk) == (Path("runs/r"), ["1", "2"], 3)


def test_a_run_saved_before_a_flag_existed_reads_back_with_the_value_it_had(tmp_path):
    """saved_flags: a flag missing from an older config.json takes its default, except where the run behaved
    otherwise (BEFORE_THE_FLAG: such runs exported every training prefix, not a sample)."""
    record = flag_record(vars(retriever_flags("--lr", "0.003")))
    for key in ("retrieved_train_max_prefixes", "retriever_model", "attn_heads"):
        del record[key]
    saved = saved_flags(Path(write_json(tmp_path / "old.json", record)), RETRIEVER)
    assert candidate_export(saved).train_max_prefixes == 0
    assert (saved.lr, saved.retriever_model, saved.attn_heads) == (0.003, "lru", 2)
    record["retrieved_train_max_prefixes"] = 500
    saved = saved_flags(Path(write_json(tmp_path / "new.json", record)), RETRIEVER)
    assert candidate_export(saved).train_max_prefixes == 500
