"""--overwrite deletes nothing but a run folder of its own stage, and --run_name is one plain folder name, so no flag
value can aim the deletion at a user's files, at every run of a dataset, or outside experiments/."""

import errno
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_ranker
from config import RANKER, RETRIEVER, parse_flags
from tests.conftest import run_dir_of
from train_retriever import main
from trainer.run_folder import check_run_name, prepare_run_dir, run_stage_of
from utils.errors import InputError, describe_os_error
from utils.files import REPO_ROOT

NOT_ONE_FOLDER = [".", "..", "../..", "a/b", "a\\b", "/", "/some/absolute/folder", "", " seed42", "x\0y"]


@pytest.mark.parametrize("name", NOT_ONE_FOLDER)
@pytest.mark.parametrize("script", [RETRIEVER, RANKER])
def test_run_name_is_one_plain_folder_name(script, name):
    with pytest.raises(InputError, match=r"^--run_name: expected one plain folder name .* found "):
        parse_flags(script, ["--dataset_code", "ml-100k", "--run_name", name])


@pytest.mark.parametrize("name", ["seed42", "my run", "a.b", "..hidden", "run-2_x"])
def test_plain_run_names_pass(name):
    check_run_name(name)
    assert parse_flags(RETRIEVER, ["--dataset_code", "ml-100k", "--run_name", name]).run_name == name


def test_overwrite_and_resume_refuse_a_folder_that_is_not_a_run(tmp_path, tiny_args, capsys):
    mine = run_dir_of(tmp_path, "mine")
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("my thesis")
    for mode in ("--overwrite", "--resume"):
        assert main(tiny_args + ["--run_name", "mine", mode]) == 2
        err = capsys.readouterr().err  # refused before the data is read: the error is the only line
        assert err.startswith(f"error: {mine}: expected a retriever run folder, found a folder that is not a retriever")
        assert err.count("\n") == 1 and "nothing was touched" in err
        assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "my thesis"
    # an unreadable config.json does not make a folder ours either
    (mine / "config.json").write_text("{not json")
    assert main(tiny_args + ["--run_name", "mine", "--overwrite"]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "thesis.tex"]


def test_overwrite_refuses_the_other_stage_s_run_and_a_link(tmp_path, tiny_args, capsys):
    experiments = tmp_path / "exp"
    ranker_run = run_dir_of(tmp_path, "r")  # a ranker's config.json in a retriever folder
    ranker_run.mkdir(parents=True)
    (ranker_run / "config.json").write_text(json.dumps({"llm_base_model": "smollm2-135m", "seed": 42}))
    assert main(tiny_args + ["--run_name", "r", "--overwrite"]) == 2
    assert "found a ranker run folder" in capsys.readouterr().err and (ranker_run / "config.json").is_file()
    # a link named like a run: neither the link nor the folder it points at is deleted
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.csv").write_text("keep")
    run_dir_of(tmp_path, "link").symlink_to(target, target_is_directory=True)
    assert main(tiny_args + ["--run_name", "link", "--overwrite"]) == 2
    assert "found a symbolic link" in capsys.readouterr().err
    assert (target / "data.csv").read_text() == "keep" and run_dir_of(tmp_path, "link").is_symlink()
    # an absolute path never reaches the file system: refused as a name, the folder untouched
    assert main(tiny_args + ["--run_name", str(target), "--overwrite"]) == 2
    assert "--run_name: expected one plain folder name" in capsys.readouterr().err
    assert (target / "data.csv").read_text() == "keep"
    # the ranker checks its folder the same way, before anything slow
    folder = experiments / "ranker" / "custom-tiny" / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    ranker_flags = tiny_args[:6] + ["--experiment_root", str(experiments), "--run_name", "mine", "--overwrite"]
    assert train_ranker.main(ranker_flags) == 2
    assert f"error: {folder}: expected a ranker run folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_run_folder_of_its_stage(tmp_path, tiny_args):
    run = run_dir_of(tmp_path, "real")
    assert main(tiny_args + ["--run_name", "real", "--max_steps", "2"]) == 0
    assert run_stage_of(run) == "retriever"
    (run / "stale.txt").write_text("from the first run")
    assert main(tiny_args + ["--run_name", "real", "--max_steps", "2", "--overwrite"]) == 0
    assert not (run / "stale.txt").exists() and (run / "test_metrics.json").is_file()


def test_prepare_run_dir_stage_check(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"bert_max_len": 50, "llm_base_model": "x"}))  # both: neither stage
    assert run_stage_of(run) is None
    with pytest.raises(InputError, match="found a folder that is not a ranker run"):
        prepare_run_dir(run, "ranker", resume=False, overwrite=True)
    (run / "config.json").write_text(json.dumps({"llm_base_model": "x"}))
    prepare_run_dir(run, "ranker", resume=False, overwrite=True)  # ours: deleted and created anew, empty
    assert run.is_dir() and not any(run.iterdir())
    # an empty folder is no run to protect and no run to resume
    with pytest.raises(InputError, match="--resume: no run folder to resume"):
        prepare_run_dir(run, "ranker", resume=True, overwrite=False)


def run_with_file_size_limit(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    """A script in a process whose writes fail past `limit` bytes per file (a real OSError from the kernel, EFBIG:
    what a full disk does to a write, without filling one)."""

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, preexec_fn=limit_writes, capture_output=True, text=True, timeout=300
    )


def test_a_failed_write_is_one_error_line_and_leaves_no_partial_file(tmp_path, tiny_args):
    # the checkpoints (~21-32 KB) cross the limit; config.json and the validation log do not
    result = run_with_file_size_limit(["train_retriever.py", *tiny_args, "--num_threads", "1"], 30_000)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith(f"error: could not write {run_dir_of(tmp_path)}/checkpoint_")
    assert errors[0].endswith("(nothing was left half written)")
    files = list(run_dir_of(tmp_path).iterdir())
    assert not [f for f in files if f.name.endswith(".tmp")]
    for path in files:  # whatever was written is whole
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text())


def test_os_errors_read_as_one_line_with_the_path_and_the_fix():
    full = OSError(errno.ENOSPC, "No space left on device")
    assert describe_os_error(full, Path("exp/x.json")) == (
        "exp/x.json: No space left on device; free space on that disk (or pass another output path) and rerun"
    )
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/ratings.csv")
    assert describe_os_error(denied).startswith("/data/ratings.csv: Permission denied; check the permissions")
    assert describe_os_error(OSError("a library's\nmessage")) == "a library's message"  # no path, no errno: one line
