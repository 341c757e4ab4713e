"""The image-to-LaTeX pipeline (modeling_hmer/pipeline_hmer.py) with the tiny random model, and its helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_hmer import (
    BlankImageError,
    HMERForConditionalGeneration,
    HMERImageToLatexPipeline,
    HMERProcessor,
    InvalidImageError,
    ModelNotFoundError,
    attention_heatmap,
    resolve_model,
)


@pytest.fixture(scope="module")
def reader(tiny_model_dir):
    torch.set_num_threads(1)
    return pipeline("image-to-latex", model=str(tiny_model_dir), max_new_tokens=6)


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
