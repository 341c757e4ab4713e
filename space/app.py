"""Gradio Space: draw or upload a handwritten math expression and get its LaTeX.

The page shows the LaTeX (with a copy button), the formula rendered by KaTeX (bundled with
gradio's frontend, so it renders with no network), the n best candidates with their
probabilities, the time taken, and an attention gallery: for every output token, the decoder's
attention over the encoder feature map (stride 16), upsampled and laid over the image the model
saw.

Run locally from a checkout:

    python space/app.py                      # model from ./checkpoints
    HMER_MODEL=path/to/model python space/app.py
    HMER_MODEL=user/hmer-crohme python space/app.py   # a Hub id, only when you name one

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens. The API endpoint
`/recognize` takes an image file and returns (latex, candidates, seconds):

    from gradio_client import Client, handle_file
    latex, candidates, seconds = Client("http://127.0.0.1:7860").predict(
        handle_file("formula.png"), 5, api_name="/recognize")
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
if not (HERE / "modeling_hmer").is_dir() and (HERE.parent / "modeling_hmer").is_dir():
    # `python space/app.py` in a checkout: use the checkout's package even when it is not pip-installed.
    sys.path.insert(0, str(HERE.parent))

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from transformers import pipeline  # noqa: E402

logger = logging.getLogger("hmer.space")

# The model folder next to app.py (a Space upload) or the repository's shipped checkpoint.
DEFAULT_MODEL_DIRS = (HERE / "checkpoints", HERE.parent / "checkpoints")


def load_hmer_code():
    """The HMER pipeline module (model lookup, image opener, error types, heat maps): the installed package's,
    or, on a Space holding only app.py and a model folder, the copy saved with that model (trust_remote_code)."""
    try:
        from modeling_hmer import pipeline_hmer

        return pipeline_hmer
    except ImportError:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        folder = next((p for p in DEFAULT_MODEL_DIRS if (p / "pipeline_hmer.py").is_file()), None)
        if folder is None:
            sys.exit(f"error: modeling_hmer is not installed and no model folder with its code is in "
                     f"{' or '.join(map(str, DEFAULT_MODEL_DIRS))}: pip install the package (see README.md)")
        pipeline_class = get_class_from_dynamic_module("pipeline_hmer.HMERImageToLatexPipeline", str(folder))
        return sys.modules[pipeline_class.__module__]


hmer = load_hmer_code()
ModelNotFoundError = hmer.ModelNotFoundError
EMPTY_MESSAGE = "draw or upload an expression"
DEFAULT_BEAMS = 5
MAX_BEAMS = 10
N_BEST = 5
# Uploads larger than this are refused before decoding (10000x10000 = 100 MP is still accepted).
MAX_PIXELS = 120_000_000
# Larger JPEGs are decoded at a reduced scale (the image processor shrinks the others itself).
WORK_PIXELS = 4_000_000
MAX_FILE_SIZE = "10mb"
LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}]


class UserInputError(ValueError):
    """Bad input from the user; its message is shown as is."""


def resolve_model_path(model_path: str | os.PathLike | None = None) -> str:
    """Return the folder or Hub id to load: `model_path`, else env HMER_MODEL, else <repo>/checkpoints.

    The pipeline's `resolve_model` rule: a Hub id only when one is named; the default never reaches the Hub.
    """
    named = model_path if model_path is not None else os.environ.get("HMER_MODEL") or None
    what_to_do = (
        "Train a model and save it there (see README.md, 'Training'), or set HMER_MODEL to a "
        "folder written by save_pretrained (config.json, model.safetensors, processor files) "
        "or to a Hugging Face Hub model id."
    )
    if named is not None and not Path(named).is_dir():
        what_to_do = f"(HMER_MODEL={str(named)!r}) {what_to_do}"
    return hmer.resolve_model(named, DEFAULT_MODEL_DIRS, what_to_do)


# ----------------------------------------------------------------------------------------------
# Input images
# ----------------------------------------------------------------------------------------------


def flatten(image: Image.Image, background: int = 255) -> Image.Image:
    """Any PIL image -> mode "L", transparent parts filled with `background` (white by default)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(under, rgba)
    return image.convert("L")


def open_image_file(path: str | os.PathLike) -> Image.Image:
    """Open an uploaded file, refusing non-images and huge images with a message; see `prepare_image`."""
    try:
        image = hmer.open_image(path, max_pixels=MAX_PIXELS, work_pixels=WORK_PIXELS)
    except hmer.ImageTooLargeError as error:
        raise UserInputError(f"{error} (this demo's limit)") from None
    except hmer.InvalidImageError as error:
        raise UserInputError(f"this file is not an image this demo can read: upload a PNG, JPEG or WebP "
                             f"picture ({error})") from None
    return prepare_image(image)


def prepare_image(image: Image.Image | np.ndarray | None, on_white: bool = False) -> Image.Image:
    """PIL or numpy image -> PIL image; missing -> UserInputError(EMPTY_MESSAGE) (blank ones are found when
    they are read: the pipeline raises BlankImageError).

    Uploads keep their mode (the image processor reads either polarity and transparency); the
    sketch pad's drawing is flattened on white (`on_white`), as the canvas shows it.
    """
    if image is None:
        raise UserInputError(EMPTY_MESSAGE)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return flatten(image) if on_white else image


def sketch_to_image(sketch) -> Image.Image | None:
    """The sketch pad's value ({"background", "layers", "composite"}) -> its composite image, if any."""
    if sketch is None:
        return None
    if isinstance(sketch, dict):
        composite = sketch.get("composite")
        if composite is None:
            layers = [layer for layer in sketch.get("layers") or [] if layer is not None]
            composite = layers[0] if layers else None
        return composite
    return sketch


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass
class Recognition:
    """What one recognition returns.

    latex: the best candidate, space-separated canonical LaTeX tokens.
    tokens: its tokens (no special tokens); attention_maps: (len(tokens), H, W) float in [0, 1]
        over `model_input`, the processed image (H, W) uint8, black ink on white.
    candidates: n best (latex, share), best first; share: the candidate's probability as a share of the
        n candidates' total (the pipeline's `share`).
    token_probabilities: the model's probability of each of `tokens`.
    """

    latex: str
    tokens: list[str]
    candidates: list[tuple[str, float]]
    model_input: np.ndarray
    attention_maps: np.ndarray | None
    seconds: float
    token_probabilities: list[float] = field(default_factory=list)
    extras: dict = field(default_factory=dict)


class Recognizer:
    """Model + processor, loaded once; `recognize(image)` -> Recognition."""

    def __init__(self, model_path: str, device: str | None = None):
        self.model_path = model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Without the package, the folder's own code runs (a saved model carries it, see pipeline_hmer.py).
        self.pipeline = pipeline(hmer.PIPELINE_TASK, model=model_path, device=self.device,
                                 trust_remote_code=hmer.__name__.startswith("transformers_modules."))
        # Its errors are its module's classes (remote code loads one module per folder).
        self.errors = sys.modules[type(self.pipeline).__module__]
        self.model = self.pipeline.model.eval()
        self.tokenizer = self.pipeline.tokenizer

    def warmup(self) -> float:
        """Run greedy and beam search once on a synthetic drawing; returns seconds taken."""
        start = time.perf_counter()
        image = synthetic_drawing()
        self.recognize(image, num_beams=1)
        self.recognize(image, num_beams=DEFAULT_BEAMS)
        return time.perf_counter() - start

    @torch.inference_mode()
    def recognize(self, image: Image.Image, num_beams: int = DEFAULT_BEAMS, n_best: int = N_BEST,
                  attention: bool = True) -> Recognition:
        start = time.perf_counter()
        num_beams = max(1, min(int(num_beams), MAX_BEAMS))
        n_best = max(1, min(n_best, num_beams))
        try:
            result = self.pipeline(image, num_beams=num_beams, num_return_sequences=n_best,
                                   return_attentions=attention)
        except self.errors.BlankImageError:
            raise UserInputError(EMPTY_MESSAGE) from None
        except self.errors.InvalidImageError as error:
            raise UserInputError(str(error)) from None
        model_input = (255 - result["model_input"] * 255).round().astype(np.uint8) if attention else None
        return Recognition(
            latex=result["latex"],
            tokens=list(result["tokens"]),
            candidates=[(c["latex"], c["share"]) for c in result["candidates"]],
            model_input=model_input,
            attention_maps=result.get("attentions"),
            seconds=time.perf_counter() - start,
            token_probabilities=result["token_probabilities"],
        )


def candidates_table(candidates: list[tuple[str, float]]) -> str:
    """n best (latex, probability) -> a Markdown table: rank, formula (KaTeX), LaTeX, probability."""
    rows = ["**Best candidates**", "", "| # | formula | LaTeX | prob. |", "|---:|:---:|---|---:|"]
    for rank, (latex, probability) in enumerate(candidates, 1):
        # "|" is a CROHME symbol but ends a table cell: \vert for KaTeX, an escaped pipe for the code.
        math = " ".join("\\vert" if token == "|" else token for token in latex.split())
        formula = f"${math}$" if math else "(empty)"
        escaped = latex.replace("|", "\\|")
        code = f"`{escaped}`" if latex else ""
        shown = f"{probability:.1%}" if probability >= 0.001 else f"{probability:.1e}"
        rows.append(f"| {rank} | {formula} | {code} | {shown} |")
    return "\n".join(rows)


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


def attention_overlay(model_input: np.ndarray, attention: np.ndarray, scale: int = 2) -> Image.Image:
    """Lay one attention map (H, W in [0, 1]) over the model input (H, W uint8, black ink on white)."""
    return hmer.attention_heatmap(1.0 - model_input.astype(np.float32) / 255.0, attention, scale)


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

INTRO = """# ✍️ Handwritten math → LaTeX
Draw a formula with the mouse (or upload a picture of one) and press **Recognize**.
Below the result, the attention gallery shows where the model looked for each symbol it wrote."""


CSS = "#rendered .katex-display { font-size: 1.6em; margin: 0.4em 0; }"

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

    Raises ModelNotFoundError with what to do when there is no model.
    The returned Blocks has `.recognizer` and is queued; launch it with `launch_kwargs()`.
    """
    if recognizer is None:
        recognizer = Recognizer(resolve_model_path(model_path))
    if warmup:
        logger.info("warm-up took %.2f s", recognizer.warmup())

    def run(image: Image.Image, num_beams) -> Recognition:
        return recognizer.recognize(image, num_beams=int(num_beams or DEFAULT_BEAMS))

    def recognize_ui(source: str, sketch, upload_path, num_beams):
        """Button handler: latex, rendered formula, attention gallery, candidates, status."""
        try:
            if source == "upload":
                if upload_path is None:
                    raise UserInputError(EMPTY_MESSAGE)
                image = open_image_file(upload_path)
            else:
                image = prepare_image(sketch_to_image(sketch), on_white=True)
            result = run(image, num_beams)
        except UserInputError as error:
            gr.Warning(str(error))
            return "", "", [], "", f"⚠️ {error}"
        gallery = []
        if result.attention_maps is not None:
            gallery = [
                (attention_overlay(result.model_input, attention), f"{k + 1}. {token}")
                for k, (token, attention) in enumerate(zip(result.tokens, result.attention_maps))
            ]
        candidates = candidates_table(result.candidates)
        rendered = f"$$ {result.latex} $$" if result.latex else "*(no symbols recognized)*"
        status = (f"recognized in {result.seconds * 1000:.0f} ms · beam {int(num_beams)} · "
                  f"{len(result.tokens)} tokens")
        return result.latex, rendered, gallery, candidates, status

    def recognize_api(image_file, num_beams=DEFAULT_BEAMS):
        """Image file -> (latex, [{"latex", "probability"}, ...] best first, seconds)."""
        try:
            if image_file is None:
                raise UserInputError(EMPTY_MESSAGE)
            path = image_file if isinstance(image_file, (str, os.PathLike)) else image_file.name
            result = recognizer.recognize(open_image_file(path), num_beams=int(num_beams or DEFAULT_BEAMS),
                                          attention=False)
        except UserInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        candidates = [{"latex": latex, "probability": share} for latex, share in result.candidates]
        return result.latex, candidates, round(result.seconds, 4)

    with gr.Blocks(title="HMER: handwritten math to LaTeX") as demo:
        gr.Markdown(INTRO)
        source = gr.State("draw")
        with gr.Tabs():
            with gr.Tab("Draw", id="draw") as draw_tab:
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
            with gr.Tab("Upload", id="upload") as upload_tab:
                # type="filepath" + image_mode=None: gradio hands over the file undecoded, so a huge
                # or broken upload is refused here with a message instead of failing in preprocessing.
                upload = gr.Image(label="Picture of a formula", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], height=300, elem_id="upload")
                examples = sorted((HERE / "examples").glob("*.png"))
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[upload],
                                label="Examples (drawn on the sketch pad)")
        with gr.Row(equal_height=False):
            beams = gr.Slider(1, MAX_BEAMS, value=DEFAULT_BEAMS, step=1, label="Beam size",
                              info="1 = greedy (fastest)", scale=1)
            button = gr.Button("Recognize", variant="primary", size="lg", elem_id="recognize", scale=2)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                latex_box = gr.Textbox(label="LaTeX", buttons=["copy"], interactive=False, elem_id="latex")
                rendered = gr.Markdown(latex_delimiters=LATEX_DELIMITERS, elem_id="rendered", min_height=50)
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                candidates = gr.Markdown(latex_delimiters=[{"left": "$", "right": "$", "display": False}],
                                         container=True, padding=True, elem_id="candidates")
        # JPEG: a tenth of the encoding time of WebP/PNG for a dozen small heat maps.
        gallery = gr.Gallery(label="Attention per output token", columns=6, height="auto",
                             object_fit="contain", format="jpeg", elem_id="attention")

        draw_tab.select(lambda: "draw", None, source, queue=False, api_visibility="private")
        upload_tab.select(lambda: "upload", None, source, queue=False, api_visibility="private")
        button.click(recognize_ui, [source, sketch, upload, beams], [latex_box, rendered, gallery, candidates, status],
                     api_name="recognize_ui", api_visibility="undocumented")

        # The API: an image file in, LaTeX first out (hidden components, so it needs no sketch dict).
        api_file = gr.File(visible=False, file_types=["image"])
        api_beams = gr.Number(DEFAULT_BEAMS, visible=False, precision=0)
        api_latex = gr.Textbox(visible=False)
        api_candidates = gr.JSON(visible=False)
        api_seconds = gr.Number(visible=False)
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
    except ModelNotFoundError as error:
        sys.exit(f"error: {error}")
    # server_name / server_port default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
    demo.launch(**launch_kwargs())


if __name__ == "__main__":
    main()
