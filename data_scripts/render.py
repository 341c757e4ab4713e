"""Render on-line handwriting (strokes) into the standard offline CROHME image look.

The offline CROHME images used by WAP, DWAP, BTTR, CoMER and the seed project are 8-bit grayscale,
white ink (255) on black (0), about 3 px antialiased round-capped strokes, a 10 px margin, and each
expression is scaled so that its *mean stroke height* is about 22 px (not to a fixed image height).
`render_strokes` reproduces that look: over the CROHME training set its images have a median size
of about 91 x 273 px (H x W) and a 95th percentile of about 179 x 740 px (the published images:
94 x 256 and 179 x 715).

Rendering is fast enough for on-the-fly use in a training data loader (about 1 ms per expression):
lines are drawn with PIL at 4x resolution and box-filtered down, which antialiases them.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw


__all__ = ["render_strokes", "stroke_size", "as_strokes", "SUPERSAMPLE"]

# Drawing at 4x and box-filtering down gives antialiased edges and quarter-pixel line widths.
SUPERSAMPLE = 4
# A flat stroke (minus sign, fraction bar) has no height; counting a tenth of its width keeps an
# expression made only of flat strokes at a finite scale while barely moving the usual statistics.
FLAT_STROKE_WIDTH_WEIGHT = 0.1

StrokesLike = Sequence[Union[np.ndarray, Sequence[Sequence[float]]]]


def as_strokes(strokes: StrokesLike) -> list[np.ndarray]:
    """Converts strokes to a list of float64 arrays of shape (N, 2) (x, y with y down).

    Accepts arrays or nested lists; extra channels (e.g. time) are dropped and strokes with no
    points are skipped. Raises ValueError when no point is left or a coordinate is not finite.
    """
    out = []
    for i, stroke in enumerate(strokes):
        arr = np.asarray(stroke, dtype=np.float64)
        if arr.size == 0:
            continue
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError(f"stroke {i} must have shape (N, 2) (x, y points), got {arr.shape}")
        arr = arr[:, :2]
        if not np.isfinite(arr).all():
            raise ValueError(f"stroke {i} has non-finite coordinates")
        out.append(arr)
    if not out:
        raise ValueError("nothing to render: the expression has no stroke with points")
    return out


def stroke_size(strokes: StrokesLike) -> float:
    """The size an expression is normalized by: the mean over strokes of each stroke's height.

    Flat strokes count a tenth of their width (see FLAT_STROKE_WIDTH_WEIGHT), dots count 0. When
    every stroke is a dot the largest side of the expression is used; 0.0 for a single point.
    """
    strokes = as_strokes(strokes)
    sizes = []
    for s in strokes:
        extent = s.max(axis=0) - s.min(axis=0)
        sizes.append(max(extent[1], FLAT_STROKE_WIDTH_WEIGHT * extent[0]))
    size = float(np.mean(sizes))
    if size > 0:
        return size
    points = np.concatenate(strokes)
    return float((points.max(axis=0) - points.min(axis=0)).max())


def _fit_scale(extent: np.ndarray, scale: float, pad: float, max_size) -> float:
    """Lowers `scale` so that the image (extent * scale + pad on each axis) fits in max_size."""
    if max_size is None:
        return scale
    if isinstance(max_size, (int, float)):
        max_h = max_w = max_size
    else:
        max_h, max_w = max_size
    for limit, length in ((max_w, extent[0]), (max_h, extent[1])):
        if limit <= pad:
            raise ValueError(f"max_size {max_size} leaves no room inside margins and line width ({pad:.1f} px)")
        if length > 0:
            # floor(limit) - pad, minus a hair so that ceil() below cannot round past the limit
            scale = min(scale, (math.floor(limit) - pad - 1e-6) / length)
    return scale


def render_strokes(
    strokes: StrokesLike,
    *,
    stroke_height: float = 22.0,
    line_width: float = 3.0,
    margin: int = 10,
    max_size: Union[None, int, tuple[int, int]] = None,
) -> np.ndarray:
    """Draws strokes as an antialiased grayscale image, white ink on black.

    Args:
        strokes: list of strokes, each an array or nested list of shape (N, 2): x, y in any unit,
            y pointing down (InkML convention). Extra columns (time) are ignored.
        stroke_height: the mean stroke height in pixels after scaling (see `stroke_size`).
        line_width: pen width in pixels; line ends and joints are round.
        margin: black border in pixels between the ink and each image edge.
        max_size: optional cap on the image size, an int (both sides) or (max_height, max_width);
            a larger expression is scaled down to fit (line width and margin are kept).

    Returns:
        np.ndarray of dtype uint8 and shape (H, W): 0 background, 255 full ink.
        H = ceil(expression height * scale + 2 * margin + line_width), likewise W.
    """
    if stroke_height <= 0 or line_width <= 0 or margin < 0:
        raise ValueError(
            f"need stroke_height > 0, line_width > 0, margin >= 0; got {stroke_height}, {line_width}, {margin}"
        )
    strokes = as_strokes(strokes)
    points = np.concatenate(strokes)
    origin = points.min(axis=0)
    extent = points.max(axis=0) - origin
    size = stroke_size(strokes)
    scale = stroke_height / size if size > 0 else 1.0
    pad = 2 * margin + line_width
    scale = _fit_scale(extent, scale, pad, max_size)

    # The tolerance keeps float noise (220.00000000000003) from adding a pixel column.
    width = max(1, math.ceil(extent[0] * scale + pad - 1e-6))
    height = max(1, math.ceil(extent[1] * scale + pad - 1e-6))
    ss = SUPERSAMPLE
    offset = (margin + line_width / 2) * ss
    pen = max(1, round(line_width * ss))
    radius = pen / 2

    canvas = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        xy = (stroke - origin) * (scale * ss) + offset
        # Consecutive points closer than a supersampled pixel add drawing time but no shape.
        if len(xy) > 2:
            step = np.abs(np.diff(xy, axis=0)).max(axis=1)
            keep = np.concatenate([[True], step >= 1.0])
            keep[-1] = True
            xy = xy[keep]
        flat = xy.ravel().tolist()
        if len(xy) > 1:
            draw.line(flat, fill=255, width=pen)
        # Round caps and joints: a disc at every vertex of the polyline.
        for x, y in zip(flat[0::2], flat[1::2]):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(canvas.reduce(ss))
