"""HMERImageProcessor: any drawing -> the training-render look (size, stroke width, polarity), clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modeling_hmer.image_processing_hmer import (
    BlankImageError,
    HMERImageProcessor,
    connected_components,
    stroke_width,
)


@pytest.fixture(scope="module")
def processor():
    return HMERImageProcessor()


def _measure_output(processor, array: np.ndarray) -> dict:
    return processor.measure((array * 255).astype(np.uint8))


def test_same_drawing_any_brush_zoom_polarity(processor, draw_expression):
    """3 zoom levels x 3 brush widths x 2 polarities: outputs of nearly one size and one stroke width."""
    results = {}
    for zoom in (40, 80, 160):
        for brush in (2, 5, 9):
            for invert in (False, True):
                out = processor.to_model_image(draw_expression(zoom=zoom, brush=brush, invert=invert))
                assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
                m = _measure_output(processor, out)
                results[zoom, brush, invert] = (out.shape, m["stroke_width"], m["symbol_size"])
    heights = np.array([shape[0] for shape, _, _ in results.values()], dtype=float)
    widths = np.array([shape[1] for shape, _, _ in results.values()], dtype=float)
    strokes = np.array([sw for _, sw, _ in results.values()])
    sizes = np.array([ss for _, _, ss in results.values()])
    # the input images span 4x in size and 4.5x in brush width; the outputs stay within ~12%
    assert heights.max() / heights.min() < 1.15, results
    assert widths.max() / widths.min() < 1.15, results
    assert np.all(np.abs(strokes - processor.target_stroke_width) < 0.75), results
    assert np.all(np.abs(sizes - processor.target_symbol_size) / processor.target_symbol_size < 0.15), results
    # polarity never matters: identical outputs
    for zoom in (40, 80, 160):
        for brush in (2, 5, 9):
            assert results[zoom, brush, False] == results[zoom, brush, True]


def test_polarity_gives_white_ink_on_black(processor, draw_expression):
    for invert in (False, True):
        out = processor.to_model_image(draw_expression(invert=invert))
        assert out[0, :].max() == 0.0 and out[:, 0].max() == 0.0  # margin is background (0)
        assert 0.02 < out.mean() < 0.4  # ink is the minority, at 1.0
        assert out.max() == pytest.approx(1.0, abs=0.01)


def test_training_render_passes_through_unchanged(processor, expression_strokes):
    render = pytest.importorskip("data_scripts.render")
    image = render.render_strokes(expression_strokes)  # uint8, white on black, 3 px, 22 px strokes
    out = processor.to_model_image(image)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image / 255.0, atol=1e-4)


def test_transparent_background_is_background(processor, draw_expression):
    """Blue ink on a transparent canvas reads like black ink on white."""
    reference = processor.to_model_image(draw_expression(zoom=80, brush=5))
    transparent = draw_expression(zoom=80, brush=5, transparent=True)
    assert transparent.mode == "RGBA"
    out = processor.to_model_image(transparent)
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 0.02

    # Paper (opaque white, black ink) with transparent borders: the borders are paper too, not ink.
    paper = draw_expression(zoom=80, brush=5).convert("RGBA")
    canvas = Image.new("RGBA", (paper.width + 200, paper.height + 100), (0, 0, 0, 0))
    canvas.paste(paper, (100, 50))
    out = processor.to_model_image(canvas)
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 0.02


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d.convert("RGB"),
        lambda d: np.asarray(d),  # (H, W) uint8
        lambda d: np.asarray(d.convert("RGB")),  # (H, W, 3)
        lambda d: np.asarray(d, dtype=np.float32) / 255.0,  # float in [0, 1]
        lambda d: torch.from_numpy(np.asarray(d, dtype=np.float32) / 255.0)[None],  # (1, H, W) tensor
        lambda d: torch.from_numpy(np.array(d.convert("RGB"))).permute(2, 0, 1),  # (3, H, W) uint8 tensor
        lambda d: d.convert("1"),
        lambda d: d.convert("P"),
    ],
    ids=["rgb", "np-gray", "np-rgb", "np-float", "torch-1hw", "torch-chw", "mode-1", "mode-P"],
)
def test_input_types(processor, draw_expression, make):
    drawing = draw_expression(zoom=60, brush=4)
    reference = processor.to_model_image(drawing)
    out = processor.to_model_image(make(drawing))
    assert out.shape == reference.shape
    assert np.abs(out - reference).mean() < 0.02


def test_file_path_input(processor, draw_expression, tmp_path):
    path = tmp_path / "drawing.png"
    draw_expression().save(path)
    assert processor.to_model_image(str(path)).shape == processor.to_model_image(draw_expression()).shape
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        processor.to_model_image(bad)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (200, 100), 255),
        Image.new("RGB", (200, 100), (0, 0, 0)),
        Image.new("RGBA", (200, 100), (0, 0, 0, 0)),
        Image.new("RGB", (200, 100), (120, 200, 30)),
        Image.new("L", (1, 1), 0),
        Image.new("L", (1, 1), 255),
        np.zeros((0, 5), dtype=np.uint8),
        np.full((300, 20000), 255, dtype=np.uint8),
    ],
    ids=["white", "black", "transparent", "green", "1x1-black", "1x1-white", "empty", "20000x300-blank"],
)
def test_blank_images_raise_clear_error(processor, image):
    with pytest.raises(ValueError, match="blank"):
        processor(image)


def test_faint_noise_is_blank(processor):
    rng = np.random.default_rng(0)
    noise = (250 + rng.integers(0, 5, size=(100, 300))).astype(np.uint8)  # paper grain, no ink
    with pytest.raises(BlankImageError):
        processor(noise)


def test_batch_error_names_the_image(processor, draw_expression):
    with pytest.raises(ValueError, match="image 1 of the batch"):
        processor([draw_expression(), Image.new("L", (50, 50), 255)])


def test_bad_input_types(processor):
    with pytest.raises(TypeError, match="unsupported image type"):
        processor(12)
    with pytest.raises(ValueError, match="shape"):
        processor(np.zeros((5, 6, 7, 8, 9)))
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((10, 10), np.nan, dtype=np.float32))


def test_very_long_image_is_capped(processor):
    """A 20000x300 strip of symbols: scaled down to the size caps (its time: `python -m train.bench --inputs`)."""
    image = Image.new("L", (20000, 300), 0)
    draw = ImageDraw.Draw(image)
    for x in range(100, 19800, 400):
        draw.line([(x, 50), (x + 200, 250)], fill=255, width=8)
        draw.line([(x + 200, 50), (x, 250)], fill=255, width=8)
    out = processor.to_model_image(image)
    h, w = out.shape
    assert w <= processor.max_width and h <= processor.max_height and h * w <= processor.max_pixels
    assert w > 10 * h  # still a strip, not squashed
    assert out.max() > 0.9


def test_huge_image_gives_the_size_of_a_normal_drawing(processor, draw_expression):
    """10000 x 10000 with the expression in a corner: cropped and shrunk to a normal drawing's size
    (its time: `python -m train.bench --inputs`)."""
    big = Image.new("L", (10000, 10000), 255)
    big.paste(draw_expression(zoom=1200, brush=40), (500, 3000))
    out = processor.to_model_image(big)
    reference = processor.to_model_image(draw_expression(zoom=80, brush=5))
    assert abs(out.shape[0] - reference.shape[0]) / reference.shape[0] < 0.15
    assert abs(out.shape[1] - reference.shape[1]) / reference.shape[1] < 0.15


def test_tiny_drawing_is_upscaled(processor, draw_expression):
    small = draw_expression(zoom=12, brush=1, pad=3)
    out = processor.to_model_image(small)
    reference = processor.to_model_image(draw_expression(zoom=80, brush=5))
    assert out.shape[0] > 2 * small.height
    assert abs(out.shape[1] - reference.shape[1]) / reference.shape[1] < 0.25


def test_max_pixels_caps(draw_expression):
    processor = HMERImageProcessor(max_height=60, max_width=120, max_pixels=5000)
    out = processor.to_model_image(draw_expression())
    assert out.shape[0] <= 60 and out.shape[1] <= 120 and out.size <= 5000


def test_batch_padding_and_mask(processor, draw_expression, expression_strokes):
    images = [draw_expression(zoom=60), draw_expression(zoom=60, strokes=expression_strokes[:2])]
    singles = [processor.to_model_image(im) for im in images]
    batch = processor(images)
    assert set(batch) == {"pixel_values", "pixel_mask"}
    values, mask = batch["pixel_values"], batch["pixel_mask"]
    assert values.dtype == torch.float32 and mask.dtype == torch.int64
    height = max(s.shape[0] for s in singles)
    width = max(s.shape[1] for s in singles)
    assert values.shape == (2, 1, height, width) and mask.shape == (2, height, width)
    for i, single in enumerate(singles):
        h, w = single.shape
        np.testing.assert_array_equal(values[i, 0, :h, :w].numpy(), single)
        assert mask[i, :h, :w].all() and mask[i].sum() == h * w
        assert values[i, 0][mask[i] == 0].abs().sum() == 0  # padding is zero


def test_return_numpy_and_pad_multiple(draw_expression):
    processor = HMERImageProcessor(pad_to_multiple_of=16)
    batch = processor(draw_expression(), return_tensors="np")
    assert isinstance(batch["pixel_values"], np.ndarray)
    assert batch["pixel_values"].shape[2] % 16 == 0 and batch["pixel_values"].shape[3] % 16 == 0


def test_save_and_load(tmp_path, draw_expression):
    processor = HMERImageProcessor(target_symbol_size=30.0, margin=8, max_width=1000)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["target_symbol_size"] == 30.0 and saved["margin"] == 8 and saved["max_width"] == 1000
    loaded = HMERImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = draw_expression()
    np.testing.assert_array_equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])


def test_stroke_width_estimator():
    """Rings (every direction alike) of known pen width."""
    for width in (2, 3, 6, 12):
        image = Image.new("L", (300, 300), 0)
        ImageDraw.Draw(image).ellipse((20, 20, 280, 280), outline=255, width=width)
        ink = np.asarray(image, dtype=np.float32) / 255.0
        assert stroke_width(ink, ink > 0.5) == pytest.approx(width, rel=0.12)


def test_connected_components():
    image = np.zeros((30, 40), dtype=bool)
    image[2:5, 2:10] = True  # bar
    image[10:20, 5] = True  # vertical line
    image[19, 6:12] = True  # touching it: same component (an L)
    image[25, 30] = image[26, 31] = image[27, 32] = True  # a diagonal: 8-connected
    image[8:12, 30:34] = True
    image[8:12, 36:38] = True  # separate square
    comps = connected_components(image)
    boxes = sorted(zip(comps["top"], comps["bottom"], comps["left"], comps["right"], comps["area"]))
    assert boxes == [(2, 4, 2, 9, 24), (8, 11, 30, 33, 16), (8, 11, 36, 37, 8), (10, 19, 5, 11, 16), (25, 27, 30, 32, 3)]


