"""Training data helpers: the fixed held-out slice, the augmented dataset, size-grouped batches.

Everything here is deterministic given (seed, epoch), so a resumed run sees exactly the batches
and augmentations that an uninterrupted run would have seen:

- `heldout_split` picks the model-selection slice of the training set by a salted hash of each
  expression's name (independent of the training seed, so every run selects on the same slice),
  or of each writer's key (`writer_groups`): whole writers held out, like the test sets' writers;
  `unseen_formula_split` also keeps the slice's formulas out of the training part, as the test
  sets' formulas are (`select_heldout(..., heldout_by="unseen")`);
- `HMERTrainDataset` renders each expression from its strokes with random stroke-level
  augmentation drawn from `np.random.default_rng((seed, epoch, index))`, or returns the
  standard render when augmentation is off;
- `SizeGroupedBatchSampler` groups expressions of similar image size into batches under a pixel
  budget (padding a batch to its largest image wastes up to 40% of the work otherwise), puts
  `batches_per_chunk` size-adjacent batches into one chunk and shuffles the chunks every epoch
  with a generator seeded by (seed, epoch);
- `HMERCollator` turns a chunk into model inputs with the same `HMERProcessor` that inference
  uses, and only then, knowing the real size of every processed image, splits the chunk into its
  batches (`split_by_size`): the processor's size normalization moves image sizes by about 14%
  from the stored renders', which alone would leave a quarter of every batch as padding.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


HELDOUT_SALT = "hmer-heldout-v1"
# The last entry of the seed of the generator that decides and draws synthetic samples.
SYNTHETIC_STREAM = 1


def _salted_hash(salt: str, key: str) -> str:
    return hashlib.sha1(f"{salt}:{key}".encode()).hexdigest()


def heldout_split(
    names: Sequence[str], heldout_size: int, salt: str = HELDOUT_SALT, groups: Optional[Sequence[str]] = None
) -> tuple[list[int], list[int]]:
    """Splits dataset row indices into (train, held-out) by a salted hash of each name.

    The held-out slice is the `heldout_size` names with the smallest hash: it depends only on the
    names and the salt, never on a seed, a limit or the row order. Both lists come back in hash
    order (a well-mixed order across the CROHME sub-corpora).

    With `groups` (one key per row, e.g. `writer_groups`), whole groups are held out: they are
    taken in the order of their keys' hashes, skipping any group that would overshoot, until
    `heldout_size` rows are held out or no group fits (so the slice may be a few rows smaller).
    """
    if heldout_size < 0 or heldout_size >= len(names):
        raise ValueError(f"heldout_size must be in [0, {len(names)}), got {heldout_size}")
    if len(set(names)) != len(names):
        raise ValueError("expression names must be unique to select a held-out slice by name")
    keys = [_salted_hash(salt, name) for name in names]
    order = sorted(range(len(names)), key=keys.__getitem__)
    if groups is None:
        return order[heldout_size:], order[:heldout_size]
    if len(groups) != len(names):
        raise ValueError(f"groups has {len(groups)} keys for {len(names)} names")
    sizes = Counter(groups)
    chosen, total = set(), 0
    for group in sorted(sizes, key=lambda group: _salted_hash(salt, group)):
        if total + sizes[group] <= heldout_size:
            chosen.add(group)
            total += sizes[group]
        if total == heldout_size:
            break
    heldout = [i for i in order if groups[i] in chosen]
    return [i for i in order if groups[i] not in chosen], heldout


def writer_groups(names: Sequence[str], sources: Sequence[str], writers: Sequence[str]) -> list[str]:
    """One writer key per expression, to hold out whole writers (`heldout_split(groups=...)`).

    The key is ``source/writer`` where the file names its writer (writer ids are only unique
    within a sub-corpus). MathBrush files name none, but their names start with the recording
    session (``2009210-947-12`` -> ``2009210-947``; 21 sessions for its ~20 writers), taken as one
    writer. Any other expression without a writer is a group of its own.
    """
    keys = []
    for name, source, writer in zip(names, sources, writers):
        if writer:
            keys.append(f"{source}/{writer}")
        elif source == "MathBrush" and name.count("-") == 2:
            keys.append(f"{source}/{name.rsplit('-', 1)[0]}")
        else:
            keys.append(f"{source}/{name}")
    return keys


def unseen_formula_split(
    names: Sequence[str],
    groups: Sequence[str],
    formulas: Sequence[str],
    heldout_size: int,
    salt: str = HELDOUT_SALT,
) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices where the held-out rows are new writers writing new formulas.

    Like the CROHME test sets: no held-out writer (`groups`, e.g. `writer_groups`) writes in the
    training part, and no held-out formula (`formulas`, e.g. the joined normalized tokens) occurs
    in it. Writers are taken in the order of their keys' salted hashes; a held-out writer's rows
    whose formula some training writer also wrote belong to neither part (their writer must stay
    out of training, their formula out of the slice). Writers are added until `heldout_size`
    unseen-formula rows are found; the slice is the first `heldout_size` of them in name-hash
    order, and the unused rest of the held-out writers' rows is left out of both parts too.
    """
    if not 0 < heldout_size < len(names):
        raise ValueError(f"heldout_size must be in (0, {len(names)}), got {heldout_size}")
    if not len(names) == len(groups) == len(formulas):
        raise ValueError(f"{len(names)} names, {len(groups)} groups and {len(formulas)} formulas must match")
    # writers_of[formula]: how many rows of each writer wrote it, to update as writers leave training
    rows_of_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        rows_of_group.setdefault(group, []).append(index)
    training_count = Counter(formulas)  # rows in the training part per formula
    chosen: list[str] = []
    slice_rows: set[int] = set()
    for group in sorted(rows_of_group, key=lambda group: _salted_hash(salt, group)):
        chosen.append(group)
        for index in rows_of_group[group]:
            training_count[formulas[index]] -= 1
        held = [i for g in chosen for i in rows_of_group[g]]
        slice_rows = {i for i in held if training_count[formulas[i]] == 0}
        if len(slice_rows) >= heldout_size:
            break
    else:
        raise ValueError(f"only {len(slice_rows)} rows of unseen formulas exist, fewer than heldout_size {heldout_size}")
    held_out_groups = set(chosen)
    order = sorted(range(len(names)), key=lambda i: _salted_hash(salt, names[i]))
    heldout = [i for i in order if i in slice_rows][:heldout_size]
    train = [i for i in order if groups[i] not in held_out_groups]
    if not train:
        raise ValueError(f"holding out {heldout_size} rows of unseen formulas leaves no training rows")
    return train, heldout


def new_formula_rows(formulas: Sequence[str], train: Sequence[int], heldout: Sequence[int]) -> list[int]:
    """The rows of `heldout` whose formula no row of `train` writes (order kept)."""
    trained = {formulas[i] for i in train}
    return [i for i in heldout if formulas[i] not in trained]


HELDOUT_BY = ("expression", "writer", "unseen", "expression_unseen")


def select_heldout(dataset, heldout_size: int, heldout_by: str = "expression") -> tuple[list[int], list[int]]:
    """(train, held-out) row indices of a CROHME training `datasets.Dataset`.

    `heldout_by`: ``"expression"``, single expressions by a hash of their names (`heldout_split`);
    ``"writer"``, whole writers (`writer_groups`); ``"unseen"``, whole writers whose held-out rows
    are formulas that no training row writes (`unseen_formula_split`), the closest match to the
    CROHME test sets (new writers, 97% new formulas). With ``"unseen"`` some rows of the
    held-out writers are in neither list. ``"expression_unseen"``: the ``"expression"`` split's
    training part (so weights trained with ``"expression"``, like the shipped lineage, never saw
    the slice), scored only on the held-out rows whose formula the training part does not write
    (`new_formula_rows`; about half of the slice); the other held-out rows are in neither list.
    """
    if heldout_by not in HELDOUT_BY:
        raise ValueError(f"heldout_by must be one of {', '.join(HELDOUT_BY)}, got {heldout_by!r}")
    names = list(dataset["name"])
    if heldout_by in ("expression", "expression_unseen"):
        train, heldout = heldout_split(names, heldout_size)
        if heldout_by == "expression":
            return train, heldout
        formulas = [" ".join(tokens) for tokens in dataset["tokens"]]
        return train, new_formula_rows(formulas, train, heldout)
    if "writer" not in dataset.column_names:
        raise ValueError(f"heldout_by={heldout_by!r} needs a dataset with a writer column (data_scripts.crohme builds one)")
    groups = writer_groups(names, list(dataset["source"]), list(dataset["writer"]))
    if heldout_by == "writer":
        return heldout_split(names, heldout_size, groups=groups)
    formulas = [" ".join(tokens) for tokens in dataset["tokens"]]
    return unseen_formula_split(names, groups, formulas, heldout_size)


def as_uint8_image(image) -> np.ndarray:
    """A dataset "image" cell (PIL image or array) as a (H, W) uint8 array."""
    array = np.asarray(image.convert("L") if hasattr(image, "convert") else image)
    if array.ndim == 3:
        array = array[..., 0]
    return array.astype(np.uint8, copy=False)


def image_sizes(dataset) -> list[tuple[int, int]]:
    """(height, width) of the standard render of every row, read without decoding the pixels."""
    from PIL import Image

    sizes = []
    for cell in dataset.cast_column("image", _undecoded_image_feature())["image"]:
        if cell.get("bytes") is not None:
            import io

            with Image.open(io.BytesIO(cell["bytes"])) as im:
                sizes.append((im.height, im.width))
        else:
            with Image.open(cell["path"]) as im:
                sizes.append((im.height, im.width))
    return sizes


def _undecoded_image_feature():
    import datasets

    return datasets.Image(decode=False)


class HMERTrainDataset(Dataset):
    """Rows of a CROHME `datasets.Dataset` as {"image": uint8 (H, W), "text": str, "name": str}.

    Keys are either a row index or `(epoch, index)`: the sampler passes the epoch along with
    the index so that a worker process, which holds its own copy of this object, draws the same
    augmentation as the main process would, whatever the number of workers.

    With `synthetic` (a `data_scripts.synth.SyntheticExpressions` over the same training rows)
    each position is, with probability `synthetic_share` drawn per (seed, epoch, index), a
    synthetic variant instead of its real row: generator A varies that very row, B composes a
    new formula. The epoch keeps its length and its batches (a synthetic sample stands in the
    size group of the row it replaces), and a resumed run draws the same samples.
    """

    def __init__(
        self,
        dataset,
        indices: Optional[Sequence[int]] = None,
        augment: bool = False,
        seed: int = 0,
        synthetic=None,
        synthetic_share: float = 0.0,
    ):
        if not 0.0 <= synthetic_share < 1.0:
            raise ValueError(f"synthetic_share must be in [0, 1), got {synthetic_share}")
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.augment = augment
        self.seed = seed
        self.synthetic = synthetic if synthetic_share > 0 else None
        self.synthetic_share = synthetic_share

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, position = key if isinstance(key, tuple) else (0, key)
        index = int(self.indices[position])
        if self.synthetic is not None:
            # Its own stream, so that the real rows' augmentation is the same at every share.
            rng = np.random.default_rng((self.seed, epoch, position, SYNTHETIC_STREAM))
            if rng.random() < self.synthetic_share:
                sample = self.synthetic.sample(rng, index)
                name = f"{sample.kind}:{sample.source or position}"
                return {"image": self.synthetic.render(sample, rng), "text": " ".join(sample.tokens), "name": name}
        row = self.dataset[index]
        if self.augment:
            image = self.render_augmented(row["strokes"], np.random.default_rng((self.seed, epoch, position)))
        else:
            image = as_uint8_image(row["image"])
        return {"image": image, "text": " ".join(row["tokens"]), "name": row["name"]}

    @staticmethod
    def render_augmented(strokes, rng: np.random.Generator) -> np.ndarray:
        from data_scripts.augment import augment_strokes
        from data_scripts.render import render_strokes

        strokes = [np.asarray(stroke, dtype=np.float32) for stroke in strokes]
        strokes, render_kwargs = augment_strokes(strokes, rng)
        return render_strokes(strokes, **render_kwargs)


def size_grouped_batches(
    sizes: Sequence[tuple[int, int]],
    pixel_budget: int,
    max_batch_size: int,
    rng: Optional[np.random.Generator] = None,
    jitter: float = 0.05,
) -> list[list[int]]:
    """Groups positions 0..len(sizes)-1 into batches of similar image size.

    A batch is padded to its tallest and widest image, so its cost is
    len(batch) * max(height) * max(width): batches are filled in order of size while that cost
    stays within `pixel_budget` and the batch within `max_batch_size` (an image larger than the
    budget gets a batch of its own). With `rng`, each size is scaled by a random factor in
    [1 - jitter, 1 + jitter] before sorting, so that batch membership changes from epoch to
    epoch while sizes stay close. Batches come back in size order.
    """
    if pixel_budget <= 0 or max_batch_size <= 0:
        raise ValueError(f"pixel_budget and max_batch_size must be positive, got {pixel_budget}, {max_batch_size}")
    heights = np.array([h for h, _ in sizes], dtype=np.float64)
    widths = np.array([w for _, w in sizes], dtype=np.float64)
    if rng is not None and jitter > 0:
        noise = rng.uniform(1 - jitter, 1 + jitter, size=(2, len(sizes)))
        heights_key, widths_key = heights * noise[0], widths * noise[1]
    else:
        heights_key, widths_key = heights, widths
    # Rows of similar height (16 px bands, the encoder stride) first, then width within a band.
    order = np.lexsort((widths_key, np.floor(heights_key / 16)))
    batches, batch, max_h, max_w = [], [], 0.0, 0.0
    for position in order.tolist():
        h, w = max(max_h, heights[position]), max(max_w, widths[position])
        if batch and ((len(batch) + 1) * h * w > pixel_budget or len(batch) >= max_batch_size):
            batches.append(batch)
            batch, h, w = [], heights[position], widths[position]
        batch.append(position)
        max_h, max_w = h, w
    if batch:
        batches.append(batch)
    return batches


class SizeGroupedBatchSampler(Sampler):
    """Sampler of chunks of dataset positions: size-grouped, shuffled, deterministic per epoch.

    Each item it yields is one chunk: `batches_per_chunk` size-adjacent batches of
    `size_grouped_batches` (the leftover batches at the end join the last chunk), as a list of
    `(epoch, position)` keys (see `HMERTrainDataset`); `HMERCollator` splits it into exactly
    `batches_per_chunk` batches. Call `set_epoch` before each epoch; `len()` is the number of
    chunks of the current epoch. Under `accelerate`, `prepare` wraps it in a `BatchSamplerShard`
    that hands chunk i to process i % num_processes (and repeats the first chunks so that every
    process gets as many): every process then runs the same number of optimizer steps.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        pixel_budget: int,
        max_batch_size: int,
        batches_per_chunk: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        jitter: float = 0.05,
    ):
        if batches_per_chunk < 1:
            raise ValueError(f"batches_per_chunk must be at least 1, got {batches_per_chunk}")
        self.sizes = list(sizes)
        self.pixel_budget = pixel_budget
        self.max_batch_size = max_batch_size
        self.batches_per_chunk = batches_per_chunk
        self.shuffle = shuffle
        self.seed = seed
        self.jitter = jitter
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        # accelerate reads `batch_size`; None means "batches of varying size".
        self.batch_size = None
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def chunks(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The epoch's chunks, in the order they are served, as lists of positions."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng((self.seed, epoch)) if self.shuffle else None
        batches = size_grouped_batches(self.sizes, self.pixel_budget, self.max_batch_size, rng, self.jitter)
        k = self.batches_per_chunk
        chunks = [sum(batches[i : i + k], []) for i in range(0, len(batches) - len(batches) % k, k)]
        leftover = sum(batches[len(batches) - len(batches) % k :], [])
        if leftover:
            if chunks:
                chunks[-1] += leftover
            else:  # fewer batches than one chunk: still `k` batches, if there are k images
                if len(leftover) < k:
                    raise ValueError(f"{len(leftover)} expressions cannot fill {k} batches per chunk")
                chunks = [leftover]
        if rng is not None:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        self._cache = (epoch, chunks)
        return chunks

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for chunk in self.chunks(epoch):
            yield [(epoch, position) for position in chunk]

    def __len__(self) -> int:
        return len(self.chunks())


def split_by_size(sizes: Sequence[tuple[int, int]], num_batches: int) -> list[list[int]]:
    """Splits items of the given (height, width) into exactly `num_batches` batches, least padding first.

    Items are ordered by height band (16 px) then width, and cut into contiguous runs that
    minimize the total padded pixels, sum over batches of len(batch) * max height * max width
    (dynamic programming, O(num_batches * n^2)). Returns lists of indices into `sizes`.
    """
    n = len(sizes)
    if not 1 <= num_batches <= n:
        raise ValueError(f"cannot split {n} items into {num_batches} non-empty batches")
    order = sorted(range(n), key=lambda i: (sizes[i][0] // 16, sizes[i][1], i))
    heights = [sizes[i][0] for i in order]
    widths = [sizes[i][1] for i in order]
    # cost[s][e]: padded pixels of the batch order[s:e]
    cost = [[0] * (n + 1) for _ in range(n + 1)]
    for start in range(n):
        max_h = max_w = 0
        for end in range(start + 1, n + 1):
            max_h, max_w = max(max_h, heights[end - 1]), max(max_w, widths[end - 1])
            cost[start][end] = (end - start) * max_h * max_w
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_batches + 1)]
    cut = [[0] * (n + 1) for _ in range(num_batches + 1)]
    best[0][0] = 0
    for j in range(1, num_batches + 1):
        for end in range(j, n - (num_batches - j) + 1):
            for start in range(j - 1, end):
                total = best[j - 1][start] + cost[start][end]
                if total < best[j][end]:
                    best[j][end], cut[j][end] = total, start
    batches, end = [], n
    for j in range(num_batches, 0, -1):
        start = cut[j][end]
        batches.append([order[i] for i in range(start, end)])
        end = start
    return batches[::-1]


def padding_efficiency(sizes: Sequence[tuple[int, int]], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded batch pixels that belong to an image (1.0 = no padding)."""
    useful = padded = 0
    for batch in batches:
        hs = [sizes[i][0] for i in batch]
        ws = [sizes[i][1] for i in batch]
        useful += sum(h * w for h, w in zip(hs, ws))
        padded += len(batch) * max(hs) * max(ws)
    return useful / max(padded, 1)


class HMERCollator:
    """A chunk of `HMERTrainDataset` items -> a list of `num_batches` model-input batches.

    Every image goes through the processor's image processor on its own (the same steps as
    inference), the processed images are split by their real sizes (`split_by_size`), and each
    batch is padded and labelled by the processor: {"pixel_values" (B, 1, H, W) float, ink 1.0
    on 0.0; "pixel_mask" (B, H, W), 1 = image; "labels" (B, T) long ending in eos, -100 padding}.
    """

    def __init__(self, processor, num_batches: int = 1):
        self.processor = processor
        self.num_batches = num_batches

    def __call__(self, items: list[dict]) -> list[dict]:
        image_processor = self.processor.image_processor
        images = [image_processor.to_model_image(item["image"]) for item in items]
        batches = []
        for batch in split_by_size([image.shape[:2] for image in images], self.num_batches):
            features = image_processor.pad_batch([images[i] for i in batch], return_tensors="pt")
            labels = self.processor.make_labels([items[i]["text"] for i in batch])
            batches.append({**features, "labels": torch.from_numpy(labels)})
        return batches


def single_thread_worker_init(worker_id: int) -> None:
    """Keeps each data-loader worker single-threaded: the training processes use the cores."""
    torch.set_num_threads(1)
