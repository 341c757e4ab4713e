"""Read handwritten math from image files and print LaTeX: a command line over `HMERImageToLatexPipeline`.

    python -m modeling_hmer.predict IMAGE [IMAGE ...] [--model DIR_OR_HUB_ID] [--num_beams N] [--json]
                                    [--attention_dir DIR] [--max_new_tokens N] [--read_anything]

Prints one line per image, `path<TAB>latex`, or with --json a list of {"image", "latex", "score", "share",
"candidates", "ms"} (see the pipeline for what the numbers mean). An image that cannot be read is reported on
stderr (and as {"image", "error"} in JSON) and the others are still read; the exit code is then 1. So is a
picture that is not a handwritten expression (noise, a photo, a page of text: the pipeline's expression check),
unless --read_anything turns the check off.
--attention_dir writes, per image, one PNG per output token: the token's attention as a heat map over the
processed image (file `<image>_<step>_<token>.png`).

The default model is the shipped checkpoint folder `checkpoints/` of this repository. Nothing is fetched
from the Hugging Face Hub unless --model names a Hub repository id.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
WHAT_TO_DO = ("Train one (see README.md), or pass --model with a folder saved by save_pretrained or a Hugging Face "
              "Hub repository id.")

# File-name-safe names for tokens that are punctuation.
_TOKEN_NAMES = {
    "{": "lbrace", "}": "rbrace", "(": "lparen", ")": "rparen", "[": "lbracket", "]": "rbracket",
    "^": "sup", "_": "sub", "+": "plus", "-": "minus", "=": "eq", "<": "lt", ">": "gt", "/": "slash",
    "|": "bar", ",": "comma", ".": "dot", "!": "excl", "'": "prime", "\\{": "lset", "\\}": "rset",
    "</s>": "eos", "<s>": "bos", "<pad>": "pad", "<unk>": "unk",
}  # fmt: skip


def token_file_name(token: str) -> str:
    """A LaTeX token as a safe file-name part: `\\frac` -> `frac`, `{` -> `lbrace`, `x` -> `x`."""
    if token in _TOKEN_NAMES:
        return _TOKEN_NAMES[token]
    name = re.sub(r"[^A-Za-z0-9]", "", token.lstrip("\\"))
    return name or "u" + "".join(f"{ord(c):04x}" for c in token)


def load_pipeline(model: str | None, num_beams: int | None, max_new_tokens: int | None,
                  check_expression: bool = True):
    """--model -> the pipeline (raises ModelNotFoundError with what to do)."""
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from .pipeline_hmer import ModelNotFoundError, resolve_model
    from .configuration_hmer import PIPELINE_TASK

    model_id = resolve_model(model, [DEFAULT_MODEL_DIR], WHAT_TO_DO)
    hf_logging.disable_progress_bar()  # keep the output to the LaTeX lines
    settings = {key: value for key, value in (("num_beams", num_beams), ("max_new_tokens", max_new_tokens))
                if value is not None}
    try:
        return pipeline(PIPELINE_TASK, model=model_id, check_expression=check_expression, **settings)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the model {model_id!r}: {err}") from None


def save_attention_maps(folder: Path, image_name: str, result: dict) -> list[Path]:
    """One PNG per token of the pipeline's `result` (with `return_attentions`): its attention heat map."""
    from .pipeline_hmer import attention_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", image_name)
    written = []
    for step, (token, attention) in enumerate(zip(result["tokens"], result["attentions"])):
        path = folder / f"{stem}_{step:03d}_{token_file_name(token)}.png"
        attention_heatmap(result["model_input"], attention).save(path)
        written.append(path)
    return written


def predict_file(reader, path: str, attention_dir: Path | None) -> dict:
    """Reads one image file -> dict(image, latex, score, share, candidates, ms). Raises InvalidImageError (its
    kind NotAnExpressionError for a picture that is not handwriting)."""
    start = time.perf_counter()
    result = reader(path, return_attentions=attention_dir is not None)
    ms = (time.perf_counter() - start) * 1000.0
    if attention_dir is not None:
        save_attention_maps(attention_dir, Path(path).stem, result)
    candidates = [{key: c[key] for key in ("latex", "score", "share")} for c in result["candidates"]]
    return {"image": path, "latex": result["latex"], "score": result["score"], "share": result["share"],
            "candidates": candidates, "ms": round(ms, 1)}


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
    parser.add_argument("--read_anything", action="store_true",
                        help="read every picture, even one that does not look like a handwritten expression")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .pipeline_hmer import InvalidImageError, ModelNotFoundError

    args = build_parser().parse_args(argv)
    if args.num_beams is not None and args.num_beams < 1:
        print("error: --num_beams must be >= 1", file=sys.stderr)
        return 2
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        reader = load_pipeline(args.model, args.num_beams, args.max_new_tokens, not args.read_anything)
    except ModelNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results, failed = [], 0
    for path in args.images:
        try:
            result = predict_file(reader, path, args.attention_dir)
        except InvalidImageError as err:
            failed += 1
            message = str(err) if str(err).startswith(path) else f"{path}: {err}"
            print(f"error: {message}", file=sys.stderr)
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
