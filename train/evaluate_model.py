"""Scores a trained model on a CROHME split: ExpRate, <=1, <=2, <=3 errors, symbol error rate, speed.

    python -m train.evaluate_model --model checkpoints --data_dir ../shared/crohme --split test_2014 \
        --num_beams 10 --output_json results/test_2014.json

Images are the split's standard renders (the dataset's "image" column) fed through the model's own
`HMERProcessor`, exactly as a user's image would be; an image the processor rejects (blank, say)
is skipped and counted. `--split heldout` scores the training set's held-out slice (the one
train/train.py selects checkpoints on, by expression or by writer, as the model's training_log.json
says), so saved models can be compared without touching a test set. Prints a table; with
--output_json writes the figures as JSON and the predictions as a TSV next to it (name, reference,
prediction, token edit distance); with --update_card adds them to the model folder's card (see
train/model_card.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import HELDOUT_BY, as_uint8_image, select_heldout, size_grouped_batches  # noqa: E402
from train.model_card import TRAINING_LOG  # noqa: E402


HELDOUT = "heldout"


def load_metric():
    """The project's `evaluate` metric module (modeling_hmer/exprate.py), loaded without network."""
    import evaluate

    from modeling_hmer import exprate

    return evaluate.load(exprate.__file__)


@torch.no_grad()
def predict_images(
    model,
    processor,
    images: Sequence[np.ndarray],
    *,
    num_beams: int = 1,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 8,
    pixel_budget: int = 1_200_000,
    autocast_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: bool = False,
) -> list[Optional[str]]:
    """Decodes every image; returns one space-separated token string per image (None = rejected).

    Every image goes through the processor's image processor first (a blank one is rejected and
    gets None); the processed images are then batched by similar size (at most `batch_size`
    images and `pixel_budget` padded pixels per batch) to waste little work on padding.
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    image_processor = processor.image_processor
    processed: dict[int, np.ndarray] = {}
    for index, image in enumerate(images):
        try:
            processed[index] = image_processor.to_model_image(image)
        except ValueError:  # blank or unreadable: counted as skipped
            pass
    kept = list(processed)
    sizes = [processed[i].shape[:2] for i in kept]
    batches = size_grouped_batches(sizes, pixel_budget, batch_size) if kept else []
    predictions: list[Optional[str]] = [None] * len(images)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    bar = tqdm(total=len(kept), desc="decoding", disable=not progress, leave=False)
    for batch in batches:
        indices = [kept[i] for i in batch]
        features = image_processor.pad_batch([processed[i] for i in indices], return_tensors="pt")
        pixel_values = features["pixel_values"].to(device)
        if channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        with autocast:
            sequences = model.generate(
                pixel_values=pixel_values,
                pixel_mask=features["pixel_mask"].to(device),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
            )
        if not torch.is_tensor(sequences):
            sequences = sequences.sequences
        for index, text in zip(indices, processor.tokenizer.batch_decode(sequences.cpu(), skip_special_tokens=True)):
            predictions[index] = " ".join(text.split())
        bar.update(len(batch))
    bar.close()
    return predictions


def evaluate_split(
    model,
    processor,
    dataset,
    *,
    num_beams: int = 1,
    limit: Optional[int] = None,
    batch_size: int = 8,
    max_new_tokens: Optional[int] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Decodes `dataset` (rows with name, tokens, image) and scores it.

    Returns (figures, rows): figures has n_scored, n_skipped, exprate, le1, le2, le3, ser
    (fractions) and ms_per_image (wall time of preprocessing + decoding / images scored); rows has
    name, reference, prediction and distance per scored image.
    """
    from modeling_hmer.exprate import edit_distance

    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    names = list(dataset["name"])
    references = [" ".join(tokens) for tokens in dataset["tokens"]]
    images = [as_uint8_image(image) for image in dataset["image"]]
    start = time.perf_counter()
    predictions = predict_images(
        model,
        processor,
        images,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    scored = [i for i, p in enumerate(predictions) if p is not None]
    scores = load_metric().compute(
        predictions=[predictions[i] for i in scored], references=[references[i] for i in scored]
    )
    figures = {
        "n_scored": len(scored),
        "n_skipped": len(predictions) - len(scored),
        **{key: float(scores[key]) for key in ("exprate", "le1", "le2", "le3", "ser")},
        "ms_per_image": 1000.0 * seconds / max(len(scored), 1),
    }
    rows = [
        {
            "name": names[i],
            "reference": references[i],
            "prediction": predictions[i],
            "distance": edit_distance(predictions[i].split(), references[i].split()),
        }
        for i in scored
    ]
    return figures, rows


def format_table(figures: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| figure | value |", "|---|---|"]
    for key in ("exprate", "le1", "le2", "le3", "ser"):
        lines.append(f"| {key} | {100 * figures[key]:.2f} % |")
    lines.append(f"| n_scored | {figures['n_scored']} |")
    lines.append(f"| n_skipped | {figures['n_skipped']} |")
    lines.append(f"| ms_per_image | {figures['ms_per_image']:.1f} |")
    return "\n".join(lines)


def load_model_and_processor(model_id: str, device: str = "cpu"):
    """A saved model folder or Hub id -> (HMERForConditionalGeneration, HMERProcessor) in eval mode."""
    import modeling_hmer  # noqa: F401  (registers the Auto classes)
    from modeling_hmer.modeling_hmer import HMERForConditionalGeneration
    from modeling_hmer.processing_hmer import HMERProcessor

    model = HMERForConditionalGeneration.from_pretrained(model_id).to(device).eval()
    processor = HMERProcessor.from_pretrained(model_id)
    return model, processor


def heldout_settings(model_id: str, heldout_size: Optional[int] = None, heldout_by: Optional[str] = None) -> tuple[int, str]:
    """The held-out slice a saved model was chosen on: the given values, else those in its
    `training_log.json` (train.py's config), else train.py's defaults (500 expressions)."""
    log_path = Path(model_id) / TRAINING_LOG
    config = json.loads(log_path.read_text()).get("config", {}) if log_path.is_file() else {}
    size = heldout_size if heldout_size is not None else int(config.get("heldout_size", 500))
    by = heldout_by if heldout_by is not None else config.get("heldout_by", "expression")
    return size, by


def load_split(data_dir, split: str, cache_dir: Optional[str] = None, heldout_size: int = 500,
               heldout_by: str = "expression"):
    """A CROHME split as a `datasets.Dataset`; "heldout" is the training set's held-out slice."""
    from data_scripts.crohme import load_crohme

    if split != HELDOUT:
        return load_crohme(data_dir, split, cache_dir=cache_dir)
    train = load_crohme(data_dir, "train", cache_dir=cache_dir)
    _, heldout_indices = select_heldout(train, heldout_size, heldout_by)
    return train.select(heldout_indices)


def predictions_path(output_json: Path) -> Path:
    return output_json.with_name(output_json.stem + ".predictions.tsv")


def write_outputs(figures: dict, rows: list[dict], output_json: Path, extra: Optional[dict] = None) -> None:
    output_json.parent.mkdir(parents=True, exist_ok=True)
    output_json.write_text(json.dumps({**figures, **(extra or {})}, indent=2) + "\n")
    with open(predictions_path(output_json), "w", encoding="utf-8") as f:
        f.write("name\treference\tprediction\tdistance\n")
        for row in rows:
            f.write(f"{row['name']}\t{row['reference']}\t{row['prediction']}\t{row['distance']}\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder or Hub repo id")
    parser.add_argument("--data_dir", required=True, help="CROHME folder (archives or extracted folders)")
    parser.add_argument("--split", default="test_2014",
                        help="train, test_2014, test_2016 or heldout (the training set's model-selection slice; default test_2014)")
    parser.add_argument("--heldout_size", type=int, default=None,
                        help="size of the held-out slice for --split heldout (default: the model's training_log.json, else 500)")
    parser.add_argument("--heldout_by", choices=HELDOUT_BY, default=None,
                        help="held-out slice by expression, writer or unseen (new writers and new formulas; default: the model's training_log.json, else expression)")
    parser.add_argument("--num_beams", type=int, default=None, help="beam size (default: the model's generation config)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first K expressions")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache_dir", default=None, help="datasets cache folder for the built CROHME splits")
    parser.add_argument("--output_json", type=Path, default=None, help="write figures here, predictions next to it")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--update_card", action="store_true",
                        help="add the figures to the model folder's test_results.json and README.md (model card)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.update_card and args.limit is not None:
        raise SystemExit("--update_card scores the whole split: drop --limit")
    if args.update_card and args.split == HELDOUT:
        raise SystemExit("--update_card records test-set figures; the held-out figures in the card come from training")
    if args.update_card and not (Path(args.model) / TRAINING_LOG).exists():
        raise SystemExit(f"--update_card needs a model folder written by train/train.py; {args.model} is not one")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, processor = load_model_and_processor(args.model, args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    heldout_size, heldout_by = heldout_settings(args.model, args.heldout_size, args.heldout_by)
    dataset = load_split(args.data_dir, args.split, cache_dir=args.cache_dir, heldout_size=heldout_size,
                         heldout_by=heldout_by)
    num_beams = args.num_beams
    if num_beams is None:
        num_beams = getattr(getattr(model, "generation_config", None), "num_beams", None) or 1
    figures, rows = evaluate_split(
        model,
        processor,
        dataset,
        num_beams=num_beams,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        autocast_dtype=torch.bfloat16 if args.bf16 else None,
        channels_last=args.channels_last,
    )
    settings = {"model": args.model, "split": args.split, "num_beams": num_beams, "limit": args.limit,
                "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "bf16": args.bf16,
                "channels_last": args.channels_last, "device": args.device, "num_threads": torch.get_num_threads()}
    if args.split == HELDOUT:
        settings.update(heldout_size=heldout_size, heldout_by=heldout_by)
    print(format_table(figures, f"{args.model} on {args.split} (beam {num_beams})"))
    if args.output_json is not None:
        write_outputs(figures, rows, args.output_json, {"settings": settings})
        print(f"wrote {args.output_json} and {predictions_path(args.output_json)}")
    if args.update_card:
        from train.model_card import record_test_results

        print(f"updated {record_test_results(Path(args.model), args.split, figures, settings)}")
    return figures


if __name__ == "__main__":
    main()
