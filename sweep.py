"""Hyper-parameter search on Optuna over runs of train_retriever.py or train_ranker.py, chosen on validation only.

    python sweep.py train_retriever.py --study NAME --space "bert_dropout=float:0:0.4" "lr=float:1e-4:1e-2:log" \\
        --trials 12 --workers 2 [--pruner median] [--seeds 1 2 3] -- --dataset_code ml-100k [the script's flags]

Every trial is an ordinary run folder (<experiment_root>/<stage>/<dataset>/<study>_trial<N>/). Its objective is the
run's best validation metric, the one its early stopping uses; trials' output goes to the study folder's logs/, so
no test metric is shown while the search runs. Once --trials trials have ended, the sweep names the chosen flags, and
only then reads the chosen trial's test metrics. The study lives in an Optuna storage (SQLite in the study folder by
default; a shared database URL lets sweeps on several machines join one study). Running the same command again
continues the study: trials of a killed sweep are resumed from their run folders, none is lost or run twice; a run
folder the study did not make (an earlier study of the same name) is refused, never resumed nor credited.
Files: README, "Hyper-parameter search"; details: docs/sweeps.md.
"""

import argparse
import itertools
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from config import RETRIEVER, SWEEP, build_parser, foreign_flag_error, parse_flags, run_cli
from report import STAGE_SCRIPTS, build_rows, render_md
from trainer.ranker_train import SELECTION_METRIC
from trainer.run_folder import load_run, run_folder
from trainer.search import (
    FAIL,
    Dimension,
    Sweep,
    check_claim,
    chosen_trial,
    claim_run,
    ended,
    ended_count,
    flag_args,
    foreign_runs,
    not_made_here,
    parse_dimension,
    run_process,
    run_workers,
    say,
)
from utils.errors import InputError, one_line
from utils.files import atomic_write_json, atomic_write_text

# The heartbeat API (how a killed sweep's trials are found and re-queued) is marked experimental; it is used as its
# documentation shows, with ask/tell instead of Study.optimize so that a trial is a process of the script.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)

STAGES = {script: stage for stage, script in STAGE_SCRIPTS.items()}  # script -> run folder stage
CONTROLLED = ("run_name", "resume", "overwrite", "eval_only", "print_config", "num_threads")  # set by the sweep
NOT_SEARCHED = CONTROLLED + ("seed", "dataset_code", "experiment_root", "best_metric", "custom_path", "data_root")


def check_dimension(spec: str, script: str) -> Dimension:
    """A --space entry that names a flag of `script` the sweep may vary."""
    name = spec.partition("=")[0]
    flags = {action.dest for action in build_parser(script)._actions}
    if name not in flags:
        owner = foreign_flag_error(script, f"--{name}")
        raise InputError(f"--space {spec!r}: {owner or f'--{name} is not a {script} flag (see {script} --help)'}")
    if name in NOT_SEARCHED:
        raise InputError(f"--space {spec!r}: --{name} is fixed in a sweep (seeds: --seeds; others: after --)")
    return parse_dimension(spec)


def check_distinct(flag: str, values: list, shown: list[str] | None = None) -> None:
    """A list flag whose entries must differ: --space (one entry per flag), --seeds (one run per seed)."""
    repeated = list(dict.fromkeys(v for v in values if values.count(v) > 1))
    if repeated:
        raise InputError(
            f"{flag}: {', '.join(map(str, repeated))} given more than once ({' '.join(map(str, shown or values))}); "
            "expected each once"
        )


def grid_points(space: list[Dimension]) -> list[dict[str, str]]:
    """--sampler grid: every combination of the --space choices, in the order given."""
    ranged = [dim.name for dim in space if dim.kind != "choice"]
    if ranged:
        raise InputError(
            f"--sampler grid: --space {', '.join(ranged)} is a range; expected only name=choice:a,b,c entries"
        )
    names = [dim.name for dim in space]
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(dim.choices for dim in space))]


def grid_trials(asked: int, default: int, points: int) -> int:
    """A grid runs each point once: --trials is its size (left at its default, or passed as that size)."""
    if asked not in (default, points):
        raise InputError(f"--trials {asked}: --sampler grid runs each of its {points} points once; pass --trials "
                         f"{points} or leave it out")  # fmt: skip
    return points


def check_trial_flags(script: str, fixed: list[str], space: list[Dimension]) -> object:
    """The fixed flags, and each corner of the space with them, pass the script's own checks; returns the parse."""
    options = build_parser(script)._option_string_actions  # --x, --no-x -> the flag they set
    searched = {dim.name for dim in space}
    for token in fixed:
        option = token.split("=", 1)[0] if token.startswith("--") else None
        name = options[option].dest if option in options else None
        if name in CONTROLLED:
            instead = " (pass --threads_per_worker)" if name == "num_threads" else ""
            raise InputError(f"--{name} after --: the sweep sets it for every trial{instead}")
        if name in searched:
            raise InputError(f"--{name}: both fixed after -- ({token}) and searched by --space; pass it in one place")
    try:
        flags = parse_flags(script, fixed)
        for dim in space:
            for value in dim.corners():
                parse_flags(script, fixed + flag_args({dim.name: value}))
    except SystemExit:
        raise InputError(f"the flags for {script} are not valid (see the message above)") from None
    except InputError as e:
        raise InputError(f"{script} refuses these flags: {e}") from None
    return flags


# ---------------------------------------------------------------------------------------------- the study


# The module a database URL's driver is imported as -> what `pip install` installs it from.
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL"}  # fmt: skip


def shown_url(url: str) -> str:
    """The storage URL for messages, its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:  # not a URL sqlalchemy reads; still hide what looks like user:password@
        return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """The study's database failing (a bad URL, a folder or server that is not there, a lost connection) as one
    InputError naming the URL (its password hidden) and the fix."""
    where = f"--storage {shown_url(url)}"
    try:
        yield
    except sqlalchemy.exc.ArgumentError as e:
        raise InputError(
            f"{where}: expected a database URL (sqlite:///path/to/study.db, postgresql+psycopg2://user:password@host/db"
            f", ...), found one that cannot be used ({one_line(e, 120)})"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as e:
        cause = e if isinstance(e, sqlalchemy.exc.SQLAlchemyError) else e.__cause__
        reason = one_line(getattr(cause, "orig", None) or cause or e, 160)
        raise InputError(
            f"{where}: the study's database could not be opened or used ({reason}); check the URL, that a SQLite "
            "file's folder exists and is writable, and that a database server is reachable with these credentials"
        ) from None


def open_storage(url: str, heartbeat: int, max_restarts: int) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_restarts, inherit_intermediate_values=True
            ),
        )
    except ImportError as e:  # Optuna's "Failed to import DB access module", from the driver's ModuleNotFoundError
        module = getattr(e.__cause__, "name", None)
        if module is None:
            raise
        raise InputError(
            f"--storage {shown_url(url)}: its database driver is not installed (no module {module!r}); "
            f"pip install {DRIVER_PACKAGES.get(module, module)}"
        ) from None


def open_study(
    flags: argparse.Namespace, script: str, fixed: list[str], folder: Path, grid: list[dict[str, str]] | None = None
) -> optuna.Study:
    """Create or join the study; joining checks that it searches the same script, fixed flags and space. `grid`: the
    points --sampler grid enqueues, each once."""
    if flags.storage is None:
        folder.mkdir(parents=True, exist_ok=True)
    url = flags.storage or f"sqlite:///{folder / 'study.db'}"
    # A grid's points are enqueued trials (their params fixed): the sampler draws nothing for them.
    sampler_class = optuna.samplers.TPESampler if flags.sampler == "tpe" else optuna.samplers.RandomSampler
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=flags.pruner_startup_trials, n_warmup_steps=flags.pruner_warmup_steps
        )
        if flags.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    with storage_errors(url):
        storage = open_storage(url, flags.heartbeat_seconds, flags.max_restarts)
        study = optuna.create_study(
            study_name=flags.study, storage=storage, pruner=pruner, direction="maximize", load_if_exists=True
        )
    folder.mkdir(parents=True, exist_ok=True)
    # A restarted sweep must not replay the random draws of its first start: the seed moves on with the study.
    study.sampler = sampler_class(seed=flags.sampler_seed + len(study.get_trials(deepcopy=False)))
    # "grid": a grid study rejoined by another sampler would add drawn trials to it, and the reverse enqueue a grid.
    settings = {"script": script, "fixed_flags": fixed, "space": flags.space, "grid": flags.sampler == "grid"}
    if not study.user_attrs:
        for key, value in settings.items():
            study.set_user_attr(key, value)
    started = {"grid": False, **study.user_attrs}  # a study started before grids existed is not one
    changed = [key for key, value in settings.items() if started.get(key) != value]
    if changed:
        details = "; ".join(f"{key} {started.get(key)!r} -> {settings[key]!r}" for key in changed)
        raise InputError(f"--study {flags.study}: the study was started with other settings ({details}); "
                         "pass its own, or name another study")  # fmt: skip
    # The study's identity in the records of its runs (trainer/search.py claim_run): a study of the same name started
    # anew (its folder deleted, another --storage) gets another, so the old study's run folders are never its own.
    if "uuid" not in study.user_attrs:
        study.set_user_attr("uuid", uuid.uuid4().hex)
    for point in grid or []:  # skip_if_exists: a restarted grid sweep enqueues no point twice
        study.enqueue_trial(point, skip_if_exists=True)
    return study


def test_of(sweep: Sweep, trial: optuna.trial.FrozenTrial):
    run_name = trial.user_attrs["run_name"]
    check_claim(sweep, run_name, {"flags": trial.user_attrs["flags"]})  # never another study's run of that name
    run_dir = sweep.run_root / run_name
    run = load_run(sweep.stage, run_dir)
    if run is None or run.test is None:
        raise InputError(
            f"{run_dir}: no test_metrics.json here (the run was made on {trial.user_attrs.get('host')}); rerun this "
            "command there, or give every machine one shared --experiment_root"
        )
    return run


def metric_text(row: dict, stage: str) -> str:
    columns = ("Recall@10", "NDCG@10") if stage == "retriever" else ("llm NDCG@10", "llm Recall@10")
    return ", ".join(f"{c} {row[f'{c} mean']:.4f}" for c in columns if row.get(f"{c} mean") is not None)


def summarize(sweep: Sweep, summary_path: Path) -> dict:
    """Name the chosen trial from validation alone, then read its test metrics (the only test read)."""
    trials = sweep.study.get_trials(deepcopy=False)
    best = chosen_trial(sweep.study)
    if best is None:
        raise InputError(f"--study {sweep.study.study_name}: no trial completed; see {sweep.folder / 'logs'}")
    summary = {
        "study": sweep.study.study_name,
        "script": sweep.script.name,
        "objective": f"best validation {sweep.metric}",
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{
                    k: t.user_attrs[k]
                    for k in ("flags", "run_name", "resumes", "restarts", "pruned", "error", "seconds")
                    if k in t.user_attrs
                },
                **({"interrupted": "re-queued as a new trial"} if t.state == FAIL and not ended(t) else {}),
            }
            for t in trials
        ],  # fmt: skip
        "chosen": {
            "trial": best.number,
            "flags": best.user_attrs["flags"],
            "validation": best.value,
            "run_name": best.user_attrs["run_name"],
            "chosen_at": time.time(),
        },  # fmt: skip
    }
    flags = " ".join(f"--{k} {v}" for k, v in best.user_attrs["flags"].items())
    say(f"chosen on validation: trial {best.number} ({sweep.metric} {best.value:.4f}): {flags}")
    stage = sweep.stage
    run = test_of(sweep, best)
    row = build_rows([run])[0]
    summary["test_read_for_trials"] = [best.number]
    summary["chosen_test"] = {"test_read_at": time.time(), **{k: v for k, v in row.items() if k.endswith("mean")}}
    say(f"test of trial {best.number} (read once, after the choice): {metric_text(row, stage)}")
    atomic_write_json(summary_path, summary)
    return summary


def run_seeds(sweep: Sweep, best: optuna.trial.FrozenTrial, seeds: list[int], search_seed: int, workers: int) -> str:
    """The chosen flags on each seed (the chosen trial itself for the search's seed); the report's table of them."""
    stage = sweep.stage
    flags = best.user_attrs["flags"]

    def name(seed: int) -> str:
        return best.user_attrs["run_name"] if seed == search_seed else f"{sweep.study.study_name}_chosen_seed{seed}"

    for seed in seeds:  # every folder claimed (or refused) before any of them trains
        if seed != search_seed:
            claim_run(sweep, name(seed), {"seed": seed, "flags": flags})

    def one(seed: int) -> Path:
        run_name = name(seed)
        run_dir = sweep.run_root / run_name
        if seed == search_seed:
            return run_dir
        if not (run_dir / "test_metrics.json").is_file():
            argv = sweep.fixed + flag_args(flags) + ["--seed", str(seed), "--run_name", run_name]
            argv += ["--num_threads", str(sweep.threads)] + (
                ["--resume"] if run_dir.is_dir() and any(run_dir.iterdir()) else []
            )
            code = run_process(sweep, argv, sweep.folder / "logs" / f"{run_name}.log")
            if code != 0:
                raise InputError(f"seed {seed}: exit code {code}; see {sweep.folder / 'logs' / (run_name + '.log')}")
            say(f"seed {seed}: {run_name} finished")
        return run_dir

    with ThreadPoolExecutor(workers) as pool:
        run_dirs = list(pool.map(one, seeds))
    rows = build_rows([load_run(stage, d) for d in run_dirs])
    for row in rows:  # the report names a group by the flags its runs differ in: here, none
        row["group"] = " ".join(f"--{name} {value}" for name, value in flags.items())
    return render_md(rows, [], sweep.run_root.parent.parent)


def run(flags: argparse.Namespace, fixed: list[str]) -> dict:
    script = flags.script
    check_distinct("--space", [spec.partition("=")[0] for spec in flags.space], flags.space)
    check_distinct("--seeds", flags.seeds or [])
    space = [check_dimension(spec, script) for spec in flags.space]
    grid = grid_points(space) if flags.sampler == "grid" else None
    default_trials = build_parser(SWEEP).get_default("trials")
    trials = flags.trials if grid is None else grid_trials(flags.trials, default_trials, len(grid))
    trial_flags = check_trial_flags(script, fixed, space)
    experiment_root = Path(trial_flags.experiment_root)
    folder = experiment_root / "sweeps" / flags.study
    with storage_errors(flags.storage or f"sqlite:///{folder / 'study.db'}"):  # also a database lost mid-sweep
        study = open_study(flags, script, fixed, folder, grid)
        sweep = Sweep(
            script=Path(__file__).parent / script, stage=STAGES[script], study=study, fixed=fixed, space=space,
            run_root=run_folder(experiment_root, STAGES[script], trial_flags.dataset_name, ""),
            folder=folder, metric=trial_flags.best_metric if script == RETRIEVER else SELECTION_METRIC,
            trials=trials, threads=flags.threads_per_worker or max(1, (os.cpu_count() or 1) // flags.workers),
            pruning=flags.pruner != "none", max_restarts=flags.max_restarts, heartbeat=flags.heartbeat_seconds,
            lock=threading.Lock(), stopping=threading.Event(), study_uuid=study.user_attrs["uuid"],
        )  # fmt: skip
        foreign = foreign_runs(sweep)
        if foreign:
            raise not_made_here(sweep, foreign)
        done = ended_count(study.get_trials(deepcopy=False))
        say(f"study {flags.study}: {done}/{trials} trials ended; {flags.workers} workers x {sweep.threads} "
            f"threads; trial output in {folder / 'logs'}")  # fmt: skip
        run_workers(sweep, flags.workers)
        summary = summarize(sweep, folder / "summary.json")
        if flags.seeds:
            best = chosen_trial(study)
            table = run_seeds(sweep, best, flags.seeds, trial_flags.seed, flags.workers)
            atomic_write_text(folder / "seeds_report.md", table)
            say(table)
            summary["seeds"] = {"seeds": flags.seeds, "report": str(folder / "seeds_report.md")}
            atomic_write_json(folder / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return run_cli(SWEEP, lambda flags: run(flags, argv[split + 1 :]), argv[:split])


if __name__ == "__main__":
    sys.exit(main())
