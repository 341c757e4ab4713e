"""The project's one LaTeX normalizer: raw CROHME LaTeX -> canonical symbol tokens.

CROHME ground truths are written in many styles (`\\frac {\\sqrt x} 2`, `\\lt`, `\\mbox{E}`,
`\\left(`, `\\limits`, spelled-out `l o g`, numbers such as `64.40`, with or without `$..$`).
Training targets, the metric and the tokenizer all need one spelling, so every caller goes
through :func:`normalize`, which returns the canonical token sequence:

* every number and every name is split into single symbols (`64.40` -> `6 4 . 4 0`);
* every script, `\\frac` and `\\sqrt` argument is braced (`\\frac { \\sqrt { x } } { 2 }`), and the
  optional root index is kept in brackets (`\\sqrt [ 3 ] { x }`);
* a subscript is written before a superscript, `\\limits` / `\\nolimits` are dropped, and a prime
  `'` becomes the superscript `^ { \\prime }`;
* grouping-only braces, `\\left` / `\\right` and other delimiter sizes, spacing, styles
  (`\\displaystyle`) and `$` are dropped; `\\mbox`, `\\mathrm`, `\\text`, ... are unwrapped;
* aliases are mapped to the CROHME symbol (`\\lt` -> `<`, `\\to` -> `\\rightarrow`, `\\le` ->
  `\\leq`, `\\dots` -> `\\ldots`, ...), and function names spelled with letters in math mode
  (`log (x)`, `l i m`) become the command (`\\log`, `\\lim`), as the CROHME captions write them.

Commands that are not CROHME symbols are kept as one token each (the tokenizer maps them to
its unknown token). The function is idempotent: ``normalize(" ".join(normalize(s))) ==
normalize(s)``.
"""

from __future__ import annotations

import re

__all__ = ["CROHME_SYMBOLS", "normalize", "tokens_to_latex"]

# The 110 symbols of the CROHME dictionary used by the original project
# (seed_captions/dictionary.txt, in that file's order, without <eol>/<sos>). Hard-coded so the
# package works without the data folder. `\limits` and `'` are in the dictionary but never
# produced by `normalize` (the canonical style drops `\limits` and writes `'` as `\prime`).
CROHME_SYMBOLS: list[str] = [
    "\\geq", "\\sqrt", "\\leq", "/", "\\infty", "(", ",", "0", "\\cdot", "8", "\\sigma", "<",
    "\\pm", "\\log", "\\pi", "H", "L", "P", "\\limits", "T", "X", "d", "h", "\\}", "l", "p",
    "t", "\\tan", "x", "|", "\\gamma", "\\{", "'", "+", "\\theta", "\\forall", "3", "7", "\\int",
    "\\sin", "\\prime", "C", "G", "\\ldots", "S", "[", "_", "c", "z", "\\cdots", "g", "k", "o",
    "s", "w", "\\cos", "{", "\\Delta", "\\neq", "\\in", "\\alpha", "\\times", "\\lim", ".", "2",
    "6", "\\lambda", "4", "B", "F", "\\exists", "N", "R", "V", "^", "b", "f", "j", "n", "r",
    "v", ">", "\\frac", "\\rightarrow", "\\div", "!", "\\phi", ")", "-", "1", "5", "9", "=", "A",
    "E", "\\beta", "I", "M", "Y", "]", "\\mu", "a", "e", "i", "\\sum", "m", "q", "u", "y", "}",
]

# Commands written differently from the CROHME symbol, mapped to that symbol's tokens.
_ALIASES: dict[str, tuple[str, ...]] = {
    "\\lt": ("<",), "\\gt": (">",),
    "\\le": ("\\leq",), "\\leqslant": ("\\leq",), "\\ge": ("\\geq",), "\\geqslant": ("\\geq",),
    "\\ne": ("\\neq",),
    "\\to": ("\\rightarrow",), "\\longrightarrow": ("\\rightarrow",),
    "\\dots": ("\\ldots",), "\\dotsc": ("\\ldots",), "\\dotso": ("\\ldots",),
    "\\dotsb": ("\\cdots",), "\\dotsm": ("\\cdots",), "\\cdotp": ("\\cdot",),
    "\\lbrack": ("[",), "\\rbrack": ("]",), "\\lparen": ("(",), "\\rparen": (")",),
    "\\lbrace": ("\\{",), "\\rbrace": ("\\}",),
    "\\vert": ("|",), "\\lvert": ("|",), "\\rvert": ("|",), "\\mid": ("|",),
    # No double bar in the CROHME set: it is drawn, and captioned, as two bars.
    "\\|": ("|", "|"), "\\Vert": ("|", "|"), "\\parallel": ("|", "|"),
    # Glyph variants of CROHME symbols (the 2014 test captions write `\Pi` as `\pi`).
    "\\Pi": ("\\pi",), "\\varphi": ("\\phi",), "\\vartheta": ("\\theta",),
}

# Unicode characters a user may paste, as CROHME symbols.
_UNICODE: dict[str, tuple[str, ...]] = {
    "\u2212": ("-",), "\u00d7": ("\\times",), "\u00f7": ("\\div",), "\u00b1": ("\\pm",),
    "\u2264": ("\\leq",), "\u2265": ("\\geq",), "\u2260": ("\\neq",), "\u2192": ("\\rightarrow",),
    "\u221e": ("\\infty",), "\u00b7": ("\\cdot",), "\u22c5": ("\\cdot",), "\u2026": ("\\ldots",),
    "\u22ef": ("\\cdots",), "\u03c0": ("\\pi",), "\u03b1": ("\\alpha",), "\u03b2": ("\\beta",),
    "\u03b3": ("\\gamma",), "\u03b8": ("\\theta",), "\u03bb": ("\\lambda",), "\u03bc": ("\\mu",),
    "\u03c3": ("\\sigma",), "\u03c6": ("\\phi",), "\u0394": ("\\Delta",), "\u2211": ("\\sum",),
    "\u222b": ("\\int",), "\u221a": ("\\sqrt",), "\u2200": ("\\forall",), "\u2203": ("\\exists",),
    "\u2208": ("\\in",), "\u2032": ("'",), "\u2018": ("'",), "\u2019": ("'",),
}

# Dropped without a trace: spacing, delimiter sizes, math styles, alignment and line breaks.
_DROP = frozenset(
    "\\, \\: \\; \\! \\  \\quad \\qquad \\enspace \\thinspace \\medspace \\thickspace \\negthinspace"
    " \\displaystyle \\textstyle \\scriptstyle \\scriptscriptstyle \\limits \\nolimits"
    " \\big \\Big \\bigg \\Bigg \\bigl \\bigr \\Bigl \\Bigr \\biggl \\biggr \\Biggl \\Biggr"
    " \\bigm \\Bigm \\biggm \\Biggm \\middle \\\\ \\nonumber".split()
    + ["\\ ", "\\\\", "~", "&", "$"]
)
# `\left` / `\right` are dropped too; their delimiter is kept, except the invisible `.`.
_DELIMITER_SIZES = frozenset(("\\left", "\\right"))
# Dropped together with their one argument.
_DROP_WITH_ARG = frozenset(("\\hspace", "\\vspace", "\\label", "\\tag", "\\color"))
# Unwrapped: the argument's content is kept, in text mode (no function-name merging) for the
# text commands and in math mode for the font commands.
_TEXT = frozenset(("\\mbox", "\\text", "\\textrm", "\\textit", "\\textbf", "\\textnormal", "\\hbox"))
_FONTS = frozenset(
    "\\mathrm \\mathit \\mathbf \\mathsf \\mathtt \\mathnormal \\mathcal \\mathbb \\mathfrak"
    " \\boldsymbol \\bm \\operatorname \\rm \\it \\bf".split()
)
# Function names CROHME writes as commands: a letter run spelling one of them in math mode
# (`log (x)`, `2 l o g x`) is read as the command, except inside scripts (`a_{tan}`).
_SPELLED = {"log": "\\log", "lim": "\\lim", "sin": "\\sin", "cos": "\\cos", "tan": "\\tan"}

_TOKEN_RE = re.compile(r"\\([A-Za-z]+|.)|&(?:lt|gt|amp);|(\s+)|(.)", re.DOTALL)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&amp;": "&"}


def _lex(latex: str) -> list[str]:
    """Split LaTeX into commands (`\\frac`, `\\{`) and single characters, without whitespace."""
    out: list[str] = []
    for match in _TOKEN_RE.finditer(latex):
        if match.group(2) is not None:
            continue
        token = match.group(0)
        if token in _ENTITIES:  # truths copied out of XML without unescaping
            token = _ENTITIES[token]
        if token in _UNICODE:
            out.extend(_UNICODE[token])
        else:
            out.append(token)
    return out


def _is_letter(token: str) -> bool:
    return len(token) == 1 and token.isascii() and token.isalpha()


class _Parser:
    """Recursive-descent parser over the lexed tokens that emits canonical tokens directly."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    # expression := (atom scripts*)*, up to `stop` (not consumed) or the end
    def expression(self, stop: str | None, text: bool, script: bool) -> list[str]:
        out: list[str] = []
        while True:
            token = self.peek()
            if token is None or token == stop:
                return out
            if token == "}" and stop is not None:
                return out  # a `}` closing an outer group while looking for `]`
            if token == "}":
                self.pos += 1  # unbalanced `}` at top level: ignore it
                continue
            if token == "_" or token == "^":
                base: list[str] | None = []  # a script with no base (`{}_{14}C`, `^2`)
            else:
                base = self.atom(text, script)
            if base is None:
                continue
            out.extend(base)
            self.scripts(out, text)

    def atom(self, text: bool, script: bool) -> list[str] | None:
        """Parse one atom; None when the tokens read produce nothing that can take scripts."""
        token = self.tokens[self.pos]
        self.pos += 1
        if token == "{":
            inner = self.expression("}", text, script)
            if self.peek() == "}":
                self.pos += 1
            return inner  # grouping braces are dropped
        if token in _DROP:
            return None
        if token in _DELIMITER_SIZES:
            if self.peek() == ".":
                self.pos += 1
            return None
        if token in _DROP_WITH_ARG:
            if self.peek() == "*":  # \hspace*{...}
                self.pos += 1
            self.argument(text, script)
            return None
        if token in _TEXT or token in _FONTS:
            inner = self.argument(text or token in _TEXT, script)
            return inner
        if token == "\\frac" or token == "\\dfrac" or token == "\\tfrac":
            numerator = self.argument(text, script)
            denominator = self.argument(text, script)
            return ["\\frac", "{", *numerator, "}", "{", *denominator, "}"]
        if token == "\\sqrt":
            out = ["\\sqrt"]
            if self.peek() == "[":
                self.pos += 1
                index = self.expression("]", text, script)
                if self.peek() == "]":
                    self.pos += 1
                out += ["[", *index, "]"]
            radicand = self.argument(text, script)
            if len(out) == 1 and self._rit_root_index():
                # CROHME 2014 RIT files write `\sqrt[n]{x}` as `\sqrt {x} ABOVE {n}`.
                self.pos += 5
                index = self.argument(text, script)
                out += ["[", *index, "]"]
            return [*out, "{", *radicand, "}"]
        if token in _ALIASES:
            return list(_ALIASES[token])
        if token == "'":
            return ["\\prime"]  # a prime with no base, e.g. `f^{'}`
        if not text and _is_letter(token) and self._spelled_function(script):
            word = "".join(self.tokens[self.pos - 1 : self.pos + 2])
            self.pos += 2
            return [_SPELLED[word]]
        return [token]

    def _spelled_function(self, script: bool) -> bool:
        """Whether the letter just read starts a letter run spelling `log`, `lim`, `sin`, ....

        In a script the word must be followed by something (`10^{(log x)/2}`): a script that
        is only the word is a label (`a_{tan}`).
        """
        start = self.pos - 1
        if "".join(self.tokens[start : start + 3]) not in _SPELLED:
            return False
        if start > 0 and _is_letter(self.tokens[start - 1]):
            return False  # inside a longer run: `xlog` stays letters
        after = self.tokens[start + 3] if start + 3 < len(self.tokens) else None
        return not script or after not in (None, "}")

    def _rit_root_index(self) -> bool:
        following = self.tokens[self.pos : self.pos + 6]
        return following[:5] == ["A", "B", "O", "V", "E"] and following[5:] == ["{"]

    def argument(self, text: bool, script: bool) -> list[str]:
        """One macro argument: a braced group, or the next single atom (`\\frac 1 2`)."""
        while True:
            token = self.peek()
            if token is None or token == "}":
                return []  # missing argument
            if token == "{":
                self.pos += 1
                inner = self.expression("}", text, script)
                if self.peek() == "}":
                    self.pos += 1
                return inner
            atom = self.atom(text, script)
            if atom is not None:
                return atom
            # spacing etc. before the argument: keep looking

    def scripts(self, out: list[str], text: bool) -> None:
        """Read `_`, `^`, `'`, `\\limits` after a base and append them canonically to `out`."""
        sub: list[str] | None = None
        sup: list[str] | None = None
        caret = False  # whether `^` was read (primes alone do not block a later `^`)
        while True:
            token = self.peek()
            if token in ("\\limits", "\\nolimits"):
                self.pos += 1
            elif token == "'":
                self.pos += 1
                sup = [*(sup or []), "\\prime"]
            elif token == "_" or token == "^":
                repeated = sub is not None if token == "_" else caret
                if repeated:
                    break  # a second subscript (superscript) goes to a new, empty base
                self.pos += 1
                arg = self.argument(text, True)
                if token == "_":
                    sub = arg
                else:
                    # `x'^2` keeps the prime with the superscript, as TeX does
                    caret = True
                    sup = arg if sup is None else [*sup, *arg]
            else:
                break
        # An empty script (`x _ {}`, left over by some CROHME converters) is no script.
        if sub:
            out += ["_", "{", *sub, "}"]
        if sup:
            out += ["^", "{", *sup, "}"]


def normalize(latex: str) -> list[str]:
    """Normalize raw LaTeX (with or without `$..$`, any CROHME spelling) to canonical tokens.

    Example: ``normalize("$\\\\frac {\\\\sqrt x} 2 \\\\lt 10$")`` ->
    ``['\\\\frac', '{', '\\\\sqrt', '{', 'x', '}', '}', '{', '2', '}', '<', '1', '0']``.
    """
    if not isinstance(latex, str):
        raise TypeError(f"normalize expects a LaTeX string, got {type(latex).__name__}")
    tokens = _lex(latex)
    try:
        return _Parser(tokens).expression(None, text=False, script=False)
    except RecursionError:
        # Hundreds of nested groups: give up on structure rather than fail.
        return [token for token in tokens if token not in _DROP and token not in ("{", "}")]


def tokens_to_latex(tokens: list[str]) -> str:
    """Join canonical tokens into the space-separated LaTeX string that KaTeX renders."""
    return " ".join(tokens)
