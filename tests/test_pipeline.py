"""The image-to-LaTeX pipeline (modeling_hmer/pipeline_hmer.py) with the tiny random model, and its helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from conftest import TEST_MODEL_LIMITS
from modeling_hmer import (
    BlankImageError,
    DamagedImageError,
    HMERForConditionalGeneration,
    HMERImageToLatexPipeline,
    HMERProcessor,
    ImageTooLargeError,
    InvalidImageError,
    ModelNotFoundError,
    NotAnExpressionError,
    attention_heatmap,
    resolve_model,
)
from modeling_hmer.pipeline_hmer import affordable_beams


@pytest.fixture(scope="module")
def reader(tiny_model_dir):
    """The random model: no answer of it is a reading (unsure, and unfinished in 6 tokens), so the expression
    check is off here; the tests at the end check it with models made sure of their tokens."""
    torch.set_num_threads(1)
    return pipeline("image-to-latex", model=str(tiny_model_dir), max_new_tokens=6, check_expression=False)


@pytest.fixture(scope="module")
def checked(space_model_dir):
    """A reader with the expression check on, over a model that finishes every answer (3 tokens), and a log of
    the `generate` calls it makes."""
    reader = pipeline("image-to-latex", model=str(space_model_dir), answer_limits=TEST_MODEL_LIMITS)
    generate, reader.generate_calls = reader.model.generate, []

    def logged(*args, **kwargs):
        reader.generate_calls.append(kwargs)
        return generate(*args, **kwargs)

    reader.model.generate = logged
    return reader


@pytest.fixture(scope="module")
def drawing(draw_expression, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "drawing.png"
    draw_expression(zoom=50).save(path)
    return path


def test_registered_task_gives_the_hmer_pipeline(reader):
    assert isinstance(reader, HMERImageToLatexPipeline)


def test_every_input_kind_reads_the_same(reader, drawing, tiny_model_dir):
    image = Image.open(drawing)
    inputs = [str(drawing), drawing, image, np.asarray(image), drawing.read_bytes(), torch.from_numpy(np.array(image))]
    latex = {reader(x, num_beams=2)["latex"] for x in inputs}
    assert len(latex) == 1
    # the same as the model used directly
    model = HMERForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    processor = HMERProcessor.from_pretrained(tiny_model_dir)
    ids = model.generate(**processor(images=image), num_beams=2, max_new_tokens=6)
    assert latex == {processor.batch_decode(ids)[0]}


def test_batches_read_each_image_as_alone(reader, draw_expression):
    images = [draw_expression(zoom=z) for z in (30, 50, 70)]
    alone = [reader(image, num_beams=3) for image in images]
    for batch_size in (1, 2):
        batched = reader(images, num_beams=3, batch_size=batch_size)
        assert [r["latex"] for r in batched] == [r["latex"] for r in alone]
        assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in alone], abs=1e-4)


def test_output_fields(reader, drawing):
    result = reader(str(drawing), num_beams=4, return_attentions=True)
    candidates = result["candidates"]
    assert 1 <= len(candidates) <= 4 and len({c["latex"] for c in candidates}) == len(candidates)
    assert candidates[0]["latex"] == result["latex"] and result["share"] == candidates[0]["share"]
    assert sum(c["share"] for c in candidates) == pytest.approx(1.0)
    assert [c["score"] for c in candidates] == sorted((c["score"] for c in candidates), reverse=True)
    for candidate in candidates:
        assert " ".join(candidate["tokens"]) == candidate["latex"]
        assert len(candidate["token_probabilities"]) == len(candidate["tokens"])
        assert all(0.0 < p <= 1.0 for p in candidate["token_probabilities"])
    maps, model_input = result["attentions"], result["model_input"]
    assert maps.shape == (len(result["tokens"]), *model_input.shape)
    assert model_input.dtype == np.float32 and 0.0 <= model_input.min() and model_input.max() <= 1.0
    if len(maps):
        assert np.allclose(maps.reshape(len(maps), -1).max(1), 1.0)
        picture = attention_heatmap(model_input, maps[0], scale=2)
        assert picture.mode == "RGB" and picture.size == (2 * model_input.shape[1], 2 * model_input.shape[0])
    assert "attentions" not in reader(str(drawing))


def test_bad_images_raise_one_error_type(reader, tmp_path):
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 80), 255).save(blank)
    with pytest.raises(BlankImageError):
        reader(str(blank))
    with pytest.raises(BlankImageError):
        reader(Image.new("RGBA", (300, 100), (0, 0, 0, 0)))  # an untouched transparent sketch pad
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    for bad in (str(text), b"\x89PNG but not really", str(tmp_path / "missing.png"), np.zeros((5, 5, 7))):
        with pytest.raises(InvalidImageError) as error:
            reader(bad)
        assert not isinstance(error.value, BlankImageError) and str(error.value)
    assert issubclass(BlankImageError, InvalidImageError) and issubclass(InvalidImageError, ValueError)


def test_resolve_model(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model(None, [tmp_path / "absent", tiny_model_dir]) == str(tiny_model_dir)
    assert resolve_model("someone/hmer-crohme") == "someone/hmer-crohme"  # named: a Hub id
    with pytest.raises(ModelNotFoundError, match="no trained model in .*do this"):
        resolve_model(None, [tmp_path / "absent"], "do this")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    for not_an_id in (str(tmp_path / "a" / "b"), "./model", "a/b/c", "~/model", "bad id!"):
        with pytest.raises(ModelNotFoundError, match="neither a model folder nor a Hub id"):
            resolve_model(not_an_id)


def test_open_image_limits_and_orientation(tmp_path):
    from modeling_hmer import open_image

    big = tmp_path / "big.png"
    Image.new("L", (3000, 2000), 255).save(big)
    from modeling_hmer.pipeline_hmer import ImageTooLargeError

    with pytest.raises(ImageTooLargeError, match="megapixels"):
        open_image(big, max_pixels=5_000_000)
    assert open_image(big, max_pixels=6_000_000).size == (3000, 2000)
    photo = Image.new("RGB", (60, 20), (255, 255, 255))
    exif = photo.getexif()
    exif[0x0112] = 6  # taken sideways: rotate 90 degrees to show it upright
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", exif=exif)
    assert open_image(buffer.getvalue()).size == (20, 60)


def test_open_image_file_limits_and_damaged_files(tmp_path, draw_expression):
    from modeling_hmer import open_image

    drawing = tmp_path / "drawing.png"
    draw_expression().save(drawing)
    size = drawing.stat().st_size
    with pytest.raises(ImageTooLargeError, match="MB") as error:
        open_image(drawing, max_bytes=size - 1)
    assert error.value.file_bytes == size and error.value.size is None
    with pytest.raises(ImageTooLargeError):
        open_image(drawing.read_bytes(), max_bytes=size - 1)
    assert open_image(drawing, max_bytes=size).size == Image.open(drawing).size
    cut = tmp_path / "cut.png"
    cut.write_bytes(drawing.read_bytes()[: size * 6 // 10])
    with pytest.raises(DamagedImageError, match="damaged or cut short") as error:
        open_image(cut)
    assert error.value.format == "PNG" and error.value.reason
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(InvalidImageError) as error:
        open_image(text)
    assert type(error.value) is InvalidImageError


# ------------------------------------------------------------------------------------------------
# The expression check: "is this handwriting?", in the pipeline for every caller


def noise_picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8))


def test_noise_is_refused_by_type_before_decoding(checked):
    before = len(checked.generate_calls)
    for picture, reason in ((noise_picture(), "shaded like a photo"), (noise_picture().crop((0, 0, 5, 5)), "too small")):
        with pytest.raises(NotAnExpressionError, match=reason) as error:
            checked(picture)
        assert isinstance(error.value, InvalidImageError) and error.value.statistics
    assert len(checked.generate_calls) == before, "a refused picture reached the decoder"


def test_decoding_is_bounded_by_the_ink(checked, draw_expression):
    drawing = draw_expression()
    result = checked(drawing, num_beams=2, max_new_tokens=500)
    bound = checked.generate_calls[-1]["max_new_tokens"]
    _, ink = checked.processor.check_image(drawing)
    assert bound == checked.processor.max_new_tokens_for(ink, 500) < 100  # a few tokens per piece of ink
    assert result["latex"] and result["num_beams"] == 2
    checked(drawing, num_beams=2, max_new_tokens=500, check_expression=False)
    assert checked.generate_calls[-1]["max_new_tokens"] == 500  # unchecked: the limit asked for


def test_check_expression_false_reads_anything(checked):
    result = checked(noise_picture(), check_expression=False)
    assert len(result["tokens"]) == 3 and result["latex"]


def test_blank_picture_raises_blank_image_error_checked_or_not(checked):
    for check in (True, False):
        with pytest.raises(BlankImageError):
            checked(Image.new("L", (400, 200), 255), check_expression=check)


def test_answers_that_are_no_reading_are_refused(checked, endless_model_dir, space_model_dir, draw_expression):
    drawing = draw_expression()
    endless = pipeline("image-to-latex", model=str(endless_model_dir), num_beams=2)
    with pytest.raises(NotAnExpressionError, match="the model found no end"):
        endless(drawing)
    assert len(endless(drawing, check_expression=False)["tokens"]) == 8  # read to the model's limit
    # Under the default limits the test model is unsure of every token it writes before its forced eos.
    unsure = pipeline("image-to-latex", model=str(space_model_dir))
    with pytest.raises(NotAnExpressionError, match="unsure of every symbol"):
        unsure(drawing)
    assert unsure(drawing, answer_limits=TEST_MODEL_LIMITS)["latex"] == checked(drawing)["latex"]


def test_batches_check_each_image_as_alone(checked, draw_expression):
    images = [draw_expression(zoom=30), draw_expression(zoom=60)]
    assert [r["latex"] for r in checked(images, batch_size=2)] == [checked(image)["latex"] for image in images]
    with pytest.raises(NotAnExpressionError):
        checked([images[0], noise_picture()], batch_size=2)


def test_processor_without_the_check_reads_anything(checked, monkeypatch):
    """Models saved before the check existed: their processor has no check_image, and nothing is refused."""
    monkeypatch.delattr(type(checked.processor), "check_image")
    assert not checked.checks_expressions
    assert checked(noise_picture())["latex"]


def test_max_decoding_cost_reduces_beams_for_large_pictures(checked, draw_expression):
    assert affordable_beams(10, 200, 1024, 200_000) < 10 and affordable_beams(10, 40, 60, 200_000) == 10
    assert affordable_beams(3, 10_000, 10_000, 1.0) == 1  # never below greedy
    drawing = draw_expression()
    assert checked(drawing, num_beams=5, max_decoding_cost=1e9)["num_beams"] == 5
    reduced = checked(drawing, num_beams=5, num_return_sequences=5, max_decoding_cost=1.0)  # too dear for beams
    assert reduced["num_beams"] == 1 and checked.generate_calls[-1]["num_beams"] == 1
    assert len(reduced["candidates"]) == 1
