"""modeling_hmer.expression_check: handwriting passes, noise / photos / pages of text / specks do not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modeling_hmer import HMERImageProcessor, NotAnExpressionError
from modeling_hmer.expression_check import check_answer, check_ink, ink_statistics, max_new_tokens_for
from test_space import page_of_text, photo


@pytest.fixture(scope="module")
def image_processor():
    return HMERImageProcessor()


def statistics(image_processor, image):
    return ink_statistics(image_processor.ink_map(image), image_processor.to_model_image(image))


@pytest.mark.parametrize("zoom, brush, invert", [(30, 2, False), (60, 4, False), (120, 12, False), (60, 4, True)])
def test_drawn_expressions_pass(image_processor, draw_expression, zoom, brush, invert):
    stats = statistics(image_processor, draw_expression(zoom=zoom, brush=brush, invert=invert))
    check_ink(stats)  # raises if refused
    assert 1 <= stats["pieces"] <= 20 and stats["shaded"] < 0.5


def test_other_pictures_are_refused_with_the_reason(image_processor):
    rng = np.random.default_rng(0)
    cases = {
        "noise": (Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)), "shaded"),
        "photo": (photo(), "shaded"),
        "page of text": (page_of_text(), "separate marks"),
        "tiny": (Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8)), "too small"),
    }
    for name, (image, reason) in cases.items():
        with pytest.raises(NotAnExpressionError, match="this does not look like|too small") as error:
            check_ink(statistics(image_processor, image))
        assert reason in str(error.value), (name, str(error.value))
        assert error.value.statistics  # what was measured comes with the refusal


def test_output_length_follows_the_ink():
    assert max_new_tokens_for({"pieces": 1}) == 36
    assert max_new_tokens_for({"pieces": 10}) == 72
    assert max_new_tokens_for({"pieces": 500}) == 200  # never above the model's own limit
    assert max_new_tokens_for({"pieces": 500}, limit=120) == 120


def test_answers_the_model_is_not_sure_of_are_refused():
    assert check_answer([-0.1, -0.01, 0.0], finished=True) == pytest.approx(-0.11 / 3)
    with pytest.raises(NotAnExpressionError, match="found no end"):
        check_answer([-0.1] * 40, finished=False)
    with pytest.raises(NotAnExpressionError, match="unsure of every symbol"):
        check_answer([-4.6, -4.7, -4.5], finished=True)
