"""Generator B (data_scripts/compose.py) on the real CROHME ink: validity, determinism, layout, lengths.

The bank is built from the first 400 rows of the training part (a module fixture: a few seconds);
the tests skip when the CROHME data folder is absent (`shared_crohme`).
"""

from __future__ import annotations

import numpy as np
import pytest

from data_scripts.compose import FormulaComposer, FormulaGrammar, FormulaLayout, compose_layout, parse_tokens
from data_scripts.render import render_strokes
from modeling_hmer.latex import CROHME_SYMBOLS, normalize


@pytest.fixture(scope="module")
def training(shared_crohme):
    """(bank of 400 training rows, the training part's token lengths)."""
    from data_scripts.crohme import load_crohme
    from data_scripts.ink_bank import InkBank
    from train.data import select_heldout

    dataset = load_crohme(str(shared_crohme), "train")
    train_rows, _ = select_heldout(dataset, 500, "unseen")
    bank = InkBank.from_dataset(dataset, train_rows[:400])
    lengths = [len(tokens) for tokens in dataset.select(train_rows)["tokens"]]
    return bank, lengths


@pytest.fixture(scope="module")
def samples(training):
    bank, lengths = training
    composer = FormulaComposer(bank, lengths)
    rng = np.random.default_rng(0)
    return [composer(rng) for _ in range(2000)]


def test_samples_are_valid(samples):
    vocabulary = set(CROHME_SYMBOLS)
    for strokes, tokens in samples:
        assert tokens and set(tokens) <= vocabulary, tokens
        assert normalize(" ".join(tokens)) == tokens
        assert strokes and all(s.ndim == 2 and s.shape[1] == 2 and len(s) and np.isfinite(s).all() for s in strokes)
    for strokes, tokens in samples[::4]:
        image = render_strokes(strokes)
        assert image.dtype == np.uint8 and image.max() == 255, tokens
        assert image.shape[0] < 1000 and image.shape[1] < 3000, (image.shape, tokens)


def test_symbols_cover_the_bank_with_plausible_frequencies(training, samples):
    bank, _ = training
    counts: dict[str, int] = {}
    for _, tokens in samples:
        for token in tokens:
            counts[token] = counts.get(token, 0) + 1
    written = [label for label in bank.labels if label != "\\prime" or "\\prime" in counts]
    seen = [label for label in written if counts.get(label, 0) > 0]
    assert len(seen) >= 0.9 * len(written), sorted(set(written) - set(seen))
    for structure in ("\\frac", "\\sqrt", "^", "_", "\\sum", "\\int", "\\lim", "\\sin", "(", "="):
        assert counts.get(structure, 0) > 10, structure
    # Common symbols are common, rare ones rare (not uniform over the vocabulary).
    assert counts["x"] > 5 * counts.get("\\Delta", 0) and counts["2"] > 3 * counts.get("9", 0)


def test_lengths_follow_the_training_set(training, samples):
    _, lengths = training
    generated = np.percentile([len(tokens) for _, tokens in samples], [25, 50, 75])
    real = np.percentile(lengths, [25, 50, 75])
    assert abs(generated[1] - real[1]) <= 2, (generated, real)
    assert np.all(np.abs(generated - real) <= 3), (generated, real)


def test_same_seed_same_sample(training):
    bank, lengths = training
    first = [FormulaComposer(bank, lengths)(np.random.default_rng(seed)) for seed in (1, 2)]
    again = [FormulaComposer(bank, lengths)(np.random.default_rng(seed)) for seed in (1, 2)]
    for (strokes, tokens), (strokes_again, tokens_again) in zip(first, again):
        assert tokens == tokens_again
        assert len(strokes) == len(strokes_again)
        assert all(np.array_equal(a, b) for a, b in zip(strokes, strokes_again))
    assert first[0][1] != first[1][1] or not np.array_equal(first[0][0][0], first[1][0][0])


def _symbol_points(strokes, labels, label):
    return np.concatenate([s for s, written in zip(strokes, labels) if written == label])


def test_superscript_is_above_and_right_of_its_base(training):
    bank, _ = training
    layout = FormulaLayout(bank)
    script_heights, line_heights = [], []
    for seed in range(20):
        strokes, labels = layout.layout(["x", "^", "{", "2", "}"], np.random.default_rng(seed))
        x, two = _symbol_points(strokes, labels, "x"), _symbol_points(strokes, labels, "2")
        assert two[:, 0].mean() > x[:, 0].max() - 0.1 * np.ptp(x[:, 0]), seed  # right of the x
        # above: its bottom over the x's bottom, its middle over the x's middle
        assert two[:, 1].max() < x[:, 1].max() and two[:, 1].mean() < x[:, 1].mean(), seed
        script_heights.append(np.ptp(two[:, 1]))
        strokes, labels = layout.layout(["x", "2"], np.random.default_rng(seed))
        line_heights.append(np.ptp(_symbol_points(strokes, labels, "2")[:, 1]))
    # smaller than a 2 on the line (each instance varies, so on average)
    assert np.mean(script_heights) < 0.8 * np.mean(line_heights)


def test_fraction_bar_spans_and_root_covers(training):
    bank, _ = training
    layout = FormulaLayout(bank)
    tokens = normalize("\\frac{a+b}{c} + \\sqrt{x+1}")
    for seed in range(10):
        strokes, labels = layout.layout(tokens, np.random.default_rng(seed))
        groups: dict[str, list[np.ndarray]] = {}
        for s, label in zip(strokes, labels):
            groups.setdefault(label, []).append(s)
        bar = max(groups["-"], key=lambda s: np.ptp(s[:, 0]))
        numerator = np.concatenate(groups["a"] + groups["b"])
        assert bar[:, 0].min() <= numerator[:, 0].min() and bar[:, 0].max() >= numerator[:, 0].max(), seed
        assert numerator[:, 1].max() < bar[:, 1].mean() < np.concatenate(groups["c"])[:, 1].min(), seed
        root = np.concatenate(groups["\\sqrt"])
        radicand = np.concatenate(groups["x"] + groups["1"])
        assert root[:, 0].min() < radicand[:, 0].min() and root[:, 0].max() >= radicand[:, 0].max() - 0.05, seed
        assert root[:, 1].min() < radicand[:, 1].min() and root[:, 1].max() >= radicand[:, 1].max() - 0.2, seed


def test_bad_input_is_refused(training):
    bank, _ = training
    with pytest.raises(ValueError, match="expected"):
        parse_tokens(["x", "^", "2"])
    with pytest.raises(ValueError, match="unexpected"):
        parse_tokens(["x", "}"])
    with pytest.raises(KeyError, match="no ink"):
        compose_layout(["\\notasymbol"], bank, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one"):
        FormulaGrammar(bank.labels, lengths=[0])
