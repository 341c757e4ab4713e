"""HMERTokenizer: CROHME LaTeX symbols <-> ids.

The vocabulary is the 110 CROHME symbols after four special tokens: ``<pad>`` = 0, ``<s>`` = 1,
``</s>`` = 2, ``<unk>`` = 3, then the symbols of :data:`modeling_hmer.latex.CROHME_SYMBOLS`
(ids 4..113, 114 in all). It is stored as ``vocab.json``; ``HMERTokenizer()`` builds it when no
file is given.

Text is raw LaTeX in any CROHME spelling: the whole string is normalized once with
:func:`modeling_hmer.latex.normalize` (so ``tokenizer("\\\\frac{a}{b}")`` and
``tokenizer("\\\\frac a b")`` give the same ids), and the ids end with ``</s>`` (no ``<s>``: the
model prepends its decoder start token itself). Symbols outside the vocabulary become
``<unk>`` with a warning. :meth:`decode` gives space-separated LaTeX that KaTeX renders.

Special-token strings typed in the text are not recognised as such: ``a<s>b`` is the LaTeX
``a < s > b``.
"""

from __future__ import annotations

import json
import os

from transformers import PreTrainedTokenizer
from transformers.utils import logging

from .latex import CROHME_SYMBOLS, normalize

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def default_vocab() -> dict[str, int]:
    """``<pad> <s> </s> <unk>`` then the 110 CROHME symbols: token -> id (114 entries)."""
    return {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CROHME_SYMBOLS))}


class HMERTokenizer(PreTrainedTokenizer):
    """Tokenizer of handwritten-math LaTeX over the CROHME symbol set.

    Args:
        vocab_file: path to a ``vocab.json`` (token -> id). Default: the CROHME vocabulary.
        pad_token, bos_token, eos_token, unk_token: the special tokens (must be in the vocabulary).

    Example:
        >>> tokenizer = HMERTokenizer()
        >>> tokenizer("$\\\\frac 1 {x^2}$").input_ids[-1] == tokenizer.eos_token_id
        True
        >>> tokenizer.decode(tokenizer("\\\\frac 1 {x^2}").input_ids, skip_special_tokens=True)
        '\\\\frac { 1 } { x ^ { 2 } }'
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        pad_token: str = "<pad>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        **kwargs,
    ):
        if vocab_file is None:
            self.encoder = default_vocab()
        else:
            self.encoder = self._load_vocab(vocab_file)
        for token in (pad_token, bos_token, eos_token, unk_token):
            if str(token) not in self.encoder:
                raise ValueError(f"special token {str(token)!r} is not in the vocabulary {vocab_file}")
        self.decoder = {index: token for token, index in self.encoder.items()}
        # Targets end with </s>; the model adds its decoder start token (<s>) itself.
        kwargs.setdefault("special_tokens_pattern", "eos")
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            **kwargs,
        )

    @staticmethod
    def _load_vocab(vocab_file: str | os.PathLike) -> dict[str, int]:
        with open(vocab_file, encoding="utf-8") as handle:
            vocab = json.load(handle)
        if not isinstance(vocab, dict) or not all(
            isinstance(token, str) and isinstance(index, int) for token, index in vocab.items()
        ):
            raise ValueError(f"{vocab_file} must hold a JSON object mapping tokens to integer ids")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"the ids in {vocab_file} must be 0..{len(vocab) - 1}, each once")
        return vocab

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Normalize raw LaTeX into canonical CROHME tokens (unknown ones kept, with a warning).

        The whole string is normalized at once (the base class would first split it on
        special-token strings such as ``<s>``, which are valid LaTeX here).
        """
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        tokens = normalize(text)
        unknown = sorted({token for token in tokens if token not in self.encoder})
        if unknown:
            logger.warning(
                f"{len(unknown)} symbol(s) not in the HMER vocabulary, mapped to {self.unk_token}: "
                f"{' '.join(unknown)} (in {text!r})"
            )
        return tokens

    def prepare_for_tokenization(self, text, is_split_into_words: bool = False, **kwargs):
        kwargs.pop("split_special_tokens", None)
        return text, kwargs

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return normalize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index, str(self.unk_token))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Canonical tokens -> space-separated LaTeX (``\\\\frac { 1 } { 2 }``)."""
        return " ".join(tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"vocabulary path {save_directory} should be a directory")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.encoder, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
        return (path,)


__all__ = ["HMERTokenizer", "default_vocab"]
