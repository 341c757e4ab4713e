"""Read one CROHME InkML file: the expression's LaTeX truth and its pen strokes.

The reader is tolerant of every CROHME sub-corpus (see ../shared/crohme/README.md):

* the truth is the root's own ``<annotation type="truth">``; symbol-level trace groups carry
  annotations of the same type and are ignored; the root's ``<annotation type="writer">`` names
  the writer (every CROHME sub-corpus has one except MathBrush);
* the truth may be wrapped in ``$...$`` (the closing ``$`` is sometimes missing) or bare and
  padded with spaces: :attr:`InkExpression.latex` holds it without the ``$`` and the padding;
* traces hold 2 or 3 channels (``x y`` or ``x y t``), whatever ``<traceFormat>`` declares (81
  MfrDB files declare 3 and store 2; MathBrush declares none); coordinates are integers or floats
  at any scale; only x and y are kept, y pointing down as stored;
* files are UTF-8 or latin-1;
* InkML's compact trace encodings (``!`` explicit, ``'`` first-difference and ``"``
  second-difference values) are decoded, although no CROHME file uses them.

A file that cannot be read raises :class:`InkMLError`, whose short ``reason`` lets a loader
count what it skipped and why.
"""

from __future__ import annotations

import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modeling_hmer.latex import CROHME_SYMBOLS, normalize

__all__ = ["InkExpression", "InkMLError", "InkSymbol", "read_inkml", "parse_trace", "iter_inkml_files", "symbol_token", "INK_SYMBOLS"]


class InkMLError(ValueError):
    """A file that cannot be used; ``reason`` is a short code such as ``"empty file"``."""

    def __init__(self, reason: str, name: str = "", detail: str = ""):
        self.reason = reason
        self.name = name
        message = f"{name}: {reason}" if name else reason
        super().__init__(f"{message} ({detail})" if detail else message)


@dataclass
class InkSymbol:
    """One segmented symbol: its CROHME token and the indices of its strokes in `InkExpression.strokes`."""

    label: str
    strokes: list[int]


@dataclass
class InkExpression:
    """One handwritten expression.

    Attributes:
        name: file name without directory and ``.inkml`` (the CROHME expression id).
        source: sub-corpus (``"HAMEX"``, ``"MfrDB"``, ``"test_2014"``, ...), as the caller names it.
        latex: raw truth as written in the file, without ``$...$`` and surrounding spaces.
        strokes: one float32 array of shape (N, 2) per stroke: x, y in file units, y down.
        writer: the root's writer annotation, stripped (``""`` when the file has none).
        symbols: the symbol segmentation (trace groups), one `InkSymbol` per symbol in file order;
            empty when the file has none that is usable, and then `symbols_error` says why
            (``"no segmentation"``, ``"stroke in two groups"``, ``"label outside vocabulary"``,
            ``"unknown trace"``).
    """

    name: str
    source: str
    latex: str
    strokes: list[np.ndarray] = field(default_factory=list)
    writer: str = ""
    symbols: list[InkSymbol] = field(default_factory=list)
    symbols_error: str = ""


def _local(tag: str) -> str:
    """Tag without its XML namespace: ``{http://www.w3.org/2003/InkML}trace`` -> ``trace``."""
    return tag.rsplit("}", 1)[-1]


def _strip_dollars(truth: str) -> str:
    latex = truth.strip()
    if latex.startswith("$"):
        latex = latex[1:]
        if latex.endswith("$"):  # one 2014 test file (37_em_32) lacks the closing `$`
            latex = latex[:-1]
    return latex.strip()


_ENCODED_VALUE = re.compile(r"""([!'"]?)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[TF?*])""")


def _parse_encoded(text: str, x_index: int, y_index: int) -> np.ndarray:
    """Slow path for traces using InkML value qualifiers (``!``, ``'``, ``"``, ``T``/``F``/``?``/``*``).

    A qualifier sets how that channel's following values are read until the next qualifier:
    explicit values, first differences (velocity) or second differences (acceleration).
    """
    modes: dict[int, str] = {}
    value: dict[int, float] = {}
    velocity: dict[int, float] = {}
    points = []
    for point_text in text.split(","):
        if not point_text.strip():
            continue
        channels = _ENCODED_VALUE.findall(point_text)
        if len(channels) <= max(x_index, y_index):
            continue  # a point without both coordinates
        point = []
        for channel, (qualifier, raw) in enumerate(channels):
            if qualifier:
                modes[channel] = qualifier
            mode = modes.get(channel, "!")
            if raw in "TF?*":  # booleans and unknown / repeated values carry no coordinate
                number = value.get(channel, 0.0) if raw in "?*" else float(raw == "T")
                mode = "!"
            else:
                number = float(raw)
            if mode == "'":
                velocity[channel] = number
                number = value.get(channel, 0.0) + number
            elif mode == '"':
                velocity[channel] = velocity.get(channel, 0.0) + number
                number = value.get(channel, 0.0) + velocity[channel]
            else:
                velocity[channel] = number - value.get(channel, number)
            value[channel] = number
            point.append(number)
        points.append((point[x_index], point[y_index]))
    return np.asarray(points, dtype=np.float32).reshape(-1, 2)


_PLAIN = re.compile(r"[\d\s,.+\-eE]*")


def parse_trace(text: str, x_index: int = 0, y_index: int = 1) -> np.ndarray:
    """Parse the text of one ``<trace>`` into a float32 (N, 2) array of x, y.

    Points are separated by commas and channels by whitespace; only the channels at
    ``x_index`` and ``y_index`` are kept, whatever the number of channels stored.
    """
    text = text or ""
    if _PLAIN.fullmatch(text):
        points = [point for point in text.split(",") if not point.isspace() and point]
        if not points:
            return np.zeros((0, 2), dtype=np.float32)
        widths = {len(point.split()) for point in points}
        width = widths.pop()
        if not widths and width > max(x_index, y_index):
            # numpy's text parser is several times faster than float() per value
            try:
                values = np.fromstring(text.replace(",", " "), sep=" ")
            except ValueError:  # malformed numbers (numpy may also just stop early and warn)
                values = np.zeros(0)
            if values.size == width * len(points):
                return values.reshape(len(points), width)[:, [x_index, y_index]].astype(np.float32)
        # points of unequal width or with bad numbers: keep those with a readable x and y
        rows = []
        for point in points:
            fields = point.split()
            if len(fields) > max(x_index, y_index):
                try:
                    rows.append((float(fields[x_index]), float(fields[y_index])))
                except ValueError:
                    continue
        return np.asarray(rows, dtype=np.float32).reshape(-1, 2)
    return _parse_encoded(text, x_index, y_index)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # MfrDB0104.inkml


_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


def read_inkml(data: bytes, name: str, source: str = "") -> InkExpression:
    """Read one InkML file's bytes.

    Args:
        data: the file's content.
        name: the expression id (file name without ``.inkml``), used in errors and the result.
        source: the sub-corpus, stored in the result.

    Raises:
        InkMLError: with ``reason`` ``"empty file"``, ``"invalid xml"``, ``"not inkml"``,
            ``"no truth"`` or ``"no traces"``.
    """
    if not data or not data.strip():
        raise InkMLError("empty file", name)
    text = _XML_DECLARATION.sub("", _decode(data), count=1)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        raise InkMLError("invalid xml", name, str(error)) from None
    if _local(root.tag) != "ink":
        raise InkMLError("not inkml", name, f"root element <{_local(root.tag)}>")

    truth = None
    writer = ""
    channel_names: list[str] = []
    for child in root:  # only the root's own children: trace groups have truths too
        tag = _local(child.tag)
        if tag == "annotation" and child.get("type") == "truth" and truth is None:
            truth = child.text or ""
        elif tag == "annotation" and child.get("type") == "writer" and not writer:
            writer = (child.text or "").strip()
        elif tag == "traceFormat":
            channel_names = [c.get("name", "") for c in child if _local(c.tag) == "channel"]
    if truth is None or not _strip_dollars(truth):
        raise InkMLError("no truth", name)

    # The declared layout tells where X and Y are; files store X and Y first in any case.
    x_index = channel_names.index("X") if "X" in channel_names else 0
    y_index = channel_names.index("Y") if "Y" in channel_names else 1
    strokes = []
    stroke_of_trace: dict[str, int] = {}  # trace id -> index in `strokes` (empty traces have none)
    for element in root.iter():
        if _local(element.tag) != "trace":
            continue
        stroke = parse_trace(element.text or "", x_index, y_index)
        if len(stroke) == 0 and (x_index, y_index) != (0, 1):
            stroke = parse_trace(element.text or "")  # declared layout disagrees with stored
        if len(stroke):
            trace_id = _element_id(element)
            if trace_id is not None:
                stroke_of_trace[trace_id] = len(strokes)
            strokes.append(stroke)
    if not strokes:
        raise InkMLError("no traces", name)
    symbols, symbols_error = _read_symbols(root, stroke_of_trace)
    return InkExpression(
        name=name,
        source=source,
        latex=_strip_dollars(truth),
        strokes=strokes,
        writer=writer,
        symbols=symbols,
        symbols_error=symbols_error,
    )


def _element_id(element: ET.Element) -> str | None:
    """An element's ``xml:id`` (CROHME) or plain ``id`` attribute."""
    return element.get("{http://www.w3.org/XML/1998/namespace}id", element.get("id"))


def symbol_token(label: str) -> str | None:
    """The vocabulary token of a trace group's label (``\\lt`` -> ``<``, ``COMMA`` -> ``,``), or None.

    A label is usable when `modeling_hmer.latex.normalize` turns it into exactly one CROHME symbol.
    """
    label = _LABEL_ALIASES.get(label.strip(), label.strip())
    if label in INK_SYMBOLS:  # `\\sqrt` alone normalizes to `\\sqrt { }`
        return label
    tokens = normalize(label) if label else []
    if len(tokens) == 1 and tokens[0] in INK_SYMBOLS:
        return tokens[0]
    return None


# Trace-group labels that CROHME spells by name rather than in LaTeX.
_LABEL_ALIASES = {"COMMA": ",", "\\lbrace": "\\{", "\\rbrace": "\\}"}


# Labels of the group that holds the symbol groups, not a symbol.
_CONTAINER_LABELS = frozenset(("Segmentation", "From ITF"))

# The vocabulary tokens that are written as ink (structure tokens never are; a fraction bar is `-`).
INK_SYMBOLS = frozenset(CROHME_SYMBOLS) - {"{", "}", "^", "_", "\\limits", "\\frac"}


def _read_symbols(root: ET.Element, stroke_of_trace: dict[str, int]) -> tuple[list[InkSymbol], str]:
    """The symbol-level trace groups: every ``traceGroup`` with a truth label and trace views.

    Returns (symbols, "") or ([], reason) when the segmentation is missing or unusable.
    """
    symbols: list[InkSymbol] = []
    used: set[int] = set()
    for group in root.iter():
        if _local(group.tag) != "traceGroup":
            continue
        label = None
        refs = []
        nested = False
        for child in group:  # the group's own label and traces, not those of nested groups
            tag = _local(child.tag)
            if tag == "annotation" and child.get("type") == "truth" and label is None:
                label = (child.text or "").strip()
            elif tag == "traceView":
                refs.append(child.get("traceDataRef"))
            elif tag == "traceGroup":
                nested = True
        if nested or not refs or label is None or label in _CONTAINER_LABELS:
            continue  # the root "Segmentation" group holds the symbol groups
        token = symbol_token(label)
        if token is None:
            return [], "label outside vocabulary"
        indices = []
        for ref in refs:
            if ref not in stroke_of_trace:
                return [], "unknown trace"
            index = stroke_of_trace[ref]
            if index in used:
                return [], "stroke in two groups"
            used.add(index)
            indices.append(index)
        symbols.append(InkSymbol(token, sorted(indices)))
    if not symbols:
        return [], "no segmentation"
    return symbols, ""


def iter_inkml_files(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative_path, bytes)`` for every ``.inkml`` in a folder or a ``.tar``/``.tar.gz``.

    Archive members are read in archive order without extracting anything to disk; folders are
    walked in sorted order. Relative paths use ``/`` (``TrainINKML/MfrDB/MfrDB0001.inkml``).
    """
    path = Path(path)
    if path.is_dir():
        for file in sorted(path.rglob("*.inkml")):
            yield file.relative_to(path.parent).as_posix(), file.read_bytes()
        return
    if not path.exists():
        raise FileNotFoundError(f"no InkML folder or archive at {path}")
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".inkml"):
                handle = archive.extractfile(member)
                yield member.name.removeprefix("./"), handle.read() if handle else b""
