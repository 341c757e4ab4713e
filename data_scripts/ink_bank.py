"""A bank of handwritten symbols cut out of CROHME expressions, to write new expressions with.

Every CROHME training file carries its symbol segmentation (the dataset's ``symbols`` column:
each symbol's vocabulary token and the indices of its strokes). `InkBank` keeps every instance
of every symbol with its writer, in *line units*, so that any instance can be set on any line:

* the **unit** of an expression is the height its writer gives a symbol of typical size: each
  symbol votes with its height divided by its label's typical relative height (a ``.`` votes as
  well as a ``7``), and the median vote wins; the **line** is the vertical centre of the
  expression's main line, voted for in the same way with each label's typical offset (so that a
  ``g`` hangs below the line, a ``2`` sits on it and a ``'`` floats above);
* an instance's strokes are stored relative to that line, divided by the unit: x from the
  instance's left edge, y from the line's centre (down positive). An instance written as a
  script or inside a fraction keeps its smaller size and its offset; ``on_line`` tells whether
  it was written at its label's usual size and place on the main line.

Label statistics come from the instances themselves (two rounds of voting), so nothing about
handwriting is hard-coded except which symbols are flat (they have no height to vote with).
Build the bank from the training part only (never from a held-out slice or a test set)::

    bank = InkBank.from_dataset(dataset, train_indices)
    ink = bank.sample("g", rng)                      # a SymbolInk of some writer
    strokes = ink.placed(x=3.0, line=0.0, unit=1.0)   # its strokes on a line of unit 1 at x = 3
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


__all__ = ["FLAT_SYMBOLS", "SymbolInk", "LabelGeometry", "InkBank", "expression_geometry"]

# Symbols whose height says nothing about the writing size (bars, dots, strokes): they do not
# vote for an expression's unit or line.
FLAT_SYMBOLS = frozenset(("-", "=", ".", ",", "\\cdot", "\\ldots", "\\cdots", "'", "\\prime", "\\rightarrow"))


@dataclass
class SymbolInk:
    """One handwritten instance of a symbol, in line units (see the module docstring).

    Attributes:
        label: the vocabulary token (``x``, ``\\sqrt``, ``-``).
        writer: the writer key of the expression it comes from (`train.data.writer_groups`).
        strokes: float32 arrays of shape (N, 2): x from the instance's left edge, y from its
            line's centre, both divided by the expression's unit (y down).
        on_line: written at its label's usual size and offset on the main line.
    """

    label: str
    writer: str
    strokes: list[np.ndarray]
    on_line: bool = True

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the strokes, in line units."""
        points = np.concatenate(self.strokes)
        (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
        return float(left), float(top), float(right), float(bottom)

    def placed(self, x: float, line: float, unit: float, size: float = 1.0) -> list[np.ndarray]:
        """The strokes set on a line: left edge at `x`, its line's centre at y = `line`.

        `unit` is the target line's unit; `size` scales the instance about its line's centre
        (0.6 for a script, say), so that ``placed(x, line, unit, size)`` keeps the instance's
        own offset from the line, shrunk by `size`.
        """
        scale = unit * size
        return [np.column_stack((s[:, 0] * scale + x, s[:, 1] * scale + line)).astype(np.float32) for s in self.strokes]


@dataclass(frozen=True)
class LabelGeometry:
    """A label's typical shape in line units (medians over its instances written on a line).

    height, width: of the instance's box; center: the box's vertical centre minus the line's
    centre (negative: above the line, as a ``'``); count: the instances in the bank.
    """

    height: float
    width: float
    center: float
    count: int


def _boxes(strokes: Sequence[np.ndarray], symbols: Sequence[dict]) -> np.ndarray:
    """(S, 4) left, top, right, bottom of each symbol's strokes, in file units."""
    boxes = np.empty((len(symbols), 4))
    for i, symbol in enumerate(symbols):
        points = np.concatenate([strokes[k] for k in symbol["strokes"]])
        boxes[i, :2], boxes[i, 2:] = points.min(axis=0), points.max(axis=0)
    return boxes


def expression_geometry(
    labels: Sequence[str], boxes: np.ndarray, relative_height: dict[str, float], offset: dict[str, float]
) -> tuple[float, float]:
    """(unit, line) of one expression: the median votes of its non-flat symbols.

    Each symbol votes unit = its height / its label's typical relative height, then line = its
    centre - its label's typical offset * unit. Labels missing from the dicts vote with 1 and 0.
    When every symbol is flat, the unit is the largest box side and the line the middle.
    """
    heights = boxes[:, 3] - boxes[:, 1]
    centers = (boxes[:, 1] + boxes[:, 3]) / 2
    voters = [i for i, label in enumerate(labels) if label not in FLAT_SYMBOLS and heights[i] > 0]
    if not voters:
        extent = np.concatenate([boxes[:, :2], boxes[:, 2:]]).ptp(axis=0)
        return float(max(extent.max(), 1e-6)), float(np.median(centers))
    unit = float(np.median([heights[i] / relative_height.get(labels[i], 1.0) for i in voters]))
    unit = max(unit, 1e-6)
    line = float(np.median([centers[i] - offset.get(labels[i], 0.0) * unit for i in voters]))
    return unit, line


def _main_line_mode(offsets: np.ndarray, heights: np.ndarray) -> tuple[float, float]:
    """(offset, relative height) of a label as written on the main line.

    A ``2`` is written as an exponent about as often as on the line, so medians would fall
    between the two: the offset is the densest 0.2-unit window of offsets (scripts sit higher
    and are fewer), the height the median of the instances in that window.
    """
    order = np.sort(offsets)
    window = 0.2
    counts = np.searchsorted(order, order + window, side="right") - np.arange(len(order))
    start = order[int(np.argmax(counts))]
    inside = (offsets >= start) & (offsets <= start + window)
    return float(np.median(offsets[inside])), max(float(np.median(heights[inside])), 1e-3)


class InkBank:
    """Every instance of every symbol, by label, with its writer (see the module docstring)."""

    def __init__(self, instances: dict[str, list[SymbolInk]], geometry: dict[str, LabelGeometry]):
        self.instances = instances
        self.geometry = geometry
        # Sampling: the instances of each (label, writer), and those written on a main line.
        self._by_writer: dict[tuple[str, str], list[SymbolInk]] = {}
        self._by_writer_on_line: dict[tuple[str, str], list[SymbolInk]] = {}
        self._on_line: dict[str, list[SymbolInk]] = {}
        for label, items in instances.items():
            for ink in items:
                self._by_writer.setdefault((label, ink.writer), []).append(ink)
                if ink.on_line:
                    self._by_writer_on_line.setdefault((label, ink.writer), []).append(ink)
            self._on_line[label] = [ink for ink in items if ink.on_line] or items
        self.writers = sorted({ink.writer for items in instances.values() for ink in items})

    # ------------------------------------------------------------------ building

    @classmethod
    def from_rows(cls, rows: Iterable[dict], rounds: int = 2) -> "InkBank":
        """Builds the bank from rows with ``strokes``, ``symbols`` and ``writer`` (a writer key).

        Rows without symbols are passed over. `rounds` of voting refine the label statistics
        (round 0 votes with every label at relative height 1 and offset 0).
        """
        expressions = []  # (writer, labels, strokes as arrays, boxes)
        for row in rows:
            if not row["symbols"]:
                continue
            strokes = [np.asarray(s, dtype=np.float32).reshape(-1, 2) for s in row["strokes"]]
            symbols = [s for s in row["symbols"] if s["strokes"]]
            if not symbols:
                continue
            labels = [s["label"] for s in symbols]
            expressions.append((row["writer"], labels, strokes, symbols, _boxes(strokes, symbols)))
        if not expressions:
            raise ValueError("no row with a symbol segmentation: the bank would be empty")

        relative_height: dict[str, float] = {}
        offset: dict[str, float] = {}
        for _ in range(rounds + 1):
            heights: dict[str, list[float]] = {}
            offsets: dict[str, list[float]] = {}
            for _, labels, _, _, boxes in expressions:
                unit, line = expression_geometry(labels, boxes, relative_height, offset)
                for label, box in zip(labels, boxes):
                    heights.setdefault(label, []).append((box[3] - box[1]) / unit)
                    offsets.setdefault(label, []).append(((box[1] + box[3]) / 2 - line) / unit)
            for label in heights:
                offset[label], relative_height[label] = _main_line_mode(np.array(offsets[label]), np.array(heights[label]))

        instances: dict[str, list[SymbolInk]] = {}
        widths: dict[str, list[float]] = {}
        for writer, labels, strokes, symbols, boxes in expressions:
            unit, line = expression_geometry(labels, boxes, relative_height, offset)
            for label, symbol, box in zip(labels, symbols, boxes):
                origin = np.array([box[0], line], dtype=np.float32)
                ink_strokes = [(strokes[k] - origin) / unit for k in symbol["strokes"]]
                height = (box[3] - box[1]) / unit
                center = ((box[1] + box[3]) / 2 - line) / unit
                typical = relative_height[label]
                # Flat symbols have no telling height: their offset alone says whether they sit on the line.
                on_line = abs(center - offset[label]) < 0.3 and (
                    label in FLAT_SYMBOLS or abs(height / typical - 1) < 0.35
                )
                instances.setdefault(label, []).append(SymbolInk(label, writer, ink_strokes, bool(on_line)))
                if on_line:
                    widths.setdefault(label, []).append((box[2] - box[0]) / unit)
        geometry = {
            label: LabelGeometry(
                height=relative_height[label],
                width=float(np.median(widths.get(label) or [relative_height[label]])),
                center=offset[label],
                count=len(items),
            )
            for label, items in instances.items()
        }
        return cls(instances, geometry)

    @classmethod
    def from_dataset(cls, dataset, indices: Sequence[int] | None = None) -> "InkBank":
        """The bank of a CROHME `datasets.Dataset`'s rows `indices` (default: all), writers keyed
        as `train.data.writer_groups` keys them. Pass the training part's indices only."""
        from train.data import writer_groups

        part = dataset if indices is None else dataset.select(list(indices))
        columns = part.select_columns(["name", "source", "writer", "strokes", "symbols"])[:]  # one batch read
        writers = writer_groups(columns["name"], columns["source"], columns["writer"])
        rows = (
            {"strokes": strokes, "symbols": symbols, "writer": writer}
            for strokes, symbols, writer in zip(columns["strokes"], columns["symbols"], writers)
        )
        return cls.from_rows(rows)

    # ------------------------------------------------------------------ sampling

    @property
    def labels(self) -> list[str]:
        return sorted(self.instances)

    def __contains__(self, label: str) -> bool:
        return label in self.instances

    def __len__(self) -> int:
        return sum(len(items) for items in self.instances.values())

    def sample(
        self,
        label: str,
        rng: np.random.Generator,
        writer: str | None = None,
        exclude_writer: str | None = None,
        on_line: bool = True,
    ) -> SymbolInk:
        """A random instance of `label`: of `writer` when that writer wrote one, of another writer
        than `exclude_writer` (unless nobody else did); with `on_line`, one written at its usual
        size and place on a main line, whenever the bank holds one."""
        if label not in self.instances:
            raise KeyError(f"no ink for {label!r} in the bank")
        by_writer = self._by_writer_on_line if on_line else self._by_writer
        pool = by_writer.get((label, writer)) if writer is not None else None
        if not pool:
            pool = self._on_line[label] if on_line else self.instances[label]
        for _ in range(8):  # a few draws avoid the excluded writer without filtering thousands of instances
            ink = pool[int(rng.integers(len(pool)))]
            if ink.writer != exclude_writer:
                break
        return ink

    def writers_of(self, labels: Iterable[str]) -> list[str]:
        """Writers who wrote every one of `labels` (to write a whole expression in one hand)."""
        wanted = set(labels)
        return [w for w in self.writers if all((label, w) in self._by_writer for label in wanted)]
