"""Compares training runs at an equal compute budget on the held-out slice (greedy ExpRate).

    python -m train.compare_runs /root/hmer_runs/real /root/hmer_runs/synth --budget_hours 3 \
        [--card checkpoints]

Each RUN is a model folder written by train/train.py (its training_log.json lists every held-out
evaluation with the training minutes it took). The runs may differ in decoder or in data recipe
(held-out slice, synthetic share). For each run the table shows the best evaluation within
`--budget_hours` CPU-hours (wall time x processes x torch threads), so runs on one or two
processes compare fairly, and, where the folder has them (`evaluate_model --update_card` on the
run's folder), the test figures of the run's chosen weights: measured after choosing, never used
to choose. With `--card FOLDER` the table and a plot of held-out ExpRate against CPU-hours
(comparison.png) go into that model folder's card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from train.model_card import (
    TRAINING_LOG,
    count_parameters,
    eval_cpu_hours,
    read_test_exprates,
    record_comparison,
    recipe_in_words,
)


def load_run(folder: Path) -> dict:
    path = Path(folder) / TRAINING_LOG
    if not path.exists():
        raise SystemExit(f"{path} is missing: RUN must be an --output_dir of train/train.py")
    return json.loads(path.read_text())


def best_within_budget(log: dict, budget_hours: Optional[float]) -> Optional[dict]:
    """The best held-out evaluation (ExpRate, then lower symbol error rate) within the budget."""
    evals = [e for e in log.get("evals", []) if budget_hours is None or eval_cpu_hours(log, e) <= budget_hours + 1e-9]
    return max(evals, key=lambda e: (e["exprate"], -e["ser"]), default=None)


def compare(folders: list[Path], budget_hours: Optional[float]) -> dict:
    rows = []
    for folder in folders:
        log = load_run(folder)
        best = best_within_budget(log, budget_hours)
        if best is None:
            raise SystemExit(f"{folder}: no held-out evaluation within {budget_hours} CPU-hours")
        spent = max((eval_cpu_hours(log, e) for e in log["evals"]), default=0.0)
        rows.append({
            "run": log["config"]["run_name"],
            "folder": Path(folder).name,  # its name only: the card goes public, this machine's folders do not
            "decoder": log["config"]["model"].get("decoder_type", "gru"),
            "recipe": recipe_in_words(log["config"]),
            "parameters_m": (log.get("n_parameters") or count_parameters(Path(folder)) or 0) / 1e6,
            "cpu_hours": eval_cpu_hours(log, best),
            "cpu_hours_trained": spent,
            **{key: best[key] for key in ("epoch", "step", "exprate", "le1", "le2", "le3", "ser")},
            # the folder holds the weights of the best evaluation over all, which is this one only
            # when the budget does not cut the run short of it
            "tests": read_test_exprates(folder) if best == log.get("best", best) else {},
        })
    ranked = sorted(rows, key=lambda r: (r["exprate"], -r["ser"]), reverse=True)
    if len(ranked) > 1:
        lead, second = ranked[0], ranked[1]
        conclusion = (
            f"At this budget `{lead['run']}` (decoder {lead['decoder']}, {lead['recipe']}) leads: held-out ExpRate "
            f"{100 * lead['exprate']:.2f}% against {100 * second['exprate']:.2f}% "
            f"(symbol error rate {100 * lead['ser']:.2f}% against {100 * second['ser']:.2f}%)."
        )
    else:
        conclusion = ""
    short = [r["run"] for r in rows if budget_hours is not None and r["cpu_hours_trained"] < budget_hours]
    if short:
        conclusion += f" Not yet trained for the whole budget: {', '.join(short)}."
    return {"budget_hours": budget_hours, "rows": rows, "conclusion": conclusion.strip()}


def format_table(comparison: dict) -> str:
    lines = ["| run | decoder | data | CPU-hours | epoch | held-out ExpRate | <=1 | <=2 | SER | tests |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        tests = ", ".join(f"{split} {100 * value:.2f}" for split, value in r.get("tests", {}).items()) or "-"
        lines.append(
            f"| {r['run']} | {r['decoder']} | {r.get('recipe', '')} | {r['cpu_hours']:.2f} | {r['epoch']:.2f} "
            f"| {100 * r['exprate']:.2f} | {100 * r['le1']:.2f} | {100 * r['le2']:.2f} | {100 * r['ser']:.2f} | {tests} |"
        )
    return "\n".join(lines + ["", comparison["conclusion"]])


def plot_comparison(folders: list[Path], path: Path, budget_hours: Optional[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for folder in folders:
        log = load_run(folder)
        hours = [eval_cpu_hours(log, e) for e in log["evals"]]
        label = f"{log['config']['run_name']} ({log['config']['model'].get('decoder_type', 'gru')}, " \
                f"{recipe_in_words(log['config'], short=True)})"
        axes[0].plot(hours, [100 * e["exprate"] for e in log["evals"]], "o-", label=label)
        axes[1].plot(hours, [100 * e["ser"] for e in log["evals"]], "o-", label=label)
    axes[0].set(title="held-out ExpRate (greedy)", xlabel="CPU-hours", ylabel="%", ylim=(0, None))
    axes[1].set(title="held-out symbol error rate", xlabel="CPU-hours", ylabel="%", yscale="log")
    for ax in axes:
        if budget_hours is not None:
            ax.axvline(budget_hours, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="model folders written by train/train.py")
    parser.add_argument("--budget_hours", type=float, default=None, help="CPU-hours per run (default: all)")
    parser.add_argument("--card", type=Path, default=None, help="model folder whose card gets the table and plot")
    args = parser.parse_args(argv)
    comparison = compare(args.runs, args.budget_hours)
    print(format_table(comparison))
    if args.card is not None:
        plot_comparison(args.runs, args.card / "comparison.png", args.budget_hours)
        print(f"updated {record_comparison(args.card, comparison)}")
    return comparison


if __name__ == "__main__":
    main()
