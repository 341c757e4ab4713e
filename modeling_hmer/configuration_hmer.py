"""Configuration of the HMER model (handwritten mathematical expression recognition)."""

from __future__ import annotations

import sys

from transformers import PretrainedConfig

# The pipeline a saved folder names in its config.json (`custom_pipelines`), so that transformers' `pipeline()`
# finds it with trust_remote_code=True where this package is not installed (see pipeline_hmer.py).
PIPELINE_TASK = "image-to-latex"
SAVED_PIPELINE = {"impl": "pipeline_hmer.HMERImageToLatexPipeline", "pt": ["AutoModelForImageTextToText"], "type": "image"}

# DWAP / BTTR / CoMER's DenseNet-B: 684 channels at stride 16, about 3.0M parameters.
# densenet121 is torchvision's ImageNet DenseNet (the original project's encoder): 1024 channels at stride 32.
ENCODER_PRESETS = {
    "densenet-b": {"growth_rate": 24, "block_config": (16, 16, 16), "num_init_features": 48, "bn_size": 4},
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64, "bn_size": 4},
}

# "gru": WAP's two-GRU decoder with coverage attention. "transformer": BTTR/CoMER's decoder.
DECODER_PRESETS = {
    "gru": {
        "hidden_size": 256,
        "embedding_size": 256,
        "attention_dim": 512,
        "coverage_channels": 32,
        "coverage_kernel_size": 11,
        "dropout": 0.2,
    },
    "transformer": {
        "hidden_size": 256,
        "decoder_layers": 3,
        "decoder_attention_heads": 8,
        "decoder_ffn_dim": 1024,
        "coverage_channels": 32,
        "coverage_kernel_size": 5,
        "dropout": 0.3,
        "use_coverage": True,
    },
}


class HMERConfig(PretrainedConfig):
    r"""
    Configuration of [`HMERForConditionalGeneration`]: a DenseNet encoder over a one-channel image and an
    autoregressive decoder that writes LaTeX tokens while attending over the encoder's feature map.

    Every value left at `None` comes from the encoder / decoder preset; an explicit value overrides it.
    `encoder=` and `decoder=` are accepted as aliases of `encoder_type` and `decoder_type`.

    Args:
        encoder_type (`str`, *optional*, defaults to `"densenet-b"`):
            Encoder preset: `"densenet-b"` (DWAP's DenseNet: growth 24, blocks (16, 16, 16), 48 stem channels,
            684 channels at stride 16) or `"densenet121"` (growth 32, blocks (6, 12, 24, 16), 64 stem channels,
            1024 channels at stride 32). Both are torchvision's `DenseNet` with a one-channel stem.
        growth_rate, block_config, num_init_features, bn_size (*optional*):
            torchvision `DenseNet` arguments; override the encoder preset.
        encoder_drop_rate (`float`, *optional*, defaults to 0.0):
            Dropout after each dense layer.
        decoder_type (`str`, *optional*, defaults to `"gru"`):
            `"gru"` (two GRU cells with coverage attention, WAP/DWAP) or `"transformer"` (BTTR/CoMER: trained in
            both reading directions, optional attention refinement with coverage).
        hidden_size (`int`): GRU state size, or the transformer's d_model. 256 in both presets.
        embedding_size (`int`): token embedding size of the GRU decoder (the transformer uses `hidden_size`).
        attention_dim (`int`): size of the GRU decoder's additive attention.
        coverage_channels (`int`): channels of the convolution over the attention coverage (GRU decoder: over
            the sum of past attention; transformer: CoMER's refinement module).
        coverage_kernel_size (`int`): kernel size of that convolution.
        decoder_layers, decoder_attention_heads, decoder_ffn_dim (`int`): transformer decoder sizes.
        use_coverage (`bool`): transformer only: refine each layer's cross-attention with the coverage of past
            attention (CoMER's attention refinement module, without its batch norm). The GRU decoder always
            uses coverage.
        bidirectional (`bool`, *optional*, defaults to `True`): transformer only: train left-to-right and
            right-to-left targets in the same batch (needed for bidirectional re-scoring in `generate`).
        dropout (`float`): decoder dropout.
        label_smoothing (`float`, *optional*, defaults to 0.0): label smoothing of the cross-entropy loss.
        vocab_size (`int`, *optional*, defaults to 114): 4 special tokens plus the 110 CROHME symbols.
        pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id: 0, 1, 2, 1.
        r2l_start_token_id (`int`, *optional*): start token of right-to-left sequences (transformer); defaults
            to `eos_token_id`, so the first input token tells the decoder its reading direction. Both
            directions end with `eos_token_id`.
    """

    model_type = "hmer"

    def __init__(
        self,
        encoder_type: str = "densenet-b",
        growth_rate: int | None = None,
        block_config: tuple[int, ...] | list[int] | None = None,
        num_init_features: int | None = None,
        bn_size: int | None = None,
        encoder_drop_rate: float = 0.0,
        decoder_type: str = "gru",
        hidden_size: int | None = None,
        embedding_size: int | None = None,
        attention_dim: int | None = None,
        coverage_channels: int | None = None,
        coverage_kernel_size: int | None = None,
        decoder_layers: int | None = None,
        decoder_attention_heads: int | None = None,
        decoder_ffn_dim: int | None = None,
        use_coverage: bool | None = None,
        bidirectional: bool = True,
        dropout: float | None = None,
        label_smoothing: float = 0.0,
        vocab_size: int = 114,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        decoder_start_token_id: int = 1,
        r2l_start_token_id: int | None = None,
        **kwargs,
    ):
        # `encoder=` / `decoder=` are accepted as aliases; they are not stored under those names because
        # transformers reads config attributes called "encoder" / "decoder" as nested sub-configurations.
        encoder = kwargs.pop("encoder", None) or encoder_type
        decoder = kwargs.pop("decoder", None) or decoder_type
        if encoder not in ENCODER_PRESETS:
            raise ValueError(f"Unknown encoder preset {encoder!r}; choose one of {sorted(ENCODER_PRESETS)}.")
        if decoder not in DECODER_PRESETS:
            raise ValueError(f"Unknown decoder {decoder!r}; choose one of {sorted(DECODER_PRESETS)}.")
        enc = ENCODER_PRESETS[encoder]
        dec = {
            "embedding_size": None,
            "attention_dim": None,
            "decoder_layers": None,
            "decoder_attention_heads": None,
            "decoder_ffn_dim": None,
            "use_coverage": True,
            **DECODER_PRESETS[decoder],
        }

        def pick(value, default):
            return default if value is None else value

        self.encoder_type = encoder
        self.growth_rate = int(pick(growth_rate, enc["growth_rate"]))
        self.block_config = [int(n) for n in pick(block_config, enc["block_config"])]
        self.num_init_features = int(pick(num_init_features, enc["num_init_features"]))
        self.bn_size = int(pick(bn_size, enc["bn_size"]))
        self.encoder_drop_rate = float(encoder_drop_rate)

        self.decoder_type = decoder
        self.hidden_size = int(pick(hidden_size, dec["hidden_size"]))
        self.embedding_size = pick(embedding_size, dec["embedding_size"])
        self.attention_dim = pick(attention_dim, dec["attention_dim"])
        self.coverage_channels = int(pick(coverage_channels, dec["coverage_channels"]))
        self.coverage_kernel_size = int(pick(coverage_kernel_size, dec["coverage_kernel_size"]))
        self.decoder_layers = pick(decoder_layers, dec["decoder_layers"])
        self.decoder_attention_heads = pick(decoder_attention_heads, dec["decoder_attention_heads"])
        self.decoder_ffn_dim = pick(decoder_ffn_dim, dec["decoder_ffn_dim"])
        self.use_coverage = bool(pick(use_coverage, dec["use_coverage"]))
        self.bidirectional = bool(bidirectional)
        self.dropout = float(pick(dropout, dec["dropout"]))
        self.label_smoothing = float(label_smoothing)
        self.vocab_size = int(vocab_size)
        self.r2l_start_token_id = int(pick(r2l_start_token_id, eos_token_id))

        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"block_config needs at least one dense block of at least one layer, got {block_config}.")
        if self.coverage_kernel_size % 2 != 1:
            raise ValueError(f"coverage_kernel_size must be odd, got {self.coverage_kernel_size}.")
        if decoder == "transformer" and self.hidden_size % self.decoder_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by decoder_attention_heads "
                f"({self.decoder_attention_heads})."
            )
        if decoder == "transformer" and self.hidden_size % 4 != 0:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sine positions), got {self.hidden_size}.")
        if decoder == "gru" and self.embedding_size % 2 != 0:
            raise ValueError(f"embedding_size must be even (maxout of 2), got {self.embedding_size}.")

        kwargs.pop("is_encoder_decoder", None)
        kwargs.pop("custom_pipelines", None)  # always this model's own, see `custom_pipelines` below
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=True,
            **kwargs,
        )

    @property
    def custom_pipelines(self) -> dict:
        """The pipeline `transformers.pipeline()` should load this model's code for, none when it is registered.

        transformers prefers a config's `custom_pipelines` to its registered tasks and then demands
        trust_remote_code; where the HMER pipeline is already registered (the package, or the folder's code, is
        imported), `pipeline("image-to-latex", model=folder)` must use that. config.json always names it (`to_dict`).
        """
        registry = getattr(sys.modules.get("transformers.pipelines"), "PIPELINE_REGISTRY", None)
        if registry is not None and PIPELINE_TASK in registry.supported_tasks:
            return {}
        return {PIPELINE_TASK: dict(SAVED_PIPELINE)}

    @custom_pipelines.setter
    def custom_pipelines(self, value) -> None:
        pass  # `Pipeline.save_pretrained` sets it; what is saved is always this model's pipeline

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["custom_pipelines"] = {PIPELINE_TASK: dict(SAVED_PIPELINE)}
        return output

    @property
    def encoder_stride(self) -> int:
        """Pixels per feature-map cell: the stem divides by 4, each transition between dense blocks by 2."""
        return 4 * 2 ** (len(self.block_config) - 1)

    @property
    def encoder_hidden_size(self) -> int:
        """Channels of the encoder's feature map (684 for densenet-b, 1024 for densenet121)."""
        channels = self.num_init_features
        for i, num_layers in enumerate(self.block_config):
            channels += num_layers * self.growth_rate
            if i != len(self.block_config) - 1:
                channels //= 2
        return channels


__all__ = ["HMERConfig"]
