"""The Gradio Space (space/app.py) through its API, with gradio_client, on 127.0.0.1.

The app is launched in this process with a tiny random model (outputs are random tokens, so the
tests check the plumbing: types, messages, limits, load), the way `python space/app.py` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
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

from conftest import TEST_MODEL_LIMITS  # also imported from here by test_space_browser.py
from modeling_hmer import NotAnExpressionError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed")
pytest.importorskip("gradio", reason="gradio is not installed")

REPO = Path(__file__).resolve().parent.parent
APP_FILE = REPO / "space" / "app.py"
NOT_AN_EXPRESSION = "this does not look like a handwritten expression"


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


def save_png(image: Image.Image, folder: Path, name: str) -> str:
    path = folder / name
    image.save(path)
    return str(path)


def page_of_text(size=(1200, 1600), lines=40) -> Image.Image:
    """A printed page: lines of words, black on white."""
    from PIL import ImageFont

    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over a lazy dog while reading handwritten math".split()
    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=22)
    for line in range(lines):
        draw.text((60, 50 + line * 37), " ".join(rng.choice(words, 9)), fill=0, font=font)
    return page


def photo() -> Image.Image:
    """A photo of a scene: gradio's bundled cheetah picture, else a smooth shaded synthetic scene."""
    import gradio

    bundled = Path(gradio.__file__).parent / "media_assets" / "images" / "cheetah.jpg"
    if bundled.is_file():
        return Image.open(bundled).convert("RGB")
    y, x = np.mgrid[0:400, 0:600] / 100.0
    scene = 0.5 + 0.25 * np.sin(x * 1.3 + np.cos(y * 2.1)) + 0.2 * np.cos(y * 0.7 - x * 0.4)
    return Image.fromarray((np.clip(scene, 0, 1) * 255).astype(np.uint8)).convert("RGB")


def bad_pictures(folder: Path, drawing: Image.Image) -> dict[str, tuple[str, str]]:
    """Bad uploads: name -> (file path, a phrase of the message that must answer it).

    Also used by the browser tests, which upload each of them on the Upload tab.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.png"  # a text file renamed .png
    text.write_text("this is text, not a picture\n" * 50)
    whole = save_png(drawing, folder, "whole.png")
    truncated = folder / "truncated.png"
    data = Path(whole).read_bytes()
    truncated.write_bytes(data[: len(data) * 6 // 10])
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    photo_path = folder / "photo.jpg"
    photo().save(photo_path, quality=90)
    return {
        "not an image": (str(text), "not a picture this demo can read"),
        "truncated": (str(truncated), "damaged or cut short"),
        "blank": (save_png(Image.new("L", (400, 200), 255), folder, "blank.png"), "blank"),
        "tiny": (save_png(Image.fromarray(noise[:5, :5, 0]), folder, "tiny.png"), "too small"),
        "too many pixels": (save_png(Image.new("1", (15_000, 10_000), 1), folder, "too_big.png"), "megapixels"),
        "noise": (save_png(Image.fromarray(noise), folder, "noise.png"), NOT_AN_EXPRESSION),
        "photo": (str(photo_path), NOT_AN_EXPRESSION),
        "page of text": (save_png(page_of_text(), folder, "page.png"), NOT_AN_EXPRESSION),
    }


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def app():
    return load_space_app()


@pytest.fixture(scope="module")
def served(app, space_model_dir):
    """(client, demo) for the app on 127.0.0.1; demo.generate_calls counts the model's decodings."""
    recognizer = app.Recognizer(str(space_model_dir))
    recognizer.answer_limits = TEST_MODEL_LIMITS
    demo = app.build_demo(recognizer=recognizer)
    generate = demo.recognizer.model.generate
    demo.generate_calls = []

    def counting_generate(*args, **kwargs):
        demo.generate_calls.append(kwargs)
        return generate(*args, **kwargs)

    demo.recognizer.model.generate = counting_generate
    with launch_app(demo, app) as url:
        yield gradio_client.Client(url, verbose=False), demo


@pytest.fixture(scope="module")
def drawing(tmp_path_factory, draw_expression) -> str:
    return save_png(draw_expression(zoom=60, brush=4), tmp_path_factory.mktemp("space_inputs"), "drawing.png")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, draw_expression) -> dict[str, tuple[str, str]]:
    return bad_pictures(tmp_path_factory.mktemp("bad_pictures"), draw_expression(zoom=60, brush=4))


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
    # Shares: best first, summing to 100%.
    shares = [c["share"] for c in candidates]
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) - 1) < 1e-3 and all(s > 0 for s in shares)
    assert 0 < seconds < 30
    # Same answer as the model used directly (greedy), so the API really runs it on this image.
    from modeling_hmer import HMERForConditionalGeneration, HMERProcessor

    processor = HMERProcessor.from_pretrained(space_model_dir)
    model = HMERForConditionalGeneration.from_pretrained(space_model_dir).eval()
    ids = model.generate(**processor(images=Image.open(drawing)), num_beams=1)
    assert predict(client, drawing, beams=1)[0] == processor.batch_decode(ids)[0]


def test_api_lists_named_inputs_and_outputs(served):
    client, _ = served
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/recognize"]
    assert [p["label"] for p in endpoint["parameters"]] == ["image", "num_beams"]
    assert [r["label"] for r in endpoint["returns"]] == ["latex", "candidates", "seconds"]
    # The page's own events are not part of the API.
    assert set(client.view_api(return_format="dict", print_info=False)["named_endpoints"]) == {"/recognize"}


def test_recognition_has_one_attention_map_per_token(served, draw_expression, app):
    _, demo = served
    result = demo.recognizer.recognize(draw_expression(), num_beams=5)
    assert result.tokens and result.latex == " ".join(result.tokens)
    assert result.attention_maps.shape == (len(result.tokens), *result.model_input.shape)
    assert result.attention_maps.min() >= 0 and result.attention_maps.max() <= 1
    # The model input is the processed image, ink 1.0 on 0.0; the maps peak somewhere (normalised to 1 each).
    assert result.model_input.dtype == np.float32 and np.median(result.model_input) == 0
    assert np.allclose(result.attention_maps.reshape(len(result.tokens), -1).max(1), 1.0)
    overlay = demo.recognizer.heatmap(result, 0)  # the pipeline's attention_heatmap
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
    assert "blank" in str(error.value) and "upload a picture of a handwritten expression" in str(error.value)
    assert "Traceback" not in str(error.value)


def test_missing_image_says_what_to_do(served):
    client, _ = served
    with pytest.raises(Exception, match="no image given"):
        client.predict(None, 1, api_name="/recognize")


BAD_KINDS = ["not an image", "truncated", "blank", "tiny", "too many pixels", "noise", "photo", "page of text"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_picture_gets_a_message_before_decoding(served, bad, kind):
    """Each bad upload is answered with what to do, without the model decoding anything."""
    client, demo = served
    path, phrase = bad[kind]
    before = len(demo.generate_calls)
    with pytest.raises(Exception) as error:
        predict(client, path, beams=5)
    message = str(error.value)
    assert phrase in message, message
    assert ":" in message and "Traceback" not in message
    assert len(demo.generate_calls) == before, "a bad picture reached the decoder"


def test_model_that_finds_no_end_is_refused(app, endless_model_dir, drawing):
    """The model's own confidence: a reading that does not end within the ink's bound is refused."""
    recognizer = app.Recognizer(str(endless_model_dir))
    with pytest.raises(NotAnExpressionError, match=NOT_AN_EXPRESSION + ": the model found no end"):
        recognizer.recognize(recognizer.open_file(drawing), num_beams=3)


def test_unsure_model_is_refused(app, space_model_dir, drawing):
    """The model's own confidence: the test model, whose tokens before its forced eos are all
    improbable, is refused under the default limits."""
    recognizer = app.Recognizer(str(space_model_dir))
    with pytest.raises(NotAnExpressionError, match=NOT_AN_EXPRESSION + ": the model is unsure of every symbol"):
        recognizer.recognize(recognizer.open_file(drawing), num_beams=1)


def test_decoding_is_bounded_by_the_ink(served, app, tmp_path):
    """max_new_tokens given to the model follows the pieces of ink, never the model's default alone."""
    client, demo = served
    one_stroke = Image.new("L", (400, 200), 255)
    ImageDraw.Draw(one_stroke).line([(50, 150), (200, 40), (350, 150)], fill=0, width=6)
    predict(client, save_png(one_stroke, tmp_path, "stroke.png"), beams=2)
    limits = demo.recognizer.processor.max_new_tokens_for({"pieces": 1}, 10_000)
    assert demo.generate_calls[-1]["max_new_tokens"] == min(limits, demo.recognizer.max_new_tokens)
    assert demo.recognizer.processor.max_new_tokens_for({"pieces": 1}, 10_000) < 100
    # Beams shrink when the longest decoding the ink allows would run long; small pictures keep them.
    from modeling_hmer.pipeline_hmer import affordable_beams

    budget = app.MAX_DECODING_COST
    assert affordable_beams(10, 200, 1024, budget) < 10 and affordable_beams(10, 40, 60, budget) == 10


def test_huge_upload_is_read(served, tmp_path):
    """A 10000x10000 drawing is read (shrunk before the image processor)."""
    client, _ = served
    image = Image.new("L", (10_000, 10_000), 255)
    draw = ImageDraw.Draw(image)
    for k in range(4):
        draw.line([(2000 + 1500 * k, 3500), (2800 + 1500 * k, 6500)], fill=0, width=90)
    path = save_png(image, tmp_path, "huge.png")
    del image, draw
    latex, _, _ = predict(client, path)
    assert latex.strip()


def test_upload_size_limit(served, tmp_path):
    client, _ = served
    noise = np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)  # ~13 MB as PNG
    path = save_png(Image.fromarray(noise), tmp_path, "big_file.png")
    assert os.path.getsize(path) > 10 * 1024 * 1024
    with pytest.raises(Exception) as error:
        predict(client, path)
    assert "more than the 10 MB this demo accepts" in str(error.value)


def test_twenty_simultaneous_requests_all_answered(served, drawing):
    client, _ = served
    start = time.perf_counter()
    latencies = [0.0] * 20

    def one(k):
        answer = client.submit(gradio_client.handle_file(drawing), 1 + k % 3, api_name="/recognize").result(
            timeout=120)
        latencies[k] = time.perf_counter() - start
        return answer

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    assert len(answers) == 20
    assert all(isinstance(latex, str) and latex.strip() for latex, _, _ in answers)
    # Equal beam sizes give equal answers: requests do not leak into each other.
    by_beam = {}
    for k, (latex, _, _) in enumerate(answers):
        by_beam.setdefault(1 + k % 3, set()).add(latex)
    assert all(len(found) == 1 for found in by_beam.values()), by_beam
    print(f"\n20 concurrent requests: all answered in {max(latencies):.2f} s; latency median "
          f"{np.median(latencies):.2f} s, max {max(latencies):.2f} s")


def test_typesettable_latex_renders_in_katex(app, tmp_path):
    """Every candidate the page shows typesets: random token strings (what a random or confused model
    writes) through `typesettable` render in KaTeX, and well-formed LaTeX is left as it is."""
    import random
    import shutil

    import gradio

    bundles = sorted((Path(gradio.__file__).parent / "templates" / "frontend" / "assets").glob("katex-*.js"))
    if not bundles or not shutil.which("node"):
        pytest.skip("needs node and the KaTeX bundle shipped with gradio")
    vocab = [t for t in json.loads((REPO / "checkpoints" / "vocab.json").read_text()) if not t.startswith("<")]
    heavy = {"{", "}", "^", "_", "'", "\\frac", "\\sqrt", "\\limits", "[", "]"}
    rng = random.Random(0)
    weights = [8 if t in heavy else 1 for t in vocab]
    random_texts = [" ".join(rng.choices(vocab, weights, k=rng.randint(1, 12))) for _ in range(2000)]
    well_formed = ["\\frac { a } { b }", "x ^ { 2 } + 1", "f ' ' ( x )", "\\sqrt [ 3 ] { x }", "| x |",
                   "\\sum \\limits _ { i = 1 } ^ { n } i", "x _ { 1 } ^ { 2 }", "\\{ a \\}"]
    for text in well_formed:
        assert app.typesettable(text) == text.replace("|", "\\vert").replace("' '", "''").replace(" '", "'"), text
    shutil.copy(bundles[0], tmp_path / "katex.mjs")
    shown = [f"\\displaystyle {app.typesettable(t)}" for t in random_texts + well_formed]
    (tmp_path / "inputs.json").write_text(json.dumps(shown))
    (tmp_path / "check.mjs").write_text(
        "import katex from './katex.mjs';\nimport fs from 'fs';\nconst failed = [];\n"
        "for (const e of JSON.parse(fs.readFileSync(process.argv[2]))) {\n"
        "  try { katex.renderToString(e, {throwOnError: true}); } catch (err) { failed.push(e + ' : ' + err.message); }\n"
        "}\nconsole.log(JSON.stringify(failed));\n")
    run = subprocess.run(["node", str(tmp_path / "check.mjs"), str(tmp_path / "inputs.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []


def test_candidates_table_keeps_the_models_ranking_with_shares(app):
    # The answer shown is the model's first candidate: row 1 is that answer, even when a shorter reading
    # below it holds a larger share of the probability.
    table = app.candidates_table([("x", 0.2), ("\\frac { a } { b", 0.7), ("y", 0.1)])
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[3].strip() for row in rows] == ["20%", "70%", "10%"]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    assert "\\frac { a } { b }" in rows[1]  # typeset with its brace closed; the LaTeX column as read
    assert "`\\frac { a } { b`" in rows[1]
    assert "share" in table.splitlines()[0]


def test_gallery_has_one_picture_per_written_symbol(app):
    tokens = "\\frac { x ^ { 2 } } { \\alpha _ { i } }".split()
    pictures = app.symbol_pictures(tokens, np.zeros((len(tokens), 4, 4)))
    assert [caption for _, caption in pictures] == ["fraction bar", "x", "2", "α", "i"]
    assert [tokens[k] for k, _ in pictures] == ["\\frac", "x", "2", "\\alpha", "i"]


def test_shares_are_the_pipelines(served, draw_expression):
    """One share computation: the page shows the pipeline's candidates and shares, best first."""
    _, demo = served
    drawing = draw_expression()
    result = demo.recognizer.recognize(drawing, num_beams=4)
    direct = demo.recognizer.pipe(drawing, num_beams=4, answer_limits=TEST_MODEL_LIMITS)
    assert result.candidates == [(c["latex"], c["share"]) for c in direct["candidates"]]
    shares = [share for _, share in result.candidates]
    assert abs(sum(shares) - 1) < 1e-6
    # the test model's candidates are all 3 tokens long: the shares then follow the model's ranking
    assert shares == sorted(shares, reverse=True)


def test_no_model_stops_with_what_to_do(tmp_path):
    env = {**os.environ, "HMER_MODEL": str(tmp_path / "no_such_model"), "GRADIO_SERVER_PORT": str(free_port()),
           "GRADIO_SERVER_NAME": "127.0.0.1"}
    run = subprocess.run([sys.executable, str(APP_FILE)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "HMER_MODEL" in run.stderr and "Train" in run.stderr
    assert "Traceback" not in run.stderr


def test_model_path_resolution(app, tmp_path, monkeypatch, space_model_dir):
    """The pipeline module's resolve_model, fed HMER_MODEL and the Space's default folders."""
    from modeling_hmer import ModelNotFoundError

    monkeypatch.delenv("HMER_MODEL", raising=False)
    assert app.find_model(space_model_dir) == str(space_model_dir)
    monkeypatch.setenv("HMER_MODEL", str(space_model_dir))
    assert app.find_model() == str(space_model_dir)
    monkeypatch.setenv("HMER_MODEL", "someone/hmer-crohme")  # a Hub id only when named
    assert app.find_model() == "someone/hmer-crohme"
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        app.find_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither a model folder nor a Hub id"):
        app.find_model(tmp_path / "a" / "b" / "c")
    monkeypatch.delenv("HMER_MODEL")
    monkeypatch.setattr(app, "DEFAULT_MODEL_DIRS", (tmp_path / "absent",))
    with pytest.raises(ModelNotFoundError, match="no trained model in .*HMER_MODEL"):
        app.find_model()


def test_sketch_pad_value_to_image(app, served):
    """The sketch pad sends transparent RGBA layers; ink must come out black on white."""
    _, demo = served
    layer = Image.new("RGBA", (800, 300), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line([(100, 100), (300, 200)], fill=(0, 0, 0, 255), width=6)
    sketch = {"background": None, "layers": [layer], "composite": layer}
    image = app.sketch_to_image(sketch)
    pixels = np.asarray(image)
    assert image.mode == "L" and pixels[150, 200] < 64 and pixels[20, 20] == 255
    for empty in ({"background": None, "layers": [], "composite": None}, Image.new("RGBA", (800, 300), (0, 0, 0, 0)),
                  Image.new("RGBA", (800, 300), (255, 255, 255, 255))):  # untouched; painted white all over
        result, message = app.recognize_or_explain(demo.recognizer, lambda: app.sketch_to_image(empty),
                                                   app.EMPTY_DRAWING, app.EMPTY_DRAWING)
        assert result is None and message.startswith("the sketch pad is empty")
    # White ink on a transparent background (an upload) is ink: the image processor reads either polarity.
    white_ink = Image.new("RGBA", (400, 200), (255, 255, 255, 0))
    ImageDraw.Draw(white_ink).line([(50, 50), (350, 150)], fill=(255, 255, 255, 255), width=5)
    result, message = app.recognize_or_explain(demo.recognizer, lambda: white_ink, app.EMPTY_UPLOAD,
                                               app.BLANK_PICTURE, num_beams=1)
    assert message is None and result.latex


def test_loads_without_the_package(space_model_dir, drawing):
    """A Space holding only app.py and the model folder: the saved code loads with trust_remote_code,
    the expression check included."""
    script = f"""
import importlib.util, sys
sys.modules["modeling_hmer"] = None  # `import modeling_hmer` fails, as on a Space without the package
spec = importlib.util.spec_from_file_location("app", {str(APP_FILE)!r})
app = importlib.util.module_from_spec(spec); sys.modules["app"] = app; spec.loader.exec_module(app)
assert app.find_model({str(space_model_dir)!r}) == {str(space_model_dir)!r}  # resolve_model from the folder's code
recognizer = app.Recognizer({str(space_model_dir)!r})
assert recognizer.checks
recognizer.answer_limits = {TEST_MODEL_LIMITS!r}
result = recognizer.recognize(recognizer.open_file({drawing!r}), num_beams=2)
print(type(recognizer.model).__module__, len(result.tokens), result.attention_maps.shape[0], repr(result.latex))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    module, n_tokens, n_maps, latex = run.stdout.strip().splitlines()[-1].split(" ", 3)
    assert module.startswith("transformers_modules."), module
    assert int(n_tokens) == int(n_maps) > 0 and latex.strip("'")
