"""The benchmark scripts run end to end on a tiny random Llama (speed is measured by running them, not here)."""

import json

import pytest


@pytest.fixture
def restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_capacity_check_reports_and_projects(tmp_path, restore_threads):
    from bench import bench_capacity

    out = tmp_path / "capacity.json"
    argv = ["--random_init", "tiny", "--micro_batch_size", "2", "--eval_batch_sizes", "1", "2", "--prompt_tokens"]
    argv += ["24", "--steps", "3", "--num_threads", "1", "--epoch_prompts", "1000", "--output", str(out)]
    assert bench_capacity.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["gradient_checkpointing"] == "off"  # auto on a CPU
    assert len(result["train_step_seconds"]) == 3 and result["train_s_per_sample"] > 0
    assert result["projected_epoch_hours"] == pytest.approx(1000 * result["train_s_per_sample"] / 3600, abs=0.01)
    assert result["eval_users_per_s_batch_1"] > 0 and result["eval_users_per_s_batch_2"] > 0


def test_generation_bench_generates_the_whole_list(tmp_path, restore_threads):
    from bench import bench_generation

    out = tmp_path / "generation.json"
    argv = ["--random_init", "tiny", "--title_lengths", "2", "4", "--repeats", "1", "--num_threads", "1"]
    assert bench_generation.main(argv + ["--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["generated_tokens"] for row in rows] == [40, 80]  # 20 titles x L tokens, checked inside
    assert [row["prompt_tokens"] for row in rows] == [140, 220]
    for row in rows:
        assert row["ratio"] == pytest.approx(row["generation_s"] / row["verbalizer_s"], rel=0.05)


@pytest.mark.parametrize("model", ["lru", "sasrec", "bert4rec", "narm"])
def test_retriever_bench_times_each_model(tmp_path, restore_threads, model):
    from bench import bench_retriever

    argv = ["--dataset_code", "ml-100k", "--data_root", str(tmp_path / "data"), "--experiment_root", str(tmp_path)]
    argv += ["--retriever_model", model, "--bert_max_len", "20", "--bert_hidden_units", "16", "--num_threads", "1"]
    assert bench_retriever.main(argv + ["--train_only", "--train_batch_size", "256"]) == 0
    suffix = "" if model == "lru" else f"_{model}"
    result = json.loads((tmp_path / "bench" / f"retriever_ml-100k{suffix}_train.json").read_text())
    assert result["retriever_model"] == model and result["torch_threads"] == 1
    # one epoch = every training window once, in batches of 256
    assert result["steps_per_epoch"] == -(-result["train_sequences_per_epoch"] // 256)
    assert result["train_seconds_per_epoch"] > 0 and "export_seconds" not in result
