"""The InkML reader on small files written here, one per CROHME defect, and on the real archives."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_scripts.inkml import InkMLError, iter_inkml_files, parse_trace, read_inkml

CROHME_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "crohme"

XY = '<traceFormat><channel name="X" type="decimal"/><channel name="Y" type="decimal"/></traceFormat>'
XYT = XY.replace("</traceFormat>", '<channel name="T" type="decimal"/></traceFormat>')
XYF = XY.replace("</traceFormat>", '<channel name="F" type="decimal"/></traceFormat>')


def inkml(truth: str | None, traces: list[str], trace_format: str = XY, extra: str = "",
          declaration: bool = False) -> str:
    head = '<?xml version="1.0" encoding="utf-8"?>\n' if declaration else ""
    truth_xml = f'<annotation type="truth">{truth}</annotation>' if truth is not None else ""
    body = "".join(f'<trace id="{i}">\n{t}\n</trace>' for i, t in enumerate(traces))
    return (f'{head}<ink xmlns="http://www.w3.org/2003/InkML">{trace_format}'
            f'<annotation type="writer">w1</annotation>{extra}{truth_xml}{body}</ink>')


def test_two_channels_integer_coordinates():
    expression = read_inkml(inkml("$x+1$", ["10 20, 11 22, 12 25", "30 40, 31 41"]).encode(), "a", "MfrDB")
    assert (expression.name, expression.source, expression.latex, expression.writer) == ("a", "MfrDB", "x+1", "w1")
    assert len(expression.strokes) == 2
    assert expression.strokes[0].dtype == np.float32 and expression.strokes[0].shape == (3, 2)
    np.testing.assert_array_equal(expression.strokes[0], [[10, 20], [11, 22], [12, 25]])


def test_three_channels_keep_x_and_y():
    expression = read_inkml(inkml("$1$", ["37 98 0, 38 95 16, 40 87 32"], XYT).encode(), "b")
    np.testing.assert_array_equal(expression.strokes[0], [[37, 98], [38, 95], [40, 87]])


def test_declared_three_channels_but_two_stored():
    expression = read_inkml(inkml("$1$", ["37 98, 38 95"], XYF).encode(), "c")
    np.testing.assert_array_equal(expression.strokes[0], [[37, 98], [38, 95]])


def test_no_trace_format_and_bare_padded_truth():
    expression = read_inkml(inkml(" \\sin ^ 2 ( x ) ", ["10710 2338, 10713 2322"], trace_format="").encode(), "d")
    assert expression.latex == "\\sin ^ 2 ( x )"
    np.testing.assert_array_equal(expression.strokes[0], [[10710, 2338], [10713, 2322]])


def test_float_coordinates_keep_their_scale():
    expression = read_inkml(inkml("$\\phi(x)$", ["11.7004 15.5288, 11.6844 15.4766"]).encode(), "e")
    np.testing.assert_allclose(expression.strokes[0], [[11.7004, 15.5288], [11.6844, 15.4766]], rtol=1e-6)


def test_negative_coordinates_and_windows_line_ends():
    expression = read_inkml(inkml("$1$", ["2 72,\r\n -1 79,\r\n -1 85"]).encode(), "f")
    np.testing.assert_array_equal(expression.strokes[0], [[2, 72], [-1, 79], [-1, 85]])


def test_latin1_file():
    text = inkml("$x$", ["1 2, 3 4"], extra='<annotation type="writer">Andr\u00e9</annotation>')
    with pytest.raises(UnicodeDecodeError):
        text.encode("latin-1").decode("utf-8")
    assert read_inkml(text.encode("latin-1"), "g").latex == "x"


def test_xml_declaration_and_entities():
    expression = read_inkml(inkml("$a &lt; b$", ["1 2"], declaration=True).encode(), "h")
    assert expression.latex == "a < b"


@pytest.mark.parametrize("data", [b"", b"   \n"])
def test_empty_file(data):
    with pytest.raises(InkMLError) as caught:
        read_inkml(data, "MfrDB3088")
    assert caught.value.reason == "empty file"
    assert "MfrDB3088" in str(caught.value)


def test_symbol_level_truths_are_ignored():
    # A trace group (placed first here) carries its own truth annotations.
    groups = ('<traceGroup xml:id="9"><annotation type="truth">Segmentation</annotation>'
              '<traceGroup xml:id="10"><annotation type="truth">x</annotation><traceView traceDataRef="0"/>'
              '</traceGroup></traceGroup>')
    expression = read_inkml(inkml("$x^2$", ["1 2, 3 4", "5 6"], extra=groups).encode(), "i")
    assert expression.latex == "x^2"
    # and with no truth of its own the file has no truth, whatever its groups say
    with pytest.raises(InkMLError) as caught:
        read_inkml(inkml(None, ["1 2"], extra=groups).encode(), "j")
    assert caught.value.reason == "no truth"


def test_missing_closing_dollar():
    assert read_inkml(inkml("$a_0+a_1x+\\cdots", ["1 2"]).encode(), "37_em_32").latex == "a_0+a_1x+\\cdots"


@pytest.mark.parametrize(
    "data, reason",
    [
        (inkml("$x$", []).encode(), "no traces"),
        (inkml("$x$", ["", " "]).encode(), "no traces"),
        (inkml("$$", ["1 2"]).encode(), "no truth"),
        (b"<ink><trace>1 2</ink>", "invalid xml"),
        (b"<svg><trace>1 2</trace></svg>", "not inkml"),
    ],
)
def test_unreadable_files_give_a_reason(data, reason):
    with pytest.raises(InkMLError) as caught:
        read_inkml(data, "k")
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_encoded_traces():
    # explicit first point, then first differences (velocity), then second differences
    np.testing.assert_allclose(parse_trace("10 20, '1 '2, 1 2"), [[10, 20], [11, 22], [12, 24]])
    np.testing.assert_allclose(parse_trace("0 0, '1 '1, \"0 \"1"), [[0, 0], [1, 1], [2, 3]])
    np.testing.assert_allclose(parse_trace("5 5, !7 8"), [[5, 5], [7, 8]])
    # plain traces with uneven channel counts keep the points that have x and y
    np.testing.assert_allclose(parse_trace("1 2 3, 4 5, 6"), [[1, 2], [4, 5]])
    assert parse_trace("").shape == (0, 2)


def test_iter_inkml_files_from_folder_and_archive(tmp_path):
    folder = tmp_path / "TrainINKML" / "KAIST"
    folder.mkdir(parents=True)
    (folder / "a.inkml").write_text(inkml("x", ["1 2"]))
    (folder / "b.lg").write_text("not inkml")
    archive = tmp_path / "TrainINKML.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "TrainINKML", arcname="TrainINKML")
        empty = tarfile.TarInfo("TrainINKML/MfrDB/empty.inkml")
        tar.addfile(empty, io.BytesIO(b""))
    from_folder = list(iter_inkml_files(tmp_path / "TrainINKML"))
    assert [path for path, _ in from_folder] == ["TrainINKML/KAIST/a.inkml"]
    from_archive = dict(iter_inkml_files(archive))
    assert from_archive["TrainINKML/MfrDB/empty.inkml"] == b""
    assert read_inkml(from_archive["TrainINKML/KAIST/a.inkml"], "a").latex == "x"
    with pytest.raises(FileNotFoundError):
        list(iter_inkml_files(tmp_path / "missing.tar.gz"))


@pytest.mark.skipif(not (CROHME_DIR / "TrainINKML.tar.gz").is_file(),
                    reason=f"CROHME archives not found at {CROHME_DIR}")
def test_real_archive_defects():
    wanted = {"TrainINKML/MfrDB/MfrDB3088.inkml", "TrainINKML/MfrDB/MfrDB0104.inkml"}
    files = {}
    with tarfile.open(CROHME_DIR / "TrainINKML.tar.gz") as archive:
        for member in archive:
            if member.name in wanted:
                files[member.name.rsplit("/", 1)[-1][:-6]] = archive.extractfile(member).read()
                if len(files) == len(wanted):
                    break
    with pytest.raises(InkMLError) as caught:
        read_inkml(files["MfrDB3088"], "MfrDB3088")
    assert caught.value.reason == "empty file"
    with pytest.raises(UnicodeDecodeError):
        files["MfrDB0104"].decode("utf-8")
    expression = read_inkml(files["MfrDB0104"], "MfrDB0104", "MfrDB")
    assert expression.latex.startswith("c \\cdot")
    assert len(expression.strokes) > 5 and all(s.shape[1] == 2 and len(s) for s in expression.strokes)


def _groups(*symbols: tuple[str, list[str]]) -> str:
    """A CROHME segmentation: the root "Segmentation" group holding one group per (label, trace ids)."""
    inner = "".join(
        f'<traceGroup xml:id="g{i}"><annotation type="truth">{label}</annotation>'
        + "".join(f'<traceView traceDataRef="{ref}"/>' for ref in refs)
        + "</traceGroup>"
        for i, (label, refs) in enumerate(symbols)
    )
    return f'<traceGroup xml:id="root"><annotation type="truth">Segmentation</annotation>{inner}</traceGroup>'


def test_symbol_segmentation_is_read_with_vocabulary_labels():
    # `\lt` is the `<` symbol; an empty trace has no stroke, so later stroke indices shift down.
    extra = _groups(("x", ["0", "1"]), ("\\lt", ["3"]), ("\\sqrt", ["4"]))
    traces = ["0 0, 1 1", "1 0, 0 1", "", "2 0, 3 1", "4 0, 5 1"]
    expression = read_inkml(inkml("$x &lt; \\sqrt{}$", traces, extra=extra).encode(), "s")
    assert [(s.label, s.strokes) for s in expression.symbols] == [("x", [0, 1]), ("<", [2]), ("\\sqrt", [3])]
    assert expression.symbols_error == ""


@pytest.mark.parametrize(
    "extra, reason",
    [
        ("", "no segmentation"),
        (_groups(("x", ["0"]), ("y", ["0", "1"])), "stroke in two groups"),
        (_groups(("x", ["0"]), ("\\aleph", ["1"])), "label outside vocabulary"),
        (_groups(("x", ["0"]), ("y", ["7"])), "unknown trace"),
    ],
)
def test_unusable_segmentation_keeps_the_expression_and_says_why(extra, reason):
    expression = read_inkml(inkml("$xy$", ["0 0, 1 1", "2 0, 3 1"], extra=extra).encode(), "u")
    assert expression.latex == "xy" and len(expression.strokes) == 2  # the expression itself is kept
    assert expression.symbols == [] and expression.symbols_error == reason
