"""The image-to-LaTeX pipeline: one inference path for Python users, the prediction CLI and the Space.

    >>> import modeling_hmer  # registers the task with transformers
    >>> from transformers import pipeline
    >>> reader = pipeline("image-to-latex", model="checkpoints")
    >>> reader("drawing.png", num_beams=5)["latex"]
    'x ^ { 2 } + 1'

Where the package is not installed, a saved model folder carries this file (its config names it under
`custom_pipelines`): `pipeline("image-to-latex", model=folder_or_hub_id, trust_remote_code=True)`.

Besides the pipeline, this module holds what every caller shares: `resolve_model` (which folder or Hub id a
name means), `attention_heatmap` (one picture per attention map) and, from the image processor, `open_image`
and the error type `InvalidImageError` (with its kinds `BlankImageError` for an image without ink and
`ImageTooLargeError` for a file over `open_image`'s size limit).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hmer import PIPELINE_TASK
from .image_processing_hmer import BlankImageError, ImageTooLargeError, InvalidImageError, open_image


__all__ = [
    "BlankImageError",
    "HMERImageToLatexPipeline",
    "ImageTooLargeError",
    "InvalidImageError",
    "ModelNotFoundError",
    "attention_heatmap",
    "open_image",
    "resolve_model",
]


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


class HMERImageToLatexPipeline(Pipeline):
    r"""
    Image(s) of handwritten math -> LaTeX. Task `"image-to-latex"`.

    Inputs: one image or a list: a file path, the bytes of an image file, a PIL image, a numpy array or a torch
    tensor (anything `open_image` reads; either polarity, any colour, transparency). With `batch_size`, images
    are processed and decoded that many at a time (each as if alone). An unreadable input raises
    `InvalidImageError`, an image without ink `BlankImageError` (a subclass): catch them by type.

    Call arguments (also accepted by `pipeline(...)` as defaults):
        num_beams (`int`): beam size, 1 = greedy (default: the model's generation config).
        num_return_sequences (`int`): candidates in the n-best list (default: all `num_beams`).
        max_new_tokens (`int`), and other `generate` settings (`length_penalty`, `latex_grammar`, ...).
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

    def _sanitize_parameters(self, return_attentions=None, generate_kwargs=None, **kwargs):
        forward = {"generate_kwargs": {**(generate_kwargs or {}), **kwargs}}
        if return_attentions is not None:
            forward["return_attentions"] = bool(return_attentions)
        return {}, forward, {}

    def preprocess(self, image: Any) -> dict:
        """One input -> {"image": (H, W) float32}, the processed image (unpadded; `_forward` pads the batch)."""
        try:
            return {"image": self.image_processor.to_model_image(open_image(image))}
        except InvalidImageError:
            raise
        except ValueError as err:
            # Loaded with trust_remote_code, the image processor is another module's copy with its own error
            # classes: raise this module's, so that callers catch one type.
            kinds = {cls.__name__ for cls in type(err).__mro__}
            if "BlankImageError" in kinds:
                raise BlankImageError(str(err)) from None
            if "InvalidImageError" in kinds:
                raise InvalidImageError(str(err)) from None
            raise

    def _forward(self, model_inputs: dict, generate_kwargs: dict | None = None, return_attentions: bool = False):
        images = model_inputs["image"]
        images = [images] if isinstance(images, np.ndarray) else list(images)
        batch = self.image_processor.pad_batch(images, return_tensors="pt")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        num_beams = int(generate_kwargs.get("num_beams") or self.model.generation_config.num_beams or 1)
        generate_kwargs.setdefault("num_return_sequences", num_beams)
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
            }
            if return_attentions:
                result["attentions"] = output.attentions[rows[0]].float().cpu()
                result["model_input"] = image
            results.append(result)
        # one list entry per image: transformers' batch iterator hands postprocess one entry each
        return {"images": results}

    def postprocess(self, model_outputs: dict) -> dict:
        result = model_outputs["images"]
        result = result[0] if isinstance(result, list) else result  # batch_size 1: the list itself
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
