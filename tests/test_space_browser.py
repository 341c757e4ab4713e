"""The Space in a real browser: draw on the sketch pad with the mouse, press Recognize, read the page.

Headless Chromium (Debian's `chromium` package) driven by Python playwright; `playwright install`
cannot download browsers here, so the test uses /usr/bin/chromium (or $HMER_CHROMIUM) and skips with
the reason when it or playwright is missing. The app runs in this process on 127.0.0.1 with a tiny
random model; every request that leaves the loopback server is blocked and recorded, which also
proves that the formula renders (KaTeX and its fonts) with no network.

    pytest tests/test_space_browser.py -s          # screenshots in /tmp/space_shots ($HMER_SPACE_SHOTS)
    HMER_WRITE_EXAMPLES=space/examples pytest tests/test_space_browser.py   # (re)writes the Space's example PNGs
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_space import BAD_KINDS, TEST_MODEL_LIMITS, bad_pictures, launch_app, load_space_app

playwright_sync = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")

CHROMIUM = os.environ.get("HMER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's: apt-get install -y chromium)",
                allow_module_level=True)

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
]
CANVAS = (800, 300)  # the sketch pad's canvas_size in app.py
# Screenshots of the first view, a result and each bad-input case, to look at.
SHOTS = Path(os.environ.get("HMER_SPACE_SHOTS", "/tmp/space_shots"))

# A small stroke font: each glyph is a list of strokes in a box 1 unit high (y down, baseline at 1).
GLYPHS = {
    "x": [[(0.0, 0.4), (0.6, 1.0)], [(0.6, 0.4), (0.0, 1.0)]],
    "y": [[(0.0, 0.4), (0.3, 0.85)], [(0.6, 0.4), (0.15, 1.3)]],
    "a": [[(0.5, 0.5), (0.35, 0.4), (0.12, 0.45), (0.0, 0.7), (0.08, 0.95), (0.3, 1.0), (0.5, 0.8)],
          [(0.5, 0.4), (0.5, 0.9), (0.6, 1.0)]],
    "b": [[(0.05, 0.0), (0.05, 1.0)],
          [(0.05, 0.65), (0.25, 0.45), (0.45, 0.5), (0.55, 0.75), (0.45, 0.95), (0.25, 1.0), (0.05, 0.9)]],
    "1": [[(0.0, 0.2), (0.2, 0.0), (0.2, 1.0)]],
    "2": [[(0.05, 0.25), (0.15, 0.08), (0.32, 0.0), (0.5, 0.05), (0.6, 0.22), (0.55, 0.42), (0.3, 0.7),
           (0.0, 1.0), (0.65, 1.0)]],
    "+": [[(0.0, 0.65), (0.6, 0.65)], [(0.3, 0.35), (0.3, 0.95)]],
    "=": [[(0.0, 0.55), (0.6, 0.55)], [(0.0, 0.8), (0.6, 0.8)]],
    "-": [[(0.0, 0.0), (1.0, 0.0)]],  # a bar of unit length at the baseline (fraction bar)
}

# Expressions: (name, [(glyph, left x, baseline y, size in canvas pixels), ...]) on the 800x300 canvas.
EXPRESSIONS = [
    ("x_squared_plus_1", [("x", 190, 210, 110), ("2", 268, 130, 60), ("+", 345, 210, 110), ("1", 450, 210, 110)]),
    ("a_over_b", [("a", 362, 128, 95), ("-", 330, 150, 140), ("b", 372, 268, 95)]),
    ("y_equals_2x_plus_1", [("y", 110, 190, 100), ("=", 200, 190, 100), ("2", 290, 190, 100),
                            ("x", 370, 190, 100), ("+", 460, 190, 100), ("1", 560, 190, 100)]),
]


def expression_strokes(items) -> list[list[tuple[float, float]]]:
    """Layout -> strokes in canvas pixels."""
    strokes = []
    for glyph, left, baseline, size in items:
        for stroke in GLYPHS[glyph]:
            strokes.append([(left + u * size, baseline - size + v * size) if glyph != "-" else
                            (left + u * size, baseline) for u, v in stroke])
    return strokes


class SketchPad:
    """Mouse access to the gradio sketch pad: canvas pixels -> screen points."""

    def __init__(self, page):
        self.page = page
        self.root = page.locator("#sketchpad")

    def brush_selected(self) -> bool:
        return "highlight" in (self.root.locator('button[aria-label="Brush"]').get_attribute("class") or "")

    def screen_transform(self):
        """Canvas pixels -> screen points: the editor shows the canvas centred in its <canvas> element,
        scaled by the zoom it displays."""
        box = self.root.locator("canvas").first.bounding_box()
        zoom = float(self.root.locator(".zoom-number span").inner_text().strip().rstrip("%")) / 100
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        return lambda x, y: (cx + (x - CANVAS[0] / 2) * zoom, cy + (y - CANVAS[1] / 2) * zoom)

    def draw(self, strokes) -> None:
        """Each stroke: press, move through its points (the brush joins them with straight lines), release."""
        to_screen, mouse = self.screen_transform(), self.page.mouse
        for stroke in strokes:
            mouse.move(*to_screen(*stroke[0]))
            mouse.down()
            for point in stroke[1:]:
                mouse.move(*to_screen(*point))
            mouse.up()
        self.page.wait_for_timeout(300)

    def press(self, label: str) -> None:
        self.root.locator(f'button[aria-label="{label}"]').click()
        self.page.wait_for_timeout(300)


def ink_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of dark pixels."""
    dark = np.asarray(image.convert("L")) < 128
    if not dark.any():
        return None
    rows, cols = np.flatnonzero(dark.any(1)), np.flatnonzero(dark.any(0))
    return cols[0], rows[0], cols[-1] + 1, rows[-1] + 1


class Seen(list):
    """The images the app gave its recognizer; `.decodes` counts the model's decodings."""

    decodes = 0


@pytest.fixture(scope="module")
def server(space_model_dir):
    """(url, seen): the app on 127.0.0.1 with a spy on what the model is given (see `Seen`)."""
    app = load_space_app()
    recognizer = app.Recognizer(str(space_model_dir))
    recognizer.answer_limits = TEST_MODEL_LIMITS
    demo = app.build_demo(recognizer=recognizer)
    seen = Seen()
    recognize, generate = recognizer.recognize, recognizer.model.generate

    def spy(image, **kwargs):
        seen.append(image.copy())
        return recognize(image, **kwargs)

    def counting_generate(*args, **kwargs):
        seen.decodes += 1
        return generate(*args, **kwargs)

    recognizer.recognize, recognizer.model.generate = spy, counting_generate
    with launch_app(demo, app) as url:
        yield url, seen


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; requests to anything but the app's own server are aborted and recorded."""
    url = server[0]
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.outside = []

    def guard(route):
        if route.request.url.startswith((url, "data:", "blob:")):
            route.continue_()
        else:
            page.outside.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.goto(url, wait_until="load")
    page.wait_for_selector("#sketchpad canvas")
    pad = SketchPad(page)
    page.wait_for_function("() => (document.querySelector('#sketchpad button[aria-label=\"Brush\"]')"
                           "?.className || '').includes('highlight')")
    page.pad = pad
    yield page
    context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def wait_until_done(page) -> None:
    """Gradio shows a status tracker over each output while an event runs and hides it after."""
    page.wait_for_function(
        "() => document.querySelector('#status [data-testid=\"status-tracker\"]')?.classList.contains('hide')")


def recognize_and_wait(page, seen: list, button: str = "#recognize") -> None:
    """Press a tab's Recognize; return once the model got the image and the page shows the answer."""
    before = len(seen)
    page.locator(button).click()
    for _ in range(600):
        if len(seen) > before:
            break
        page.wait_for_timeout(100)
    assert len(seen) > before, "the Recognize button did not reach the model"
    page.locator("#latex").wait_for(state="visible")
    wait_until_done(page)


def status_text(page) -> str:
    return page.locator("#status").inner_text()


def wait_for_status(page, phrase: str) -> str:
    page.wait_for_function("(phrase) => document.querySelector('#status').innerText.includes(phrase)", arg=phrase)
    return status_text(page)


def check_result(page, app) -> list[str]:
    """The result on the page: LaTeX, one gallery picture per written symbol captioned with it, every
    candidate typeset (no KaTeX error), shares best first. Returns the LaTeX tokens."""
    tokens = page.locator("#latex textarea").input_value().split()
    assert tokens, "the LaTeX box is empty"
    # The gallery gets all its pictures in one update: once one shows, all are there.
    page.locator("#attention .thumbnail-item img").first.wait_for(state="visible")
    captions = [c.strip() for c in page.locator("#attention .thumbnail-item").all_inner_texts()]
    expected = [caption for _, caption in app.symbol_pictures(tokens, np.zeros((len(tokens), 1, 1)))]
    assert captions == expected, (captions, tokens)
    assert page.locator("#attention .thumbnail-item img").count() == len(expected)
    page.locator("#rendered .katex").first.wait_for(state="visible")  # KaTeX renders after the update
    assert page.locator("#candidates .katex-error, #rendered .katex-error").count() == 0
    rows = page.locator("#candidates tbody tr")
    assert rows.count() >= 1 and page.locator("#candidates th").nth(2).inner_text().strip() == "share"
    assert page.locator("#candidates tbody tr td:nth-child(2) .katex").count() == rows.count()
    shares = [float(rows.nth(k).locator("td").nth(2).inner_text().strip().rstrip("%").lstrip("<"))
              for k in range(rows.count())]
    assert shares == sorted(shares, reverse=True)
    return tokens


def test_first_view(page, server):
    """What a visitor meets first: the Draw tab with examples, a hint, no empty result panels, no
    colour picker (the ink colour is fixed)."""
    shot(page, "first_view")
    assert page.locator("#draw-examples").is_visible()
    assert page.locator("#draw-examples .gallery-item, #draw-examples button").count() >= 1
    assert "press Recognize" in status_text(page)
    for panel in ("#latex", "#rendered", "#candidates", "#attention"):
        assert not page.locator(panel).is_visible(), f"{panel} is shown before there is a result"
    assert not page.locator('#sketchpad button[aria-label="Color"]').is_visible()
    for tool in ("Brush", "Erase", "Undo", "Clear canvas"):
        assert page.locator(f'#sketchpad button[aria-label="{tool}"]').is_visible(), tool
    assert page.outside == []


def test_draw_recognize_gallery(page, server):
    url, seen = server
    app = load_space_app()
    pad = page.pad
    assert pad.brush_selected(), "the brush should be selected when the page opens"
    write_examples = os.environ.get("HMER_WRITE_EXAMPLES")

    # Two drawings exercise undo and clear; all three when writing the Space's examples.
    for index, (name, items) in enumerate(EXPRESSIONS if write_examples else EXPRESSIONS[:2]):
        strokes = expression_strokes(items)
        if index:
            pad.press("Clear canvas")
        pad.draw(strokes)
        if index == 0:  # a stray stroke, then Undo: it must not reach the model
            pad.draw([[(740, 40), (780, 280)]])
            pad.press("Undo")
        recognize_and_wait(page, seen)

        # What the model got is the drawing: same canvas size, ink where the strokes went, nothing else.
        image = seen[-1]
        assert image.size == CANVAS
        drawn = np.array([point for stroke in strokes for point in stroke])
        expected = (*drawn.min(0), *drawn.max(0))
        box = ink_box(image)
        assert box is not None, "the drawing reached the model empty"
        assert all(abs(a - b) < 15 for a, b in zip(box, expected)), (box, expected)
        if write_examples:
            Path(write_examples).mkdir(parents=True, exist_ok=True)
            image.convert("L").save(Path(write_examples) / f"{name}.png", optimize=True)
        check_result(page, app)
        if index == 0:
            shot(page, "result")

    page.wait_for_function("() => document.fonts.status === 'loaded'")
    katex_fonts = page.evaluate(
        "() => [...document.fonts].filter(f => f.family.includes('KaTeX') && f.status === 'loaded').length")
    assert katex_fonts >= 1, "KaTeX fonts did not load from the app's own server"
    assert page.outside == [], f"the page tried to reach the network: {page.outside}"


def test_empty_canvas_says_what_to_do(page, server):
    url, seen = server
    before = len(seen)
    page.locator("#recognize").click()
    wait_for_status(page, "the sketch pad is empty")
    shot(page, "bad_empty_canvas")
    assert len(seen) == before, "a blank canvas must not reach the model"
    assert not page.locator("#latex").is_visible()
    assert page.outside == []


def example_matches(got: Image.Image, path: Path) -> bool:
    got = np.asarray(got.convert("L")).astype(int)
    expected = np.asarray(Image.open(path).convert("L")).astype(int)
    return got.shape == expected.shape and np.abs(got - expected).max() <= 2


@pytest.mark.parametrize("tab", ["draw", "upload"])
def test_examples_load_and_recognize(page, server, tab):
    """Each tab's examples: pick the first, press that tab's Recognize; the model gets that picture."""
    url, seen = server
    examples = sorted((Path(__file__).resolve().parent.parent / "space" / "examples").glob("*.png"))
    if not examples:
        pytest.skip("no space/examples/*.png yet (make them with HMER_WRITE_EXAMPLES=space/examples)")
    if tab == "upload":
        page.get_by_role("tab", name="Upload").click()
        page.locator("#upload").wait_for(state="visible")
    page.locator(f"#{tab}-examples .gallery-item, #{tab}-examples button").first.click()
    if tab == "upload":
        page.locator("#preview img").first.wait_for(state="visible")
        recognize_and_wait(page, seen, "#recognize-upload")
    else:
        # gradio's editor shows the example at once but sends it only a moment later: the page then
        # says so ("press Recognize again"), which is what a visitor would do
        for _ in range(10):
            page.locator("#recognize").click()
            page.wait_for_timeout(300)
            wait_until_done(page)
            if page.locator("#latex").is_visible():
                break
            assert "press Recognize again" in status_text(page)
            page.wait_for_timeout(1000)
        assert page.locator("#latex").is_visible(), status_text(page)
    assert example_matches(seen[-1], examples[0])
    check_result(page, load_space_app())
    assert page.outside == []


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    from conftest import draw_expression_image

    pictures = bad_pictures(tmp_path_factory.mktemp("bad_uploads"), draw_expression_image(zoom=60, brush=4))
    big = tmp_path_factory.mktemp("big_upload") / "big_file.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)).save(big)
    pictures["over the file size limit"] = (str(big), "more than the 10 MB")
    return pictures


def upload_and_recognize(page, path: str, phrase: str) -> str:
    """Upload `path` on the Upload tab, press its Recognize; the status message holding `phrase`."""
    page.get_by_role("tab", name="Upload").click()
    page.locator("#upload input[type=file]").set_input_files(path)
    page.wait_for_timeout(500)
    wait_until_done(page)
    page.locator("#recognize-upload").click()
    return wait_for_status(page, phrase)


@pytest.mark.parametrize("kind", [*BAD_KINDS, "over the file size limit"])
def test_bad_upload_says_what_to_do(page, server, bad, kind):
    """Each bad upload on the Upload tab ends in a message saying what to do (not a bare "Error") and
    never reaches the decoder."""
    url, seen = server
    path, phrase = bad[kind]
    before = seen.decodes
    message = upload_and_recognize(page, path, phrase)
    assert "⚠️" in message and ":" in message, message
    assert message.count("Error") == 0 and page.locator("#upload").inner_text().count("Error") == 0
    shot(page, "bad_" + kind.replace(" ", "_"))
    assert seen.decodes == before, f"a bad upload ({kind}) reached the decoder"
    assert not page.locator("#latex").is_visible()
    assert page.outside == []


def test_bad_upload_spoils_nothing(page, server, bad):
    """After a non-image upload, the Draw tab's button still reads its drawing (and only it)."""
    url, seen = server
    upload_and_recognize(page, *bad["not an image"])
    page.get_by_role("tab", name="Draw").click()
    page.wait_for_selector("#sketchpad canvas")
    page.pad.draw(expression_strokes(EXPRESSIONS[0][1]))
    recognize_and_wait(page, seen)
    assert seen[-1].size == CANVAS
    assert page.locator("#latex textarea").input_value().strip()
    assert "⚠️" not in status_text(page)
    assert page.outside == []
