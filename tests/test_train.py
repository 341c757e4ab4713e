"""Tests of the training pipeline: batching, schedule, config, and end-to-end accelerate runs.

The end-to-end tests (marked slow) train the smoke config on a tiny copy of CROHME (72 training and
8 test expressions taken from ../shared/crohme) and check that
- two processes (`accelerate launch --multi_gpu --num_processes 2`, gloo on the CPU) train together
  and end with identical weights;
- a run killed with SIGKILL after a state save and resumed with --resume ends at the same step
  with bit-identical weights as an uninterrupted run;
- the saved best model loads with from_pretrained and `train.evaluate_model` scores it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import (
    HMERCollator,
    SizeGroupedBatchSampler,
    heldout_split,
    padding_efficiency,
    size_grouped_batches,
    split_by_size,
)


REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
LAUNCH_FLAGS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1"]


# ----------------------------------------------------------------------------- unit tests


def test_heldout_split_is_fixed_disjoint_and_order_free():
    names = [f"expr_{i}" for i in range(200)]
    train, heldout = heldout_split(names, 20)
    assert len(heldout) == 20 and len(train) == 180
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(range(200))
    # Same names in another order: the same expressions are held out.
    shuffled = names[::-1]
    _, heldout_shuffled = heldout_split(shuffled, 20)
    assert {shuffled[i] for i in heldout_shuffled} == {names[i] for i in heldout}
    # Not simply the first rows.
    assert set(heldout) != set(range(20))
    with pytest.raises(ValueError, match="unique"):
        heldout_split(["a", "a", "b"], 1)


def test_heldout_split_by_writer_holds_out_whole_writers():
    rng = np.random.default_rng(0)
    groups = [f"w{int(g)}" for g in rng.integers(0, 40, 400)]
    names = [f"expr_{i}" for i in range(400)]
    train, heldout = heldout_split(names, 50, groups=groups)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(range(400))
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in heldout})  # no writer on both sides
    assert 40 <= len(heldout) <= 50  # whole groups that fit: at most the size asked for
    # The same rows in another order: the same writers are held out.
    order = rng.permutation(400)
    _, heldout_shuffled = heldout_split([names[i] for i in order], 50, groups=[groups[i] for i in order])
    assert {names[order[i]] for i in heldout_shuffled} == {names[i] for i in heldout}
    with pytest.raises(ValueError, match="groups has 3 keys"):
        heldout_split(names, 50, groups=groups[:3])


def test_writer_groups_and_select_heldout_on_a_dataset():
    import datasets

    from train.data import select_heldout, writer_groups

    names = ["a", "2009210-947-0", "2009210-947-12", "200923-1253-234", "b", "c"]
    sources = ["HAMEX", "MathBrush", "MathBrush", "MathBrush", "MfrDB", "MfrDB"]
    writers = ["depart009", "", "", "", "User001", ""]
    assert writer_groups(names, sources, writers) == [
        "HAMEX/depart009", "MathBrush/2009210-947", "MathBrush/2009210-947", "MathBrush/200923-1253",
        "MfrDB/User001", "MfrDB/c"]

    rows = 300
    dataset = datasets.Dataset.from_dict({
        "name": [f"e{i}" for i in range(rows)],
        "source": ["MfrDB"] * rows,
        "writer": [f"User{i % 30:03d}" for i in range(rows)],  # 30 writers, 10 expressions each
    })
    train, heldout = select_heldout(dataset, 45, "writer")
    assert len(heldout) == 40 and len(train) == rows - 40  # 4 whole writers; a 5th would overshoot
    assert len({dataset[i]["writer"] for i in heldout}) == 4
    assert select_heldout(dataset, 45, "expression") == heldout_split(dataset["name"], 45)
    with pytest.raises(ValueError, match="heldout_by must be one of"):
        select_heldout(dataset, 45, "source")
    with pytest.raises(ValueError, match="needs a dataset with a writer column"):
        select_heldout(dataset.remove_columns("writer"), 45, "writer")


def test_expression_unseen_keeps_the_expression_training_part_and_scores_new_formulas_only():
    import datasets

    from train.data import select_heldout

    rows = 200
    # formula f{i % 50} for rows below 150 (each written three times), a unique formula above
    tokens = [[f"f{i % 50}"] if i < 150 else [f"u{i}"] for i in range(rows)]
    dataset = datasets.Dataset.from_dict({"name": [f"e{i}" for i in range(rows)], "tokens": tokens})
    train, heldout = select_heldout(dataset, 40, "expression")
    same_train, scored = select_heldout(dataset, 40, "expression_unseen")
    assert same_train == train
    trained = {tuple(tokens[i]) for i in train}
    expected = [i for i in heldout if tuple(tokens[i]) not in trained]
    assert scored == expected and 0 < len(scored) < len(heldout)
    assert all(tokens[i][0].startswith("u") or tuple(tokens[i]) not in trained for i in scored)


def test_evaluation_reads_the_heldout_slice_from_the_training_log(tmp_path):
    from train.evaluate_model import heldout_settings

    assert heldout_settings(str(tmp_path)) == (500, "expression")  # no log: train.py's defaults
    (tmp_path / "training_log.json").write_text(json.dumps({"config": {"heldout_size": 300, "heldout_by": "writer"}}))
    assert heldout_settings(str(tmp_path)) == (300, "writer")
    assert heldout_settings(str(tmp_path), 20, "expression") == (20, "expression")  # given values win


def _random_sizes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in zip(rng.integers(40, 200, n), rng.integers(60, 800, n))]


def test_size_grouped_batches_respect_budget_and_cover_everything():
    sizes = _random_sizes()
    budget, max_batch = 200_000, 12
    batches = size_grouped_batches(sizes, budget, max_batch, np.random.default_rng(1))
    flat = sorted(i for batch in batches for i in batch)
    assert flat == list(range(len(sizes)))
    for batch in batches:
        assert len(batch) <= max_batch
        cost = len(batch) * max(sizes[i][0] for i in batch) * max(sizes[i][1] for i in batch)
        assert cost <= budget or len(batch) == 1
    # Grouping by size wastes far less on padding than batches of random composition.
    order = np.random.default_rng(2).permutation(len(sizes)).tolist()
    lengths = [len(b) for b in batches]
    random_batches, start = [], 0
    for n in lengths:
        random_batches.append(order[start : start + n])
        start += n
    assert padding_efficiency(sizes, batches) > padding_efficiency(sizes, random_batches) + 0.2


def test_batch_sampler_is_deterministic_per_epoch_and_shuffled_across_epochs():
    sizes = _random_sizes()
    a = SizeGroupedBatchSampler(sizes, 200_000, 12, seed=5)
    b = SizeGroupedBatchSampler(sizes, 200_000, 12, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    epoch3 = list(a)
    assert epoch3 == list(b) and len(epoch3) == len(a)
    assert all(key[0] == 3 for batch in epoch3 for key in batch)
    a.set_epoch(4)
    epoch4 = list(a)
    assert [[p for _, p in batch] for batch in epoch4] != [[p for _, p in batch] for batch in epoch3]
    assert sorted(p for batch in epoch4 for _, p in batch) == list(range(len(sizes)))


def test_chunks_hold_size_adjacent_batches_and_cover_the_epoch():
    sizes = _random_sizes(301)
    sampler = SizeGroupedBatchSampler(sizes, 200_000, 12, batches_per_chunk=4, seed=5)
    batches = size_grouped_batches(sizes, 200_000, 12, np.random.default_rng((5, 0)), 0.05)
    chunks = sampler.chunks(0)
    assert len(chunks) == len(batches) // 4  # the leftover batches joined the last chunk
    assert sorted(p for chunk in chunks for p in chunk) == list(range(len(sizes)))
    assert all(len(chunk) >= 4 for chunk in chunks)
    # Size-adjacent batches: a chunk spans a narrow band of heights compared with the data set.
    spans = [np.ptp([sizes[p][0] for p in chunk]) for chunk in chunks]
    assert np.median(spans) < 0.5 * np.ptp([h for h, _ in sizes])


def test_split_by_size_is_optimal_for_contiguous_cuts():
    import itertools

    rng = np.random.default_rng(3)
    sizes = [(int(h), int(w)) for h, w in zip(rng.integers(40, 120, 9), rng.integers(60, 500, 9))]
    batches = split_by_size(sizes, 3)
    assert len(batches) == 3 and all(batches) and sorted(sum(batches, [])) == list(range(9))

    def cost(groups):
        return sum(len(g) * max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g) for g in groups)

    order = sorted(range(9), key=lambda i: (sizes[i][0] // 16, sizes[i][1], i))
    brute = min(cost([order[:a], order[a:b], order[b:]]) for a, b in itertools.combinations(range(1, 9), 2))
    assert cost(batches) == brute
    assert split_by_size(sizes, 1) == [order]
    with pytest.raises(ValueError, match="non-empty"):
        split_by_size(sizes[:2], 3)


def test_collator_splits_a_chunk_into_padded_batches_by_processed_size(tiny_model_dir):
    from modeling_hmer import HMERProcessor

    processor = HMERProcessor.from_pretrained(tiny_model_dir)
    items = []
    for i, width in enumerate((120, 130, 400, 420, 125, 410)):
        image = np.zeros((80, width), np.uint8)
        image[30:50, 10 : width - 10] = 255  # a bar as wide as the image
        image[20:60, 40:46] = 255
        items.append({"image": image, "text": "x + 1" if i % 2 else "\\frac { a } { b }", "name": str(i)})
    batches = HMERCollator(processor, num_batches=2)(items)
    assert len(batches) == 2
    # The three narrow images went together, the three wide ones too.
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 3]
    widths = sorted(b["pixel_values"].shape[-1] for b in batches)
    assert widths[0] < 0.7 * widths[1]
    for batch in batches:
        n, _, h, w = batch["pixel_values"].shape
        assert batch["pixel_values"].shape[1] == 1 and batch["pixel_mask"].shape == (n, h, w)
        assert batch["labels"].shape[0] == n and (batch["labels"] == 2).sum() == n  # one eos per target
    assert sum(b["labels"].shape[0] for b in batches) == len(items)


def test_accelerate_shards_the_batch_sampler_between_processes():
    from accelerate.data_loader import BatchSamplerShard

    sampler = SizeGroupedBatchSampler(_random_sizes(101), 150_000, 8, seed=0)
    batches = list(sampler)
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i)) for i in range(2)]
    assert len(shards[0]) == len(shards[1])  # every process runs as many steps
    assert shards[0][0] != shards[1][0]  # ... on different batches
    seen = [key for shard in shards for batch in shard for key in batch]
    assert {key for batch in batches for key in batch} <= set(seen)


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def _lr_scheduler(optimizer, total_steps, warmup_steps, min_lr_ratio, kind="cosine"):
    from train.config import TrainingConfig
    from train.train import build_lr_scheduler

    config = TrainingConfig(lr_scheduler=kind, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    return build_lr_scheduler(optimizer, config, total_steps)


def test_lr_schedule_warmup_cosine_constant_and_state():
    cosine = _lr_scheduler(_sgd(), total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(101):
        lrs.append(cosine.get_last_lr()[0])
        cosine.optimizer.step()
        cosine.step()
    # transformers' warmup: step s of the warmup runs at s / warmup_steps of the peak.
    assert lrs[0] == pytest.approx(0.0) and lrs[5] == pytest.approx(0.5) and lrs[9] == pytest.approx(0.9)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55, abs=0.02)
    assert lrs[100] == pytest.approx(0.1)  # the floor, min_lr_ratio x learning_rate, at the last step
    # A restored schedule continues where the saved one was.
    restored = _lr_scheduler(_sgd(), total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    half = _lr_scheduler(_sgd(), total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    for _ in range(37):
        half.optimizer.step()
        half.step()
    restored.load_state_dict(half.state_dict())
    restored.step()
    half.step()
    assert restored.get_last_lr() == half.get_last_lr()

    constant = _lr_scheduler(_sgd(), total_steps=100, warmup_steps=4, min_lr_ratio=0.1, kind="constant")
    for _ in range(50):
        constant.optimizer.step()
        constant.step()
    assert constant.get_last_lr()[0] == pytest.approx(1.0)


def test_unknown_lr_schedulers_and_optimizers_are_refused():
    from train.config import TrainingConfig

    for key, value in (("lr_scheduler", "plateau"), ("lr_scheduler", "linear"), ("optimizer", "adadelta")):
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            TrainingConfig(**{key: value})


def test_lr_scheduler_state_saved_by_the_old_train_py_continues_at_the_same_rate():
    """A state saved before the schedule came from transformers holds train.py's own LRSchedule state."""
    from train.checkpointing import SavedLRScheduler

    def old_cosine(step, total=100, warmup=10, floor=0.1):  # LRSchedule's cosine (train.py before issue 16)
        progress = min((step - warmup) / (total - warmup), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    optimizer = _sgd()
    scheduler = _lr_scheduler(optimizer, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    for group in optimizer.param_groups:  # what the saved optimizer state restores first
        group["lr"] = old_cosine(37)
    SavedLRScheduler(scheduler).load_state_dict(
        {"steps": 37, "scale": 1.0, "best": -math.inf, "bad_epochs": 0, "base_lrs": [1.0]})
    assert scheduler.last_epoch == 37 and scheduler.get_last_lr() == [old_cosine(37)]
    for step in range(38, 60):
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(old_cosine(step), rel=1e-12)
    with pytest.raises(ValueError, match="plateau"):
        SavedLRScheduler(scheduler).load_state_dict(
            {"steps": 5, "scale": 0.5, "best": 0.2, "bad_epochs": 0, "base_lrs": [1.0]})


def test_config_overrides_and_unknown_keys(tmp_path, capsys):
    from train.train import parse_args

    base = ["--config", str(REPO_ROOT / "train/configs/gru.yaml"), "--data_dir", "d", "--output_dir", "o"]
    args, config = parse_args(base + ["--learning_rate", "5e-4", "--model.decoder_type", "transformer",
                                      "--augment=false", "--state_dir", str(tmp_path)])
    assert config.learning_rate == 5e-4 and config.augment is False
    assert config.model["decoder_type"] == "transformer" and config.model["encoder_type"] == "densenet-b"
    assert config.state_dir == str(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(base + ["--learning_rat", "1"])
    assert "unknown option --learning_rat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(base + ["--heldout_by", "source"])
    assert "heldout_by must be one of expression, writer" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["smoke", "gru", "transformer", "small"])
def test_configs_build_their_model(name):
    import yaml

    from modeling_hmer import HMERConfig
    from train.config import TrainingConfig

    config = yaml.safe_load((REPO_ROOT / "train/configs" / f"{name}.yaml").read_text())
    defaults = dataclasses.asdict(TrainingConfig())
    assert set(config) <= set(defaults)
    # A shipped config lists only what differs from the defaults (the recommended settings).
    assert not {key for key, value in config.items() if key != "model" and value == defaults[key]}
    HMERConfig(**config["model"])  # valid model settings


@pytest.mark.parametrize("module", ["matplotlib", "tensorboard"])
def test_a_missing_train_extra_stops_the_run_before_it_starts(module, monkeypatch, tmp_path):
    from train.train import main

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(SystemExit, match=rf"needs {module}.*pip install -e '\.\[train\]'"):
        main(["--config", str(REPO_ROOT / "train/configs/smoke.yaml"), "--data_dir", str(tmp_path / "no_data"),
              "--output_dir", str(tmp_path / "model"), "--state_dir", str(tmp_path / "state")])
    assert not (tmp_path / "state").exists()  # before the accelerator, the data or the model


def test_init_from_takes_training_only_settings_and_refuses_shape_changes(tiny_model_dir):
    from train.train import build_model_and_processor

    saved = json.loads((tiny_model_dir / "config.json").read_text())
    regularized = {"encoder_type": saved["encoder_type"], "dropout": 0.35, "label_smoothing": 0.1,
                   "encoder_drop_rate": 0.2}
    model, _ = build_model_and_processor(regularized, str(tiny_model_dir))
    assert (model.config.dropout, model.config.label_smoothing, model.config.encoder_drop_rate) == (0.35, 0.1, 0.2)
    dropouts = {module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)}
    assert dropouts == {0.35}  # the modules were built with the new rate, not only the config
    assert model.config.hidden_size == saved["hidden_size"]

    for shape_change in ({"hidden_size": saved["hidden_size"] * 2}, {"decoder_type": "transformer"}):
        with pytest.raises(ValueError, match="follow from its weights") as error:
            build_model_and_processor(shape_change, str(tiny_model_dir))
        assert next(iter(shape_change)) in str(error.value)


def test_predict_images_skips_blank_images(tiny_model_dir):
    from train.evaluate_model import load_model_and_processor, predict_images

    model, processor = load_model_and_processor(str(tiny_model_dir))
    ink = np.zeros((60, 120), np.uint8)
    ink[20:40, 10:110] = 255
    ink[10:50, 55:65] = 255
    blank = np.zeros((60, 120), np.uint8)
    predictions = predict_images(model, processor, [ink, blank, ink], max_new_tokens=5, batch_size=2)
    assert predictions[1] is None
    assert isinstance(predictions[0], str) and predictions[0] == predictions[2]
    assert len(predictions[0].split()) <= 5


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_crohme(shared_crohme, tmp_path_factory) -> Path:
    """72 training expressions (every k-th file of each sub-corpus) and 8 of the 2014 test set."""
    folder = tmp_path_factory.mktemp("tiny_crohme")
    for stem, count in (("TrainINKML", 72), ("TestEM2014GT", 8)):
        source = shared_crohme / f"{stem}.tar.gz"
        if not source.is_file():
            pytest.skip(f"{source} not found")
        with tarfile.open(source) as archive:
            members = sorted((m for m in archive if m.isfile() and m.name.endswith(".inkml")
                              and m.size > 0), key=lambda m: m.name)
            step = max(1, len(members) // count)
            for member in members[::step][:count]:
                target = folder / member.name.removeprefix("./")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    return folder


def _env() -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    return env


def _train_command(num_processes: int, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    launch = ["--multi_gpu", "--num_processes", str(num_processes)] if num_processes > 1 else ["--cpu"]
    return [*ACCELERATE, *launch, *LAUNCH_FLAGS, str(REPO_ROOT / "train/train.py"),
            "--config", str(REPO_ROOT / "train/configs/smoke.yaml"), "--data_dir", str(data_dir),
            "--cache_dir", str(run_dir.parent / "datasets_cache"), "--output_dir", str(run_dir / "model"),
            "--state_dir", str(run_dir / "state"), "--num_threads", "1", *extra]


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "state" / "last_run.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tiny_crohme, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    _run(_train_command(2, tiny_crohme, run_dir, "--num_epochs", "1"))
    return run_dir


@pytest.mark.slow
def test_two_processes_train_together_and_end_with_identical_weights(two_process_run):
    summary = _summary(two_process_run)
    assert summary["num_processes"] == 2
    digests = summary["weights_sha256_per_process"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # 48 expressions in size-grouped batches, split between 2 processes: each ran half the batches.
    log = json.loads((two_process_run / "model" / "training_log.json").read_text())
    assert log["epochs"] == 1 and 0 < summary["global_step"] < 48
    assert log["num_processes"] == 2 and log["n_parameters"] > 0 and log["n_train"] == 48
    model_dir = two_process_run / "model"
    for name in ("model.safetensors", "config.json", "generation_config.json", "vocab.json",
                 "processor_config.json", "README.md", "training_curves.png"):
        assert (model_dir / name).is_file(), name
    card = (model_dir / "README.md").read_text()
    assert "| epoch | step | ExpRate |" in card
    assert "accelerate launch --multi_gpu --num_processes 2 train/train.py --config" in card
    assert list((two_process_run / "state" / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"


@pytest.mark.slow
def test_killed_run_resumes_at_the_same_step_with_the_same_result(tiny_crohme, tmp_path_factory):
    runs = tmp_path_factory.mktemp("resume")
    # Held-out evaluations inside the epoch too: they must not change what the training does. And a
    # moving average of the weights, which the state must carry: the saved average is compared too.
    extra = ("--save_every_steps", "4", "--eval_every_steps", "5", "--ema_decay", "0.9")
    _run(_train_command(1, tiny_crohme, runs / "straight", *extra))
    straight = _summary(runs / "straight")
    evals = json.loads((runs / "straight" / "model" / "training_log.json").read_text())["evals"]
    inside = [record for record in evals if record["epoch"] != int(record["epoch"])]
    assert inside and all(b["step"] - a["step"] >= 5 for a, b in zip(evals, evals[1:]) if b in inside), evals
    # The average is what is scored and saved; the raw weights are scored beside it.
    assert all(set(record["raw"]) == {"exprate", "le1", "le2", "le3", "ser"} for record in evals), evals
    assert straight["last_model_sha256"] != straight["weights_sha256_per_process"][0]

    # Same run, killed (SIGKILL, the whole process group) once the state of step 8 is on disk.
    command = _train_command(1, tiny_crohme, runs / "killed", *extra)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    saved = runs / "killed" / "state" / "step_000000008"
    deadline = time.time() + 240
    try:
        while not saved.is_dir() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert saved.is_dir(), "the run never saved the state of step 8"
    assert not (runs / "killed" / "state" / "last_run.json").exists(), "the run finished before it was killed"

    resumed = _run(command + ["--resume"])
    assert "resumed from" in resumed.stdout + resumed.stderr
    text = resumed.stdout + resumed.stderr
    resumed_step = int(text.split("resumed from")[1].split("step ")[1].split(",")[0])
    assert resumed_step >= 8
    summary = _summary(runs / "killed")
    assert summary["global_step"] == straight["global_step"] and summary["epochs"] == straight["epochs"]
    # Same data order, augmentation, dropout draws, optimizer and learning rate: the same weights,
    # and the same average of them.
    assert summary["weights_sha256_per_process"] == straight["weights_sha256_per_process"]
    assert summary["last_model_sha256"] == straight["last_model_sha256"]


@pytest.mark.slow
def test_a_state_without_a_weight_average_resumes_with_one_started_from_its_weights(tiny_crohme, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    _run(_train_command(1, tiny_crohme, run_dir, "--max_steps", "3"))
    first = _summary(run_dir)
    assert "raw" not in json.loads((run_dir / "model" / "training_log.json").read_text())["evals"][-1]

    resumed = _run(_train_command(1, tiny_crohme, run_dir, "--resume", "--max_steps", "6", "--ema_decay", "0.5"))
    assert "holds no weight average: it starts from the resumed weights" in resumed.stdout + resumed.stderr
    summary = _summary(run_dir)
    # Stops come between chunks: at the first chunk boundary past --max_steps.
    assert 3 <= first["global_step"] < summary["global_step"]
    assert summary["last_model_sha256"] != summary["weights_sha256_per_process"][0]
    evals = json.loads((run_dir / "model" / "training_log.json").read_text())["evals"]
    assert "raw" in evals[-1] and evals[-1]["step"] == summary["global_step"]
    # The state saved after the resume carries the average (custom object 2) for the next resume.
    assert list((run_dir / "state").glob("step_*/custom_checkpoint_2.pkl"))


# The last commit whose train.py had its own LR schedule and config parser (before issue 16).
OLD_TRAIN_PY_COMMIT = "a0eeade"


def _old_train_py(folder: Path) -> Path:
    """train/ as it is now but with the train.py of OLD_TRAIN_PY_COMMIT, in `folder`; the script's path."""
    try:
        old = subprocess.run(["git", "show", f"{OLD_TRAIN_PY_COMMIT}:train/train.py"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs git and commit {OLD_TRAIN_PY_COMMIT} of this repository")
    shutil.copytree(REPO_ROOT / "train", folder / "train", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "train" / "train.py").write_text(old)
    return folder / "train" / "train.py"


@pytest.mark.slow
def test_a_state_saved_by_the_old_train_py_resumes_at_the_same_learning_rate_and_result(tiny_crohme, tmp_path_factory):
    """A run started by train.py before issue 16 (its own LRSchedule, hand-written config parser)
    continues with this train.py: same steps, same learning rates, bit-identical weights."""
    runs = tmp_path_factory.mktemp("old_state")
    old_script = _old_train_py(runs / "old_code")
    old_command = _train_command(1, tiny_crohme, runs / "old", "--save_every_steps", "4", "--keep_states", "100")
    old_command[old_command.index(str(REPO_ROOT / "train/train.py"))] = str(old_script)
    _run(old_command)  # the old code, uninterrupted, keeping every state it saves
    old = _summary(runs / "old")

    # The old run's state of step 8, continued by this train.py.
    (runs / "new" / "state").mkdir(parents=True)
    shutil.copytree(runs / "old" / "state" / "step_000000008", runs / "new" / "state" / "step_000000008")
    resumed = _run(_train_command(1, tiny_crohme, runs / "new", "--save_every_steps", "4", "--resume"))
    assert "resumed from" in resumed.stdout and "epoch 0, step 8," in resumed.stdout
    new = _summary(runs / "new")
    assert (new["global_step"], new["epochs"]) == (old["global_step"], old["epochs"])

    def history(run: str) -> dict:
        last_state = runs / run / "state" / f"step_{old['global_step']:09d}" / "custom_checkpoint_1.pkl"
        return torch.load(last_state, weights_only=False)["history"]

    old_history, new_history = history("old"), history("new")
    assert new_history["step"] == old_history["step"] and max(new_history["step"]) > 8
    assert new_history["lr"] == pytest.approx(old_history["lr"], rel=1e-12, abs=0)
    assert new["weights_sha256_per_process"] == old["weights_sha256_per_process"]


@pytest.mark.slow
def test_total_budget_and_sigterm_stop_with_an_evaluation_and_a_clean_save(tiny_crohme, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("budget") / "run"
    # Run the script itself (no launcher) so the signal reaches the training process.
    launched = _train_command(1, tiny_crohme, run_dir, "--num_epochs", "50")
    command = [sys.executable, *launched[launched.index(str(REPO_ROOT / "train/train.py")):]]

    _run(command + ["--max_total_minutes", "0.05"])  # 3 s of training, all segments together
    first = _summary(run_dir)
    assert first["epochs"] < 50 and first["minutes"] >= 0.05
    log = json.loads((run_dir / "model" / "training_log.json").read_text())
    assert log["evals"][-1]["step"] == first["global_step"], "a budget stop ends with a held-out evaluation"

    again = _run(command + ["--max_total_minutes", "0.05", "--resume"])
    assert "nothing to do" in again.stdout + again.stderr
    assert _summary(run_dir)["global_step"] == first["global_step"]

    # Resumed without a budget, then stopped with SIGTERM: it finishes its chunk, evaluates and saves.
    process = subprocess.Popen(command + ["--resume"], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "resumed from" in line:
            break
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    output.append(process.communicate(timeout=240)[0])
    text = "".join(output)
    assert process.returncode == 0, text[-3000:]
    assert "SIGTERM: stopping after this chunk" in text
    stopped = _summary(run_dir)
    assert first["global_step"] < stopped["global_step"] and stopped["epochs"] < 50
    assert (run_dir / "state" / f"step_{stopped['global_step']:09d}").is_dir(), "the state at the stop is saved"
    log = json.loads((run_dir / "model" / "training_log.json").read_text())
    assert log["evals"][-1]["step"] == stopped["global_step"]
    assert 0 < log["evals"][-1]["cpu_hours"] == pytest.approx(log["cpu_hours"], rel=0.2)

    # The same state continued by two processes: accepted (not bit-exact), the epoch carries on.
    resumed = _run(_train_command(2, tiny_crohme, run_dir, "--num_epochs", "50", "--resume",
                                  "--max_steps", str(stopped["global_step"] + 3)))
    text = resumed.stdout + resumed.stderr
    assert "the state was saved by 1 process(es), resumed by 2" in text
    assert f"epoch {stopped['epochs']}, step {stopped['global_step']}," in text
    two = _summary(run_dir)
    assert two["num_processes"] == 2 and two["global_step"] >= stopped["global_step"] + 3
    assert two["weights_sha256_per_process"][0] == two["weights_sha256_per_process"][1]


@pytest.mark.slow
def test_ctrl_c_on_a_two_process_launch_saves_the_state_before_the_last_evaluation(tiny_crohme, tmp_path_factory):
    """Ctrl+C reaches `accelerate launch`, which forwards it to its workers and kills them 30 s later:
    they stop at the chunk boundary and save the state first, then evaluate the partial epoch."""
    run_dir = tmp_path_factory.mktemp("ctrl_c") / "run"
    process = subprocess.Popen(_train_command(2, tiny_crohme, run_dir, "--num_epochs", "50"), cwd=REPO_ROOT,
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "epoch 2 step" in line:  # an epoch evaluated: training is under way in both processes
            break
    time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl+C does
    output.append(process.communicate(timeout=240)[0])
    text = "".join(output)
    assert "SIGINT: stopping after this chunk" in text, text[-3000:]
    stopped = _summary(run_dir)  # written by the workers' clean end (the launcher itself exits non-zero)
    step = stopped["global_step"]
    saved = text.index(f"state saved at step {step}")
    partial_eval = text.index(f"step {step}: held-out ExpRate")
    assert saved < partial_eval, "the state is saved before the partial epoch's evaluation"
    assert (run_dir / "state" / f"step_{step:09d}").is_dir()
    assert not list((run_dir / "state").glob("step_*.old")) and not list((run_dir / "state").glob("step_*.tmp"))
    log = json.loads((run_dir / "model" / "training_log.json").read_text())
    assert log["evals"][-1]["step"] == step and log["evals"][-1]["epoch"] > 2  # the stop's own evaluation
    assert stopped["weights_sha256_per_process"][0] == stopped["weights_sha256_per_process"][1]


@pytest.mark.slow
def test_saved_model_loads_and_the_evaluation_cli_scores_it(two_process_run, tiny_crohme, tmp_path):
    from modeling_hmer import HMERForConditionalGeneration

    model_dir = two_process_run / "model"
    model = HMERForConditionalGeneration.from_pretrained(model_dir)
    assert model.config.hidden_size == 32
    output = tmp_path / "test_2014.json"
    result = _run([sys.executable, "-m", "train.evaluate_model", "--model", str(model_dir),
                   "--data_dir", str(tiny_crohme), "--split", "test_2014", "--limit", "4",
                   "--max_new_tokens", "10", "--num_threads", "1",
                   "--cache_dir", str(two_process_run.parent / "datasets_cache"), "--output_json", str(output)])
    assert "exprate" in result.stdout
    figures = json.loads(output.read_text())
    assert figures["n_scored"] + figures["n_skipped"] == 4
    for key in ("exprate", "le1", "le2", "le3", "ser", "ms_per_image"):
        assert key in figures
    assert 0 <= figures["exprate"] <= figures["le1"] <= figures["le2"] <= figures["le3"] <= 1
    rows = (tmp_path / "test_2014.predictions.tsv").read_text().splitlines()
    assert rows[0] == "name\treference\tprediction\tdistance" and len(rows) == 1 + figures["n_scored"]

    # --split heldout scores the slice train.py selected the model on, with train.py's own figures
    # (same greedy settings as the smoke config's evaluation).
    log = json.loads((model_dir / "training_log.json").read_text())
    heldout_json = tmp_path / "heldout.json"
    _run([sys.executable, "-m", "train.evaluate_model", "--model", str(model_dir), "--data_dir", str(tiny_crohme),
          "--split", "heldout", "--num_beams", "1", "--batch_size", "16",  # slice settings from the training log
          "--max_new_tokens", "16", "--bf16", "--channels_last", "--num_threads", "1",
          "--cache_dir", str(two_process_run.parent / "datasets_cache"), "--output_json", str(heldout_json)])
    heldout = json.loads(heldout_json.read_text())
    assert heldout["n_scored"] == 16 and heldout["n_skipped"] == 0
    assert (heldout["settings"]["heldout_size"], heldout["settings"]["heldout_by"]) == (16, "expression")
    for key in ("exprate", "le1", "ser"):
        assert heldout[key] == pytest.approx(log["best"][key]), key
    names = [line.split("\t")[0] for line in (tmp_path / "heldout.predictions.tsv").read_text().splitlines()[1:]]
    from data_scripts.crohme import load_crohme

    train_names = list(load_crohme(tiny_crohme, "train", cache_dir=two_process_run.parent / "datasets_cache")["name"])
    assert sorted(names) == sorted(train_names[i] for i in heldout_split(train_names, 16)[1])
    with pytest.raises(AssertionError, match="held-out figures in the card come from training"):
        _run([sys.executable, "-m", "train.evaluate_model", "--model", str(model_dir), "--data_dir", str(tiny_crohme),
              "--split", "heldout", "--update_card"])

    # --update_card scores the whole split into a copy of the folder's card (test_results.json + README.md).
    card_dir = tmp_path / "model"
    shutil.copytree(model_dir, card_dir)
    _run([sys.executable, "-m", "train.evaluate_model", "--model", str(card_dir), "--data_dir", str(tiny_crohme),
          "--split", "test_2014", "--max_new_tokens", "10", "--num_threads", "1", "--update_card",
          "--cache_dir", str(two_process_run.parent / "datasets_cache")])
    results = json.loads((card_dir / "test_results.json").read_text())
    assert results["test_2014"]["n_scored"] + results["test_2014"]["n_skipped"] == 8
    assert "| CROHME 2014 test | " in (card_dir / "README.md").read_text()


def test_push_folder_to_hub_then_from_pretrained(tiny_model_dir, tmp_path):
    """--push_to_hub uploads the model folder; the pushed model loads by its repo id (local Hub server)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import HubServer

    code = (
        "import sys; from train.train import push_folder_to_hub; "
        "print(push_folder_to_hub(sys.argv[1], 'tester/hmer-push', 'test push'));"
        "from modeling_hmer import HMERForConditionalGeneration, HMERProcessor;"
        "m = HMERForConditionalGeneration.from_pretrained('tester/hmer-push');"
        "p = HMERProcessor.from_pretrained('tester/hmer-push'); print('loaded', m.config.hidden_size)"
    )
    with HubServer() as hub:
        env = _env()
        env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0",
                    "HF_HOME": str(tmp_path / "hf_home")})
        result = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        files = hub.repos["tester/hmer-push"].files
    assert {"config.json", "model.safetensors", "processor_config.json", "vocab.json"} <= set(files)
    assert "loaded 32" in result.stdout


def test_reproduce_command_drops_time_budget_and_resume_flags():
    from train.train import reproduce_command

    argv = ["--config", "c.yaml", "--max_minutes", "60", "--resume", "--state_dir=/s", "--learning_rate", "1e-3"]
    assert reproduce_command(argv, 1) == "accelerate launch train/train.py --config c.yaml --learning_rate 1e-3"
    assert reproduce_command(["--config", "c.yaml"], 2).startswith("accelerate launch --multi_gpu --num_processes 2 ")


def test_resuming_with_another_process_count_keeps_the_learning_rate_and_epoch_position():
    from train.train import TrainingProgress, resume_with_other_process_count

    def schedule_at(step, total):
        schedule = _lr_scheduler(_sgd(), total_steps=total, warmup_steps=10, min_lr_ratio=0.0)
        for _ in range(step):
            schedule.optimizer.step()
            schedule.step()
        return schedule

    # One process, 1000 steps an epoch, 12 epochs; 3000 steps done, 100 chunks into epoch 3.
    saved = schedule_at(3000, 12000)
    progress = TrainingProgress()
    progress.epoch, progress.chunks_in_epoch = 3, 100
    # Two processes: 500 steps an epoch; the same point is step 1500, chunk 50 of each process.
    moved = schedule_at(0, 6000)
    moved.load_state_dict(saved.state_dict())
    resume_with_other_process_count(progress, moved, saved=1, now=2)
    assert moved.last_epoch == 1500 and progress.chunks_in_epoch == 50 and progress.epoch == 3
    assert moved.optimizer.param_groups[0]["lr"] == moved.get_last_lr()[0]  # the optimizer runs at that rate
    assert moved.get_last_lr()[0] == pytest.approx(saved.get_last_lr()[0], rel=0.01)


def test_progress_state_from_before_chunks_is_converted():
    from train.train import TrainingProgress

    progress = TrainingProgress()
    old = {k: v for k, v in TrainingProgress().state_dict().items() if k != "chunks_in_epoch"}
    old.update(batches_in_epoch=17, global_step=17)
    progress.load_state_dict(old)
    assert progress.global_step == 17 and progress.legacy_batches_in_epoch == 17
    assert not hasattr(progress, "batches_in_epoch")



def test_resuming_with_another_chunk_size_counts_the_batches_done_in_new_chunks():
    from train.checkpointing import TrainingProgress, resume_with_other_chunk_size

    progress = TrainingProgress(batches_per_chunk=4)
    progress.epoch, progress.chunks_in_epoch = 1, 10  # 40 batches of epoch 1 done
    progress.load_state_dict(progress.state_dict())  # the chunk size travels with the state
    resume_with_other_chunk_size(progress, saved=progress.batches_per_chunk, now=16)
    assert (progress.epoch, progress.chunks_in_epoch, progress.batches_per_chunk) == (1, 3, 16)  # 48 batches
    # A state saved before the chunk size was kept loads without one: resumed as it is.
    old = {k: v for k, v in progress.state_dict().items() if k != "batches_per_chunk"}
    before = TrainingProgress()
    before.load_state_dict(old)
    assert before.batches_per_chunk is None and before.chunks_in_epoch == 3

def test_bigger_chunks_leave_less_padding_in_real_training_batches(shared_crohme):
    """Augmentation rescales each image after the sampler planned batches by size: re-splitting more
    batches at once (a bigger chunk) finds better partners for the same images
    (`python -m train.bench --chunks` also times training on them)."""
    from train.bench import chunking_cost

    shipped = Path(__file__).resolve().parents[1] / "checkpoints"  # its processor collates
    figures = chunking_cost(str(shared_crohme), [4, 16], num_batches=64, model_dir=str(shipped))
    assert [figures[k]["batches"] for k in (4, 16)] == [64, 64]
    assert figures[4]["images"] == figures[16]["images"] > 64
    assert 0 < figures[16]["padding"] < figures[4]["padding"] < 0.5
