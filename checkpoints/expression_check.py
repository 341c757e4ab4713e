"""Is a picture a handwritten expression? Refuse what is not, and bound how long decoding may run.

A model trained on handwriting reads anything as a formula: an 800x600 noise picture comes back
as 200 tokens of `\\sum _ { i = 1 } ...` after seconds of decoding. Two checks stop that, both
calibrated on real handwriting (the CROHME renders, the shipped model) with a wide margin, so that
no CROHME test expression is refused (see `CALIBRATION`):

1. before decoding, from the image's ink (`ink_statistics`, `check_ink`; a few ms): photos and
   shaded pictures have mostly mid-tones where pen strokes have solid ink with thin antialiased
   edges; noise and pages of text, brought to the model's symbol size, leave specks instead of
   symbols, or hundreds of separate pieces, or blots instead of strokes;
2. after decoding, from the model's own confidence (`check_answer`): an answer that did not end
   within the length the ink can hold (`max_new_tokens_for`), or whose tokens are on average
   very unlikely, is not a reading.

`max_new_tokens_for` bounds the output length by the pieces of ink the model input holds (each
written symbol is one to three pieces and takes at most a few tokens with its braces), so a
request decodes for a bounded time whatever was uploaded.

    >>> model_image = processor.image_processor.to_model_image(image)
    >>> stats = ink_statistics(processor.image_processor.ink_map(image), model_image)
    >>> check_ink(stats)                        # raises NotAnExpressionError
    >>> out = model.generate(..., max_new_tokens=max_new_tokens_for(stats), output_scores=True)
    >>> check_answer(token_log_probs, finished)  # raises NotAnExpressionError

`HMERProcessor.check_image` and `HMERProcessor.check_answer` wrap these for one image, and the
image-to-latex pipeline applies them to every image it reads (`check_expression=False` turns them off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .image_processing_hmer import InvalidImageError, connected_components, stroke_width, symbol_size


__all__ = [
    "NotAnExpressionError",
    "ExpressionLimits",
    "ink_statistics",
    "check_ink",
    "max_new_tokens_for",
    "check_answer",
]

NOT_AN_EXPRESSION = "this does not look like a handwritten expression"


class NotAnExpressionError(InvalidImageError):
    """The picture (or the model's reading of it) is not a handwritten expression; the message says why
    and what to do, `statistics` holds what was measured.

    A kind of `InvalidImageError`: a caller that catches that type to report unreadable inputs reports these
    too; one that needs to tell them apart catches this type first.
    """

    def __init__(self, message: str, statistics: dict | None = None):
        super().__init__(message)
        self.statistics = dict(statistics or {})


@dataclass(frozen=True)
class ExpressionLimits:
    """Where the checks draw the line. Defaults: far outside what the CROHME test sets reach (`CALIBRATION`).

    Args:
        min_image_size: the longer side of the input, in px (a formula needs room for its symbols).
        max_shaded: mid-tone pixels (ink strength 0.1-0.5) per solid ink pixel (>= 0.5) in the input.
        min_symbol_size: mean size in px of the pieces of ink in the model input (the processor aims
            at 25 px; specks of noise or the letters of a page squeezed into the size cap are smaller).
        max_stroke_width: stroke width in px in the model input (the processor aims at 3.2 px; blots
            and filled areas cannot be thinned to that).
        max_pieces: separate pieces of ink in the model input.
        tokens_per_piece, extra_tokens: output length bound, `tokens_per_piece * pieces + extra_tokens`.
        min_mean_log_prob: the answer's mean token log-probability (eos included) must reach this.
    """

    min_image_size: int = 16
    max_shaded: float = 1.0
    min_symbol_size: float = 10.0
    max_stroke_width: float = 6.0
    max_pieces: int = 250
    tokens_per_piece: float = 4.0
    extra_tokens: int = 32
    min_mean_log_prob: float = -1.5


DEFAULT_LIMITS = ExpressionLimits()

# What the shipped model and processor measure on CROHME handwriting (`python space/measure_refusal.py`,
# beam 5): (min, median, max) over 2014 test (986), 2016 test (1,147) and the training set's 500
# held-out expressions. None of the 2,633 is refused.
CALIBRATION = """\
shaded        0.12 / 0.21 / 0.30     (limit 1.0; noise 2.7, photos 2.7-10)
symbol size   17.1 / 24.8 / 52.7 px  (limit 10; noise 0, photo 2.8, page of text 0.8)
stroke width  2.60 / 3.25 / 4.00 px  (limit 6.0)
pieces        1 / 9 / 97             (limit 250; noise 389, page of text 2,726)
mean token log-prob -0.60 / -0.09 / 0.0 (limit -1.5; noise, photos, pages: -0.2 to -0.5, so this
              only refuses a model unsure of everything; unfinished answers are the real signal)
tokens <= 4 * pieces + 32 for all but one (59 tokens in 8 pieces: still read within the bound)"""


def ink_statistics(ink_map: np.ndarray, model_image: np.ndarray) -> dict[str, float]:
    """What the checks look at, for one image.

    Args:
        ink_map: (H, W) float ink strength in [0, 1] at input resolution (`HMERImageProcessor.ink_map`).
        model_image: (h, w) float, the processed image (`HMERImageProcessor.to_model_image`), ink 1.0 on 0.0.

    Returns:
        "input_size" (height, width of the input), "shaded" (mid-tones per solid ink pixel, in the input), and in the model input: "pieces"
        (8-connected pieces of ink), "symbol_size" and "stroke_width" (px), "cells" (feature-map cells
        at stride 16).
    """
    step = max(1, int(math.sqrt(ink_map.size / 1_000_000)))  # a subsample is as good and faster
    sample = ink_map[::step, ::step]
    solid = int(np.count_nonzero(sample >= 0.5))
    mid = int(np.count_nonzero((sample > 0.1) & (sample < 0.5)))
    binary = model_image >= 0.5
    width = stroke_width(model_image, binary)
    pieces = int(connected_components(binary)["area"].size)
    height, length = model_image.shape
    return {
        "input_size": tuple(int(n) for n in ink_map.shape),
        "shaded": mid / max(solid, 1),
        "pieces": pieces,
        "symbol_size": symbol_size(binary, width),
        "stroke_width": width,
        "cells": math.ceil(height / 16) * math.ceil(length / 16),
    }


def check_ink(stats: dict[str, float], limits: ExpressionLimits = DEFAULT_LIMITS) -> None:
    """Raises NotAnExpressionError when `ink_statistics` say the picture is not handwriting."""
    if max(stats["input_size"]) < limits.min_image_size:
        height, width = stats["input_size"]
        raise NotAnExpressionError(
            f"the picture is only {width}x{height} pixels, too small to hold a handwritten expression: "
            f"upload one at least {limits.min_image_size * 4} pixels wide",
            stats,
        )
    if stats["shaded"] > limits.max_shaded:
        why = "it is shaded like a photo, where pen strokes are solid lines on a plain background"
    elif stats["pieces"] > limits.max_pieces:
        why = f"it has {stats['pieces']} separate marks, more than one expression has (a page of text?)"
    elif stats["symbol_size"] < limits.min_symbol_size:
        why = "its marks are specks or tiny letters rather than the symbols of one expression"
    elif stats["stroke_width"] > limits.max_stroke_width:
        why = "it is made of blots and filled areas rather than pen strokes"
    else:
        return
    raise NotAnExpressionError(
        f"{NOT_AN_EXPRESSION}: {why}. Draw the expression, or upload a picture of one handwritten "
        "formula, dark on a light background (or light on dark), cropped to the formula.",
        stats,
    )


def max_new_tokens_for(stats: dict[str, float], limit: int = 200, limits: ExpressionLimits = DEFAULT_LIMITS) -> int:
    """The most tokens (eos included) a reading of this image can need: bounded by its pieces of ink."""
    return max(1, min(int(limit), int(limits.tokens_per_piece * stats["pieces"] + limits.extra_tokens)))


def check_answer(
    token_log_probs, finished: bool, limits: ExpressionLimits = DEFAULT_LIMITS
) -> float:
    """Raises NotAnExpressionError when the model's best answer is not a reading; returns its mean log-prob.

    Args:
        token_log_probs: (L,) log-probabilities of the answer's tokens, eos included (`generate(...,
            output_scores=True).scores[i]` up to the sequence's length).
        finished: whether the answer ended with eos within `max_new_tokens`.
    """
    values = np.asarray(token_log_probs, dtype=np.float64)
    mean = float(values.mean()) if values.size else 0.0
    if not finished:
        why = "the model found no end to it"
    elif mean < limits.min_mean_log_prob:
        why = f"the model is unsure of every symbol (mean token probability {math.exp(mean):.0%})"
    else:
        return mean
    raise NotAnExpressionError(
        f"{NOT_AN_EXPRESSION}: {why}. Write one expression with clear, separate symbols and try again.",
        {"mean_log_prob": mean, "finished": finished},
    )
