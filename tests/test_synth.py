"""Tests for the synthetic data: the symbol ink bank, generator A (substitution), the mix of A and B
in `SyntheticExpressions`, the training dataset that draws them, and the unseen-formula selection slice.

All on the real CROHME training set (`crohme_real`, prepared once per session); skipped with a reason
when ../shared/crohme is absent. Generator B's own tests are in test_compose.py.
"""

from collections import Counter

import numpy as np
import pytest

from data_scripts.inkml import INK_SYMBOLS
from modeling_hmer.latex import normalize


@pytest.fixture(scope="module")
def train_split(crohme_real):
    return crohme_real.as_dataset("train")


@pytest.fixture(scope="module")
def parts(train_split):
    """(training part, held-out slice) row indices of the unseen-formula slice, as train.py selects them."""
    from train.data import select_heldout

    return select_heldout(train_split, 500, "unseen")


@pytest.fixture(scope="module")
def synthetic(train_split, parts):
    """Generators A and B over the whole training part (the bank takes about half a minute)."""
    from data_scripts.synth import SyntheticExpressions

    return SyntheticExpressions(train_split, parts[0])


def _writer_keys(dataset, indices=None):
    from train.data import writer_groups

    part = dataset if indices is None else dataset.select(indices)
    return writer_groups(part["name"], part["source"], part["writer"])


# ----------------------------------------------------------------------------- the selection slice


def test_unseen_slice_has_new_writers_and_new_formulas_like_the_test_sets(train_split, parts):
    train, heldout = parts
    assert len(heldout) == 500 and not set(train) & set(heldout)
    writers = _writer_keys(train_split)
    formulas = [" ".join(tokens) for tokens in train_split["tokens"]]
    train_writers = {writers[i] for i in train}
    train_formulas = {formulas[i] for i in train}
    assert not {writers[i] for i in heldout} & train_writers
    overlap = sum(formulas[i] in train_formulas for i in heldout) / len(heldout)
    assert overlap <= 0.05  # the test sets: 3%
    # The rest of the held-out writers' rows (formulas also written in training) are in neither part.
    unused = set(range(train_split.num_rows)) - set(train) - set(heldout)
    assert all(writers[i] not in train_writers for i in unused)
    assert len(train) > 7_500


def test_unseen_slice_is_fixed_and_reproduced_by_the_evaluation(train_split, parts, tmp_path):
    import json

    from train.data import select_heldout
    from train.evaluate_model import heldout_settings

    assert select_heldout(train_split, 500, "unseen") == parts
    (tmp_path / "training_log.json").write_text(json.dumps({"config": {"heldout_size": 500, "heldout_by": "unseen"}}))
    assert heldout_settings(str(tmp_path)) == (500, "unseen")


def test_unseen_split_rules_on_a_small_example():
    from train.data import unseen_formula_split

    # Writer w2 writes a formula that w1 also writes: if w2 is held out, that row is unusable.
    names = ["a", "b", "c", "d", "e", "f"]
    groups = ["w1", "w1", "w2", "w2", "w3", "w3"]
    formulas = ["x", "y", "x", "z", "u", "v"]
    train, heldout = unseen_formula_split(names, groups, formulas, 2)
    held_groups = {groups[i] for i in heldout}
    assert not held_groups & {groups[i] for i in train}
    assert not {formulas[i] for i in heldout} & {formulas[i] for i in train}
    # Every writer writes the same formula: only holding out everyone makes it unseen.
    with pytest.raises(ValueError, match="no training rows"):
        unseen_formula_split(["a", "b", "c"], ["w1", "w2", "w3"], ["x", "x", "x"], 2)


# ----------------------------------------------------------------------------- the bank


def test_bank_holds_every_training_symbol_and_no_heldout_or_test_writer(crohme_real, train_split, parts, synthetic):
    bank = synthetic.bank
    train, heldout = parts
    training_symbols = sum(len(symbols) for symbols in train_split.select(train)["symbols"])
    assert len(bank) == training_symbols
    assert set(bank.labels) <= INK_SYMBOLS and len(bank.labels) >= 100
    assert set(bank.writers) <= set(_writer_keys(train_split, train))
    assert not set(bank.writers) & set(_writer_keys(train_split, heldout))
    names = {key.split("/", 1)[1] for key in bank.writers}
    for split in ("test_2014", "test_2016"):
        assert not names & set(crohme_real.as_dataset(split)["writer"])


def test_bank_places_symbols_on_their_line(synthetic):
    geometry = synthetic.bank.geometry
    # A descender hangs below the line, a prime floats above, a digit sits on it.
    assert geometry["g"].center > 0.2 and geometry["y"].center > 0.2
    assert geometry["\\prime"].center < -0.4
    assert abs(geometry["7"].center) < 0.15 and abs(geometry["2"].center) < 0.15
    # Digits are about as tall as one another, whatever share of them are exponents.
    assert geometry["2"].height == pytest.approx(geometry["7"].height, rel=0.2)
    assert geometry["\\int"].height > 2 * geometry["x"].height
    ink = synthetic.bank.sample("g", np.random.default_rng(0))
    assert ink.on_line and ink.label == "g"
    left, top, right, bottom = ink.box
    assert left == pytest.approx(0, abs=1e-5) and bottom > 0.3  # below the line's centre


# ----------------------------------------------------------------------------- generator A


def test_substitution_renames_consistently_and_changes_exactly_those_tokens(synthetic):
    from data_scripts.substitute import RENAME_CLASSES

    class_of = {label: name for name, members in RENAME_CLASSES.items() for label in members}
    rng = np.random.default_rng(1)
    made = 0
    for position in range(0, 3000, 10):
        sample = synthetic.substitution(rng, synthetic.indices[position])
        if sample is None:
            continue
        made += 1
        old = synthetic.rows[position]["tokens"]
        new = sample.tokens
        assert len(new) == len(old)
        mapping = {}
        for a, b in zip(old, new):
            if a != b:
                assert class_of[a] == class_of[b]  # renamed within its class
            assert mapping.setdefault(a, b) == b  # every occurrence alike
        assert len(set(mapping.values())) == len(mapping)  # distinct symbols stay distinct
        assert normalize(" ".join(new)) == new
        assert all(np.isfinite(s).all() and len(s) for s in sample.strokes)
    assert made >= 200


def test_a_renamed_symbol_takes_the_old_ones_place(synthetic):
    from data_scripts.substitute import substitute

    # x^2 + 1 of a real row: rename everything renamable and compare the boxes symbol by symbol.
    rng = np.random.default_rng(3)
    checked = 0
    for position in range(400):
        row = synthetic.rows[position]
        if len(row["symbols"]) < 3:
            continue
        made = substitute(row["strokes"], row["symbols"], row["tokens"], synthetic.writers[position],
                          synthetic.bank, rng, rename_probability=1.0, restyle_probability=0.0)
        if made is None:
            continue
        points = np.concatenate([np.asarray(s) for s in row["strokes"]])
        new_points = np.concatenate(made[0])
        height = np.ptp(points[:, 1])
        # Same place on the page: the expression's vertical extent and position barely move.
        assert abs(np.median(new_points[:, 1]) - np.median(points[:, 1])) < 0.35 * height
        assert np.ptp(new_points[:, 1]) < 2.0 * height
        checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------- A and B together


def test_two_thousand_samples_are_valid_and_render(synthetic):
    from data_scripts.render import render_strokes

    vocabulary = set(INK_SYMBOLS) | {"{", "}", "^", "_", "\\frac"}
    rng = np.random.default_rng(7)
    kinds = Counter()
    for i in range(2000):
        sample = synthetic.sample(rng, synthetic.indices[i % len(synthetic)])
        kinds[sample.kind] += 1
        assert sample.tokens and set(sample.tokens) <= vocabulary, sample.tokens
        assert normalize(" ".join(sample.tokens)) == sample.tokens, sample.tokens
        assert sample.strokes and all(s.ndim == 2 and s.shape[1] == 2 and np.isfinite(s).all() for s in sample.strokes)
        if i % 50 == 0:
            image = synthetic.render(sample, rng)
            assert image.dtype == np.uint8 and image.max() == 255 and min(image.shape) >= 20
    # About half from each generator (A falls back to B on rows whose segmentation disagrees).
    assert 700 <= kinds["substitution"] <= 1100 and kinds["composition"] >= 900


def test_a_composed_sample_standing_in_for_a_row_is_as_long_as_that_row(synthetic, train_split):
    """So that its image fits the batch planned for the row (drawn lengths gave B images 2.9 times the
    pixels of the row they replaced, on average)."""
    rows = synthetic.indices[:300]
    lengths = [len(tokens) for tokens in train_split.select(rows)["tokens"]]
    saved = synthetic.substitution_share, synthetic.match_length
    try:
        synthetic.substitution_share = 0.0  # B only
        composed = {}
        for match_length in (True, False):
            synthetic.match_length = match_length
            rng = np.random.default_rng(11)
            composed[match_length] = [len(synthetic.sample(rng, index).tokens) for index in rows]
    finally:
        synthetic.substitution_share, synthetic.match_length = saved
    close = {m: sum(abs(n - want) <= 2 for n, want in zip(composed[m], lengths)) / len(rows) for m in composed}
    assert close[True] >= 0.9 and close[False] < 0.5, close
    # B's lengths still follow the training part's, matched or not.
    assert abs(np.median(composed[True]) - np.median(lengths)) <= 2


def test_the_same_seed_gives_the_same_sample(synthetic):
    for seed in range(5):
        first = synthetic.sample(np.random.default_rng(seed), synthetic.indices[seed])
        again = synthetic.sample(np.random.default_rng(seed), synthetic.indices[seed])
        assert first.tokens == again.tokens and first.kind == again.kind
        assert all(np.array_equal(a, b) for a, b in zip(first.strokes, again.strokes))
        image = synthetic.render(first, np.random.default_rng(seed))
        assert np.array_equal(image, synthetic.render(again, np.random.default_rng(seed)))


def test_training_dataset_draws_synthetic_samples_deterministically(train_split, parts, synthetic):
    from train.data import HMERTrainDataset

    train = parts[0][:200]
    plain = HMERTrainDataset(train_split, train, augment=True, seed=5)
    mixed = HMERTrainDataset(train_split, train, augment=True, seed=5, synthetic=synthetic, synthetic_share=0.5)
    items = [mixed[(2, position)] for position in range(200)]
    share = sum(item["name"].startswith(("substitution:", "composition:")) for item in items) / 200
    assert 0.35 <= share <= 0.65
    for position, item in enumerate(items[:40]):
        again = mixed[(2, position)]
        assert again["text"] == item["text"] and np.array_equal(again["image"], item["image"])
        if ":" not in item["name"]:  # a real row: exactly what training without synthetic data sees
            assert np.array_equal(item["image"], plain[(2, position)]["image"])
    # Another epoch draws other samples.
    assert [mixed[(3, p)]["text"] for p in range(40)] != [item["text"] for item in items[:40]]
    with pytest.raises(ValueError, match="synthetic_share"):
        HMERTrainDataset(train_split, train, synthetic=synthetic, synthetic_share=1.0)
