"""sweep.py: trials chosen on validation only, every trial an ordinary run folder, a killed sweep resumed without
losing or repeating a trial, pruning from the validation curve, and flags checked before anything runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest

import sweep
from tests.conftest import write_custom_dataset
from tests.test_ranker import write_tiny_project
from trainer.search import (
    FAIL,
    Pruned,
    Sweep,
    check_claim,
    chosen_trial,
    claim_run,
    ended,
    parse_dimension,
    report_validations,
    run_process,
)
from utils.errors import InputError
from utils.files import REPO_ROOT


def retriever_sweep_args(tmp_path, study: str, trials: int, workers: int, max_steps: int = 20) -> list[str]:
    return [
        "train_retriever.py", "--study", study, "--space", "bert_dropout=float:0.0:0.4", "label_smoothing=choice:0,0.1",
        "--trials", str(trials), "--workers", str(workers), "--threads_per_worker", "1", "--heartbeat_seconds", "1",
        "--", "--dataset_code", "ml-100k", "--data_root", str(tmp_path / "data"), "--experiment_root",
        str(tmp_path / "exp"), "--max_steps", str(max_steps), "--val_iterations", "10", "--retrieved_train_topk", "0",
        "--bert_max_len", "20",
    ]  # fmt: skip


def config_of(runs, trial) -> dict:
    return json.loads((runs / trial.user_attrs["run_name"] / "config.json").read_text())


def load_study(tmp_path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'exp' / 'sweeps' / name / 'study.db'}")


def test_retriever_sweep_chooses_on_validation_and_reads_test_once(tmp_path, capsys):
    args = retriever_sweep_args(tmp_path, "s", trials=3, workers=2)
    assert sweep.main(args) == 0
    out = capsys.readouterr().out
    study = load_study(tmp_path, "s")
    trials = study.get_trials()
    errors = [t.user_attrs.get("error") for t in trials]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3, errors
    runs = tmp_path / "exp" / "retriever" / "ml-100k"
    assert sorted(p.name for p in runs.iterdir()) == ["s_trial0", "s_trial1", "s_trial2"]
    for t in trials:
        run = runs / t.user_attrs["run_name"]
        summary = json.loads((run / "training_summary.json").read_text())
        assert t.value == summary["best_value"]  # the objective is the run's best validation Recall@10
        config = json.loads((run / "config.json").read_text())
        assert config["bert_dropout"] == float(t.user_attrs["flags"]["bert_dropout"])
        assert str(config["label_smoothing"]) in ("0", "0.0", "0.1") and config["num_threads"] == 1
        assert not any("test" in key for key in t.user_attrs)
        assert "train_users" not in np.load(run / "candidates.npz").files  # --retrieved_train_topk 0
    best = max(trials, key=lambda t: (t.value, -t.number))
    result = json.loads((tmp_path / "exp" / "sweeps" / "s" / "summary.json").read_text())
    assert result["chosen"]["trial"] == best.number
    assert result["test_read_for_trials"] == [best.number]
    assert result["chosen"]["chosen_at"] <= result["chosen_test"]["test_read_at"]
    test = json.loads((runs / f"s_trial{best.number}" / "test_metrics.json").read_text())
    assert result["chosen_test"]["Recall@10 mean"] == pytest.approx(test["Recall@10"])
    progress = out[out.index("\n") : out.index("chosen on validation")]  # after the header line (its paths)
    assert "[3/3]" in progress and "test" not in progress.lower()  # no test metric is shown while the search runs
    assert sweep.main(args) == 0  # the study has its trials: nothing runs again
    assert len(load_study(tmp_path, "s").get_trials()) == 3
    assert "3/3 trials ended" in capsys.readouterr().out
    # --seeds: the chosen flags on another seed; the search's own seed (42) is the chosen trial itself
    seeds = args[: args.index("--")] + ["--seeds", "42", "1"] + args[args.index("--") :]
    assert sweep.main(seeds) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["s_chosen_seed1", "s_trial0", "s_trial1", "s_trial2"]
    seed_config = json.loads((runs / "s_chosen_seed1" / "config.json").read_text())
    assert seed_config["seed"] == 1 and seed_config["bert_dropout"] == config_of(runs, best)["bert_dropout"]
    table = (tmp_path / "exp" / "sweeps" / "s" / "seeds_report.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| --bert_dropout"))
    assert f"s_trial{best.number}, s_chosen_seed1" in row and "| 2 |" in row


def test_grid_sampler_runs_every_combination_once_and_a_rerun_adds_none(tmp_path, capsys):
    """--sampler grid: the product of the --space choices, each point one trial (two workers must not take the same
    point), --trials its size; the same command again (a restarted sweep) enqueues and runs nothing more."""
    args = retriever_sweep_args(tmp_path, "g", trials=20, workers=2, max_steps=10)
    space = args.index("--space")
    args[space + 1 : space + 3] = ["bert_dropout=choice:0.1,0.3", "label_smoothing=choice:0,0.1"]
    args[args.index("--") : args.index("--")] = ["--sampler", "grid"]
    assert sweep.main(args) == 0
    assert "0/4 trials ended" in capsys.readouterr().out
    trials = load_study(tmp_path, "g").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    points = sorted((t.params["bert_dropout"], t.params["label_smoothing"]) for t in trials)
    assert points == [("0.1", "0"), ("0.1", "0.1"), ("0.3", "0"), ("0.3", "0.1")]
    runs = tmp_path / "exp" / "retriever" / "ml-100k"
    assert sorted((config_of(runs, t)["bert_dropout"], config_of(runs, t)["label_smoothing"]) for t in trials) == [
        (0.1, 0.0), (0.1, 0.1), (0.3, 0.0), (0.3, 0.1)
    ]  # fmt: skip
    assert sweep.main(args) == 0
    assert "4/4 trials ended" in capsys.readouterr().out
    assert len(load_study(tmp_path, "g").get_trials()) == 4 and len(list(runs.iterdir())) == 4


def test_killed_sweep_resumes_its_trial_without_a_second_run_folder(tmp_path):
    args = retriever_sweep_args(tmp_path, "k", trials=2, workers=1, max_steps=40)
    command = [sys.executable, str(REPO_ROOT / "sweep.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    checkpoint = tmp_path / "exp" / "retriever" / "ml-100k" / "k_trial0" / "checkpoint_last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "the first trial never reached its first validation"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumes the interrupted run k_trial0" in done.stdout
    trials = load_study(tmp_path, "k").get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    interrupted = [t for t in trials if t.state == FAIL]
    assert [t.number for t in interrupted] == [0] and not ended(interrupted[0])
    resumed = [t for t in complete if t.user_attrs.get("resumes") == "k_trial0"]
    assert len(resumed) == 1 and resumed[0].params == interrupted[0].params
    runs = tmp_path / "exp" / "retriever" / "ml-100k"
    assert sorted(p.name for p in runs.iterdir()) == ["k_trial0", f"k_trial{({1, 2} - {resumed[0].number}).pop()}"]
    summary = json.loads((runs / "k_trial0" / "training_summary.json").read_text())
    assert summary["sessions"] == 2 and summary["steps"] == 40  # continued with --resume, not started again


def test_ctrl_c_requeues_the_running_trial_at_once(tmp_path):
    args = retriever_sweep_args(tmp_path, "c", trials=1, workers=1, max_steps=40)
    command = [sys.executable, str(REPO_ROOT / "sweep.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = tmp_path / "exp" / "retriever" / "ml-100k" / "c_trial0" / "checkpoint_last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    assert "re-queued" in driver.stderr.read()
    states = [t.state for t in load_study(tmp_path, "c").get_trials()]
    assert states == [FAIL, optuna.trial.TrialState.WAITING]  # queued again without waiting for a heartbeat
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "resumes the interrupted run c_trial0" in done.stdout
    summary = json.loads((checkpoint.parent / "training_summary.json").read_text())
    assert summary["sessions"] == 2 and summary["steps"] == 40


def test_ranker_sweep_with_a_tiny_llama(tmp_path, llama2_tokenizer, capsys):
    flags = write_tiny_project(tmp_path, llama2_tokenizer)
    caps = ["--lora_max_steps", "4", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2",
            "--llm_max_history", "5", "--llm_max_eval_users", "6", "--lora_warmup_steps", "1",
            "--llm_max_train_samples", "16"]  # fmt: skip
    args = ["train_ranker.py", "--study", "r", "--space", "lora_lr=float:1e-4:1e-2:log", "--trials", "2"]
    assert sweep.main(args + ["--threads_per_worker", "1", "--"] + flags + caps) == 0
    study = optuna.load_study(
        study_name="r", storage=f"sqlite:///{tmp_path / 'experiments' / 'sweeps' / 'r' / 'study.db'}"
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        run = tmp_path / "experiments" / "ranker" / "custom-data" / t.user_attrs["run_name"]
        summary = json.loads((run / "training_summary.json").read_text())
        assert t.value == summary["best_val_metric"]["NDCG@10"]
        assert (run / "adapter").is_dir() and (run / "test_metrics.json").is_file()
    assert "chosen on validation: trial" in capsys.readouterr().out


def test_chosen_trial_is_the_best_validation_and_the_earliest_on_ties():
    study = optuna.create_study(direction="maximize")
    for value in (0.2, 0.5, 0.5, 0.1):
        study.add_trial(optuna.trial.create_trial(value=value))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.9}))
    assert chosen_trial(study).number == 1


def test_trials_count_when_they_end_but_not_when_re_queued():
    failed = optuna.trial.create_trial(state=FAIL, user_attrs={"error": "exit code 2"})
    interrupted = optuna.trial.create_trial(state=FAIL)
    assert ended(failed) and not ended(interrupted)
    assert ended(optuna.trial.create_trial(value=1.0))


def test_pruner_sees_each_validation_and_stops_a_hopeless_trial(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.add_trial(optuna.trial.create_trial(value=0.5, intermediate_values={10: 0.4, 20: 0.5}))
    trial = study.ask()
    (tmp_path / "val_history.jsonl").write_text(json.dumps({"step": 10, "Recall@10": 0.45}) + "\n")
    args = dict.fromkeys(("script", "stage", "fixed", "space", "run_root", "folder", "trials", "threads"))
    state = Sweep(**args, study=study, metric="Recall@10", pruning=True, max_restarts=0, heartbeat=1, lock=None,
                  stopping=None)  # fmt: skip
    reported = set()
    report_validations(state, trial, tmp_path, reported)  # above the median at step 10: goes on
    assert reported == {10}
    with open(tmp_path / "val_history.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, "Recall@10": 0.1}) + "\n")
    with pytest.raises(Pruned, match="step 20"):
        report_validations(state, trial, tmp_path, reported)
    assert study.get_trials()[-1].intermediate_values == {10: 0.45, 20: 0.1}


@pytest.mark.parametrize(
    "space, fixed, message",
    [
        (["lora_lr=float:1e-4:1e-2"], [], "--lora_lr is a train_ranker.py flag"),
        (["no_such_flag=int:1:2"], [], "--no_such_flag is not a train_retriever.py flag"),
        (["seed=int:1:5"], [], "--seed is fixed in a sweep"),
        (["bert_dropout=float:0.5:0.1"], [], "low < high"),
        (["lr=float:0:0.1:log"], [], "low > 0 for :log"),
        (["bert_dropout=uniform:0:1"], [], "expected name=choice"),
        (["bert_dropout=float:0.0:1.5"], [], "--bert_dropout: expected a value in [0, 1), found 1.5"),
        (["bert_dropout=float:0.0:0.5"], ["--run_name", "x"], "--run_name after --"),
        (["bert_dropout=float:0.0:0.5"], ["--num_threads", "2"], "--threads_per_worker"),
    ],
)
def test_space_and_fixed_flags_are_checked_before_any_trial(tmp_path, capsys, space, fixed, message):
    args = ["train_retriever.py", "--study", "bad", "--space", *space, "--", "--dataset_code", "ml-100k"]
    assert sweep.main(args + ["--experiment_root", str(tmp_path), *fixed]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()


def test_a_study_refuses_other_settings(tmp_path, capsys):
    args = retriever_sweep_args(tmp_path, "s", trials=0 + 1, workers=1)
    sweep.open_study(sweep_flags(args), "train_retriever.py", args[args.index("--") + 1 :], tmp_path / "study")
    changed = [a.replace("0.4", "0.3") for a in args]
    with pytest.raises(InputError, match="started with other settings"):
        sweep.open_study(
            sweep_flags(changed), "train_retriever.py", changed[changed.index("--") + 1 :], tmp_path / "study"
        )


def test_a_grid_study_and_a_drawn_one_refuse_each_other(tmp_path):
    """Joining a grid study with --sampler tpe would add drawn trials to the grid; the reverse would enqueue a grid
    into a drawn study."""
    fixed = ["--dataset_code", "ml-100k"]
    for first, then in (("grid", "tpe"), ("random", "grid")):
        args = ["train_retriever.py", "--study", first, "--space", "bert_dropout=choice:0.1,0.3", "--sampler"]
        folder = tmp_path / first
        grid = [{"bert_dropout": "0.1"}, {"bert_dropout": "0.3"}]
        sweep.open_study(
            sweep_flags(args + [first, "--"]), "train_retriever.py", fixed, folder, grid * (first == "grid")
        )
        with pytest.raises(InputError, match=f"grid {first == 'grid'!r} -> {then == 'grid'!r}"):
            sweep.open_study(
                sweep_flags(args + [then, "--"]), "train_retriever.py", fixed, folder, grid * (then == "grid")
            )
        study = sweep.open_study(sweep_flags(args + [first, "--"]), "train_retriever.py", fixed, folder)
        assert len(study.get_trials()) == (2 if first == "grid" else 0)


def sweep_flags(args):
    from config import SWEEP, parse_flags

    return parse_flags(SWEEP, args[: args.index("--")])


def test_the_sweep_s_study_maximises_the_validation_metric(tmp_path):
    """Catches the study created with direction="minimize": Optuna's best trial, the median pruner (and TPE's good
    trials) would then favour the worst validation Recall@10."""
    args = ["train_retriever.py", "--study", "d", "--space", "bert_dropout=float:0:0.5", "--pruner", "median",
            "--pruner_startup_trials", "2", "--"]  # fmt: skip
    study = sweep.open_study(sweep_flags(args), "train_retriever.py", ["--dataset_code", "ml-100k"], tmp_path)
    for value in (0.2, 0.5, 0.1):  # complete trials; each validated once, at step 10, at its final value
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={10: value}))
    assert study.best_trial.number == 1 == chosen_trial(study).number
    # the median at step 10 is 0.2: a running trial above it goes on, one below it is pruned
    ahead, behind = study.ask(), study.ask()
    ahead.report(0.4, 10)
    behind.report(0.15, 10)
    assert not ahead.should_prune() and behind.should_prune()


def test_float_values_are_passed_as_recorded():
    study = optuna.create_study()
    dimension = parse_dimension("lr=float:1e-4:1e-2:log")
    assert dimension.log and (dimension.low, dimension.high) == (1e-4, 1e-2)
    value = dimension.suggest(study.ask())
    assert 1e-4 <= float(value) <= 1e-2
    assert parse_dimension("n=int:2:8").corners() == ["2", "8"]
    assert parse_dimension("x=choice:a,b").suggest(study.ask()) in ("a", "b")


def test_a_restarted_sweep_does_not_replay_its_first_draws(tmp_path):
    """Catches a sampler seeded the same on every start: after a restart the next trial would repeat trial 0's flags."""
    args = ["train_retriever.py", "--study", "r", "--space", "bert_dropout=float:0:0.5", "--sampler", "random", "--"]
    fixed = ["--dataset_code", "ml-100k"]
    dimension = parse_dimension("bert_dropout=float:0:0.5")
    first = sweep.open_study(sweep_flags(args), "train_retriever.py", fixed, tmp_path)
    trial = first.ask()
    drawn = dimension.suggest(trial)
    first.tell(trial, 0.1)
    restarted = sweep.open_study(sweep_flags(args), "train_retriever.py", fixed, tmp_path)
    assert dimension.suggest(restarted.ask()) != drawn


def test_a_failed_trial_names_its_log_s_last_line(tmp_path):
    """The progress line of a failed trial carries the script's own error, the log's last non-empty line."""
    from trainer.search import last_line

    log = tmp_path / "trial.log"
    log.write_text("$ train_retriever.py ...\nepoch 1: 10%\nerror: --bert_dropout: expected a value in [0, 1)\n\n")
    assert last_line(log) == "error: --bert_dropout: expected a value in [0, 1)"
    log.write_text("")
    assert last_line(log) == "no output"


# ---------------------------------------------------------------------------------------------- refusals


def tiny_sweep_args(tmp_path, study: str, space: str, *extra: str) -> list[str]:
    """A one-trial retriever sweep on the tiny custom dataset (4 training steps: a few seconds)."""
    data = tmp_path / "tiny"
    if not data.exists():
        write_custom_dataset(data)
    return [
        "train_retriever.py", "--study", study, "--space", space, "--trials", "1", "--threads_per_worker", "1",
        *extra, "--", "--dataset_code", "custom", "--custom_path", str(data), "--data_root", str(tmp_path / "data"),
        "--experiment_root", str(tmp_path / "exp"), "--bert_max_len", "5", "--train_batch_size", "4",
        "--val_batch_size", "5", "--test_batch_size", "5", "--val_iterations", "2", "--max_steps", "4",
        "--retrieved_topk", "6", "--retrieved_train_topk", "0",
    ]  # fmt: skip


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files_of(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_study_started_anew_refuses_the_run_folders_of_the_old_one(tmp_path, capsys):
    """A study of the same name in another storage, or started again after its folder was deleted, must neither
    credit nor resume the old study's s_trial0 (another --bert_hidden_units): refused before any trial, untouched."""
    assert sweep.main(tiny_sweep_args(tmp_path, "s", "bert_hidden_units=choice:8")) == 0
    runs = tmp_path / "exp" / "retriever" / "custom-tiny"
    old_run = files_of(runs / "s_trial0")
    assert json.loads(old_run["config.json"])["bert_hidden_units"] == 8
    capsys.readouterr()
    other_storage = f"sqlite:///{tmp_path / 'other.db'}"  # the study folder, with the old study's records, stays
    new_space = tiny_sweep_args(tmp_path, "s", "bert_hidden_units=choice:16")
    for args, storage in ((new_space, other_storage), (new_space, None)):
        if storage is None:
            shutil.rmtree(tmp_path / "exp" / "sweeps" / "s")
        else:
            args = args[: args.index("--")] + ["--storage", storage] + args[args.index("--") :]
        assert sweep.main(args) == 2
        error = one_error_line(capsys.readouterr().err)
        assert f"{runs / 's_trial0'}: not made by this study s" in error and "move it aside or remove it" in error
        new_study = optuna.load_study(study_name="s", storage=storage or f"sqlite:///{tmp_path}/exp/sweeps/s/study.db")
        assert new_study.get_trials() == []  # nothing ran, nothing was credited
    assert files_of(runs / "s_trial0") == old_run and sorted(p.name for p in runs.iterdir()) == ["s_trial0"]
    # a leftover <study>_chosen_seed<S> of another study is refused the same way, before the search starts
    shutil.copytree(runs / "s_trial0", runs / "t_chosen_seed1")
    assert sweep.main(tiny_sweep_args(tmp_path, "t", "bert_hidden_units=choice:8", "--seeds", "1")) == 2
    assert f"{runs / 't_chosen_seed1'}: not made by this study t" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in runs.iterdir()) == ["s_trial0", "t_chosen_seed1"]


def test_a_run_claimed_for_other_flags_or_not_claimed_is_refused(tmp_path):
    """The claims behind the refusals: e.g. a <study>_chosen_seed1 run with flags that are no longer the chosen ones
    (more trials changed the choice) is not this seed's run; an unclaimed folder is nobody's."""
    study = optuna.create_study()
    args = dict.fromkeys(("script", "stage", "fixed", "space", "trials", "threads", "metric", "pruning"))
    state = Sweep(**args, study=study, run_root=tmp_path / "runs", folder=tmp_path / "study", max_restarts=0,
                  heartbeat=1, lock=None, stopping=None, study_uuid="u1")  # fmt: skip
    chosen = {"seed": 1, "flags": {"bert_dropout": "0.1"}}
    claim_run(state, "x_chosen_seed1", chosen)
    (tmp_path / "runs" / "x_chosen_seed1").mkdir(parents=True)
    claim_run(state, "x_chosen_seed1", chosen)  # its own run: resumed or credited
    assert check_claim(state, "x_chosen_seed1", chosen)
    for other in ({"seed": 1, "flags": {"bert_dropout": "0.2"}}, {"seed": 2, "flags": {"bert_dropout": "0.1"}}):
        with pytest.raises(InputError, match="x_chosen_seed1: made by study .* with other flags"):
            claim_run(state, "x_chosen_seed1", other)
    (tmp_path / "runs" / "x_trial3").mkdir()
    with pytest.raises(InputError, match="x_trial3: not made by this study"):
        claim_run(state, "x_trial3", {"trial": 3, "flags": {"bert_dropout": "0.1"}})
    assert not (tmp_path / "study" / "runs" / "x_trial3.json").exists()
    state.study_uuid = "u2"  # another study of the same name
    with pytest.raises(InputError, match="x_chosen_seed1: not made by this study"):
        check_claim(state, "x_chosen_seed1", chosen)


@pytest.mark.parametrize(
    "sweep_args, fixed, message",
    [
        (["--seeds", "3", "3", "42"], [], "--seeds: 3 given more than once (3 3 42)"),
        (["--space", "bert_dropout=float:0.1:0.2", "bert_dropout=choice:0.1,0.3"], [],
         "--space: bert_dropout given more than once"),
        (["--space", "bert_dropout=float:0.1:0.2", "bert_dropout=float:0.1:0.2"], [],
         "--space: bert_dropout given more than once"),
        (["--space", "lr=float:1e-4:inf"], [], "with finite numbers as bounds"),
        (["--space", "lr=float:nan:1e-2"], [], "with finite numbers as bounds"),
        ([], ["--bert_dropout", "0.45"], "--bert_dropout: both fixed after -- (--bert_dropout) and searched"),
        ([], ["--bert_dropout=0.45"], "--bert_dropout: both fixed after -- (--bert_dropout=0.45) and searched"),
        (["--space", "enable_lr_schedule=choice:true,false"], ["--no-enable_lr_schedule"],
         "--enable_lr_schedule: both fixed after -- (--no-enable_lr_schedule) and searched"),
        (["--storage", "sqlite:////nonexistent/dir/x.db"], [],
         "--storage sqlite:////nonexistent/dir/x.db: the study's database could not be opened or used (unable to "
         "open database file); check the URL, that a SQLite file's folder exists"),
        (["--storage", "notaurl"], [], "--storage notaurl: expected a database URL (sqlite:///path/to/study.db"),
        (["--sampler", "grid"], [], "--sampler grid: --space bert_dropout is a range; expected only name=choice:a,b,c"),
        (["--sampler", "grid", "--trials", "3", "--space", "bert_dropout=choice:0.1,0.2"], [],
         "--trials 3: --sampler grid runs each of its 2 points once; pass --trials 2 or leave it out"),
        (["--storage", "postgresql+psycopg2://u:secret@localhost/db"], [],
         "--storage postgresql+psycopg2://u:***@localhost/db: its database driver is not installed (no module "
         "'psycopg2'); pip install psycopg2-binary"),
    ],
)  # fmt: skip
def test_bad_sweep_flags_are_one_error_line_before_anything_runs(tmp_path, capsys, sweep_args, fixed, message):
    space = [] if "--space" in sweep_args else ["--space", "bert_dropout=float:0.1:0.2"]
    args = ["train_retriever.py", "--study", "bad", *space, *sweep_args, "--", "--dataset_code", "ml-100k"]
    assert sweep.main(args + ["--experiment_root", str(tmp_path), *fixed]) == 2
    error = one_error_line(capsys.readouterr().err)
    assert message in error and "secret" not in error
    assert not (tmp_path / "sweeps").exists()


def test_a_trial_stops_at_sigint_even_when_the_sweep_ignores_it(tmp_path):
    """A shell starts `sweep.py ... &` with SIGINT ignored, which its children inherit: the trial's process must still
    stop when the sweep sends it SIGINT (pruning, Ctrl-C), not train on to its end."""
    script = tmp_path / "slow_trial.py"
    script.write_text("import pathlib, sys, time\ntime.sleep(60)\npathlib.Path(sys.argv[1]).write_text('finished')\n")
    args = dict.fromkeys(("stage", "study", "fixed", "space", "run_root", "folder", "metric", "trials", "lock"))
    sweep = Sweep(**args, script=script, threads=1, pruning=True, max_restarts=0, heartbeat=1,
                  stopping=threading.Event())  # fmt: skip
    polls = []

    def prune_at_the_third_poll():
        polls.append(1)
        if len(polls) == 3:
            raise Pruned("pruned")

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        start = time.time()
        with pytest.raises(Pruned):
            run_process(sweep, [str(tmp_path / "done")], tmp_path / "trial.log", prune_at_the_third_poll)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - start < 30 and not (tmp_path / "done").exists()
    assert "KeyboardInterrupt" in (tmp_path / "trial.log").read_text()
