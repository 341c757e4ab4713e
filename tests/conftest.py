"""Shared test fixtures: a tiny random HMER model folder, drawn expressions, the CROHME data path.

Fixtures:
    tiny_config_kwargs  -> dict of HMERConfig arguments for a tiny model (a few thousand parameters)
    tiny_model_dir      -> path of a saved tiny model + processor (session-scoped, save_pretrained format,
                           with auto_map and code files: loads with Auto classes and trust_remote_code)
    space_model_dir     -> that model made sure of its tokens, ending every answer after 3 (`biased_model`;
                           it passes the answer check with TEST_MODEL_LIMITS)
    endless_model_dir   -> that model never writing eos (the answer check refuses all it reads)
    draw_expression     -> function(zoom=60, brush=4, invert=False, ...) -> PIL image of a hand-drawn
                           "x^2 + 1 = y" (see `draw_expression_image`)
    expression_strokes  -> the strokes of that drawing (list of (N, 2) float arrays, y down)
    shared_crohme       -> pathlib.Path of ../shared/crohme, or the test is skipped saying why
    crohme_real         -> the real CROHME splits prepared once per test session (a `Crohme` builder)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw


# Tests never reach the Hub; the local Hub server tests switch this off in their own subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def expression_strokes_list() -> list[np.ndarray]:
    """Strokes of a small hand-drawn "x^2 + 1 = y": symbols about 1 unit high, x right, y down."""
    t = np.linspace(np.pi, 0.0, 12)
    strokes = [
        [(0.0, 0.0), (0.7, 1.0)],  # x
        [(0.7, 0.0), (0.0, 1.0)],
        [*zip(1.2 + 0.2 * np.cos(t), -0.3 - 0.2 * np.sin(t)), (1.0, 0.1), (1.45, 0.1)],  # superscript 2
        [(1.8, 0.5), (2.5, 0.5)],  # +
        [(2.15, 0.15), (2.15, 0.85)],
        [(2.9, 0.2), (3.1, 0.0), (3.1, 1.0)],  # 1
        [(3.5, 0.35), (4.2, 0.35)],  # =
        [(3.5, 0.7), (4.2, 0.7)],
        [(4.5, 0.0), (4.85, 0.6)],  # y
        [(5.2, 0.0), (4.7, 1.3)],
    ]
    return [np.asarray(s, dtype=np.float64) for s in strokes]


def draw_expression_image(
    zoom: float = 60.0,
    brush: int = 4,
    invert: bool = False,
    transparent: bool = False,
    pad: int = 40,
    strokes: list[np.ndarray] | None = None,
) -> Image.Image:
    """Draws the expression like a sketch pad would, with PIL lines and round ends.

    zoom: pixels per symbol height; brush: line width in px; invert: white ink on black instead of black
    on white; transparent: an RGBA image with blue ink on a fully transparent background; pad: blank border.
    """
    strokes = expression_strokes_list() if strokes is None else strokes
    points = np.concatenate(strokes)
    low, high = points.min(axis=0), points.max(axis=0)
    width = int(round((high[0] - low[0]) * zoom)) + 2 * pad
    height = int(round((high[1] - low[1]) * zoom)) + 2 * pad
    if transparent:
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        ink = (30, 40, 200, 255)
    else:
        image = Image.new("L", (width, height), 0 if invert else 255)
        ink = 255 if invert else 0
    draw = ImageDraw.Draw(image)
    r = brush / 2
    for stroke in strokes:
        xy = [tuple(p) for p in (stroke - low) * zoom + pad]
        draw.line(xy, fill=ink, width=brush, joint="curve")
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=ink)
    return image


@pytest.fixture(scope="session")
def expression_strokes():
    return expression_strokes_list()


@pytest.fixture(scope="session")
def draw_expression():
    return draw_expression_image


@pytest.fixture(scope="session")
def tiny_config_kwargs() -> dict:
    """A tiny GRU-decoder HMER: the real architecture at toy width, fast on CPU."""
    return {
        "growth_rate": 4,
        "block_config": [2, 2, 2],
        "num_init_features": 8,
        "hidden_size": 32,
        "embedding_size": 16,
        "attention_dim": 32,
        "coverage_channels": 4,
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_config_kwargs) -> Path:
    """A folder with a tiny random model, its generation config, tokenizer and processor (save_pretrained)."""
    import torch

    from modeling_hmer import HMERConfig, HMERForConditionalGeneration, HMERImageProcessor, HMERProcessor, HMERTokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_hmer")
    model = HMERForConditionalGeneration(HMERConfig(**tiny_config_kwargs)).eval()
    model.save_pretrained(folder)
    HMERProcessor(HMERImageProcessor(), HMERTokenizer()).save_pretrained(folder)
    return folder


def biased_model(tiny_model_dir, folder: Path, eos_bias: float) -> Path:
    """The tiny random model, made sure of its tokens, to write 3 to 8 real symbols (never <unk>), with
    `eos_bias` on eos."""
    import torch

    from modeling_hmer import HMERForConditionalGeneration, HMERProcessor

    model = HMERForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = HMERProcessor.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        # sharpen the random logits: a model sure of its (random) tokens, as a trained one is
        model.decoder.lm_head.weight *= 100
        model.decoder.lm_head.bias *= 100
        model.decoder.lm_head.bias[processor.tokenizer.unk_token_id] = -1e4
        model.decoder.lm_head.bias[processor.tokenizer.eos_token_id] += eos_bias
    model.generation_config.min_new_tokens = 3
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# The test model's eos bias makes every token before eos improbable (generate's log-softmax comes before
# min_new_tokens bans eos), so its answers pass the confidence check only with no probability floor;
# test_unsure_model_is_refused checks that floor on its own.
TEST_MODEL_LIMITS = {"min_mean_log_prob": -1e9}


@pytest.fixture(scope="session")
def space_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random model that ends every reading with eos after its 3 symbols (a finished answer); the
    Space's tests serve it, the pipeline's read with it."""
    return biased_model(tiny_model_dir, tmp_path_factory.mktemp("space_model"), eos_bias=1e4)


@pytest.fixture(scope="session")
def endless_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random model that never writes eos: the model "finds no end" to whatever it reads."""
    return biased_model(tiny_model_dir, tmp_path_factory.mktemp("endless_model"), eos_bias=-1e4)


@pytest.fixture(scope="session")
def shared_crohme() -> Path:
    """../shared/crohme (read-only CROHME archives); skips when the folder is not there."""
    path = REPO_ROOT.parent / "shared" / "crohme"
    if not (path / "TrainINKML.tar.gz").is_file() and not (path / "TrainINKML").is_dir():
        pytest.skip(f"CROHME data not found at {path} (expected the shared data folder next to the repository)")
    return path


@pytest.fixture(scope="session")
def crohme_real(shared_crohme, tmp_path_factory):
    """All three real splits, prepared once per test session from the archives (about a minute on
    2 cores) into the session's temporary folder; `.as_dataset(split)` gives each."""
    from data_scripts.crohme import Crohme

    builder = Crohme(data_dir=str(shared_crohme), cache_dir=str(tmp_path_factory.mktemp("crohme_cache")))
    builder.download_and_prepare(num_proc=min(2, os.cpu_count() or 1))
    return builder
