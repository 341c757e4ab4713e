"""Search for HMER: greedy, batched beam search and BTTR's bidirectional re-scoring, as a `GenerationMixin`.

`HMERGenerationMixin.generate` reads images with the model's decoder step by step. Settings are merged the
`transformers` way: a copy of `generation_config` (default `self.generation_config`) updated with the keyword
arguments (`GenerationConfig.update`). The next-token log-probabilities go through a
`transformers.LogitsProcessorList` before each choice, as in `transformers` beam search: pad and bos are
suppressed, eos before `min_new_tokens`, and, with `latex_grammar=True` (the default), every token that would
make the LaTeX ill-formed (`latex_grammar.LatexGrammarLogitsProcessor`), in both reading directions.

Shapes: B images, G search groups (images, or image x direction), K beams, N rows (B or G * K), S output length,
L feature cells, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.utils import ModelOutput

from .latex_grammar import LatexGrammarLogitsProcessor


__all__ = ["HMERGenerateOutput", "HMERGenerationMixin", "index_batch", "reverse_labels", "shift_tokens_right"]

# Settings of this generate that `GenerationConfig` does not define, with their defaults.
HMER_GENERATION_DEFAULTS = {"bidirectional_rescoring": False, "latex_grammar": True}
# `transformers` flags this search honours by what it is anyway (no sampling, always cached, stops when done).
NO_OP_FLAGS = ("use_cache", "early_stopping")


@dataclass
class HMERGenerateOutput(ModelOutput):
    """
    Output of [`HMERGenerationMixin.generate`] with `return_dict_in_generate=True`.

    The names follow `transformers`' beam-search outputs where the content is the same; where it differs, it
    says so:

    Args:
        sequences (`torch.LongTensor` of shape `(B * num_return_sequences, S)`): generated ids. Unlike
            `transformers` encoder-decoder outputs, WITHOUT the decoder start token: tokens, the eos that ended
            them, then pad. Rows of one image are consecutive, best first.
        sequences_scores (`torch.FloatTensor` of shape `(B * num_return_sequences,)`): as in `transformers`: the
            sum of the (processed) token log-probs divided by length ** length_penalty (length counts the eos).
            With bidirectional re-scoring: the mean of the left-to-right and right-to-left sums, divided the same
            way.
        transition_scores (`torch.FloatTensor` of shape `(B * num_return_sequences, S)`, *optional*): the
            left-to-right log-probability of each token of `sequences` (0 on padding): what
            `model.compute_transition_scores(...)` gives in `transformers` (this generate does not return
            `transformers`' per-step `scores` over the whole vocabulary). Returned with `output_scores=True`.
        attentions (`tuple` of `torch.FloatTensor`, *optional*): one tensor per row of `sequences`, of shape
            `(length, h_i, w_i)`: for each token up to and including eos, its attention over the feature cells
            of its image (padding cropped away; each map sums to 1). (`transformers` returns per-step, per-layer
            `cross_attentions` instead.) Returned with `output_attentions=True`.
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    transition_scores: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# token-sequence helpers shared by training (modeling_hmer.py) and search


def shift_tokens_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(B, T) labels (-100 = ignore) -> (B, T) decoder inputs: the start token, then labels[:, :-1]."""
    inputs = labels.new_full(labels.shape, pad_token_id)
    inputs[:, 1:] = labels[:, :-1]
    inputs[:, 0] = start_token_id
    return inputs.masked_fill(inputs == -100, pad_token_id)


def reverse_labels(labels: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """
    (B, T) left-to-right labels -> (B, T) right-to-left labels: in each row the tokens before eos reversed, then
    the eos (when the row had one), then -100. `[5, 6, 7, eos, -100]` -> `[7, 6, 5, eos, -100]`.
    """
    valid = labels != -100
    length = valid.sum(1)  # (B,)
    last = labels.gather(1, (length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    content = length - ((last == eos_token_id) & (length > 0)).long()  # tokens before the eos
    pos = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0)
    source = torch.where(pos < content.unsqueeze(1), content.unsqueeze(1) - 1 - pos, pos)
    return labels.gather(1, source)


def index_batch(obj, index: torch.Tensor):
    """Select rows `index` along dim 0 of every tensor in a (nested) dict / list / tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index)
    if isinstance(obj, dict):
        return {key: index_batch(value, index) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(index_batch(value, index) for value in obj)
    return obj


# ----------------------------------------------------------------------------------------------------------------


class HMERGenerationMixin(GenerationMixin):
    """
    `generate` for a model with `encode(pixel_values, pixel_mask)` and a `decoder` offering `prepare`,
    `init_state`, `step`, `reorder_state` and teacher-forced `__call__` (see `modeling_hmer.py`).
    """

    @torch.inference_mode()
    def generate(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        tokenizer=None,
        **kwargs,
    ) -> torch.LongTensor | HMERGenerateOutput:
        """
        Read images: greedy search (`num_beams=1`) or beam search, all beams of all images decoded as one batch.

        Args:
            pixel_values (`(B, 1, H, W)` float), pixel_mask (`(B, H, W)`, *optional*): as in `forward`.
            generation_config (`GenerationConfig`, *optional*): defaults to `self.generation_config`; the keyword
                arguments update a copy of it. Read from it:
                - `num_beams` (1 = greedy), `max_new_tokens` (eos included), `min_new_tokens` (eos is forbidden
                  before this many tokens; for benchmarks), `num_return_sequences` (at most `num_beams`, best
                  first), `length_penalty` (final scores are log-prob sums / length ** length_penalty);
                - `output_attentions`, `output_scores`, `return_dict_in_generate` (implied by either);
                - `bidirectional_rescoring` (transformer beam search: search left-to-right and right-to-left,
                  then keep the best candidates by the mean of their two teacher-forced log-prob sums);
                - `latex_grammar` (default True): only well-formed LaTeX can be written (see `latex_grammar.py`).
            logits_processor (`LogitsProcessorList`, *optional*): more processors, applied after this model's own
                to the (N, V) log-probabilities, given the (N, 1 + t) ids so far (start token first).
            tokenizer (*optional*): whose vocabulary the LaTeX grammar reads; default the HMER vocabulary, which
                must then match `config.vocab_size`.

        Returns:
            `(B * num_return_sequences, S)` ids without the start token (tokens, eos, then pad), or
            [`HMERGenerateOutput`].
        """
        gen = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        for key, default in HMER_GENERATION_DEFAULTS.items():
            if not hasattr(gen, key):
                setattr(gen, key, default)
        kwargs = {key: value for key, value in kwargs.items() if key not in NO_OP_FLAGS}
        unused = gen.update(**kwargs)
        if unused:
            raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unused))}.")
        if gen.do_sample:
            raise TypeError("generate() got an unsupported argument 'do_sample'=True: this search does not sample.")

        num_beams = int(gen.num_beams or 1)
        max_new_tokens = int(gen.max_new_tokens or 200)
        min_new_tokens = int(gen.min_new_tokens or 0)
        num_return_sequences = int(gen.num_return_sequences or 1)
        output_attentions = bool(gen.output_attentions)
        return_dict = bool(gen.return_dict_in_generate or gen.output_attentions or gen.output_scores)
        length_penalty = float(1.0 if gen.length_penalty is None else gen.length_penalty)
        bidirectional = bool(gen.bidirectional_rescoring)
        bidirectional = bidirectional and self.config.decoder_type == "transformer" and num_beams > 1
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}.")
        if not 1 <= num_return_sequences <= num_beams:
            raise ValueError(
                f"num_return_sequences ({num_return_sequences}) must be between 1 and num_beams ({num_beams})."
            )
        processors = self._logits_processors(gen, max_new_tokens, min_new_tokens, tokenizer, logits_processor)
        settings = {"max_new_tokens": max_new_tokens, "processors": processors}

        features, feature_mask = self.encode(pixel_values, pixel_mask)
        batch = features.shape[0]
        starts = torch.full((batch,), self.config.decoder_start_token_id, device=features.device)
        decoding = contextlib.nullcontext()
        if features.device.type == "cpu" and torch.is_autocast_enabled("cpu") and batch * num_beams <= 2:
            # a step over one or two rows costs per-op overhead, not arithmetic; bf16 casts only add to it
            decoding = torch.autocast("cpu", enabled=False)
            features = features.float()

        with decoding:
            static = self.decoder.prepare(features, feature_mask)
            if bidirectional:
                result = self._bidirectional_beam_search(static, num_beams, num_return_sequences, length_penalty,
                                                         settings)
            elif num_beams == 1:
                result = self._greedy_search(static, starts, output_attentions, **settings)
                result["scores"] = result["token_scores"].sum(1) / result["lengths"].clamp(min=1) ** length_penalty
            else:
                result = self._beam_search(static, starts, num_beams, output_attentions, **settings)
                result = self._select(result, batch, num_beams, num_return_sequences, length_penalty)

        lengths = result["lengths"]
        longest = max(int(lengths.max()), 1)
        sequences = result["tokens"][:, :longest]
        if not return_dict:
            return sequences
        attentions = None
        if output_attentions:
            sizes = torch.stack([feature_mask.any(2).sum(1), feature_mask.any(1).sum(1)], 1).tolist()
            maps = result["attentions"].unflatten(-1, static["shape"])
            attentions = tuple(
                maps[i, : int(lengths[i]), : sizes[i // num_return_sequences][0], : sizes[i // num_return_sequences][1]]
                for i in range(maps.shape[0])
            )
        return HMERGenerateOutput(
            sequences=sequences,
            sequences_scores=result["scores"],
            transition_scores=result["token_scores"][:, :longest] if gen.output_scores else None,
            attentions=attentions,
        )

    def _logits_processors(self, gen, max_new_tokens, min_new_tokens, tokenizer, extra) -> LogitsProcessorList:
        """pad and bos never (the grammar, when on, forbids them too); eos not before `min_new_tokens`; the LaTeX
        grammar; then the caller's own."""
        cfg = self.config
        processors = LogitsProcessorList()
        if not gen.latex_grammar:
            processors.append(SuppressTokensLogitsProcessor([cfg.pad_token_id, cfg.bos_token_id]))
        if min_new_tokens > 0:
            # input_ids start with the decoder start token: one "prompt" token to skip
            processors.append(MinNewTokensLengthLogitsProcessor(1, min_new_tokens, cfg.eos_token_id))
        if gen.latex_grammar:
            if tokenizer is not None:
                vocab = tokenizer.get_vocab()
            else:
                from .tokenization_hmer import default_vocab

                vocab = default_vocab()
                if len(vocab) != cfg.vocab_size:
                    raise ValueError(
                        f"the model has {cfg.vocab_size} tokens, the HMER vocabulary {len(vocab)}: pass "
                        "generate(..., tokenizer=the model's tokenizer) for the LaTeX grammar, or latex_grammar=False."
                    )
            processors.append(
                LatexGrammarLogitsProcessor(vocab, cfg.eos_token_id, cfg.r2l_start_token_id, max_new_tokens)
            )
        if extra:
            processors.extend(extra)
        return processors

    @staticmethod
    def _next_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, processors) -> torch.Tensor:
        """(N, V) logits, (N, 1 + t) ids so far -> processed log-probs (forbidden tokens at -inf)."""
        scores = torch.log_softmax(logits.float(), dim=-1)
        for processor in processors:  # what LogitsProcessorList does, without inspecting signatures every step
            scores = processor(input_ids, scores)
        return scores

    def _greedy_search(self, static, starts, output_attentions, max_new_tokens, processors) -> dict:
        """(N,) start tokens -> tokens (N, S) padded after eos, token_scores (N, S), lengths (N,), attentions.

        A row that emitted eos leaves the batch, so the steps after it cost only the rows still decoding.
        """
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        rows = starts.shape[0]
        state = self.decoder.init_state(static)
        tokens = starts
        input_ids = starts.unsqueeze(1)  # (alive, 1 + t): what the logits processors see
        alive = torch.arange(rows, device=starts.device)  # the batch rows still decoding
        out_tokens = starts.new_full((rows, max_new_tokens), pad)
        out_scores = torch.zeros(rows, max_new_tokens, device=starts.device)
        out_attn = None
        for t in range(max_new_tokens):
            logits, attn, state = self.decoder.step(tokens, static, state)
            score, tokens = self._next_log_probs(logits, input_ids, processors).max(-1)
            out_tokens[alive, t] = tokens
            out_scores[alive, t] = score
            if output_attentions:
                if out_attn is None:
                    out_attn = torch.zeros(rows, max_new_tokens, attn.shape[-1], device=attn.device)
                out_attn[alive, t] = attn.float()
            steps = t + 1
            running = tokens != eos
            if not bool(running.any()):
                break
            input_ids = torch.cat([input_ids, tokens.unsqueeze(1)], 1)
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                alive, tokens, input_ids = alive[keep], tokens[keep], input_ids[keep]
                state = self.decoder.reorder_state(state, keep)
                static = index_batch(static, keep)
        result = {"tokens": out_tokens[:, :steps], "token_scores": out_scores[:, :steps]}
        result["lengths"] = (result["tokens"] != pad).sum(1)
        result["attentions"] = out_attn[:, :steps] if output_attentions else None
        return result

    def _beam_search(self, static, starts, num_beams, output_attentions, max_new_tokens, processors) -> dict:
        """
        Batched beam search over G groups (images, or image x direction) with K = num_beams.

        A beam that emitted eos stays in the beam with its score frozen (it can only be extended by pad at no
        cost), so all K rows of a group advance together with no per-group bookkeeping; a group whose K rows
        have all finished leaves the batch, and the search stops when no group is left. Returns tokens
        (G*K, S), token_scores (G*K, S), total log-prob sums `sums` (G*K,), lengths (G*K,) and attentions
        (G*K, S, L) or None, rows of a group in beam order.
        """
        eos, pad = self.config.eos_token_id, self.config.pad_token_id
        groups, k = starts.shape[0], num_beams
        rows = groups * k
        device = starts.device
        state = self.decoder.init_state(static, num_beams=k)  # beams share the per-image tensors
        tokens = starts.repeat_interleave(k)
        input_ids = tokens.unsqueeze(1)  # (live rows, 1 + t): what the logits processors see
        sums = torch.zeros(groups, k, device=device)
        sums[:, 1:] = float("-inf")  # all beams start identical: keep one
        sums = sums.view(rows)
        final_sums = sums.clone()
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        alive = torch.arange(rows, device=device)  # batch rows (global ids) of the groups still searching
        frozen = None
        history = []  # per step, over all G*K rows: tokens, token log-probs, parent rows, attentions of the parents
        for t in range(max_new_tokens):
            logits, attn, state = self.decoder.step(tokens, static, state)
            logp = self._next_log_probs(logits, input_ids, processors)
            if frozen is None:
                frozen = torch.full_like(logp[0], float("-inf"))
                frozen[pad] = 0.0
            logp = torch.where(finished.unsqueeze(1), frozen, logp)
            live_groups, vocab = alive.shape[0] // k, logp.shape[1]
            candidates = (sums.unsqueeze(1) + logp).view(live_groups, k * vocab)
            top, index = candidates.topk(k, dim=1)
            offsets = (torch.arange(live_groups, device=device) * k).unsqueeze(1)
            parents = (index // vocab + offsets).view(-1)  # local rows
            tokens = (index % vocab).view(-1)
            # every row of the full batch gets an entry; rows of finished groups keep padding from themselves
            step_tokens = torch.full((rows,), pad, dtype=tokens.dtype, device=device)
            step_scores = torch.zeros(rows, device=device)
            step_parents = torch.arange(rows, device=device)
            step_tokens[alive], step_scores[alive], step_parents[alive] = tokens, logp[parents, tokens], alive[parents]
            step_attn = None
            if output_attentions:
                step_attn = torch.zeros(rows, attn.shape[-1], device=device)
                step_attn[alive] = attn.float()
            history.append((step_tokens, step_scores, step_parents, step_attn))
            state = self.decoder.reorder_state(state, parents)
            input_ids = torch.cat([input_ids[parents], tokens.unsqueeze(1)], 1)
            finished = finished.index_select(0, parents) | (tokens == eos)
            sums = top.view(-1)
            final_sums[alive] = sums
            searching = ~finished.view(live_groups, k).all(1)  # groups with a beam still running
            if not bool(searching.any()):
                break
            if not bool(searching.all()):
                keep_groups = searching.nonzero().squeeze(1)
                keep = (keep_groups.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
                alive, tokens, sums, finished = alive[keep], tokens[keep], sums[keep], finished[keep]
                input_ids = input_ids[keep]
                state = self.decoder.reorder_state(state, keep)
                static = index_batch(static, keep_groups)
        # follow the parent pointers back from the final rows
        row = torch.arange(rows, device=device)
        out_tokens, out_scores, out_attn = [], [], []
        for step_tokens, step_scores, parents, step_attn in reversed(history):
            out_tokens.append(step_tokens[row])
            out_scores.append(step_scores[row])
            row = parents[row]
            if output_attentions:
                out_attn.append(step_attn[row])
        result = {
            "tokens": torch.stack(out_tokens[::-1], 1),
            "token_scores": torch.stack(out_scores[::-1], 1),
            "sums": final_sums,
        }
        result["lengths"] = (result["tokens"] != pad).sum(1)
        result["attentions"] = torch.stack(out_attn[::-1], 1) if output_attentions else None
        return result

    @staticmethod
    def _select(result: dict, groups: int, num_beams: int, keep: int, length_penalty: float) -> dict:
        """Rank each group's beams by length-normalized score and keep the best `keep`."""
        scores = (result["sums"] / result["lengths"].clamp(min=1).float() ** length_penalty).view(groups, num_beams)
        best = scores.topk(keep, dim=1).indices
        rows = (best + torch.arange(groups, device=best.device).unsqueeze(1) * num_beams).view(-1)
        selected = {key: value[rows] for key, value in result.items() if isinstance(value, torch.Tensor)}
        selected["scores"] = scores.view(-1)[rows]
        selected.setdefault("attentions", None)
        return selected

    def _bidirectional_beam_search(self, static, num_beams, keep, length_penalty, settings) -> dict:
        """
        BTTR's bidirectional decoding: beam search left-to-right and right-to-left (one batch of 2B groups),
        turn the right-to-left candidates around, score all 2K candidates of each image with teacher forcing in
        both directions (one batch), and keep the best distinct ones by (sum_l2r + sum_r2l) / 2 / len ** penalty.
        Token scores and attention maps are the left-to-right pass's.
        """
        cfg = self.config
        eos, pad = cfg.eos_token_id, cfg.pad_token_id
        mask_bias = static["mask_bias"]
        batch, device = mask_bias.shape[0], mask_bias.device
        starts = torch.tensor([cfg.decoder_start_token_id, cfg.r2l_start_token_id], device=device)
        starts = starts.repeat_interleave(batch)  # groups 0 .. B-1 left-to-right, B .. 2B-1 right-to-left
        images = torch.arange(batch, device=device).repeat(2)
        found = self._beam_search(index_batch(static, images), starts, num_beams, False, **settings)

        # candidates as left-to-right labels (2B*K, S): -100 after the sequence
        labels = found["tokens"].masked_fill(found["tokens"] == pad, -100)
        r2l_rows = torch.arange(labels.shape[0], device=device) >= batch * num_beams
        labels = torch.where(r2l_rows.unsqueeze(1), reverse_labels(labels, eos), labels)
        r2l_labels = reverse_labels(labels, eos)
        count = labels.shape[0]
        candidate_images = images.repeat_interleave(num_beams)
        inputs = torch.cat(
            [
                shift_tokens_right(labels, cfg.decoder_start_token_id, pad),
                shift_tokens_right(r2l_labels, cfg.r2l_start_token_id, pad),
            ]
        )
        logits, attn = self.decoder(index_batch(static, candidate_images.repeat(2)), inputs)
        logp = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.cat([labels, r2l_labels])
        token_logp = logp.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2).masked_fill(targets == -100, 0.0)
        lengths = (labels != -100).sum(1)
        total = (token_logp[:count].sum(1) + token_logp[count:].sum(1)) / 2
        scores = total / lengths.clamp(min=1).float() ** length_penalty

        # per image: best distinct candidates among its K left-to-right and K right-to-left ones
        scores_list = scores.tolist()
        label_rows = labels.tolist()
        chosen = []
        for b in range(batch):
            rows = list(range(b * num_beams, (b + 1) * num_beams))
            rows += list(range((batch + b) * num_beams, (batch + b + 1) * num_beams))
            rows.sort(key=lambda r: -scores_list[r])
            seen, picked = set(), []
            for r in rows:
                key = tuple(label_rows[r])
                if key not in seen:
                    seen.add(key)
                    picked.append(r)
                if len(picked) == keep:
                    break
            chosen.extend(picked)
        rows = torch.tensor(chosen, device=device)
        tokens = labels[rows].masked_fill(labels[rows] == -100, pad)
        return {
            "tokens": tokens,
            "token_scores": token_logp[rows],
            "lengths": lengths[rows],
            "scores": scores[rows],
            "attentions": attn[rows].float(),
        }
