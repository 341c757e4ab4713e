"""The prediction command line: python -m modeling_hmer.predict IMAGE... --model DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from modeling_hmer import predict


@pytest.fixture(scope="module")
def images(tmp_path_factory, draw_expression):
    folder = tmp_path_factory.mktemp("images")
    good = folder / "drawing.png"
    draw_expression().save(good)
    second = folder / "inverted.jpg"
    draw_expression(zoom=40, invert=True).convert("RGB").save(second)
    not_image = folder / "notes.png"
    not_image.write_text("this is text, not a picture")
    blank = folder / "blank.png"
    Image.new("L", (120, 60), 255).save(blank)
    return {"good": str(good), "second": str(second), "not_image": str(not_image), "blank": str(blank)}


# The tiny random model's answers are no readings (unsure, unfinished): --read_anything keeps its output.
READ_ANYTHING = "--read_anything"


def test_prints_one_line_per_image(tiny_model_dir, images, capsys):
    code = predict.main([images["good"], images["second"], "--model", str(tiny_model_dir), "--max_new_tokens", "5",
                         READ_ANYTHING])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert len(out) == 2
    for line, path in zip(out, (images["good"], images["second"])):
        name, latex = line.split("\t")
        assert name == path and latex.strip()


def test_bad_files_are_reported_and_others_still_read(tiny_model_dir, images, capsys):
    argv = [images["not_image"], images["good"], images["blank"], "/no/such/file.png"]
    code = predict.main([*argv, "--model", str(tiny_model_dir), "--max_new_tokens", "3", READ_ANYTHING])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[0].startswith(images["good"] + "\t")
    assert len(captured.out.splitlines()) == 1
    assert f"{images['not_image']}: not an image file" in captured.err
    assert f"{images['blank']}: The image is blank" in captured.err
    assert "/no/such/file.png: file not found" in captured.err
    assert "Traceback" not in captured.err


def test_json_output_and_attention_maps(tiny_model_dir, images, tmp_path, capsys):
    attention_dir = tmp_path / "attention"
    argv = [images["good"], images["not_image"], "--model", str(tiny_model_dir), "--json", READ_ANYTHING]
    code = predict.main([*argv, "--num_beams", "2", "--max_new_tokens", "4", "--attention_dir", str(attention_dir)])
    results = json.loads(capsys.readouterr().out)
    assert code == 1
    assert results[0]["image"] == images["good"]
    assert isinstance(results[0]["latex"], str) and isinstance(results[0]["score"], float) and results[0]["ms"] > 0
    assert results[1]["image"] == images["not_image"] and "not an image" in results[1]["error"]
    maps = sorted(attention_dir.glob("drawing_*.png"))
    tokens = results[0]["latex"].split()
    # one map per generated token, eos included unless the length limit stopped the search
    assert len(tokens) <= len(maps) <= len(tokens) + 1
    for step, path in enumerate(maps):
        assert path.name.startswith(f"drawing_{step:03d}_")
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.width > im.height > 20


def test_pictures_that_are_not_handwriting_are_reported(space_model_dir, images, tmp_path, capsys):
    """The pipeline's expression check: a noise picture is reported like an unreadable file, unless
    --read_anything."""
    import numpy as np

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)).save(noise)
    argv = [str(noise), "--model", str(space_model_dir)]
    assert predict.main(argv) == 1
    captured = capsys.readouterr()
    assert f"error: {noise}: this does not look like a handwritten expression" in captured.err
    assert captured.out == ""
    assert predict.main([*argv, READ_ANYTHING]) == 0
    assert capsys.readouterr().out.startswith(f"{noise}\t")


def test_missing_default_model_says_what_to_do(monkeypatch, tmp_path, images, capsys):
    monkeypatch.setattr(predict, "DEFAULT_MODEL_DIR", tmp_path / "checkpoints")
    assert predict.main([images["good"]]) == 2
    err = capsys.readouterr().err
    assert "no trained model" in err and "--model" in err


def test_bad_model_argument(images, tmp_path, capsys):
    assert predict.main([images["good"], "--model", str(tmp_path / "nowhere")]) == 2
    assert "neither a model folder nor a Hub id" in capsys.readouterr().err
    assert predict.main([images["good"], "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_token_file_names():
    assert predict.token_file_name("\\frac") == "frac"
    assert predict.token_file_name("{") == "lbrace"
    assert predict.token_file_name("x") == "x"
    assert predict.token_file_name("</s>") == "eos"
    assert predict.token_file_name("\\{") == "lset"
    assert predict.token_file_name("\u00b1") == "u00b1"


def test_module_entry_point(tiny_model_dir, images):
    """The documented command, in its own interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "modeling_hmer.predict", images["good"], images["not_image"], "--model",
         str(tiny_model_dir), "--max_new_tokens", "3", READ_ANYTHING],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(images["good"] + "\t")
    assert f"error: {images['not_image']}: not an image file" in proc.stderr
