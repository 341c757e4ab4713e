"""Stroke-level augmentation of on-line handwriting, for on-the-fly rendering in training.

Augmenting the pen trajectories rather than the rendered image changes the writing itself (slant,
rotation, wobbly lines, pen width, symbol size) while the renderer keeps the lines crisp and the
whole expression inside the image. Typical use in a data loader:

    rng = np.random.default_rng(seed)
    strokes, render_kwargs = augment_strokes(example["strokes"], rng)
    image = render_strokes(strokes, **render_kwargs)       # uint8 (H, W), ink 255 on 0

or `render_augmented(example["strokes"], rng)` for both steps. The same generator state gives the
same output. Costs about 0.3 ms per expression on top of the render.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .render import StrokesLike, as_strokes, render_strokes, stroke_size


__all__ = ["StrokeAugmentation", "augment_strokes", "render_augmented"]


@dataclass(frozen=True)
class StrokeAugmentation:
    """Ranges of the random changes. Lengths are in units of the mean stroke height (see
    `render.stroke_size`), so the same settings fit every CROHME sub-corpus whatever its units.

    Attributes:
        scale: range of the factor on the rendered mean stroke height (sampled log-uniformly).
        stroke_height: the un-augmented mean stroke height in pixels (the standard render: 22).
        line_width: range of the pen width in pixels (uniform).
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation]).
        slant: maximum shear angle in degrees (x += tan(angle) * y).
        aspect: range of the extra horizontal stretch (log-uniform).
        jitter: standard deviation of the independent noise added to each point.
        warp: amplitude of the smooth elastic displacement field.
        warp_wavelength: range of the wavelength of that field's sine waves.
        drop_point: probability, per stroke of 3 or more points, of deleting one inner point.
    """

    scale: tuple[float, float] = (0.7, 1.4)
    stroke_height: float = 22.0
    line_width: tuple[float, float] = (1.5, 5.0)
    rotation: float = 4.0
    slant: float = 10.0
    aspect: tuple[float, float] = (0.9, 1.1)
    jitter: float = 0.01
    warp: float = 0.06
    warp_wavelength: tuple[float, float] = (1.5, 4.0)
    drop_point: float = 0.1

    def __call__(self, strokes: StrokesLike, rng: np.random.Generator) -> tuple[list[np.ndarray], dict]:
        """Returns (augmented strokes as float32 (N, 2) arrays, keyword arguments for render_strokes)."""
        strokes = as_strokes(strokes)
        unit = stroke_size(strokes) or 1.0
        lengths = [len(s) for s in strokes]
        points = np.concatenate(strokes)
        # Work in mean-stroke-height units around the centre, so that amplitudes are scale-free.
        points = (points - points.mean(axis=0)) / unit

        points = points + self._warp_field(points, rng)
        if self.jitter > 0:
            points = points + rng.normal(0.0, self.jitter, size=points.shape)

        angle = np.deg2rad(rng.uniform(-self.rotation, self.rotation))
        shear = np.tan(np.deg2rad(rng.uniform(-self.slant, self.slant)))
        stretch = np.exp(rng.uniform(*np.log(self.aspect)))
        cos, sin = np.cos(angle), np.sin(angle)
        # Row vectors: p' = p @ M.T with M = rotation @ shear @ stretch.
        matrix = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([stretch, 1.0])
        points = points @ matrix.T

        out = []
        for stroke in np.split(points, np.cumsum(lengths)[:-1]):
            if len(stroke) >= 3 and rng.random() < self.drop_point:
                stroke = np.delete(stroke, rng.integers(1, len(stroke) - 1), axis=0)
            out.append(stroke.astype(np.float32))

        render_kwargs = {
            "stroke_height": self.stroke_height * float(np.exp(rng.uniform(*np.log(self.scale)))),
            "line_width": float(rng.uniform(*self.line_width)),
        }
        return out, render_kwargs

    def _warp_field(self, points: np.ndarray, rng: np.random.Generator, waves: int = 3) -> np.ndarray:
        """A smooth random displacement (N, 2): a few plane sine waves per axis."""
        if self.warp <= 0:
            return np.zeros_like(points)
        displacement = np.empty_like(points)
        for axis in range(2):
            direction = rng.normal(size=(waves, 2))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            frequency = 2 * np.pi / rng.uniform(*self.warp_wavelength, size=(waves, 1))
            phase = rng.uniform(0, 2 * np.pi, size=waves)
            amplitude = rng.uniform(0, 1, size=waves)
            amplitude *= self.warp / np.sqrt(waves)
            displacement[:, axis] = np.sin(points @ (direction * frequency).T + phase) @ amplitude
        return displacement


DEFAULT_AUGMENTATION = StrokeAugmentation()


def augment_strokes(strokes: StrokesLike, rng: np.random.Generator, **overrides) -> tuple[list[np.ndarray], dict]:
    """Randomly distorts an expression's strokes; see `StrokeAugmentation` for what and how much.

    Args:
        strokes: list of (N, 2) arrays or nested lists, x, y with y down, any unit.
        rng: a `np.random.Generator`; the same state gives the same result.
        **overrides: fields of `StrokeAugmentation` to change, e.g. `scale=(1.0, 1.0)`.

    Returns:
        (strokes, render_kwargs): new float32 (N, 2) strokes (N may be one less than before when a
        point was dropped) and a dict with `stroke_height` and `line_width` for `render_strokes`.
    """
    augmentation = replace(DEFAULT_AUGMENTATION, **overrides) if overrides else DEFAULT_AUGMENTATION
    return augmentation(strokes, rng)


def render_augmented(strokes: StrokesLike, rng: np.random.Generator, max_size=None, **overrides) -> np.ndarray:
    """augment_strokes then render_strokes: a uint8 (H, W) image, ink 255 on 0."""
    strokes, render_kwargs = augment_strokes(strokes, rng, **overrides)
    return render_strokes(strokes, max_size=max_size, **render_kwargs)
