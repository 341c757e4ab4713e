"""Trains an HMER model on CROHME with 🤗 Accelerate (CPU, one GPU or several: the same command).

    accelerate launch train/train.py --config train/configs/gru.yaml \
        --data_dir ../shared/crohme --output_dir checkpoints [--max_minutes 120] [--resume]

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 train/train.py ...` trains
with two processes (one torch thread each, gloo); `accelerate launch --cpu --num_processes 2` only
ever starts one process. A run resumed with as many processes as it was saved with continues
bit-exactly; with another number it continues from the same weights, optimizer state, epoch
position and learning rate (moving a CPU run to two processes or to a GPU, say).

The settings are `TrainingConfig` (train/config.py): a YAML config sets what differs from its
defaults, the command line overrides any key (`--learning_rate 1e-3`, `--model.decoder_type
transformer`). `main` runs these steps:

1. `build_data`: the CROHME training set less a fixed held-out slice for model selection
   (`heldout_size` expressions chosen by a hash of their names, or with `heldout_by: writer` whole
   writers, as the test sets hold writers never seen in training); the test sets are never looked
   at. Training expressions are rendered from their strokes with random stroke-level augmentation
   and batched with expressions of similar size under a pixel budget (the order a function of
   (seed, epoch) only);
2. `build_model_and_optimizer`: the model, the `HMERProcessor` that inference uses too, AdamW and
   a learning-rate schedule from transformers; `--resume` then loads the latest saved state
   (train/checkpointing.py) and continues at the same step, learning rate and data order;
3. `train_one_epoch`: mixed precision, channels_last, gradient accumulation and clipping; between
   chunks it saves the training state every `save_every_minutes` (`save_state`, into `state_dir`,
   outside the repository) and stops when `stop_due` (`--max_minutes` for this segment,
   `--max_total_minutes` for all segments together, `--max_steps`) or on Ctrl+C or SIGTERM;
4. `evaluate_and_select` after every epoch and at a stop: greedy ExpRate on the held-out slice; the
   best model so far goes to `--output_dir` (`save_model`: `save_pretrained` weights and config,
   processor, training log, model card, curves). With `ema_decay`, the model scored and saved is
   the moving average of the weights (`build_weight_average`), and the raw weights are scored too.

Loss, learning rate and ExpRate go to TensorBoard (in `state_dir/logs`) and to
`training_curves.png` in `--output_dir`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


if __package__ in (None, ""):
    # `accelerate launch train/train.py` puts train/ first on sys.path, where this very file would
    # shadow the `train` package: put the repository root in front of it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    broadcast,
    gather_object,
    set_seed,
)
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_scheduler  # noqa: E402

from train.checkpointing import (  # noqa: E402
    SavedLRScheduler,
    TrainingProgress,
    latest_state_lacks_weight_average,
    resume_from_latest_state,
    resume_with_other_process_count,  # noqa: F401  (tests import it from here)
    save_training_state,
)
from train.config import LR_SCHEDULERS, RunArguments, TrainingConfig, parse_args  # noqa: E402
from train.data import (  # noqa: E402
    HMERCollator,
    HMERTrainDataset,
    SizeGroupedBatchSampler,
    as_uint8_image,
    image_sizes,
    select_heldout,
    single_thread_worker_init,
)
from train.evaluate_model import load_metric, predict_images  # noqa: E402
from train.model_card import (  # noqa: E402
    TEST_RESULTS,
    TRAINING_LOG,
    lineage_entry,
    read_test_exprates,
    write_model_card,
)


def check_optional_dependencies() -> None:
    """TensorBoard logs and the curves plot need the `train` extra: fail now, not after an epoch."""
    for module in ("matplotlib", "tensorboard"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise SystemExit(f"train/train.py needs {module}, which the `train` extra installs: "
                             "pip install -e '.[train]'") from None


# ----------------------------------------------------------------------------- this segment


@dataclass
class SegmentClock:
    """The timers of this segment (what one command trains); not saved."""

    compute_units: int  # processes x torch threads (x GPUs): turns wall time into CPU time
    started: float = field(default_factory=time.time)  # --max_minutes counts from here
    counted: float = field(default_factory=time.time)  # train time up to here is in the progress
    last_save: float = field(default_factory=time.time)
    last_save_step: int = 0

    def count(self, progress: TrainingProgress) -> None:
        """Adds the time since the last count into the progress."""
        now = time.time()
        progress.train_seconds += now - self.counted
        progress.cpu_seconds += (now - self.counted) * self.compute_units
        self.counted = now


class StopOnSignal:
    """Turns the first SIGINT (Ctrl+C) or SIGTERM into `accelerator.set_trigger()`: a stop at the next
    chunk boundary, as if the time budget were spent (state saved, held-out evaluation, `--resume`
    continues from there). A second signal stops at once (the last saved state is kept).

    Under `accelerate launch` the signal goes to the launcher, which forwards it to every process
    and kills them 30 s later: the state is therefore saved before the final evaluation.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        self.accelerator.set_trigger()
        print(f"\n{signal.Signals(signum).name}: stopping after this chunk with a clean save "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- building the run


@dataclass
class TrainingData:
    """The training set with its chunk sampler, and the held-out slice the model is selected on."""

    train_set: HMERTrainDataset
    sampler: SizeGroupedBatchSampler
    heldout_images: list  # (H, W) uint8 arrays
    heldout_references: list  # space-separated reference tokens


def build_accelerator(config: TrainingConfig) -> Accelerator:
    accelerator = Accelerator(
        # Without a GPU, run on the CPU; several processes launched by `accelerate launch --multi_gpu
        # --num_processes N` (torchrun) then train together over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=config.state_dir, logging_dir=f"{config.state_dir}/logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    return accelerator


def build_data(accelerator: Accelerator, config: TrainingConfig, data_dir: str, cache_dir: Optional[str]) -> TrainingData:
    from data_scripts.crohme import load_crohme

    with accelerator.main_process_first():  # the first process builds the cache, the others read it
        dataset = load_crohme(data_dir, "train", cache_dir=cache_dir)
    train_idx, heldout_idx = select_heldout(dataset, config.heldout_size, config.heldout_by)
    if config.limit:
        train_idx = train_idx[: config.limit]
    sizes = image_sizes(dataset)
    heldout = dataset.select(heldout_idx)
    synthetic = None
    if config.synthetic_share > 0:
        from data_scripts.synth import SyntheticExpressions

        # From the training part only: the held-out slice's ink and formulas stay unseen.
        synthetic = SyntheticExpressions(dataset, train_idx, substitution_share=config.synthetic_substitution_share,
                                         match_length=config.synthetic_match_length)
    return TrainingData(
        train_set=HMERTrainDataset(dataset, train_idx, augment=config.augment, seed=config.seed,
                                   synthetic=synthetic, synthetic_share=config.synthetic_share),
        sampler=SizeGroupedBatchSampler([sizes[i] for i in train_idx], config.pixel_budget, config.max_batch_size,
                                        batches_per_chunk=config.batches_per_chunk, seed=config.seed),
        heldout_images=[as_uint8_image(image) for image in heldout["image"]],
        heldout_references=[" ".join(tokens) for tokens in heldout["tokens"]],
    )


# Model settings that only act while training: a run that starts from saved weights may change them
# (a regularized second cycle). Every other model setting is fixed by the saved weights' shapes.
TRAINING_ONLY_MODEL_KEYS = ("dropout", "encoder_drop_rate", "label_smoothing")


def build_model_and_processor(model_settings: dict, init_from: Optional[str]):
    """A new model from `model_settings` (HMERConfig keyword arguments), or a saved one from
    `init_from`, and its processor.

    With `init_from`, the keys of `model_settings` in `TRAINING_ONLY_MODEL_KEYS` replace the saved
    values; any other key must agree with the saved model (a clear error instead of a silent ignore).
    """
    import modeling_hmer  # noqa: F401  (registers the Auto classes)
    from modeling_hmer.configuration_hmer import HMERConfig
    from modeling_hmer.image_processing_hmer import HMERImageProcessor
    from modeling_hmer.modeling_hmer import HMERForConditionalGeneration
    from modeling_hmer.processing_hmer import HMERProcessor
    from modeling_hmer.tokenization_hmer import HMERTokenizer

    if not init_from:
        model = HMERForConditionalGeneration(HMERConfig(**model_settings))
        return model, HMERProcessor(image_processor=HMERImageProcessor(), tokenizer=HMERTokenizer())
    overrides = {key: value for key, value in model_settings.items() if key in TRAINING_ONLY_MODEL_KEYS}
    fixed = {key: value for key, value in model_settings.items() if key not in TRAINING_ONLY_MODEL_KEYS}
    saved = HMERConfig.from_pretrained(init_from).to_dict()
    asked = HMERConfig(**{**saved, **fixed}).to_dict()
    clashes = sorted(key for key in asked if asked[key] != saved.get(key))
    if clashes:
        details = ", ".join(f"{key}={saved.get(key)!r} (asked {asked[key]!r})" for key in clashes)
        raise ValueError(
            f"--init_from {init_from}: the saved model has {details}; these settings follow from its "
            f"weights. Only {', '.join(TRAINING_ONLY_MODEL_KEYS)} can change when starting from saved weights."
        )
    return HMERForConditionalGeneration.from_pretrained(init_from, **overrides), HMERProcessor.from_pretrained(init_from)


def build_optimizer(model, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, with no weight decay on biases and normalization weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas))



def build_lr_scheduler(optimizer, config: TrainingConfig, total_steps: int):
    """cosine: down to `min_lr_ratio` x learning_rate at `total_steps`; constant: flat after the warmup.
    Stepped once per optimizer step (a `torch.optim.lr_scheduler.LambdaLR`)."""
    kwargs = {"min_lr_rate": config.min_lr_ratio} if config.lr_scheduler == "cosine" else {}
    return get_scheduler(LR_SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps, scheduler_specific_kwargs=kwargs)


def build_model_and_optimizer(accelerator: Accelerator, config: TrainingConfig, data: TrainingData,
                              init_from: Optional[str]):
    """(model, processor, optimizer, lr_scheduler, train_loader), prepared by the accelerator."""
    model, processor = build_model_and_processor(config.model, init_from)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    train_loader = DataLoader(
        data.train_set,
        batch_sampler=data.sampler,
        collate_fn=HMERCollator(processor, config.batches_per_chunk),
        num_workers=config.num_workers,
        worker_init_fn=single_thread_worker_init,
        persistent_workers=False,
        # Its own generator: starting an epoch's iterator draws a seed from it, not from the global
        # torch RNG, so a resumed run's dropout draws stay those of an uninterrupted run.
        generator=torch.Generator().manual_seed(config.seed),
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # Each chunk yields `batches_per_chunk` batches; `len(train_loader)` counts this process's chunks.
    steps_per_epoch = math.ceil(len(train_loader) * config.batches_per_chunk / config.gradient_accumulation_steps)
    lr_scheduler = build_lr_scheduler(optimizer, config, steps_per_epoch * config.num_epochs)
    return model, processor, optimizer, lr_scheduler, train_loader


def build_weight_average(accelerator: Accelerator, model, config: TrainingConfig) -> Optional[AveragedModel]:
    """An exponential moving average of the weights (`config.ema_decay`; None when 0), updated after
    every optimizer step. It averages the BatchNorm running statistics too (`use_buffers`): the raw
    statistics follow the last few batches, which moved neighbouring held-out scores by points."""
    if not config.ema_decay:
        return None
    return AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                         use_buffers=True)


def resume_or_start(accelerator: Accelerator, config: TrainingConfig, args: RunArguments, model,
                    weight_average: Optional[AveragedModel], progress: TrainingProgress, lr_scheduler,
                    clock: SegmentClock) -> None:
    """Registers what a state holds beyond the model and optimizer (the scheduler, the progress and the weight
    average, in the order that names their files: see `checkpointing.WEIGHT_AVERAGE_INDEX`) and, with `--resume`,
    loads the latest state. A state saved without an average (an older run, or `ema_decay` newly set) starts the
    average from the resumed weights."""
    accelerator.register_for_checkpointing(SavedLRScheduler(lr_scheduler), progress)
    restart_average = (weight_average is not None and args.resume
                       and latest_state_lacks_weight_average(Path(config.state_dir)))
    if weight_average is not None and not restart_average:
        accelerator.register_for_checkpointing(weight_average)
    if args.resume:
        resume_from_latest_state(accelerator, Path(config.state_dir), progress, lr_scheduler,
                                 config.batches_per_chunk, clock.compute_units)
    if restart_average:
        # Not loaded from the state, so it still holds the starting weights (and n_averaged 0).
        weight_average.module.load_state_dict(accelerator.unwrap_model(model).state_dict())
        accelerator.register_for_checkpointing(weight_average)
        accelerator.print("the resumed state holds no weight average: it starts from the resumed weights")


# ----------------------------------------------------------------------------- training


def train_one_epoch(accelerator: Accelerator, model, optimizer, lr_scheduler, train_loader, sampler,
                    config: TrainingConfig, progress: TrainingProgress, clock: SegmentClock, args: RunArguments,
                    evaluate, weight_average: Optional[AveragedModel] = None) -> bool:
    """Trains the rest of the current epoch; True if it stopped early (`stop_due` or a signal).

    Between chunks, never inside a gradient accumulation, it saves the state when one is due,
    scores the held-out slice every `eval_every_steps` (`evaluate(epoch=..., save_to=...)`) and
    checks for a stop; every process takes these decisions together.
    """
    epoch, skip = progress.epoch, progress.chunks_in_epoch
    sampler.set_epoch(epoch)
    train_loader.set_epoch(epoch)
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    model.train()
    bar = tqdm(total=len(train_loader), initial=skip, desc=f"epoch {epoch}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    running_loss, running_batches, running_images = torch.zeros((), device=accelerator.device), 0, 0
    log_start = time.time()
    for chunk in loader:
        for batch in chunk:  # the collator's size-split batches of this chunk
            running_loss += training_step(accelerator, model, optimizer, batch, config)
            running_batches += 1
            running_images += batch["labels"].shape[0]
            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            lr_scheduler.step()
            if weight_average is not None:
                weight_average.update_parameters(accelerator.unwrap_model(model))
            if progress.global_step % config.logging_steps == 0:
                images_per_s = running_images * accelerator.num_processes / (time.time() - log_start)
                bar.set_postfix(log_training(accelerator, progress, running_loss / running_batches,
                                             lr_scheduler.get_last_lr()[0], images_per_s, epoch))
                running_loss.zero_()
                running_batches, running_images, log_start = 0, 0, time.time()
        progress.chunks_in_epoch += 1
        bar.update(1)
        if not accelerator.sync_gradients:
            continue  # never save or stop in the middle of gradient accumulation
        if stop_due(args, progress, clock):
            accelerator.set_trigger()
        if accelerator.check_trigger():  # a stop asked for by any process (budget or signal)
            bar.close()
            return True
        if save_due(accelerator, config, progress, clock):
            save_state(accelerator, config, progress, clock)
        last_eval_step = progress.evals[-1]["step"] if progress.evals else 0
        if config.eval_every_steps and progress.global_step - last_eval_step >= config.eval_every_steps \
                and progress.chunks_in_epoch < len(train_loader):  # the epoch's end is scored anyway
            evaluate(epoch=progress.epoch + progress.chunks_in_epoch / len(train_loader), save_to=args.output_dir)
            model.train()
    bar.close()
    return False


def training_step(accelerator: Accelerator, model, optimizer, batch: dict, config: TrainingConfig) -> torch.Tensor:
    """Forward, backward, clipping and optimizer step (applied once per gradient accumulation); the loss."""
    with accelerator.accumulate(model):
        pixel_values = batch["pixel_values"]
        if config.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        loss = model(pixel_values=pixel_values, pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach().float()


def log_training(accelerator: Accelerator, progress: TrainingProgress, loss: torch.Tensor, lr: float,
                 images_per_s: float, epoch: int) -> dict:
    """Records the mean loss since the last log (over all processes) and the lr; the progress bar's figures."""
    mean_loss = accelerator.reduce(loss, reduction="mean").item()
    progress.history["step"].append(progress.global_step)
    progress.history["loss"].append(mean_loss)
    progress.history["lr"].append(lr)
    accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/epoch": epoch,
                     "train/images_per_s": images_per_s}, step=progress.global_step)
    return {"loss": f"{mean_loss:.3f}", "lr": f"{lr:.2e}", "img_s": f"{images_per_s:.1f}"}


def stop_due(args: RunArguments, progress: TrainingProgress, clock: SegmentClock) -> bool:
    """This segment's time (--max_minutes), the run's time (--max_total_minutes) or steps (--max_steps) spent."""
    now = time.time()
    return ((args.max_minutes is not None and (now - clock.started) / 60 >= args.max_minutes)
            or (args.max_total_minutes is not None
                and (progress.train_seconds + now - clock.counted) / 60 >= args.max_total_minutes)
            or (args.max_steps is not None and progress.global_step >= args.max_steps))


def save_state(accelerator: Accelerator, config: TrainingConfig, progress: TrainingProgress, clock: SegmentClock) -> None:
    """Saves the training state, with the time trained so far counted into it."""
    clock.count(progress)
    save_training_state(accelerator, Path(config.state_dir), progress.global_step, config.keep_states)
    clock.last_save, clock.last_save_step = time.time(), progress.global_step


def save_due(accelerator: Accelerator, config: TrainingConfig, progress: TrainingProgress, clock: SegmentClock) -> bool:
    """`save_every_minutes` on the main process's clock (broadcast, so all agree), or `save_every_steps`."""
    minutes = broadcast(torch.tensor((time.time() - clock.last_save) / 60, device=accelerator.device)).item()
    steps = progress.global_step - clock.last_save_step
    return minutes >= config.save_every_minutes or bool(config.save_every_steps and steps >= config.save_every_steps)


# ----------------------------------------------------------------------------- evaluation and saving


def evaluate_heldout(accelerator, model, processor, data: TrainingData, config: TrainingConfig) -> dict:
    """Greedy ExpRate on the held-out slice; each process decodes every num_processes-th image."""
    sync_buffers(accelerator, model)
    images = data.heldout_images
    mine = list(range(accelerator.process_index, len(images), accelerator.num_processes))
    predictions = predict_images(
        accelerator.unwrap_model(model),
        processor,
        [images[i] for i in mine],
        num_beams=1,
        max_new_tokens=config.eval_max_new_tokens,
        batch_size=config.eval_batch_size,
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision),
        channels_last=config.channels_last,
        progress=accelerator.is_local_main_process,
    )
    by_position = dict(gather_object(list(zip(mine, predictions))))
    # Rejected images count as wrong: the slice is fixed, the score must not depend on what decodes.
    predictions = [by_position[i] if by_position[i] is not None else "" for i in range(len(images))]
    scores = load_metric().compute(predictions=predictions, references=data.heldout_references)
    return {key: float(scores[key]) for key in ("exprate", "le1", "le2", "le3", "ser")}


def evaluate_and_select(accelerator, model, processor, data: TrainingData, config: TrainingConfig,
                        progress: TrainingProgress, clock: SegmentClock, epoch: float, save_to: Optional[Path],
                        facts: dict, weight_average: Optional[AveragedModel] = None) -> dict:
    """Scores the held-out slice at `epoch` (fractional for a partial one) into the progress; a better
    model than the best so far is saved to `save_to` (None: only recorded, as the score to beat).

    With a weight average, the average is the model scored, selected and saved; the raw weights'
    figures are recorded beside it under "raw", to show what the average adds."""
    scored = model if weight_average is None else weight_average.module
    figures = evaluate_heldout(accelerator, scored, processor, data, config)
    raw = None if weight_average is None else evaluate_heldout(accelerator, model, processor, data, config)
    clock.count(progress)
    record = {"epoch": epoch, "step": progress.global_step, "minutes": progress.train_seconds / 60,
              "cpu_hours": progress.cpu_seconds / 3600, **figures, **({"raw": raw} if raw else {})}
    progress.evals.append(record)
    accelerator.log({f"heldout/{k}": v for k, v in figures.items()}, step=progress.global_step)
    if raw:
        accelerator.log({f"heldout_raw/{k}": v for k, v in raw.items()}, step=progress.global_step)
    accelerator.print(
        f"epoch {epoch:g} step {progress.global_step}: held-out ExpRate {100 * figures['exprate']:.2f}% "
        f"(<=1 {100 * figures['le1']:.2f}%, SER {100 * figures['ser']:.2f}%)"
        + (f"; raw weights {100 * raw['exprate']:.2f}% (SER {100 * raw['ser']:.2f}%)" if raw else "")
    )
    if not progress.best or is_better(record, progress.best, config.min_improvement):
        progress.best_exprate, progress.best = record["exprate"], record
        if save_to is not None:
            save_model(accelerator, scored, processor, save_to, progress, facts)
    return record


def is_better(record: dict, best: dict, min_improvement: float) -> bool:
    """Held-out ExpRate higher by more than min_improvement; on a tie (min_improvement 0), lower SER."""
    if record["exprate"] > best["exprate"] + min_improvement:
        return True
    return min_improvement == 0 and record["exprate"] == best["exprate"] and record["ser"] < best["ser"]


def save_model(accelerator, model, processor, folder: Path, progress: TrainingProgress, facts: dict) -> None:
    """The model in `save_pretrained` format, with its processor and reports (`write_reports`)."""
    if accelerator.is_main_process:  # test figures measured on the weights being replaced
        (Path(folder) / TEST_RESULTS).unlink(missing_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(folder, is_main_process=accelerator.is_main_process,
                              state_dict=contiguous_state_dict(unwrapped))
    if accelerator.is_main_process:
        processor.save_pretrained(folder)
        write_reports(Path(folder), progress, facts)


def write_reports(folder: Path, progress: TrainingProgress, facts: dict) -> None:
    """training_log.json (read by train/model_card.py and train/evaluate_model.py), the card, the curves.

    `facts` holds what does not change during the run: config, hardware, process count, sizes.
    """
    log = {"config": facts["config"], "evals": progress.evals, "best": progress.best,
           "epochs": progress.epoch, "steps": progress.global_step, "hours": progress.train_seconds / 3600,
           "cpu_hours": progress.cpu_seconds / 3600, **{k: v for k, v in facts.items() if k != "config"},
           "commands": progress.commands}
    (folder / TRAINING_LOG).write_text(json.dumps(log, indent=2) + "\n")
    write_model_card(folder)
    plot_curves(progress, folder / "training_curves.png")


def sync_buffers(accelerator: Accelerator, model) -> None:
    """Copies process 0's buffers (batch-norm statistics) to every process.

    DDP broadcasts buffers at the start of each forward pass, so after the last training step
    each process holds the statistics of its own last batch; evaluation and saving use process 0's.
    """
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def weights_digest(model) -> str:
    """SHA-256 of every parameter and buffer, to check that all processes hold the same model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def contiguous_state_dict(model) -> dict:
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


def hardware_description(accelerator: Accelerator) -> str:
    if accelerator.device.type == "cuda":
        device = torch.cuda.get_device_name(accelerator.device)
    else:
        device = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device = f"CPU ({device}, {os.cpu_count()} cores)"
    return f"{accelerator.num_processes} process(es) on {device}"


def plot_curves(progress: TrainingProgress, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps, losses = progress.history["step"], progress.history["loss"]
    axes[0].plot(steps, losses, lw=0.8)
    axes[0].set(title="training loss", xlabel="optimizer step", yscale="log" if losses and min(losses) > 0 else "linear")
    axes[1].plot(steps, progress.history["lr"], lw=0.8)
    axes[1].set(title="learning rate", xlabel="optimizer step")
    evals = progress.evals
    axes[2].plot([e["epoch"] for e in evals], [100 * e["exprate"] for e in evals], "o-", label="ExpRate")
    axes[2].plot([e["epoch"] for e in evals], [100 * e["le1"] for e in evals], "s--", label="<= 1 error")
    raw = [e for e in evals if "raw" in e]  # with ema_decay: the raw weights beside their average
    if raw:
        axes[2].plot([e["epoch"] for e in raw], [100 * e["raw"]["exprate"] for e in raw], "x:",
                     label="ExpRate, raw weights")
    axes[2].set(title="held-out slice (greedy)", xlabel="epoch", ylabel="%", ylim=(0, None))
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# Options whose value is a folder of this machine: a card says what goes there, not where it was.
PATH_PLACEHOLDERS = {"--output_dir": "OUTPUT_DIR", "--init_from": "PARENT_MODEL", "--cache_dir": "CACHE_DIR"}


def reproduce_command(argv: list[str], num_processes: int) -> str:
    """The command line of a run without its time budget and resume flags, and with placeholders
    for this machine's folders (`PATH_PLACEHOLDERS`; a Hub id after --init_from is kept).

    A resumed run continues exactly where it stopped, so a run done in several time-limited
    segments equals one uninterrupted run of this command (with as many processes).
    """
    kept, skip_next, placeholder = [], False, None
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if placeholder is not None:
            kept.append(placeholder if _is_local_path(arg) else arg)
            placeholder = None
            continue
        name = arg.split("=", 1)[0]
        if name in ("--resume", "--max_minutes", "--max_total_minutes", "--max_steps", "--state_dir", "--push_to_hub"):
            skip_next = "=" not in arg and name != "--resume"
            continue
        if name in PATH_PLACEHOLDERS:
            if "=" in arg:
                value = arg.split("=", 1)[1]
                kept.append(f"{name}={PATH_PLACEHOLDERS[name] if _is_local_path(value) else value}")
            else:
                kept.append(arg)
                placeholder = PATH_PLACEHOLDERS[name]
            continue
        kept.append(arg)
    launch = "accelerate launch" + (f" --multi_gpu --num_processes {num_processes}" if num_processes > 1 else "")
    return f"{launch} train/train.py {shlex.join(kept)}"


def _is_local_path(value: str) -> bool:
    """True for a folder of this machine (or a path-like value), False for a Hub id such as `user/model`."""
    return os.path.isabs(value) or value.startswith(".") or os.path.exists(value) or value.count("/") != 1


def parent_lineage(init_from: Optional[str]) -> tuple[Optional[str], list[dict]]:
    """(name, lineage) of the model a run starts from.

    `lineage` lists, oldest first, every run the parent descends from and the parent run itself, read
    from the parent folder's training_log.json: each run's name, data recipe, epochs trained, the epoch,
    CPU-hours and held-out ExpRate of the checkpoint it handed on, its test ExpRates (from the parent's
    test_results.json, when measured) and its CPU-hours in all: the lineage's learning curve. `name`
    replaces the parent's local path in the new run's records (its run name; a Hub id stays as it is).
    """
    if not init_from:
        return None, []
    log_path = Path(init_from) / TRAINING_LOG
    if not log_path.is_file():
        return (Path(init_from).name if _is_local_path(init_from) else init_from), []
    log = json.loads(log_path.read_text())
    # The parent folder's test results were measured on its weights, the ones handed on.
    run = lineage_entry(log, read_test_exprates(Path(init_from)))
    return run["run_name"] or Path(init_from).name, [*log.get("lineage", []), run]


def push_folder_to_hub(folder: Path, repo_id: str, message: str) -> str:
    """Uploads a saved model folder (weights, config, processor, card, curves) to a Hub model repo."""
    from huggingface_hub import HfApi

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"no saved model in {folder} to push")
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    return f"{api.endpoint}/{repo_id}"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args, config = parse_args(argv)
    check_optional_dependencies()
    accelerator = build_accelerator(config)
    clock = SegmentClock(compute_units=accelerator.num_processes
                         * (1 if accelerator.device.type == "cuda" else torch.get_num_threads()))
    data = build_data(accelerator, config, args.data_dir, args.cache_dir)
    model, processor, optimizer, lr_scheduler, train_loader = build_model_and_optimizer(
        accelerator, config, data, args.init_from)
    weight_average = build_weight_average(accelerator, model, config)
    progress = TrainingProgress(batches_per_chunk=config.batches_per_chunk)
    StopOnSignal(accelerator)  # Ctrl+C or SIGTERM from here on: finish the chunk, save, evaluate, then stop
    resume_or_start(accelerator, config, args, model, weight_average, progress, lr_scheduler, clock)
    progress.commands.append(reproduce_command(sys.argv[1:] if argv is None else argv, accelerator.num_processes))

    parent, lineage = parent_lineage(args.init_from)
    # No folder of this machine in the records: the parent by name, the state folder not at all.
    facts = {"config": {**dataclasses.asdict(config), "init_from": parent, "state_dir": None}, "lineage": lineage,
             "hardware": hardware_description(accelerator), "num_processes": accelerator.num_processes,
             "n_parameters": sum(p.numel() for p in model.parameters()),
             "n_train": len(data.train_set), "n_heldout": len(data.heldout_images)}
    accelerator.init_trackers(config.run_name, config=tensorboard_hparams(facts["config"]))
    accelerator.print(
        f"{facts['n_train']} training / {facts['n_heldout']} held-out expressions (by {config.heldout_by}), "
        f"{len(data.sampler)} chunks of {config.batches_per_chunk} batches per epoch ({len(train_loader)} chunks "
        f"per process), {facts['n_parameters'] / 1e6:.2f}M parameters, {facts['hardware']}"
    )
    evaluate = functools.partial(evaluate_and_select, accelerator, model, processor, data, config, progress, clock,
                                 facts=facts, weight_average=weight_average)

    clock.counted = clock.last_save = time.time()
    if args.init_from and progress.global_step == 0 and not progress.evals:
        # The starting model is the score to beat: output_dir is only overwritten by a better model.
        has_model = (args.output_dir / "config.json").exists()
        evaluate(epoch=0, save_to=None if has_model else args.output_dir)
    clock.last_save, clock.last_save_step = time.time(), progress.global_step
    first_step = progress.global_step

    stopped = args.max_total_minutes is not None and progress.train_seconds / 60 >= args.max_total_minutes
    if stopped:
        accelerator.print(f"already trained {progress.train_seconds / 60:.1f} minutes in all "
                          f"(--max_total_minutes {args.max_total_minutes:g}): nothing to do")
    while not stopped and progress.epoch < config.num_epochs:
        stopped = train_one_epoch(accelerator, model, optimizer, lr_scheduler, train_loader, data.sampler,
                                  config, progress, clock, args, evaluate, weight_average)
        if not stopped:
            progress.epoch, progress.chunks_in_epoch = progress.epoch + 1, 0
            evaluate(epoch=progress.epoch, save_to=args.output_dir)
            save_state(accelerator, config, progress, clock)

    if stopped:
        # State first: `accelerate launch` forwards Ctrl+C / SIGTERM to its workers and kills them 30 s
        # later, which a held-out evaluation can outlast; the training done is then already saved.
        save_state(accelerator, config, progress, clock)
        accelerator.print(f"state saved at step {progress.global_step}")
        if progress.chunks_in_epoch and progress.global_step > first_step:
            partial_epoch = progress.epoch + progress.chunks_in_epoch / max(len(train_loader), 1)
            evaluate(epoch=partial_epoch, save_to=args.output_dir)
            save_state(accelerator, config, progress, clock)  # again, with the evaluation in the log
    finish(accelerator, model, processor, config, args, progress, clock, facts, weight_average)


def tensorboard_hparams(config: dict) -> dict:
    """The config as TensorBoard's hyper-parameters: scalars, with a `model.KEY` entry per model setting."""
    flat = {**config, **{f"model.{k}": v for k, v in config["model"].items()}}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def finish(accelerator, model, processor, config: TrainingConfig, args: RunArguments,
           progress: TrainingProgress, clock: SegmentClock, facts: dict,
           weight_average: Optional[AveragedModel] = None) -> None:
    """The last model (state_dir/last_model: the weight average, if any), the reports of the whole run,
    the summary, the upload."""
    state_dir = Path(config.state_dir)
    clock.count(progress)
    sync_buffers(accelerator, model)
    last = model if weight_average is None else weight_average.module
    if weight_average is not None:
        sync_buffers(accelerator, last)
    save_model(accelerator, last, processor, state_dir / "last_model", progress, facts)
    last_digest = weights_digest(accelerator.unwrap_model(last))
    if accelerator.is_main_process and progress.best and (args.output_dir / "config.json").exists():
        write_reports(args.output_dir, progress, facts)  # the card and curves describe the whole run
    digests = gather_object([weights_digest(accelerator.unwrap_model(model))])
    accelerator.end_training()  # also ends the process group: no collective after this
    if len(set(digests)) > 1:
        accelerator.print(f"WARNING: the processes ended with different weights: {digests}", file=sys.stderr)
    if accelerator.is_main_process:
        summary = {"epochs": progress.epoch, "chunks_in_epoch": progress.chunks_in_epoch,
                   "global_step": progress.global_step, "best": progress.best,
                   "minutes": progress.train_seconds / 60, "num_processes": accelerator.num_processes,
                   "weights_sha256_per_process": digests, "last_model_sha256": last_digest}
        (state_dir / "last_run.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
        if args.push_to_hub:
            message = f"{config.run_name}: held-out ExpRate {100 * progress.best_exprate:.2f}%"
            print(f"pushed {args.output_dir} to {push_folder_to_hub(args.output_dir, args.push_to_hub, message)}")


if __name__ == "__main__":
    main()
