"""Gradio Space: draw or upload a handwritten math expression and get its LaTeX.

The page shows the LaTeX (with a copy button), the formula rendered by KaTeX (bundled with
gradio's frontend, so it renders with no network), the n best candidates with their share of the
model's belief, the time taken, and an attention gallery: for every written symbol, the
decoder's attention over the encoder feature map, upsampled and laid over the image the model saw.

The app is a thin layer over the image-to-latex pipeline (`modeling_hmer.pipeline_hmer`), which
does all the reading: it opens files (`open_image`, with this demo's size limits), refuses
pictures that are not a handwritten expression (noise, photos, pages of text) before decoding,
bounds decoding by the ink, reduces the beams for large pictures (`max_decoding_cost`) and
draws the attention heat maps. What is left here is the page: the sketch pad and upload tabs,
the words for each kind of bad picture (chosen by the error's type), the candidates table and
the gallery.

Run locally from a checkout:

    python space/app.py                      # model from ./checkpoints
    HMER_MODEL=path/to/model python space/app.py
    HMER_MODEL=user/hmer-crohme python space/app.py   # a Hub id, only when you name one

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens. The API endpoint
`/recognize` takes an image file and a beam size and returns (latex, candidates, seconds):

    from gradio_client import Client, handle_file
    latex, candidates, seconds = Client("http://127.0.0.1:7860").predict(
        handle_file("formula.png"), 5, api_name="/recognize")
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
if not (HERE / "modeling_hmer").is_dir() and (HERE.parent / "modeling_hmer").is_dir():
    # `python space/app.py` in a checkout: use the checkout's package even when it is not pip-installed.
    sys.path.insert(0, str(HERE.parent))

import gradio as gr  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("hmer.space")

# The model folder next to app.py (a Space upload) or the repository's shipped checkpoint.
DEFAULT_MODEL_DIRS = (HERE / "checkpoints", HERE.parent / "checkpoints")
WHAT_TO_DO = (
    "Train a model and save it there (see README.md, 'Training'), or set HMER_MODEL to a "
    "folder written by save_pretrained (config.json, model.safetensors, processor files) "
    "or to a Hugging Face Hub model id."
)
EXAMPLES = sorted((HERE / "examples").glob("*.png"))
# What each input says when it holds nothing (each names what to do on that tab / in that call).
EMPTY_DRAWING = ("the sketch pad is empty: draw an expression with the mouse, or load an example below it "
                 "(an example just loaded takes a second to reach the pad: press Recognize again)")
EMPTY_UPLOAD = "no picture yet: upload a picture of a handwritten expression, or pick an example below"
NO_FILE = "no image given: pass an image file, e.g. handle_file('formula.png')"
BLANK_PICTURE = "the picture is blank (one colour, no ink): upload a picture of a handwritten expression"
NOT_A_PICTURE = ("this file is not a picture this demo can read: upload a PNG, JPEG or WebP picture of a "
                 "handwritten expression")
HINT = "Draw an expression (or upload a picture of one) and press **Recognize**."
DEFAULT_BEAMS = 5
MAX_BEAMS = 10
N_BEST = 5
# Uploads larger than this are refused before decoding (10000x10000 = 100 MP is still accepted).
MAX_PIXELS = 120_000_000
# Larger JPEGs are decoded at a reduced scale (the image processor box-filters other huge pictures to about
# this size itself): a formula needs far fewer pixels, the processor rescales to ~22 px per symbol anyway.
WORK_PIXELS = 4_000_000
# Files over MAX_FILE_BYTES are refused by the app with a message; gradio's own limit (a bare "Error" in
# the upload box) sits well above it, for what is not worth receiving at all.
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_FILE_SIZE = "50mb"
# Decoding time per step grows with the feature-map cells and the beams (measured on 2 shared cores:
# ~25 us per cell for greedy). The pipeline reduces the beams when the longest reading the ink allows
# would take longer than DECODE_SECONDS (its `max_decoding_cost`, in greedy cell-steps).
DECODE_SECONDS = 5.0
SECONDS_PER_CELL_STEP = 25e-6
MAX_DECODING_COST = DECODE_SECONDS / SECONDS_PER_CELL_STEP
LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}]
# Tokens that only give the others their structure: they have no attention picture of their own.
STRUCTURAL_TOKENS = {"{", "}", "^", "_", "\\limits"}
# Captions for LaTeX commands (others show without the backslash).
SYMBOL_NAMES = {
    "\\frac": "fraction bar", "\\sqrt": "√", "\\sum": "∑", "\\int": "∫", "\\infty": "∞", "\\pi": "π",
    "\\alpha": "α", "\\beta": "β", "\\gamma": "γ", "\\Delta": "Δ", "\\theta": "θ", "\\lambda": "λ",
    "\\mu": "μ", "\\sigma": "σ", "\\phi": "φ", "\\pm": "±", "\\times": "×", "\\div": "÷", "\\cdot": "·",
    "\\leq": "≤", "\\geq": "≥", "\\neq": "≠", "\\rightarrow": "→", "\\in": "∈", "\\forall": "∀",
    "\\exists": "∃", "\\ldots": "…", "\\cdots": "⋯", "\\prime": "′", "\\{": "{", "\\}": "}",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The model: the image-to-latex pipeline and the module it comes from
# ----------------------------------------------------------------------------------------------


def hmer_code(model: str | None = None) -> ModuleType:
    """The pipeline's module (`resolve_model`, `open_image`, `attention_heatmap`, the error types): the
    installed package's, else the copy a model folder carries (a Space holding only app.py and the model).

    `model`: where to find that copy when no default folder holds one (a Hub id named by HMER_MODEL).
    """
    try:
        from modeling_hmer import pipeline_hmer

        return pipeline_hmer
    except ImportError:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

    source = next((str(d) for d in DEFAULT_MODEL_DIRS if (d / "pipeline_hmer.py").is_file()), model)
    if source is None:
        raise FileNotFoundError(f"no trained model in {DEFAULT_MODEL_DIRS[-1]}. {WHAT_TO_DO}")
    try:
        pipeline_class = get_class_from_dynamic_module("pipeline_hmer.HMERImageToLatexPipeline", source)
    except (OSError, ValueError) as error:  # no such folder or Hub id, or no pipeline_hmer.py in it
        raise FileNotFoundError(f"no HMER model code in {source} ({error}). {WHAT_TO_DO}") from None
    return sys.modules[pipeline_class.__module__]


def find_model(model_path: str | os.PathLike | None = None) -> str:
    """The folder or Hub id to load: `model_path`, else env HMER_MODEL, else the first of DEFAULT_MODEL_DIRS.

    The pipeline module's `resolve_model` rule: a Hub id only when one is named, never by default. Raises
    `ModelNotFoundError` (a FileNotFoundError) saying what to do.
    """
    named = model_path if model_path is not None else os.environ.get("HMER_MODEL") or None
    return hmer_code(None if named is None else str(named)).resolve_model(named, DEFAULT_MODEL_DIRS, WHAT_TO_DO)


def load_pipeline(model_path: str, device: str):
    """`pipeline("image-to-latex")` for the model, with this demo's decoding budget."""
    from transformers import pipeline

    try:
        import modeling_hmer  # noqa: F401  (registers the task)

        remote = {}
    except ImportError:
        # No package here: a saved model carries the code (its config names the pipeline), loaded as remote code.
        logger.info("modeling_hmer is not installed: loading %s with trust_remote_code", model_path)
        remote = {"trust_remote_code": True}
    return pipeline("image-to-latex", model=model_path, device=device, max_decoding_cost=MAX_DECODING_COST,
                    **remote)


@dataclass
class Recognition:
    """What one recognition returns.

    latex: the best candidate, space-separated canonical LaTeX tokens; tokens: its tokens.
    candidates: the distinct n best (latex, share), best first (the model's ranking); share: the pipeline's,
        each candidate's probability as a part of their total (summing to 1).
    model_input: the processed image (H, W) float in [0, 1], ink 1.0 on 0.0; attention_maps: (len(tokens),
        H, W) in [0, 1] over it (both None when recognized without attention).
    num_beams: the beams used (fewer than asked_beams for a large picture).
    """

    latex: str
    tokens: list[str]
    candidates: list[tuple[str, float]]
    model_input: np.ndarray | None
    attention_maps: np.ndarray | None
    seconds: float
    num_beams: int
    asked_beams: int


class Recognizer:
    """The image-to-latex pipeline, loaded once; `recognize(image)` -> Recognition.

    `hmer` is the pipeline's own module: the error types it raises (also when loaded as remote code, whose
    types are that copy's), `open_image` and `attention_heatmap` all come from it.
    """

    def __init__(self, model_path: str, device: str | None = None):
        self.model_path = model_path
        self.pipe = load_pipeline(model_path, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.hmer = sys.modules[type(self.pipe).__module__]
        self.model, self.processor, self.tokenizer = self.pipe.model, self.pipe.processor, self.pipe.tokenizer
        self.max_new_tokens = int(self.model.generation_config.max_new_tokens or 200)
        # Models saved before the expression check carry a processor without it: they read everything.
        self.checks = self.pipe.checks_expressions
        # Overrides of the processor's ExpressionLimits for the confidence check (none by default).
        self.answer_limits: dict = {}
        if not self.checks:
            logger.warning("the model's processor cannot tell handwriting from other pictures: no refusals")

    def open_file(self, path: str | os.PathLike) -> Image.Image:
        """An uploaded file -> PIL image; too large, damaged and non-image files raise the pipeline's error
        types before they are decoded."""
        return self.hmer.open_image(path, max_pixels=MAX_PIXELS, work_pixels=WORK_PIXELS, max_bytes=MAX_FILE_BYTES)

    def warmup(self) -> float:
        """Run greedy and beam search once on a synthetic drawing; returns seconds taken."""
        start = time.perf_counter()
        image = synthetic_drawing()
        self.recognize(image, num_beams=1)
        self.recognize(image, num_beams=DEFAULT_BEAMS)
        return time.perf_counter() - start

    def recognize(self, image: Image.Image, num_beams: int = DEFAULT_BEAMS, n_best: int = N_BEST,
                  attention: bool = True) -> Recognition:
        """Read one picture. Raises the pipeline's `InvalidImageError` kinds for one that gives no reading."""
        start = time.perf_counter()
        asked = max(1, min(int(num_beams), MAX_BEAMS))
        result = self.pipe(image, num_beams=asked, num_return_sequences=min(n_best, asked),
                           return_attentions=attention, answer_limits=self.answer_limits)
        return Recognition(
            latex=result["latex"],
            tokens=list(result["tokens"]),
            candidates=[(candidate["latex"], candidate["share"]) for candidate in result["candidates"]],
            model_input=result.get("model_input"),
            attention_maps=result.get("attentions"),
            seconds=time.perf_counter() - start,
            num_beams=result["num_beams"],
            asked_beams=asked,
        )

    def heatmap(self, result: Recognition, k: int) -> Image.Image:
        """The attention picture of token k, twice the size of the model input."""
        return self.hmer.attention_heatmap(result.model_input, result.attention_maps[k], scale=2)


# ----------------------------------------------------------------------------------------------
# Input pictures: what the visitor sees is what is read; what is wrong is said by type
# ----------------------------------------------------------------------------------------------


def on_background(image: Image.Image, level: int = 255) -> Image.Image:
    """A picture in gray, its transparent parts filled with gray `level` (white by default): as a page shows it."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (level, level, level, 255)), rgba).convert("L")
    return image.convert("L")


def sketch_to_image(sketch) -> Image.Image | None:
    """The sketch pad's value ({"background", "layers", "composite"}) -> the drawing as the canvas shows it
    (black ink on white), or None when there is none."""
    if sketch is None:
        return None
    composite = sketch
    if isinstance(sketch, dict):
        composite = sketch.get("composite")
        if composite is None:
            layers = [layer for layer in (sketch.get("background"), *(sketch.get("layers") or [])) if layer is not None]
            composite = layers[0] if layers else None
    if isinstance(composite, np.ndarray):
        composite = Image.fromarray(composite)
    if composite is None or ("A" in composite.getbands() and composite.getchannel("A").getbbox() is None):
        return None  # nothing painted on the pad (its canvas is transparent until drawn on)
    return on_background(composite, 255)


def explain(error: Exception, hmer: ModuleType, blank_message: str) -> str:
    """What the page says about a picture the pipeline cannot read, chosen by the error's type."""
    if isinstance(error, hmer.BlankImageError):
        return blank_message
    if isinstance(error, hmer.ImageTooLargeError):
        if error.file_bytes is not None:
            return (f"the file is {error.file_bytes / 2**20:.1f} MB, more than the {MAX_FILE_BYTES // 2**20} MB "
                    "this demo accepts: save the picture smaller (a formula needs no more than a few hundred kB) "
                    "and upload it again")
        size = f"{error.size[0]}x{error.size[1]} pixels, " if error.size else ""
        return (f"the picture is {size}more than the {MAX_PIXELS // 1_000_000} megapixels this demo accepts: "
                "scale it down and upload it again")
    if isinstance(error, hmer.DamagedImageError):
        return (f"this {error.format or 'image'} file is damaged or cut short, so it cannot be read "
                f"({error.reason}): save or export the picture again and upload the new file")
    if isinstance(error, hmer.NotAnExpressionError):
        return str(error)  # why it is refused, and what to do
    return NOT_A_PICTURE


def recognize_or_explain(recognizer: Recognizer, read_image, empty_message: str, blank_message: str,
                         **options) -> tuple[Recognition | None, str | None]:
    """`read_image()` (a PIL image, None when there is nothing) -> (Recognition, None), or (None, what to tell
    the visitor) when there is no picture or the pipeline cannot read it."""
    try:
        image = read_image()
        if image is None:
            return None, empty_message
        return recognizer.recognize(image, **options), None
    except recognizer.hmer.InvalidImageError as error:
        return None, explain(error, recognizer.hmer, blank_message)


# ----------------------------------------------------------------------------------------------
# What the page shows
# ----------------------------------------------------------------------------------------------

# \limits is only allowed after these.
OPERATORS = {"\\sum", "\\int", "\\lim", "\\log", "\\sin", "\\cos", "\\tan"}


def typesettable(latex: str) -> str:
    """Space-separated LaTeX tokens -> LaTeX that KaTeX can typeset, for display only.

    A reading can leave braces open or close one too many, leave `^`, `_`, `\\frac` or `\\sqrt`
    without their groups, give a base two superscripts, or put `\\limits` after a symbol. The
    tokens are parsed as groups, fractions, roots and scripts; what is missing is added as `{ }`,
    an unmatched `}` or a stray `\\limits` is dropped, a second `^` (`_`) of one base goes on an
    empty base, and every argument is braced. Well-formed LaTeX renders the same as before.
    """
    tokens = latex.split()
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def argument(closers) -> str:
        """One braced argument: the next atom, or `{ }` when the next token cannot start one."""
        if peek() is None or peek() in ("}", "^", "_", "'", "\\limits") or peek() in closers:
            return "{ }"
        return atom(closers) if peek() == "{" else "{ " + atom(closers) + " }"

    def atom(closers) -> str:
        token = take()
        if token == "{":
            inner = sequence({"}"})
            if peek() == "}":
                take()
            return "{ " + inner + " }"
        if token == "\\frac":
            return f"\\frac {argument(closers)} {argument(closers)}"
        if token == "\\sqrt":
            index = ""
            if peek() == "[":
                take()
                inner = sequence({"]", "}"})
                # brackets inside the index would end it early: brace them
                index = "[ " + ("{ " + inner + " }" if "[" in inner or "]" in inner else inner) + " ]"
                if peek() == "]":
                    take()
            return f"\\sqrt {index} {argument(closers)}".replace("  ", " ")
        return "\\vert" if token == "|" else token

    def sequence(closers) -> str:
        """Items up to one of `closers` (not taken) or the end."""
        parts: list[str] = []
        scripts: set[str] = set()  # scripts the current base already has
        while peek() is not None and peek() not in closers:
            token = peek()
            if token == "}":  # unmatched here
                take()
                continue
            if token == "\\limits":
                take()
                if parts and parts[-1] in OPERATORS and not scripts:
                    parts.append(token)
                continue
            if token in ("^", "_", "'"):
                take()
                # a prime is a superscript: primes join only primes, and nothing joins "x'^2"
                taken = scripts not in (set(), {"'", "^"}) if token == "'" else token in scripts
                if not parts or taken:
                    parts.append("{ }")
                    scripts = set()
                if token == "'":  # written next to their base: KaTeX joins adjacent primes only
                    parts[-1] += "'"
                    scripts.update({"'", "^"})
                else:
                    scripts.add(token)
                    parts.append(f"{token} {argument(closers)}")
                continue
            parts.append(atom(closers))
            scripts = set()
        return " ".join(parts)

    parts = []
    while peek() is not None:
        parts.append(sequence(set()))
        if peek() is not None:  # a closer that closes nothing at the top level
            take()
    return " ".join(part for part in parts if part)


def candidates_table(candidates: list[tuple[str, float]]) -> str:
    """n best (latex, share), in the model's ranking -> a Markdown table: rank, formula (KaTeX), share, LaTeX.

    Row 1 is the answer shown above it. The model ranks by probability per symbol, the share is a whole
    reading's probability: a shorter reading lower in the list can hold a larger share, and the table says so.
    """
    rows = [
        "**Best candidates**, as the model ranks them (probability per symbol; #1 is the answer above). "
        "*Share* is a reading's probability as a part of these readings' total (summing to 100%): how the model "
        "divides its belief among them, not the chance that one is right; a shorter reading may hold a larger "
        "share than one ranked above it.",
        "",
        "| # | formula | share | LaTeX |",
        "|---:|:---:|---:|:---|",
    ]
    for rank, (latex, share) in enumerate(candidates, 1):
        # "|" ends a table cell: \vert for KaTeX (typesettable), an escaped pipe for the code.
        formula = f"$\\displaystyle {typesettable(latex)}$" if latex else "(nothing)"
        escaped = latex.replace("|", "\\|")
        code = f"`{escaped}`" if latex else ""
        shown = f"{share:.0%}" if share >= 0.005 else "<1%"
        rows.append(f"| {rank} | {formula} | {shown} | {code} |")
    return "\n".join(rows)


def symbol_pictures(tokens: list[str], maps: np.ndarray | None) -> list[tuple[int, str]]:
    """(index into tokens, caption) for the tokens that are written symbols: structural tokens
    ({ } ^ _ \\limits) have no picture of their own (their attention repeats their symbol's)."""
    if maps is None:
        return []
    return [(k, SYMBOL_NAMES.get(token, token.lstrip("\\") if token.startswith("\\") else token))
            for k, token in enumerate(tokens[: len(maps)]) if token not in STRUCTURAL_TOKENS]


def preview_of(image: Image.Image, side: int = 1024) -> Image.Image:
    """An upload as RGB for its preview, at most `side` px: on white, or on black when its ink is white on
    transparency."""
    image = image.copy()
    image.thumbnail((side, side))
    view = on_background(image, 255)
    low, high = view.getextrema()
    return (view if high - low >= 32 else on_background(image, 0)).convert("RGB")


def synthetic_drawing() -> Image.Image:
    """A small drawing ("x + 1" like strokes) used to warm the model up."""
    image = Image.new("L", (400, 150), 255)
    draw = ImageDraw.Draw(image)
    draw.line([(40, 40), (100, 110)], fill=0, width=5)
    draw.line([(40, 110), (100, 40)], fill=0, width=5)
    draw.line([(150, 75), (210, 75)], fill=0, width=5)
    draw.line([(180, 45), (180, 105)], fill=0, width=5)
    draw.line([(260, 55), (280, 40), (280, 110)], fill=0, width=5)
    return image


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

INTRO = """# ✍️ Handwritten math → LaTeX
Draw a formula with the mouse (or upload a picture of one) and press **Recognize**.
Below the result, the attention gallery shows where the model looked for each symbol it wrote."""


CSS = """
/* the ink colour is fixed (black, as the model's training renders are read): no colour picker */
#sketchpad button[aria-label="Color"] { display: none; }
#rendered .katex-display { font-size: 1.6em; margin: 0.4em 0; }
#candidates table { width: 100%; table-layout: auto; }
#candidates th, #candidates td:nth-child(1), #candidates td:nth-child(3) { white-space: nowrap; }
#candidates td:nth-child(2) { min-width: 12em; }
#candidates .katex { font-size: 1.15em; }
"""

SELECT_BRUSH_JS = """() => {
  const pick = (tries) => {
    const brush = document.querySelector('#sketchpad button[aria-label="Brush"]');
    if (brush) { brush.click(); } else if (tries > 0) { setTimeout(() => pick(tries - 1), 200); }
  };
  pick(25);
}"""


def build_demo(model_path: str | os.PathLike | None = None, *, recognizer: Recognizer | None = None,
               warmup: bool = True) -> gr.Blocks:
    """Load the model once (from `model_path`, env HMER_MODEL or <repo>/checkpoints) and build the page.

    Raises ModelNotFoundError (a FileNotFoundError) with what to do when there is no model.
    The returned Blocks has `.recognizer` and is queued; launch it with `launch_kwargs()`.
    """
    if recognizer is None:
        recognizer = Recognizer(find_model(model_path))
    if warmup:
        logger.info("warm-up took %.2f s", recognizer.warmup())

    def show(read_image, empty_message, blank_message, num_beams):
        """Read one tab's input (`read_image()` -> PIL image or None) -> updates of the result widgets."""
        result, problem = recognize_or_explain(recognizer, read_image, empty_message, blank_message,
                                               num_beams=int(num_beams or DEFAULT_BEAMS))
        if problem is not None:
            gr.Warning(problem)
            return (gr.update(visible=False), "", "", "", [], f"⚠️ {problem}")
        gallery = [(recognizer.heatmap(result, k), caption)
                   for k, caption in symbol_pictures(result.tokens, result.attention_maps)]
        rendered = f"$$ {typesettable(result.latex)} $$" if result.latex else "*(no symbols recognized)*"
        note = "" if result.num_beams == result.asked_beams else " (a large picture: fewer beams, to answer quickly)"
        status = (f"recognized in {result.seconds * 1000:.0f} ms · beam {result.num_beams}{note} · "
                  f"{len(gallery)} symbols, {len(result.tokens)} tokens")
        return (gr.update(visible=True), result.latex, rendered, candidates_table(result.candidates), gallery,
                status)

    def recognize_drawing(sketch, num_beams):
        return show(lambda: sketch_to_image(sketch), EMPTY_DRAWING, EMPTY_DRAWING, num_beams)

    def recognize_upload(path, num_beams):
        return show(lambda: None if path is None else recognizer.open_file(path), EMPTY_UPLOAD, BLANK_PICTURE,
                    num_beams)

    def preview_upload(path):
        """On upload: show the picture as it will be read, or say at once what is wrong with the file."""
        if path is None:
            return gr.update(value=None, visible=False), HINT
        try:
            image = recognizer.open_file(path)
            recognizer.processor.image_processor.ink_map(image)  # raises BlankImageError for a blank picture
        except recognizer.hmer.InvalidImageError as error:
            problem = explain(error, recognizer.hmer, BLANK_PICTURE)
            gr.Warning(problem)
            return gr.update(value=None, visible=False), f"⚠️ {problem}"
        return gr.update(value=preview_of(image), visible=True), HINT

    def recognize_api(image_file, num_beams=DEFAULT_BEAMS):
        """Image file -> (latex, [{"latex", "share"}, ...] best first, seconds)."""
        path = image_file if image_file is None or isinstance(image_file, (str, os.PathLike)) else image_file.name
        result, problem = recognize_or_explain(
            recognizer, lambda: None if path is None else recognizer.open_file(path), NO_FILE, BLANK_PICTURE,
            num_beams=int(num_beams or DEFAULT_BEAMS), attention=False)
        if problem is not None:
            raise gr.Error(problem, print_exception=False)
        candidates = [{"latex": latex, "share": round(share, 4)} for latex, share in result.candidates]
        return result.latex, candidates, round(result.seconds, 4)

    examples = [[str(path)] for path in EXAMPLES]
    with gr.Blocks(title="HMER: handwritten math to LaTeX") as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Draw", id="draw"):
                sketch = gr.Sketchpad(
                    label="Sketch pad: draw with the mouse; undo, redo and clear are above the canvas",
                    type="pil",
                    image_mode="RGBA",
                    format="png",
                    canvas_size=(800, 300),
                    height=400,
                    brush=gr.Brush(default_size=6, colors=["#000000"], default_color="#000000",
                                   color_mode="fixed"),
                    eraser=gr.Eraser(default_size=24),
                    layers=False,
                    transforms=(),
                    sources=(),
                    elem_id="sketchpad",
                )
                draw_button = gr.Button("Recognize", variant="primary", size="lg", elem_id="recognize")
                if examples:
                    # The full editor value, composite included: with a bare path the editor shows the
                    # picture but sends an empty value until it is drawn on.
                    drawn = [[{"background": path, "layers": [], "composite": path}] for [path] in examples]
                    gr.Examples(drawn, inputs=[sketch], label="Examples (drawn on this sketch pad): load "
                                "one, then press Recognize", elem_id="draw-examples")
            with gr.Tab("Upload", id="upload"):
                # gr.File, not gr.Image: the file reaches the app undecoded, so a broken, truncated or
                # huge upload is refused by open_file with a message (gr.Image would fail in its
                # own preprocessing with a bare "Error").
                upload = gr.File(label="Picture of a formula (PNG, JPEG or WebP, up to 10 MB)",
                                 file_types=["image"], type="filepath", height=120, elem_id="upload")
                preview = gr.Image(label="The picture that will be read", type="pil", interactive=False,
                                   visible=False, height=240, buttons=[], elem_id="preview")
                upload_button = gr.Button("Recognize", variant="primary", size="lg", elem_id="recognize-upload")
                if examples:
                    gr.Examples(examples, inputs=[upload], label="Examples: pick one, then press Recognize",
                                elem_id="upload-examples")
        beams = gr.Slider(1, MAX_BEAMS, value=DEFAULT_BEAMS, step=1, label="Beam size",
                          info="candidates the search keeps at each step; 1 = greedy (fastest)")
        status = gr.Markdown(HINT, elem_id="status")
        with gr.Column(visible=False) as result_panel:
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    latex_box = gr.Textbox(label="LaTeX", buttons=["copy"], interactive=False, elem_id="latex")
                    rendered = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, elem_id="rendered", min_height=50,
                                           container=True, padding=True)
                with gr.Column(scale=3):
                    candidates = gr.Markdown(latex_delimiters=[{"left": "$", "right": "$", "display": False}],
                                             container=True, padding=True, elem_id="candidates")
            # JPEG: a tenth of the encoding time of WebP/PNG for a dozen small heat maps.
            gallery = gr.Gallery(label="Where the model looked for each symbol it wrote", columns=6,
                                 height="auto", object_fit="contain", format="jpeg", elem_id="attention")

        outputs = [result_panel, latex_box, rendered, candidates, gallery, status]
        draw_button.click(recognize_drawing, [sketch, beams], outputs, api_visibility="private")
        upload_button.click(recognize_upload, [upload, beams], outputs, api_visibility="private")
        upload.change(preview_upload, upload, [preview, status], queue=False, api_visibility="private")

        # The API: an image file in, named outputs out (hidden components, so it needs no sketch dict).
        api_file = gr.File(visible=False, file_types=["image"], label="image")
        api_beams = gr.Number(DEFAULT_BEAMS, visible=False, precision=0, label="num_beams")
        api_latex = gr.Textbox(visible=False, label="latex")
        api_candidates = gr.JSON(visible=False, label="candidates")
        api_seconds = gr.Number(visible=False, label="seconds")
        api_button = gr.Button(visible=False)
        api_button.click(recognize_api, [api_file, api_beams], [api_latex, api_candidates, api_seconds],
                         api_name="recognize")

        # The editor starts (and restarts after Clear) with no tool selected: pick the brush, so that
        # one can draw straight away.
        demo.load(None, None, None, js=SELECT_BRUSH_JS)
        sketch.clear(None, None, None, js=SELECT_BRUSH_JS, queue=False, api_visibility="private")

    # Requests wait in the queue (at most 64); HMER_CONCURRENCY of them are recognized at a time.
    demo.queue(default_concurrency_limit=int(os.environ.get("HMER_CONCURRENCY", "2")), max_size=64)
    demo.recognizer = recognizer
    return demo


def launch_kwargs() -> dict:
    """Keyword arguments for demo.launch shared by __main__ and the tests."""
    return {"max_file_size": MAX_FILE_SIZE, "show_error": False, "css": CSS}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    # One torch thread per recognition: decoding is a chain of small steps that gain little from
    # intra-op threads and lose a lot when cores are shared; HMER_CONCURRENCY requests use the cores.
    torch.set_num_threads(int(os.environ.get("HMER_THREADS", "1")))
    try:
        demo = build_demo()
    except FileNotFoundError as error:  # ModelNotFoundError: no model where HMER_MODEL or the default points
        sys.exit(f"error: {error}")
    # server_name / server_port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
    demo.launch(**launch_kwargs())


if __name__ == "__main__":
    main()
