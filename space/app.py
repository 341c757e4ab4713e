"""Gradio Space: draw or upload a handwritten math expression and get its LaTeX.

The page shows the LaTeX (with a copy button), the formula rendered by KaTeX (bundled with
gradio's frontend, so it renders with no network), the n best candidates with their share of the
model's confidence, the time taken, and an attention gallery: for every written symbol, the
decoder's attention over the encoder feature map (stride 16), upsampled and laid over the image
the model saw. Pictures that are not a handwritten expression (noise, photos, pages of text) are
refused with a message before decoding (`modeling_hmer.expression_check`).

Run locally from a checkout:

    python space/app.py                      # model from ./checkpoints
    HMER_MODEL=path/to/model python space/app.py
    HMER_MODEL=user/hmer-crohme python space/app.py   # a Hub id, only when you name one

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens. The API endpoint
`/recognize` takes an image file and a beam size and returns (latex, candidates, seconds):

    from gradio_client import Client, handle_file
    latex, candidates, seconds = Client("http://127.0.0.1:7860").predict(
        handle_file("formula.png"), 5, api_name="/recognize")
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
if not (HERE / "modeling_hmer").is_dir() and (HERE.parent / "modeling_hmer").is_dir():
    # `python space/app.py` in a checkout: use the checkout's package even when it is not pip-installed.
    sys.path.insert(0, str(HERE.parent))

import gradio as gr  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("hmer.space")

# The model folder next to app.py (a Space upload) or the repository's shipped checkpoint.
DEFAULT_MODEL_DIRS = (HERE / "checkpoints", HERE.parent / "checkpoints")
EXAMPLES = sorted((HERE / "examples").glob("*.png"))
# What each input says when it holds nothing (each names what to do on that tab / in that call).
EMPTY_DRAWING = ("the sketch pad is empty: draw an expression with the mouse, or load an example below it "
                 "(an example just loaded takes a second to reach the pad: press Recognize again)")
EMPTY_UPLOAD = "no picture yet: upload a picture of a handwritten expression, or pick an example below"
NO_FILE = "no image given: pass an image file, e.g. handle_file('formula.png')"
BLANK_PICTURE = "the picture is blank (one colour, no ink): upload a picture of a handwritten expression"
HINT = "Draw an expression (or upload a picture of one) and press **Recognize**."
DEFAULT_BEAMS = 5
MAX_BEAMS = 10
N_BEST = 5
# Uploads larger than this are refused before decoding (10000x10000 = 100 MP is still accepted).
MAX_PIXELS = 120_000_000
# Larger images are shrunk (cheaply, by an integer factor) before the image processor sees them:
# a formula needs far fewer pixels and the processor rescales to ~22 px per symbol anyway.
WORK_PIXELS = 4_000_000
# Files over MAX_FILE_BYTES are refused by the app with a message; gradio's own limit (a bare "Error" in
# the upload box) sits well above it, for what is not worth receiving at all.
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_FILE_SIZE = "50mb"
# Decoding time per step grows with the feature-map cells and the beams (measured on 2 shared cores:
# ~25 us per cell for greedy; beam 5 x1.4, beam 10 x2.9). Beams are reduced when the longest reading
# the ink allows would take longer than this.
DECODE_SECONDS = 5.0
SECONDS_PER_CELL_STEP = 25e-6
LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}]
# Tokens that only give the others their structure: they have no attention picture of their own.
STRUCTURAL_TOKENS = {"{", "}", "^", "_", "\\limits"}
# Captions for LaTeX commands (others show without the backslash).
SYMBOL_NAMES = {
    "\\frac": "fraction bar", "\\sqrt": "√", "\\sum": "∑", "\\int": "∫", "\\infty": "∞", "\\pi": "π",
    "\\alpha": "α", "\\beta": "β", "\\gamma": "γ", "\\Delta": "Δ", "\\theta": "θ", "\\lambda": "λ",
    "\\mu": "μ", "\\sigma": "σ", "\\phi": "φ", "\\pm": "±", "\\times": "×", "\\div": "÷", "\\cdot": "·",
    "\\leq": "≤", "\\geq": "≥", "\\neq": "≠", "\\rightarrow": "→", "\\in": "∈", "\\forall": "∀",
    "\\exists": "∃", "\\ldots": "…", "\\cdots": "⋯", "\\prime": "′", "\\{": "{", "\\}": "}",
}  # fmt: skip


class ModelNotFoundError(FileNotFoundError):
    """No usable model at the place HMER_MODEL (or the default) points to."""


class UserInputError(ValueError):
    """Bad input from the user; its message is shown as is."""


def resolve_model_path(model_path: str | os.PathLike | None = None) -> str:
    """Return the folder or Hub id to load: `model_path`, else env HMER_MODEL, else <repo>/checkpoints.

    A string that is not an existing path is taken as a Hub id only when it was named
    (argument or HMER_MODEL) and looks like one ("owner/name"); the default never reaches the Hub.
    """
    named = model_path if model_path is not None else os.environ.get("HMER_MODEL") or None
    what_to_do = (
        "Train a model and save it there (see README.md, 'Training'), or set HMER_MODEL to a "
        "folder written by save_pretrained (config.json, model.safetensors, processor files) "
        "or to a Hugging Face Hub model id."
    )
    if named is None:
        path = next((p for p in DEFAULT_MODEL_DIRS if p.is_dir()), DEFAULT_MODEL_DIRS[-1])
    else:
        path = Path(named)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"No HMER model in {path}: it has no config.json. {what_to_do}")
        return str(path)
    if named is not None:
        text = str(named)
        parts = text.split("/")
        if len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not path.exists():
            return text  # a Hub id the user asked for
        raise ModelNotFoundError(f"HMER_MODEL={text!r} is neither a model folder nor a Hub id. {what_to_do}")
    raise ModelNotFoundError(f"No HMER model found: {path} does not exist. {what_to_do}")


# ----------------------------------------------------------------------------------------------
# Input images
# ----------------------------------------------------------------------------------------------


def flatten(image: Image.Image, background: int = 255) -> Image.Image:
    """Any PIL image -> mode "L", transparent parts filled with `background` (white by default)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(under, rgba)
    return image.convert("L")


def shrink(image: Image.Image, max_pixels: int = WORK_PIXELS) -> Image.Image:
    """Reduce by an integer factor until at most `max_pixels` (fast box filter; keeps thin strokes)."""
    factor = 1
    while image.width * image.height > max_pixels * factor * factor:
        factor += 1
    return image.reduce(factor) if factor > 1 else image


def is_blank(image: Image.Image) -> bool:
    """True when the image holds no visible ink: uniform (up to noise) on white and on black.

    Both backgrounds, so that white ink on a transparent background counts as ink.
    """
    def uniform(gray: Image.Image) -> bool:
        low, high = gray.getextrema()
        return high - low < 32

    if image.width == 0 or image.height == 0:
        return True
    return uniform(flatten(image, 255)) and uniform(flatten(image, 0))


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """Open an uploaded file, refusing non-images, damaged and huge images with a message; see `prepare_image`."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise UserInputError(f"the file is {size / 2**20:.1f} MB, more than the {MAX_FILE_BYTES // 2**20} MB this "
                             "demo accepts: save the picture smaller (a formula needs no more than a few "
                             "hundred kB) and upload it again")
    try:
        with warnings.catch_warnings():  # the size is checked here, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError, OSError) as error:
        raise UserInputError("this file is not a picture this demo can read: upload a PNG, JPEG or WebP "
                             "picture of a handwritten expression") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise UserInputError(
            f"the picture is {width}x{height} pixels, more than the {MAX_PIXELS // 1_000_000} "
            "megapixels this demo accepts: scale it down and upload it again"
        )
    try:
        if image.format == "JPEG" and width * height > WORK_PIXELS:  # decode at a reduced scale directly
            scale = (WORK_PIXELS / (width * height)) ** 0.5
            image.draft(image.mode, (int(width * scale) + 1, int(height * scale) + 1))
        image.load()
        image = ImageOps.exif_transpose(image)  # photos taken sideways
    except (Image.DecompressionBombError, SyntaxError, ValueError, OSError) as error:
        raise UserInputError(f"this {image.format or 'image'} file is damaged or cut short, so it cannot be "
                             f"read ({error}): save or export the picture again and upload the new "
                             "file") from None
    return prepare_image(image, empty_message=BLANK_PICTURE)


def prepare_image(image: Image.Image | np.ndarray | None, on_white: bool = False,
                  empty_message: str = EMPTY_DRAWING) -> Image.Image:
    """PIL or numpy image -> PIL image of workable size; blank or missing -> UserInputError(empty_message).

    Uploads keep their mode (the image processor reads either polarity and transparency); the
    sketch pad's drawing is flattened on white (`on_white`), as the canvas shows it.
    """
    if image is None:
        raise UserInputError(empty_message)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = shrink(image)
    if is_blank(image):
        raise UserInputError(empty_message)
    return flatten(image) if on_white else image


def sketch_to_image(sketch) -> Image.Image | None:
    """The sketch pad's value ({"background", "layers", "composite"}) -> its composite image, if any."""
    if sketch is None:
        return None
    if isinstance(sketch, dict):
        composite = sketch.get("composite")
        if composite is None:
            layers = [layer for layer in (sketch.get("background"), *(sketch.get("layers") or [])) if layer is not None]
            composite = layers[0] if layers else None
        return composite
    return sketch


# ----------------------------------------------------------------------------------------------
# The model: Recognizer.recognize is the one way this app reads an image
# ----------------------------------------------------------------------------------------------


@dataclass
class Recognition:
    """What one recognition returns.

    latex: the best candidate, space-separated canonical LaTeX tokens.
    tokens: its tokens (no special tokens); attention_maps: (len(tokens), H, W) float in [0, 1]
        over `model_input`, the processed image (H, W) uint8, black ink on white.
    candidates: n best (latex, share), best first; share: the candidate's part of the model's
        confidence in all n (length-normalised sequence probabilities, summing to 1).
    """

    latex: str
    tokens: list[str]
    candidates: list[tuple[str, float]]
    model_input: np.ndarray
    attention_maps: np.ndarray | None
    seconds: float
    extras: dict = field(default_factory=dict)


def affordable_beams(num_beams: int, max_new_tokens: int, cells: int, budget: float = DECODE_SECONDS) -> int:
    """The largest beam size <= num_beams whose longest decoding (max_new_tokens steps over `cells`
    feature cells) stays within `budget` seconds by the measured per-step cost."""
    def seconds(beams: int) -> float:
        return max_new_tokens * cells * SECONDS_PER_CELL_STEP * (1 + 0.2 * (beams - 1))

    while num_beams > 1 and seconds(num_beams) > budget:
        num_beams -= 1
    return num_beams


def candidate_shares(scores: list[float], length: int) -> list[float]:
    """Length-normalised log-prob scores (the model's ranking) -> shares summing to 1, same order.

    exp(length * score) is the sequence probability of a candidate of the best one's length, so
    for candidates of equal length the shares are their probabilities' shares exactly.
    """
    logits = np.asarray(scores, dtype=np.float64) * max(length, 1)
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()).tolist()


class Recognizer:
    """Model + processor, loaded once; `recognize(image)` -> Recognition."""

    def __init__(self, model_path: str, device: str | None = None):
        self.model_path = model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            from modeling_hmer import HMERForConditionalGeneration, HMERProcessor

            self.processor = HMERProcessor.from_pretrained(model_path)
            model = HMERForConditionalGeneration.from_pretrained(model_path)
        except ImportError:
            # No package here (e.g. a Space holding only app.py and the model): saved models carry
            # their code and an auto_map, so the Auto classes can load them.
            from transformers import AutoModelForImageTextToText, AutoProcessor

            logger.info("modeling_hmer is not installed: loading %s with trust_remote_code", model_path)
            self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
            model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True)
        self.model = model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.special_ids = set(self.tokenizer.all_special_ids)
        # Pixels per feature-map cell: 16 for densenet-b, 32 for densenet121.
        self.stride = int(getattr(self.model.config, "encoder_stride", 16))
        self.max_new_tokens = int(self.model.generation_config.max_new_tokens or 200)
        # Models saved before the expression check carry a processor without it: they read everything.
        self.checks = hasattr(self.processor, "check_image")
        # Overrides of the processor's ExpressionLimits for the confidence check (none by default).
        self.answer_limits: dict = {}
        if not self.checks:
            logger.warning("the model's processor cannot tell handwriting from other pictures: no refusals")

    def warmup(self) -> float:
        """Run greedy and beam search once on a synthetic drawing; returns seconds taken."""
        start = time.perf_counter()
        image = synthetic_drawing()
        self.recognize(image, num_beams=1)
        self.recognize(image, num_beams=DEFAULT_BEAMS)
        return time.perf_counter() - start

    def _inputs(self, image: Image.Image):
        """image -> (model inputs, max new tokens, feature cells); bad pictures -> UserInputError."""
        try:
            if self.checks:
                inputs, stats = self.processor.check_image(image)
                return inputs, self.processor.max_new_tokens_for(stats, self.max_new_tokens), stats["cells"]
            inputs = self.processor(images=image, return_tensors="pt")
        except ValueError as error:  # BlankImageError, NotAnExpressionError: messages for the user
            raise UserInputError(str(error)) from None
        height, width = inputs["pixel_values"].shape[-2:]
        return inputs, self.max_new_tokens, math.ceil(height / 16) * math.ceil(width / 16)

    @torch.inference_mode()
    def recognize(self, image: Image.Image, num_beams: int = DEFAULT_BEAMS, n_best: int = N_BEST,
                  attention: bool = True) -> Recognition:
        start = time.perf_counter()
        inputs, max_new_tokens, cells = self._inputs(image)
        asked = max(1, min(int(num_beams), MAX_BEAMS))
        num_beams = affordable_beams(asked, max_new_tokens, cells)
        n_best = max(1, min(n_best, num_beams))
        pixel_values = inputs["pixel_values"].to(self.device)
        pixel_mask = inputs.get("pixel_mask")
        pixel_mask = pixel_mask.to(self.device) if pixel_mask is not None else None
        output = self.model.generate(
            pixel_values=pixel_values,
            pixel_mask=pixel_mask,
            num_beams=num_beams,
            num_return_sequences=n_best,
            max_new_tokens=max_new_tokens,
            output_attentions=attention,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if self.checks:
            try:
                self.processor.check_answer(output, **self.answer_limits)
            except ValueError as error:  # NotAnExpressionError: the model cannot read it
                raise UserInputError(str(error)) from None
        sequences = output.sequences
        latexes = [self.tokenizer.decode(self._content_ids(row), skip_special_tokens=True) for row in sequences]
        best_ids = self._content_ids(sequences[0])
        # The model's ranking score (log-prob per token) -> a share of its confidence in the n best.
        shares = candidate_shares(output.sequences_scores.tolist(), len(best_ids) + 1)
        candidates = []
        for latex, share in zip(latexes, shares):
            if any(latex == seen for seen, _ in candidates):
                continue
            candidates.append((latex, share))
        total = sum(share for _, share in candidates)
        candidates = [(latex, share / total) for latex, share in candidates]

        tokens = self.tokenizer.convert_ids_to_tokens(best_ids)
        model_input = self._model_input(pixel_values[0], None if pixel_mask is None else pixel_mask[0])
        maps = None
        if attention and getattr(output, "attentions", None) is not None:
            maps = self._attention_maps(output.attentions[0], sequences[0], len(tokens), model_input.shape)
        return Recognition(
            latex=candidates[0][0] if candidates else "",
            tokens=list(tokens),
            candidates=candidates,
            model_input=model_input,
            attention_maps=maps,
            seconds=time.perf_counter() - start,
            extras={"num_beams": num_beams, "asked_beams": asked, "max_new_tokens": max_new_tokens},
        )

    # -- helpers ------------------------------------------------------------------------------

    def _generated(self, sequence: torch.Tensor) -> list[int]:
        """Ids after the decoder start token (when the sequence begins with it), up to eos."""
        ids = sequence.tolist()
        start = self.model.config.decoder_start_token_id
        if ids and ids[0] == start:
            ids = ids[1:]
        eos = self.model.config.eos_token_id
        return ids[: ids.index(eos)] if eos in ids else ids

    def _content_ids(self, sequence: torch.Tensor) -> list[int]:
        return [i for i in self._generated(sequence) if i not in self.special_ids]

    @staticmethod
    def _model_input(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> np.ndarray:
        """(1, H, W) ink=1 on 0 -> (h, w) uint8 black ink on white, cropped to the valid (unpadded) part."""
        ink = pixel_values[0].float().clamp(0, 1).cpu().numpy()
        if pixel_mask is not None:
            mask = pixel_mask.bool().cpu().numpy()
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if rows.size and cols.size:
                ink = ink[: rows[-1] + 1, : cols[-1] + 1]
        return (255 - ink * 255).round().astype(np.uint8)

    def _attention_maps(self, attention, sequence: torch.Tensor, n_tokens: int, shape: tuple[int, int]):
        """(L, h, w) attention over the encoder features -> (n_tokens, H, W) in [0, 1] over the image.

        Row i of `attention` belongs to the i-th generated token; special tokens are dropped so
        that map k matches tokens[k].
        """
        attention = torch.as_tensor(attention).float().cpu()
        if attention.dim() == 4:  # (L, heads, h, w): average the heads
            attention = attention.mean(1)
        generated = self._generated(sequence)
        keep = [k for k, i in enumerate(generated) if i not in self.special_ids and k < attention.shape[0]]
        keep = keep[:n_tokens]
        if not keep:
            return None
        maps = attention[keep]  # (n, h, w)
        h, w = maps.shape[-2:]
        up = torch.nn.functional.interpolate(maps[:, None], size=(h * self.stride, w * self.stride),
                                             mode="bilinear", align_corners=False)[:, 0]
        up = up[:, : shape[0], : shape[1]]
        if up.shape[1] < shape[0] or up.shape[2] < shape[1]:  # feature map smaller than the image
            up = torch.nn.functional.interpolate(up[:, None], size=shape, mode="bilinear",
                                                 align_corners=False)[:, 0]
        peak = up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (up / peak).clamp(0, 1).numpy()


# ----------------------------------------------------------------------------------------------
# What the page shows
# ----------------------------------------------------------------------------------------------

# \limits is only allowed after these.
OPERATORS = {"\\sum", "\\int", "\\lim", "\\log", "\\sin", "\\cos", "\\tan"}


def typesettable(latex: str) -> str:
    """Space-separated LaTeX tokens -> LaTeX that KaTeX can typeset, for display only.

    A reading can leave braces open or close one too many, leave `^`, `_`, `\\frac` or `\\sqrt`
    without their groups, give a base two superscripts, or put `\\limits` after a symbol. The
    tokens are parsed as groups, fractions, roots and scripts; what is missing is added as `{ }`,
    an unmatched `}` or a stray `\\limits` is dropped, a second `^` (`_`) of one base goes on an
    empty base, and every argument is braced. Well-formed LaTeX renders the same as before.
    """
    tokens = latex.split()
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def argument(closers) -> str:
        """One braced argument: the next atom, or `{ }` when the next token cannot start one."""
        if peek() is None or peek() in ("}", "^", "_", "'", "\\limits") or peek() in closers:
            return "{ }"
        return atom(closers) if peek() == "{" else "{ " + atom(closers) + " }"

    def atom(closers) -> str:
        token = take()
        if token == "{":
            inner = sequence({"}"})
            if peek() == "}":
                take()
            return "{ " + inner + " }"
        if token == "\\frac":
            return f"\\frac {argument(closers)} {argument(closers)}"
        if token == "\\sqrt":
            index = ""
            if peek() == "[":
                take()
                inner = sequence({"]", "}"})
                # brackets inside the index would end it early: brace them
                index = "[ " + ("{ " + inner + " }" if "[" in inner or "]" in inner else inner) + " ]"
                if peek() == "]":
                    take()
            return f"\\sqrt {index} {argument(closers)}".replace("  ", " ")
        return "\\vert" if token == "|" else token

    def sequence(closers) -> str:
        """Items up to one of `closers` (not taken) or the end."""
        parts: list[str] = []
        scripts: set[str] = set()  # scripts the current base already has
        while peek() is not None and peek() not in closers:
            token = peek()
            if token == "}":  # unmatched here
                take()
                continue
            if token == "\\limits":
                take()
                if parts and parts[-1] in OPERATORS and not scripts:
                    parts.append(token)
                continue
            if token in ("^", "_", "'"):
                take()
                # a prime is a superscript: primes join only primes, and nothing joins "x'^2"
                taken = scripts not in (set(), {"'", "^"}) if token == "'" else token in scripts
                if not parts or taken:
                    parts.append("{ }")
                    scripts = set()
                if token == "'":  # written next to their base: KaTeX joins adjacent primes only
                    parts[-1] += "'"
                    scripts.update({"'", "^"})
                else:
                    scripts.add(token)
                    parts.append(f"{token} {argument(closers)}")
                continue
            parts.append(atom(closers))
            scripts = set()
        return " ".join(parts)

    parts = []
    while peek() is not None:
        parts.append(sequence(set()))
        if peek() is not None:  # a closer that closes nothing at the top level
            take()
    return " ".join(part for part in parts if part)


def candidates_table(candidates: list[tuple[str, float]]) -> str:
    """n best (latex, share) -> a Markdown table: rank, formula (KaTeX), share, LaTeX."""
    rows = [
        "**Best candidates**: *share* is how the model divides its confidence among these readings "
        "(length-normalised sequence probabilities, summing to 100%).",
        "",
        "| # | formula | share | LaTeX |",
        "|---:|:---:|---:|:---|",
    ]
    for rank, (latex, share) in enumerate(sorted(candidates, key=lambda c: -c[1]), 1):
        # "|" ends a table cell: \vert for KaTeX (typesettable), an escaped pipe for the code.
        formula = f"$\\displaystyle {typesettable(latex)}$" if latex else "(nothing)"
        escaped = latex.replace("|", "\\|")
        code = f"`{escaped}`" if latex else ""
        shown = f"{share:.0%}" if share >= 0.005 else "<1%"
        rows.append(f"| {rank} | {formula} | {shown} | {code} |")
    return "\n".join(rows)


def symbol_pictures(tokens: list[str], maps: np.ndarray | None) -> list[tuple[int, str]]:
    """(index into tokens, caption) for the tokens that are written symbols: structural tokens
    ({ } ^ _ \\limits) have no picture of their own (their attention repeats their symbol's)."""
    if maps is None:
        return []
    return [(k, SYMBOL_NAMES.get(token, token.lstrip("\\") if token.startswith("\\") else token))
            for k, token in enumerate(tokens[: len(maps)]) if token not in STRUCTURAL_TOKENS]


def preview_of(image: Image.Image) -> Image.Image:
    """An upload as RGB for its preview: on white, or on black when its ink is white on transparency."""
    view = flatten(image, 255)
    low, high = view.getextrema()
    return (view if high - low >= 32 else flatten(image, 0)).convert("RGB")


def synthetic_drawing() -> Image.Image:
    """A small drawing ("x + 1" like strokes) used to warm the model up."""
    image = Image.new("L", (400, 150), 255)
    draw = ImageDraw.Draw(image)
    draw.line([(40, 40), (100, 110)], fill=0, width=5)
    draw.line([(40, 110), (100, 40)], fill=0, width=5)
    draw.line([(150, 75), (210, 75)], fill=0, width=5)
    draw.line([(180, 45), (180, 105)], fill=0, width=5)
    draw.line([(260, 55), (280, 40), (280, 110)], fill=0, width=5)
    return image


def attention_overlay(model_input: np.ndarray, attention: np.ndarray, scale: int = 2) -> Image.Image:
    """Lay one attention map (H, W in [0, 1]) over the model input (H, W uint8) as a red-yellow heat map."""
    base = np.repeat(model_input[..., None].astype(np.float32) / 255.0, 3, axis=2)
    base = 0.35 + 0.65 * base  # dim the page a little so the heat shows
    heat = np.stack([np.ones_like(attention), np.clip(attention * 1.6 - 0.4, 0, 1), np.zeros_like(attention)], -1)
    alpha = (0.75 * np.clip(attention, 0, 1) ** 0.8)[..., None]
    mixed = (1 - alpha) * base + alpha * heat
    image = Image.fromarray((mixed * 255).round().astype(np.uint8), "RGB")
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

INTRO = """# ✍️ Handwritten math → LaTeX
Draw a formula with the mouse (or upload a picture of one) and press **Recognize**.
Below the result, the attention gallery shows where the model looked for each symbol it wrote."""


CSS = """
/* the ink colour is fixed (black, as the model's training renders are read): no colour picker */
#sketchpad button[aria-label="Color"] { display: none; }
#rendered .katex-display { font-size: 1.6em; margin: 0.4em 0; }
#candidates table { width: 100%; table-layout: auto; }
#candidates th, #candidates td:nth-child(1), #candidates td:nth-child(3) { white-space: nowrap; }
#candidates td:nth-child(2) { min-width: 12em; }
#candidates .katex { font-size: 1.15em; }
"""

SELECT_BRUSH_JS = """() => {
  const pick = (tries) => {
    const brush = document.querySelector('#sketchpad button[aria-label="Brush"]');
    if (brush) { brush.click(); } else if (tries > 0) { setTimeout(() => pick(tries - 1), 200); }
  };
  pick(25);
}"""


def build_demo(model_path: str | os.PathLike | None = None, *, recognizer: Recognizer | None = None,
               warmup: bool = True) -> gr.Blocks:
    """Load the model once (from `model_path`, env HMER_MODEL or <repo>/checkpoints) and build the page.

    Raises ModelNotFoundError with what to do when there is no model.
    The returned Blocks has `.recognizer` and is queued; launch it with `launch_kwargs()`.
    """
    if recognizer is None:
        recognizer = Recognizer(resolve_model_path(model_path))
    if warmup:
        logger.info("warm-up took %.2f s", recognizer.warmup())

    def show(read_image, num_beams):
        """Read one tab's input (`read_image()` -> PIL image) -> updates of the result widgets."""
        try:
            result = recognizer.recognize(read_image(), num_beams=int(num_beams or DEFAULT_BEAMS))
        except UserInputError as error:
            gr.Warning(str(error))
            return (gr.update(visible=False), "", "", "", [], f"⚠️ {error}")
        gallery = [
            (attention_overlay(result.model_input, result.attention_maps[k]), caption)
            for k, caption in symbol_pictures(result.tokens, result.attention_maps)
        ]
        rendered = f"$$ {typesettable(result.latex)} $$" if result.latex else "*(no symbols recognized)*"
        beams = result.extras["num_beams"]
        note = "" if beams == result.extras["asked_beams"] else " (a large picture: fewer beams, to answer quickly)"
        status = (f"recognized in {result.seconds * 1000:.0f} ms · beam {beams}{note} · "
                  f"{len(gallery)} symbols, {len(result.tokens)} tokens")
        return (gr.update(visible=True), result.latex, rendered, candidates_table(result.candidates), gallery,
                status)

    def recognize_drawing(sketch, num_beams):
        return show(lambda: prepare_image(sketch_to_image(sketch), on_white=True), num_beams)

    def recognize_upload(path, num_beams):
        def read():
            if path is None:
                raise UserInputError(EMPTY_UPLOAD)
            return open_image_file(path)

        return show(read, num_beams)

    def preview_upload(path):
        """On upload: show the picture as it will be read, or say at once what is wrong with the file."""
        if path is None:
            return gr.update(value=None, visible=False), HINT
        try:
            image = open_image_file(path)
        except UserInputError as error:
            gr.Warning(str(error))
            return gr.update(value=None, visible=False), f"⚠️ {error}"
        return gr.update(value=preview_of(image), visible=True), HINT

    def recognize_api(image_file, num_beams=DEFAULT_BEAMS):
        """Image file -> (latex, [{"latex", "share"}, ...] best first, seconds)."""
        try:
            if image_file is None:
                raise UserInputError(NO_FILE)
            path = image_file if isinstance(image_file, (str, os.PathLike)) else image_file.name
            result = recognizer.recognize(open_image_file(path), num_beams=int(num_beams or DEFAULT_BEAMS),
                                          attention=False)
        except UserInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        candidates = [{"latex": latex, "share": round(share, 4)} for latex, share in result.candidates]
        return result.latex, candidates, round(result.seconds, 4)

    examples = [[str(path)] for path in EXAMPLES]
    with gr.Blocks(title="HMER: handwritten math to LaTeX") as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Draw", id="draw"):
                sketch = gr.Sketchpad(
                    label="Sketch pad: draw with the mouse; undo, redo and clear are above the canvas",
                    type="pil",
                    image_mode="RGBA",
                    format="png",
                    canvas_size=(800, 300),
                    height=400,
                    brush=gr.Brush(default_size=6, colors=["#000000"], default_color="#000000",
                                   color_mode="fixed"),
                    eraser=gr.Eraser(default_size=24),
                    layers=False,
                    transforms=(),
                    sources=(),
                    elem_id="sketchpad",
                )
                draw_button = gr.Button("Recognize", variant="primary", size="lg", elem_id="recognize")
                if examples:
                    # The full editor value, composite included: with a bare path the editor shows the
                    # picture but sends an empty value until it is drawn on.
                    drawn = [[{"background": path, "layers": [], "composite": path}] for [path] in examples]
                    gr.Examples(drawn, inputs=[sketch], label="Examples (drawn on this sketch pad): load "
                                "one, then press Recognize", elem_id="draw-examples")
            with gr.Tab("Upload", id="upload"):
                # gr.File, not gr.Image: the file reaches the app undecoded, so a broken, truncated or
                # huge upload is refused by open_image_file with a message (gr.Image would fail in its
                # own preprocessing with a bare "Error").
                upload = gr.File(label="Picture of a formula (PNG, JPEG or WebP, up to 10 MB)",
                                 file_types=["image"], type="filepath", height=120, elem_id="upload")
                preview = gr.Image(label="The picture that will be read", type="pil", interactive=False,
                                   visible=False, height=240, buttons=[], elem_id="preview")
                upload_button = gr.Button("Recognize", variant="primary", size="lg", elem_id="recognize-upload")
                if examples:
                    gr.Examples(examples, inputs=[upload], label="Examples: pick one, then press Recognize",
                                elem_id="upload-examples")
        beams = gr.Slider(1, MAX_BEAMS, value=DEFAULT_BEAMS, step=1, label="Beam size",
                          info="candidates the search keeps at each step; 1 = greedy (fastest)")
        status = gr.Markdown(HINT, elem_id="status")
        with gr.Column(visible=False) as result_panel:
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    latex_box = gr.Textbox(label="LaTeX", buttons=["copy"], interactive=False, elem_id="latex")
                    rendered = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, elem_id="rendered", min_height=50,
                                           container=True, padding=True)
                with gr.Column(scale=3):
                    candidates = gr.Markdown(latex_delimiters=[{"left": "$", "right": "$", "display": False}],
                                             container=True, padding=True, elem_id="candidates")
            # JPEG: a tenth of the encoding time of WebP/PNG for a dozen small heat maps.
            gallery = gr.Gallery(label="Where the model looked for each symbol it wrote", columns=6,
                                 height="auto", object_fit="contain", format="jpeg", elem_id="attention")

        outputs = [result_panel, latex_box, rendered, candidates, gallery, status]
        draw_button.click(recognize_drawing, [sketch, beams], outputs, api_visibility="private")
        upload_button.click(recognize_upload, [upload, beams], outputs, api_visibility="private")
        upload.change(preview_upload, upload, [preview, status], queue=False, api_visibility="private")

        # The API: an image file in, named outputs out (hidden components, so it needs no sketch dict).
        api_file = gr.File(visible=False, file_types=["image"], label="image")
        api_beams = gr.Number(DEFAULT_BEAMS, visible=False, precision=0, label="num_beams")
        api_latex = gr.Textbox(visible=False, label="latex")
        api_candidates = gr.JSON(visible=False, label="candidates")
        api_seconds = gr.Number(visible=False, label="seconds")
        api_button = gr.Button(visible=False)
        api_button.click(recognize_api, [api_file, api_beams], [api_latex, api_candidates, api_seconds],
                         api_name="recognize")

        # The editor starts (and restarts after Clear) with no tool selected: pick the brush, so that
        # one can draw straight away.
        demo.load(None, None, None, js=SELECT_BRUSH_JS)
        sketch.clear(None, None, None, js=SELECT_BRUSH_JS, queue=False, api_visibility="private")

    # Requests wait in the queue (at most 64); HMER_CONCURRENCY of them are recognized at a time.
    demo.queue(default_concurrency_limit=int(os.environ.get("HMER_CONCURRENCY", "2")), max_size=64)
    demo.recognizer = recognizer
    return demo


def launch_kwargs() -> dict:
    """Keyword arguments for demo.launch shared by __main__ and the tests."""
    return {"max_file_size": MAX_FILE_SIZE, "show_error": False, "css": CSS}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    # One torch thread per recognition: decoding is a chain of small steps that gain little from
    # intra-op threads and lose a lot when cores are shared; HMER_CONCURRENCY requests use the cores.
    torch.set_num_threads(int(os.environ.get("HMER_THREADS", "1")))
    try:
        demo = build_demo()
    except ModelNotFoundError as error:
        sys.exit(f"error: {error}")
    # server_name / server_port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
    demo.launch(**launch_kwargs())


if __name__ == "__main__":
    main()
