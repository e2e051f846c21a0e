"""The retrievers of the paper's Table 1 (LRURec, SASRec, BERT4Rec, NARM): shapes, causality, padding invariance,
BERT4Rec's cloze masking, and a short training run of each through train_retriever.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from config import default_config
from dataloader.candidates import load_candidates
from model.layers import Dropout, SelfAttention
from model.retrievers import RETRIEVERS, RetrieverSpec, build_retriever
from tests.conftest import run_dir_of, split_of
from train_retriever import main
from trainer.retriever_train import train_step
from utils.errors import InputError
from utils.files import REPO_ROOT

MODELS = ["lru", "sasrec", "bert4rec", "narm"]


def small(name: str, max_len: int = 8):
    torch.manual_seed(0)
    spec = default_config(
        RetrieverSpec,
        model=name,
        max_len=max_len,
        hidden_units=16,
        num_blocks=2,
        dropout=0.0,
        attn_dropout=0.0,
        mask_prob=0.3,
    )
    return build_retriever(spec, 40).eval()


@pytest.mark.parametrize("name", MODELS)
def test_shapes(name):
    model = small(name)
    tokens = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    assert model.encode(tokens).shape == (2, 8, 16)
    assert model(tokens).shape == (2, 41)  # every item id, column 0 = padding
    assert model.next_hidden(tokens).shape == (2, 16)


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_changes_nothing(name):
    model = small(name)
    history = torch.tensor([[5, 9, 2, 7]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(model.encode(padded)[:, 3:], model.encode(history), atol=1e-5)
        assert torch.allclose(model(padded), model(history), atol=1e-4)


@pytest.mark.parametrize("name", ["lru", "sasrec", "narm"])
def test_causal_models_do_not_look_ahead(name):
    """A later item cannot change an earlier position's state (the trainer reads every position of a window)."""
    model = small(name)
    a, b = torch.tensor([[0, 3, 4, 5, 6, 7]]), torch.tensor([[0, 3, 4, 5, 30, 31]])
    with torch.no_grad():
        assert torch.allclose(model.encode(a)[:, :4], model.encode(b)[:, :4], atol=1e-6)
        assert not torch.allclose(model.encode(a)[:, 4:], model.encode(b)[:, 4:], atol=1e-6)
    assert model.causal


def test_bert4rec_is_bidirectional_and_predicts_at_an_appended_mask():
    model = small("bert4rec")
    a, b = torch.tensor([[0, 3, 4, 5, 6, 7]]), torch.tensor([[0, 3, 4, 5, 30, 31]])
    with torch.no_grad():
        assert not torch.allclose(model.encode(a)[:, :4], model.encode(b)[:, :4], atol=1e-6)  # sees the future
        # next_hidden = the state at a mask token after the history (the oldest item dropped at max_len)
        full = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        expected = model.encode(torch.tensor([[2, 3, 4, 5, 6, 7, 8, model.mask_id]]))[:, -1]
        assert torch.allclose(model.next_hidden(full), expected)
    assert not model.causal


def test_bert4rec_cloze_masks_only_real_items_and_labels_them():
    model = small("bert4rec")
    torch.manual_seed(1)
    tokens = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10, 11, 12]] * 200)  # next-item windows
    labels = torch.cat([tokens[:, 1:], torch.tensor([[6], [13]] * 200)], dim=1)
    inputs, targets = model.training_inputs(tokens, labels)
    items = torch.cat([tokens[:, 1:], labels[:, -1:]], dim=1)  # the windows' items: 1..6 and 6..13
    masked = inputs == model.mask_id
    assert torch.equal(targets[masked], items[masked]) and (targets[~masked] == 0).all()
    assert torch.equal(inputs[~masked], items[~masked])  # unmasked items and padding pass unchanged
    assert not (masked & (items == 0)).any()  # padding is never masked
    assert masked.any(1).all()  # at least one masked item per window
    share = masked.sum() / (items > 0).sum()
    assert 0.25 < share < 0.36  # --bert_mask_prob 0.3, plus the forced ones


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "narm"])
def test_each_baseline_trains_and_exports_through_train_retriever(name, tmp_path, tiny_args):  # noqa: F811
    assert main(tiny_args + ["--retriever_model", name, "--max_steps", "6", "--run_name", name]) == 0
    run = run_dir_of(tmp_path, name)
    assert json.loads((run / "config.json").read_text())["retriever_model"] == name
    history = [json.loads(line) for line in (run / "val_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6] and all(h["train_loss"] > 0 for h in history)
    assert (run / "candidates.npz").is_file() and (run / "test_metrics.json").is_file()
    # stage 2 reads them as it reads LRURec's
    split = split_of(tiny_args)
    candidates = load_candidates(run, split)
    assert candidates.test["items"].shape[0] == len(split.test) and candidates.meta["topk"] > 0
    assert candidates.test["labels"].tolist() == split.test
    # --resume refuses another model for the same run
    assert main(tiny_args + ["--retriever_model", "lru", "--run_name", name, "--resume"]) == 2


@pytest.mark.parametrize("name", MODELS)
def test_fifty_training_steps_lower_the_loss(name):
    model = small(name, max_len=12).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(1, 41, (16, 13), generator=generator)
    sequences[:4, :5] = 0  # some left padding
    tokens, labels = sequences[:, :-1], sequences[:, 1:].masked_fill(sequences[:, :-1] == 0, 0)
    losses = [train_step(model, optimizer, scheduler, tokens, labels, 5.0) for _ in range(50)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # ln(40) = 3.7 at the start


def test_narm_matches_its_definition_written_out():
    """NARM's encode at every real position against the paper's formulas, one unpadded row at a time: the GRU
    state h_t, alpha_tj = v^T sigmoid(A1 h_t + A2 h_j) over j <= t, c = [h_t ; sum_j alpha_tj h_j], B c."""
    model = small("narm")
    with torch.no_grad():
        for p in model.parameters():  # weights large enough that a missing or wrong term shows
            p.add_(0.3 * torch.randn_like(p))
        # 19 positions: the local encoder's query chunks hold 3 positions, the last one 1
        tokens = torch.tensor(
            [[0] * 12 + [5, 9, 2, 7, 1, 3, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8]]
        )
        got = model.encode(tokens)
        for row, start in ((0, 12), (1, 0)):
            states, _ = model.gru(model.token(tokens[row : row + 1, start:]))
            h = states[0]  # [T, d]
            for t in range(len(h)):
                alpha = model.v(torch.sigmoid(model.a_1(h[t]) + model.a_2(h[: t + 1]))).squeeze(-1)
                local = alpha @ h[: t + 1]
                want = model.decoder(torch.cat([h[t], local]))
                torch.testing.assert_close(got[row, start + t], want, rtol=1e-4, atol=1e-5)
        # evaluation's shortcut for the last position gives encode's last state
        torch.testing.assert_close(model.next_hidden(tokens), got[:, -1], rtol=1e-4, atol=1e-5)


def test_sizes_a_model_cannot_take_are_input_errors():
    for name in ("sasrec", "bert4rec"):
        with pytest.raises(InputError, match=r"^--attn_heads: expected a divisor of --bert_hidden_units 10, found 4$"):
            build_retriever(default_config(RetrieverSpec, model=name, max_len=8, hidden_units=10, heads=4), 40)
    with pytest.raises(
        InputError, match=r"^--retriever_model: expected one of lru, sasrec, bert4rec, narm, found 'gru'$"
    ):
        build_retriever(default_config(RetrieverSpec, model="gru"), 40)


# A retriever written the way docs/retriever.md says: one file with a NextItemModel subclass, nothing else.
BAG_OF_ITEMS = """
import torch
from torch import nn

from model.interface import NextItemModel


class BagOfItems(NextItemModel):
    \"\"\"The mean embedding of the items so far, through one linear layer.\"\"\"

    def __init__(self, num_items: int, hidden_units: int):
        super().__init__()
        self.num_items = num_items
        self.token = nn.Embedding(num_items + 1, hidden_units)
        self.mix = nn.Linear(hidden_units, hidden_units)
        self.bias = nn.Parameter(torch.zeros(num_items + 1))

    def encode(self, tokens):
        real = (tokens > 0).unsqueeze(-1)
        return self.mix((self.token(tokens) * real).cumsum(1) / real.cumsum(1).clamp(min=1))
"""


def test_a_registry_line_is_all_build_retriever_needs(tmp_path, monkeypatch):
    (tmp_path / "bag_of_items.py").write_text(BAG_OF_ITEMS)
    spec = importlib.util.spec_from_file_location("bag_of_items", tmp_path / "bag_of_items.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(RETRIEVERS, "bag", module.BagOfItems)  # the registry line; removed after the test
    model = build_retriever(default_config(RetrieverSpec, model="bag", max_len=8, hidden_units=12), 40)
    assert type(model) is module.BagOfItems and model.token.weight.shape == (41, 12)
    assert model(torch.tensor([[0, 3, 4], [1, 2, 5]])).shape == (2, 41)


def test_a_new_retriever_trains_and_exports_with_one_registry_line(tmp_path, tiny_args):
    """The whole stage 1 (flags, training, checkpoints, evaluation, candidates, --eval_only) takes a retriever that is
    one new file plus its line in RETRIEVERS: run in a fresh process, that line added before anything reads it."""
    (tmp_path / "bag_of_items.py").write_text(BAG_OF_ITEMS)
    registry_line = (
        "import sys, model.retrievers as r; from bag_of_items import BagOfItems\n"
        "r.RETRIEVERS['bag'] = BagOfItems; r.RETRIEVER_MODELS = tuple(r.RETRIEVERS)\n"
        "from train_retriever import main; sys.exit(main(sys.argv[1:]) or main([*sys.argv[1:], '--eval_only']))"
    )
    argv = [*tiny_args, "--retriever_model", "bag", "--max_steps", "4", "--run_name", "bag", "--num_threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # bag_of_items.py; the project from the working folder
    command = [sys.executable, "-c", registry_line, *argv]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    run = run_dir_of(tmp_path, "bag")
    assert json.loads((run / "config.json").read_text())["retriever_model"] == "bag"
    candidates = load_candidates(run, split_of(tiny_args))
    assert candidates.test["items"].shape[0] == len(split_of(tiny_args).test) and candidates.meta["topk"] > 0
    # --eval_only rebuilds it from the run's flags and loads its best checkpoint: the same test metrics
    assert json.loads((run / "eval" / "test_metrics.json").read_text()) == json.loads(
        (run / "test_metrics.json").read_text()
    )


@pytest.mark.parametrize("name", MODELS)
def test_from_spec_gives_each_size_of_the_spec_to_the_model(name):
    """The inherited from_spec passes the spec's fields by name: one dropped or passed to the wrong parameter fails."""
    spec = default_config(RetrieverSpec, model=name, max_len=7, hidden_units=12, num_blocks=3, heads=3, dropout=0.25,
                          attn_dropout=0.375, mask_prob=0.3)  # fmt: skip
    model = build_retriever(spec, 40)
    assert model.token.weight.shape == (41, 12)
    probabilities = {module.p for module in model.modules() if isinstance(module, Dropout)}
    if name == "narm":  # one GRU layer, no attention
        assert model.gru.num_layers == 1 and probabilities == {0.25}
        return
    assert len(model.blocks) == 3 and 0.25 in probabilities
    if name == "lru":
        assert 0.375 in probabilities
        return
    assert model.position.num_embeddings == 8  # max_len + 1
    attention = [module for module in model.modules() if isinstance(module, SelfAttention)]
    assert len(attention) == 3 and {(a.heads, a.dropout) for a in attention} == {(3, 0.375)}
    if name == "bert4rec":
        assert model.mask_prob == 0.3
