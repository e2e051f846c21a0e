"""What both training stages share (trainer/run_state.py): the validation history, the clock over sessions and the
training summary; and the retriever's typed training state as checkpoint_last.pt stores it."""

import json
import math
import time

import pytest
import torch

from tests.conftest import run_dir_of, tiny_llama
from trainer.ranker_train import RankerTrainer
from trainer.retriever_train import RetrieverState, update_best
from trainer.run_state import (
    Clock,
    SessionClock,
    append_validation,
    clock_summary,
    peak_rss_mib,
    read_history,
    read_summary,
    truncate_history,
    write_summary,
)

# checkpoint_last.pt's "state" as the code before RetrieverState wrote it (a dict built by initial_state())
OLD_STATE_KEYS = [
    "step", "epoch", "batch", "best_value", "best_step", "patience", "done", "loss_sum", "loss_count", "train_loss",
    "train_seconds", "validation_seconds", "sessions",
]  # fmt: skip


def test_history_appends_and_reads_back_skipping_a_cut_line(tmp_path):
    path = tmp_path / "val_history.jsonl"
    assert read_history(path) == []
    append_validation(path, {"step": 2, "NDCG@10": 0.1})
    append_validation(path, {"step": 4, "NDCG@10": 0.2})
    with open(path, "a") as f:
        f.write('{"step": 6, "ND')  # the line being written when the run was killed
    assert read_history(path) == [{"step": 2, "NDCG@10": 0.1}, {"step": 4, "NDCG@10": 0.2}]


def test_truncate_keeps_the_checkpoint_steps_line_byte_for_byte_and_drops_later_ones(tmp_path):
    path = tmp_path / "val_history.jsonl"
    lines = ['{"step": 2, "x": 0.30000000000000004}\n', '{"step":4,"x":1e-7}\n', '{"step": 5}\n', '{"step": 6}\n']
    path.write_text("".join(lines) + '{"step": 7, "x')
    truncate_history(path, 4)  # resumed from the checkpoint of step 4
    assert path.read_text() == lines[0] + lines[1]  # step 4 stays (it was validated before its checkpoint)
    truncate_history(path, 1)
    assert path.read_text() == ""
    truncate_history(tmp_path / "absent.jsonl", 3)  # a run resumed before its first validation
    assert not (tmp_path / "absent.jsonl").exists()


def test_the_session_clock_continues_the_sessions_before_it():
    clock = SessionClock(Clock(seconds=100.0, validation_seconds=30.0, sessions=2))
    time.sleep(0.02)
    clock.add_validation(1.5)
    clock.add_validation(0.5)
    now = clock.elapsed()
    assert 100.02 <= now.seconds < 105  # not restarted at 0 on resume
    assert now.validation_seconds == pytest.approx(32.0) and now.sessions == 3
    fresh = SessionClock().elapsed()
    assert fresh.sessions == 1 and 0 <= fresh.seconds < 5 and fresh.validation_seconds == 0


def test_the_summary_has_the_clocks_time_and_sessions_and_is_kept(tmp_path):
    fields = clock_summary(Clock(seconds=12.3456, validation_seconds=1.234, sessions=3))
    assert fields == {"train_seconds_incl_validation": 12.35, "validation_seconds": 1.23, "sessions": 3}
    assert read_summary(tmp_path) is None
    write_summary(tmp_path, {"steps": 8, **fields})
    assert read_summary(tmp_path) == {"steps": 8, **fields}
    assert json.loads((tmp_path / "training_summary.json").read_text())["sessions"] == 3


def test_retriever_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    state = RetrieverState(step=7, epoch=2, batch=1, best_value=0.25, best_step=6, patience=1, loss_sum=3.5,
                           loss_count=1, train_loss=2.0, train_seconds=9.5, validation_seconds=1.25, sessions=2)  # fmt: skip
    assert list(state.to_dict()) == [*OLD_STATE_KEYS, "peak_rss_mib"]  # older checkpoints' keys come first, in order
    torch.save({"state": state.to_dict()}, tmp_path / "last.pt")
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)["state"]
    assert RetrieverState.from_dict(loaded) == state
    assert RetrieverState().best_value == -math.inf and RetrieverState().best_step is None


def test_peak_memory_is_this_process_high_water_mark_in_mib():
    before = peak_rss_mib()
    block = bytearray(300 * 2**20)  # touched: resident
    block[::4096] = b"x" * len(block[::4096])
    assert peak_rss_mib() >= before and peak_rss_mib() >= 300
    del block


def test_a_checkpoint_state_from_before_the_summary_fields_loads_with_their_defaults():
    old = {"step": 5, "epoch": 1, "batch": 2, "best_value": 0.5, "best_step": 4, "patience": 0, "done": False,
           "loss_sum": 1.0, "loss_count": 1}  # fmt: skip
    state = RetrieverState.from_dict(old)
    assert (state.step, state.batch, state.best_step) == (5, 2, 4)
    assert (state.train_seconds, state.sessions, state.train_loss) == (0.0, 0, None)
    assert state.clock() == Clock(0.0, 0.0, 0)


def test_update_best_counts_stale_validations_and_resets_on_a_better_one():
    state = RetrieverState(step=2)
    assert update_best(state, 0.1) and (state.best_value, state.best_step, state.patience) == (0.1, 2, 0)
    state.step = 4
    assert not update_best(state, 0.1)  # equal is not better: the earlier model stays
    assert (state.best_step, state.patience) == (2, 1)
    state.step = 6
    assert update_best(state, 0.2) and (state.best_step, state.patience) == (6, 0)


def test_ranker_clock_continues_a_checkpoints_training_clock(tmp_path):
    """RankerTrainer.resume_clock with a training_clock.json of an older run (no loss total), then a newer one."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = RankerTrainer(
        model=tiny_llama(), args=args, val_examples=[], letter_ids=torch.tensor([29909]), pad_id=0,
        eval_batch_size=1, ks=[10], history_path=tmp_path / "val_history.jsonl",
    )  # fmt: skip
    trainer.session_loss_sum, trainer.session_loss_count = 3.0, 2  # this session's training so far
    trainer.resume_clock({"seconds": 50.0, "validation_seconds": 5.0, "sessions": 1})
    now = trainer.elapsed()
    assert now["sessions"] == 2 and 50 <= now["seconds"] < 55 and now["validation_seconds"] == 5.0
    assert (now["loss_sum"], now["loss_count"]) == (3.0, 2)
    trainer.resume_clock({"seconds": 50.0, "validation_seconds": 5.0, "sessions": 1, "loss_sum": 7, "loss_count": 4})
    assert (trainer.elapsed()["loss_sum"], trainer.elapsed()["loss_count"]) == (10.0, 6)


def test_a_run_checkpointed_before_the_summary_fields_existed_resumes_to_the_same_model(tmp_path, tiny_args):
    """checkpoint_last.pt of an older run: its state lacks the summary's loss, seconds and sessions."""
    from train_retriever import main

    assert main(tiny_args + ["--run_name", "full"]) == 0
    assert main(tiny_args + ["--run_name", "cut", "--max_steps", "5"]) == 0
    cut = run_dir_of(tmp_path, "cut")
    checkpoint = torch.load(cut / "checkpoint_last.pt", weights_only=True)
    assert list(checkpoint["state"]) == [*OLD_STATE_KEYS, "peak_rss_mib"]
    checkpoint["state"] = {key: checkpoint["state"][key] for key in OLD_STATE_KEYS[:9]}
    torch.save(checkpoint, cut / "checkpoint_last.pt")
    assert main(tiny_args + ["--run_name", "cut", "--resume"]) == 0
    full, resumed = (
        torch.load(run_dir_of(tmp_path, n) / "checkpoint_best.pt", weights_only=True) for n in ("full", "cut")
    )
    assert resumed["step"] == full["step"]
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    summary = read_summary(cut)
    assert summary["steps"] == 12 and summary["sessions"] == 1  # the older part's session was not counted
