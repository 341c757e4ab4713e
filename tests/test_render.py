"""Tests for data_scripts.render (standard offline look) and data_scripts.augment (stroke augmentation)."""


import numpy as np
import pytest

from data_scripts.augment import StrokeAugmentation, augment_strokes, render_augmented
from data_scripts.render import render_strokes, stroke_size


def vertical(x, y0, y1, n=20):
    return np.stack([np.full(n, x), np.linspace(y0, y1, n)], axis=1)


def handwriting(seed=0, n_strokes=12):
    """A row of wavy strokes of varied sizes, something like a written expression."""
    rng = np.random.default_rng(seed)
    strokes = []
    for i in range(n_strokes):
        t = np.linspace(0, 1, 30)
        height = rng.uniform(15, 40)
        x = i * 30 + 10 * t + rng.normal(0, 0.5, 30)
        y = 50 - height / 2 + height * t + 4 * np.sin(6 * t)
        strokes.append(np.stack([x, y], axis=1))
    strokes.append(np.array([[i * 30 + 40.0, 20.0]]))  # a dot
    strokes.append(np.array([[0.0, 90.0], [300.0, 91.0]]))  # a flat stroke (fraction bar)
    return strokes


def ink_box(image, threshold=0):
    rows = np.flatnonzero((image > threshold).any(axis=1))
    cols = np.flatnonzero((image > threshold).any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def test_polarity_dtype_and_antialiasing():
    image = render_strokes(handwriting())
    assert image.dtype == np.uint8 and image.ndim == 2
    # White ink on black: the background (most pixels) is 0, line centres are 255.
    assert np.median(image) == 0
    assert image.max() == 255
    # Antialiased: edge pixels take intermediate values.
    assert ((image > 0) & (image < 255)).sum() > 100


@pytest.mark.parametrize("margin", [0, 10, 12])
def test_margins(margin):
    image = render_strokes(handwriting(), margin=margin)
    top, bottom, left, right = ink_box(image, threshold=32)
    height, width = image.shape
    for gap in (top, left, height - 1 - bottom, width - 1 - right):
        assert margin - 1 <= gap <= margin + 1


@pytest.mark.parametrize("line_width", [1.5, 3.0, 5.0])
def test_stroke_width(line_width):
    image = render_strokes([vertical(0, 0, 100)], line_width=line_width).astype(np.float64)
    middle = image[image.shape[0] // 2]
    # The ink across a vertical line, in full-ink pixels, is the pen width.
    assert middle.sum() / 255 == pytest.approx(line_width, abs=0.3)


def test_scaled_to_mean_stroke_height():
    # Heights 10 and 30 units: mean 20 -> scale 22 / 20; image = 30 * 1.1 + 2 * 10 margin + 3 line width.
    strokes = [vertical(0, 0, 10), vertical(5, 0, 30)]
    assert stroke_size(strokes) == pytest.approx(20)
    image = render_strokes(strokes)
    assert image.shape[0] == int(np.ceil(30 * 1.1 + 23))
    top, bottom, _, _ = ink_box(image, threshold=127)
    assert bottom - top + 1 == pytest.approx(33 + 3, abs=1.5)
    # Twice the stroke height: the ink is twice as tall.
    tall = render_strokes(strokes, stroke_height=44.0)
    assert tall.shape[0] == int(np.ceil(30 * 2.2 + 23))


def test_independent_of_coordinate_units():
    strokes = handwriting()
    small = render_strokes([s / 1000 for s in strokes])
    large = render_strokes([s * 50 + 7 for s in strokes])
    assert small.shape == large.shape
    assert np.abs(small.astype(int) - large.astype(int)).mean() < 1.0


def test_typical_size_like_standard_images():
    # Mean stroke height 22 px and expression ~3 stroke heights tall -> ~90 px with margins.
    image = render_strokes(handwriting())
    assert 60 <= image.shape[0] <= 140
    assert 200 <= image.shape[1] <= 600


def test_max_size_caps_image():
    image = render_strokes(handwriting(), stroke_height=100.0, max_size=(120, 400))
    assert image.shape[0] <= 120 and image.shape[1] <= 400
    assert render_strokes(handwriting(), max_size=64).shape[1] <= 64
    with pytest.raises(ValueError, match="max_size"):
        render_strokes(handwriting(), max_size=20)


def test_degenerate_strokes():
    # One dot, only dots, only a flat line, extra time channel, empty strokes in between.
    assert render_strokes([[[3.0, 4.0]]]).shape == (23, 23)
    assert render_strokes([[[0.0, 0.0]], [[10.0, 0.0]], [[20.0, 0.0]]]).max() == 255
    flat = render_strokes([[[0.0, 5.0], [100.0, 5.0]]])
    assert flat.shape[1] == int(np.ceil(22 / 0.1 + 23))
    with_time = render_strokes([np.array([[0, 0, 0.1], [0, 10, 0.2]]), np.zeros((0, 2))])
    assert with_time.max() == 255


def test_bad_input_errors():
    with pytest.raises(ValueError, match="nothing to render"):
        render_strokes([])
    with pytest.raises(ValueError, match="nothing to render"):
        render_strokes([np.zeros((0, 2))])
    with pytest.raises(ValueError, match="non-finite"):
        render_strokes([[[0.0, 0.0], [np.nan, 1.0]]])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        render_strokes([[1.0, 2.0, 3.0]])



# --- augmentation ---------------------------------------------------------------------------


def test_augmentation_deterministic_for_a_seed():
    strokes = handwriting()
    a, kw_a = augment_strokes(strokes, np.random.default_rng(7))
    b, kw_b = augment_strokes(strokes, np.random.default_rng(7))
    c, kw_c = augment_strokes(strokes, np.random.default_rng(8))
    assert kw_a == kw_b
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert kw_a != kw_c
    assert np.array_equal(render_augmented(strokes, np.random.default_rng(7)), render_strokes(a, **kw_a))


def test_augmentation_changes_geometry_within_ranges():
    strokes = handwriting()
    heights, widths = [], []
    for seed in range(200):
        new, kwargs = augment_strokes(strokes, np.random.default_rng(seed))
        assert len(new) == len(strokes)
        assert all(s.dtype == np.float32 and s.ndim == 2 and s.shape[1] == 2 for s in new)
        # At most one point dropped per stroke.
        assert all(len(s) - len(n) in (0, 1) for s, n in zip(strokes, new))
        heights.append(kwargs["stroke_height"])
        widths.append(kwargs["line_width"])
    assert 22 * 0.7 <= min(heights) < 22 * 0.8 and 22 * 1.3 < max(heights) <= 22 * 1.4
    assert 1.5 <= min(widths) < 2.0 and 4.5 < max(widths) <= 5.0
    # The writing itself moves (warp, jitter, slant, rotation), yet stays close to the original shape.
    new, _ = augment_strokes(strokes, np.random.default_rng(0), drop_point=0.0)
    unit = stroke_size(strokes)
    original = np.concatenate(strokes)
    original = (original - original.mean(0)) / unit
    moved = np.concatenate(new)
    assert 0.01 < np.abs(moved - original).mean() < 0.5


def test_augmentation_can_be_switched_off():
    strokes = handwriting()
    identity = StrokeAugmentation(
        scale=(1, 1), line_width=(3, 3), rotation=0, slant=0, aspect=(1, 1), jitter=0, warp=0, drop_point=0
    )
    new, kwargs = identity(strokes, np.random.default_rng(0))
    assert kwargs == {"stroke_height": 22.0, "line_width": 3.0}
    assert np.abs(render_strokes(new, **kwargs).astype(int) - render_strokes(strokes).astype(int)).max() <= 1


def test_augmented_strokes_stay_inside_image():
    strokes = handwriting()
    strong = {"rotation": 15.0, "slant": 25.0, "warp": 0.3, "jitter": 0.05, "line_width": (5.0, 5.0)}
    for seed in range(100):
        image = render_augmented(strokes, np.random.default_rng(seed), **strong)
        assert image.max() == 255
        # The margin (10 px, minus one px of antialiasing) is empty on every side.
        border = np.ones_like(image, dtype=bool)
        border[9:-9, 9:-9] = False
        assert image[border].max() == 0, f"seed {seed}: ink in the margin"

