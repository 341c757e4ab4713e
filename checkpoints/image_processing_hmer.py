"""Image processor for HMER: any picture of a handwritten expression -> the look of the training renders.

The model is trained on renders of on-line ink (`data_scripts.render.render_strokes`): white ink on
black, about 3 px antialiased strokes, a 10 px margin, scaled so that strokes are about 22 px high.
A drawing from a sketch pad, a scan or a photo differs in polarity, colour, transparency, zoom and
brush width. `HMERImageProcessor` measures those from the image and undoes them:

1. read the image (PIL, numpy or torch; L, RGB, RGBA, ...), shrink huge inputs early (PIL box filter);
2. ink strength = contrast to the background colour (the majority colour, or transparency);
3. crop to the ink;
4. estimate the stroke width (2 * ink area / ink boundary length) and the symbol size (mean height of
   the connected pieces of ink, less the stroke width), scale so the symbol size matches the
   training renders, then thin or thicken the strokes (morphology on a 4x supersampled image) so they
   are about 3 px wide;
5. cap the size, add the margin, pad the batch and give a pixel mask.

The targets are expressed in the units of these estimators, measured on training renders, so a
training render passes through (nearly) unchanged: training and inference see the same look.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


__all__ = [
    "HMERImageProcessor",
    "BlankImageError",
    "DamagedImageError",
    "ImageTooLargeError",
    "InvalidImageError",
    "open_image",
]


class InvalidImageError(ValueError):
    """An input that is not an image HMER can read: not an image file, a missing file, a bad array, no ink.

    Its message says what is wrong and can be shown to a user as is; catch this type, not the message text.
    Its kinds: `BlankImageError`, `DamagedImageError`, `ImageTooLargeError` and, from the expression check,
    `NotAnExpressionError` (a picture that is not handwriting).
    """


class BlankImageError(InvalidImageError):
    """Raised when an image holds no ink (all one colour, too faint to read, or no pixels)."""


class DamagedImageError(InvalidImageError):
    """Raised by `open_image` for an image file whose header reads but whose data does not (cut short, corrupt).

    `format` is the file's format as PIL names it ("PNG", "JPEG", ...), `reason` what PIL said.
    """

    def __init__(self, message: str, format: str | None = None, reason: str = ""):
        super().__init__(message)
        self.format, self.reason = format, reason


class ImageTooLargeError(InvalidImageError):
    """Raised by `open_image` for a file over its `max_bytes` or an image over its `max_pixels` (both checked
    before decoding). `file_bytes` is the file's size when that was the limit hit, `size` (width, height) the
    image's when known."""

    def __init__(self, message: str, size: tuple[int, int] | None = None, file_bytes: int | None = None):
        super().__init__(message)
        self.size, self.file_bytes = size, file_bytes


BLANK_MESSAGE = "The image is blank: draw or upload a handwritten expression"


def _pil_from_array(arr: np.ndarray) -> Image.Image:
    """numpy (H, W), (H, W, C) or (C, H, W) with C in 1..4, any numeric dtype -> PIL image (L/LA/RGB/RGBA)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels first -> channels last
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        raise InvalidImageError(
            f"cannot read an image from an array of shape {tuple(arr.shape)}: expected (H, W), "
            "(H, W, C) or (C, H, W) with 1 to 4 channels"
        )
    if arr.size == 0:
        raise BlankImageError(f"{BLANK_MESSAGE} (the image has no pixels: shape {tuple(arr.shape)})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        floating = np.issubdtype(arr.dtype, np.floating)
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InvalidImageError("the image contains NaN or infinite values")
        if floating and arr.max() <= 1.0 and arr.min() >= 0.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif arr.max() > 255.0:
            arr = arr * (255.0 / arr.max())  # 16-bit and other wide ranges
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.shape[-1] == 2:  # gray + alpha: PIL cannot infer LA from the array shape
        return Image.frombytes("LA", (arr.shape[1], arr.shape[0]), arr.tobytes())
    return Image.fromarray(arr)


def open_image(image: Any, max_pixels: int | None = None, work_pixels: int | None = None,
               max_bytes: int | None = None) -> Image.Image:
    """Any single image -> PIL image: a file path, the bytes of an image file (or a binary file object), a PIL
    image, a numpy array ((H, W), (H, W, C) or (C, H, W)) or a torch tensor.

    Files are decoded only after their size is read: a path or bytes over `max_bytes`, or an image over
    `max_pixels`, raises `ImageTooLargeError`; a JPEG over `work_pixels` is decoded at a reduced scale directly
    (a huge photo decodes fast and small). Photos are turned upright (EXIF orientation).
    Raises `InvalidImageError` with a message for a missing file or anything that is not a readable image
    (`DamagedImageError` for a file cut short or corrupt), and TypeError for an object of another type.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu")
        if image.dtype == torch.bfloat16 or image.dtype == torch.float16:
            image = image.float()
        image = image.numpy()
    if isinstance(image, np.ndarray):
        return _pil_from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        _check_file_size(len(image), max_bytes, "the image data")
        return _decode(io.BytesIO(image), "the image data", max_pixels, work_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise InvalidImageError("file not found" if not os.path.exists(path) else f"{path} is not a file")
        _check_file_size(os.path.getsize(path), max_bytes, path)
        return _decode(path, path, max_pixels, work_pixels)
    if hasattr(image, "read"):
        return _decode(image, getattr(image, "name", "the file"), max_pixels, work_pixels)
    raise TypeError(
        f"unsupported image type {type(image).__name__}: give a file path, image file bytes, a PIL image, a numpy "
        "array or a torch tensor"
    )


def _check_file_size(size: int, max_bytes: int | None, name: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLargeError(
            f"{name}: the file is {size / 2**20:.1f} MB, more than the {max_bytes / 2**20:g} MB accepted here: "
            "save the picture smaller",
            file_bytes=size,
        )


def _decode(source, name: str, max_pixels: int | None, work_pixels: int | None) -> Image.Image:
    """Open (header only), check the size, then decode. Each step's failure has its own error type."""
    with warnings.catch_warnings():  # the size is checked here, before decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except Image.DecompressionBombError as err:  # over twice PIL's own limit: refused before our check
            raise ImageTooLargeError(f"{name}: {err}") from None
        except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError...: not an image file
            raise InvalidImageError(f"{name}: not an image file PIL can read ({type(err).__name__}: {err})") from None
        with im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: the image is {width}x{height} pixels, more than the {max_pixels / 1e6:.0f} megapixels "
                    "accepted here: scale it down",
                    size=(width, height),
                )
            try:
                if work_pixels is not None and im.format == "JPEG" and width * height > work_pixels:
                    scale = (work_pixels / (width * height)) ** 0.5
                    im.draft(im.mode, (int(width * scale) + 1, int(height * scale) + 1))
                im.load()
                return ImageOps.exif_transpose(im)
            except Exception as err:  # the header read, the data did not: truncated or corrupt
                raise DamagedImageError(
                    f"{name}: the {im.format or 'image'} file is damaged or cut short ({type(err).__name__}: {err})",
                    format=im.format,
                    reason=str(err),
                ) from None


def _gray_alpha(image: Image.Image, max_input_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL image -> gray (H, W) float32 in [0, 1] and alpha (H, W) float32 or None.

    Images over `max_input_pixels` are box-filtered down first by an integer factor (fast, in C):
    the drawing keeps far more resolution than the output needs.
    """
    if image.width == 0 or image.height == 0:
        raise BlankImageError(f"{BLANK_MESSAGE} (the image has no pixels: {image.width}x{image.height})")
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _gray_alpha(_pil_from_array(np.asarray(image)), max_input_pixels)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if has_alpha else "RGB")
    pixels = image.width * image.height
    if pixels > max_input_pixels:
        # shrink before the colour conversion: it is the cheaper order for huge images
        factor = math.ceil(math.sqrt(pixels / max_input_pixels))
        image = image.reduce(factor)
    image = image.convert("LA" if has_alpha else "L")
    arr = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
    if has_alpha:
        return arr[..., 0], arr[..., 1]
    return arr, None


def _ink_strength(gray: np.ndarray, alpha: np.ndarray | None, min_contrast: float) -> np.ndarray:
    """Ink map (H, W) float32 in [0, 1], 1 = full ink, from either polarity or transparency.

    Without transparency the background is the majority (median) colour and ink is the contrast to
    it, normalized by the strongest contrast. With transparency, the transparent part is background:
    if the painted part is a sheet of paper (it fills most of its bounding box and holds marks of
    another colour), the transparent part is filled with the paper colour and read as above;
    otherwise everything painted is ink (ink strength = alpha).
    """
    if alpha is not None:
        opaque = alpha >= 0.5
        if opaque.all():
            alpha = None
        elif not opaque.any():
            return _normalized(alpha, min_contrast)
        else:
            painted = gray[opaque]
            paper = float(np.median(painted))
            marked = float(np.mean(np.abs(painted - paper) > 0.25))
            top, bottom, left, right = _bbox(opaque)
            fill = painted.size / ((bottom - top + 1) * (right - left + 1))
            if fill < 0.5 or marked < 0.002:
                return _normalized(alpha, min_contrast)
            gray = alpha * gray + (1.0 - alpha) * paper
    step = max(1, int(math.sqrt(gray.size / 250_000)))  # the median of a subsample is as good and faster
    background = float(np.median(gray[::step, ::step]))
    return _normalized(np.abs(gray - background), min_contrast)


def _normalized(contrast: np.ndarray, min_contrast: float) -> np.ndarray:
    """Contrast -> ink strength in [0, 1] (divided by its peak); blank if the peak is under min_contrast."""
    peak = float(contrast.max())
    if peak < min_contrast:
        raise BlankImageError(BLANK_MESSAGE)
    return np.minimum(contrast * (1.0 / peak), 1.0).astype(np.float32, copy=False)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), inclusive, of the True pixels; None if there is none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def stroke_width(ink: np.ndarray, binary: np.ndarray) -> float:
    """Mean stroke width in px: 2 * ink area / boundary length.

    For a stroke of width w and length L the area is w*L and the boundary about 2*L. The boundary is
    counted as horizontal plus vertical pixel edges, which over-counts a line at a random angle by
    4/pi on average; hence the pi/4.
    """
    padded = np.pad(binary, 1)
    edges = np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    if edges == 0:
        return 1.0
    area = float(ink.sum())
    return float(max(2.0 * area / (edges * math.pi / 4.0), 0.5))


def connected_components(binary: np.ndarray) -> dict[str, np.ndarray]:
    """8-connected components of a boolean image, by runs and a vectorized union-find.

    Returns arrays of shape (N,): "top", "bottom", "left", "right" (inclusive pixel bounds) and
    "area" (pixels) of each component. Cost grows with the number of horizontal runs of ink, not
    with the pixel count, so it is a few ms on typical drawings (no scipy needed).
    """
    height, width = binary.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = binary
    diff = np.diff(padded, axis=1)
    run_row, run_start = np.nonzero(diff == 1)  # row-major order: sorted by (row, column)
    _, run_stop = np.nonzero(diff == -1)  # exclusive end column
    n = run_row.size
    empty = np.zeros(0, dtype=np.int64)
    if n == 0:
        return {k: empty for k in ("top", "bottom", "left", "right", "area")}
    run_end = run_stop - 1
    stride = width + 4  # keys row * stride + column + 1 are sorted and never collide across rows
    start_key = run_row * stride + run_start + 1
    end_key = run_row * stride + run_end + 1
    next_row = (run_row + 1) * stride
    # Runs b in the next row touch run a (8-connected) iff end_b >= start_a - 1 and start_b <= end_a + 1;
    # they form a contiguous slice of the sorted run list.
    lo = np.searchsorted(end_key, next_row + run_start, side="left")
    hi = np.searchsorted(start_key, next_row + run_end + 2, side="right")
    counts = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n), counts)
    b = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)

    parent = np.arange(n)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        low = np.minimum(root_a, root_b)
        new = parent.copy()
        np.minimum.at(new, root_a, low)  # hook each root under the smallest root it touches
        np.minimum.at(new, root_b, low)
        while True:  # pointer jumping: everyone points at its root again
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, parent):
            break
        parent = new

    _, comp = np.unique(parent, return_inverse=True)
    m = int(comp.max()) + 1
    top = np.full(m, height, dtype=np.int64)
    bottom = np.zeros(m, dtype=np.int64)
    left = np.full(m, width, dtype=np.int64)
    right = np.zeros(m, dtype=np.int64)
    area = np.zeros(m, dtype=np.int64)
    np.minimum.at(top, comp, run_row)
    np.maximum.at(bottom, comp, run_row)
    np.minimum.at(left, comp, run_start)
    np.maximum.at(right, comp, run_end)
    np.add.at(area, comp, run_stop - run_start)
    return {"top": top, "bottom": bottom, "left": left, "right": right, "area": area}


# Flat pieces (minus, fraction bar) count a tenth of their width, as in data_scripts.render.stroke_size.
FLAT_WEIGHT = 0.1


def symbol_size(binary: np.ndarray, width: float) -> float:
    """Mean size in px of the pieces of ink: each piece's height less the stroke width (the pen adds
    that much to the height of the trace it draws), or a tenth of its width for flat pieces. Specks
    smaller than a quarter of a pen dot are noise and are skipped. 0.0 when nothing is left."""
    comps = connected_components(binary)
    if comps["area"].size == 0:
        return 0.0
    keep = comps["area"] >= max(0.25 * width * width, 1.0)
    if not keep.any():
        keep = comps["area"] == comps["area"].max()
    heights = (comps["bottom"] - comps["top"] + 1)[keep] - width
    widths = (comps["right"] - comps["left"] + 1)[keep] - width
    sizes = np.maximum(np.maximum(heights, FLAT_WEIGHT * widths), 0.0)
    return float(sizes.mean())


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) float -> (height, width), antialiased when shrinking."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image[None, None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0]


def _dilate(x: np.ndarray, step: int) -> np.ndarray:
    """One step of binary dilation of a bool (H, W) image (the caller leaves a border of zeros).

    Alternating a 3x3 square (even steps) and a cross (odd steps) approximates a disc, so strokes at
    any angle grow alike. Shifted ORs on bool arrays are much faster here than max-pooling floats.
    """
    row = x.copy()
    row[:, 1:] |= x[:, :-1]
    row[:, :-1] |= x[:, 1:]
    src = row if step % 2 == 0 else x
    out = row.copy()
    out[1:, :] |= src[:-1, :]
    out[:-1, :] |= src[1:, :]
    return out


class HMERImageProcessor(BaseImageProcessor):
    r"""
    Turns images of handwritten math (drawings, scans, renders) into HMER model inputs.

    Accepts a PIL image, a numpy array ((H, W), (H, W, C) or (C, H, W)), a torch tensor, a path, or a list of
    those. Gray, RGB and RGBA images in either polarity work (the ink is the minority colour; transparent
    pixels are background). The output looks like the training renders: white ink (1.0) on black (0.0),
    cropped to the ink with `margin` px around it, strokes about `target_stroke_width` px wide and
    `target_symbol_size` px high.

    Args:
        target_symbol_size (`float`): mean size of the pieces of ink (see `symbol_size`), in px, after scaling.
            The default is what that estimator measures on `render_strokes(..., stroke_height=22)` renders.
        target_stroke_width (`float`): stroke width (see `stroke_width`) after processing, in px; the
            default is what the estimator measures on 3 px renders.
        adjust_stroke_width (`bool`): thin or thicken strokes towards `target_stroke_width`.
        margin (`int`): black border around the ink, in px.
        max_height, max_width, max_pixels (`int`): caps on the output size; a larger result is scaled down.
        max_input_pixels (`int`): inputs with more pixels are box-filtered down first (speed).
        min_contrast (`float`): ink must differ from the background by at least this (0-1 scale), or the
            image counts as blank.
        scale_tolerance (`float`): relative scale changes smaller than this are skipped (renders stay
            pixel-exact).
        width_tolerance (`float`): stroke-width differences (px) smaller than this are left alone.
        supersample (`int`): resolution factor of the thinning / thickening step.
        pad_to_multiple_of (`int`, *optional*): pad batch height and width to a multiple of this.
    """

    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(
        self,
        target_symbol_size: float = 25.0,
        target_stroke_width: float = 3.2,
        adjust_stroke_width: bool = True,
        margin: int = 10,
        max_height: int = 512,
        max_width: int = 2048,
        max_pixels: int = 256 * 1024,
        max_input_pixels: int = 4_000_000,
        min_contrast: float = 0.1,
        scale_tolerance: float = 0.1,
        width_tolerance: float = 0.5,
        supersample: int = 4,
        pad_to_multiple_of: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if target_symbol_size <= 0 or target_stroke_width <= 0:
            raise ValueError("target_symbol_size and target_stroke_width must be positive")
        if min(max_height, max_width) <= 2 * margin + 1 or max_pixels <= (2 * margin + 1) ** 2:
            raise ValueError(f"max_height/max_width/max_pixels leave no room inside the {margin} px margins")
        self.target_symbol_size = float(target_symbol_size)
        self.target_stroke_width = float(target_stroke_width)
        self.adjust_stroke_width = bool(adjust_stroke_width)
        self.margin = int(margin)
        self.max_height = int(max_height)
        self.max_width = int(max_width)
        self.max_pixels = int(max_pixels)
        self.max_input_pixels = int(max_input_pixels)
        self.min_contrast = float(min_contrast)
        self.scale_tolerance = float(scale_tolerance)
        self.width_tolerance = float(width_tolerance)
        self.supersample = int(supersample)
        self.pad_to_multiple_of = pad_to_multiple_of

    # ------------------------------------------------------------------ single image
    def ink_map(self, image: Any) -> np.ndarray:
        """One image -> (H, W) float32 ink strength in [0, 1] at input resolution (huge inputs shrunk).
        Raises `BlankImageError` (a ValueError) if there is no ink."""
        gray, alpha = _gray_alpha(open_image(image), self.max_input_pixels)
        return _ink_strength(gray, alpha, self.min_contrast)

    def measure(self, image: Any) -> dict[str, float]:
        """Estimates of one image: "stroke_width" and "symbol_size" in px, "height"/"width" of the ink box.
        Useful to check what the processor will do; `to_model_image(...)` of an image measures ~targets."""
        ink = self.ink_map(image)
        binary = ink >= 0.5
        box = _bbox(binary)
        if box is None:
            raise BlankImageError(BLANK_MESSAGE)
        top, bottom, left, right = box
        ink, binary = ink[top : bottom + 1, left : right + 1], binary[top : bottom + 1, left : right + 1]
        width = stroke_width(ink, binary)
        return {
            "stroke_width": width,
            "symbol_size": symbol_size(binary, width),
            "height": float(bottom - top + 1),
            "width": float(right - left + 1),
        }

    def _output_scale(self, box_h: int, box_w: int, scale: float) -> float:
        """Lowers `scale` so that the output (box * scale + 2 * margin) fits max_height/max_width/max_pixels."""
        pad = 2 * self.margin
        scale = min(scale, (self.max_height - pad - 1) / box_h, (self.max_width - pad - 1) / box_w)
        # (box_h * s + pad) * (box_w * s + pad) <= max_pixels, solved for s
        a, b, c = box_h * box_w, pad * (box_h + box_w), pad * pad - self.max_pixels
        scale = min(scale, (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) * 0.999)
        return scale

    def to_model_image(self, image: Any) -> np.ndarray:
        """One image -> (H, W) float32 array in [0, 1], white ink on black, in the training-render look.

        Raises `BlankImageError` (a ValueError) when the image has no ink.
        """
        return self.model_image_from_ink(self.ink_map(image))

    def model_image_from_ink(self, ink: np.ndarray) -> np.ndarray:
        """`to_model_image` from the image's `ink_map` (for callers that also read the ink map itself)."""
        binary = ink >= 0.5
        box = _bbox(binary)
        if box is None:
            raise BlankImageError(BLANK_MESSAGE)
        top, bottom, left, right = box
        core_ink = ink[top : bottom + 1, left : right + 1]
        core = binary[top : bottom + 1, left : right + 1]
        width = stroke_width(core_ink, core)
        size = symbol_size(core, width)
        box_h, box_w = bottom - top + 1, right - left + 1

        if size >= 1.0:
            scale = self.target_symbol_size / size
        else:  # only dots or specks: keep the pen width right instead
            scale = self.target_stroke_width / width
        if abs(scale - 1.0) < self.scale_tolerance:
            scale = 1.0
        capped = self._output_scale(box_h, box_w, scale)
        # When the cap shrinks the whole expression, the pen shrinks with it (like render's max_size).
        pen = self.target_stroke_width * min(1.0, capped / scale)
        scale = capped

        # Keep a border of 2 input px so the antialiased edge of the outermost strokes is not cut off.
        border = 2
        t0, b0 = max(top - border, 0), min(bottom + border + 1, ink.shape[0])
        l0, r0 = max(left - border, 0), min(right + border + 1, ink.shape[1])
        crop = torch.from_numpy(np.ascontiguousarray(ink[t0:b0, l0:r0]))

        change = pen - width * scale
        if not self.adjust_stroke_width or abs(change) < self.width_tolerance:
            u, steps = 1, 0
        else:
            u = self.supersample
            # each dilation/erosion step moves each side by one supersampled px: width by 2/u px
            steps = int(round(abs(change) * u / 2))
            steps = min(steps, 8 * u)  # a pen much off the target is a blob anyway
        work_scale = scale * u
        out = _resize(crop, max(1, round(crop.shape[0] * work_scale)), max(1, round(crop.shape[1] * work_scale)))
        # ink box position inside `out`, in work px
        off_y, off_x = (top - t0) * work_scale, (left - l0) * work_scale
        if steps:
            halo = steps + 1
            x = np.pad(out.numpy() >= 0.5, halo)
            off_y, off_x = off_y + halo, off_x + halo
            if change > 0:
                for i in range(steps):
                    x = _dilate(x, i)
            else:
                eroded = x
                for i in range(steps):
                    eroded = ~_dilate(~eroded, i)
                if eroded.any():  # thinning must not erase the drawing
                    x = eroded
            # back to output resolution: a u x u box filter gives antialiased edges like the renders
            h, w = x.shape
            x = torch.from_numpy(np.pad(x, ((0, (-h) % u), (0, (-w) % u))).astype(np.float32))
            out = F.avg_pool2d(x[None, None], u)[0, 0]
            off_y, off_x = off_y / u, off_x / u

        # Place so that the ink box sits `margin` px from each edge.
        out_h = int(round(box_h * scale)) + 2 * self.margin
        out_w = int(round(box_w * scale)) + 2 * self.margin
        out_h, out_w = max(out_h, 2 * self.margin + 1), max(out_w, 2 * self.margin + 1)
        canvas = torch.zeros(out_h, out_w)
        dy, dx = int(round(self.margin - off_y)), int(round(self.margin - off_x))
        sy0, sx0 = max(0, -dy), max(0, -dx)
        cy0, cx0 = max(0, dy), max(0, dx)
        hh = min(out.shape[0] - sy0, out_h - cy0)
        ww = min(out.shape[1] - sx0, out_w - cx0)
        if hh > 0 and ww > 0:
            canvas[cy0 : cy0 + hh, cx0 : cx0 + ww] = out[sy0 : sy0 + hh, sx0 : sx0 + ww]
        return canvas.clamp_(0.0, 1.0).numpy()

    # ------------------------------------------------------------------ batches
    def pad_batch(self, images: Sequence[np.ndarray], return_tensors: str | None = "pt") -> BatchFeature:
        """Pads processed (H, W) images to the largest of the batch (top-left aligned, zeros).

        Returns a BatchFeature with "pixel_values" (B, 1, H, W) float32 and "pixel_mask" (B, H, W)
        int64, 1 on image pixels and 0 on padding.
        """
        if len(images) == 0:
            raise ValueError("no images given")
        height = max(im.shape[0] for im in images)
        width = max(im.shape[1] for im in images)
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            height, width = -(-height // m) * m, -(-width // m) * m
        pixel_values = np.zeros((len(images), 1, height, width), dtype=np.float32)
        pixel_mask = np.zeros((len(images), height, width), dtype=np.int64)
        for i, im in enumerate(images):
            pixel_values[i, 0, : im.shape[0], : im.shape[1]] = im
            pixel_mask[i, : im.shape[0], : im.shape[1]] = 1
        return BatchFeature({"pixel_values": pixel_values, "pixel_mask": pixel_mask}, tensor_type=return_tensors)

    @staticmethod
    def _flatten(images: Any) -> list:
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Processes one image or a list of images into a padded batch (see `pad_batch`).

        Raises `ValueError` for a blank image (no ink), naming its position in the batch.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        items = self._flatten(images)
        processed = []
        for i, image in enumerate(items):
            try:
                processed.append(self.to_model_image(image))
            except BlankImageError as err:
                if len(items) == 1:
                    raise
                raise BlankImageError(f"image {i} of the batch: {err}") from None
        return self.pad_batch(processed, return_tensors=return_tensors)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)
