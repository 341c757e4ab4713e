"""The settings of a training run (train/train.py): `TrainingConfig` and `RunArguments`, and `parse_args`.

A YAML file (`--config train/configs/gru.yaml`) sets the `TrainingConfig` fields that differ from
the defaults, which are the recommended settings; the command line overrides any field
(`--learning_rate 5e-4`, `--augment false`) and any model setting (`--model.dropout 0.3`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser

from train.data import HELDOUT_BY


# The config's names for transformers' learning-rate schedules (`get_scheduler`); both start with
# `warmup_steps` of linear warmup, and the cosine ends at `min_lr_ratio` x `learning_rate`.
LR_SCHEDULERS = {"cosine": "cosine_with_min_lr", "constant": "constant_with_warmup"}


@dataclass
class TrainingConfig:
    """Every setting a YAML config may hold. The defaults are the recommended settings (gru.yaml's
    recipe, for two CPU processes); train/configs/*.yaml list only what differs from them."""

    run_name: str = "hmer"
    # HMERConfig settings; on the command line one at a time, `--model.KEY VALUE` (not listed by --help).
    model: dict = field(default_factory=dict, metadata={"help": argparse.SUPPRESS})
    seed: int = 1234
    # data
    heldout_size: int = 500
    # expression | writer | unseen: single expressions, whole writers, or whole writers writing formulas
    # absent from the training part (like the test sets; see train/data.py)
    heldout_by: str = field(default="expression", metadata={"help": f"one of {', '.join(HELDOUT_BY)}"})
    limit: Optional[int] = field(default=None, metadata={"help": "only the first N training expressions"})
    augment: bool = True
    # Synthetic expressions (data_scripts/synth.py), drawn on the fly in place of real rows.
    synthetic_share: float = field(default=0.0, metadata={"help": "share of each epoch's samples that are synthetic"})
    synthetic_substitution_share: float = field(
        default=0.5, metadata={"help": "of the synthetic samples, the share made by substitution (A); the rest composed (B)"})
    # Off by default, so that earlier recipes stay what they were. It does not change the speed (120 steps:
    # 5.50 min with it, 5.55 without) but it holds less memory: a 2-process synthetic run held about 8 GB
    # per process with it, 11-12 GB without (different runs). The shipped weights since c5_synth were trained with it.
    synthetic_match_length: bool = field(default=False, metadata={
        "help": "a composed (B) sample has as many tokens as the row it stands in for, so it fits that row's batch"})
    pixel_budget: int = field(default=400_000, metadata={"help": "padded pixels per batch (size x height x width)"})
    max_batch_size: int = 16
    # Batches are re-split by their processed image sizes (see train/data.py); more batches per chunk give the
    # re-split more images to pair: 15% of the pixels padding with 16 against 26% with 4, 14% more images/s.
    batches_per_chunk: int = 16
    # Render in the training process: each epoch's forked worker grew to the trainer's 5 GB.
    num_workers: int = 0
    # optimization
    num_epochs: int = 12
    optimizer: str = field(default="adamw", metadata={"help": "adamw (no decay on biases and norms)"})
    learning_rate: float = 1.0e-3
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = field(default="cosine", metadata={"help": "cosine or constant, after a linear warmup"})
    warmup_steps: int = 300
    min_lr_ratio: float = field(default=0.02, metadata={"help": "cosine floor, as a fraction of learning_rate"})
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # An exponential moving average of the weights (torch's `AveragedModel`, BatchNorm statistics
    # averaged too) is what gets scored and saved; the raw weights are scored beside it ("raw" in
    # the log). Off at 0; 0.998 averages over about 500 optimizer steps (one 2-process epoch).
    ema_decay: float = field(default=0.0, metadata={
        "help": "score and save an exponential moving average of the weights with this decay (0 = off)"})
    mixed_precision: str = field(default="bf16", metadata={"help": "no, bf16 or fp16"})
    channels_last: bool = True
    find_unused_parameters: bool = False
    # One torch thread per process (0 = torch's default): on a 2-core machine shared with other
    # jobs, two OpenMP threads wait on each other at every operator (3-10x slower, measured).
    num_threads: int = 1
    # evaluation and saving
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 120
    logging_steps: int = 20
    # Also score the held-out slice every N optimizer steps (0 = only after each epoch and at a stop):
    # a finer learning curve and finer checkpoint selection for runs of a few epochs.
    eval_every_steps: int = 0
    save_every_minutes: float = 20.0
    save_every_steps: int = field(default=0, metadata={"help": "also save every N optimizer steps (0 = off)"})
    keep_states: int = 2
    min_improvement: float = field(
        default=0.0, metadata={"help": "replace the saved best model only when ExpRate improves by more than this"}
    )
    state_dir: Optional[str] = field(default=None, metadata={"help": "default ~/.cache/hmer/train_state/RUN_NAME"})

    def __post_init__(self):
        for name, allowed in (("heldout_by", HELDOUT_BY), ("lr_scheduler", LR_SCHEDULERS),
                              ("optimizer", ("adamw",)), ("mixed_precision", ("no", "bf16", "fp16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self.state_dir = str(Path(self.state_dir or f"~/.cache/hmer/train_state/{self.run_name}").expanduser())


@dataclass
class RunArguments:
    """What one command trains: where the data and outputs are, and how long this segment runs."""

    config: Path = field(metadata={"help": "YAML config (train/configs/*.yaml)"})
    data_dir: str = field(metadata={"help": "CROHME folder: the archives or the extracted folders"})
    output_dir: Path = field(metadata={"help": "where the best model is saved"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache for the built CROHME splits"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest state in state_dir"})
    init_from: Optional[str] = field(default=None, metadata={"help": "start from this saved model (folder or Hub id)"})
    max_minutes: Optional[float] = field(default=None, metadata={"help": "stop (with a clean save) after this long"})
    max_total_minutes: Optional[float] = field(default=None, metadata={
        "help": "stop (with a clean save and a held-out evaluation) once the run, all resumed segments "
                "together, has trained this long: compare runs at an equal budget"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many optimizer steps in all"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "upload the best model to this Hub repo"})


def parse_args(argv=None) -> tuple[RunArguments, TrainingConfig]:
    """The run's arguments and its config: the dataclass defaults, then the YAML file, then the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (RunArguments, TrainingConfig), allow_abbrev=False, description="Train an HMER model with accelerate.",
        epilog="Any config key can be overridden: --learning_rate 5e-4 --model.decoder_type transformer",
    )
    config_option = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_option.add_argument("--config", type=Path)
    config_path = config_option.parse_known_args(argv)[0].config
    if config_path:
        # The YAML values become the parser's defaults, so argparse converts them like typed values
        # (YAML 1.1 reads 1e-3 as a string) and the command line still overrides them.
        loaded = yaml.safe_load(config_path.read_text()) or {}
        known = sorted(f.name for f in dataclasses.fields(TrainingConfig))
        if set(loaded) - set(known):
            parser.error(f"unknown keys in {config_path}: {sorted(set(loaded) - set(known))}; known: {known}")
        parser.set_defaults(**loaded)
    try:
        args, config, rest = parser.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
    except ValueError as error:  # a value TrainingConfig.__post_init__ refuses
        parser.error(str(error))
    config.model = {**(config.model or {}), **model_overrides(rest, parser)}
    return args, config


def model_overrides(rest: list[str], parser: argparse.ArgumentParser) -> dict:
    """`--model.KEY VALUE` or `--model.KEY=VALUE` arguments as {KEY: value} (HMERConfig settings)."""
    overrides, rest = {}, list(rest)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--model."):
            known = sorted(f.name for f in dataclasses.fields(TrainingConfig))
            parser.error(f"unknown option {flag}; config keys: {known}")
        key, has_value, value = flag[len("--model."):].partition("=")
        if not has_value:
            if not rest:
                parser.error(f"{flag} needs a value")
            value = rest.pop(0)
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(text: str) -> Any:
    """A command-line value: a number (1e-3 included, which YAML 1.1 reads as a string), or YAML."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)
