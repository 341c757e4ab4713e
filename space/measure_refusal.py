"""How often the "not a handwritten expression" checks refuse real handwriting, and what they measure.

Runs `modeling_hmer.expression_check` the way the Space does (ink check, length bound, decoding,
confidence check) on CROHME splits and prints, per split, the number refused (by rule), the range
of every statistic and the time taken; with --images, also on the pictures given (noise, photos,
pages of text), one line each.

    python space/measure_refusal.py --data_dir ../shared/crohme --splits test_2014 test_2016 heldout \
        --num_beams 5 [--cache_dir /tmp/crohme_cache] [--images bad/*.png] [--json out.json]

`heldout` is the training set's model-selection slice, as the shipped model's training log defines it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modeling_hmer import HMERForConditionalGeneration, HMERProcessor  # noqa: E402
from modeling_hmer.expression_check import NotAnExpressionError  # noqa: E402


def read(model, processor, image, num_beams: int) -> dict:
    """One image through the checks and the model -> its statistics, answer and refusal (if any)."""
    start = time.perf_counter()
    record = {}
    try:
        inputs, stats = processor.check_image(image)
        record.update(stats)
        limit = processor.max_new_tokens_for(stats, model.generation_config.max_new_tokens)
        record["max_new_tokens"] = limit
        out = model.generate(**inputs, num_beams=num_beams, max_new_tokens=limit, output_scores=True,
                             return_dict_in_generate=True)
        record["mean_log_prob"], record["latex"] = processor.check_answer(out)
        record["refused"] = None
    except NotAnExpressionError as error:
        record.update(error.statistics)
        record["refused"] = str(error).split(": ", 1)[1].split(".")[0]
    record["seconds"] = time.perf_counter() - start
    return record


def summarize(name: str, records: list[dict]) -> dict:
    refused = [r for r in records if r["refused"]]
    reasons = {}
    for r in refused:
        reasons[r["refused"]] = reasons.get(r["refused"], 0) + 1
    summary = {"split": name, "n": len(records), "refused": len(refused), "reasons": reasons}
    for key in ("shaded", "pieces", "symbol_size", "stroke_width", "mean_log_prob", "seconds"):
        values = np.array([r[key] for r in records if key in r], dtype=float)
        if values.size:
            summary[key] = [round(float(values.min()), 3), round(float(np.median(values)), 3),
                            round(float(values.max()), 3)]
    tokens = [(r["n_tokens"], r["pieces"]) for r in records if "n_tokens" in r and "pieces" in r]
    if tokens:
        summary["truth_over_bound"] = sum(n + 1 > r for (n, _), r in zip(tokens, (
            rec["max_new_tokens"] for rec in records if "n_tokens" in rec and "pieces" in rec)))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "checkpoints"))
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "crohme"))
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--splits", nargs="*", default=["test_2014", "test_2016"])
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="rows per split (for a quick look)")
    parser.add_argument("--images", nargs="*", default=[])
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    processor = HMERProcessor.from_pretrained(args.model)
    model = HMERForConditionalGeneration.from_pretrained(args.model).eval()

    everything = {}
    for split in args.splits:
        from data_scripts.crohme import load_crohme

        if split == "heldout":
            from train.data import select_heldout
            from train.evaluate_model import heldout_settings

            size, by = heldout_settings(args.model)
            train = load_crohme(args.data_dir, "train", cache_dir=args.cache_dir)
            dataset = train.select(select_heldout(train, size, by)[1])
        else:
            dataset = load_crohme(args.data_dir, split, cache_dir=args.cache_dir)
        if args.limit:
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        records = []
        for row in dataset:
            record = read(model, processor, row["image"], args.num_beams)
            record.update(name=row["name"], n_tokens=len(row["tokens"]))
            records.append(record)
        everything[split] = records
        print(json.dumps(summarize(split, records)), flush=True)
    for path in args.images:
        from PIL import Image

        record = read(model, processor, Image.open(path), args.num_beams)
        record["name"] = path
        everything.setdefault("images", []).append(record)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
