"""The Gradio Space (space/app.py) through its API, with gradio_client, on 127.0.0.1.

The app is launched in this process with a tiny random model (outputs are random tokens, so the
tests check the plumbing: types, messages, limits, load), the way `python space/app.py` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
pytest.importorskip("gradio", reason="gradio is not installed")

REPO = Path(__file__).resolve().parent.parent
APP_FILE = REPO / "space" / "app.py"
EMPTY_MESSAGE = "draw or upload an expression"


# ------------------------------------------------------------------------------------------------
# helpers, also used by test_space_browser.py


def load_space_app():
    """Import space/app.py (not a package) once, as module `hmer_space_app`."""
    if "hmer_space_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hmer_space_app", APP_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["hmer_space_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["hmer_space_app"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launch_app(demo, app):
    """Serve `demo` on 127.0.0.1 (a free port) with the app's own launch settings; yields its URL."""
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs())
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="session")
def space_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model, made to write 3 to 8 real symbols: never empty, never long, never <unk>."""
    import torch

    from modeling_hmer import HMERForConditionalGeneration, HMERProcessor

    model = HMERForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.decoder.lm_head.bias[HMERProcessor.from_pretrained(tiny_model_dir).tokenizer.unk_token_id] = -1e4
    model.generation_config.min_new_tokens = 3
    model.generation_config.max_new_tokens = 8
    folder = tmp_path_factory.mktemp("space_model")
    model.save_pretrained(folder)
    HMERProcessor.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def save_png(image: Image.Image, folder: Path, name: str) -> str:
    path = folder / name
    image.save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def app():
    return load_space_app()


@pytest.fixture(scope="module")
def served(app, space_model_dir):
    """(client, demo) for the app on 127.0.0.1."""
    demo = app.build_demo(space_model_dir)
    with launch_app(demo, app) as url:
        yield gradio_client.Client(url, verbose=False), demo


@pytest.fixture(scope="module")
def drawing(tmp_path_factory, draw_expression) -> str:
    return save_png(draw_expression(zoom=60, brush=4), tmp_path_factory.mktemp("space_inputs"), "drawing.png")


def predict(client, path, beams=1):
    return client.predict(gradio_client.handle_file(path), beams, api_name="/recognize")


# ------------------------------------------------------------------------------------------------
# tests


def test_api_recognize_returns_latex_first(served, drawing, space_model_dir):
    client, demo = served
    latex, candidates, seconds = predict(client, drawing, beams=3)
    assert isinstance(latex, str) and latex.strip()
    vocab = set(demo.recognizer.tokenizer.get_vocab())
    assert set(latex.split()) <= vocab
    assert candidates[0]["latex"] == latex
    assert 1 <= len(candidates) <= 3
    assert len({c["latex"] for c in candidates}) == len(candidates)
    assert all(0.0 < c["probability"] <= 1.0 for c in candidates)
    assert 0 < seconds < 30
    # Same answer as the model used directly (greedy), so the API really runs it on this image.
    from modeling_hmer import HMERForConditionalGeneration, HMERProcessor

    processor = HMERProcessor.from_pretrained(space_model_dir)
    model = HMERForConditionalGeneration.from_pretrained(space_model_dir).eval()
    ids = model.generate(**processor(images=Image.open(drawing)), num_beams=1)
    assert predict(client, drawing, beams=1)[0] == processor.batch_decode(ids)[0]


def test_recognition_has_one_attention_map_per_token(served, draw_expression, app):
    _, demo = served
    result = demo.recognizer.recognize(app.prepare_image(draw_expression()), num_beams=5)
    assert result.tokens and result.latex == " ".join(result.tokens)
    assert result.attention_maps.shape == (len(result.tokens), *result.model_input.shape)
    assert result.attention_maps.min() >= 0 and result.attention_maps.max() <= 1
    # The model input is black ink on white; the maps peak somewhere (normalised to 1 each).
    assert result.model_input.dtype == np.uint8 and np.median(result.model_input) == 255
    assert np.allclose(result.attention_maps.reshape(len(result.tokens), -1).max(1), 1.0)
    overlay = app.attention_overlay(result.model_input, result.attention_maps[0])
    assert overlay.mode == "RGB" and overlay.size[0] >= result.model_input.shape[1]


@pytest.mark.parametrize("kind", ["white", "black", "transparent", "noise-free gray"])
def test_blank_input_says_what_to_do(served, tmp_path, kind):
    client, _ = served
    image = {
        "white": Image.new("L", (400, 200), 255),
        "black": Image.new("RGB", (400, 200), (0, 0, 0)),
        "transparent": Image.new("RGBA", (800, 300), (0, 0, 0, 0)),
        "noise-free gray": Image.new("L", (300, 300), 128),
    }[kind]
    with pytest.raises(Exception) as error:
        predict(client, save_png(image, tmp_path, "blank.png"))
    assert EMPTY_MESSAGE in str(error.value)
    assert "Traceback" not in str(error.value)


def test_missing_image_says_what_to_do(served):
    client, _ = served
    with pytest.raises(Exception, match=EMPTY_MESSAGE):
        client.predict(None, 1, api_name="/recognize")


def test_non_image_is_refused(served, tmp_path):
    client, _ = served
    path = tmp_path / "notes.png"
    path.write_text("this is text, not a picture\n" * 50)
    with pytest.raises(Exception, match="not an image"):
        predict(client, str(path))


def test_huge_upload_is_handled_quickly(served, tmp_path):
    """A 10000x10000 drawing is read (shrunk) in a few seconds; 150 megapixels are refused with a message."""
    client, _ = served
    image = Image.new("L", (10_000, 10_000), 255)
    draw = ImageDraw.Draw(image)
    for k in range(4):
        draw.line([(2000 + 1500 * k, 3500), (2800 + 1500 * k, 6500)], fill=0, width=90)
    path = save_png(image, tmp_path, "huge.png")
    del image, draw
    start = time.perf_counter()
    latex, _, _ = predict(client, path)
    elapsed = time.perf_counter() - start
    assert latex.strip() and elapsed < 10, elapsed

    too_big = save_png(Image.new("1", (15_000, 10_000), 1), tmp_path, "too_big.png")
    start = time.perf_counter()
    with pytest.raises(Exception, match="megapixels"):
        predict(client, too_big)
    assert time.perf_counter() - start < 5


def test_upload_size_limit(served, tmp_path):
    client, _ = served
    noise = np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)  # ~13 MB as PNG
    path = save_png(Image.fromarray(noise), tmp_path, "big_file.png")
    assert os.path.getsize(path) > 10 * 1024 * 1024
    with pytest.raises(Exception) as error:
        predict(client, path)
    assert "size" in str(error.value).lower() or "413" in str(error.value)


def test_twenty_simultaneous_requests_all_answered(served, drawing):
    client, _ = served
    start = time.perf_counter()
    jobs = [client.submit(gradio_client.handle_file(drawing), 1 + k % 3, api_name="/recognize") for k in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert len(answers) == 20
    assert all(isinstance(latex, str) and latex.strip() for latex, _, _ in answers)
    # Equal beam sizes give equal answers: requests do not leak into each other.
    by_beam = {}
    for k, (latex, _, _) in enumerate(answers):
        by_beam.setdefault(1 + k % 3, set()).add(latex)
    assert all(len(found) == 1 for found in by_beam.values()), by_beam
    print(f"\n20 concurrent requests answered in {time.perf_counter() - start:.2f} s")


def test_no_model_stops_with_what_to_do(tmp_path):
    env = {**os.environ, "HMER_MODEL": str(tmp_path / "no_such_model"), "GRADIO_SERVER_PORT": str(free_port()),
           "GRADIO_SERVER_NAME": "127.0.0.1"}
    run = subprocess.run([sys.executable, str(APP_FILE)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "HMER_MODEL" in run.stderr and "Train" in run.stderr
    assert "Traceback" not in run.stderr


def test_model_path_resolution(app, tmp_path, monkeypatch, space_model_dir):
    monkeypatch.delenv("HMER_MODEL", raising=False)
    assert app.resolve_model_path(space_model_dir) == str(space_model_dir)
    monkeypatch.setenv("HMER_MODEL", str(space_model_dir))
    assert app.resolve_model_path() == str(space_model_dir)
    monkeypatch.setenv("HMER_MODEL", "someone/hmer-crohme")  # a Hub id only when named
    assert app.resolve_model_path() == "someone/hmer-crohme"
    with pytest.raises(app.ModelNotFoundError, match="no config.json"):
        app.resolve_model_path(tmp_path)
    with pytest.raises(app.ModelNotFoundError, match="neither a model folder nor a Hub id"):
        app.resolve_model_path(tmp_path / "a" / "b" / "c")


def test_sketch_pad_value_to_image(app):
    """The sketch pad sends transparent RGBA layers; ink must come out black on white."""
    layer = Image.new("RGBA", (800, 300), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line([(100, 100), (300, 200)], fill=(0, 0, 0, 255), width=6)
    sketch = {"background": None, "layers": [layer], "composite": layer}
    image = app.prepare_image(app.sketch_to_image(sketch), on_white=True)
    pixels = np.asarray(image)
    assert image.mode == "L" and pixels[150, 200] < 64 and pixels[20, 20] == 255
    with pytest.raises(app.UserInputError, match=EMPTY_MESSAGE):
        app.prepare_image(app.sketch_to_image({"background": None, "layers": [], "composite": None}))
    # (an empty transparent canvas is refused when read: test_blank_input_says_what_to_do)
    # White ink on a transparent background is ink (the image processor reads either polarity).
    white_ink = Image.new("RGBA", (400, 200), (255, 255, 255, 0))
    ImageDraw.Draw(white_ink).line([(50, 50), (350, 150)], fill=(255, 255, 255, 255), width=5)
    assert app.prepare_image(white_ink).mode == "RGBA"


def test_loads_without_the_package(space_model_dir, drawing):
    """A Space holding only app.py and the model folder: the saved code loads with trust_remote_code."""
    script = f"""
import importlib.util, sys
sys.modules["modeling_hmer"] = None  # `import modeling_hmer` fails, as on a Space without the package
spec = importlib.util.spec_from_file_location("app", {str(APP_FILE)!r})
app = importlib.util.module_from_spec(spec); sys.modules["app"] = app; spec.loader.exec_module(app)
recognizer = app.Recognizer({str(space_model_dir)!r})
result = recognizer.recognize(app.open_image_file({drawing!r}), num_beams=2)
print(type(recognizer.model).__module__, len(result.tokens), result.attention_maps.shape[0], repr(result.latex))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    module, n_tokens, n_maps, latex = run.stdout.strip().splitlines()[-1].split(" ", 3)
    assert module.startswith("transformers_modules."), module
    assert int(n_tokens) == int(n_maps) > 0 and latex.strip("'")
