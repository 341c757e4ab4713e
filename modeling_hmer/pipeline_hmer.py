"""The image-to-LaTeX pipeline: one inference path for Python users, the prediction CLI and the Space.

    >>> import modeling_hmer  # registers the task with transformers
    >>> from transformers import pipeline
    >>> reader = pipeline("image-to-latex", model="checkpoints")
    >>> reader("drawing.png", num_beams=5)["latex"]
    'x ^ { 2 } + 1'

Where the package is not installed, a saved model folder carries this file (its config names it under
`custom_pipelines`): `pipeline("image-to-latex", model=folder_or_hub_id, trust_remote_code=True)`.

Every image is checked to be a handwritten expression (`expression_check`, through the processor): noise,
photos and pages of text are refused before decoding, decoding is bounded by the ink, and an answer the model
found no end to is refused after it. `check_expression=False` reads anything.

Besides the pipeline, this module holds what every caller shares: `resolve_model` (which folder or Hub id a
name means), `attention_heatmap` (one picture per attention map), `affordable_beams` (the `max_decoding_cost`
rule) and, from the image processor, `open_image` and the error type `InvalidImageError` with its kinds:
`BlankImageError` (no ink), `DamagedImageError` (a file cut short), `ImageTooLargeError` (over `open_image`'s
limits) and `NotAnExpressionError` (not handwriting). A caller loaded with `trust_remote_code` takes them all
from the pipeline's own module, `sys.modules[type(reader).__module__]`, so that it catches the types raised.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hmer import PIPELINE_TASK
from .expression_check import NotAnExpressionError
from .image_processing_hmer import BlankImageError, DamagedImageError, ImageTooLargeError, InvalidImageError, open_image


__all__ = [
    "BlankImageError",
    "DamagedImageError",
    "HMERImageToLatexPipeline",
    "ImageTooLargeError",
    "InvalidImageError",
    "ModelNotFoundError",
    "NotAnExpressionError",
    "affordable_beams",
    "attention_heatmap",
    "open_image",
    "resolve_model",
]

# The error types a caller catches, by name: a processor loaded with trust_remote_code raises its own module's
# copies, which `_own_error` turns into these.
_ERRORS = {cls.__name__: cls for cls in (NotAnExpressionError, BlankImageError, DamagedImageError,
                                         ImageTooLargeError, InvalidImageError)}


class ModelNotFoundError(FileNotFoundError):
    """No usable model where a name (or the default folder) points; the message says what to do."""


def resolve_model(name: str | os.PathLike | None, default_folders: Sequence[str | os.PathLike] = (),
                  what_to_do: str = "") -> str:
    """The folder or Hub id to load for `name`: the one rule of the CLI and the Space.

    `name` None (or ""): the first of `default_folders` that exists; defaults never reach the Hub. An existing
    folder must hold a `config.json`. Anything else is a Hub repository id when `huggingface_hub` accepts it as
    one ("user/hmer", "hmer") and it does not look like a path (no leading ".", "/" or "~"). Raises
    `ModelNotFoundError` naming the place, followed by `what_to_do`.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    hint = f" {what_to_do}" if what_to_do else ""
    if name is None or str(name) == "":
        folders = [Path(folder) for folder in default_folders]
        found = next((folder for folder in folders if folder.is_dir()), None)
        if found is None:
            where = folders[-1] if folders else "the default place"
            raise ModelNotFoundError(f"no trained model in {where}.{hint}")
        name = found
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} holds no model (no config.json): it is not a folder saved by "
                                     f"save_pretrained.{hint}")
        return str(path)
    text = str(name)
    if not path.exists() and not text.startswith((".", "/", "~")):
        try:
            validate_repo_id(text)
            return text  # a Hub id, downloaded (or read from the Hugging Face cache) when loaded
        except HFValidationError:
            pass
    raise ModelNotFoundError(f"{text} is neither a model folder nor a Hub id.{hint}")


def attention_heatmap(model_input: np.ndarray, attention: np.ndarray, scale: int = 1) -> Image.Image:
    """One attention map over the image the model saw, as a red-yellow heat map on the dimmed drawing.

    model_input: (H, W) float in [0, 1], ink 1.0 on 0.0 (the processed image); attention: (H, W) in [0, 1]
    (the pipeline's `attentions`, upsampled to the image). Returns an RGB image, `scale` times larger.
    """
    page = 1.0 - np.clip(model_input, 0.0, 1.0)  # black ink on white, as drawn
    base = np.repeat((0.35 + 0.65 * page)[..., None], 3, axis=2)  # dimmed, so the heat shows
    heat = np.stack([np.ones_like(attention), np.clip(attention * 1.6 - 0.4, 0, 1), np.zeros_like(attention)], -1)
    alpha = (0.75 * np.clip(attention, 0, 1) ** 0.8)[..., None]
    mixed = (1 - alpha) * base + alpha * heat
    image = Image.fromarray((mixed * 255).round().astype(np.uint8), "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def affordable_beams(num_beams: int, max_new_tokens: int, cells: int, max_cost: float) -> int:
    """The largest beam size <= num_beams whose longest decoding costs at most `max_cost`.

    The cost of a decoding is counted in greedy steps over one feature cell: `max_new_tokens` steps, each
    attending over `cells` feature cells, and each beam beyond the first adding a fifth to a step (measured
    on CPU, where decoding's time is mostly per-step overhead shared by the beams).
    """
    def cost(beams: int) -> float:
        return max_new_tokens * cells * (1 + 0.2 * (beams - 1))

    while num_beams > 1 and cost(num_beams) > max_cost:
        num_beams -= 1
    return num_beams


def _own_error(err: ValueError) -> ValueError:
    """`err` as this module's error type of the same name (attributes kept), or `err` itself."""
    for kind in type(err).__mro__:
        own = _ERRORS.get(kind.__name__)
        if own is not None:
            converted = own(str(err))
            converted.__dict__.update(err.__dict__)
            return converted
    return err


class HMERImageToLatexPipeline(Pipeline):
    r"""
    Image(s) of handwritten math -> LaTeX. Task `"image-to-latex"`.

    Inputs: one image or a list: a file path, the bytes of an image file, a PIL image, a numpy array or a torch
    tensor (anything `open_image` reads; either polarity, any colour, transparency). With `batch_size`, images
    are processed and decoded that many at a time (each as if alone: a batch decodes to its images' longest
    length bound, and each answer is checked within its own). An input that gives no reading raises
    `InvalidImageError` or one of its kinds: `BlankImageError` (no ink), `NotAnExpressionError` (noise, a photo,
    a page of text, or an answer the model found no end to): catch them by type. One such image in a list
    raises for the whole call; read lists that may hold bad pictures one image at a time.

    Call arguments (also accepted by `pipeline(...)` as defaults):
        num_beams (`int`): beam size, 1 = greedy (default: the model's generation config).
        num_return_sequences (`int`): candidates in the n-best list (default, and at most: the beams used).
        max_new_tokens (`int`), and other `generate` settings (`length_penalty`, `latex_grammar`, ...).
        check_expression (`bool`, default True): check that each picture is a handwritten expression, with the
            processor's `check_image` (before decoding: refuses noise, photos, pages of text, pictures a few
            pixels wide, and bounds `max_new_tokens` by the pieces of ink, so any input decodes for a bounded
            time) and `check_answer` (after: refuses a best answer that did not end within that bound, or whose
            tokens are all improbable). Refusals raise `NotAnExpressionError`. False reads anything (a blank
            image still raises `BlankImageError`). A model whose processor has no `check_image` (saved before
            the check existed) reads anything.
        answer_limits (`dict`): `ExpressionLimits` fields overriding the answer check's (e.g.
            `{"min_mean_log_prob": -3.0}`).
        max_decoding_cost (`float`, optional): reduce the beams, down to 1, for pictures whose longest possible
            decoding would cost more than this (see `affordable_beams`: greedy steps x feature cells); for
            services that must answer within a time. Default: beams are never reduced.
        return_attentions (`bool`, default False): add the attention maps and the processed image.
        generate_kwargs (`dict`): more `generate` settings.

    Output, per image, a dict:
        latex (`str`): the best candidate, space-separated canonical LaTeX tokens (KaTeX typesets it).
        score (`float`): its `sequences_scores` (log-probability per token with the default length penalty 1).
        share (`float`): its probability as a share of the n-best list's total (see `candidates`).
        tokens (`list[str]`): its tokens; token_probabilities (`list[float]`): the model's probability of each
            (per-token confidence; with bidirectional re-scoring, the left-to-right pass's).
        candidates (`list[dict]`): the distinct n-best, best first, each with `latex`, `score`, `share`,
            `tokens`, `token_probabilities`. `share` is the softmax of the candidates' sequence log-probabilities
            (the sum over their tokens, eos included): p_i / sum_j p_j over the list, so the shares sum to 1.
            It says how the model divides its belief among these candidates, not how likely the answer is right.
            (The ranking divides log-probabilities by length, so a shorter candidate ranked below a longer one
            can hold the larger share.)
        num_beams (`int`): the beam size used (fewer than asked under `max_decoding_cost`).
        attentions (`np.ndarray` of shape `(len(tokens), H, W)`, with `return_attentions`): for each token of
            the best candidate, where the decoder looked, upsampled over the processed image and scaled to peak
            1; model_input (`np.ndarray` of shape `(H, W)`): that processed image, ink 1.0 on 0.0. Draw them with
            `attention_heatmap(model_input, attentions[k])`.
    """

    _load_processor = True
    _load_image_processor = True
    _load_tokenizer = True
    _load_feature_extractor = False
    _pipeline_calls_generate = True

    def _sanitize_parameters(self, return_attentions=None, check_expression=None, answer_limits=None,
                             max_decoding_cost=None, generate_kwargs=None, **kwargs):
        preprocess, postprocess = {}, {}
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if check_expression is not None:
            preprocess["check_expression"] = bool(check_expression)
        if answer_limits is not None:
            postprocess["answer_limits"] = dict(answer_limits)
        if max_decoding_cost is not None:
            forward["max_decoding_cost"] = float(max_decoding_cost)
        if return_attentions is not None:
            forward["return_attentions"] = bool(return_attentions)
        return preprocess, forward, postprocess

    @property
    def checks_expressions(self) -> bool:
        """Whether this model's processor can tell handwriting from other pictures (`check_expression`)."""
        return hasattr(self.processor, "check_image")

    def preprocess(self, image: Any, check_expression: bool = True) -> dict:
        """One input -> {"image": the processed (H, W) float32 image (unpadded; `_forward` pads the batch),
        "ink": its `ink_statistics` when checked, else None}. Raises the `InvalidImageError` kinds."""
        try:
            picture = open_image(image)
            if not (check_expression and self.checks_expressions):
                return {"image": self.image_processor.to_model_image(picture), "ink": None}
            # refuses noise, photos, pages of text here, before any decoding
            model_image, ink = self.processor.check_model_image(picture)
            return {"image": model_image, "ink": ink}
        except InvalidImageError:
            raise
        except ValueError as err:
            raise _own_error(err) from None

    def _forward(self, model_inputs: dict, generate_kwargs: dict | None = None, return_attentions: bool = False,
                 max_decoding_cost: float | None = None):
        images, inks = model_inputs["image"], model_inputs["ink"]
        if isinstance(images, np.ndarray):  # batch_size 1: one image, not a list
            images, inks = [images], [inks]
        batch = self.image_processor.pad_batch(list(images), return_tensors="pt")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        # What the ink allows: a reading needs a few tokens per piece of ink, so noise cannot decode for long.
        limit = self._max_new_tokens(generate_kwargs)
        bounds = [limit if ink is None else self.processor.max_new_tokens_for(ink, limit) for ink in inks]
        generate_kwargs["max_new_tokens"] = max(bounds)  # a batch decodes to its longest bound (see postprocess)
        num_beams = int(generate_kwargs.get("num_beams") or self.model.generation_config.num_beams or 1)
        if max_decoding_cost is not None:
            cells = max(self._feature_cells(image) for image in images)
            num_beams = affordable_beams(num_beams, max(bounds), cells, max_decoding_cost)
        generate_kwargs["num_beams"] = num_beams
        generate_kwargs["num_return_sequences"] = min(generate_kwargs.get("num_return_sequences") or num_beams,
                                                      num_beams)
        output = self.model.generate(
            pixel_values=batch["pixel_values"].to(self.device),
            pixel_mask=batch["pixel_mask"].to(self.device),
            tokenizer=self.tokenizer,
            output_scores=True,
            output_attentions=return_attentions,
            return_dict_in_generate=True,
            **generate_kwargs,
        )
        per_image = output.sequences.shape[0] // len(images)
        results = []
        for i, image in enumerate(images):
            rows = range(i * per_image, (i + 1) * per_image)
            result = {
                "sequences": [output.sequences[r].cpu() for r in rows],
                "sequences_scores": [float(output.sequences_scores[r]) for r in rows],
                "transition_scores": [output.transition_scores[r].float().cpu() for r in rows],
                "num_beams": num_beams,
                # the answer check reads the answer within this image's own bound
                "check_answer": inks[i] is not None,
                "max_new_tokens": bounds[i],
            }
            if return_attentions:
                result["attentions"] = output.attentions[rows[0]].float().cpu()
                result["model_input"] = image
            results.append(result)
        # one list entry per image: transformers' batch iterator hands postprocess one entry each
        return {"images": results}

    def _max_new_tokens(self, generate_kwargs: dict) -> int:
        """The `max_new_tokens` this call asks for (its own, its generation config's, or the model's)."""
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        return int(generate_kwargs.get("max_new_tokens") or config.max_new_tokens or 200)

    def _feature_cells(self, image: np.ndarray) -> int:
        """Encoder feature-map cells of one processed image: what each decoding step attends over."""
        stride = int(getattr(self.model.config, "encoder_stride", 16))
        return math.ceil(image.shape[0] / stride) * math.ceil(image.shape[1] / stride)

    def _check_answer(self, result: dict, answer_limits: dict | None) -> None:
        """Refuses (NotAnExpressionError) a best answer that is no reading: unfinished within its image's own
        bound (in a batch, decoding may have run longer for another image) or improbable throughout."""
        bound = result["max_new_tokens"]
        best = SimpleNamespace(sequences=[result["sequences"][0][:bound]],
                               transition_scores=[result["transition_scores"][0][:bound]])
        try:
            self.processor.check_answer(best, **(answer_limits or {}))
        except InvalidImageError:
            raise
        except ValueError as err:
            raise _own_error(err) from None

    def postprocess(self, model_outputs: dict, answer_limits: dict | None = None) -> dict:
        result = model_outputs["images"]
        result = result[0] if isinstance(result, list) else result  # batch_size 1: the list itself
        if result["check_answer"]:
            self._check_answer(result, answer_limits)
        eos, pad = self.model.config.eos_token_id, self.model.config.pad_token_id
        special = set(self.tokenizer.all_special_ids)
        candidates, log_probabilities, positions = [], [], []
        for ids, score, logp in zip(result["sequences"], result["sequences_scores"], result["transition_scores"]):
            ids = ids.tolist()
            length = ids.index(eos) + 1 if eos in ids else sum(1 for t in ids if t != pad)
            kept = [k for k in range(length) if ids[k] not in special]  # the tokens, without eos
            tokens = self.tokenizer.convert_ids_to_tokens([ids[k] for k in kept])
            latex = self.tokenizer.convert_tokens_to_string(tokens)
            if any(latex == c["latex"] for c in candidates):
                continue
            candidates.append({
                "latex": latex,
                "score": score,
                "tokens": tokens,
                "token_probabilities": [math.exp(float(logp[k])) for k in kept],
            })  # fmt: skip
            log_probabilities.append(float(logp[:length].sum()))
            positions.append(kept)
        for candidate, share in zip(candidates, torch.softmax(torch.tensor(log_probabilities), 0).tolist()):
            candidate["share"] = share
        best = candidates[0]
        output = {
            "latex": best["latex"],
            "score": best["score"],
            "share": best["share"],
            "tokens": best["tokens"],
            "token_probabilities": best["token_probabilities"],
            "candidates": candidates,
            "num_beams": result["num_beams"],
        }
        if "attentions" in result:
            output["model_input"] = result["model_input"]
            output["attentions"] = self._upsample(result["attentions"][positions[0]], result["model_input"].shape)
        return output

    def _upsample(self, maps: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """(T, h, w) attention over feature cells -> (T, H, W) over the processed image, each scaled to peak 1."""
        if maps.shape[0] == 0:
            return np.zeros((0, *shape), dtype=np.float32)
        stride = int(self.model.config.encoder_stride)
        up = torch.nn.functional.interpolate(maps[:, None], scale_factor=stride, mode="bilinear",
                                             align_corners=False)[:, 0]
        canvas = torch.zeros(maps.shape[0], *shape)
        h, w = min(shape[0], up.shape[1]), min(shape[1], up.shape[2])
        canvas[:, :h, :w] = up[:, :h, :w]
        peak = canvas.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (canvas / peak).clamp(0, 1).numpy()


PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=HMERImageToLatexPipeline, pt_model=AutoModelForImageTextToText, type="image"
)
