"""The evaluate metric module: figures on hand-computed cases."""
import evaluate
import pytest

from modeling_hmer import exprate


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(exprate.__file__)


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("a", "", 1),
        ("", "a b c", 3),
        ("x ^ { 2 }", "x ^ { 2 }", 0),
        ("x ^ { 2 }", "x _ { 2 }", 1),  # one substitution
        ("\\frac { a } { b }", "\\frac { a } { b } + c", 2),  # two insertions
        ("a b c d", "b c d a", 2),  # delete first, append last
        ("k i t t e n", "s i t t i n g", 3),
    ],
)
def test_edit_distance(a, b, distance):
    assert exprate.edit_distance(a.split(), b.split()) == distance
    assert exprate.edit_distance(b.split(), a.split()) == distance


def test_constructed_set_is_exact(metric):
    references = ["a + b", "x ^ { 2 }", "\\frac { 1 } { 2 }", "y", "a b c d"]
    predictions = [
        "a + b",  # 0 edits
        "x ^ { 3 }",  # 1
        "\\frac { 1 } 2 }",  # 1 (a deleted brace)
        "",  # 1 (y deleted)
        "e f g h i",  # 5
    ]
    scores = metric.compute(predictions=predictions, references=references)
    assert scores["n"] == 5
    assert scores["exprate"] == pytest.approx(1 / 5)
    assert scores["le1"] == pytest.approx(4 / 5)
    assert scores["le2"] == pytest.approx(4 / 5)
    assert scores["le3"] == pytest.approx(4 / 5)
    # 0 + 1 + 1 + 1 + 5 edits over 3 + 5 + 7 + 1 + 4 reference tokens
    assert scores["ser"] == pytest.approx(8 / 20)


def test_token_lists_and_strings_agree(metric):
    refs = ["a + b", "c"]
    preds = ["a - b", "c"]
    as_strings = metric.compute(predictions=preds, references=refs)
    as_lists = metric.compute(predictions=[p.split() for p in preds], references=[r.split() for r in refs])
    assert as_strings == as_lists


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="predictions"):
        exprate.compute_scores(["a"], ["a", "b"])
