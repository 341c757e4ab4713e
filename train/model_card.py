"""The model card (README.md) of a trained model folder, rendered from the JSON files beside the weights.

Three tools write into a model folder, each its own JSON file, and each re-renders the card:

- `train/train.py` writes `training_log.json` (config, held-out evaluations, time, hardware);
- `train/evaluate_model.py --update_card` adds a test split's figures to `test_results.json`;
- `train/compare_runs.py --card FOLDER` writes `comparison.json` (runs at an equal budget).

So the card always states what the folder's files hold. Test figures belong to one set of weights:
train.py deletes `test_results.json` whenever it writes new weights. The test results also go into
the card's `model-index` metadata (`huggingface_hub.EvalResult`), which the Hub shows on the page.

    python -m train.model_card checkpoints      # re-render checkpoints/README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TRAINING_LOG = "training_log.json"
TEST_RESULTS = "test_results.json"
COMPARISON = "comparison.json"

SPLIT_NAMES = {"test_2014": "CROHME 2014 test", "test_2016": "CROHME 2016 test", "train": "CROHME train"}
LINEAGE_TESTS = ("test_2014", "test_2016")  # the test columns of the lineage table
# The original project (DenseNet encoder + GRU decoder with coverage, CROHME 2014 test) and the
# published DWAP result: the bars a release model is measured against.
REFERENCE_EXPRATES = {"test_2014": {"the original project": 38.6, "published DWAP": 50.1}}


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def read_test_exprates(folder: Path) -> dict:
    """{split: ExpRate} of a model folder's test_results.json; {} where no test set was measured."""
    return {split: figures["exprate"] for split, figures in (_read_json(Path(folder) / TEST_RESULTS) or {}).items()}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _epoch(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def count_parameters(folder: Path) -> Optional[int]:
    """Parameters in model.safetensors, read from the file's header (no tensor is loaded)."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    if not path.exists():
        return None
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def _first_counted_eval(log: dict) -> Optional[dict]:
    """The first held-out evaluation that recorded its CPU-hours (train.py records them since it counts CPU-hours)."""
    return next((e for e in log.get("evals", []) if "cpu_hours" in e and e.get("minutes")), None)


def eval_cpu_hours(log: dict, record: dict) -> float:
    """CPU-hours spent when a held-out evaluation was made (train.py records them; older records: estimated).

    Records written before CPU-hours were counted are estimated at the rate of the first record that has
    them: a run was never resumed with another process count before counting began, while the log's own
    `num_processes` is that of the latest segment (a 1-process start resumed on 2 would double them).
    """
    if "cpu_hours" in record:
        return record["cpu_hours"]
    counted = _first_counted_eval(log)
    if counted is not None:
        return record["minutes"] * counted["cpu_hours"] / counted["minutes"]
    return cpu_hours(log, record["minutes"])


def changed_process_count(log: dict) -> bool:
    """Whether the run was resumed with another number of processes: CPU-hours per wall hour differ
    between the first evaluation that counted them and the whole run (both exact when counted)."""
    counted = _first_counted_eval(log)
    if counted is None or not log.get("hours") or "cpu_hours" not in log:
        return False
    first_rate = counted["cpu_hours"] / (counted["minutes"] / 60)
    return abs(log["cpu_hours"] / log["hours"] - first_rate) > 0.05 * first_rate


def cpu_hours(log: dict, minutes: float) -> float:
    """Processor time of `minutes` of training at the log's setting: wall time x processes x torch threads.

    On a GPU this is GPU-hours x processes; the threads only count on a CPU. Only an estimate for a run
    whose segments used different process counts: train.py records the exact figure with each evaluation.
    """
    processes = log.get("num_processes")
    if processes is None:  # logs written before num_processes was recorded: "N process(es) on ..."
        match = re.match(r"(\d+) process", log.get("hardware", ""))
        processes = int(match.group(1)) if match else 1
    on_cpu = "CPU" in log.get("hardware", "CPU")
    threads = (log.get("config", {}).get("num_threads") or 1) if on_cpu else 1
    return minutes / 60 * processes * threads


def record_test_results(folder: Path, split: str, figures: dict, settings: dict) -> Path:
    """Adds one split's test figures (fractions, from evaluate_model) to test_results.json; re-renders."""
    folder = Path(folder)
    results = _read_json(folder / TEST_RESULTS) or {}
    results[split] = {**figures, "settings": settings}
    (folder / TEST_RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return write_model_card(folder)


def record_comparison(folder: Path, comparison: dict) -> Path:
    """Stores a run comparison (from compare_runs) in comparison.json; re-renders the card."""
    folder = Path(folder)
    (folder / COMPARISON).write_text(json.dumps(comparison, indent=2) + "\n")
    return write_model_card(folder)


def _metadata(name: str, tests: dict) -> ModelCardData:
    eval_results = []
    for split, figures in tests.items():
        for key, label in (("exprate", "ExpRate"), ("le1", "ExpRate <= 1 error"), ("ser", "symbol error rate")):
            eval_results.append(EvalResult(
                task_type="image-to-text", task_name="Handwritten mathematical expression recognition",
                dataset_type="crohme", dataset_name=SPLIT_NAMES.get(split, split), dataset_split=split,
                metric_type=key, metric_name=label, metric_value=round(100 * figures[key], 2),
                metric_args={"num_beams": figures["settings"].get("num_beams")},
            ))
    return ModelCardData(
        library_name="transformers", pipeline_tag="image-to-text", model_name=name,
        tags=["handwritten-math", "hmer", "crohme", "latex"], metrics=["exprate"],
        eval_results=eval_results or None,
    )


def _test_section(tests: dict, folder_hint: str) -> str:
    command = (f"python -m train.evaluate_model --model {folder_hint} --data_dir ../shared/crohme "
               f"--split test_2014 --num_beams 10 --update_card")
    if not tests:
        return f"Not measured yet for these weights. Measure with\n\n```\n{command}\n```\n"
    rows = []
    for split, f in tests.items():
        s = f["settings"]
        rows.append(
            f"| {SPLIT_NAMES.get(split, split)} | {f['n_scored']} ({f['n_skipped']} skipped) | {s.get('num_beams')} "
            f"| **{_percent(f['exprate'])}** | {_percent(f['le1'])} | {_percent(f['le2'])} | {_percent(f['le3'])} "
            f"| {_percent(f['ser'])} | {f['ms_per_image']:.0f} |"
        )
    lines = [
        "| test set | expressions | beam | ExpRate | <=1 | <=2 | <=3 | symbol error rate | ms per image |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    for split, references in REFERENCE_EXPRATES.items():
        if split in tests:
            bars = ", ".join(f"{name} {value}%" for name, value in references.items())
            lines.append(f"For comparison on {SPLIT_NAMES[split]}: {bars}.")
    settings = next(iter(tests.values()))["settings"]
    flags = [f"--num_beams {settings.get('num_beams')}", f"--batch_size {settings.get('batch_size')}"]
    flags += [f"--max_new_tokens {settings['max_new_tokens']}"] if settings.get("max_new_tokens") else []
    flags += [flag for key, flag in (("bf16", "--bf16"), ("channels_last", "--channels_last")) if settings.get(key)]
    flags += [f"--num_threads {settings['num_threads']}"] if settings.get("num_threads") else []
    command = (f"python -m train.evaluate_model --model {folder_hint} --data_dir ../shared/crohme "
               f"--split {next(iter(tests))} {' '.join(flags)} --update_card")
    lines.append(
        f"Measured with `train/evaluate_model.py` ({'bfloat16' if settings.get('bf16') else 'float32'}, "
        f"{settings.get('num_threads') or 'default'} CPU thread(s)); reproduce with\n\n```\n{command}\n```\n"
    )
    return "\n".join(lines)


def _comparison_section(comparison: Optional[dict], run_name: str) -> str:
    if not comparison:
        return ""
    # A comparison kept from an earlier run of the lineage tells how the recipe was chosen, not these weights.
    earlier = run_name not in {r["run"] for r in comparison["rows"]}
    origin = ("\nThese runs came before these weights (see the lineage): their comparison chose the data recipe "
              "that the later runs kept.\n" if earlier else "")
    splits = sorted({split for r in comparison["rows"] for split in r.get("tests", {})})
    rows = "\n".join(
        f"| {r['run']} | {r['decoder']} | {r.get('recipe', '')} | {r['parameters_m']:.2f}M | {r['cpu_hours']:.2f} "
        f"| {_epoch(r['epoch'])} | **{_percent(r['exprate'])}** | {_percent(r['le1'])} | {_percent(r['le2'])} "
        f"| {_percent(r['ser'])} |" + "".join(f" {_percent(r['tests'][s]) if s in r.get('tests', {}) else '-'} |"
                                             for s in splits)
        for r in comparison["rows"]
    )
    test_columns = "".join(f" {SPLIT_NAMES.get(split, split)} |" for split in splits)
    hours = comparison.get("budget_hours")
    budget = f"for at most {hours:g} CPU-hours" if hours is not None else "each for all of its CPU-hours"
    return f"""
## Runs compared at an equal budget
{origin}
The same start and schedule for each run, {budget} (wall time x processes
x threads); the best held-out evaluation within that budget (greedy decoding, %). Test columns: the chosen
weights on the test sets (beam 5), measured after choosing. Made by `python -m train.compare_runs`.

| run | decoder | data | parameters | CPU-hours | epoch | held-out ExpRate | <=1 | <=2 | symbol error rate |{test_columns}
|---|---|---|---|---|---|---|---|---|---|{'---|' * len(splits)}
{rows}

{comparison.get('conclusion', '')}

![held-out ExpRate against CPU-hours](comparison.png)
"""


def recipe_in_words(data: dict, short: bool = False) -> str:
    """A run's data recipe (its config or lineage `data`) in words: held-out slice, augmentation, synthetic
    share; `short`: the synthetic share only ("real data only", "50% synthetic")."""
    synthetic = data.get("synthetic_share") or 0
    if short:
        return f"{synthetic:.0%} synthetic" if synthetic else "real data only"
    parts = [f"held out by {data.get('heldout_by') or 'expression'}",
             "stroke augmentation" if data.get("augment", True) else "no augmentation",
             f"{synthetic:.0%} synthetic (A share {data.get('synthetic_substitution_share') or 0.5:.0%}"
             f"{', B length-matched' if data.get('synthetic_match_length') else ''})"
             if synthetic else "real data only"]
    return ", ".join(parts)


# The config fields that make a run's data recipe (see recipe_in_words), kept for each run of a lineage.
RECIPE_FIELDS = ("heldout_by", "heldout_size", "augment", "synthetic_share", "synthetic_substitution_share",
                 "synthetic_match_length")


def lineage_entry(log: dict, test_exprates: dict) -> dict:
    """One run of a lineage, from its training_log.json and the {split: ExpRate} of its best weights: its name,
    parent, data recipe and epochs trained, the epoch, CPU-hours and held-out ExpRate of the checkpoint it hands
    on, that checkpoint's test ExpRates, and its CPU-hours in all."""
    config, best = log.get("config", {}), log.get("best") or {}
    return {
        "run_name": config.get("run_name"),
        "init_from": config.get("init_from"),
        "data": {key: config.get(key) for key in RECIPE_FIELDS},
        "epochs": log.get("epochs"),
        "cpu_hours": log.get("cpu_hours"),
        "chosen_epoch": best.get("epoch"),
        "chosen_cpu_hours": best.get("cpu_hours"),
        "chosen_heldout_exprate": best.get("exprate"),
        "tests": test_exprates,
    }


def _lineage_section(log: dict, test_exprates: dict) -> str:
    """Every run these weights descend from, and this one: CPU-hours up to the checkpoint handed on, summed,
    and that checkpoint's held-out and test ExpRates (the lineage's learning curve). `test_exprates`: this
    folder's, {split: ExpRate}."""
    ancestors = log.get("lineage") or []
    if not ancestors:
        return ""
    rows, total = [], 0.0
    for position, run in enumerate([*ancestors, lineage_entry(log, test_exprates)]):
        handed_on = run.get("chosen_cpu_hours") or 0.0
        total += handed_on
        name = f"`{run.get('run_name')}`" + (" (these weights)" if position == len(ancestors) else "")
        heldout, tests = run.get("chosen_heldout_exprate"), run.get("tests") or {}
        figures = [_percent(heldout) if heldout is not None else "-"] + [
            _percent(tests[split]) if split in tests else "-" for split in LINEAGE_TESTS]
        rows.append(f"| {name} | {recipe_in_words(run.get('data') or {})} | {run.get('epochs') or 0} "
                    f"| {_epoch(run.get('chosen_epoch') or 0)} | {handed_on:.2f} | {run.get('cpu_hours') or 0.0:.2f} "
                    f"| {total:.2f} | " + " | ".join(figures) + " |")
    test_headers = " | ".join(SPLIT_NAMES[split] for split in LINEAGE_TESTS)
    return (
        "## Lineage\n\nEach run started from the checkpoint the one above it handed on (`--init_from`). The last "
        "columns score that checkpoint: on its run's held-out slice (greedy; the slice is named under data) and on "
        "the test sets (beam search, as measured when it was shipped; - where not measured).\n\n"
        "| run | data | epochs trained | checkpoint handed on (epoch) | CPU-hours to it | CPU-hours in all "
        f"| lineage CPU-hours | held-out ExpRate | {test_headers} |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\n**{total:.2f} CPU-hours** of training lead to these weights.\n\n"
    )


def render_model_card(folder: Path) -> ModelCard:
    """The card for a model folder, from its training_log.json (required) and optional JSON files."""
    folder = Path(folder)
    log = _read_json(folder / TRAINING_LOG)
    if log is None:
        raise FileNotFoundError(f"{folder / TRAINING_LOG} is missing: the card describes a train.py run")
    config, best = log["config"], log.get("best") or {}
    tests = _read_json(folder / TEST_RESULTS) or {}
    n_parameters = log.get("n_parameters") or count_parameters(folder)
    model_desc = ", ".join(f"{k}={v}" for k, v in sorted(config["model"].items())) or "HMERConfig defaults"
    origin = (f"Fine-tuned from the `{config['init_from']}` run (see the lineage below)" if config.get("init_from")
              else "Trained from scratch")
    lineage = _lineage_section(log, read_test_exprates(folder))
    n_train = log.get("n_train")
    train_desc = f"{n_train} CROHME training expressions" if n_train else "the CROHME training expressions"
    n_heldout = log.get("n_heldout") or config["heldout_size"]
    heldout_desc = {
        "writer": f"{n_heldout} further training expressions of whole writers held out (fixed, writers chosen by a "
        "hash; none of them is trained on, as in the test sets)",
        "unseen": f"{n_heldout} further training expressions of whole writers held out, each a formula that no "
        "training expression writes (fixed, writers chosen by a hash; new writers and new formulas, as in the test sets)",
        "expression_unseen": f"{config['heldout_size']} further training expressions held out (fixed, chosen by a hash of "
        f"their names), of which the {n_heldout} whose formula no training expression writes are scored",
    }.get(
        config.get("heldout_by"),
        f"{n_heldout} further training expressions held out (fixed, chosen by a hash of their names)",
    )
    share = config.get("synthetic_share") or 0
    synthetic_desc = (
        f", {share:.0%} of each epoch's samples replaced by synthetic expressions in the training writers' ink "
        f"(substituted, A: {config.get('synthetic_substitution_share') or 0.5:.0%}; composed, B: the rest"
        f"{', each as many tokens as the row it stands in for' if config.get('synthetic_match_length') else ''}; "
        "`data_scripts/synth.py`)" if share else ""
    )
    # With ema_decay the scored weights are a moving average; the raw weights' ExpRate is a column of its own.
    averaged = any("raw" in e for e in log.get("evals", []))
    heldout_header = ("| epoch | step | ExpRate | <=1 | <=2 | <=3 | symbol error rate |"
                      + (" raw weights: ExpRate |" if averaged else "") + " minutes | CPU-hours |")
    heldout_rows = "\n".join(
        f"| {_epoch(e['epoch'])} | {e['step']} | {_percent(e['exprate'])} | {_percent(e['le1'])} | {_percent(e['le2'])} "
        f"| {_percent(e['le3'])} | {_percent(e['ser'])} |"
        + (f" {_percent(e['raw']['exprate']) if 'raw' in e else '-'} |" if averaged else "")
        + f" {e['minutes']:.0f} | {eval_cpu_hours(log, e):.2f} |"
        for e in log.get("evals", [])
    )
    average_desc = (
        f"\n- The weights are an exponential moving average of the trained weights (decay {config['ema_decay']}, "
        "BatchNorm statistics averaged too), updated after every optimizer step: the average is what was "
        "scored, chosen and saved." if config.get("ema_decay") else ""
    )
    commands = log.get("commands") or []
    # Logs written before the command was recorded: the run's config file says the same.
    command = commands[0] if commands else (
        f"accelerate launch train/train.py --config train/configs/{config['run_name']}.yaml "
        f"--data_dir ../shared/crohme --output_dir OUTPUT_DIR"
    )
    # Each segment records its command (the launcher's process count included): show every change.
    changes = [c for i, c in enumerate(commands) if i == 0 or c != commands[i - 1]]
    segment_commands = (
        f"\n\nIts {len(commands)} segments ran these commands in turn (each one after the first with "
        "`--resume`):\n\n```\n" + "\n".join(changes) + "\n```"
        if len(changes) > 1 else ""
    )
    hours = log.get("hours", 0.0)
    segments_note = (
        "\nThis run was resumed with another number of processes at least once (`--resume` keeps the weights,\n"
        "optimizer state, epoch position and learning rate, but batches then differ): the command above, with\n"
        "one process count throughout, gives a comparable model, not the identical one."
        if changed_process_count(log) else ""
    )
    name = config["run_name"]
    body = f"""
# HMER model `{name}`

Handwritten mathematical expression recognition: an image of a handwritten expression in, LaTeX
tokens out. {origin} on the CROHME 2014/2016 training set with this project's `train/train.py`.

- Model: {model_desc}; {(n_parameters or 0) / 1e6:.2f}M parameters.
- Training data: {train_desc}, rendered from the ink with stroke-level augmentation
  (`augment: {config['augment']}`){synthetic_desc};
  {heldout_desc} to choose this checkpoint. The CROHME test sets were not used for any choice.
- Best held-out ExpRate (greedy): **{_percent(best.get('exprate', 0))}%** at epoch {_epoch(best.get('epoch', 0))}
  (step {best.get('step', '-')}).
- Trained for {log.get('epochs', 0)} full epoch(s), {log.get('steps', 0)} optimizer steps, {hours:.2f} hours
  ({log.get('cpu_hours', cpu_hours(log, 60 * hours)):.2f} CPU-hours) on {log.get('hardware', 'unknown hardware')}.
- Optimizer {config['optimizer']}, learning rate {config['learning_rate']}, schedule {config['lr_scheduler']}
  over {config['num_epochs']} epochs (warmup {config['warmup_steps']} steps), mixed precision
  {config['mixed_precision']}, pixel budget {config['pixel_budget']} per batch.{average_desc}

## Use

```python
import modeling_hmer  # registers the HMER classes and the "image-to-latex" pipeline with transformers
from transformers import pipeline

reader = pipeline("image-to-latex", model="checkpoints")
result = reader("expression.png", num_beams=5)  # a path, PIL image, numpy array or bytes; or a list (batch_size=)
print(result["latex"])                           # space-separated LaTeX, e.g. "x ^ {{ 2 }} + 1"
for candidate in result["candidates"]:          # the n-best, best first
    print(candidate["latex"], candidate["share"])
```

Where the package is not installed, the folder's own code runs it:
`pipeline("image-to-latex", model="checkpoints", trust_remote_code=True)`. Per image the pipeline returns
`latex`, `score` (log-probability per token), `share` (the candidate's probability as a share of the n-best
list's total: the shares sum to 1), `tokens` with `token_probabilities` (per-token confidence), `candidates`
(the n-best with the same fields) and, with `return_attentions=True`, `attentions` (one map per token over
`model_input`, the processed image). Decoding only writes well-formed LaTeX (balanced braces, `^` / `_` with
a group, `\\frac` with two, `\\sqrt` with its group and optional index: `latex_grammar=False` lifts it).
From the command line: `python -m modeling_hmer.predict expression.png --num_beams 5 [--json]`.

{lineage}## Test sets (beam search, %)

{_test_section(tests, str(folder))}
## Held-out slice, per evaluation (greedy decoding, %)

{heldout_header}
|{'---|' * heldout_header.count(' |')}
{heldout_rows}

![training curves](training_curves.png)
{_comparison_section(_read_json(folder / COMPARISON), name)}
## Reproduce

```
{command}
```

A run stopped by `--max_minutes` continues with the same command plus `--resume` (and the same
`--state_dir`); a run done in several segments with one process count equals one uninterrupted run.{segments_note}{segment_commands}

## Limits

- Trained only on CROHME (about 8,800 expressions, 110 symbols): symbols outside that set cannot be
  written, and long or multi-line expressions are read less reliably than short ones.
- Trained on CPU for a small fraction of the published recipes' budget: read the held-out curve
  and the test table above before relying on it.
- Images are expected as one expression, dark ink on a light (or light on a dark) background;
  photos with uneven lighting are not corrected.
"""
    return ModelCard(f"---\n{_metadata(name, tests).to_yaml()}\n---\n{body}")


def write_model_card(folder: Path) -> Path:
    path = Path(folder) / "README.md"
    render_model_card(folder).save(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Re-render a trained model folder's README.md from its JSON files.")
    parser.add_argument("folder", type=Path)
    print(write_model_card(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
