"""Shared fixtures: real data (the shipped ml-latest-small), the shipped Llama-2 tokenizer and tiny splits; the
`browser` marker's rule (Chromium found: run; not found: deselected with one line, or an error where required)."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from config import RETRIEVER, data_config, default_config, parse_flags
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
    return load_split(default_config(DataConfig, code="ml-100k", data_root=root))


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


# --------------------------------------------------------------------------- browser tests (tests/test_browser.py)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
GET_BROWSER_TESTS = "install Chromium (Debian/Ubuntu: apt-get install chromium), then make test-browser"
BROWSER_NOTE = pytest.StashKey[str]()


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary: $CHROMIUM if set, else the first of CHROMIUM_NAMES on PATH; None if absent."""
    names = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else CHROMIUM_NAMES
    return next((found for name in names if (found := shutil.which(name))), None)


def pytest_collection_modifyitems(config, items):
    """Without Chromium the `browser` tests are deselected (not skipped) with one line saying how to get them;
    with REQUIRE_BROWSER_TESTS set (make test-browser, CI) a missing Chromium is an error instead."""
    browser = [item for item in items if item.get_closest_marker("browser")]
    if not browser or find_chromium() is not None:
        return
    where = f"$CHROMIUM={os.environ['CHROMIUM']}" if os.environ.get("CHROMIUM") else " or ".join(CHROMIUM_NAMES)
    if os.environ.get("REQUIRE_BROWSER_TESTS"):
        raise pytest.UsageError(f"the browser tests need Chromium, found no {where} on PATH: {GET_BROWSER_TESTS}")
    items[:] = [item for item in items if not item.get_closest_marker("browser")]
    config.hook.pytest_deselected(items=browser)
    config.stash[BROWSER_NOTE] = (
        f"{len(browser)} browser tests deselected: no {where} on PATH; to run them, {GET_BROWSER_TESTS}"
    )


def pytest_terminal_summary(terminalreporter, config):
    if BROWSER_NOTE in config.stash:
        terminalreporter.write_line(config.stash[BROWSER_NOTE])
