"""Trains an HMER model on CROHME with 🤗 Accelerate (CPU, one GPU or several: the same command).

    accelerate launch train/train.py --config train/configs/gru.yaml \
        --data_dir ../shared/crohme --output_dir checkpoints [--max_minutes 120] [--resume]

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 train/train.py ...` trains
with two processes (one torch thread each, gloo); `accelerate launch --cpu --num_processes 2` only
ever starts one process. A run resumed with as many processes as it was saved with continues
bit-exactly; with another number it continues from the same weights, optimizer state, epoch
position and learning rate (moving a CPU run to two processes or to a GPU, say).

Any key of the YAML config can be overridden on the command line (`--learning_rate 1e-3`,
`--model.decoder_type transformer`). What it does, in order:

1. builds the CROHME training set with `data_scripts.crohme.load_crohme` and holds out a fixed
   slice of it (`heldout_size` expressions chosen by a hash of their names, or with
   `heldout_by: writer` whole writers, as the test sets hold writers never seen in training) for
   model selection; the test sets are never looked at;
2. renders every training expression from its strokes with random stroke-level augmentation,
   turns it into model inputs with the same `HMERProcessor` that inference uses, and batches
   expressions of similar size under a pixel budget (batches shuffled every epoch, the order a
   function of (seed, epoch) only);
3. trains with mixed precision, channels_last, gradient accumulation and clipping;
4. after every epoch decodes the held-out slice greedily and scores it with the project's ExpRate
   metric; the best model so far is written to `--output_dir` with `save_pretrained` (weights,
   config, generation config, tokenizer, image processor, a model card with the metrics);
5. saves the full training state (`accelerator.save_state`) every `save_every_minutes` into
   `state_dir`, outside the repository; `--resume` continues from the latest one at the same step,
   learning rate and data order; `--max_minutes` (this segment) or `--max_total_minutes` (all
   segments together), Ctrl+C or SIGTERM stop with a held-out evaluation and a clean save.

Loss, learning rate and ExpRate go to TensorBoard (in `state_dir/logs`) and to
`training_curves.png` in `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml


if __package__ in (None, ""):
    # `accelerate launch train/train.py` puts train/ first on sys.path, where this very file would
    # shadow the `train` package: put the repository root in front of it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedDataParallelKwargs, broadcast, gather_object, set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from train.data import (  # noqa: E402
    HMERCollator,
    HMERTrainDataset,
    SizeGroupedBatchSampler,
    as_uint8_image,
    HELDOUT_BY,
    image_sizes,
    select_heldout,
    single_thread_worker_init,
)
from train.evaluate_model import load_metric, predict_images  # noqa: E402
from train.model_card import TEST_RESULTS, TRAINING_LOG, write_model_card  # noqa: E402



# Every key a config may set, with its default. `model` holds HMERConfig keyword arguments.
DEFAULTS: dict[str, Any] = {
    "run_name": "hmer",
    "model": {},
    "seed": 1234,
    # data
    "heldout_size": 500,
    "heldout_by": "expression",  # expression | writer | unseen: single expressions, whole writers, or whole
    # writers writing formulas absent from the training part (like the test sets; see train/data.py)
    "limit": None,  # use only the first N training expressions (after holding out)
    "augment": True,
    # synthetic expressions (data_scripts/synth.py), drawn on the fly in place of real rows
    "synthetic_share": 0.0,  # share of each epoch's samples that are synthetic (0 = real data only)
    "synthetic_substitution_share": 0.5,  # of those, the share made by substitution (A); the rest composed (B)
    "pixel_budget": 400_000,  # padded pixels per batch (batch size x max height x max width)
    "max_batch_size": 16,
    "batches_per_chunk": 4,  # batches re-split by their processed image sizes (see train/data.py)
    "num_workers": 1,
    # optimization
    "num_epochs": 20,
    "optimizer": "adamw",  # adamw | adadelta
    "learning_rate": 1.0e-3,
    "weight_decay": 1.0e-4,
    "adam_betas": [0.9, 0.999],
    "lr_scheduler": "cosine",  # cosine | plateau | constant (all after a linear warmup)
    "warmup_steps": 300,
    "min_lr_ratio": 0.01,  # cosine floor, as a fraction of learning_rate
    "plateau_factor": 0.5,  # plateau: multiply the lr by this after `plateau_patience` epochs ...
    "plateau_patience": 2,  # ... without a better held-out ExpRate
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 1.0,
    "mixed_precision": "bf16",  # no | bf16 | fp16
    "channels_last": True,
    "find_unused_parameters": False,
    "num_threads": 0,  # torch threads per process; 0 = torch's default
    # evaluation and saving
    "eval_batch_size": 16,
    "eval_max_new_tokens": 120,
    "logging_steps": 20,
    "save_every_minutes": 30.0,
    "save_every_steps": 0,  # also save every N optimizer steps (0 = off; tests use it)
    "keep_states": 2,
    "min_improvement": 0.0,  # replace the saved best model only when ExpRate improves by more than this
    "state_dir": None,  # default ~/.cache/hmer/train_state/<run_name>
}


# ----------------------------------------------------------------------------- configuration


def _parse_value(text: str) -> Any:
    """A command-line value: a number (1e-3 included, which YAML 1.1 reads as a string), or YAML."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _check_types(config: dict) -> None:
    """Numbers written like 1e-3 in a YAML file arrive as strings: convert them, or fail clearly."""
    for key, default in DEFAULTS.items():
        value = config[key]
        if isinstance(default, float) and isinstance(value, str):
            try:
                config[key] = float(value)
            except ValueError:
                raise ValueError(f"config key {key!r} must be a number, got {value!r}") from None


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(
        description="Train an HMER model with accelerate.",
        epilog="Any config key can be overridden: --learning_rate 5e-4 --model.decoder_type transformer",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML config (train/configs/*.yaml)")
    parser.add_argument("--data_dir", required=True, help="CROHME folder: the archives or the extracted folders")
    parser.add_argument("--output_dir", required=True, type=Path, help="where the best model is saved")
    parser.add_argument("--cache_dir", default=None, help="datasets cache for the built CROHME splits")
    parser.add_argument("--resume", action="store_true", help="continue from the latest state in state_dir")
    parser.add_argument("--init_from", default=None, help="start from this saved model (folder or Hub id)")
    parser.add_argument("--max_minutes", type=float, default=None, help="stop (with a clean save) after this long")
    parser.add_argument("--max_total_minutes", type=float, default=None,
                        help="stop (with a clean save and a held-out evaluation) once the run, all resumed "
                             "segments together, has trained this long: compare runs at an equal budget")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in all")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the best model at the end")
    args, rest = parser.parse_known_args(argv)

    config = json.loads(json.dumps(DEFAULTS))  # deep copy
    loaded = yaml.safe_load(args.config.read_text()) or {}
    unknown = set(loaded) - set(DEFAULTS)
    if unknown:
        parser.error(f"unknown keys in {args.config}: {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    config.update(loaded)

    # Overrides: --key value or --key=value; --model.key value for model settings.
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--"):
            parser.error(f"unexpected argument {flag!r}")
        if "=" in flag:
            flag, value = flag.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            value = rest[i + 1]
            i += 2
        else:
            parser.error(f"{flag} needs a value")
        key = flag[2:]
        if key.startswith("model."):
            config["model"][key[len("model."):]] = _parse_value(value)
        elif key in DEFAULTS and key != "model":
            config[key] = _parse_value(value)
        else:
            parser.error(f"unknown option {flag}; config keys: {sorted(DEFAULTS)}")
    try:
        _check_types(config)
    except ValueError as error:
        parser.error(str(error))
    if config["heldout_by"] not in HELDOUT_BY:
        parser.error(f"heldout_by must be one of {', '.join(HELDOUT_BY)}, got {config['heldout_by']!r}")
    if config["state_dir"] is None:
        config["state_dir"] = str(Path("~/.cache/hmer/train_state").expanduser() / config["run_name"])
    config["state_dir"] = str(Path(config["state_dir"]).expanduser())
    return args, config


# ----------------------------------------------------------------------------- learning rate


class LRSchedule:
    """Linear warmup, then cosine decay to `min_lr_ratio`, ReduceLROnPlateau-style steps, or constant.

    `step()` after every optimizer step; `epoch_end(exprate)` after every held-out evaluation
    (only the plateau schedule uses it). Its state goes into the accelerate checkpoint, so a
    resumed run continues with the same learning rate.
    """

    def __init__(self, optimizer, kind: str, total_steps: int, warmup_steps: int, min_lr_ratio: float,
                 plateau_factor: float = 0.5, plateau_patience: int = 2):
        if kind not in ("cosine", "plateau", "constant"):
            raise ValueError(f"lr_scheduler must be cosine, plateau or constant, got {kind!r}")
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.plateau_factor = float(plateau_factor)
        self.plateau_patience = int(plateau_patience)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.steps = 0
        self.scale = 1.0  # plateau reductions so far
        self.best = -math.inf
        self.bad_epochs = 0
        self._apply()

    def factor(self) -> float:
        step = self.steps
        if self.warmup_steps and step < self.warmup_steps:
            return self.scale * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.scale

    def _apply(self) -> None:
        factor = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def epoch_end(self, exprate: float) -> None:
        if self.kind != "plateau":
            return
        if exprate > self.best:
            self.best, self.bad_epochs = exprate, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.plateau_patience:
                self.scale *= self.plateau_factor
                self.bad_epochs = 0
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("steps", "scale", "best", "bad_epochs", "base_lrs")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._apply()


class TrainingProgress:
    """Where the run is (epoch, batches seen in it, optimizer steps), the best held-out score, history.

    Registered for checkpointing, so it is saved and restored with the accelerate state.
    """

    def __init__(self):
        self.epoch = 0
        self.chunks_in_epoch = 0
        self.global_step = 0
        self.train_seconds = 0.0
        self.cpu_seconds: Optional[float] = 0.0  # train_seconds x processes x threads (x GPUs on GPU)
        self.best_exprate = -1.0
        self.best = {}
        self.history = {"step": [], "loss": [], "lr": []}
        self.evals: list[dict] = []
        self.commands: list[str] = []

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "batches_in_epoch" in state:  # saved by train.py before chunks (25 Nov 2026): batches, not chunks
            self.legacy_batches_in_epoch = state.pop("batches_in_epoch")
        state.setdefault("cpu_seconds", None)  # saved before it was counted: set on resume
        vars(self).update(state)

    def add_time(self, seconds: float, compute_units: int) -> None:
        self.train_seconds += seconds
        self.cpu_seconds += seconds * compute_units


class StopRequest:
    """Turns the first SIGINT (Ctrl+C) or SIGTERM into a request to stop at the next chunk boundary.

    The run then ends as if its time budget were spent: state saved, held-out evaluation, `--resume`
    continues from there. A second signal stops at once (the last saved state is kept).
    Under `accelerate launch` the signal goes to the launcher, which forwards it to every process
    and kills them 30 s later: the state is therefore saved before the final evaluation.
    """

    def __init__(self):
        self.requested = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this chunk with a clean save "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- building blocks


# Model settings that only act while training: a run that starts from saved weights may change them
# (a regularized second cycle). Every other model setting is fixed by the saved weights' shapes.
TRAINING_ONLY_MODEL_KEYS = ("dropout", "encoder_drop_rate", "label_smoothing")


def build_model_and_processor(config: dict, init_from: Optional[str]):
    """A new model from `config["model"]` (or a saved one from `init_from`) and its processor.

    With `init_from`, the keys of `config["model"]` in `TRAINING_ONLY_MODEL_KEYS` replace the saved
    values; any other key must agree with the saved model (a clear error instead of a silent ignore).
    """
    import modeling_hmer  # noqa: F401  (registers the Auto classes)
    from modeling_hmer.configuration_hmer import HMERConfig
    from modeling_hmer.image_processing_hmer import HMERImageProcessor
    from modeling_hmer.modeling_hmer import HMERForConditionalGeneration
    from modeling_hmer.processing_hmer import HMERProcessor
    from modeling_hmer.tokenization_hmer import HMERTokenizer

    if init_from:
        saved = HMERConfig.from_pretrained(init_from)
        overrides = {key: value for key, value in config["model"].items() if key in TRAINING_ONLY_MODEL_KEYS}
        fixed = {key: value for key, value in config["model"].items() if key not in TRAINING_ONLY_MODEL_KEYS}
        saved_values = saved.to_dict()
        asked_values = HMERConfig(**{**saved_values, **fixed}).to_dict()
        clashes = sorted(key for key in asked_values if asked_values[key] != saved_values.get(key))
        if clashes:
            details = ", ".join(f"{key}={saved_values.get(key)!r} (asked {asked_values[key]!r})" for key in clashes)
            raise ValueError(
                f"--init_from {init_from}: the saved model has {details}; these settings follow from its "
                f"weights. Only {', '.join(TRAINING_ONLY_MODEL_KEYS)} can change when starting from saved weights."
            )
        model = HMERForConditionalGeneration.from_pretrained(init_from, **overrides)
        processor = HMERProcessor.from_pretrained(init_from)
    else:
        model = HMERForConditionalGeneration(HMERConfig(**config["model"]))
        processor = HMERProcessor(image_processor=HMERImageProcessor(), tokenizer=HMERTokenizer())
    return model, processor


def build_optimizer(model, config: dict) -> torch.optim.Optimizer:
    """AdamW (no weight decay on biases and normalization weights) or Adadelta (WAP's choice)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config["weight_decay"]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name = config["optimizer"].lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config["learning_rate"], betas=tuple(config["adam_betas"]))
    if name == "adadelta":
        return torch.optim.Adadelta(groups, lr=config["learning_rate"], rho=0.95, eps=1e-6)
    raise ValueError(f"optimizer must be adamw or adadelta, got {config['optimizer']!r}")


def state_folders(state_dir: Path) -> list[Path]:
    """Complete saved states, oldest first (a folder is renamed to step_* only once fully written)."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.glob("step_*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))


def save_training_state(accelerator: Accelerator, state_dir: Path, progress: TrainingProgress, keep: int) -> Path:
    """Writes the accelerate state to state_dir/step_<N> atomically (write .tmp, then rename)."""
    final = state_dir / f"step_{progress.global_step:09d}"
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


def resume_with_other_process_count(progress: TrainingProgress, schedule: LRSchedule, saved: int, now: int) -> None:
    """Continues a state saved by `saved` processes with `now` processes: same weights, optimizer state,
    epoch, position in the epoch and learning rate; not bit-exact (other random draws).

    One optimizer step takes one batch per process, so the schedule's position (in steps) scales by
    saved / now. Chunks are dealt to the processes in turn (chunk k of an epoch goes to process
    k % processes), so the chunks done per process scale by saved / now too.
    """
    schedule.steps = round(schedule.steps * saved / now)
    schedule._apply()
    progress.chunks_in_epoch = progress.chunks_in_epoch * saved // now


def is_better(record: dict, best: dict, min_improvement: float) -> bool:
    """Held-out ExpRate higher by more than min_improvement; on a tie (min_improvement 0), lower SER."""
    if record["exprate"] > best["exprate"] + min_improvement:
        return True
    return min_improvement == 0 and record["exprate"] == best["exprate"] and record["ser"] < best["ser"]


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


def evaluate_heldout(accelerator, model, processor, images: list, references: list, config: dict) -> dict:
    """Greedy ExpRate on the held-out slice; each process decodes every num_processes-th image."""
    unwrapped = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(images), world))
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["mixed_precision"])
    predictions = predict_images(
        unwrapped,
        processor,
        [images[i] for i in mine],
        num_beams=1,
        max_new_tokens=config["eval_max_new_tokens"],
        batch_size=config["eval_batch_size"],
        autocast_dtype=autocast_dtype,
        channels_last=config["channels_last"],
        progress=accelerator.is_local_main_process,
    )
    gathered = gather_object(list(zip(mine, predictions)))
    by_position = dict(gathered)
    # Rejected images count as wrong: the slice is fixed, the score must not depend on what decodes.
    predictions = [by_position[i] if by_position[i] is not None else "" for i in range(len(images))]
    scores = load_metric().compute(predictions=predictions, references=references)
    return {key: float(scores[key]) for key in ("exprate", "le1", "le2", "le3", "ser")}


# ----------------------------------------------------------------------------- reporting


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
    axes[2].set(title="held-out slice (greedy)", xlabel="epoch", ylabel="%", ylim=(0, None))
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def reproduce_command(argv: list[str], num_processes: int) -> str:
    """The command line of a run without its time budget and resume flags.

    A resumed run continues exactly where it stopped, so a run done in several time-limited
    segments equals one uninterrupted run of this command (with as many processes).
    """
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--resume", "--max_minutes", "--max_total_minutes", "--max_steps", "--state_dir", "--push_to_hub"):
            skip_next = "=" not in arg and name != "--resume"
            continue
        kept.append(arg)
    launch = "accelerate launch" + (f" --multi_gpu --num_processes {num_processes}" if num_processes > 1 else "")
    return f"{launch} train/train.py {shlex.join(kept)}"


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
    config["init_from"] = args.init_from
    state_dir = Path(config["state_dir"])
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    accelerator = Accelerator(
        # Without a GPU, run on the CPU; several processes launched by `accelerate launch --multi_gpu
        # --num_processes N` (torchrun) then train together over gloo.
        cpu=not torch.cuda.is_available(),
        mixed_precision=config["mixed_precision"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        log_with=log_with,
        project_dir=str(state_dir / "logs"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config["find_unused_parameters"])],
    )
    if config["num_threads"]:
        torch.set_num_threads(int(config["num_threads"]))
    set_seed(config["seed"])
    start_time = time.time()

    # ---- data
    from data_scripts.crohme import load_crohme

    with accelerator.main_process_first():  # the first process builds the cache, the others read it
        dataset = load_crohme(args.data_dir, "train", cache_dir=args.cache_dir)
    train_idx, heldout_idx = select_heldout(dataset, config["heldout_size"], config["heldout_by"])
    if config["limit"]:
        train_idx = train_idx[: config["limit"]]
    sizes = image_sizes(dataset)
    synthetic = None
    if config["synthetic_share"] > 0:
        from data_scripts.synth import SyntheticExpressions

        # From the training part only: the held-out slice's ink and formulas stay unseen.
        synthetic = SyntheticExpressions(dataset, train_idx, substitution_share=config["synthetic_substitution_share"])
    train_set = HMERTrainDataset(
        dataset, train_idx, augment=config["augment"], seed=config["seed"],
        synthetic=synthetic, synthetic_share=config["synthetic_share"],
    )
    sampler = SizeGroupedBatchSampler(
        [sizes[i] for i in train_idx],
        config["pixel_budget"],
        config["max_batch_size"],
        batches_per_chunk=config["batches_per_chunk"],
        seed=config["seed"],
    )
    heldout = dataset.select(heldout_idx)
    heldout_references = [" ".join(tokens) for tokens in heldout["tokens"]]
    heldout_images = [as_uint8_image(image) for image in heldout["image"]]

    # ---- model, optimizer, schedule
    model, processor = build_model_and_processor(config, args.init_from)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    train_loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=HMERCollator(processor, config["batches_per_chunk"]),
        num_workers=config["num_workers"],
        worker_init_fn=single_thread_worker_init,
        persistent_workers=False,
        # Its own generator: starting an epoch's iterator draws a seed from it, not from the global
        # torch RNG, so a resumed run's dropout draws stay those of an uninterrupted run.
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = math.ceil(len(train_loader) * config["batches_per_chunk"] / config["gradient_accumulation_steps"])
    schedule = LRSchedule(
        optimizer,
        config["lr_scheduler"],
        total_steps=steps_per_epoch * config["num_epochs"],
        warmup_steps=config["warmup_steps"],
        min_lr_ratio=config["min_lr_ratio"],
        plateau_factor=config["plateau_factor"],
        plateau_patience=config["plateau_patience"],
    )
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(schedule, progress)

    compute_units = accelerator.num_processes * (1 if accelerator.device.type == "cuda" else torch.get_num_threads())
    if args.resume:
        states = state_folders(state_dir)
        if states:
            # Every process saves its random state: their number is the saving run's process count.
            saved_processes = len(list(states[-1].glob("random_states_*.pkl"))) or accelerator.num_processes
            accelerator.load_state(str(states[-1]))
            if progress.cpu_seconds is None:  # saved before cpu_seconds was counted: one process count throughout
                progress.cpu_seconds = progress.train_seconds * saved_processes * compute_units / accelerator.num_processes
            legacy = vars(progress).pop("legacy_batches_in_epoch", None)
            if legacy is not None:
                progress.chunks_in_epoch = math.ceil(legacy / config["batches_per_chunk"])
                accelerator.print(
                    f"state saved by an older train.py ({legacy} batches into epoch {progress.epoch}): the rest "
                    f"of this epoch continues in the new chunk order, from chunk {progress.chunks_in_epoch}"
                )
            if saved_processes != accelerator.num_processes:
                resume_with_other_process_count(progress, schedule, saved_processes, accelerator.num_processes)
                accelerator.print(
                    f"the state was saved by {saved_processes} process(es), resumed by {accelerator.num_processes}: "
                    "same weights, optimizer, epoch and learning rate, not a bit-exact continuation"
                )
            accelerator.print(
                f"resumed from {states[-1]}: epoch {progress.epoch}, step {progress.global_step}, "
                f"chunk {progress.chunks_in_epoch} of the epoch, lr {schedule.get_last_lr()[0]:.3g}"
            )
        else:
            accelerator.print(f"--resume: no saved state in {state_dir}, starting from scratch")
    progress.commands.append(reproduce_command(sys.argv[1:] if argv is None else argv, accelerator.num_processes))

    n_parameters = sum(p.numel() for p in model.parameters())
    hardware = hardware_description(accelerator)
    flat_config = {k: (str(v) if isinstance(v, (list, dict, type(None))) else v) for k, v in config.items()}
    flat_config.update({f"model.{k}": str(v) for k, v in config["model"].items()})
    accelerator.init_trackers(config["run_name"], config=flat_config)
    accelerator.print(
        f"{len(train_idx)} training / {len(heldout_idx)} held-out expressions (by {config['heldout_by']}), {len(sampler)} chunks of "
        f"{config['batches_per_chunk']} batches per epoch ({len(train_loader)} chunks per process), {n_parameters / 1e6:.2f}M parameters, {hardware}"
    )

    def heldout_evaluation(epoch_value: float) -> dict:
        sync_buffers(accelerator, model)
        figures = evaluate_heldout(accelerator, model, processor, heldout_images, heldout_references, config)
        elapsed = time.time() - segment_start
        record = {"epoch": epoch_value, "step": progress.global_step,
                  "minutes": (progress.train_seconds + elapsed) / 60,
                  "cpu_hours": (progress.cpu_seconds + elapsed * compute_units) / 3600, **figures}
        progress.evals.append(record)
        accelerator.log({f"heldout/{k}": v for k, v in figures.items()}, step=progress.global_step)
        accelerator.print(
            f"epoch {epoch_value:g} step {progress.global_step}: held-out ExpRate {100 * figures['exprate']:.2f}% "
            f"(<=1 {100 * figures['le1']:.2f}%, SER {100 * figures['ser']:.2f}%)"
        )
        return record

    def finish_epoch_evaluation(epoch_value: float) -> None:
        record = heldout_evaluation(epoch_value)
        if float(epoch_value).is_integer():  # a partial epoch (--max_minutes) says nothing about a plateau
            schedule.epoch_end(record["exprate"])
        if not progress.best or is_better(record, progress.best, config["min_improvement"]):
            progress.best_exprate = record["exprate"]
            progress.best = record
            save_model(args.output_dir)

    def save_model(folder: Path) -> None:
        if accelerator.is_main_process:  # test figures measured on the weights being replaced
            (Path(folder) / TEST_RESULTS).unlink(missing_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(
            folder, is_main_process=accelerator.is_main_process, state_dict=contiguous_state_dict(unwrapped)
        )
        if accelerator.is_main_process:
            processor.save_pretrained(folder)
            write_reports(folder)

    def write_reports(folder: Path) -> None:
        (folder / TRAINING_LOG).write_text(
            json.dumps({"config": config, "evals": progress.evals, "best": progress.best,
                        "epochs": progress.epoch, "steps": progress.global_step,
                        "hours": progress.train_seconds / 3600, "cpu_hours": progress.cpu_seconds / 3600,
                        "hardware": hardware,
                        "num_processes": accelerator.num_processes, "n_parameters": n_parameters,
                        "n_train": len(train_idx), "n_heldout": len(heldout_idx),
                        "commands": progress.commands}, indent=2) + "\n"
        )
        write_model_card(folder)
        plot_curves(progress, folder / "training_curves.png")

    # ---- training loop
    stop_request = StopRequest()  # Ctrl+C or SIGTERM: finish the chunk, save, evaluate, then stop
    segment_start = time.time()
    if args.init_from and progress.global_step == 0 and not progress.evals:
        # The starting model is the score to beat: output_dir is only overwritten by a better model.
        record = heldout_evaluation(0)
        progress.best_exprate, progress.best = record["exprate"], record
        if not (args.output_dir / "config.json").exists():
            save_model(args.output_dir)
    last_save, last_save_step = time.time(), progress.global_step
    first_step = progress.global_step

    def save_state() -> None:
        """Counts this segment's time so far into the progress, then saves the state with it."""
        nonlocal segment_start, last_save, last_save_step
        progress.add_time(time.time() - segment_start, compute_units)
        segment_start = time.time()
        save_training_state(accelerator, state_dir, progress, config["keep_states"])
        last_save, last_save_step = time.time(), progress.global_step

    stop = args.max_total_minutes is not None and progress.train_seconds / 60 >= args.max_total_minutes
    if stop:
        accelerator.print(f"already trained {progress.train_seconds / 60:.1f} minutes in all "
                          f"(--max_total_minutes {args.max_total_minutes:g}): nothing to do")
    running_loss, running_batches = torch.zeros((), device=accelerator.device), 0
    running_images, log_start = 0, time.time()

    def log_training(epoch: int) -> None:
        nonlocal running_batches, running_images, log_start
        mean_loss = accelerator.reduce(running_loss / running_batches, reduction="mean").item()
        lr = schedule.get_last_lr()[0]
        images_per_s = running_images * accelerator.num_processes / (time.time() - log_start)
        running_loss.zero_()
        running_batches, running_images, log_start = 0, 0, time.time()
        progress.history["step"].append(progress.global_step)
        progress.history["loss"].append(mean_loss)
        progress.history["lr"].append(lr)
        accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/epoch": epoch,
                         "train/images_per_s": images_per_s}, step=progress.global_step)
        bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
    while progress.epoch < config["num_epochs"] and not stop:
        epoch = progress.epoch
        sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        skip = progress.chunks_in_epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        model.train()
        log_start = time.time()
        bar = tqdm(total=len(train_loader), initial=skip, desc=f"epoch {epoch}",
                   disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        for chunk in loader:
            for batch in chunk:  # the collator's size-split batches of this chunk
                with accelerator.accumulate(model):
                    pixel_values = batch["pixel_values"]
                    if config["channels_last"]:
                        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
                    loss = model(pixel_values=pixel_values, pixel_mask=batch["pixel_mask"],
                                 labels=batch["labels"]).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config["max_grad_norm"]:
                        accelerator.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                running_loss += loss.detach().float()
                running_batches += 1
                running_images += batch["labels"].shape[0]
                if accelerator.sync_gradients:
                    progress.global_step += 1
                    schedule.step()
                    if progress.global_step % config["logging_steps"] == 0:
                        log_training(epoch)
            progress.chunks_in_epoch += 1
            bar.update(1)
            if not accelerator.sync_gradients:
                continue  # never save or stop in the middle of gradient accumulation

            # Between chunks: decisions on time are the main process's, broadcast so all agree.
            now = time.time()
            flags = torch.tensor(
                [
                    (now - last_save) / 60 >= config["save_every_minutes"]
                    or (config["save_every_steps"] and progress.global_step - last_save_step >= config["save_every_steps"]),
                    (args.max_minutes is not None and (now - start_time) / 60 >= args.max_minutes)
                    or (args.max_total_minutes is not None
                        and (progress.train_seconds + now - segment_start) / 60 >= args.max_total_minutes)
                    or (args.max_steps is not None and progress.global_step >= args.max_steps)
                    or stop_request.requested,
                ],
                dtype=torch.int32,
                device=accelerator.device,
            )
            save_now, stop = (bool(x) for x in broadcast(flags).tolist())
            if stop:
                break
            if save_now:
                save_state()
        bar.close()
        if stop:
            break
        progress.epoch += 1
        progress.chunks_in_epoch = 0
        finish_epoch_evaluation(progress.epoch)
        save_state()

    # ---- clean end: save state, evaluate a partial epoch (and save again), best and last model, reports
    if stop:
        # State first: `accelerate launch` forwards Ctrl+C / SIGTERM to its workers and kills them 30 s
        # later, which a held-out evaluation can outlast; the training done is then already saved.
        save_state()
        accelerator.print(f"state saved at step {progress.global_step}")
        if progress.chunks_in_epoch and progress.global_step > first_step:
            finish_epoch_evaluation(progress.epoch + progress.chunks_in_epoch / max(len(train_loader), 1))
            save_state()  # again, with the evaluation in the log
    progress.add_time(time.time() - segment_start, compute_units)
    sync_buffers(accelerator, model)
    save_model(state_dir / "last_model")
    if accelerator.is_main_process and progress.best and (args.output_dir / "config.json").exists():
        write_reports(args.output_dir)  # the card and curves describe the whole run, not just the best epoch
    digests = gather_object([weights_digest(accelerator.unwrap_model(model))])
    accelerator.end_training()  # also ends the process group: no collective after this
    if len(set(digests)) > 1:
        accelerator.print(f"WARNING: the processes ended with different weights: {digests}", file=sys.stderr)
    if accelerator.is_main_process:
        summary = {"epochs": progress.epoch, "chunks_in_epoch": progress.chunks_in_epoch,
                   "global_step": progress.global_step, "best": progress.best,
                   "minutes": progress.train_seconds / 60, "num_processes": accelerator.num_processes,
                   "weights_sha256_per_process": digests}
        (state_dir / "last_run.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
        if args.push_to_hub:
            message = f"{config['run_name']}: held-out ExpRate {100 * progress.best_exprate:.2f}%"
            url = push_folder_to_hub(args.output_dir, args.push_to_hub, message)
            print(f"pushed {args.output_dir} to {url}")


if __name__ == "__main__":
    main()
