"""Synthetic training expressions: new formulas written in CROHME's own ink, made on the fly.

The CROHME training set repeats its formulas (4,822 distinct in 8,835 expressions) while the
test sets' formulas are 97% new; a decoder trained on it memorizes formulas. Two generators
write new ones from the training part's symbol ink (`data_scripts.ink_bank.InkBank`):

- **A, substitution** (`data_scripts.substitute`): a real expression with symbols renamed
  consistently within layout classes, each renamed symbol in another writer's hand;
- **B, composition** (`data_scripts.compose`): a formula drawn from a grammar of CROHME's
  structures, laid out from bank ink by rules.

`SyntheticExpressions` mixes them (``substitution_share`` of the samples from A, the rest
from B) and returns strokes and tokens; images then go through the same stroke augmentation and
renderer as real data (`data_scripts.augment.render_augmented`). Everything is drawn from the
generator it is given, so ``np.random.default_rng((seed, epoch, index))`` gives the same sample
every time: training with ``--synthetic_share`` stays exact under ``--resume``. Nothing is
written to disk.

Look at what it makes::

    python -m data_scripts.synth --data_dir ../shared/crohme --sheet sheet.png

draws a contact sheet of generated samples (A and B, with a few real ones for comparison),
each with its LaTeX typeset beside it.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .augment import render_augmented
from .ink_bank import InkBank
from .substitute import substitute


__all__ = ["SyntheticSample", "SyntheticExpressions", "main"]

logger = logging.getLogger(__name__)

# Tries of generator A on a row before composing instead (most rows succeed at once).
_SUBSTITUTION_TRIES = 3


@dataclass
class SyntheticSample:
    """strokes: float32 (N, 2) arrays, y down, any unit; tokens: canonical tokens;
    kind: ``"substitution"`` or ``"composition"``; source: the real row behind it (A) or ``""``."""

    strokes: list[np.ndarray]
    tokens: list[str]
    kind: str
    source: str = ""


class SyntheticExpressions:
    """Generators A and B over the training part of a CROHME `datasets.Dataset`.

    Args:
        dataset: the CROHME training split (columns ``strokes``, ``symbols``, ``tokens``, ...).
        indices: the rows of the training part: the bank, A's sources and B's length
            distribution come from these only (never pass held-out or test rows).
        substitution_share: the share of samples made by A (the rest by B).
        match_length: a B sample that stands in for a row (`sample(rng, index)`) gets that row's token
            length, so its image is about as large as the row's and fits the batch planned for it (B's
            lengths still follow the training part's). False (the default, as the shipped weights were
            trained): lengths drawn independently, and B images then have 2.9 times the pixels of the row
            they replace, on average.
        rename_probability, restyle_probability: see `data_scripts.substitute.substitute`.
    """

    def __init__(
        self,
        dataset,
        indices: Sequence[int],
        substitution_share: float = 0.5,
        match_length: bool = False,
        rename_probability: float = 0.7,
        restyle_probability: float = 0.3,
    ):
        if not 0.0 <= substitution_share <= 1.0:
            raise ValueError(f"substitution_share must be in [0, 1], got {substitution_share}")
        from train.data import writer_groups
        from .compose import FormulaComposer

        self.indices = [int(i) for i in indices]
        self.rows = dataset.select(self.indices).select_columns(["name", "source", "writer", "tokens", "strokes", "symbols"])
        self.writers = writer_groups(self.rows["name"], self.rows["source"], self.rows["writer"])
        self.position = {index: position for position, index in enumerate(self.indices)}
        self.bank = InkBank.from_dataset(self.rows)  # the rows selected above: read once
        self.lengths = [len(tokens) for tokens in self.rows["tokens"]]  # token length per row, by position
        self.composer = FormulaComposer(self.bank, lengths=self.lengths)
        self.substitution_share = substitution_share
        self.match_length = match_length
        self.rename_probability = rename_probability
        self.restyle_probability = restyle_probability

    def __len__(self) -> int:
        return len(self.indices)

    def substitution(self, rng: np.random.Generator, index: int | None = None) -> SyntheticSample | None:
        """Generator A on dataset row `index` (a random training row when None), or None."""
        position = self.position[int(index)] if index is not None else int(rng.integers(len(self.indices)))
        row = self.rows[position]
        for _ in range(_SUBSTITUTION_TRIES):
            made = substitute(
                row["strokes"], row["symbols"], row["tokens"], self.writers[position], self.bank, rng,
                rename_probability=self.rename_probability, restyle_probability=self.restyle_probability,
            )
            if made is not None:
                return SyntheticSample(made[0], made[1], "substitution", row["name"])
        return None

    def composition(self, rng: np.random.Generator, length: int | None = None) -> SyntheticSample:
        """Generator B: a new formula from the grammar, in bank ink (`length` tokens; default: drawn)."""
        strokes, tokens = self.composer(rng, length)
        return SyntheticSample(strokes, tokens, "composition")

    def sample(self, rng: np.random.Generator, index: int | None = None) -> SyntheticSample:
        """One sample, from A (on row `index`, when given) with `substitution_share`, else from B.

        A row that A cannot vary (its segmentation disagrees with its tokens) gives a B sample; with
        `match_length`, B writes as many tokens as row `index` has.
        """
        if rng.random() < self.substitution_share:
            made = self.substitution(rng, index)
            if made is not None:
                return made
        length = None
        if self.match_length and index is not None:
            length = self.lengths[self.position[int(index)]]
        return self.composition(rng, length)

    def render(self, sample: SyntheticSample, rng: np.random.Generator, **augment_overrides) -> np.ndarray:
        """The sample as a training image: uint8 (H, W), ink 255 on 0, with stroke augmentation."""
        return render_augmented(sample.strokes, rng, **augment_overrides)


# ----------------------------------------------------------------------------- contact sheet


def _typeset(latex: str):
    """A matplotlib mathtext rendering of `latex` as an RGB array, or None when it cannot typeset."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    # mathtext reads `x ^ { 2 }` as a plain 2: no space may follow a script mark.
    latex = re.sub(r"([\^_])\s+", r"\1", latex)
    figure = plt.figure(figsize=(0.01, 0.01), dpi=100)
    try:
        figure.text(0, 0, f"${latex}$", fontsize=16, verticalalignment="bottom")
        figure.canvas.draw()  # raises ValueError on LaTeX mathtext cannot parse
        renderer = figure.canvas.get_renderer()
        box = figure.texts[0].get_window_extent(renderer)
        figure.set_size_inches((box.width + 8) / 100, (box.height + 8) / 100)
        figure.texts[0].set_position((4 / (box.width + 8), 4 / (box.height + 8)))
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    except ValueError:
        return None
    finally:
        plt.close(figure)


def draw_sheet(rows: list[tuple[str, np.ndarray, str]], path: str, width: int = 1400) -> None:
    """Writes a PNG: one line per (caption, image, latex): the image (black ink on white), then the
    typeset LaTeX and the caption."""
    from PIL import Image, ImageDraw

    lines = []
    for caption, image, latex in rows:
        ink = Image.fromarray(255 - image).convert("RGB")
        if ink.width > width // 2:
            ink = ink.resize((width // 2, max(1, ink.height * (width // 2) // ink.width)))
        typeset = _typeset(latex)
        typeset_image = Image.fromarray(typeset) if typeset is not None else None
        height = max(ink.height, typeset_image.height if typeset_image else 0) + 22
        line = Image.new("RGB", (width, height), "white")
        line.paste(ink, (0, 0))
        if typeset_image is not None:
            line.paste(typeset_image.crop((0, 0, min(typeset_image.width, width // 2 - 10), typeset_image.height)), (width // 2 + 10, 0))
        draw = ImageDraw.Draw(line)
        draw.text((width // 2 + 10, height - 18), f"{caption}: {latex}"[:150], fill=(90, 90, 90))
        draw.line((0, height - 1, width, height - 1), fill=(200, 200, 200))
        lines.append(line)
    sheet = Image.new("RGB", (width, sum(line.height for line in lines)), "white")
    y = 0
    for line in lines:
        sheet.paste(line, (0, y))
        y += line.height
    sheet.save(path)


def bench(synthetic: SyntheticExpressions, count: int, seed: int = 0) -> dict[str, float]:
    """Prints and returns ms per sample: generation alone and with augmentation + render, for A, B
    and (for comparison) a real row's augmented render, as the training loader does it."""
    from train.data import HMERTrainDataset

    figures = {}
    rng = np.random.default_rng(seed)
    positions = rng.integers(len(synthetic), size=count)
    for name, make in (
        ("substitution (A)", lambda p: synthetic.substitution(rng, synthetic.indices[p]) or synthetic.composition(rng)),
        ("composition (B)", lambda p: synthetic.composition(rng)),
    ):
        start = time.perf_counter()
        samples = [make(int(p)) for p in positions]
        generated = time.perf_counter() - start
        for sample in samples:
            synthetic.render(sample, rng)
        total = time.perf_counter() - start
        figures[name] = 1000 * total / count
        print(f"{name}: {1000 * generated / count:.2f} ms to generate, {1000 * total / count:.2f} ms with augmentation + render")
    start = time.perf_counter()
    for p in positions:
        HMERTrainDataset.render_augmented(synthetic.rows[int(p)]["strokes"], rng)
    figures["real row"] = 1000 * (time.perf_counter() - start) / count
    print(f"real row: {figures['real row']:.2f} ms to read, augment and render")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_scripts.synth",
        description="Generate synthetic CROHME expressions (A: substitution, B: composition) and draw a contact sheet.",
    )
    parser.add_argument("--data_dir", required=True, help="folder with the CROHME archives or extracted folders")
    parser.add_argument("--sheet", metavar="FILE.png", help="where to write the contact sheet")
    parser.add_argument("--bench", type=int, default=0, metavar="N",
                        help="time N samples of each generator and of real rows (ms per sample, render included)")
    parser.add_argument("--count", type=int, default=24, help="generated samples on the sheet (half A, half B; default 24)")
    parser.add_argument("--real", type=int, default=4, help="real training expressions mixed in for comparison (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout_size", type=int, default=500, help="the held-out slice kept out of the bank (default 500)")
    parser.add_argument("--heldout_by", default="unseen", help="how that slice is chosen (default unseen, as train.py)")
    parser.add_argument("--no_augment", action="store_true", help="draw the plain render, without stroke augmentation")
    parser.add_argument("--cache_dir", default=None, help="datasets cache (default: ~/.cache/hmer/datasets)")
    args = parser.parse_args(argv)
    if not args.sheet and not args.bench:
        parser.error("nothing to do: give --sheet FILE.png and/or --bench N")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from data_scripts.crohme import load_crohme
    from data_scripts.render import render_strokes
    from train.data import select_heldout

    dataset = load_crohme(args.data_dir, "train", cache_dir=args.cache_dir)
    train_indices, _ = select_heldout(dataset, args.heldout_size, args.heldout_by)
    start = time.perf_counter()
    synthetic = SyntheticExpressions(dataset, train_indices)
    print(f"bank: {len(synthetic.bank)} symbols of {len(synthetic.bank.labels)} labels by {len(synthetic.bank.writers)} "
          f"writers, built in {time.perf_counter() - start:.1f} s")

    if args.bench:
        bench(synthetic, args.bench, args.seed)
    if not args.sheet:
        return 0
    rng = np.random.default_rng(args.seed)

    def image_of(strokes) -> np.ndarray:
        return render_strokes(strokes) if args.no_augment else render_augmented(strokes, rng)

    made = []
    for i in range(args.count):
        sample = synthetic.substitution(rng) if i % 2 == 0 else synthetic.composition(rng)
        sample = sample or synthetic.composition(rng)
        caption = "A" if sample.kind == "substitution" else "B"
        made.append((caption + (f" (from {sample.source})" if sample.source else ""), image_of(sample.strokes), " ".join(sample.tokens)))
    for position in rng.choice(len(synthetic), size=min(args.real, len(synthetic)), replace=False):
        row = synthetic.rows[int(position)]
        made.append((f"real {row['name']}", image_of([np.asarray(s, dtype=np.float32) for s in row["strokes"]]), " ".join(row["tokens"])))
    order = rng.permutation(len(made))  # real ones mixed in: can you tell them apart?
    draw_sheet([made[i] for i in order], args.sheet)
    print(f"wrote {args.sheet} ({len(made)} expressions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
