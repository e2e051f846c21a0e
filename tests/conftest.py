"""Shared fixtures: real data (the shipped ml-latest-small), the shipped Llama-2 tokenizer and tiny splits."""

from pathlib import Path

import pandas as pd
import pytest

from config import RETRIEVER, data_config, parse_flags
from datasets import DataConfig, SplitData, load_split, make_split
from utils.files import REPO_ROOT

LLAMA2_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "llama-2-tokenizer"  # Llama 2 licence: see its README


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama2_tokenizer_path))


@pytest.fixture(scope="session")
def ml100k_split(tmp_path_factory) -> SplitData:
    """The real ml-latest-small 2018 split (shipped in data/); cached in a temp data root."""
    root = tmp_path_factory.mktemp("data_root")
    return load_split(DataConfig("ml-100k", data_root=root))


def split_of(argv: list[str], script: str = RETRIEVER) -> SplitData:
    """The split a run of `script` with these flags reads."""
    return load_split(data_config(parse_flags(script, argv)))


def tiny_llama(seed: int = 0, hidden_size: int = 32):
    """A randomly initialised Llama-2-shaped model (vocab 32000, the real tokenizer's ids), tiny."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_interactions(num_users: int = 12, num_items: int = 15, length: int = 9, seed: int = 0) -> pd.DataFrame:
    """Every user rates `length` distinct items at increasing timestamps (all pass a 5-core)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        items = rng.choice(num_items, size=length, replace=False)
        rows += [(f"u{u}", f"i{i}", t) for t, i in enumerate(items)]
    return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


@pytest.fixture
def tiny_split() -> SplitData:
    """12 users x 15 items, 9 interactions each; titles 'Item i'."""
    df = tiny_interactions()
    titles = {item: f"Item {item[1:]}" for item in df["item"].unique()}
    return make_split(df, titles, name="tiny", min_uc=5, min_sc=1)


def write_custom_dataset(folder):
    folder.mkdir()
    df = tiny_interactions(num_users=12, num_items=15, length=9)
    df.rename(columns={"user": "user_id", "item": "item_id"}).to_csv(folder / "interactions.csv", index=False)
    items = sorted(df["item"].unique())
    with open(folder / "items.csv", "w") as f:
        f.write("item_id,title\n" + "".join(f"{i},Item {i}\n" for i in items))
    return folder


@pytest.fixture
def tiny_args(tmp_path):
    data = write_custom_dataset(tmp_path / "tiny")
    return [
        "--dataset_code", "custom", "--custom_path", str(data), "--data_root", str(tmp_path / "data"),
        "--experiment_root", str(tmp_path / "exp"), "--bert_max_len", "5", "--bert_hidden_units", "8",
        "--train_batch_size", "4", "--val_batch_size", "5", "--test_batch_size", "5", "--val_iterations", "2",
        "--num_epochs", "4", "--retrieved_topk", "6", "--early_stopping_patience", "100",
    ]  # fmt: skip


def run_dir_of(tmp_path, name="seed42"):
    return tmp_path / "exp" / "retriever" / "custom-tiny" / name
