"""HMER: a DenseNet encoder and a GRU or transformer decoder that reads handwritten math as LaTeX tokens.

Shapes used below: B images, N = B * beams decoding rows, T tokens, C encoder channels, (h, w) the feature map
(stride `config.encoder_stride`: 16 for densenet-b), L = h * w feature cells, V vocabulary size.

Token conventions (see `HMERConfig`): labels are target ids ending in eos and padded with -100, without a start
token; the model builds its decoder inputs by shifting them right behind `decoder_start_token_id` (bos). The
transformer decoder also trains right-to-left: its inputs start with `r2l_start_token_id` (eos by default) and
its targets are the reversed tokens followed by eos.

The search (`generate`: greedy, beam, bidirectional re-scoring) is `generation_hmer.HMERGenerationMixin`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet
from torchvision.models.densenet import _DenseBlock, _Transition
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_hmer import HMERConfig
from .generation_hmer import HMERGenerateOutput, HMERGenerationMixin, index_batch, reverse_labels, shift_tokens_right

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init


@dataclass
class HMERSeq2SeqLMOutput(ModelOutput):
    """
    Output of [`HMERForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): mean cross-entropy over all target tokens (both
            reading directions for a bidirectional transformer), returned when `labels` are given.
        logits (`torch.FloatTensor` of shape `(B, T, V)`): next-token scores for the (left-to-right) inputs.
        attentions (`torch.FloatTensor` of shape `(B, T, h, w)`, *optional*): attention of each decoding step over
            the feature map (transformer: last layer, mean over heads); zero on padded cells.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(B, C, h, w)`): the encoder's feature map.
        feature_mask (`torch.BoolTensor` of shape `(B, h, w)`): True on feature cells that come from the image.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    feature_mask: torch.BoolTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _sine_frequencies(num: int, device) -> torch.Tensor:
    """(num,) angular frequencies 1 / 10000 ** (i / num) of the sine position encodings."""
    return torch.exp(torch.arange(num, device=device, dtype=torch.float32) * (-math.log(10000.0) / num))


def sine_positions_1d(length: int, dim: int, device) -> torch.Tensor:
    """(length, dim) sine / cosine encoding of positions 0 .. length - 1."""
    angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1) * _sine_frequencies(dim // 2, device)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sine_positions_2d(feature_mask: torch.Tensor, dim: int) -> torch.Tensor:
    """
    (B, h, w) bool mask -> (B, h, w, dim) 2-D sine encoding (DETR / BTTR): half the channels encode the row and
    half the column, each normalized to (0, 2 pi] over the image's own valid extent, so padding does not change
    the encoding of valid cells.
    """
    mask = feature_mask.float()
    rows = mask.cumsum(1)
    cols = mask.cumsum(2)
    rows = rows / (rows[:, -1:, :] + 1e-6) * (2 * math.pi)
    cols = cols / (cols[:, :, -1:] + 1e-6) * (2 * math.pi)
    freqs = _sine_frequencies(dim // 4, feature_mask.device)
    row_angles = rows.unsqueeze(-1) * freqs
    col_angles = cols.unsqueeze(-1) * freqs
    return torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# encoder


class HMEREncoder(nn.Module):
    """
    torchvision's `DenseNet.features` with a one-channel stem, followed by ReLU (as torchvision's classifier path).

    Input `(B, 1, H, W)` and an optional `(B, H, W)` pixel mask whose ones form a top-left rectangle per image (the
    image, then padding). Output `(B, C, h, w)` features and a `(B, h, w)` bool feature mask.

    When a batch holds padded images, activations in the padding are zeroed before every spatial operation (3x3
    convolutions, the stem's max-pool), and each image's valid size is followed through the strides, so a padded
    image gives exactly the features of the same image alone (in eval mode).
    """

    def __init__(self, config: HMERConfig):
        super().__init__()
        densenet = DenseNet(
            growth_rate=config.growth_rate,
            block_config=tuple(config.block_config),
            num_init_features=config.num_init_features,
            bn_size=config.bn_size,
            drop_rate=config.encoder_drop_rate,
        )
        features = densenet.features
        features.conv0 = nn.Conv2d(1, config.num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
        self.features = features
        self.num_blocks = len(config.block_config)
        self.stride = config.encoder_stride
        self.out_channels = config.encoder_hidden_size

    def valid_sizes(self, sizes: torch.Tensor) -> list[torch.Tensor]:
        """
        (B, 2) valid (height, width) in pixels -> sizes after the stem conv (stride 2), the max-pool (stride 4)
        and each transition (stride 8, 16, ...): a list of `1 + num_blocks` (B, 2) tensors; the last is the
        feature map's.
        """
        half = (sizes - 1) // 2 + 1  # conv 7x7 / 2, padding 3
        levels = [half, (half - 1) // 2 + 1]  # max-pool 3x3 / 2, padding 1
        for _ in range(self.num_blocks - 1):
            levels.append(levels[-1] // 2)  # average-pool 2x2 / 2
        return levels

    @staticmethod
    def _rectangles(sizes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 2) sizes -> (B, height, width) bool, True inside each top-left rectangle."""
        rows = torch.arange(height, device=sizes.device) < sizes[:, :1]
        cols = torch.arange(width, device=sizes.device) < sizes[:, 1:]
        return rows.unsqueeze(2) & cols.unsqueeze(1)

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = pixel_values.shape
        full = torch.tensor([height, width], device=pixel_values.device)
        if pixel_mask is None:
            sizes = full.expand(batch, 2)
        else:
            pixel_mask = pixel_mask.bool()
            sizes = torch.stack([pixel_mask.any(2).sum(1), pixel_mask.any(1).sum(1)], dim=1)
            if not torch.equal(self._rectangles(sizes, height, width), pixel_mask):
                raise ValueError(
                    "pixel_mask must be 1 on a top-left rectangle of each image (the image) and 0 elsewhere "
                    "(the padding), as HMERImageProcessor makes it."
                )
        levels = self.valid_sizes(sizes)
        if int(levels[-1].min()) < 1:
            small = sizes[levels[-1].min(1).values < 1][0].tolist()
            raise ValueError(
                f"An image of {small[0]}x{small[1]} px is too small for the encoder, which divides sizes by "
                f"{self.stride}: it needs at least about {self.stride} px in height and width."
            )

        f = self.features
        x = pixel_values
        if f.conv0.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        if pixel_mask is None or bool((sizes == full).all()):
            x = f(x)  # nothing padded: torchvision's own forward
        else:
            x = self._masked_forward(x, pixel_mask, levels)
        x = F.relu(x)
        feature_mask = self._rectangles(levels[-1], x.shape[2], x.shape[3])
        return x, feature_mask

    def _masked_forward(self, x: torch.Tensor, pixel_mask: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """torchvision's DenseNet forward, with padded activations zeroed before each spatial operation."""
        f = self.features

        def zero_padding(t: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
            return t * self._rectangles(sizes, t.shape[2], t.shape[3]).unsqueeze(1).to(t.dtype)

        x = x * pixel_mask.unsqueeze(1).to(x.dtype)
        x = f.relu0(f.norm0(f.conv0(x)))
        x = f.pool0(zero_padding(x, levels[0]))
        level = 1
        for name, module in f.named_children():
            if name in ("conv0", "norm0", "relu0", "pool0"):
                continue
            if isinstance(module, _DenseBlock):
                mask = self._rectangles(levels[level], x.shape[2], x.shape[3]).unsqueeze(1).to(x.dtype)
                inputs = [x]
                for layer in module.values():
                    bottleneck = layer.relu2(layer.norm2(layer.bn_function(inputs)))
                    new = layer.conv2(bottleneck * mask)
                    if layer.drop_rate > 0:
                        new = F.dropout(new, p=layer.drop_rate, training=self.training)
                    inputs.append(new)
                x = torch.cat(inputs, 1)
            elif isinstance(module, _Transition):
                x = module(x)  # 1x1 conv then 2x2 average pool: valid outputs only read valid inputs
                level += 1
            else:  # norm5
                x = module(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# GRU decoder (WAP / DWAP)


class HMERGRUDecoder(nn.Module):
    """
    WAP's decoder. At each step, with y the previous token, s the state and F the (L, C) features:

        s_hat = GRU1(E y, s)
        e     = v^T tanh(U_a F + W_a s_hat + U_f (Q * beta))     beta: sum of past attention maps, Q: a conv
        alpha = softmax(e) over valid cells;   c = alpha F
        s     = GRU2(c, s_hat)
        p(y') = softmax(W_o maxout(W_s s + W_c c + E y))

    Per-step cost is kept small by computing once per image what does not depend on the step (`prepare`):
    U_a F, the initial state tanh(W_init mean(F)), and F projected by GRU2's input weights and W_c: since
    alpha sums to 1, alpha (F W^T + b) = (alpha F) W^T + b, so the context itself is never formed. Also
    v^T tanh(z) = 2 v^T sigmoid(2 z) - sum(v), and softmax ignores the constant: sigmoid is several times faster
    than tanh on CPU. Beams of one image share the per-image tensors (rows of a step: image-major, N = B * K).
    """

    def __init__(self, config: HMERConfig):
        super().__init__()
        channels = config.encoder_hidden_size
        hidden, embed, attention = config.hidden_size, config.embedding_size, config.attention_dim
        kernel = config.coverage_kernel_size
        self.hidden_size = hidden
        self.embed_tokens = nn.Embedding(config.vocab_size, embed)
        self.init_proj = nn.Linear(channels, hidden)  # W_init
        self.gru1 = nn.GRUCell(embed, hidden)
        self.gru2 = nn.GRUCell(channels, hidden)
        self.key_proj = nn.Linear(channels, attention)  # U_a
        self.query_proj = nn.Linear(hidden, attention, bias=False)  # W_a
        self.coverage_conv = nn.Conv2d(1, config.coverage_channels, kernel, padding=kernel // 2, bias=False)  # Q
        self.coverage_proj = nn.Conv2d(config.coverage_channels, attention, 1, bias=False)  # U_f
        self.attention_score = nn.Linear(attention, 1, bias=False)  # v
        self.out_state = nn.Linear(hidden, embed)  # W_s
        self.out_context = nn.Linear(channels, embed, bias=False)  # W_c
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(embed // 2, config.vocab_size)  # W_o, after a maxout of 2

    def prepare(self, features: torch.Tensor, feature_mask: torch.Tensor) -> dict:
        """(B, C, h, w) features, (B, h, w) mask -> per-image tensors reused at every step."""
        _, _, height, width = features.shape
        flat = features.flatten(2).transpose(1, 2)  # (B, L, C)
        mask = feature_mask.flatten(1)  # (B, L)
        weight = torch.cat([self.gru2.weight_ih, self.out_context.weight])  # (3H + E, C)
        bias = torch.cat([self.gru2.bias_ih, self.gru2.bias_ih.new_zeros(self.out_context.out_features)])
        mean = (flat * mask.unsqueeze(2).to(flat.dtype)).sum(1) / mask.sum(1, keepdim=True).to(flat.dtype)
        mask_bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        return {
            "values": F.linear(flat, weight, bias),  # (B, L, 3H + E): [GRU2 input gates | W_c F]
            "keys": (2 * self.key_proj(flat)).transpose(1, 2).contiguous(),  # (B, A, L): 2 U_a F
            "mask_bias": mask_bias.unsqueeze(1),  # (B, 1, L)
            "state": torch.tanh(self.init_proj(mean)),  # (B, H)
            "shape": (height, width),
        }

    def init_state(self, static: dict, num_beams: int = 1) -> dict:
        """State at step 0 for N = B * num_beams rows: the GRU state (N, H) and the coverage (N, 1, L)."""
        state = static["state"].repeat_interleave(num_beams, dim=0)
        coverage = static["mask_bias"].new_zeros(state.shape[0], 1, static["mask_bias"].shape[-1])
        return {"state": state, "coverage": coverage}

    @staticmethod
    def reorder_state(state: dict, index: torch.Tensor) -> dict:
        return index_batch(state, index)

    def _recurrence(self, embedded: torch.Tensor, static: dict, state: dict):
        """
        One step without the output layer: (N, E) embedded previous tokens -> next state, W_c c (N, E) and the
        attention (N, L).
        """
        s_hat = self.gru1(embedded, state["state"])
        rows, batch = s_hat.shape[0], static["keys"].shape[0]
        height, width = static["shape"]
        coverage = state["coverage"]  # (N, 1, L)
        covered = self.coverage_proj(self.coverage_conv(coverage.view(rows, 1, height, width)))  # (N, A, h, w)
        query = self.query_proj(s_hat).unsqueeze(2)  # (N, A, 1)
        z = (covered.flatten(2) + query).unflatten(0, (batch, -1))  # (B, K, A, L), without U_a F
        gates = torch.sigmoid(torch.add(static["keys"].unsqueeze(1), z, alpha=2))  # sigmoid(2 (U_a F + ...))
        scores = torch.matmul(2 * self.attention_score.weight, gates).squeeze(2)  # (B, K, L)
        alpha = torch.softmax(scores.float() + static["mask_bias"], dim=-1)  # (B, K, L)
        projected = torch.bmm(alpha.to(static["values"].dtype), static["values"]).flatten(0, 1)  # (N, 3H + E)
        gate_inputs, context_out = projected[:, : 3 * self.hidden_size], projected[:, 3 * self.hidden_size :]
        new_state = self._gru2(gate_inputs, s_hat)
        alpha = alpha.flatten(0, 1)  # (N, L)
        return {"state": new_state, "coverage": coverage + alpha.unsqueeze(1)}, context_out, alpha

    def _gru2(self, gate_inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`nn.GRUCell` with the input projection already done: (N, 3H) W_ih c + b_ih, (N, H) -> (N, H)."""
        gate_hidden = F.linear(hidden, self.gru2.weight_hh, self.gru2.bias_hh)
        split = 2 * self.hidden_size
        reset, update = torch.sigmoid(gate_inputs[:, :split] + gate_hidden[:, :split]).chunk(2, 1)
        candidate = torch.tanh(gate_inputs[:, split:] + reset * gate_hidden[:, split:])
        return candidate + update * (hidden - candidate)

    def _output(self, state: torch.Tensor, context_out: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """(..., H) state, (..., E) W_c c, (..., E) embedded previous token -> (..., V) logits."""
        out = self.out_state(state) + context_out + embedded
        out = out.unflatten(-1, (-1, 2)).amax(-1)  # maxout of 2
        return self.lm_head(self.dropout(out))

    def step(self, input_ids: torch.Tensor, static: dict, state: dict):
        """(N,) previous tokens -> logits (N, V), attention (N, L), next state."""
        embedded = self.embed_tokens(input_ids)
        state, context_out, alpha = self._recurrence(embedded, static, state)
        return self._output(state["state"], context_out, embedded), alpha, state

    def forward(self, static: dict, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: (B, T) inputs -> logits (B, T, V), attention (B, T, L)."""
        embedded = self.embed_tokens(input_ids)  # (B, T, E)
        state = self.init_state(static)
        states, contexts, alphas = [], [], []
        for t in range(input_ids.shape[1]):
            state, context_out, alpha = self._recurrence(embedded[:, t], static, state)
            states.append(state["state"])
            contexts.append(context_out)
            alphas.append(alpha)
        logits = self._output(torch.stack(states, 1), torch.stack(contexts, 1), embedded)
        return logits, torch.stack(alphas, 1)


# ----------------------------------------------------------------------------------------------------------------
# transformer decoder (BTTR / CoMER)


class HMERSelfAttention(nn.Module):
    """Causal multi-head self-attention over the tokens, with a key/value cache for step-by-step decoding."""

    def __init__(self, config: HMERConfig):
        super().__init__()
        self.num_heads = config.decoder_attention_heads
        self.in_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(B, T, d) -> (B, T, d) and the (B, heads, T_total, d / heads) keys and values (for the cache)."""
        batch, length, dim = x.shape
        q, k, v = self.in_proj(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:  # step mode: one new token attends to the cached prefix and itself
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache is None and length > 1, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), (k, v)


class HMERCrossAttention(nn.Module):
    """Multi-head attention of the tokens over the feature map; returns its weights (for coverage and display)."""

    def __init__(self, config: HMERConfig):
        super().__init__()
        self.num_heads = config.decoder_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d) memory -> keys and values (B, heads, L, d / heads); computed once per image."""
        batch, cells, _ = memory.shape
        k, v = self.kv_proj(memory).view(batch, cells, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k.contiguous(), v.contiguous()

    def forward(self, x: torch.Tensor, memory_kv, mask_bias: torch.Tensor, refine=None):
        """
        x (B, T, d), memory keys / values (B, heads, L, dh), mask_bias (B, 1, 1, L) with -inf on padding.
        `refine(raw)` maps the unrefined attention (B, heads, T, L) to a coverage penalty of the same shape that
        is subtracted from the attention logits (CoMER's attention refinement).
        Returns the output (B, T, d), the attention (B, heads, T, L) and the unrefined attention (or None).
        """
        batch, length, dim = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        logits = torch.matmul(q * self.head_dim**-0.5, memory_kv[0].transpose(2, 3)).float() + mask_bias
        raw = None
        if refine is not None:
            raw = torch.softmax(logits, dim=-1)
            logits = logits - refine(raw)
        attn = torch.softmax(logits, dim=-1)
        out = torch.matmul(self.dropout(attn).to(memory_kv[1].dtype), memory_kv[1])
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), attn, raw


class HMERAttentionRefinement(nn.Module):
    """
    CoMER's attention refinement module, without its batch norm: from the coverage of past attention (the
    previous layer's refined maps and this layer's unrefined maps, summed over earlier steps) a convolution
    predicts, per head, a penalty subtracted from the cross-attention logits, so attended regions are not
    attended again. Shared by all decoder layers but the first.
    """

    def __init__(self, config: HMERConfig):
        super().__init__()
        heads, kernel = config.decoder_attention_heads, config.coverage_kernel_size
        self.conv = nn.Conv2d(2 * heads, config.coverage_channels, kernel, padding=kernel // 2)
        self.proj = nn.Conv2d(config.coverage_channels, heads, 1, bias=False)

    def forward(self, coverage: torch.Tensor) -> torch.Tensor:
        """(M, 2 heads, h, w) summed past attention -> (M, heads, L) penalty."""
        return self.proj(F.relu(self.conv(coverage))).flatten(2).float()

    def parallel(self, previous: torch.Tensor, raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Teacher forcing: (B, heads, T, L) previous-layer and unrefined maps -> (B, heads, T, L) penalty."""
        batch, heads, length, cells = raw.shape
        maps = torch.cat([previous, raw], dim=1)  # (B, 2 heads, T, L)
        past = maps.cumsum(2) - maps  # exclusive: steps before t
        past = past.transpose(1, 2).reshape(batch * length, 2 * heads, *shape)
        return self(past).view(batch, length, heads, cells).transpose(1, 2)


class HMERTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer (as `nn.TransformerDecoderLayer`): self-attention, cross-attention, FFN."""

    def __init__(self, config: HMERConfig):
        super().__init__()
        dim = config.hidden_size
        self.self_attn = HMERSelfAttention(config)
        self.cross_attn = HMERCrossAttention(config)
        self.fc1 = nn.Linear(dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, memory_kv, mask_bias, refine=None, cache=None):
        """
        x (N, T, d) -> x (N, T, d), attention (B, heads, K * T, L), unrefined attention, self-attention cache.
        The memory has B rows (images) and x has N = B * K (K beams per image, image-major): the cross-attention
        runs per image with the K beams' tokens as queries, so the memory is never copied per beam.
        """
        h, cache = self.self_attn(x, cache)
        x = self.norm1(x + self.dropout(h))
        h, attn, raw = self.cross_attn(x.reshape(mask_bias.shape[0], -1, x.shape[-1]), memory_kv, mask_bias, refine)
        x = self.norm2(x + self.dropout(h.reshape(x.shape)))
        h = self.fc2(self.dropout(F.relu(self.fc1(x))))
        x = self.norm3(x + self.dropout(h))
        return x, attn, raw, cache


class HMERTransformerDecoder(nn.Module):
    """
    BTTR / CoMER decoder. Memory: features projected to d_model, plus 2-D sine positions, layer-normed. Tokens:
    embedding, layer norm, plus 1-D sine positions. The first input token sets the reading direction (bos:
    left-to-right, `r2l_start_token_id`: right-to-left). With `use_coverage`, layers after the first refine
    their cross-attention with the coverage of past attention.

    `prepare` projects the memory to keys and values of every layer once per image; `step` then only runs the new
    token through the layers, with cached self-attention keys/values and running coverage sums.
    """

    def __init__(self, config: HMERConfig):
        super().__init__()
        dim = config.hidden_size
        self.hidden_size = dim
        self.num_heads = config.decoder_attention_heads
        self.feature_proj = nn.Linear(config.encoder_hidden_size, dim)
        self.feature_norm = nn.LayerNorm(dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(HMERTransformerDecoderLayer(config) for _ in range(config.decoder_layers))
        self.refinement = HMERAttentionRefinement(config) if config.use_coverage else None
        self.lm_head = nn.Linear(dim, config.vocab_size)

    def prepare(self, features: torch.Tensor, feature_mask: torch.Tensor) -> dict:
        """(B, C, h, w) features, (B, h, w) mask -> per-layer memory keys / values and the mask bias."""
        _, _, height, width = features.shape
        positions = sine_positions_2d(feature_mask, self.hidden_size).flatten(1, 2)  # (B, L, d)
        memory = self.feature_norm(self.feature_proj(features.flatten(2).transpose(1, 2)) + positions)
        mask = feature_mask.flatten(1)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        return {
            "memory_kv": [layer.cross_attn.project_memory(memory) for layer in self.layers],
            "mask_bias": bias[:, None, None, :],  # (B, 1, 1, L)
            "shape": (height, width),
        }

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed_tokens(input_ids)) + positions

    def forward(self, static: dict, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: (B, T) inputs -> logits (B, T, V), attention (B, T, L) of the last layer, mean of heads."""
        x = self._embed(input_ids, sine_positions_1d(input_ids.shape[1], self.hidden_size, input_ids.device))
        previous = None
        for i, layer in enumerate(self.layers):
            refine = None
            if self.refinement is not None and i > 0:
                prev = previous

                def refine(raw, prev=prev):
                    return self.refinement.parallel(prev, raw, static["shape"])

            x, previous, _, _ = layer(x, static["memory_kv"][i], static["mask_bias"], refine)
        return self.lm_head(x), previous.mean(1)

    def init_state(self, static: dict, num_beams: int = 1) -> dict:
        """N = B * num_beams rows: empty self-attention caches (N, heads, 0, dh), zero coverage sums (N, 2 heads, L)."""
        k0 = static["memory_kv"][0][0]
        batch, heads, cells, head_dim = k0.shape
        rows = batch * num_beams
        empty = k0.new_zeros(rows, heads, 0, head_dim)
        state = {"cache": [(empty, empty) for _ in self.layers], "step": 0}
        if self.refinement is not None:
            state["coverage"] = [torch.zeros(rows, 2 * heads, cells, device=k0.device) for _ in self.layers[1:]]
        return state

    @staticmethod
    def reorder_state(state: dict, index: torch.Tensor) -> dict:
        return index_batch(state, index)

    def step(self, input_ids: torch.Tensor, static: dict, state: dict):
        """(N,) previous tokens, N = B * K -> logits (N, V), attention (N, L), next state."""
        t, rows = state["step"], input_ids.shape[0]
        batch = static["mask_bias"].shape[0]
        position = sine_positions_1d(t + 1, self.hidden_size, input_ids.device)[t:]
        x = self._embed(input_ids.unsqueeze(1), position)  # (N, 1, d)
        height, width = static["shape"]
        caches, coverage = [], []
        previous = None  # (N, heads, L)
        for i, layer in enumerate(self.layers):
            refine = None
            if self.refinement is not None and i > 0:
                past = state["coverage"][i - 1]  # (N, 2 heads, L), summed over steps < t
                penalty = self.refinement(past.view(rows, -1, height, width))  # (N, heads, L)
                penalty = penalty.unflatten(0, (batch, -1)).transpose(1, 2)  # (B, heads, K, L)

                def refine(raw, penalty=penalty):
                    return penalty

            x, attn, raw, cache = layer(x, static["memory_kv"][i], static["mask_bias"], refine, state["cache"][i])
            caches.append(cache)
            attn = attn.transpose(1, 2).flatten(0, 1)  # (B, heads, K, L) -> (N, heads, L)
            if refine is not None:
                raw = raw.transpose(1, 2).flatten(0, 1)
                coverage.append(state["coverage"][i - 1] + torch.cat([previous, raw], dim=1))
            previous = attn
        new_state = {"cache": caches, "step": t + 1}
        if self.refinement is not None:
            new_state["coverage"] = coverage
        return self.lm_head(x.squeeze(1)), previous.mean(1), new_state


# ----------------------------------------------------------------------------------------------------------------
# the model


class HMERPreTrainedModel(PreTrainedModel):
    config_class = HMERConfig
    base_model_prefix = "hmer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["HMEREncoder", "HMERGRUDecoder", "HMERTransformerDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=module.embedding_dim**-0.5)
        elif isinstance(module, nn.GRUCell):
            init.xavier_uniform_(module.weight_ih)
            init.orthogonal_(module.weight_hh)
            init.zeros_(module.bias_ih)
            init.zeros_(module.bias_hh)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)


class HMERForConditionalGeneration(HMERPreTrainedModel, HMERGenerationMixin):
    """
    Image of a handwritten expression -> LaTeX token ids.

    Inputs: `pixel_values` (B, 1, H, W) float, ink 1.0 on background 0.0; `pixel_mask` (B, H, W), 1 on the image
    and 0 on padding (a top-left rectangle per image), as made by `HMERImageProcessor`.

    `generate` is this model's own (`generation_hmer.HMERGenerationMixin`: greedy, batched beam search, bidirectional
    re-scoring for the transformer, LaTeX grammar); its defaults come from `self.generation_config`, saved beside the
    weights as generation_config.json.
    """

    def __init__(self, config: HMERConfig):
        super().__init__(config)
        self.encoder = HMEREncoder(config)
        if config.decoder_type == "gru":
            self.decoder = HMERGRUDecoder(config)
        else:
            self.decoder = HMERTransformerDecoder(config)
        self.post_init()
        self.generation_config = self.default_generation_config(config)

    @staticmethod
    def default_generation_config(config: HMERConfig) -> GenerationConfig:
        """Greedy decoding of up to 200 tokens of well-formed LaTeX; `bidirectional_rescoring` applies to transformer
        beam search."""
        return GenerationConfig(
            num_beams=1,
            max_new_tokens=200,
            length_penalty=1.0,
            num_return_sequences=1,
            bidirectional_rescoring=config.decoder_type == "transformer" and config.bidirectional,
            latex_grammar=True,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            decoder_start_token_id=config.decoder_start_token_id,
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a folder that carries its code (`register_for_auto_class`) also gets
        the pipeline's (pipeline_hmer.py and what it imports), which its config.json names for `pipeline()`."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:
            from transformers.dynamic_module_utils import custom_object_save

            from .pipeline_hmer import HMERImageToLatexPipeline

            custom_object_save(HMERImageToLatexPipeline, save_directory)

    def get_encoder(self):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    # ------------------------------------------------------------------------------------------------------------

    def _check_pixels(self, pixel_values, pixel_mask):
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 1:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a tensor of shape (batch, 1, height, width), got {shape}.")
        if pixel_mask is not None:
            expected = (pixel_values.shape[0], *pixel_values.shape[2:])
            if tuple(pixel_mask.shape) != expected:
                raise ValueError(
                    f"pixel_mask must have shape {expected} (batch, height, width), got {tuple(pixel_mask.shape)}."
                )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point (ink 1.0 on 0.0), got {pixel_values.dtype}.")
        return pixel_values.to(self.encoder.features.conv0.weight.dtype)

    def encode(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None):
        """(B, 1, H, W), (B, H, W) -> features (B, C, h, w), feature mask (B, h, w) bool."""
        pixel_values = self._check_pixels(pixel_values, pixel_mask)
        return self.encoder(pixel_values, pixel_mask)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> HMERSeq2SeqLMOutput | tuple:
        """
        Args:
            pixel_values (`(B, 1, H, W)` float): ink 1.0 on background 0.0.
            pixel_mask (`(B, H, W)`, *optional*): 1 on the image, 0 on padding.
            labels (`(B, T)` long, *optional*): target ids ending in eos, padded with -100, no start token. The
                decoder inputs are these shifted right behind bos; a bidirectional transformer also trains on the
                reversed targets in the same batch.
            decoder_input_ids (`(B, T)` long, *optional*): explicit decoder inputs (then only their direction is
                run: the first token picks it for the transformer).
            output_attentions (`bool`, *optional*): also return the (B, T, h, w) attention maps.
        """
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if labels is None and decoder_input_ids is None:
            raise ValueError("forward() needs labels or decoder_input_ids; use generate() to read an image.")
        features, feature_mask = self.encode(pixel_values, pixel_mask)
        batch = features.shape[0]
        for name, ids in (("labels", labels), ("decoder_input_ids", decoder_input_ids)):
            if ids is not None and (ids.dim() != 2 or ids.shape[0] != batch):
                raise ValueError(f"{name} must have shape (batch={batch}, length), got {tuple(ids.shape)}.")
        static = self.decoder.prepare(features, feature_mask)
        cfg = self.config

        both_directions = (
            decoder_input_ids is None and cfg.decoder_type == "transformer" and cfg.bidirectional
        )
        targets = labels
        if decoder_input_ids is None:
            decoder_input_ids = shift_tokens_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
        if both_directions:
            r2l_labels = reverse_labels(labels, cfg.eos_token_id)
            r2l_inputs = shift_tokens_right(r2l_labels, cfg.r2l_start_token_id, cfg.pad_token_id)
            index = torch.arange(batch, device=features.device).repeat(2)
            logits, attn = self.decoder(index_batch(static, index), torch.cat([decoder_input_ids, r2l_inputs]))
            targets = torch.cat([labels, r2l_labels])
        else:
            logits, attn = self.decoder(static, decoder_input_ids)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().flatten(0, 1),
                targets.flatten(),
                ignore_index=-100,
                label_smoothing=cfg.label_smoothing,
            )
        logits = logits[:batch]
        attentions = attn[:batch].unflatten(-1, static["shape"]) if output_attentions else None
        if not return_dict:
            return tuple(v for v in (loss, logits, attentions, features, feature_mask) if v is not None)
        return HMERSeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            attentions=attentions,
            encoder_last_hidden_state=features,
            feature_mask=feature_mask,
        )


__all__ = [
    "HMERGenerateOutput",
    "HMERForConditionalGeneration",
    "HMERPreTrainedModel",
    "HMERSeq2SeqLMOutput",
]
