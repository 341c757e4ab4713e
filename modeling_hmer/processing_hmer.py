"""HMERProcessor: the image processor and the tokenizer of HMER behind one object."""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .expression_check import ExpressionLimits, check_answer, check_ink, ink_statistics, max_new_tokens_for


__all__ = ["HMERProcessor"]


class HMERProcessor(ProcessorMixin):
    r"""
    Wraps an [`HMERImageProcessor`] and an [`HMERTokenizer`].

    `processor(images=..., text=...)` gives the model's inputs: `pixel_values` (B, 1, H, W) float32 (ink 1.0 on
    0.0), `pixel_mask` (B, H, W) int64 and, with `text`, `labels` (B, T) int64: the tokenizer's ids of each
    LaTeX string, ending with `</s>`, padded with -100 (ignored by the loss). `batch_decode` / `decode` turn
    generated ids back into space-separated LaTeX.

    Example:
        >>> processor = HMERProcessor(HMERImageProcessor(), HMERTokenizer())
        >>> batch = processor(images=[image], text=["\\frac{a}{b}"])
        >>> latex = processor.batch_decode(model.generate(**processor(images=[image])))
    """

    label_pad_token_id = -100

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Processes images and/or LaTeX targets.

        Args:
            images: one image or a list (anything `HMERImageProcessor` accepts).
            text: one LaTeX string or a list, one per image; any CROHME spelling (the tokenizer normalizes it).
            return_tensors: "pt" (default), "np" or None (numpy arrays).
        """
        if images is None and text is None:
            raise ValueError("give images, text or both")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        data: dict[str, Any] = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=None))
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if images is not None and len(texts) != len(data["pixel_values"]):
                raise ValueError(f"got {len(data['pixel_values'])} images but {len(texts)} texts")
            data["labels"] = self.make_labels(texts)
        return BatchFeature(data, tensor_type=return_tensors)

    def make_labels(self, texts: list[str]) -> np.ndarray:
        """LaTeX strings -> (B, T) int64 target ids ending with `</s>`, padded with -100."""
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        length = max(len(seq) for seq in ids)
        labels = np.full((len(ids), length), self.label_pad_token_id, dtype=np.int64)
        for i, seq in enumerate(ids):
            labels[i, : len(seq)] = seq
        return labels

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Generated ids (B, L) -> list of space-separated LaTeX strings (special tokens and -100 dropped)."""
        return self.tokenizer.batch_decode(_drop_ignored(sequences), skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        """Generated ids (L,) -> a space-separated LaTeX string."""
        return self.tokenizer.decode(_drop_ignored([sequence])[0], skip_special_tokens=skip_special_tokens, **kwargs)

    # -- "is this a handwritten expression?" (see expression_check) --------------------------------------

    def check_image(self, image: Any, return_tensors: str | None = "pt") -> tuple[BatchFeature, dict]:
        """One image -> (model inputs as `__call__` gives them, its `ink_statistics`).

        Raises `NotAnExpressionError` for noise, photos, pages of text (and `BlankImageError` for no ink).
        """
        model_image, stats = self.check_model_image(image)
        return self.image_processor.pad_batch([model_image], return_tensors=return_tensors), stats

    def check_model_image(self, image: Any) -> tuple[np.ndarray, dict]:
        """`check_image` without the padding: (the processed (H, W) image, its `ink_statistics`)."""
        ink = self.image_processor.ink_map(image)  # read once, for the model image and the statistics
        model_image = self.image_processor.model_image_from_ink(ink)
        stats = ink_statistics(ink, model_image)
        check_ink(stats)
        return model_image, stats

    def max_new_tokens_for(self, stats: dict, limit: int = 200) -> int:
        """The most tokens a reading of an image with these `ink_statistics` can need (at most `limit`)."""
        return max_new_tokens_for(stats, limit)

    def check_answer(self, output, index: int = 0, **limits) -> tuple[float, str]:
        """`generate(..., output_scores=True, return_dict_in_generate=True)` -> (mean token log-prob, LaTeX)
        of sequence `index`; raises `NotAnExpressionError` when it is no reading (unfinished or unsure).
        `limits`: `ExpressionLimits` fields to override."""
        ids = output.sequences[index].tolist()
        eos = self.tokenizer.eos_token_id
        finished = eos in ids
        length = ids.index(eos) + 1 if finished else len(ids)
        scores = getattr(output, "transition_scores", None)  # per-token log-probs (named `scores` before)
        scores = output.scores if scores is None else scores
        mean = check_answer(scores[index][:length].float().cpu().numpy(), finished, ExpressionLimits(**limits))
        return mean, self.decode(ids)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.image_processor.model_input_names)


def _drop_ignored(sequences) -> list[list[int]]:
    """Ids as lists of ints without the -100 label padding (so labels can be decoded too)."""
    if hasattr(sequences, "tolist"):
        sequences = sequences.tolist()
    return [[int(t) for t in seq if int(t) >= 0] for seq in sequences]
