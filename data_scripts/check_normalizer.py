"""Measure the LaTeX normalizer against the original project's tokenized captions.

    python -m data_scripts.check_normalizer --data_dir ../shared/crohme

reads the raw truths straight from the CROHME archives (or extracted folders) and compares:

* training set: ``normalize(raw truth) == normalize(caption)`` for the 8,835 expressions of
  ``seed_captions/train_caption.txt`` (the training captions keep `\\limits`, `'` and
  superscript-first order, so both sides are normalized);
* 2014 test set: ``normalize(raw truth) == caption tokens`` token for token for the 986
  expressions of ``seed_captions/test_caption.txt`` (those captions are in canonical style).

It prints both figures and every mismatch with a reason category.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import sys
from pathlib import Path

from data_scripts.inkml import InkMLError, iter_inkml_files, read_inkml
from modeling_hmer.latex import CROHME_SYMBOLS, normalize

_SYMBOLS = frozenset(CROHME_SYMBOLS)
_NUMBER = frozenset("0123456789.")


def find_source(data_dir: Path, stem: str) -> Path:
    """The extracted folder ``data_dir/stem`` if present, else the archive ``stem.tar.gz``."""
    for candidate in (data_dir / stem, data_dir / f"{stem}.tar.gz", data_dir / f"{stem}.tgz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"neither {data_dir / stem} nor {data_dir / stem}.tar.gz exists")


def read_truths(source: Path) -> tuple[dict[str, str], collections.Counter]:
    """Expression id -> raw truth for every readable file; plus the count of skipped files per reason."""
    truths: dict[str, str] = {}
    skipped: collections.Counter = collections.Counter()
    for path, data in iter_inkml_files(source):
        name = path.rsplit("/", 1)[-1].removesuffix(".inkml")
        try:
            truths[name] = read_inkml(data, name).latex
        except InkMLError as error:
            skipped[error.reason] += 1
    return truths, skipped


def read_captions(path: Path) -> dict[str, list[str]]:
    captions = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, _, tokens = line.partition("\t")
            captions[name] = tokens.split()
    return captions


def mismatch_reason(ours: list[str], reference: list[str]) -> str:
    """A short category for why two token sequences differ."""
    unknown = sorted({t for t in ours if t not in _SYMBOLS})
    if unknown:
        return "unknown symbol " + " ".join(unknown)
    changes = [op for op in difflib.SequenceMatcher(None, ours, reference, autojunk=False).get_opcodes()
               if op[0] != "equal"]
    removed = [t for _, i1, i2, _, _ in changes for t in ours[i1:i2]]
    added = [t for _, _, _, j1, j2 in changes for t in reference[j1:j2]]
    if set(removed + added) <= _NUMBER:
        return "caption rewrites a number"
    if sorted(ours) == sorted(reference):
        return "same symbols, other order"
    if set(removed + added) <= {"{", "}", "_", "^"}:
        return "script structure differs"
    if all(tag == "replace" for tag, *_ in changes):
        return "caption writes " + ", ".join(f"{' '.join(ours[i1:i2])} as {' '.join(reference[j1:j2])}"
                                             for _, i1, i2, j1, j2 in changes)
    if not added:
        return "caption drops " + " ".join(removed)
    if not removed:
        return "caption adds " + " ".join(added)
    return "caption differs"


def compare(truths: dict[str, str], captions: dict[str, list[str]], *, normalize_caption: bool):
    """Return (matches, missing, mismatches) with mismatches as (name, reason, raw, ours, reference)."""
    matches, missing, mismatches = 0, [], []
    for name, caption in captions.items():
        if name not in truths:
            missing.append(name)
            continue
        ours = normalize(truths[name])
        reference = normalize(" ".join(caption)) if normalize_caption else caption
        if ours == reference:
            matches += 1
        else:
            mismatches.append((name, mismatch_reason(ours, reference), truths[name], ours, reference))
    return matches, missing, mismatches


def report(title: str, matches: int, total: int, missing: list[str], mismatches: list, goal: int) -> bool:
    print(f"\n== {title}: {matches}/{total} match ({100 * matches / max(total, 1):.2f}%), goal >= {goal}")
    if missing:
        print(f"   {len(missing)} captioned expressions have no readable InkML: {' '.join(missing[:10])}")
    by_reason = collections.Counter(reason for _, reason, *_ in mismatches)
    for reason, count in by_reason.most_common():
        print(f"   {count:4d}  {reason}")
    for name, reason, raw, ours, reference in sorted(mismatches, key=lambda m: (m[1], m[0])):
        print(f"-- {name} [{reason}]\n   raw:     {raw}\n"
              f"   ours:    {' '.join(ours)}\n   caption: {' '.join(reference)}")
    return matches >= goal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True,
                        help="folder with TrainINKML(.tar.gz), TestEM2014GT(.tar.gz) and seed_captions/")
    parser.add_argument("--captions_dir", type=Path, default=None,
                        help="folder with train_caption.txt and test_caption.txt (default: DATA_DIR/seed_captions)")
    args = parser.parse_args(argv)
    captions_dir = args.captions_dir or args.data_dir / "seed_captions"

    ok = True
    for title, stem, caption_file, normalize_caption, goal in (
        ("train: normalize(raw) == normalize(caption)", "TrainINKML", "train_caption.txt", True, 8800),
        ("test 2014: normalize(raw) == caption", "TestEM2014GT", "test_caption.txt", False, 975),
    ):
        truths, skipped = read_truths(find_source(args.data_dir, stem))
        skipped_text = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "none"
        print(f"{stem}: {len(truths)} expressions read, skipped: {skipped_text}")
        captions = read_captions(captions_dir / caption_file)
        matches, missing, mismatches = compare(truths, captions, normalize_caption=normalize_caption)
        ok &= report(title, matches, len(captions), missing, mismatches, goal)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
