"""HMER: handwritten mathematical expression recognition (image -> LaTeX), Hugging Face style.

Importing this package registers its classes with the transformers Auto classes, so a saved folder
(or Hub repository) loads with `AutoConfig`, `AutoModelForImageTextToText` (or `AutoModel`),
`AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor`. The classes are also registered for
`register_for_auto_class`: `save_pretrained` writes an `auto_map` and copies the code files, so the
folder loads with `trust_remote_code=True` where this package is not installed.

    >>> from modeling_hmer import HMERForConditionalGeneration, HMERProcessor
    >>> processor = HMERProcessor.from_pretrained("checkpoints")
    >>> model = HMERForConditionalGeneration.from_pretrained("checkpoints")
    >>> inputs = processor(images=image)
    >>> processor.batch_decode(model.generate(**inputs, num_beams=10))

It also registers the `"image-to-latex"` pipeline (`HMERImageToLatexPipeline`):

    >>> from transformers import pipeline
    >>> pipeline("image-to-latex", model="checkpoints")("drawing.png", num_beams=5)["latex"]
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_hmer import HMERConfig
from .expression_check import NotAnExpressionError
from .image_processing_hmer import (
    BlankImageError,
    DamagedImageError,
    HMERImageProcessor,
    ImageTooLargeError,
    InvalidImageError,
    open_image,
)
from .latex import normalize
from .latex_grammar import LatexGrammarLogitsProcessor, is_well_formed
from .modeling_hmer import HMERForConditionalGeneration, HMERPreTrainedModel
from .pipeline_hmer import HMERImageToLatexPipeline, ModelNotFoundError, attention_heatmap, resolve_model
from .processing_hmer import HMERProcessor
from .tokenization_hmer import HMERTokenizer


__all__ = [
    "BlankImageError",
    "DamagedImageError",
    "HMERConfig",
    "HMERForConditionalGeneration",
    "HMERImageProcessor",
    "HMERImageToLatexPipeline",
    "HMERPreTrainedModel",
    "HMERProcessor",
    "HMERTokenizer",
    "ImageTooLargeError",
    "InvalidImageError",
    "LatexGrammarLogitsProcessor",
    "ModelNotFoundError",
    "NotAnExpressionError",
    "attention_heatmap",
    "is_well_formed",
    "normalize",
    "open_image",
    "resolve_model",
]

# exist_ok: the package may be imported twice under different names (e.g. remote-code copies).
AutoConfig.register(HMERConfig.model_type, HMERConfig, exist_ok=True)
AutoModel.register(HMERConfig, HMERForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(HMERConfig, HMERForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(HMERConfig, slow_tokenizer_class=HMERTokenizer, exist_ok=True)
AutoImageProcessor.register(
    HMERConfig, image_processor_classes={"pil": HMERImageProcessor, "torchvision": HMERImageProcessor}, exist_ok=True
)
AutoProcessor.register(HMERConfig, HMERProcessor, exist_ok=True)

# Saved folders carry an auto_map and the code files (trust_remote_code=True loading).
HMERConfig.register_for_auto_class()
HMERForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
HMERTokenizer.register_for_auto_class()
HMERImageProcessor.register_for_auto_class()
HMERProcessor.register_for_auto_class()
