"""Read handwritten math from image files and print LaTeX.

    python -m modeling_hmer.predict IMAGE [IMAGE ...] [--model DIR_OR_HUB_ID] [--num_beams N] [--json]
                                    [--attention_dir DIR] [--max_new_tokens N]

Prints one line per image, `path<TAB>latex`, or with --json a list of {"image", "latex", "score", "ms"}.
An image that cannot be read is reported on stderr (and as {"image", "error"} in JSON) and the others are
still read; the exit code is then 1. --attention_dir writes, per image, one PNG per output token: the
token's attention as a heat map over the processed image (file `<image>_<step>_<token>.png`).

The default model is the shipped checkpoint folder `checkpoints/` of this repository. Nothing is fetched
from the Hugging Face Hub unless --model names a Hub repository id.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints"

# File-name-safe names for tokens that are punctuation.
_TOKEN_NAMES = {
    "{": "lbrace", "}": "rbrace", "(": "lparen", ")": "rparen", "[": "lbracket", "]": "rbracket",
    "^": "sup", "_": "sub", "+": "plus", "-": "minus", "=": "eq", "<": "lt", ">": "gt", "/": "slash",
    "|": "bar", ",": "comma", ".": "dot", "!": "excl", "'": "prime", "\\{": "lset", "\\}": "rset",
    "</s>": "eos", "<s>": "bos", "<pad>": "pad", "<unk>": "unk",
}  # fmt: skip


class PredictError(Exception):
    """A problem the user can fix (missing model, bad option); printed without a traceback."""


def token_file_name(token: str) -> str:
    """A LaTeX token as a safe file-name part: `\\frac` -> `frac`, `{` -> `lbrace`, `x` -> `x`."""
    if token in _TOKEN_NAMES:
        return _TOKEN_NAMES[token]
    name = re.sub(r"[^A-Za-z0-9]", "", token.lstrip("\\"))
    return name or "u" + "".join(f"{ord(c):04x}" for c in token)


def resolve_model(model: str | None) -> str:
    """--model value -> a local folder or a Hub id; raises PredictError with what to do."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise PredictError(
                f"no trained model in {DEFAULT_MODEL_DIR} (the shipped checkpoint folder). Train one (see README.md), "
                "or pass --model with a folder saved by save_pretrained or a Hugging Face Hub repository id."
            )
        return str(DEFAULT_MODEL_DIR)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PredictError(f"{path} holds no model (no config.json): pass a folder saved by save_pretrained")
        return str(path)
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.rstrip("/").split("/", 1)[-1]
    if path.exists() or looks_like_path or model.count("/") > 1:
        raise PredictError(f"model folder not found: {model}")
    return model  # a Hub repository id, e.g. "user/hmer"


def load(model_id: str):
    """-> (model, processor). Hub ids are downloaded (or read from the Hugging Face cache)."""
    from transformers.utils import logging as hf_logging

    from . import HMERForConditionalGeneration, HMERProcessor

    hf_logging.disable_progress_bar()  # keep the output to the LaTeX lines
    try:
        processor = HMERProcessor.from_pretrained(model_id)
        model = HMERForConditionalGeneration.from_pretrained(model_id)
    except OSError as err:
        raise PredictError(f"cannot load the model {model_id!r}: {err}") from None
    return model.eval(), processor


def save_attention_maps(
    folder: Path, image_name: str, pixel_values, attentions, tokens: list[str], stride: int
) -> list[Path]:
    """One PNG per token: the processed image in gray with the token's attention in red on top.

    pixel_values: (1, H, W) processed image; attentions: (L, h, w) over feature cells of `stride` px.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = pixel_values[0].float().cpu().numpy()
    height, width = image.shape
    maps = attentions.float().cpu()[:, None]  # (L, 1, h, w)
    maps = F.interpolate(maps, scale_factor=stride, mode="bilinear", align_corners=False)[:, 0]
    canvas = torch.zeros(maps.shape[0], height, width)
    h, w = min(height, maps.shape[1]), min(width, maps.shape[2])
    canvas[:, :h, :w] = maps[:, :h, :w]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", image_name)
    written = []
    for step, (heat, token) in enumerate(zip(canvas.numpy(), tokens)):
        heat = heat / heat.max() if heat.max() > 0 else heat
        gray = 0.35 * image
        rgb = np.stack([np.maximum(gray, heat), gray + 0.3 * image * (1 - heat), gray], axis=-1)
        path = folder / f"{stem}_{step:03d}_{token_file_name(token)}.png"
        Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


def predict_file(model, processor, path: str, num_beams: int, max_new_tokens: int | None, attention_dir: Path | None):
    """Reads one image file -> dict(image, latex, score, ms). Raises ValueError / OSError for unreadable input."""
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"not an image file ({type(err).__name__}: {err})") from None

    start = time.perf_counter()
    inputs = processor(images=image)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            output_attentions=attention_dir is not None,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0]
    latex = processor.decode(ids)
    ms = (time.perf_counter() - start) * 1000.0
    result = {"image": path, "latex": latex, "score": float(out.sequences_scores[0]), "ms": round(ms, 1)}
    if attention_dir is not None and out.attentions is not None:
        maps = out.attentions[0]
        tokens = processor.tokenizer.convert_ids_to_tokens(ids[: maps.shape[0]].tolist())
        save_attention_maps(
            attention_dir, Path(path).stem, inputs["pixel_values"][0], maps, tokens, model.config.encoder_stride
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_hmer.predict",
        description="Read handwritten math expressions from images and print LaTeX.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument(
        "--model",
        default=None,
        help=f"a folder saved by save_pretrained, or a Hub repository id (default: {DEFAULT_MODEL_DIR})",
    )
    parser.add_argument("--num_beams", type=int, default=None, help="beam size (default: the model's generation config)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="most tokens per expression")
    parser.add_argument("--json", action="store_true", help="print a JSON list with latex, score and ms per image")
    parser.add_argument("--attention_dir", type=Path, default=None, help="write one attention heat map per token here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_beams is not None and args.num_beams < 1:
        print("error: --num_beams must be >= 1", file=sys.stderr)
        return 2
    try:
        model_id = resolve_model(args.model)
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model, processor = load(model_id)
    except PredictError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results, failed = [], 0
    for path in args.images:
        try:
            result = predict_file(model, processor, path, args.num_beams, args.max_new_tokens, args.attention_dir)
        except (ValueError, OSError) as err:
            failed += 1
            print(f"error: {path}: {err}", file=sys.stderr)
            results.append({"image": path, "error": str(err)})
            continue
        results.append(result)
        if not args.json:
            print(f"{path}\t{result['latex']}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
