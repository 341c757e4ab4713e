"""The training state on disk (train/train.py): what is saved with `accelerator.save_state`, where, and
how `--resume` restores it, including states saved by earlier versions of train.py.

A state folder is `state_dir/step_<N>` (N: optimizer steps) holding accelerate's files: the model,
the optimizer, every process's random states, `custom_checkpoint_0.pkl` (the learning-rate
scheduler, `SavedLRScheduler`), `custom_checkpoint_1.pkl` (`TrainingProgress`) and, with
`ema_decay`, `custom_checkpoint_2.pkl` (the moving average of the weights, an `AveragedModel`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from accelerate import Accelerator


@dataclass
class TrainingProgress:
    """Where the run is and what it has measured: the run's state besides the weights and optimizer."""

    epoch: int = 0  # epochs completed
    chunks_in_epoch: int = 0  # chunks of the current epoch done (by each process)
    batches_per_chunk: Optional[int] = None  # the chunk size chunks_in_epoch counts (None: saved before it was kept)
    global_step: int = 0  # optimizer steps
    train_seconds: float = 0.0  # wall time of all segments
    cpu_seconds: Optional[float] = 0.0  # train_seconds x processes x threads (x GPUs on GPU)
    best_exprate: float = -1.0
    best: dict = field(default_factory=dict)  # the best held-out evaluation
    history: dict = field(default_factory=lambda: {"step": [], "loss": [], "lr": []})
    evals: list = field(default_factory=list)  # every held-out evaluation
    commands: list = field(default_factory=list)  # each segment's command

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "batches_in_epoch" in state:  # saved by train.py before chunks (25 Nov 2026): batches, not chunks
            self.legacy_batches_in_epoch = state.pop("batches_in_epoch")
        state.setdefault("cpu_seconds", None)  # saved before it was counted: set on resume
        vars(self).update(state)


class SavedLRScheduler:
    """The learning-rate scheduler (a transformers `LambdaLR`) as custom object 0 of the state.

    A state saved before the schedules came from transformers holds train.py's own `LRSchedule`
    ({"steps", "base_lrs", "scale", ...}); it is read as the transformers scheduler at that step,
    which continues at the same learning rate: after the warmup both are the same cosine of the step.
    (The old warmup reached its peak one step earlier, so a state saved inside the warmup continues
    one warmup step behind until the warmup ends.)
    """

    def __init__(self, lr_scheduler):
        self.lr_scheduler = lr_scheduler

    def state_dict(self) -> dict:
        return self.lr_scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "steps" in state:  # LRSchedule.state_dict() of train.py before issue 16
            if state.get("scale", 1.0) != 1.0:
                raise ValueError("this state was saved with lr_scheduler: plateau, which train.py no longer has")
            # The optimizer (restored before the custom objects) holds that step's rates already.
            rates = [group["lr"] for group in self.lr_scheduler.optimizer.param_groups]
            state = {**self.lr_scheduler.state_dict(), "base_lrs": list(state["base_lrs"]),
                     "last_epoch": state["steps"], "_step_count": state["steps"] + 1, "_last_lr": rates}
        self.lr_scheduler.load_state_dict(state)


def move_lr_scheduler(lr_scheduler, step: int) -> None:
    """Puts the scheduler at `step` and gives the optimizer that step's learning rates."""
    lr_scheduler.last_epoch = step - 1
    lr_scheduler.step()  # LambdaLR.step() computes the rates of last_epoch + 1 and sets them


def state_folders(state_dir: Path) -> list[Path]:
    """Complete saved states, oldest first (a folder is renamed to step_* only once fully written)."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))


def save_training_state(accelerator: Accelerator, state_dir: Path, step: int, keep: int) -> Path:
    """Writes the accelerate state to state_dir/step_<step> atomically (write .tmp, then rename) and
    keeps the latest `keep` states.

    Not accelerate's `automatic_checkpoint_naming` / `total_limit`: they name states by save count
    (not step), write in place, and delete the oldest state before the new one is written, so a kill
    during a save leaves fewer complete states than asked for; a stop also saves twice at one step.
    """
    final = state_dir / f"step_{step:09d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Pickle rather than safetensors: channels_last weights are not contiguous tensors.
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # saved again at the same step: swap, so a complete state exists at every moment
            replaced = final.with_name(final.name + ".old")
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
            tmp.rename(final)
            shutil.rmtree(replaced)
        else:
            tmp.rename(final)
        for old in state_folders(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# Custom object indices in a state: 0 the scheduler, 1 the progress, 2 the weight average (with ema_decay),
# the order in which train.resume_or_start registers them.
WEIGHT_AVERAGE_INDEX = 2


def latest_state_lacks_weight_average(state_dir: Path) -> bool:
    """True if there is a saved state and it holds no weight average (an older run, or ema_decay newly set)."""
    states = state_folders(state_dir)
    return bool(states) and not (states[-1] / f"custom_checkpoint_{WEIGHT_AVERAGE_INDEX}.pkl").is_file()


def resume_from_latest_state(accelerator: Accelerator, state_dir: Path, progress: TrainingProgress,
                             lr_scheduler, batches_per_chunk: int, compute_units: int) -> None:
    """Loads the latest complete state of `state_dir` into the registered objects and the progress.

    compute_units: this run's processes x threads, for states saved before CPU time was counted.
    """
    states = state_folders(state_dir)
    if not states:
        accelerator.print(f"--resume: no saved state in {state_dir}, starting from scratch")
        return
    # Every process saves its random state: their number is the saving run's process count.
    saved_processes = len(list(states[-1].glob("random_states_*.pkl"))) or accelerator.num_processes
    accelerator.load_state(str(states[-1]))
    if progress.cpu_seconds is None:  # saved before cpu_seconds was counted: one process count throughout
        progress.cpu_seconds = progress.train_seconds * saved_processes * compute_units / accelerator.num_processes
    legacy = vars(progress).pop("legacy_batches_in_epoch", None)
    if legacy is not None:
        progress.chunks_in_epoch = math.ceil(legacy / batches_per_chunk)
        accelerator.print(
            f"state saved by an older train.py ({legacy} batches into epoch {progress.epoch}): the rest "
            f"of this epoch continues in the new chunk order, from chunk {progress.chunks_in_epoch}"
        )
    saved_chunk_size = progress.batches_per_chunk
    if saved_chunk_size not in (None, batches_per_chunk):
        resume_with_other_chunk_size(progress, saved_chunk_size, batches_per_chunk)
        accelerator.print(
            f"state saved with {saved_chunk_size} batches per chunk, resumed with {batches_per_chunk}: the rest "
            f"of epoch {progress.epoch} continues in the new chunk order, from chunk {progress.chunks_in_epoch}"
        )
    progress.batches_per_chunk = batches_per_chunk
    if saved_processes != accelerator.num_processes:
        resume_with_other_process_count(progress, lr_scheduler, saved_processes, accelerator.num_processes)
        accelerator.print(
            f"the state was saved by {saved_processes} process(es), resumed by {accelerator.num_processes}: "
            "same weights, optimizer, epoch and learning rate, not a bit-exact continuation"
        )
    accelerator.print(
        f"resumed from {states[-1]}: epoch {progress.epoch}, step {progress.global_step}, "
        f"chunk {progress.chunks_in_epoch} of the epoch, lr {lr_scheduler.get_last_lr()[0]:.3g}"
    )


def resume_with_other_process_count(progress: TrainingProgress, lr_scheduler, saved: int, now: int) -> None:
    """Continues a state saved by `saved` processes with `now` processes: same weights, optimizer state,
    epoch, position in the epoch and learning rate; not bit-exact (other random draws).

    One optimizer step takes one batch per process, so the schedule's position (in steps) scales by
    saved / now. Chunks are dealt to the processes in turn (chunk k of an epoch goes to process
    k % processes), so the chunks done per process scale by saved / now too.
    """
    move_lr_scheduler(lr_scheduler, round(lr_scheduler.last_epoch * saved / now))
    progress.chunks_in_epoch = progress.chunks_in_epoch * saved // now


def resume_with_other_chunk_size(progress: TrainingProgress, saved: int, now: int) -> None:
    """Continues a state saved with `saved` batches per chunk with `now`: the batches done in the epoch,
    counted in new chunks (rounded up). The epoch's chunk order depends on the chunk size, so the rest
    of the epoch is not the rest of the saved order: a few rows come twice or not at all this epoch."""
    progress.chunks_in_epoch = math.ceil(progress.chunks_in_epoch * saved / now)
    progress.batches_per_chunk = now
