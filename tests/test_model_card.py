"""Model cards rendered from a model folder's JSON files, and the equal-budget run comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors import safe_open

from train import compare_runs, model_card


def _eval(epoch, minutes, exprate, ser):
    return {"epoch": epoch, "step": int(100 * epoch), "minutes": minutes, "exprate": exprate,
            "le1": min(1.0, exprate + 0.1), "le2": min(1.0, exprate + 0.2), "le3": min(1.0, exprate + 0.3), "ser": ser}


def _write_run(folder: Path, name: str, decoder: str, processes: int, evals: list[dict], source: Path = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    config = {"run_name": name, "model": {"decoder_type": decoder}, "augment": True, "heldout_size": 500,
              "optimizer": "adamw", "learning_rate": 1e-3, "lr_scheduler": "cosine", "num_epochs": 12,
              "warmup_steps": 300, "mixed_precision": "bf16", "pixel_budget": 400000, "num_threads": 1,
              "init_from": None}
    best = max(evals, key=lambda e: e["exprate"])
    log = {"config": config, "evals": evals, "best": best, "epochs": int(evals[-1]["epoch"]),
           "steps": evals[-1]["step"], "hours": evals[-1]["minutes"] / 60,
           "hardware": f"{processes} process(es) on CPU (test, 2 cores)", "num_processes": processes,
           "n_train": 8335, "commands": [f"accelerate launch train/train.py --config train/configs/{name}.yaml"]}
    (folder / model_card.TRAINING_LOG).write_text(json.dumps(log))
    return folder


def test_parameters_are_counted_from_the_safetensors_header(tiny_model_dir):
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        expected = sum(f.get_tensor(k).numel() for k in f.keys()
                       if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert model_card.count_parameters(tiny_model_dir) == expected > 0


def test_cpu_hours_count_processes_and_threads():
    log = {"num_processes": 2, "hardware": "2 process(es) on CPU (x, 2 cores)", "config": {"num_threads": 1}}
    assert model_card.cpu_hours(log, 60) == pytest.approx(2.0)
    older = {"hardware": "2 process(es) on CPU (x, 2 cores)", "config": {"num_threads": 2}}  # no num_processes
    assert model_card.cpu_hours(older, 30) == pytest.approx(2.0)
    gpu = {"num_processes": 1, "hardware": "1 process(es) on NVIDIA H100", "config": {"num_threads": 4}}
    assert model_card.cpu_hours(gpu, 60) == pytest.approx(1.0)


def test_uncounted_evaluations_take_the_rate_of_the_first_counted_one():
    # Started on 1 process (the first two records predate CPU-hour counting), resumed on 2: the log's
    # num_processes is 2, but the early records must not be doubled.
    evals = [_eval(1, 60, 0.1, 0.9), _eval(2, 120, 0.2, 0.8),
             {**_eval(3, 180, 0.3, 0.7), "cpu_hours": 3.0}, {**_eval(4, 210, 0.4, 0.6), "cpu_hours": 4.0}]
    log = {"num_processes": 2, "hardware": "2 process(es) on CPU (x, 2 cores)", "config": {"num_threads": 1},
           "evals": evals}
    assert [model_card.eval_cpu_hours(log, e) for e in evals] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    never_counted = {**log, "evals": evals[:2]}  # older logs: the log's own setting
    assert model_card.eval_cpu_hours(never_counted, evals[0]) == pytest.approx(2.0)
    # 3.0 CPU-hours in 3 wall hours, then 1.0 in the last 0.5 h: the process count changed
    assert model_card.changed_process_count({**log, "hours": 3.5, "cpu_hours": 4.0})
    assert not model_card.changed_process_count({**log, "hours": 3.5, "cpu_hours": 3.5})


def test_card_shows_training_then_test_results_in_text_and_metadata(tiny_model_dir, tmp_path):
    folder = _write_run(tmp_path / "gru", "gru", "gru", 1,
                        [_eval(1, 50, 0.004, 0.96), _eval(2, 100, 0.123, 0.40)], source=tiny_model_dir)
    card = model_card.write_model_card(folder).read_text()
    assert "**12.30%** at epoch 2" in card
    assert "| 2 | 200 | 12.30 | 22.30 | 32.30 | 42.30 | 40.00 | 100 | 1.67 |" in card
    assert "Not measured yet for these weights" in card
    assert "accelerate launch train/train.py --config train/configs/gru.yaml" in card
    assert ModelCard.load(folder / "README.md").data.eval_results is None
    assert "segments ran these commands" not in card  # one command throughout
    assert "500 further training expressions held out (fixed, chosen by a hash of their names)" in card

    # A run that held out whole writers says so.
    log = json.loads((folder / model_card.TRAINING_LOG).read_text())
    log["config"]["heldout_by"], log["n_heldout"] = "writer", 497
    (folder / model_card.TRAINING_LOG).write_text(json.dumps(log))
    assert "497 further training expressions of whole writers held out" in model_card.write_model_card(folder).read_text()
    log["config"]["heldout_by"] = "expression"
    (folder / model_card.TRAINING_LOG).write_text(json.dumps(log))
    card = model_card.write_model_card(folder).read_text()

    # Segments resumed with other options: the card lists each change of command, in order.
    log = json.loads((folder / model_card.TRAINING_LOG).read_text())
    first = log["commands"][0]
    two = first.replace("accelerate launch", "accelerate launch --multi_gpu --num_processes 2")
    log["commands"] = [first, first, two, two]
    (folder / model_card.TRAINING_LOG).write_text(json.dumps(log))
    card = model_card.write_model_card(folder).read_text()
    assert f"Its 4 segments ran these commands in turn (each one after the first with `--resume`):\n\n```\n{first}\n{two}\n```" in card

    figures = {"n_scored": 986, "n_skipped": 0, "exprate": 0.4012, "le1": 0.55, "le2": 0.6, "le3": 0.65,
               "ser": 0.2, "ms_per_image": 150.0}
    model_card.record_test_results(folder, "test_2014", figures, {"num_beams": 5, "bf16": True, "num_threads": 1})
    card_text = (folder / "README.md").read_text()
    assert "| CROHME 2014 test | 986 (0 skipped) | 5 | **40.12** |" in card_text
    assert "the original project 38.6%" in card_text and "Not measured yet" not in card_text
    results = ModelCard.load(folder / "README.md").data.eval_results
    exprate = [r for r in results if r.metric_type == "exprate"]
    assert [(r.dataset_split, r.metric_value) for r in exprate] == [("test_2014", 40.12)]
    # A second split is added beside the first, not in its place.
    model_card.record_test_results(folder, "test_2016", {**figures, "n_scored": 1147}, {"num_beams": 5})
    assert set(json.loads((folder / model_card.TEST_RESULTS).read_text())) == {"test_2014", "test_2016"}


def test_a_weight_averaged_run_shows_the_raw_weights_beside_the_average(tiny_model_dir, tmp_path):
    evals = [_eval(1, 50, 0.20, 0.30), _eval(2, 100, 0.25, 0.25)]
    evals[1]["raw"] = {**_eval(2, 100, 0.22, 0.27)}
    folder = _write_run(tmp_path / "ema", "ema", "gru", 2, evals, source=tiny_model_dir)
    log = json.loads((folder / model_card.TRAINING_LOG).read_text())
    log["config"]["ema_decay"] = 0.998
    (folder / model_card.TRAINING_LOG).write_text(json.dumps(log))
    card = model_card.write_model_card(folder).read_text()
    assert "exponential moving average of the trained weights (decay 0.998" in card
    assert "| symbol error rate | raw weights: ExpRate | minutes | CPU-hours |\n|" + "---|" * 10 + "\n" in card
    # An evaluation from before the average started (a resumed run) has no raw figure.
    assert "| 1 | 100 | 20.00 | 30.00 | 40.00 | 50.00 | 30.00 | - | 50 |" in card
    assert "| 2 | 200 | 25.00 | 35.00 | 45.00 | 55.00 | 25.00 | 22.00 | 100 |" in card


def test_card_needs_a_training_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="training_log.json"):
        model_card.render_model_card(tmp_path)


def test_runs_compare_at_an_equal_cpu_budget(tiny_model_dir, tmp_path, capsys):
    # One process: 2 CPU-hours after 120 minutes. Two processes: 2 CPU-hours after 60 minutes, so its
    # better evaluation at 90 minutes (3 CPU-hours) is over the budget and must not count.
    one = _write_run(tmp_path / "gru", "gru", "gru", 1,
                     [_eval(1, 60, 0.02, 0.8), _eval(2, 120, 0.05, 0.6)], source=tiny_model_dir)
    two = _write_run(tmp_path / "transformer", "transformer", "transformer", 2,
                     [_eval(1, 30, 0.01, 0.9), _eval(2, 60, 0.03, 0.7), _eval(3, 90, 0.20, 0.3)], source=tiny_model_dir)
    card_dir = _write_run(tmp_path / "release", "gru", "gru", 1, [_eval(2, 120, 0.05, 0.6)], source=tiny_model_dir)

    comparison = compare_runs.main([str(one), str(two), "--budget_hours", "2", "--card", str(card_dir)])
    rows = {r["run"]: r for r in comparison["rows"]}
    assert rows["gru"]["exprate"] == 0.05 and rows["gru"]["cpu_hours"] == pytest.approx(2.0)
    assert rows["transformer"]["exprate"] == 0.03 and rows["transformer"]["cpu_hours"] == pytest.approx(2.0)
    assert ("`gru` (decoder gru, held out by expression, stroke augmentation, real data only) leads: "
            "held-out ExpRate 5.00% against 3.00%") in comparison["conclusion"]
    assert "| gru | gru | held out by expression" in capsys.readouterr().out

    card = (card_dir / "README.md").read_text()
    assert "## Runs compared at an equal budget" in card and "| transformer | transformer |" in card
    assert (card_dir / "comparison.png").stat().st_size > 0
    # Without a budget every evaluation counts, and the two-process run leads.
    assert compare_runs.compare([one, two], None)["rows"][1]["exprate"] == 0.20
    # The card goes public: runs by name, no folder of this machine; it renders without a budget too.
    assert str(tmp_path) not in (card_dir / "comparison.json").read_text()
    assert str(one) not in card and str(two) not in card
    compare_runs.main([str(one), str(two), "--card", str(card_dir)])
    assert "each for all of its CPU-hours" in (card_dir / "README.md").read_text()
    assert "These runs came before these weights" not in card  # the card's run `gru` is one of them
    # Weights of a later run that kept the comparison: the card says the comparison chose their recipe.
    log = json.loads((card_dir / model_card.TRAINING_LOG).read_text())
    log["config"]["run_name"] = "gru_later"
    (card_dir / model_card.TRAINING_LOG).write_text(json.dumps(log))
    assert "These runs came before these weights (see the lineage)" in model_card.write_model_card(card_dir).read_text()


def test_a_run_short_of_the_budget_is_named(tiny_model_dir, tmp_path):
    one = _write_run(tmp_path / "a", "a", "gru", 1, [_eval(1, 60, 0.02, 0.8)], source=tiny_model_dir)
    two = _write_run(tmp_path / "b", "b", "transformer", 1, [_eval(1, 100, 0.03, 0.7), _eval(2, 150, 0.04, 0.6)],
                     source=tiny_model_dir)
    comparison = compare_runs.compare([one, two], 2.0)
    assert "Not yet trained for the whole budget: a." in comparison["conclusion"]
    with pytest.raises(SystemExit, match="no held-out evaluation within 0.5"):
        compare_runs.compare([two], 0.5)
    assert compare_runs.compare([two], 2.0)["rows"][0]["exprate"] == 0.03  # the 2.5 CPU-hour evaluation is over


def test_a_fine_tuned_run_records_and_shows_its_whole_lineage_without_local_paths(tmp_path):
    from train.train import parent_lineage, reproduce_command

    # Two generations: `first` trained from scratch, `second` from first's checkpoint.
    first = _write_run(tmp_path / "machine" / "runs" / "first", "first", "gru", 2,
                       [_eval(1, 60, 0.2, 0.3), _eval(2, 120, 0.4, 0.2)])
    log = json.loads((first / model_card.TRAINING_LOG).read_text())
    log["best"]["cpu_hours"], log["cpu_hours"] = 4.0, 4.5
    (first / model_card.TRAINING_LOG).write_text(json.dumps(log))
    # first's weights were measured on one test set before second started from them.
    (first / model_card.TEST_RESULTS).write_text(json.dumps({"test_2014": {"exprate": 0.3312, "n_scored": 986}}))
    name, lineage = parent_lineage(str(first))
    assert name == "first" and [run["run_name"] for run in lineage] == ["first"]
    assert (lineage[0]["chosen_epoch"], lineage[0]["chosen_cpu_hours"], lineage[0]["cpu_hours"]) == (2, 4.0, 4.5)
    assert lineage[0]["chosen_heldout_exprate"] == 0.4 and lineage[0]["tests"] == {"test_2014": 0.3312}

    second = _write_run(tmp_path / "second", "second", "gru", 2, [_eval(1, 60, 0.5, 0.1)])
    log = json.loads((second / model_card.TRAINING_LOG).read_text())
    log["config"]["init_from"], log["lineage"] = name, lineage
    log["best"]["cpu_hours"], log["cpu_hours"] = 1.5, 2.0
    log["commands"] = [reproduce_command(["--config", "c.yaml", "--init_from", str(first),
                                          "--output_dir", str(tmp_path / "second")], 2)]
    (second / model_card.TRAINING_LOG).write_text(json.dumps(log))
    figures = {"n_scored": 986, "n_skipped": 0, "le1": 0.5, "le2": 0.6, "le3": 0.7, "ser": 0.2, "ms_per_image": 150.0,
               "settings": {"num_beams": 5}}
    (second / model_card.TEST_RESULTS).write_text(json.dumps({"test_2014": {**figures, "exprate": 0.35},
                                                              "test_2016": {**figures, "exprate": 0.36}}))
    card = str(model_card.render_model_card(second))
    assert "Fine-tuned from the `first` run" in card
    # Each row scores the checkpoint handed on: the learning curve along the lineage, "-" where unmeasured.
    assert ("| `first` | held out by expression, stroke augmentation, real data only | 2 | 2 | 4.00 | 4.50 | 4.00 "
            "| 40.00 | 33.12 | - |") in card
    assert "| `second` (these weights) | held out by expression, stroke augmentation, real data only | 1 | 1 | 1.50 " \
           "| 2.00 | 5.50 | 50.00 | 35.00 | 36.00 |" in card
    assert "**5.50 CPU-hours** of training lead to these weights." in card
    assert "--init_from PARENT_MODEL" in card and "--output_dir OUTPUT_DIR" in card
    # Neither the parent's folder nor the output folder of this machine is named (the card's own
    # evaluation command names the folder it is rendered for: `checkpoints` for the shipped one).
    assert str(tmp_path / "machine") not in card and f"--output_dir {tmp_path}" not in card
    # A grandchild lists both ancestors, oldest first.
    assert [run["run_name"] for run in parent_lineage(str(second))[1]] == ["first", "second"]
    # A Hub id stays in the command; a model folder without a training log is named by its folder.
    assert "--init_from user/model" in reproduce_command(["--init_from", "user/model"], 1)
    assert parent_lineage(str(tmp_path / "nothing_here")) == ("nothing_here", [])


def test_runs_of_two_data_recipes_show_the_test_figures_of_their_chosen_weights(tiny_model_dir, tmp_path):
    real = _write_run(tmp_path / "real", "real", "gru", 1, [_eval(1, 60, 0.40, 0.2), _eval(2, 120, 0.42, 0.2)],
                      source=tiny_model_dir)
    synth = _write_run(tmp_path / "synth", "synth", "gru", 1, [_eval(1, 60, 0.44, 0.2), _eval(2, 120, 0.47, 0.2)],
                       source=tiny_model_dir)
    log = json.loads((synth / model_card.TRAINING_LOG).read_text())
    log["config"].update(synthetic_share=0.5, synthetic_substitution_share=0.5)
    (synth / model_card.TRAINING_LOG).write_text(json.dumps(log))
    figures = {"n_scored": 986, "n_skipped": 0, "exprate": 0.3245, "le1": 0.5, "le2": 0.6, "le3": 0.7,
               "ser": 0.2, "ms_per_image": 150.0}
    model_card.record_test_results(synth, "test_2014", figures, {"num_beams": 5})

    rows = {r["run"]: r for r in compare_runs.compare([real, synth], 2.0)["rows"]}
    assert rows["synth"]["recipe"].endswith("50% synthetic (A share 50%)")
    # Composed samples made as long as the row they stand in for are a different recipe, and the lineage says so.
    assert model_card.recipe_in_words({**log["config"], "synthetic_match_length": True}).endswith(
        "50% synthetic (A share 50%, B length-matched)")
    assert rows["real"]["recipe"].endswith("real data only")
    assert rows["synth"]["tests"] == {"test_2014": 0.3245} and rows["real"]["tests"] == {}
    # Within 1 CPU-hour the chosen weights (epoch 2) are over the budget: their test figures do not belong there.
    assert compare_runs.compare([synth], 1.0)["rows"][0]["tests"] == {}

    card_dir = _write_run(tmp_path / "release", "gru", "gru", 1, [_eval(2, 120, 0.05, 0.6)], source=tiny_model_dir)
    compare_runs.main([str(real), str(synth), "--budget_hours", "2", "--card", str(card_dir)])
    card = (card_dir / "README.md").read_text()
    table = next(part for part in card.split("## Runs compared at an equal budget")[1].split("\n\n")
                 if part.startswith("| run |"))
    assert "| CROHME 2014 test |" in table.splitlines()[0]
    assert "| **47.00** | " in card and " 32.45 |" in card
