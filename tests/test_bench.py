"""The benchmark scripts run end to end on a tiny random Llama (speed is measured by running them, not here)."""

import json

import numpy as np
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
    assert bench_retriever.main(argv + ["--train_only", "--train_batch_size", "256", "--matmul_seconds", "0.01"]) == 0
    suffix = "" if model == "lru" else f"_{model}"
    result = json.loads((tmp_path / "bench" / f"retriever_ml-100k{suffix}_train.json").read_text())
    assert result["retriever_model"] == model and result["torch_threads"] == 1
    # one epoch = every training window once, in batches of 256
    assert result["steps_per_epoch"] == -(-result["train_sequences_per_epoch"] // 256)
    assert result["train_seconds_per_epoch"] > 0 and "export_seconds" not in result
    roofline, rate = result["train_roofline"], result["matmul_gflops_per_s"]["retriever scores"]["fp32"]
    achieved = result["train_flops_per_epoch"] / result["train_seconds_per_epoch"] / 1e9
    assert roofline["gflops_per_s"] == pytest.approx(achieved, rel=0.01, abs=0.1)
    assert roofline["share"] == pytest.approx(achieved / rate, rel=0.02, abs=0.001)


def test_flop_count_is_the_work_asked_for():
    """FLOPs come from torch's counter: a matmul is 2mkn, its backward twice that."""
    import torch

    from bench.roofline import count_flops, share

    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(8, 16)
    assert count_flops(lambda: torch.mm(a, b)) == 2 * 4 * 8 * 16
    assert count_flops(lambda: torch.mm(a, b).sum().backward()) == 2 * (2 * 4 * 8 * 16)  # forward + grad of a
    assert share(2e9, 0.5, 8.0) == {"gflop": 2.0, "gflops_per_s": 4.0, "share": 0.5}


def test_flop_count_includes_the_cpu_attention_kernel():
    """torch's counter does not count the CPU flash attention kernel; ours does, as the work it does: 2(d + d_v)
    FLOPs per (query, key) pair forward, 2(3d + 2d_v) backward; a causal one computes only the pairs its mask keeps
    (query i sees keys 0..i: 1 + 2 + ... + 5 = 15 of 25 here). (With d_v != d torch runs its math kernel, whose
    products torch counts in full.)"""
    import torch
    import torch.nn.functional as F

    from bench.roofline import CPU_ATTENTION_FLOPS, count_flops

    query = torch.randn(2, 3, 5, 4, requires_grad=True)  # batch 2, 3 heads, 5 positions, d 4
    key, value = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    pairs_causal, pairs_all = 2 * 3 * 15, 2 * 3 * 25
    assert count_flops(lambda: F.scaled_dot_product_attention(query, key, value)) == 2 * pairs_all * (4 + 4)
    causal = count_flops(lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True))
    assert causal == 2 * pairs_causal * (4 + 4)
    both = count_flops(lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True).sum().backward())
    assert both == causal + 2 * pairs_causal * (3 * 4 + 2 * 4)
    short = torch.randn(2, 3, 2, 4)  # 2 queries over 5 keys, top-left causal: 1 + 2 pairs per head
    assert count_flops(lambda: F.scaled_dot_product_attention(short, key, value, is_causal=True)) == 2 * 6 * 3 * 8
    # d_v != d, which only the formulas see (given shapes, as the counter passes them): d 4, d_v 6
    backward = CPU_ATTENTION_FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward]
    q, k, v = (2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 6)
    assert backward((2, 3, 5, 6), q, k, v, (2, 3, 5, 6), (2, 3, 5), 0.0, True) == 2 * pairs_causal * (3 * 4 + 2 * 6)


def test_sweep_bench_estimates_what_pruning_saved(tmp_path):
    from bench.bench_sweep import pruning_saving

    trials = [
        {"state": "COMPLETE", "seconds": 100.0},
        {"state": "COMPLETE", "seconds": 200.0},
        {"state": "PRUNED", "seconds": 30.0},
        {"state": "PRUNED", "seconds": 50.0},
        {"state": "FAIL", "seconds": 5.0},  # interrupted and re-queued: its time is in the retry
    ]
    (tmp_path / "summary.json").write_text(json.dumps({"study": "s", "trials": trials}))
    saving = pruning_saving(tmp_path)
    assert saving["mean_complete_trial_s"] == 150.0  # each pruned trial would have run as long as a complete one
    assert saving["trial_s_spent"] == 380.0 and saving["trial_s_estimated_without_pruning"] == 600.0
    assert saving["saved_share"] == round(1 - 380 / 600, 3)


@pytest.mark.parametrize("llm_dtype, weights", [("bf16", "bf16"), ("bf16", "nf4"), ("fp32", "fp32"), ("fp32", "nf4")])
def test_ranker_bench_shares_are_of_the_model_s_own_precision(llm_dtype, weights):
    """Each row's share is of the matmul rate in the precision the model computes in (NF4 computes in its dtype)."""
    import torch

    from bench.bench_ranker import add_shares, machine_roofline

    roofline = machine_roofline(torch.device("cpu"), matmul_seconds=0.01)
    run = {"llm_dtype": llm_dtype, "weights": weights}
    run["rows"] = [{"what": "eval batch 1", "users_per_s": 2.0, "flops": 4e9, "seconds": 2.0}]
    rate = add_shares(run, roofline)
    expected_rate = roofline["matmul_gflops_per_s"]["LLM projection"][llm_dtype]
    row = run["rows"][0]
    assert rate["gflops_per_s"] == expected_rate
    assert row["gflops_per_s"] == 2.0 and row["share"] == round(2.0 / expected_rate, 3)
    assert row["share_of_2048"] == round(2.0 / roofline["matmul_gflops_per_s"]["2048^3"][llm_dtype], 3)


def test_ranker_bench_compares_the_two_dtypes_row_by_row():
    from bench.bench_ranker import speedups

    bf16 = {"llm_dtype": "bf16", "rows": [{"what": "eval batch 1", "users_per_s": 1.0},
                                          {"what": "train batch 1", "s_per_sample": 3.0},
                                          {"what": "projections alone", "ms_per_prompt": 100.0}]}  # fmt: skip
    fp32 = {"llm_dtype": "fp32", "rows": [{"what": "eval batch 1", "users_per_s": 2.5},
                                          {"what": "train batch 1", "s_per_sample": 1.5},
                                          {"what": "projections alone", "ms_per_prompt": 200.0}]}  # fmt: skip
    assert speedups([bf16, fp32]) == [
        {"what": "eval batch 1", "fp32_speedup": 2.5},
        {"what": "train batch 1", "fp32_speedup": 2.0},
        {"what": "projections alone", "fp32_speedup": 0.5},
    ]
    assert speedups([bf16]) == []  # one dtype timed: nothing to compare


def test_ranker_bench_projections_row_counts_every_projection_but_the_head():
    """The "projections alone" row runs each linear layer of the model once on a prompt-length input: its FLOPs are
    2 x length x in x out summed over them, and the LM head (49k-32k wide, not run by an evaluation's forward over the
    prompt) is left out."""
    import torch

    from bench.bench_ranker import bench_projections
    from tests.conftest import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    config = model.config
    hidden, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3  # q, o; k, v; gate, up, down
    row = bench_projections(model, length=7, device=torch.device("cpu"), repeats=2)
    assert row["what"] == "projections alone"
    assert row["flops"] == 2 * 7 * per_layer * config.num_hidden_layers
    assert row["seconds"] > 0 and row["ms_per_prompt"] == row["seconds"] * 1e3


def test_synthetic_data_has_the_promised_shape(tmp_path):
    import pandas as pd

    from bench.synthetic import shape_of, write_synthetic

    assert shape_of(1_000_000) == (6667, 3500) and shape_of(20_000_000)[1] == 28_496  # ML-1M / ML-20M-like items
    shape = write_synthetic(tmp_path, 30_000, seed=1)
    df = pd.read_csv(tmp_path / "interactions.csv")
    items = pd.read_csv(tmp_path / "items.csv")
    assert len(df) == shape["interactions"] and abs(len(df) - 30_000) < 1500  # about the size asked for
    lengths = df.groupby("user_id").size()
    assert lengths.min() >= 20 and lengths.max() > 4 * lengths.median()  # at least 20 items, a long tail
    assert not df.duplicated(["user_id", "item_id"]).any()  # distinct items per user
    assert (df.groupby("user_id")["timestamp"].diff().dropna() > 0).all()  # increasing times within a user
    counts = df["item_id"].value_counts()
    assert counts.index[0] == 1 and counts.iloc[0] > 10 * counts.median()  # Zipf: item 1 the most popular, by far
    assert set(df["item_id"]) <= set(items["item_id"]) and items["title"].str.len().min() > 10
    assert write_synthetic(tmp_path / "again", 30_000, seed=1) == shape
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "again" / "interactions.csv").to_numpy(), df.to_numpy())


def test_scale_slopes_are_log_log_against_interactions_and_work():
    from bench.bench_scale import STAGES, slopes

    def size(label, interactions, seconds, work):
        stage = {"seconds": seconds, "peak_rss_mib": 100.0, "work": work, "unit": "u"}
        return {"label": label, "shape": {"interactions": interactions}, **{name: dict(stage) for name in STAGES}}

    rows = slopes([size("1M", 1e6, 2.0, 10.0), size("10M", 1e7, 20.0, 100.0), size("100M", 1e8, 400.0, 100.0)])
    assert len(rows) == 2 * len(STAGES)
    first, second = rows[0], rows[len(STAGES)]
    assert first["slope_vs_interactions"] == pytest.approx(1.0) and first["slope_vs_work"] == pytest.approx(1.0)
    assert second["slope_vs_interactions"] == pytest.approx(np.log10(20)) and second["slope_vs_work"] is None
    assert first["rss_slope_vs_interactions"] == pytest.approx(0.0)


def test_scale_bench_runs_every_stage_on_tiny_data(tmp_path):
    from bench.bench_scale import STAGES, main

    out = tmp_path / "scale.json"
    argv = ["--sizes", "8000", "16000", "--bench_steps", "2", "--recommend_users", "7", "--num_threads", "1"]
    assert (
        main(argv + ["--data_dir", str(tmp_path / "data"), "--work_dir", str(tmp_path / "work"), "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert [size["label"] for size in result["sizes"]] == ["0.008M", "0.016M"]
    for size in result["sizes"]:
        for stage in STAGES:
            assert size[stage]["seconds"] > 0 and size[stage]["peak_rss_mib"] > 50, stage
        prefixes = size["export_train_prefixes"]
        assert prefixes["prefixes"] == prefixes["prefixes_total"] > 0  # below the default cap: every prefix
        assert size["ranker_prompts"]["uniform_train"] == prefixes["prefixes_total"]
        assert len((tmp_path / "work" / size["label"] / "recommendations.jsonl").read_text().splitlines()) == 7
    assert len(result["slopes"]) == len(STAGES)
