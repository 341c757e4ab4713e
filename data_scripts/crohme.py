"""CROHME as a `datasets` dataset, read from the raw InkML (the CROHME 2016 package).

Splits: ``train`` (TrainINKML, 8,835 usable expressions), ``test_2014`` (TestEM2014GT, 986) and
``test_2016`` (TEST2016_INKML_GT, 1,147). Features of each row:

- ``name``: the expression id (file name without ``.inkml``), e.g. ``18_em_0``;
- ``source``: the training sub-corpus (``HAMEX``, ``KAIST``, ``MathBrush``, ``MfrDB``,
  ``expressmatch``, ``extension``), or ``2014`` / ``2016`` for the test sets;
- ``writer``: the file's writer annotation (``""`` where there is none: all of MathBrush, 5 other
  training files, and the offline layout); the test sets' writers never write in the training set;
- ``latex``: the raw truth as written in the file (without ``$...$``);
- ``tokens``: ``modeling_hmer.latex.normalize(latex)``, the canonical training target;
- ``image``: the standard offline render (`data_scripts.render.render_strokes`, PNG, white ink
  on black, mean stroke height 22 px);
- ``strokes``: the pen trajectories in file units, a list of strokes, each a list of ``[x, y]``
  float32 points (y down), for on-the-fly rendering with augmentation;
- ``symbols``: the file's symbol segmentation, one ``{"label", "strokes"}`` per written symbol:
  its vocabulary token (``x``, ``\\sqrt``, ``-`` for a fraction bar too) and the indices of its
  strokes in ``strokes``. Empty where the file has no usable segmentation (no groups, a stroke in
  two groups, a label outside the vocabulary): such rows are kept and counted in
  ``builder.unsegmented`` / ``unsegmented_files.json``. Every CROHME training file has one.

`datasets` 5 no longer runs loading scripts, so the builder is used directly (what `load_crohme`
does)::

    builder = Crohme(data_dir="path/to/crohme", cache_dir=...)
    builder.download_and_prepare(num_proc=2)
    train = builder.as_dataset("train")

``data_dir`` holds the package's archives (``TrainINKML.tar.gz``, ``TestEM2014GT.tar.gz``,
``TEST2016_INKML_GT.tar.gz``, read without extracting) or the extracted folders of the same names.
Nothing is written into ``data_dir``. Files that cannot be read are skipped, never silently:
each is logged with its reason, and ``builder.skipped`` / ``skipped_files.json`` in the prepared
folder list them (the CROHME package has one: the empty ``MfrDB3088.inkml``).

`load_crohme` also reads the common offline layout (a folder of images plus ``caption.txt`` with
``name<TAB>tokens`` lines, as the original project, BTTR and CoMER ship CROHME) into the same
features, with empty ``strokes``; see `load_offline_folder`.

Command line (prepares every split with a progress bar, writes parquet files, can push to the Hub)::

    python -m data_scripts.crohme --data_dir ../shared/crohme --output_dir data/crohme --num_proc 2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Union

import datasets
import numpy as np
from PIL import Image

from modeling_hmer.latex import normalize

from .inkml import InkMLError, read_inkml
from .render import render_strokes


logger = logging.getLogger(__name__)

__all__ = [
    "Crohme",
    "FEATURES",
    "SPLITS",
    "load_crohme",
    "load_offline_folder",
    "default_cache_dir",
    "main",
]

# split -> (folder / archive stem in the CROHME package, source label; None: the sub-corpus folder)
SPLITS: dict[str, tuple[str, Optional[str]]] = {
    "train": ("TrainINKML", None),
    "test_2014": ("TestEM2014GT", "2014"),
    "test_2016": ("TEST2016_INKML_GT", "2016"),
}
# Folder names that the offline layout uses for each split (CoMER: train/ 2014/ 2016/ 2019/).
OFFLINE_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "test_2014": ("test_2014", "2014", "test"),
    "test_2016": ("test_2016", "2016"),
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif")
SKIPPED_FILE = "skipped_files.json"
UNSEGMENTED_FILE = "unsegmented_files.json"
# Shards per split: jobs of `num_proc` take contiguous runs of them, each job reads its
# source once, and the rows come out in name order whatever num_proc is.
NUM_SHARDS = {"train": 16, "test_2014": 4, "test_2016": 4}

FEATURES = datasets.Features(
    {
        "name": datasets.Value("string"),
        "source": datasets.Value("string"),
        "writer": datasets.Value("string"),
        "latex": datasets.Value("string"),
        "tokens": datasets.List(datasets.Value("string")),
        "image": datasets.Image(),
        # strokes -> points -> (x, y): ragged at both outer levels, so nested lists.
        "strokes": datasets.List(datasets.List(datasets.List(datasets.Value("float32")))),
        "symbols": datasets.List({"label": datasets.Value("string"), "strokes": datasets.List(datasets.Value("int32"))}),
    }
)

_CITATION = """\
@inproceedings{mouchere2016icfhr,
  title={ICFHR2016 CROHME: Competition on Recognition of Online Handwritten Mathematical Expressions},
  author={Mouch{\\`e}re, Harold and Viard-Gaudin, Christian and Zanibbi, Richard and Garain, Utpal},
  booktitle={15th International Conference on Frontiers in Handwriting Recognition (ICFHR)},
  year={2016}
}
"""


def default_cache_dir() -> str:
    """``$HF_DATASETS_CACHE`` when set, else ``~/.cache/hmer/datasets``."""
    return os.environ.get("HF_DATASETS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hmer", "datasets")


def _code_hash() -> str:
    """Hash of the code that shapes the rows, so a changed renderer or normalizer re-prepares."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in (
        here / "crohme.py",
        here / "inkml.py",
        here / "render.py",
        here.parent / "modeling_hmer" / "latex.py",
    ):
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:16]


def _locate(data_dir: Path, stem: str) -> Optional[Path]:
    """The extracted folder ``data_dir/stem`` or the archive ``data_dir/stem.tar.gz`` (or .tgz/.tar)."""
    folder = data_dir / stem
    if folder.is_dir():
        return folder
    for suffix in ARCHIVE_SUFFIXES:
        archive = data_dir / (stem + suffix)
        if archive.is_file():
            return archive
    return None


def _list_inkml(location: Path) -> list[str]:
    """Sorted paths of the .inkml files, relative to the folder's parent (as in the archive)."""
    if location.is_dir():
        return sorted(p.relative_to(location.parent).as_posix() for p in location.rglob("*.inkml"))
    with tarfile.open(location, "r:*") as archive:
        return sorted(
            m.name.removeprefix("./") for m in archive if m.isfile() and m.name.endswith(".inkml")
        )


def _read_files(location: Path, wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the `wanted` files (paths as `_list_inkml` gives them), in one pass."""
    if location.is_dir():
        return {name: (location.parent / name).read_bytes() for name in wanted}
    found = {}
    with tarfile.open(location, "r:*") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if name in wanted and member.isfile():
                handle = archive.extractfile(member)
                found[name] = handle.read() if handle else b""
    return found


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes (fast zlib level: the images are small and mostly black)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class Crohme(datasets.GeneratorBasedBuilder):
    """CROHME 2014/2016 handwritten math expressions, from the InkML of the CROHME 2016 package."""

    VERSION = datasets.Version("1.0.0")
    DEFAULT_WRITER_BATCH_SIZE = 500

    def __init__(self, *args, **kwargs):
        # A changed renderer / normalizer / reader gets a fresh cache folder.
        kwargs.setdefault("hash", _code_hash())
        if kwargs.get("data_dir") is not None:
            kwargs["data_dir"] = os.path.abspath(os.path.expanduser(str(kwargs["data_dir"])))
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description=(
                "CROHME handwritten mathematical expressions read from the InkML of the CROHME 2016 "
                "package: writer, raw LaTeX truth, normalized tokens, the standard offline render and the strokes."
            ),
            features=FEATURES,
            citation=_CITATION,
            homepage="https://www.isical.ac.in/~crohme/",
        )

    def _split_generators(self, dl_manager):
        if not self.config.data_dir:
            raise ValueError(
                "Crohme needs data_dir: the folder holding TrainINKML.tar.gz, TestEM2014GT.tar.gz and "
                "TEST2016_INKML_GT.tar.gz (or the extracted folders of those names)."
            )
        data_dir = Path(self.config.data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"CROHME data_dir {data_dir} is not a folder")
        # Workers write the files they skip here; this folder moves with the prepared dataset.
        report_dir = os.path.join(self._output_dir, "skipped")
        os.makedirs(report_dir, exist_ok=True)
        generators = []
        for split, (stem, source) in SPLITS.items():
            location = _locate(data_dir, stem)
            if location is None:
                logger.warning(f"CROHME split {split!r} not prepared: no {stem}/ or {stem}.tar.gz in {data_dir}")
                continue
            names = _list_inkml(location)
            count = min(NUM_SHARDS[split], max(1, len(names)))
            shards = [names[len(names) * i // count : len(names) * (i + 1) // count] for i in range(count)]
            generators.append(
                datasets.SplitGenerator(
                    name=split,
                    gen_kwargs={
                        "split": split,
                        "location": str(location),
                        "source": source,
                        "shards": shards,  # the one list: datasets gives each job a run of it
                        "report_dir": report_dir,
                    },
                )
            )
        if not generators:
            raise FileNotFoundError(
                f"No CROHME data in {data_dir}: expected any of "
                + ", ".join(f"{stem}.tar.gz or {stem}/" for stem, _ in SPLITS.values())
            )
        return generators

    def _generate_examples(self, split, location, source, shards, report_dir):
        wanted = sorted(name for shard in shards for name in shard)
        if not wanted:
            return
        files = _read_files(Path(location), set(wanted))
        skipped, unsegmented = [], []
        for path in wanted:
            name = Path(path).name.removesuffix(".inkml")
            expression_source = source or Path(path).parent.name
            try:
                expression = read_inkml(files[path], name=name, source=expression_source)
                image = render_strokes(expression.strokes)
            except InkMLError as error:
                skipped.append({"name": path, "reason": error.reason, "detail": str(error)})
                logger.warning(f"skipped {path}: {error}")
                continue
            except ValueError as error:  # strokes the renderer cannot draw
                skipped.append({"name": path, "reason": "no ink", "detail": str(error)})
                logger.warning(f"skipped {path}: {error}")
                continue
            yield path, {
                "name": name,
                "source": expression_source,
                "writer": expression.writer,
                "latex": expression.latex,
                "tokens": normalize(expression.latex),
                "image": {"bytes": encode_png(image), "path": None},
                "strokes": [stroke.tolist() for stroke in expression.strokes],
                "symbols": [{"label": symbol.label, "strokes": symbol.strokes} for symbol in expression.symbols],
            }
            if expression.symbols_error:
                unsegmented.append({"name": path, "reason": expression.symbols_error})
        # One report per job, named after its first file so that jobs never collide.
        report = Path(report_dir) / f"{split}-{hashlib.sha1(wanted[0].encode()).hexdigest()[:12]}.json"
        report.write_text(json.dumps({"split": split, "skipped": skipped, "unsegmented": unsegmented}))

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_split_kwargs):
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_split_kwargs)
        # Gather the per-job reports into one file next to the prepared splits.
        report_dir = Path(self._output_dir) / "skipped"
        reports = {key: {split: [] for split in self.info.splits} for key in ("skipped", "unsegmented")}
        for path in sorted(report_dir.glob("*.json")):
            report = json.loads(path.read_text())
            for key, found in reports.items():
                found.setdefault(report["split"], []).extend(report[key])
        for found in reports.values():
            for items in found.values():
                items.sort(key=lambda item: item["name"])
        (Path(self._output_dir) / SKIPPED_FILE).write_text(json.dumps(reports["skipped"], indent=1))
        (Path(self._output_dir) / UNSEGMENTED_FILE).write_text(json.dumps(reports["unsegmented"], indent=1))
        for path in report_dir.glob("*.json"):
            path.unlink()
        report_dir.rmdir()

    @property
    def skipped(self) -> dict[str, list[dict]]:
        """Files left out of each prepared split: ``{split: [{"name", "reason", "detail"}, ...]}``."""
        path = Path(self._output_dir) / SKIPPED_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: call download_and_prepare() first")
        return json.loads(path.read_text())

    def skipped_counts(self) -> dict[str, dict[str, int]]:
        """``{split: {reason: count}}`` of the files left out."""
        return {split: dict(Counter(item["reason"] for item in items)) for split, items in self.skipped.items()}

    @property
    def unsegmented(self) -> dict[str, list[dict]]:
        """Rows kept with empty ``symbols``: ``{split: [{"name", "reason"}, ...]}``."""
        path = Path(self._output_dir) / UNSEGMENTED_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: call download_and_prepare() first")
        return json.loads(path.read_text())

    def unsegmented_counts(self) -> dict[str, dict[str, int]]:
        """``{split: {reason: count}}`` of the rows without a symbol segmentation."""
        return {split: dict(Counter(item["reason"] for item in items)) for split, items in self.unsegmented.items()}


def _log_skipped(builder: Crohme) -> None:
    for split, counts in builder.skipped_counts().items():
        if counts:
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
            logger.warning(f"CROHME {split}: skipped {sum(counts.values())} file(s): {summary}")
    for split, counts in builder.unsegmented_counts().items():
        if counts:
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
            logger.info(f"CROHME {split}: {sum(counts.values())} row(s) without symbol segmentation: {summary}")


def _default_num_proc() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def prepare_crohme(
    data_dir: Union[str, os.PathLike], cache_dir: Optional[str] = None, num_proc: Optional[int] = None
) -> Crohme:
    """Prepares every split found in `data_dir` (once; later calls reuse the cache) and returns the builder."""
    builder = Crohme(data_dir=str(data_dir), cache_dir=cache_dir or default_cache_dir())
    num_proc = _default_num_proc() if num_proc is None else num_proc
    builder.download_and_prepare(num_proc=num_proc if num_proc > 1 else None)
    _log_skipped(builder)
    return builder


def _offline_folder(data_dir: Path, split: str) -> Optional[Path]:
    """The offline-layout folder (with caption.txt) for `split`, if `data_dir` uses that layout."""
    if (data_dir / "caption.txt").is_file():
        return data_dir
    for folder in (split, *OFFLINE_FOLDERS.get(split, ())):
        if (data_dir / folder / "caption.txt").is_file():
            return data_dir / folder
    return None


def load_crohme(
    data_dir: Union[str, os.PathLike],
    split: str = "train",
    cache_dir: Optional[str] = None,
    num_proc: Optional[int] = None,
) -> datasets.Dataset:
    """One CROHME split as a `datasets.Dataset` with the features listed in this module's docstring.

    Args:
        data_dir: the CROHME package folder (archives or extracted folders), or an offline-layout
            folder: ``caption.txt`` + images, directly or in a per-split subfolder (``train/``,
            ``2014/``, ``2016/``; see `load_offline_folder`).
        split: ``"train"``, ``"test_2014"`` or ``"test_2016"``.
        cache_dir: where the prepared dataset goes (default `default_cache_dir()`); never data_dir.
        num_proc: processes for the first preparation (default: the available cores, at most 8).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CROHME data_dir {data_dir} is not a folder")
    offline = _offline_folder(data_dir, split)
    if offline is not None:
        return load_offline_folder(offline, cache_dir=cache_dir)
    if split not in SPLITS:
        raise ValueError(f"unknown CROHME split {split!r}; choose one of {', '.join(SPLITS)}")
    builder = prepare_crohme(data_dir, cache_dir=cache_dir, num_proc=num_proc)
    if split not in builder.info.splits:
        stem = SPLITS[split][0]
        raise FileNotFoundError(f"split {split!r} needs {stem}.tar.gz or {stem}/ in {data_dir}")
    return builder.as_dataset(split=split)


def _iter_offline(folder: str, caption_file: str, stamp: str = "") -> Iterator[dict]:
    del stamp  # only part of the cache key (see load_offline_folder)
    folder_path = Path(folder)
    image_dirs = [d for d in (folder_path / "img", folder_path / "images", folder_path) if d.is_dir()]
    images = {}
    for directory in reversed(image_dirs):  # img/ wins over a same-named file next to caption.txt
        images.update({p.stem: p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
    skipped = Counter()
    for number, line in enumerate(Path(caption_file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:
            name, _, caption = line.strip().partition(" ")  # some copies use a space
        name = name.strip()
        if name not in images:
            skipped["image not found"] += 1
            logger.warning(f"{caption_file}:{number}: no image for {name!r} in {folder}")
            continue
        yield {
            "name": name,
            "source": folder_path.name,
            "writer": "",
            "latex": caption.strip(),
            "tokens": normalize(caption),
            "image": {"bytes": images[name].read_bytes(), "path": images[name].name},
            "strokes": [],
            "symbols": [],
        }
    if skipped:
        logger.warning(f"{folder}: skipped {dict(skipped)}")


def _stamp(folder: Path, caption_file: Path) -> str:
    paths = [caption_file, folder, folder / "img", folder / "images"]
    return ";".join(f"{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in paths if p.exists())


def load_offline_folder(
    folder: Union[str, os.PathLike], caption_file: Optional[str] = None, cache_dir: Optional[str] = None
) -> datasets.Dataset:
    """Reads the common offline layout into the CROHME features (``strokes`` empty).

    Args:
        folder: holds ``caption.txt`` (``name<TAB>tokens`` per line) and the images named
            ``name.bmp`` / ``.png`` / ``.jpg``, next to it or in ``img/`` or ``images/``.
        caption_file: another caption file than ``folder/caption.txt``.
        cache_dir: where the arrow cache goes (default `default_cache_dir()`).

    ``latex`` holds the caption as written, ``tokens`` its normalized form and ``source`` the
    folder's name. Captions without an image are skipped with a warning.
    """
    folder = Path(folder).expanduser().resolve()
    caption_file = Path(caption_file) if caption_file else folder / "caption.txt"
    if not caption_file.is_file():
        raise FileNotFoundError(f"no caption file {caption_file} (lines: name<TAB>tokens)")
    return datasets.Dataset.from_generator(
        _iter_offline,
        features=FEATURES,
        cache_dir=cache_dir or default_cache_dir(),
        # The stamp changes the cache key when the captions or the image folders change.
        gen_kwargs={"folder": str(folder), "caption_file": str(caption_file), "stamp": _stamp(folder, caption_file)},
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts.crohme",
        description="Prepare the CROHME splits from the InkML archives and write them as parquet.",
    )
    parser.add_argument("--data_dir", required=True, help="folder with the CROHME archives or extracted folders")
    parser.add_argument("--output_dir", required=True, help="where data/{split}-00000-of-00001.parquet go")
    parser.add_argument("--num_proc", type=int, default=None, help="processes (default: available cores, max 8)")
    parser.add_argument("--cache_dir", default=None, help="datasets cache (default: ~/.cache/hmer/datasets)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="also push to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir)
    data_dir = Path(args.data_dir).resolve()
    if output_dir.resolve() == data_dir or data_dir in output_dir.resolve().parents:
        parser.error("--output_dir must not be inside --data_dir (the data folder stays read-only)")

    start = time.perf_counter()
    builder = prepare_crohme(data_dir, cache_dir=args.cache_dir, num_proc=args.num_proc)
    prepared = time.perf_counter() - start
    splits = datasets.DatasetDict({split: builder.as_dataset(split=split) for split in builder.info.splits})

    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(output_dir / "data" / f"{split}-00000-of-00001.parquet"))
    (output_dir / SKIPPED_FILE).write_text(json.dumps(builder.skipped, indent=1))

    print(f"prepared in {prepared:.1f} s; written to {output_dir / 'data'}")
    for split, dataset in splits.items():
        counts = builder.skipped_counts().get(split, {})
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
        counts = builder.unsegmented_counts().get(split, {})
        unsegmented = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"
        print(f"  {split}: {dataset.num_rows} expressions; skipped: {detail}; without symbols: {unsegmented}")
    for split, items in builder.skipped.items():
        for item in items:
            print(f"  skipped {item['name']}: {item['reason']}")

    if args.push_to_hub:
        splits.push_to_hub(args.push_to_hub, private=args.private)
        print(f"pushed to the Hub dataset {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    # Run the package's copy of this module, so that the builder's name (taken from its module) is "crohme".
    from data_scripts.crohme import main as package_main

    sys.exit(package_main())
