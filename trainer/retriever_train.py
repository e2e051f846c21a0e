"""Stage-1 training: every position of a (left-padded) window predicts its next item (cross-entropy over all items,
padding ignored), AdamW, validation every `val_iterations` steps with early stopping on `best_metric`, and
checkpoints that let --resume continue exactly where a run stopped."""

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from dataloader.retriever_data import epoch_batches, eval_data, training_windows, window_step
from datasets.split import SplitData
from model.interface import NextItemModel
from trainer.retriever_eval import evaluate
from trainer.run_state import (
    HISTORY,
    Clock,
    SessionClock,
    append_validation,
    clock_summary,
    peak_rss_mib,
    truncate_history,
    write_summary,
)
from trainer.runtime import rng_state, set_rng_state
from utils.errors import InputError, one_line
from utils.files import atomic_torch_save, load_checkpoint
from utils.settings import flag_field

BEST, LAST = "checkpoint_best.pt", "checkpoint_last.pt"  # in the run folder


@dataclass(frozen=True)
class RetrieverTraining:
    """How a retriever is trained and selected (the retriever's training flags)."""

    seed: int
    batch_size: int = flag_field("train_batch_size")
    lr: float
    weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    label_smoothing: float
    enable_lr_schedule: bool
    warmup_steps: int
    num_epochs: int
    max_steps: int | None
    max_len: int = flag_field("bert_max_len")  # the windows' length
    sliding_window_size: float
    train_all_items: bool
    val_iterations: int
    val_batch_size: int
    early_stopping: bool
    early_stopping_patience: int
    best_metric: str
    metric_ks: tuple[int, ...]


def build_optimizer(model: NextItemModel, lr: float, weight_decay: float, eps: float) -> torch.optim.AdamW:
    # As the original: no decay on parameters whose name contains "bias" or "layer_norm"; the LRU's
    # params_log (nu, theta, gamma) is decayed.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "bias" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of a loop over them (docs/performance.md)
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer, enabled: bool, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then linear decay to 0 at total_steps; a constant factor 1 when not enabled."""

    def factor(step: int) -> float:
        if not enabled:
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(
    model: NextItemModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    max_grad_norm: float,
    label_smoothing: float = 0.0,
) -> float:
    model.train()
    # Drop the columns left of every row's first label (padding in every row; counting labels instead
    # would cut rows whose later labels are masked): real positions do not depend on padding (tested).
    width = labels.shape[1] - int((labels > 0).int().argmax(1).min())
    tokens, labels = model.training_inputs(tokens[:, -width:], labels[:, -width:])
    hidden = model.encode(tokens)
    real = labels > 0
    # Scores only at positions with a label: the [positions, items] product dominates the step's cost.
    loss = model.next_item_loss(hidden[real], labels[real], label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return loss.item()


@dataclass
class RetrieverState:
    """Where a training run stands: its position in the data, best validation, early stopping, and the summary's
    loss and clock over every session. Saved in checkpoint_last.pt as a plain dict (checkpoints load with
    weights_only=True) whose keys are the field names, so --resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # the next batch of the epoch
    best_value: float = -math.inf
    best_step: int | None = None
    patience: int = 0  # validations since the best one (early stopping)
    done: bool = False
    loss_sum: float = 0.0  # since the last validation
    loss_count: int = 0
    train_loss: float | None = None  # mean training loss of the last validation interval
    train_seconds: float = 0.0  # the run's clock up to the last save: training incl. validation
    validation_seconds: float = 0.0
    sessions: int = 0
    peak_rss_mib: float | None = None  # the highest peak resident memory of the run's processes (None: not recorded)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "RetrieverState":
        # checkpoints saved before the summary fields existed lack them: they start from the defaults
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})

    def clock(self) -> Clock:
        return Clock(self.train_seconds, self.validation_seconds, self.sessions)

    def set_clock(self, clock: Clock) -> None:
        self.train_seconds, self.validation_seconds, self.sessions = (
            clock.seconds, clock.validation_seconds, clock.sessions,
        )  # fmt: skip


def save_last_checkpoint(path: Path, model: NextItemModel, optimizer, scheduler, state: RetrieverState) -> None:
    """Everything --resume needs to continue exactly: weights, optimizer, schedule, RNGs, state."""
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "state": state.to_dict(),
        },
        path,
    )


def load_last_checkpoint(
    path: Path, model: NextItemModel, optimizer, scheduler, device: torch.device
) -> RetrieverState:
    """Restore what save_last_checkpoint wrote; return the training state."""
    ckpt = load_checkpoint(path, device)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        return RetrieverState.from_dict(ckpt["state"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: does not fit this run's model ({one_line(e, 300)})") from None


def update_best(state: RetrieverState, value: float) -> bool:
    """Count one validation of `value` for model selection and early stopping; True when it is a new best."""
    if value > state.best_value:
        state.best_value, state.best_step, state.patience = value, state.step, 0
        return True
    state.patience += 1
    return False


def short_metrics(metrics: dict[str, float]) -> dict[str, str]:
    """R@10 / N@10 for the progress bar."""
    return {
        k.replace("Recall", "R").replace("NDCG", "N"): f"{metrics[k]:.4f}"
        for k in ("Recall@10", "NDCG@10")
        if k in metrics
    }


class Session:
    """One start of a run's training (the first, or a --resume): the data, optimizer and state it advances, and
    the clock that adds the time since this start to the run's total at every save."""

    def __init__(
        self,
        model: NextItemModel,
        split: SplitData,
        training: RetrieverTraining,
        run_dir: Path,
        device: torch.device,
        resume: bool,
        wandb_run,
    ) -> None:
        self.model, self.training, self.run_dir, self.device = model, training, run_dir, device
        self.wandb_run = wandb_run
        step = window_step(training.sliding_window_size, training.max_len)
        self.tokens, self.labels = training_windows(split.train, training.max_len, step, training.train_all_items)
        self.val_data = eval_data(split, "val", training.max_len)
        self.steps_per_epoch = math.ceil(len(self.tokens) / training.batch_size)
        self.optimizer = build_optimizer(model, training.lr, training.weight_decay, training.adam_epsilon)
        total_steps = self.steps_per_epoch * training.num_epochs
        self.scheduler = build_scheduler(
            self.optimizer, training.enable_lr_schedule, training.warmup_steps, total_steps
        )
        self.state = RetrieverState()
        if resume and (run_dir / LAST).exists():
            self.state = load_last_checkpoint(run_dir / LAST, model, self.optimizer, self.scheduler, device)
            truncate_history(run_dir / HISTORY, self.state.step)
            print(f"resumed from {run_dir / LAST} at step {self.state.step} ({self.epochs():.1f} epochs)")
        self.clock = SessionClock(self.state.clock())
        self.last_val: dict[str, float] = {}

    def epochs(self) -> float:
        return self.state.step / self.steps_per_epoch

    def reached_max_steps(self) -> bool:  # e.g. --resume of a run that stopped at this --max_steps
        return self.training.max_steps is not None and self.state.step >= self.training.max_steps

    def save(self) -> None:
        self.state.set_clock(self.clock.elapsed())
        self.state.peak_rss_mib = max(self.state.peak_rss_mib or 0.0, peak_rss_mib())
        save_last_checkpoint(self.run_dir / LAST, self.model, self.optimizer, self.scheduler, self.state)

    def validate(self) -> dict[str, float]:
        """One validation: update the best value and patience (state.done on early stopping), save
        checkpoint_best.pt on improvement, append to val_history.jsonl (and wandb). Returns the metrics."""
        state, training, start = self.state, self.training, time.time()
        metrics, _ = evaluate(
            self.model, self.val_data, training.val_batch_size, list(training.metric_ks), self.device, desc="validation"
        )
        value = metrics[training.best_metric]
        improved = update_best(state, value)
        if improved:
            atomic_torch_save(
                {"model": self.model.state_dict(), "step": state.step, "value": value}, self.run_dir / BEST
            )
        state.train_loss = state.loss_sum / max(1, state.loss_count)
        record = {"step": state.step, "epoch": state.epoch, "train_loss": state.train_loss, **metrics, "best": improved}
        record["val_seconds"] = round(time.time() - start, 3)
        self.clock.add_validation(time.time() - start)
        append_validation(self.run_dir / HISTORY, record)
        if self.wandb_run is not None:
            self.wandb_run.log(
                {"train/loss": state.train_loss, **{f"val/{k}": v for k, v in metrics.items()}}, step=state.step
            )
        state.loss_sum, state.loss_count = 0.0, 0
        tqdm.write(
            f"step {state.step} (epoch {state.epoch}): {training.best_metric} {value:.4f} "
            f"(best {state.best_value:.4f} at {state.best_step}) NDCG@10 {metrics.get('NDCG@10', math.nan):.4f}"
        )
        if training.early_stopping and state.patience >= training.early_stopping_patience:
            tqdm.write(f"early stopping: {state.patience} validations without a better {training.best_metric}")
            state.done = True
        return metrics

    def run_epoch(self) -> None:
        """Train from the state's position to the end of its epoch, or until done or --max_steps."""
        state, training = self.state, self.training
        batches = epoch_batches(len(self.tokens), training.batch_size, training.seed, state.epoch)
        # a context: an error or Ctrl-C closes (clears) the bar, so the one error line starts on a line of its own
        with tqdm(
            total=len(batches), initial=state.batch, desc=f"epoch {state.epoch + 1}", leave=False, mininterval=2
        ) as bar:
            while not state.done and not self.reached_max_steps():
                index = batches[state.batch]
                tokens, labels = self.tokens[index].to(self.device), self.labels[index].to(self.device)
                loss = train_step(
                    self.model, self.optimizer, self.scheduler, tokens, labels, training.max_grad_norm,
                    training.label_smoothing,
                )  # fmt: skip
                state.loss_sum, state.loss_count = state.loss_sum + loss, state.loss_count + 1
                state.step, state.batch = state.step + 1, state.batch + 1
                end_of_epoch = state.batch == len(batches)
                if end_of_epoch:  # the state a resumed run starts from: the next epoch's first batch
                    state.epoch, state.batch = state.epoch + 1, 0
                bar.update(1)
                bar.set_postfix({"loss": f"{loss:.3f}", **short_metrics(self.last_val)}, refresh=False)
                if state.step % training.val_iterations == 0:
                    self.last_val = self.validate()
                    self.save()
                if end_of_epoch:
                    break


def train(
    model: NextItemModel,
    split: SplitData,
    training: RetrieverTraining,
    run_dir: Path,
    device: torch.device,
    resume: bool = False,
    wandb_run=None,
) -> dict:
    """Train with validation every training.val_iterations steps and early stopping; return the final state (the
    plain dict saved in checkpoint_last.pt).

    Writes checkpoint_best.pt (best validation training.best_metric; the last model when no validation ran),
    checkpoint_last.pt (everything --resume needs, saved at each validation and when training stops),
    val_history.jsonl and training_summary.json. Stopping at training.max_steps leaves a state that --resume
    continues exactly as if it had not stopped.
    """
    session = Session(model, split, training, run_dir, device, resume, wandb_run)
    state = session.state
    while not state.done and not session.reached_max_steps() and state.epoch < training.num_epochs:
        session.run_epoch()
    if state.epoch >= training.num_epochs:
        state.done = True
    if state.loss_count:  # steps since the last validation (or no validation at all)
        state.train_loss = state.loss_sum / state.loss_count
    session.save()
    if not (run_dir / BEST).exists():
        print(f"note: no validation ran (--val_iterations {training.val_iterations}); the last model is {BEST}")
        atomic_torch_save({"model": model.state_dict(), "step": state.step, "value": None}, run_dir / BEST)
    write_summary(run_dir, training_summary(state, training, session.steps_per_epoch))
    return state.to_dict()


def training_summary(state: RetrieverState, training: RetrieverTraining, steps_per_epoch: int) -> dict:
    """training_summary.json: where training stopped and why, the model kept, loss and time over all sessions."""
    if state.patience >= training.early_stopping_patience and training.early_stopping:
        stopped = "early stopping"
    elif training.max_steps is not None and state.step >= training.max_steps:
        stopped = f"--max_steps {training.max_steps}"
    else:
        stopped = f"--num_epochs {training.num_epochs}"
    return {
        "steps": state.step,
        "epochs": round(state.step / steps_per_epoch, 3),
        "stopped_by": stopped,
        "best_step": state.best_step,
        "best_metric": training.best_metric,
        "best_value": None if state.best_step is None else state.best_value,
        "best_is_last_model": state.best_step is None,
        "train_loss": state.train_loss,
        **clock_summary(state.clock()),
        "peak_rss_mib": state.peak_rss_mib,
    }
