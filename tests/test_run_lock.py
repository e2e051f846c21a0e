"""One writer per run folder, with real processes: a second train_retriever.py or train_ranker.py on a running run,
two --eval_only at once and a hand --resume of a sweep's trial are refused before they touch anything; a run killed
with SIGKILL is resumed at once; a lock naming another machine is taken over only with --take_over.

To hold a lock deterministically, the first process is started, the test waits until its lock file names its pid,
then freezes it (SIGSTOP): whatever changes in the folder after that is the second process's doing."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from config import RANKER, RETRIEVER, parse_flags
from tests.conftest import run_dir_of, write_custom_dataset
from tests.test_ranker import tokenizer, write_tiny_project  # noqa: F401 (tokenizer is a fixture)
from train_retriever import main
from trainer.run_lock import BUSY, LOCKED, NO_LOCKS, STALE_SECONDS, Holder, check_holder, lock_path, run_lock
from utils.errors import InputError
from utils.files import REPO_ROOT

# trains until stopped: no step, epoch or early-stopping limit is reached within a test
ENDLESS = ["--max_steps", "1000000", "--num_epochs", "1000000", "--early_stopping_patience", "1000000"]
ENDLESS += ["--val_iterations", "20", "--num_threads", "1"]
RANKER_CAPS = ["--lora_max_steps", "4", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2"]
RANKER_CAPS += ["--llm_max_history", "5", "--llm_max_eval_users", "6", "--num_threads", "1"]
RANKER_CAPS += ["--lora_warmup_steps", "1", "--llm_max_train_samples", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(script: str, argv: list, log: Path) -> subprocess.Popen:
    """A script in its own process, its output in `log` (a pipe nobody reads could fill and stall it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)  # fmt: skip


def run_script(script: str, argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=ENV, timeout=300)  # fmt: skip


def wait_for_holder(run_dir: Path, pid: int | None = None, *files: Path, timeout: float = 180) -> Holder:
    """The holder in run_dir's lock file, once it is process `pid` (any process: None) and `files` exist."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            holder = Holder(**json.loads(lock_path(run_dir).read_text()))
        except (OSError, ValueError, TypeError):  # not there yet, or caught half written
            holder = None
        if holder is not None and pid in (None, holder.pid) and all(path.exists() for path in files):
            return holder
        time.sleep(0.05)
    raise AssertionError(f"no process took the lock of {run_dir} within {timeout} s")


def files_of(folder: Path) -> dict:
    """Every file under `folder` (the run folders and their lock files) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(run_dir: Path, holder: Holder) -> str:
    return (
        f"error: {run_dir}: another process is writing this run folder ({holder.text()}); nothing was touched: "
        f"wait for it to end, or stop it (kill {holder.pid}), then rerun"
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_retriever_on_a_running_run_is_refused_and_changes_nothing(tmp_path, tiny_args):
    args, run = tiny_args + ENDLESS, run_dir_of(tmp_path)
    first = start("train_retriever.py", args, tmp_path / "first.log")
    try:
        holder = wait_for_holder(run, first.pid, run / "checkpoint_last.pt")
        assert (holder.command, holder.host) == ("train_retriever.py", socket.gethostname())
        first.send_signal(signal.SIGSTOP)
        before = files_of(run.parent)
        for mode in ("--resume", "--overwrite"):  # --overwrite's delete, too, waits for the lock
            second = run_script("train_retriever.py", args + [mode])
            assert second.returncode == 2
            assert error_lines(second.stderr) == [refusal(run, holder)] and "Traceback" not in second.stderr
        assert files_of(run.parent) == before
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGINT)  # Ctrl-C: the lock goes with the process, its file too
        assert first.wait(timeout=120) == 130
    finally:
        stop(first)
    assert [p.name for p in run.parent.iterdir()] == ["seed42"]


def test_a_run_killed_with_sigkill_is_resumed_at_once(tmp_path, tiny_args):
    run = run_dir_of(tmp_path)
    first = start("train_retriever.py", tiny_args + ENDLESS, tmp_path / "first.log")
    try:
        holder = wait_for_holder(run, first.pid, run / "checkpoint_last.pt")
    finally:
        stop(first)  # SIGKILL: no clean exit, the lock file stays behind
    assert lock_path(run).is_file()
    step = torch.load(run / "checkpoint_last.pt", weights_only=True)["state"]["step"]
    resumed = run_script("train_retriever.py", tiny_args + ENDLESS + ["--resume", "--max_steps", step + 20])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"note: {run}: its last writer ({holder.text()}) ended without a clean exit (pid {holder.pid} is not "
        "running); taking the run over\n"
    ) in resumed.stderr
    summary = json.loads((run / "training_summary.json").read_text())
    assert summary["sessions"] == 2 and summary["steps"] == step + 20
    assert [p.name for p in run.parent.iterdir()] == ["seed42"]  # its lock file gone with it


def test_a_second_ranker_and_a_second_eval_only_are_refused(tmp_path, tokenizer):  # noqa: F811
    flags = write_tiny_project(tmp_path, tokenizer) + RANKER_CAPS
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    first = start("train_ranker.py", flags, tmp_path / "first.log")
    try:
        holder = wait_for_holder(run, first.pid)
        first.send_signal(signal.SIGSTOP)  # from here on, the training process writes nothing
        before = files_of(run.parent)
        second = run_script("train_ranker.py", flags + ["--resume"])
        assert second.returncode == 2 and error_lines(second.stderr) == [refusal(run, holder)]
        assert files_of(run.parent) == before
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        stop(first)
    # two --eval_only at once: the second is refused, and eval/ is the first one's alone
    first = start("train_ranker.py", flags + ["--eval_only"], tmp_path / "eval.log")
    try:
        holder = wait_for_holder(run, first.pid)
        first.send_signal(signal.SIGSTOP)
        before = files_of(run.parent)
        second = run_script("train_ranker.py", flags + ["--eval_only"])
        assert second.returncode == 2 and error_lines(second.stderr) == [refusal(run, holder)]
        assert files_of(run.parent) == before and not (run / "eval").exists()
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "eval.log").read_text()[-2000:]
    finally:
        stop(first)
    assert (run / "eval" / "test_metrics.json").is_file() and [p.name for p in run.parent.iterdir()] == ["seed42"]


def test_a_torchrun_launch_on_a_held_run_is_refused_by_every_rank(tmp_path, tokenizer):  # noqa: F811
    """Rank 0 alone takes the lock (its other ranks write nothing); when it is refused, every rank exits with its
    error at once, none is left waiting at a barrier or aborted."""
    flags = write_tiny_project(tmp_path, tokenizer) + RANKER_CAPS
    run = tmp_path / "experiments" / "ranker" / "custom-data" / "seed42"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with run_lock(run):  # held by this test's own process
        holder = Holder(**json.loads(lock_path(run).read_text()))
        launch = subprocess.run(command + ["train_ranker.py", *map(str, flags)], cwd=REPO_ROOT, capture_output=True,
                                text=True, env=ENV, timeout=300)  # fmt: skip
    assert error_lines(launch.stderr) == [refusal(run, holder)] * 2  # one line per process, as for every error
    assert "exitcode  : 2" in launch.stderr and "SIGABRT" not in launch.stderr
    assert not (tmp_path / "experiments" / "ranker").exists()  # nothing left: no folder, no lock file


def test_a_sweep_and_a_hand_resume_cannot_both_write_a_trial(tmp_path):
    data = write_custom_dataset(tmp_path / "tiny")
    command = [
        "sweep.py", "train_retriever.py", "--study", "w", "--space", "bert_dropout=float:0.0:0.4", "--trials", "1",
        "--threads_per_worker", "1", "--heartbeat_seconds", "1", "--", "--dataset_code", "custom", "--custom_path",
        data, "--data_root", tmp_path / "data", "--experiment_root", tmp_path / "exp", "--bert_max_len", "5",
        "--train_batch_size", "4", "--retrieved_topk", "6", "--retrieved_train_topk", "0", *ENDLESS[:-2],
    ]  # fmt: skip
    trial = run_dir_of(tmp_path, "w_trial0")
    hand = ["--config", trial / "config.json", "--resume"]  # the trial's own flags
    # the sweep's trial runs: a hand --resume of its folder is refused
    sweeping = start(command[0], command[1:], tmp_path / "sweep.log")
    try:
        holder = wait_for_holder(trial, None, trial / "checkpoint_last.pt")
        os.kill(holder.pid, signal.SIGSTOP)
        before = files_of(trial.parent)
        refused = run_script("train_retriever.py", hand)
        assert refused.returncode == 2 and error_lines(refused.stderr) == [refusal(trial, holder)]
        assert files_of(trial.parent) == before
        os.kill(holder.pid, signal.SIGCONT)
        sweeping.send_signal(signal.SIGINT)  # Ctrl-C: the trial is re-queued, to be resumed by the next start
        assert sweeping.wait(timeout=120) == 130
    finally:
        stop(sweeping)
    # a hand --resume runs: the restarted sweep's trial is refused, and fails naming the holder
    by_hand = start("train_retriever.py", hand, tmp_path / "hand.log")
    try:
        holder = wait_for_holder(trial, by_hand.pid)
        by_hand.send_signal(signal.SIGSTOP)
        before = files_of(trial.parent)
        again = run_script(command[0], command[1:])
        assert again.returncode == 2 and "no trial completed" in again.stderr
        assert files_of(trial.parent) == before
    finally:
        stop(by_hand)
    storage = f"sqlite:///{tmp_path / 'exp' / 'sweeps' / 'w' / 'study.db'}"
    error = optuna.load_study(study_name="w", storage=storage).get_trials()[-1].user_attrs["error"]
    assert error.startswith("exit code 2 (") and f"(kill {holder.pid}), then rerun); see " in error
    assert ": another process is writing this run folder (train_retriever.py, host " in error


def test_a_lock_naming_another_machine_is_taken_over_only_with_take_over(tmp_path, tiny_args, capsys):
    """What a network file system that does not share flocks between machines leaves: the kernel grants the lock,
    but the file names a writer elsewhere, whose pid cannot be checked from here."""
    run = run_dir_of(tmp_path)
    assert main(tiny_args + ["--max_steps", "2"]) == 0
    stale = time.time() - STALE_SECONDS - 60
    record = {"host": "node7", "pid": 4242, "command": "train_retriever.py", "started": stale, "heartbeat": stale}
    lock_path(run).write_text(json.dumps(record))
    capsys.readouterr()
    assert main(tiny_args + ["--max_steps", "4", "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {run}: its last writer, on another machine (train_retriever.py, host node7, pid ")
    assert error.endswith("if it is gone, pass --take_over to take the run over\n") and error.count("\n") == 1
    assert json.loads(lock_path(run).read_text()) == record  # a refused process leaves the record as it was
    assert main(tiny_args + ["--max_steps", "4", "--resume", "--take_over"]) == 0
    assert (
        f"note: {run}: --take_over: taking the run over from (train_retriever.py, host node7" in capsys.readouterr().err
    )
    assert json.loads((run / "training_summary.json").read_text())["steps"] == 4
    assert not lock_path(run).exists()


def test_a_refused_run_leaves_no_lock_and_no_folder(tmp_path, tiny_args, capsys):
    assert main(tiny_args + ["--resume"]) == 2
    assert "--resume: no run folder to resume" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def holder_on(host: str, heartbeat_age: float) -> Holder:
    now = time.time()
    return Holder(host, 4242, "train_ranker.py", now - 3600, now - heartbeat_age)


@pytest.mark.parametrize(
    "state, age, take_over, expected",
    [
        (BUSY, 10, False, "a process on another machine is writing this run folder .* stop it on node7, then rerun$"),
        (BUSY, 10, True, "a process on another machine is writing this run folder"),  # alive by both signs
        (BUSY, STALE_SECONDS + 1, False, "holds this run folder's lock .* stopped its heartbeat; .* pass --take_over"),
        (LOCKED, 10, False, "last heartbeat 10 s ago\\); this file system may not share .* pass --take_over"),
        (NO_LOCKS, 10, False, "may not share file locks between machines"),
        (LOCKED, STALE_SECONDS + 1, False, "stopped its heartbeat without a clean exit; .* pass --take_over"),
    ],
)
def test_a_writer_on_another_machine_is_never_taken_over_unasked(tmp_path, state, age, take_over, expected):
    holder = holder_on("node7", age)
    with pytest.raises(InputError, match=expected):
        check_holder(tmp_path / "run", state, holder, take_over, time.time())


def test_take_over_and_the_pid_check_on_this_machine(tmp_path):
    note = check_holder(tmp_path / "run", LOCKED, holder_on("node7", 5), True, time.time())
    assert note.startswith(f"note: {tmp_path / 'run'}: --take_over: taking the run over from (train_ranker.py, host")
    assert check_holder(tmp_path / "run", LOCKED, None, False, time.time()) is None
    # a file system without flock: on this machine the recorded pid answers
    alive = Holder(socket.gethostname(), os.getpid(), "train_ranker.py", time.time(), time.time())
    with pytest.raises(InputError, match=f"stop it \\(kill {os.getpid()}\\)"):
        check_holder(tmp_path / "run", NO_LOCKS, alive, True, time.time())  # --take_over never overrides a live one
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = Holder(socket.gethostname(), int(ended.stdout), "train_ranker.py", time.time(), time.time())
    assert "ended without a clean exit" in check_holder(tmp_path / "run", NO_LOCKS, gone, False, time.time())
    # the lock still held after its writer ended: a process it forked (a data-loading worker) shares the lock
    with pytest.raises(InputError, match="has ended, but a process it started still holds the run folder's lock"):
        check_holder(tmp_path / "run", BUSY, gone, False, time.time())


def test_take_over_is_taken_from_the_command_line_only(tmp_path):
    """Like --resume and --overwrite, an action: a run's config.json (rerun with --config) never takes a run over."""
    (tmp_path / "config.json").write_text(json.dumps({"dataset_code": "ml-100k", "take_over": True}))
    assert not parse_flags(RETRIEVER, ["--config", str(tmp_path / "config.json")]).take_over
    assert parse_flags(RANKER, ["--dataset_code", "ml-100k", "--take_over"]).take_over
