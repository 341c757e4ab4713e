"""Tests for data_scripts.crohme: the datasets builder, load_crohme, the offline layout and the CLI.

Small InkML packages written by the tests cover the layouts and the defects; the real CROHME
archives in ../shared/crohme (when present) are prepared once per module for the exact counts.
"""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_scripts import crohme
from data_scripts.crohme import Crohme, load_crohme, load_offline_folder
from data_scripts.render import render_strokes


SHARED_CROHME = Path(__file__).resolve().parents[2] / "shared" / "crohme"
ARCHIVES = ["TrainINKML.tar.gz", "TestEM2014GT.tar.gz", "TEST2016_INKML_GT.tar.gz"]


def inkml(truth, strokes, writer=None):
    traces = "\n".join(
        f'<trace id="{i}">' + ", ".join(f"{x} {y}" for x, y in stroke) + "</trace>" for i, stroke in enumerate(strokes)
    )
    writer_xml = f'<annotation type="writer"> {writer} </annotation>\n' if writer is not None else ""
    return (
        '<ink xmlns="http://www.w3.org/2003/InkML">\n'
        f'{writer_xml}<annotation type="truth">{truth}</annotation>\n{traces}\n</ink>\n'
    ).encode()


X_SQUARED = inkml("$x^2$", [[(0, 10), (10, 30)], [(10, 10), (0, 30)], [(14, 0), (20, 0), (14, 8), (20, 8)]], "depart007")
ONE_HALF = inkml(r"\frac 1 2", [[(5, 0), (5, 20)], [(0, 25), (20, 25)], [(0, 30), (10, 30), (0, 50), (12, 50)]])
FILES = {
    "TrainINKML/HAMEX/b_expr.inkml": X_SQUARED,
    "TrainINKML/MfrDB/a_expr.inkml": ONE_HALF,
    "TrainINKML/MfrDB/empty.inkml": b"",
    "TrainINKML/MfrDB/no_truth.inkml": inkml("", [[(0, 0), (1, 1)]]),
    "TrainINKML/MfrDB/notes.lg": b"not an inkml file",
    "TestEM2014GT/t1.inkml": X_SQUARED,
    "TestEM2014GT/t2.inkml": ONE_HALF,
}


def write_package(root: Path, archives: bool) -> Path:
    """A miniature CROHME package (train + 2014 test, no 2016 test) as folders or .tar.gz archives."""
    root.mkdir(parents=True)
    if not archives:
        for name, data in FILES.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root
    for stem in ("TrainINKML", "TestEM2014GT"):
        with tarfile.open(root / f"{stem}.tar.gz", "w:gz") as archive:
            for name, data in FILES.items():
                if name.startswith(stem + "/"):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


@pytest.mark.parametrize("archives", [False, True], ids=["folders", "archives"])
def test_builder_on_small_package(tmp_path, cache_dir, archives):
    data_dir = write_package(tmp_path / "crohme", archives)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    builder = Crohme(data_dir=str(data_dir), cache_dir=cache_dir)
    builder.download_and_prepare()
    assert set(builder.info.splits) == {"train", "test_2014"}  # no 2016 test in this package

    train = builder.as_dataset("train")
    assert train.num_rows == 2
    assert train["name"] == ["b_expr", "a_expr"]  # sorted by path: HAMEX/ before MfrDB/
    assert train["source"] == ["HAMEX", "MfrDB"]
    assert train["writer"] == ["depart007", ""]  # stripped; a file without the annotation gets ""
    assert train["latex"] == ["x^2", r"\frac 1 2"]
    assert train["tokens"] == [["x", "^", "{", "2", "}"], ["\\frac", "{", "1", "}", "{", "2", "}"]]
    row = train[0]
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "L"
    image = np.asarray(row["image"])
    assert image.dtype == np.uint8 and image[0].max() == 0 and image.max() == 255
    assert [len(s) for s in row["strokes"]] == [2, 2, 4]
    assert row["strokes"][2][1] == [20.0, 0.0]
    # The stored strokes re-render to exactly the stored image.
    assert np.array_equal(render_strokes(row["strokes"]), image)
    assert builder.as_dataset("test_2014")["source"] == ["2014", "2014"]

    # Nothing dropped silently, nothing written into data_dir.
    assert builder.skipped_counts() == {"train": {"empty file": 1, "no truth": 1}, "test_2014": {}}
    assert [item["name"] for item in builder.skipped["train"]] == [
        "TrainINKML/MfrDB/empty.inkml",
        "TrainINKML/MfrDB/no_truth.inkml",
    ]
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
    # These files have no symbol segmentation: their rows stay, with empty symbols, and are counted.
    assert train["symbols"] == [[], []]
    assert builder.unsegmented_counts() == {"train": {"no segmentation": 2}, "test_2014": {"no segmentation": 2}}


def test_same_rows_from_folders_and_archives_and_any_num_proc(tmp_path, cache_dir):
    folders = load_crohme(write_package(tmp_path / "folders", archives=False), "train", cache_dir, num_proc=1)
    archives = load_crohme(write_package(tmp_path / "archives", archives=True), "train", cache_dir, num_proc=2)
    assert folders["name"] == archives["name"]
    assert folders["strokes"] == archives["strokes"]
    assert [np.asarray(i).tolist() for i in folders["image"]] == [np.asarray(i).tolist() for i in archives["image"]]


def test_load_crohme_errors(tmp_path, cache_dir):
    data_dir = write_package(tmp_path / "crohme", archives=False)
    with pytest.raises(ValueError, match="unknown CROHME split 'validation'"):
        load_crohme(data_dir, "validation", cache_dir)
    with pytest.raises(FileNotFoundError, match="TEST2016_INKML_GT"):
        load_crohme(data_dir, "test_2016", cache_dir)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_crohme(tmp_path / "missing", "train", cache_dir)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="No CROHME data"):
        load_crohme(tmp_path / "nothing", "train", cache_dir)


def write_offline(folder: Path, names_and_captions, image_dir="img"):
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for name, caption in names_and_captions:
        lines.append(f"{name}\t{caption}")
        if name != "missing":
            Image.fromarray(np.full((20, 40), 255, np.uint8)).save(folder / image_dir / f"{name}.bmp")
    (folder / "caption.txt").write_text("\n".join(lines) + "\n")


def test_offline_layout(tmp_path, cache_dir):
    # CoMER-style: one folder per split, each with caption.txt and img/.
    write_offline(tmp_path / "data" / "2014", [("18_em_0", "x ^ 2"), ("missing", "y"), ("18_em_1", "\\frac 1 2")])
    dataset = load_crohme(tmp_path / "data", "test_2014", cache_dir)
    assert dataset["name"] == ["18_em_0", "18_em_1"]  # the caption without an image is skipped
    assert dataset["tokens"] == [["x", "^", "{", "2", "}"], ["\\frac", "{", "1", "}", "{", "2", "}"]]
    assert dataset["latex"][0] == "x ^ 2" and dataset["source"][0] == "2014"
    assert dataset["strokes"] == [[], []]
    assert dataset[0]["image"].size == (40, 20)
    # A folder with caption.txt and the images next to it, read directly.
    write_offline(tmp_path / "flat", [("a", "1 + 1")], image_dir=".")
    assert load_offline_folder(tmp_path / "flat", cache_dir=cache_dir)["tokens"] == [["1", "+", "1"]]
    with pytest.raises(FileNotFoundError, match="caption"):
        load_offline_folder(tmp_path / "data", cache_dir=cache_dir)


def test_cli_writes_parquet_and_reports(tmp_path, cache_dir, capsys, monkeypatch):
    import datasets

    data_dir = write_package(tmp_path / "crohme", archives=True)
    pushed = {}
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.update(repo=repo_id, splits=list(self))
    )
    out = tmp_path / "out"
    argv = ["--data_dir", str(data_dir), "--output_dir", str(out), "--cache_dir", cache_dir, "--num_proc", "1"]
    assert crohme.main(argv + ["--push_to_hub", "me/crohme"]) == 0
    printed = capsys.readouterr().out
    assert "train: 2 expressions; skipped: 1 empty file, 1 no truth" in printed
    assert "test_2014: 2 expressions; skipped: none" in printed
    assert pushed == {"repo": "me/crohme", "splits": ["train", "test_2014"]}
    reloaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "train-*.parquet"), split="train")
    assert reloaded["name"] == ["b_expr", "a_expr"]
    assert json.loads((out / "skipped_files.json").read_text())["train"][0]["reason"] == "empty file"
    with pytest.raises(SystemExit):
        crohme.main(["--data_dir", str(data_dir), "--output_dir", str(data_dir / "out")])


# --- the real CROHME package -----------------------------------------------------------------

requires_crohme = pytest.mark.skipif(
    not all((SHARED_CROHME / name).is_file() for name in ARCHIVES),
    reason=f"the CROHME archives ({', '.join(ARCHIVES)}) are not in {SHARED_CROHME}",
)


@pytest.fixture(scope="module")
def real_builder(crohme_real):
    """All three splits prepared once from the .tar.gz archives (the session's `crohme_real`)."""
    return crohme_real


@requires_crohme
def test_real_split_counts(real_builder):
    counts = {split: info.num_examples for split, info in real_builder.info.splits.items()}
    assert counts == {"train": 8835, "test_2014": 986, "test_2016": 1147}
    train = real_builder.as_dataset("train")
    assert set(train.unique("source")) == {"HAMEX", "KAIST", "MathBrush", "MfrDB", "expressmatch", "extension"}
    assert len(set(train["name"])) == 8835
    # Every sub-corpus but MathBrush names its writers; the test sets' writers are all new.
    unnamed = [source for source, writer in zip(train["source"], train["writer"]) if not writer]
    assert unnamed.count("MathBrush") == 2989 and len(unnamed) - 2989 <= 5
    train_writers = set(train["writer"]) - {""}
    assert len(train_writers) > 300
    for split in ("test_2014", "test_2016"):
        test_writers = set(real_builder.as_dataset(split)["writer"])
        assert "" not in test_writers and not test_writers & train_writers
    assert "MfrDB0104" in set(train["name"])  # the latin-1 file is read


@requires_crohme
def test_real_symbol_segmentation_covers_the_training_set(real_builder):
    from data_scripts.inkml import INK_SYMBOLS

    train = real_builder.as_dataset("train").select_columns(["strokes", "symbols"])
    with_symbols = 0
    labels = set()
    instances = 0
    for row in train:
        if not row["symbols"]:
            continue
        with_symbols += 1
        indices = [k for symbol in row["symbols"] for k in symbol["strokes"]]
        assert len(indices) == len(set(indices)) and all(0 <= k < len(row["strokes"]) for k in indices)
        labels.update(symbol["label"] for symbol in row["symbols"])
        instances += len(row["symbols"])
    assert with_symbols >= 0.99 * train.num_rows
    assert labels <= INK_SYMBOLS and len(labels) >= 100
    assert instances > 85_000
    # What has no segmentation is counted, with its reason.
    assert sum(real_builder.unsegmented_counts()["train"].values()) == train.num_rows - with_symbols


@requires_crohme
def test_real_skipped_files_reported(real_builder):
    skipped = real_builder.skipped
    assert [(item["name"], item["reason"]) for item in skipped["train"]] == [
        ("TrainINKML/MfrDB/MfrDB3088.inkml", "empty file")
    ]
    assert skipped["test_2014"] == [] and skipped["test_2016"] == []


@requires_crohme
def test_real_known_expression(real_builder):
    test_2014 = real_builder.as_dataset("test_2014")
    row = test_2014[test_2014["name"].index("18_em_0")]
    assert row["source"] == "2014"
    captions = dict(
        line.split("\t", 1) for line in (SHARED_CROHME / "seed_captions" / "test_caption.txt").read_text().splitlines()
    )
    assert row["tokens"] == captions["18_em_0"].split()
    image = np.asarray(row["image"])
    # Standard offline look: ~20-200 px tall, white ink on black, 10 px empty margin.
    assert 50 <= image.shape[0] <= 200 and 150 <= image.shape[1] <= 700
    assert np.median(image) == 0 and image.max() == 255
    assert image[:9].max() == 0 and image[-9:].max() == 0 and image[:, :9].max() == 0 and image[:, -9:].max() == 0
    assert np.array_equal(render_strokes(row["strokes"]), image)


@requires_crohme
def test_real_image_sizes_match_standard_images(real_builder):
    # The published offline images: median 94 x 256 (H x W), 95th percentile 179 x 715.
    train = real_builder.as_dataset("train").select(range(0, 8835, 10))
    sizes = np.array([image.size[::-1] for image in train["image"]])
    median_h, median_w = np.median(sizes, axis=0)
    p95_h, p95_w = np.percentile(sizes, 95, axis=0)
    assert 80 <= median_h <= 105 and 220 <= median_w <= 300
    assert 150 <= p95_h <= 210 and 620 <= p95_w <= 820
