"""Generator A, substitution: new formulas from real training expressions, in CROHME's own ink.

A real expression keeps its layout (the writer's own spacing, scripts, fractions and roots)
while symbols are renamed *consistently* within classes whose members take the same room on a
line (digits; short, tall and descending lowercase letters; capitals; Greek letters of each
shape; ``+ - \\times \\div \\pm``; relations; ``\\sin \\cos \\tan \\log``): every ``x`` becomes a
``b``, say, and every ``2`` a ``7``. Each renamed symbol is written with another writer's
instance (from `data_scripts.ink_bank.InkBank`) fitted to the old one's place: the same relative
size, the same line, the same left edge; ink to its right moves over by the change in width,
and a fraction bar or root sign over it stretches with it. Optionally every symbol is rewritten
in the other writer's hand (``restyle``), renamed or not. The LaTeX changes at exactly the
renamed tokens.

Only expressions whose segmentation agrees with their tokens can be used (`symbol_tokens`: the
same multiset of symbols, 95.6% of the training set); a ``-`` is never renamed in an expression
with a ``\\frac`` (its ink does not say which ``-`` is the bar). A result that the normalizer
would read differently (renamed letters spelling ``s i n``, say) is refused: `substitute`
returns None and the caller draws again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from modeling_hmer.latex import normalize

from .ink_bank import FLAT_SYMBOLS, InkBank, expression_geometry


__all__ = ["RENAME_CLASSES", "symbol_tokens", "substitute"]

# Symbols that can stand in for each other without changing the layout.
RENAME_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": tuple("0123456789"),
    "short lowercase": tuple("acemnorsuvwxz"),
    "tall lowercase": tuple("bdhklt"),
    "descending lowercase": tuple("gpqy"),
    "dotted lowercase": ("i", "j"),
    "capitals": tuple("ABCEFGHILMNPRSTVXY"),
    "short greek": ("\\alpha", "\\pi", "\\sigma"),
    "tall greek": ("\\beta", "\\theta", "\\lambda", "\\Delta"),
    "descending greek": ("\\gamma", "\\mu"),
    "operators": ("+", "-", "\\times", "\\div", "\\pm"),
    "relations": ("=", "<", ">", "\\leq", "\\geq", "\\neq"),
    "functions": ("\\sin", "\\cos", "\\tan", "\\log"),
}
# Renaming an operator or a relation changes what the formula says more than renaming a letter
# does; it is done less often.
CLASS_WEIGHT = {"operators": 0.4, "relations": 0.4}
_CLASS_OF = {label: name for name, members in RENAME_CLASSES.items() for label in members}
# Tokens that are structure, not ink; `\frac` is written as its bar, a `-`.
_STRUCTURE = frozenset(("{", "}", "^", "_", "\\limits"))
# Ink that spans what is written under or over it, and stretches with it.
_SPANNING = frozenset(("-", "\\sqrt"))


def symbol_tokens(tokens: Sequence[str]) -> Counter:
    """The multiset of written symbols of a canonical token list (``\\frac`` counts as its bar ``-``)."""
    return Counter("-" if token == "\\frac" else token for token in tokens if token not in _STRUCTURE)


def _rename_map(labels: Sequence[str], tokens: Sequence[str], bank: InkBank, rng, probability: float) -> dict[str, str]:
    """A consistent renaming: per class present, with `probability`, distinct labels -> distinct labels."""
    present: dict[str, list[str]] = {}
    for label in dict.fromkeys(labels):  # first-seen order, so the draw is deterministic
        name = _CLASS_OF.get(label)
        if name is None or (label == "-" and "\\frac" in tokens):
            continue
        present.setdefault(name, []).append(label)
    mapping = {}
    for name, sources in present.items():
        if rng.random() >= probability * CLASS_WEIGHT.get(name, 1.0):
            continue
        members = [m for m in RENAME_CLASSES[name] if m in bank]
        if "\\frac" in tokens:
            members = [m for m in members if m != "-"]  # a new `-` would look like another bar
        # Targets must not collide with labels of the class that stay as they are.
        kept = {label for label in labels if _CLASS_OF.get(label) == name and label not in sources}
        members = [m for m in members if m not in kept]
        if len(members) < len(sources):
            continue
        targets = [members[i] for i in rng.permutation(len(members))[: len(sources)]]
        mapping.update({s: t for s, t in zip(sources, targets) if s != t})
    return mapping


def _box(strokes: Sequence[np.ndarray]) -> np.ndarray:
    points = np.concatenate(strokes)
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def substitute(
    strokes: Sequence[np.ndarray],
    symbols: Sequence[dict],
    tokens: Sequence[str],
    writer: str,
    bank: InkBank,
    rng: np.random.Generator,
    rename_probability: float = 0.7,
    restyle_probability: float = 0.3,
) -> tuple[list[np.ndarray], list[str]] | None:
    """One substituted variant of a real expression, or None when it cannot be made.

    Args:
        strokes: the expression's strokes, (N, 2) arrays in file units (y down).
        symbols: its segmentation, ``{"label", "strokes"}`` dicts (the dataset's ``symbols``).
        tokens: its canonical tokens (the dataset's ``tokens``).
        writer: its writer key, so that replacements come from other writers.
        bank: the ink bank of the training part.
        rng: the random generator; the same state gives the same result.
        rename_probability: chance that each class present is renamed.
        restyle_probability: chance that every symbol is rewritten in the donor writer's hand.

    Returns:
        (strokes, tokens): new float32 (N, 2) strokes in the expression's units and the new
        canonical tokens; None when the segmentation disagrees with the tokens, when nothing
        would change, or when the new tokens would not survive `normalize` unchanged.
    """
    tokens = list(tokens)
    labels = [symbol["label"] for symbol in symbols]
    if not symbols or Counter(labels) != symbol_tokens(tokens):
        return None
    mapping = _rename_map(labels, tokens, bank, rng, rename_probability)
    restyle = rng.random() < restyle_probability
    if not mapping and not restyle:
        return None
    new_tokens = [mapping.get(token, token) for token in tokens]
    if normalize(" ".join(new_tokens)) != new_tokens:
        return None

    strokes = [np.asarray(s, dtype=np.float32).reshape(-1, 2) for s in strokes]
    pieces = [[strokes[k] for k in symbol["strokes"]] for symbol in symbols]
    in_symbol = {k for symbol in symbols for k in symbol["strokes"]}
    loose = [strokes[k] for k in range(len(strokes)) if k not in in_symbol]  # ink outside every group
    boxes = np.stack([_box(piece) for piece in pieces])
    geometry = bank.geometry
    heights = {label: g.height for label, g in geometry.items()}
    centers = {label: g.center for label, g in geometry.items()}
    unit, line = expression_geometry(labels, boxes, heights, centers)

    donor_choices = [w for w in bank.writers if w != writer]
    donor = donor_choices[int(rng.integers(len(donor_choices)))] if donor_choices else None
    for i in np.argsort(boxes[:, 0], kind="stable").tolist():
        old, new = labels[i], mapping.get(labels[i], labels[i])
        if old == new and not restyle:
            continue
        left, top, right, bottom = _box(pieces[i])
        typical = geometry.get(old)
        if typical is None or new not in bank:
            continue
        ink = bank.sample(new, rng, writer=donor, exclude_writer=writer)
        if new == old and (old in FLAT_SYMBOLS or old in _SPANNING):
            placed = _fit_box(ink.strokes, (left, top, right, bottom))  # a bar keeps its length, a root its cover
        else:
            # The old symbol's size relative to its label's usual size (a script is smaller).
            if old in FLAT_SYMBOLS:
                size = (right - left) / unit / max(typical.width, 1e-3)
            else:
                size = (bottom - top) / unit / max(typical.height, 1e-3)
            size = float(np.clip(size, 0.3, 2.5))
            local_line = (top + bottom) / 2 - typical.center * unit * size
            placed = ink.placed(x=float(left), line=float(local_line), unit=unit, size=size)
        new_box = _box(placed)
        delta = float((new_box[2] - new_box[0]) - (right - left))
        pieces[i] = placed
        if abs(delta) > 1e-6:
            _make_room(pieces, loose, labels, i, left, right, delta)
    out = [s.astype(np.float32) for piece in pieces for s in piece] + [s.astype(np.float32) for s in loose]
    return out, new_tokens


def _fit_box(strokes: Sequence[np.ndarray], box: tuple[float, float, float, float]) -> list[np.ndarray]:
    """Strokes scaled and moved onto `box` (left, top, right, bottom); a flat side stays flat."""
    source = _box(strokes)
    extent = np.maximum(source[2:] - source[:2], 1e-6)
    target = np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float64)
    scale = target / extent
    # A bar's height is pen noise: never stretch it more than its length is stretched.
    scale[1] = min(scale[1], scale[0]) if target[1] < 0.2 * target[0] else scale[1]
    offset = np.array(box[:2]) + (target - extent * scale) / 2
    return [((s - source[:2]) * scale + offset).astype(np.float32) for s in strokes]


def _make_room(pieces: list, loose: list, labels: Sequence[str], changed: int, left: float, right: float, delta: float) -> None:
    """Moves the ink right of a replaced symbol by `delta` and stretches bars and roots over it."""
    middle = (left + right) / 2
    for j, piece in enumerate(pieces):
        if j == changed:
            continue
        box = _box(piece)
        if box[0] >= middle:
            pieces[j] = [s + np.array([delta, 0], dtype=np.float32) for s in piece]
        elif labels[j] in _SPANNING and box[0] <= left and box[2] >= right and box[2] > box[0]:
            factor = (box[2] - box[0] + delta) / (box[2] - box[0])
            pieces[j] = [np.column_stack((box[0] + (s[:, 0] - box[0]) * factor, s[:, 1])).astype(np.float32) for s in piece]
    for k, stroke in enumerate(loose):
        if stroke[:, 0].min() >= middle:
            loose[k] = stroke + np.array([delta, 0], dtype=np.float32)
