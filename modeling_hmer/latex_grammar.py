"""The grammar of well-formed canonical LaTeX, and a logits processor that keeps decoding inside it.

A token sequence in the canonical form of `latex.normalize` is well-formed when KaTeX (and LaTeX) can
typeset it, and it is written the way `normalize` writes it:

    expression := [scripts] (base [scripts])*
    base       := symbol | "\\frac" group group | "\\sqrt" ["[" expression "]"] group
    scripts    := "_" group | "^" group | "_" group "^" group       (script groups are not empty)
    group      := "{" expression "}"

so braces balance, `^` and `_` are followed by a group (a subscript before a superscript, at most one of
each per base), `\\frac` has two groups, `\\sqrt` its group and an optional non-empty `[index]`, and braces
appear only as those groups (grouping-only braces are dropped by `normalize`). `[` and `]` are ordinary
symbols outside a root index; inside one, outside braces, they may not appear, nor a root with an index (KaTeX
ends the index at the first `]`). Tokens `normalize` never writes (`\\limits`, `'`) and the special tokens are
not part of it.

`LatexGrammar` reads a sequence token by token in either direction: left to right, or right to left (the
reversed sequence, as the right-to-left transformer decoder writes it; its states accept exactly the reversed
well-formed sequences). `LatexGrammarLogitsProcessor` is a `transformers` `LogitsProcessor` that sets the
score of every token that would leave the grammar to -inf, and also closes open groups in time when the
sequence is about to reach `max_new_tokens`.
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping

import torch
from transformers import LogitsProcessor


__all__ = ["LatexGrammar", "LatexGrammarLogitsProcessor", "is_well_formed"]

# Structural tokens; every other token of the vocabulary is a symbol, except these, which are never written.
OPEN, CLOSE, SUB, SUP, FRAC, SQRT, LBRACKET, RBRACKET = "{", "}", "_", "^", "\\frac", "\\sqrt", "[", "]"
NOT_WRITTEN = frozenset(("\\limits", "'"))

# States are tuples (hashable, so transitions and masks are computed once per state):
#   (frames, expect), frames a tuple of frames from the outside in, expect what the next token must be.
# Left to right, a frame is (kind, scripts, empty): kind "top", "sub", "sup", "num", "den", "rad" or
# "index"; scripts 0 (the current base may take `_` or `^`), 1 (after `_`: only `^`) or 2 (none); empty:
# no token read in the frame yet. expect: None, or the group kind a `{` must open next ("sqrt": `[` or `{`).
# Right to left, a frame is (kind, phase, empty): kind "top", "group" (its role is known once it closes),
# "num" or "index"; phase "base" (after a base or at the frame's end: a superscript, a subscript or a base
# may precede), "sup" (after a superscript group: a subscript or a base) or "sub" (only a base); for a group,
# `allow` (which scripts its `{` may be preceded by) is kept in its kind: ("group", allow).
# expect: None, ("closed", allow, empty) after a group's `{`, "frac" after a numerator's `{`, "sqrt" after an
# index's `[`.
DONE = ("done",)


class LatexGrammar:
    """Incremental recognizer of well-formed canonical LaTeX over a tokenizer's vocabulary.

    Args:
        vocab: token -> id (e.g. `tokenizer.get_vocab()`).
        eos_token_id: the id that ends a sequence.
        reverse: read sequences right to left (the reversed token order).

    `start()` gives the state before the first token, `step(state, id)` the state after it (None if the token
    is not allowed there), `allowed(state)` a (V,) bool tensor of the ids allowed next, `is_complete(state)`
    whether the sequence may end there, and `closing_cost(state)` the fewest tokens that complete it.
    """

    def __init__(self, vocab: Mapping[str, int], eos_token_id: int, reverse: bool = False):
        self.vocab_size = max(vocab.values()) + 1
        self.eos_token_id = int(eos_token_id)
        self.reverse = bool(reverse)
        names = {index: token for token, index in vocab.items()}
        self.symbols = frozenset(
            i for i, token in names.items()
            if i != self.eos_token_id and token not in NOT_WRITTEN and not _is_special(token)
            and token not in (OPEN, CLOSE, SUB, SUP, FRAC, SQRT)
        )  # fmt: skip
        self.role = {i: names[i] for i in names if names[i] in (OPEN, CLOSE, SUB, SUP, FRAC, SQRT, LBRACKET, RBRACKET)}
        self._transitions: dict[tuple, tuple | None] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._costs: dict[tuple, int] = {}
        self._closing_masks: dict[tuple, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------------------
    def start(self) -> tuple:
        return ((("top", "base" if self.reverse else 0, True),), None)

    def step(self, state: tuple | None, token: int) -> tuple | None:
        """State after `token`, or None when the token would leave the grammar (or `state` is None)."""
        if state is None:
            return None
        key = (state, token)
        if key not in self._transitions:
            if state is DONE:
                self._transitions[key] = DONE  # after eos: padding, never checked
            elif token == self.eos_token_id:
                self._transitions[key] = DONE if self.is_complete(state) else None
            elif token in self.role or token in self.symbols:
                role = self.role.get(token)
                self._transitions[key] = (self._step_right_to_left if self.reverse else self._step)(state, role)
            else:
                self._transitions[key] = None
        return self._transitions[key]

    def allowed(self, state: tuple) -> torch.Tensor:
        """(V,) bool: the tokens allowed after `state` (all of them after eos)."""
        if state not in self._masks:
            if state is DONE:
                mask = torch.ones(self.vocab_size, dtype=torch.bool)
            else:
                mask = torch.tensor([self.step(state, i) is not None for i in range(self.vocab_size)])
            self._masks[state] = mask
        return self._masks[state]

    def allowed_within(self, state: tuple, left: int | None) -> torch.Tensor:
        """(V,) bool: the tokens allowed after `state` when at most `left` tokens (this one included) remain:
        only those after which the sequence can still be completed in time."""
        # one token adds at most 4 to the closing cost (`\\frac`: `{ } { }`), so far from the limit all may come
        if left is None or state is DONE or self.closing_cost(state) + 4 < left:
            return self.allowed(state)
        key = (state, left)
        if key not in self._closing_masks:
            mask = self.allowed(state).clone()
            for token in mask.nonzero().flatten().tolist():
                after = self.step(state, token)
                mask[token] = after is DONE or self.closing_cost(after) <= left - 1
            self._closing_masks[key] = mask
        return self._closing_masks[key]

    def is_complete(self, state: tuple) -> bool:
        frames, expect = state
        return expect is None and len(frames) == 1

    def accepts(self, ids: Iterable[int]) -> bool:
        """Whether the whole sequence (in this grammar's reading direction, eos optional) is well-formed."""
        state = self.start()
        for token in ids:
            if token == self.eos_token_id:
                break
            state = self.step(state, int(token))
            if state is None:
                return False
        return self.is_complete(state)

    def closing_cost(self, state: tuple) -> int:
        """The fewest tokens (eos not counted) after which the sequence is complete."""
        if state is DONE:
            return 0
        if state not in self._costs:
            self._costs[state] = self._closing_cost(state)
        return self._costs[state]

    def _closing_cost(self, state: tuple) -> int:
        frames, expect = state
        if self.reverse:
            cost = {None: 0, "frac": 1, "sqrt": 1}.get(expect, 1)  # ("closed", ...): `\sqrt` always fits
            for kind, _, empty in frames[1:]:
                cost += 2 + (kind == "index" and empty)  # `{` + `\sqrt`, `{` + `\frac`, or `[` + `\sqrt`
            return cost
        cost = {None: 0, "sub": 3, "sup": 3, "num": 4, "den": 2, "rad": 2, "sqrt": 2}[expect]
        for kind, _, empty in frames[1:]:
            cost += {"sub": 1 + empty, "sup": 1 + empty, "num": 3, "den": 1, "rad": 1, "index": 3 + empty}[kind]
        return cost

    # -------------------------------------------------------------------------------------------------------
    # left to right

    @staticmethod
    def _step(state: tuple, role: str | None) -> tuple | None:
        frames, expect = state
        kind, scripts, empty = frames[-1]
        if expect == "sqrt":
            if role == LBRACKET and kind != "index":  # KaTeX ends an index at its first `]` outside braces
                return (*frames, ("index", 0, True)), None
            return ((*frames, ("rad", 0, True)), None) if role == OPEN else None
        if expect is not None:
            return ((*frames, (expect, 0, True)), None) if role == OPEN else None
        outer = frames[:-1]
        if role == SUP or role == SUB:
            if scripts == 2 or (role == SUB and scripts == 1):
                return None  # a second script of the same kind, or `_` after `^`
            return (*outer, (kind, 2 if role == SUP else 1, False)), ("sup" if role == SUP else "sub")
        if role == FRAC or role == SQRT:
            return (*outer, (kind, 0, False)), ("num" if role == FRAC else "sqrt")
        if role == OPEN:
            return None  # braces only as the groups of scripts, fractions and roots
        if role == CLOSE:
            if kind in ("top", "index") or (empty and kind in ("sub", "sup")):
                return None
            return outer, ("den" if kind == "num" else None)
        if kind == "index" and role == LBRACKET:
            return None
        if kind == "index" and role == RBRACKET:
            return (outer, "rad") if not empty else None
        return (*outer, (kind, 0, False)), None  # a symbol: the new base

    # -------------------------------------------------------------------------------------------------------
    # right to left: the same sequences, read from their end

    @staticmethod
    def _step_right_to_left(state: tuple, role: str | None) -> tuple | None:
        frames, expect = state
        kind, phase, empty = frames[-1]
        outer = frames[:-1]
        if expect == "frac":
            return ((*outer, (kind, "base", False)), None) if role == FRAC else None
        if expect == "sqrt":
            return ((*outer, (kind, "base", False)), None) if role == SQRT else None
        if expect is not None:  # a group has just closed: what precedes it says what it was
            _, allow, group_empty = expect
            if role == SUP and "sup" in allow and not group_empty:
                return (*outer, (kind, "sup", False)), None
            if role == SUB and "sub" in allow and not group_empty:
                return (*outer, (kind, "sub", False)), None
            if role == SQRT:
                return (*outer, (kind, "base", False)), None
            if role == RBRACKET and kind != "index":  # no index directly inside an index (KaTeX)
                return (*frames, ("index", "base", True)), None
            if role == CLOSE:
                return (*frames, ("num", "base", True)), None  # it was a denominator
            return None
        if role == CLOSE:  # a group opens; a superscript may not precede a superscript, nothing a subscript
            allow = {"base": ("sup", "sub"), "sup": ("sub",), "sub": ()}[phase]
            return (*frames, (("group", allow), "base", True)), None
        if role == OPEN:
            if not isinstance(kind, tuple) and kind != "num":
                return None
            if kind == "num":
                return outer, "frac"
            return outer, ("closed", kind[1], empty)
        if role in (SUP, SUB, FRAC, SQRT):
            return None  # only right after the `{` (`[` for `\sqrt`) that closes their group
        if kind == "index" and role == LBRACKET:
            return (outer, "sqrt") if not empty else None
        if kind == "index" and role == RBRACKET:
            return None
        return (*outer, (kind, "base", False)), None  # a symbol: a base


@functools.lru_cache(maxsize=8)
def _shared_grammar(vocab_items: tuple, eos_token_id: int, reverse: bool) -> LatexGrammar:
    """One grammar per vocabulary and direction, so its transitions and masks are computed once per process."""
    return LatexGrammar(dict(vocab_items), eos_token_id, reverse)


def _is_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">") and len(token) > 2


def is_well_formed(tokens: Iterable[str], vocab: Mapping[str, int] | None = None) -> bool:
    """Whether a canonical token sequence (e.g. `normalize(latex)`) is well-formed LaTeX (see the module doc)."""
    if vocab is None:
        from .tokenization_hmer import default_vocab

        vocab = default_vocab()
    tokens = list(tokens)
    unknown = [t for t in tokens if t not in vocab]
    if unknown:
        return False
    eos = vocab.get("</s>", -1)
    return LatexGrammar(vocab, eos_token_id=eos).accepts(vocab[t] for t in tokens)


class LatexGrammarLogitsProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that allows only the tokens that keep each sequence well-formed LaTeX (see the module
    doc): balanced braces, `^` and `_` followed by a group, `\frac` with two groups, `\sqrt` with its group and
    optional index. A row's reading direction is told by its first id: `r2l_start_token_id` reads right to left
    (the reversed sequence), any other start reads left to right. With `max_new_tokens`, a row near the limit
    may only take tokens after which its open groups can still be closed in time.

    Args:
        vocab (`dict[str, int]`): the tokenizer's vocabulary (`tokenizer.get_vocab()`).
        eos_token_id (`int`): end of sequence; allowed only where the sequence is complete.
        r2l_start_token_id (`int`, *optional*): decoder start token of right-to-left rows.
        max_new_tokens (`int`, *optional*): the most tokens a row may generate (eos included).

    `input_ids` are (N, 1 + t): the start token and the t tokens generated so far; `scores` (N, V).
    States are kept per prefix, so rows may be reordered or dropped between calls (beam search).
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        eos_token_id: int,
        r2l_start_token_id: int | None = None,
        max_new_tokens: int | None = None,
    ):
        key = tuple(sorted(vocab.items()))
        self.grammars = (_shared_grammar(key, eos_token_id, False), _shared_grammar(key, eos_token_id, True))
        self.r2l_start_token_id = r2l_start_token_id
        self.max_new_tokens = max_new_tokens
        self._states: dict[tuple, tuple | None] = {}

    def _state(self, prefix: tuple) -> tuple | None:
        state = self._states.get(prefix)
        if state is None and prefix not in self._states:
            if len(prefix) == 1:
                state = self.grammars[prefix[0] == self.r2l_start_token_id].start()
            else:
                state = self.grammars[prefix[0] == self.r2l_start_token_id].step(self._state(prefix[:-1]), prefix[-1])
            self._states[prefix] = state
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        left = None if self.max_new_tokens is None else self.max_new_tokens - (input_ids.shape[1] - 1)
        masks = []
        for row in input_ids.tolist():
            prefix = tuple(row)
            state = self._state(prefix)
            if state is None:  # a prefix from outside this processor (not grammatical): leave it alone
                masks.append(torch.ones(scores.shape[1], dtype=torch.bool))
                continue
            masks.append(self.grammars[prefix[0] == self.r2l_start_token_id].allowed_within(state, left))
        allowed = torch.stack(masks).to(scores.device)
        if allowed.shape[1] < scores.shape[1]:  # a head wider than the vocabulary: the extra ids are not tokens
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[1] - allowed.shape[1]))
        return scores.masked_fill(~allowed, float("-inf"))
