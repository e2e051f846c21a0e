"""The trials of a hyper-parameter search (sweep.py): the search space, one trial as a process of the training
script with its own ordinary run folder, validation reports to the pruner, heartbeats, and the workers that take
trials from the shared Optuna study until it has enough.

A trial whose sweep dies (kill -9, a lost machine) stops beating; the next worker that looks fails it and queues a
retry with the same flags and run folder, which continues the run with --resume (RetryHeartbeatStaleTrialCallback).

A study owns the run folders it makes: before a run first starts, the sweep records it in
<study folder>/runs/<run>.json (the study's uuid, the flags); a folder of that name without the study's record (an
earlier study of the same name, a run started by hand) is refused, never resumed nor credited with its results.
"""

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from trainer.ranker_train import SELECTION_METRIC
from trainer.run_state import HISTORY, read_history, read_summary
from utils.errors import InputError
from utils.files import atomic_write_json, read_json_object

COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING
# Started through `python -c`: the trial's process dies with the sweep (Linux), so a killed sweep leaves no trial
# running that a restarted sweep would resume a second time.
# Its SIGINT handler is set anew: a sweep started in the background by a shell (`sweep.py ... &`) ignores SIGINT, and
# its children would inherit that, so a pruned or interrupted trial would train on to its end.
CHILD = """import ctypes, os, runpy, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
signal.signal(signal.SIGINT, signal.default_int_handler)
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Dimension:
    """One flag of the search space: `name=choice:a,b` | `name=int:low:high[:log]` | `name=float:low:high[:log]`."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()

    def suggest(self, trial: optuna.Trial) -> str:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return str(trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log))
        return f"{trial.suggest_float(self.name, self.low, self.high, log=self.log):.6g}"

    def corners(self) -> list[str]:
        """Values that show a flag's range check what the search may pass."""
        if self.kind == "choice":
            return list(self.choices)
        return [str(int(v)) if self.kind == "int" else f"{v:.6g}" for v in (self.low, self.high)]


def parse_dimension(spec: str) -> Dimension:
    """`name=choice:a,b,c`, `name=int:low:high` or `name=float:low:high`, with `:log` appended for a log scale."""
    name, _, rest = spec.partition("=")
    kind, _, values = rest.partition(":")
    expected = "name=choice:a,b,c, name=int:low:high or name=float:low:high (:log appended for a log scale)"
    if kind == "choice" and values:
        return Dimension(name, kind, choices=tuple(values.split(",")))
    parts = values.split(":")
    log = parts[-1] == "log"
    parts = parts[:-1] if log else parts
    try:
        low, high = (int(p) for p in parts) if kind == "int" else (float(p) for p in parts)
    except ValueError:
        raise InputError(f"--space {spec!r}: expected {expected}") from None
    if kind not in ("int", "float") or not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"--space {spec!r}: expected {expected}, with finite numbers as bounds")
    if not low < high or (log and low <= 0):
        raise InputError(f"--space {spec!r}: expected {expected}, with low < high (and low > 0 for :log)")
    return Dimension(name, kind, low, high, log)


def flag_args(values: dict[str, str]) -> list[str]:
    return [token for name, value in values.items() for token in (f"--{name}", *value.split())]


@dataclass
class Sweep:
    """What every worker of one sweep shares: the study, how to run a trial, and how many trials to end with."""

    script: Path  # train_retriever.py or train_ranker.py
    stage: str  # retriever or ranker
    study: optuna.Study
    fixed: list[str]
    space: list[Dimension]
    run_root: Path  # <experiment_root>/<stage>/<dataset>
    folder: Path  # <experiment_root>/sweeps/<study>
    metric: str
    trials: int
    threads: int
    pruning: bool
    max_restarts: int
    heartbeat: int
    lock: threading.Lock
    stopping: threading.Event
    study_uuid: str = ""  # the study's identity in the records of its runs (claim_run)


class Pruned(Exception):
    pass


class Interrupted(Exception):
    """The sweep itself is stopping (Ctrl-C): its trials are re-queued, to be resumed by the next start."""


def ended(trial: optuna.trial.FrozenTrial) -> bool:
    """Counts toward --trials: complete, pruned, or failed by itself (not a trial re-queued after an interruption)."""
    return trial.state in (COMPLETE, PRUNED) or (trial.state == FAIL and "error" in trial.user_attrs)


def ended_count(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(ended(trial) for trial in trials)


def run_process(sweep: Sweep, argv: list[str], log: Path, on_poll=None) -> int:
    """The script with `argv` in a child process (stdout and stderr appended to `log`); its exit code, negative
    for a signal. `on_poll` is called every second and may raise to stop the child (Ctrl-C: its files stay whole)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(sweep.threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", CHILD, str(os.getpid()), str(sweep.script), *argv]
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {sweep.script.name} {' '.join(argv)}\n")
        out.flush()
        # its own session: a Ctrl-C at the terminal reaches the sweep only, which stops its trials in order
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while child.poll() is None:
                time.sleep(1)
                if sweep.stopping.is_set():
                    raise Interrupted
                if on_poll is not None:
                    on_poll()
        except BaseException:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    return child.returncode


def report_validations(sweep: Sweep, trial: optuna.Trial, run_dir: Path, reported: set[int]) -> None:
    """Each new validation of the run goes to the pruner; raises Pruned when it says stop."""
    for record in read_history(run_dir / HISTORY):  # a line being written is skipped
        step, value = record.get("step"), record.get(sweep.metric)
        if step in reported or not isinstance(value, int | float):
            continue
        reported.add(step)
        trial.report(value, step)
        if trial.should_prune():
            raise Pruned(f"pruned at step {step} ({sweep.metric} {value:.4f})")


def objective_value(sweep: Sweep, run_dir: Path) -> float:
    """The run's best validation metric, from its training_summary.json."""
    summary = read_summary(run_dir) or {}
    value = (
        summary.get("best_value")
        if sweep.stage == "retriever"
        else summary.get("best_val_metric", {}).get(SELECTION_METRIC)
    )
    if not isinstance(value, int | float) or math.isnan(value):
        raise RuntimeError(f"{run_dir}: no validation metric (did a validation run? see --val_iterations)")
    return float(value)


def run_trial(sweep: Sweep, trial: optuna.Trial) -> float:
    """Train the trial's run (resuming its folder after an interruption); its best validation metric."""
    run_name = trial.user_attrs.get("run_name")  # a re-queued trial inherits the interrupted one's attributes
    if run_name is None:
        run_name = f"{sweep.study.study_name}_trial{trial.number}"
        trial.set_user_attr("run_name", run_name)
    else:
        trial.set_user_attr("resumes", run_name)
        say(f"trial {trial.number}: resumes the interrupted run {run_name}")
    trial.set_user_attr("host", socket.gethostname())
    values = {dim.name: dim.suggest(trial) for dim in sweep.space}
    trial.set_user_attr("flags", values)  # as passed on the command line
    run_dir = sweep.run_root / run_name
    try:
        claim_run(sweep, run_name, {"trial": trial.number, "flags": values})
    except InputError as e:  # a folder that appeared since the sweep started: this trial fails, nothing is credited
        raise RuntimeError(str(e)) from None
    argv = sweep.fixed + flag_args(values) + ["--run_name", run_name, "--num_threads", str(sweep.threads)]
    reported = set(sweep.study._storage.get_trial(trial._trial_id).intermediate_values)  # inherited on a re-queue
    poll = (lambda: report_validations(sweep, trial, run_dir, reported)) if sweep.pruning else None
    for restart in range(sweep.max_restarts + 1):
        if (run_dir / "test_metrics.json").is_file():
            break  # finished before the interruption
        resume = ["--resume"] if run_dir.is_dir() and any(run_dir.iterdir()) else []
        code = run_process(sweep, argv + resume, sweep.folder / "logs" / f"{run_name}.log", poll)
        if code == 0:
            break
        if code not in (130, -signal.SIGINT) and code >= 0 or restart == sweep.max_restarts:
            log = sweep.folder / "logs" / f"{run_name}.log"
            raise RuntimeError(f"exit code {code} ({last_line(log)}); see {log}")
        trial.set_user_attr("restarts", restart + 1)
        say(f"trial {trial.number}: its process was interrupted (exit code {code}); resuming it (--resume)")
    return objective_value(sweep, run_dir)


def claim_run(sweep: Sweep, run_name: str, record: dict) -> None:
    """Make the run folder `run_name` this study's run for `record` ({"trial": N, "flags": ...} or {"seed": S,
    "flags": ...}), recorded before the run first starts; refuses a folder the study may not use (check_claim)."""
    if not check_claim(sweep, run_name, record):
        claim = {"study": sweep.study.study_name, "study_uuid": sweep.study_uuid, "run_name": run_name, **record}
        atomic_write_json(claim_path(sweep, run_name), claim)


def check_claim(sweep: Sweep, run_name: str, record: dict) -> bool:
    """Whether this study has claimed the run `run_name` for `record`'s flags (and seed). False when neither the
    claim nor the folder exists; InputError for a folder the study did not make, or made for other flags: resuming it
    or reading its results would report another run as this one."""
    path, run_dir = claim_path(sweep, run_name), sweep.run_root / run_name
    claim = read_json_object(path) if path.is_file() else None
    if claim is None or claim.get("study_uuid") != sweep.study_uuid or claim.get("run_name") != run_name:
        if run_dir.exists():
            raise not_made_here(sweep, [run_dir])
        return False
    if claim.get("flags") != record.get("flags") or claim.get("seed") != record.get("seed"):
        made = " ".join(
            f"--{k} {v}" for k, v in {**claim.get("flags", {}), "seed": claim.get("seed")}.items() if v is not None
        )
        raise InputError(
            f"{run_dir}: made by study {sweep.study.study_name} with other flags ({made}; see {path}), so it is not "
            f"this run; move it aside or remove it (and {path}), then rerun"
        )
    return True


def claim_path(sweep: Sweep, run_name: str) -> Path:
    return sweep.folder / "runs" / f"{run_name}.json"


def foreign_runs(sweep: Sweep) -> list[Path]:
    """Folders named like this study's runs (<study>_trial<N>, <study>_chosen_seed<S>) that the study did not make."""
    pattern = re.compile(rf"{re.escape(sweep.study.study_name)}_(trial\d+|chosen_seed-?\d+)")
    found = []
    for run_dir in sorted(sweep.run_root.iterdir()) if sweep.run_root.is_dir() else []:
        if pattern.fullmatch(run_dir.name):
            path = claim_path(sweep, run_dir.name)
            claim = read_json_object(path) if path.is_file() else {}
            if claim.get("study_uuid") != sweep.study_uuid:
                found.append(run_dir)
    return found


def not_made_here(sweep: Sweep, run_dirs: list[Path]) -> InputError:
    more = f" (and {', '.join(d.name for d in run_dirs[1:])})" if len(run_dirs) > 1 else ""
    return InputError(
        f"{run_dirs[0]}{more}: not made by this study {sweep.study.study_name} (it has no record of it in "
        f"{sweep.folder / 'runs'}: an earlier study of this name, whose folder was deleted or which lives in another "
        "--storage, or a run started by hand), so it is neither resumed nor credited; move it aside or remove it, or "
        "name another --study"
    )


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[-200:] if lines else "no output"


def heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial, seconds: int, stop: threading.Event) -> None:
    while not stop.wait(seconds):
        storage.record_heartbeat(trial._trial_id)  # Optuna has no public accessor of a live trial's id


def work(sweep: Sweep) -> None:
    """One worker: take the next trial (re-queued ones first) until the study has --trials ended trials."""
    storage = sweep.study._storage
    while True:
        with sweep.lock:
            optuna.storages.fail_stale_trials(sweep.study)
            trials = sweep.study.get_trials(deepcopy=False)
            done = ended_count(trials)
            running, waiting = (sum(t.state == state for t in trials) for state in (RUNNING, WAITING))
            if done >= sweep.trials or sweep.stopping.is_set():
                return
            trial = sweep.study.ask() if waiting or done + running < sweep.trials else None
        if trial is None:  # the remaining trials run elsewhere: wait until they end or go stale
            time.sleep(sweep.heartbeat)
            continue
        stop = threading.Event()
        threading.Thread(target=heartbeat, args=(storage, trial, sweep.heartbeat, stop), daemon=True).start()
        start = time.time()
        try:
            value = run_trial(sweep, trial)
            state = optuna.trial.TrialState.COMPLETE
        except Pruned as e:
            value, state = None, optuna.trial.TrialState.PRUNED
            trial.set_user_attr("pruned", str(e))
        except RuntimeError as e:
            value, state = None, optuna.trial.TrialState.FAIL
            trial.set_user_attr("error", str(e))
        except Interrupted:
            requeue(sweep.study, trial)
            return
        finally:
            stop.set()
        trial.set_user_attr("seconds", round(time.time() - start, 1))
        sweep.study.tell(trial, value, state=state)
        say(progress_line(sweep, trial.number))


def progress_line(sweep: Sweep, number: int) -> str:
    trials = sweep.study.get_trials(deepcopy=False)
    trial = trials[number]
    attrs = trial.user_attrs
    outcome = {
        COMPLETE: lambda: f"{sweep.metric} {trial.value:.4f}",
        PRUNED: lambda: attrs.get("pruned", "pruned"),
        FAIL: lambda: f"failed: {attrs.get('error')}",
    }[trial.state]()
    flags = " ".join(f"--{k} {v}" for k, v in trial.user_attrs.get("flags", {}).items())
    done = ended_count(trials)
    best = chosen_trial(sweep.study)
    best_text = f"best: trial {best.number} ({best.value:.4f})" if best else "no complete trial yet"
    return f"[{done}/{sweep.trials}] trial {number} {outcome} | {flags} | {attrs.get('seconds', 0):.0f} s | {best_text}"


def say(text: str) -> None:
    print(text, flush=True)


def requeue(study: optuna.Study, trial: optuna.Trial) -> None:
    """What the heartbeat check does to a trial whose sweep died, done at once: fail it and queue its retry."""
    storage = study._storage
    storage.set_trial_state_values(trial._trial_id, state=FAIL)
    storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial._trial_id))


def chosen_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the best validation value; the earliest on ties."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def run_workers(sweep: Sweep, workers: int) -> None:
    """`workers` threads running work(); Ctrl-C stops them in order (their trials re-queued) and exits with 130."""
    errors: list[BaseException] = []
    finished = [threading.Event() for _ in range(workers)]

    def guarded(done: threading.Event) -> None:
        try:
            work(sweep)
        except BaseException as e:  # shown by the main thread
            errors.append(e)
        finally:
            done.set()

    for done in finished:
        threading.Thread(target=guarded, args=(done,), daemon=True).start()
    # Waiting on events, not Thread.join: a Ctrl-C inside join() can leave the thread looking finished (CPython).
    try:
        while not all(done.wait(0.5) for done in finished):
            pass
    except KeyboardInterrupt:
        sweep.stopping.set()
        while not all(done.wait(1) for done in finished):
            pass
        for error in errors:
            print(f"error while stopping: {type(error).__name__}: {error}", file=sys.stderr)
        print("\ninterrupted: running trials were re-queued; run the same command to resume them", file=sys.stderr)
        raise SystemExit(130) from None
    if errors:
        raise errors[0]
