"""Several processes: a 2-process torchrun ranker run on CPU (gloo) with the tiny Llama-2, its resume, and the
pieces it relies on (device placement, sharding, the global batch)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train_ranker
from config import default_config
from tests.test_ranker import tokenizer, write_tiny_project  # noqa: F401 (tokenizer is a fixture)
from trainer.ranker_train import RankerTraining, accumulation_steps
from trainer.runtime import device_for, shard
from utils.errors import InputError
from utils.files import REPO_ROOT

CAPS = ["--lora_max_steps", "4", "--lora_val_iterations", "2", "--lora_micro_batch_size", "2", "--llm_max_history"]
CAPS += ["5", "--llm_max_eval_users", "6", "--num_threads", "1", "--lora_warmup_steps", "1"]
CAPS += ["--llm_max_train_samples", "16"]


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a free port, so runs never collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += ["train_ranker.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def flat(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif not prefix.startswith("timing"):
            out[prefix + key] = value
    return out


def test_two_process_run_ranks_each_user_once_and_matches_one_process(tmp_path, tokenizer, capsys):  # noqa: F811
    flags = write_tiny_project(tmp_path, tokenizer)
    result = torchrun(flags + CAPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("global batch: 2 process(es) x micro-batch 2 x accumulation 1 = 4") == 1
    runs = list((tmp_path / "experiments" / "ranker").glob("*/*"))
    assert [run.name for run in runs] == ["seed42"]  # one run folder, written by rank 0 alone
    run = runs[0]
    assert json.loads((run / "config.json").read_text())["processes"] == 2
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["timing"]["train_steps"] == 4 and metrics["timing"]["train_samples_seen"] == 16
    # one validation line per validation (not one per process) and every test user ranked once
    assert [json.loads(line)["step"] for line in (run / "val_history.jsonl").read_text().splitlines()] == [2, 4]
    users = [json.loads(line)["user"] for line in (run / "test_rankings.jsonl").read_text().splitlines()]
    assert len(users) == len(set(users)) == metrics["users_subset"]
    assert {p.name for p in (run / "checkpoints" / "checkpoint-4").glob("rng_state_*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    # the saved adapter evaluated by one process gives the same metrics
    threads = torch.get_num_threads()
    assert train_ranker.main(flags + CAPS + ["--eval_only"]) == 0
    torch.set_num_threads(threads)
    single = flat(json.loads((run / "eval" / "test_metrics.json").read_text()))
    for key, value in flat(metrics).items():
        if isinstance(value, float):
            assert single[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert single[key] == value, key

    # an interrupted 2-process run resumes with 2 processes (and refuses another count)
    for path in (run / "adapter", run / "checkpoints" / "checkpoint-4", run / "test_metrics.json", run / "eval"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    assert train_ranker.main(flags + CAPS + ["--resume"]) == 2
    assert "launched processes 2 -> 1" in capsys.readouterr().err
    result = torchrun(flags + CAPS + ["--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing from" in result.stdout
    resumed = json.loads((run / "test_metrics.json").read_text())
    assert resumed["subset"] == metrics["subset"] and resumed["timing"]["train_steps"] == 4


def test_device_for_maps_local_rank_to_its_gpu():
    assert device_for("cuda", 3, 4) == torch.device("cuda", 3)
    assert device_for("auto", 1, 2) == torch.device("cuda", 1)
    assert device_for("auto", 1, 0) == torch.device("cpu")
    assert device_for("cpu", 5, 8) == torch.device("cpu")
    with pytest.raises(InputError, match="LOCAL_RANK 2"):
        device_for("cuda", 2, 2)
    with pytest.raises(InputError, match="no CUDA device"):
        device_for("cuda", 0, 0)


def test_shards_cover_every_index_once():
    for count, processes in ((0, 2), (7, 1), (7, 3), (2, 4)):
        parts = [shard(count, rank, processes) for rank in range(processes)]
        assert sorted(i for part in parts for i in part) == list(range(count))


def test_global_batch_sets_the_accumulation():
    training = default_config(RankerTraining, global_batch_size=128, micro_batch_size=16, gradient_accumulation_steps=1)
    assert [accumulation_steps(training, processes) for processes in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(InputError, match="multiple of --lora_micro_batch_size x processes = 16 x 3 = 48"):
        accumulation_steps(training, 3)
    training = default_config(RankerTraining, micro_batch_size=16, gradient_accumulation_steps=3)
    assert accumulation_steps(training, 4) == 3  # without it, --lora_gradient_accumulation_steps as given
