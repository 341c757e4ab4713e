"""Generator B: new formulas from a grammar, written with the ink of CROHME's own writers.

The module has two parts, used together by `FormulaComposer`::

    bank = InkBank.from_dataset(dataset, train_indices)
    composer = FormulaComposer(bank, lengths=[len(t) for t in dataset.select(train_indices)["tokens"]])
    strokes, tokens = composer(np.random.default_rng(0))   # list of (N, 2) float32 arrays, canonical tokens

**1. The grammar** (`FormulaGrammar`) writes canonical token lists (the style of
`modeling_hmer.latex.normalize`: braced arguments, subscript before superscript, ``^ { \\prime }``,
one token per digit) out of the structures CROHME formulas are made of: sums and products of
terms joined by relations; terms that are symbols, numbers, powers and subscripts (or both),
primes, function calls ``f ( x )``, ``\\frac``, ``\\sqrt`` with and without index, brackets and
absolute values, ``\\sin x`` / ``\\log ( x )``, ``\\sum`` / ``\\int`` / ``\\lim`` with limits,
polynomials, ``\\ldots`` / ``\\cdots`` lists, factorials, decimals and sets. Each formula first
draws a target length from the training set's token lengths (or a fitted default) and spends it
as a budget: every construct takes a share of the budget and fills it, so generated lengths follow
the training distribution. Symbols are drawn per class (digits, letters, capitals, Greek,
operators, relations) with weights from the bank's instance counts, flattened so that rare symbols
still appear; a few "main variables" per formula come back often, as in real formulas.

**2. The layout** (`FormulaLayout`, `compose_layout`) parses a canonical token list into atoms
(a base with optional sub- and superscript) and sets bank ink by box rules, in line units (a
symbol of typical size is 1 high, the main line's centre is y = 0, y down):

* a symbol is one instance of its label, preferably by the formula's writer, fitted to its label's
  typical height and offset on the line (keeping most of the instance's own variation);
* superscripts and subscripts are smaller (a per-formula 0.55-0.75) and set to the right of their
  base, raised and lowered relative to the base's box; ``\\sum``, ``\\lim`` (and sometimes
  ``\\int``) take their limits centred below and above;
* a fraction centres its numerator and denominator over a bar, a ``-`` instance stretched to the
  wider of the two;
* a root sign (a ``\\sqrt`` instance) is stretched in y to cover its radicand and in x along its
  bar only (the hook keeps its shape), with a small index at its upper left;
* brackets and bars are stretched to the height of what they enclose;
* the gaps between symbols follow the writer's typical widths with random variation (wider around
  operators and relations, narrower inside numbers), and the line drifts a little.

The output strokes are in line units; the renderer normalizes scale by mean stroke height.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from data_scripts.ink_bank import FLAT_SYMBOLS, InkBank, LabelGeometry
from modeling_hmer.latex import normalize


__all__ = ["FormulaGrammar", "FormulaLayout", "FormulaComposer", "compose_layout", "parse_tokens", "Atom"]


# =====================================================================================
# Part 1: the grammar
# =====================================================================================

DIGITS = tuple("0123456789")
LOWER = tuple("abcdefghijklmnopqrstuvwxyz")
UPPER = tuple("ABCEFGHILMNPRSTVXY")  # the capitals of the CROHME vocabulary
GREEK = ("\\alpha", "\\beta", "\\gamma", "\\theta", "\\lambda", "\\mu", "\\pi", "\\sigma", "\\phi", "\\Delta")
FUNCTIONS = ("\\sin", "\\cos", "\\tan", "\\log")
# Structure weights of binary operators and relations, roughly as often as the training captions
# use them (+ 5.4k, - 4.3k, \times 0.6k, ...; = 3.6k, \leq 0.2k, ...), with a floor for the rare ones.
OPERATORS = {"+": 50, "-": 36, "\\times": 6, "/": 2, "\\pm": 2, "\\div": 2, "\\cdot": 2}
RELATIONS = {"=": 80, "\\leq": 5, "\\geq": 4, "\\neq": 3, "<": 3, ">": 2, "\\rightarrow": 2, "\\in": 1.5}
BRACKETS = {"(": (")", 20), "[": ("]", 2.5), "\\{": ("\\}", 1), "|": ("|", 2.5)}
# Term kinds that may follow another term without an operator (an implicit product).
_IMPLICIT_KINDS = frozenset(("atom", "power", "subscript", "call", "group", "function", "sqrt", "frac", "prime"))
# Letters that usually name the variable of a formula (x, y, n, ...), and index letters.
VARIABLE_LETTERS = {"x": 10, "y": 3, "n": 2.5, "a": 3, "t": 1.2, "z": 1.5, "k": 0.8, "b": 1, "u": 0.5, "v": 0.5, "\\theta": 1, "\\alpha": 0.4}
INDEX_LETTERS = ("i", "j", "k", "n", "m")

# The training set's token lengths, when none are given: quartiles 6 / 13 / 22 and 5% of
# single symbols (measured on the CROHME training part), as a gamma fitted to the quartiles.
_DEFAULT_LENGTH_SHAPE, _DEFAULT_LENGTH_SCALE, _DEFAULT_SINGLE = 1.75, 8.6, 0.05


class _Choice:
    """Weighted choice among items with one uniform draw (much faster than `rng.choice`)."""

    def __init__(self, weights: dict[str, float]):
        items = [(item, w) for item, w in weights.items() if w > 0]
        if not items:
            raise ValueError("a choice needs at least one item with positive weight")
        self.items = [item for item, _ in items]
        total = float(sum(w for _, w in items))
        self.cumulative = list(np.cumsum([w / total for _, w in items]))

    def __call__(self, rng: np.random.Generator) -> str:
        i = bisect.bisect_right(self.cumulative, rng.random())
        return self.items[min(i, len(self.items) - 1)]


class FormulaGrammar:
    """Random canonical formulas whose token lengths follow a given distribution.

    Args:
        labels: the symbols that may be written (the ink bank's labels); constructs whose ink is
            missing are never produced.
        counts: how often each label occurs (the bank's instance counts): symbol weights within a
            class are ``count ** 0.6`` (flatter than the data, so rare symbols appear), or uniform.
        lengths: token lengths to draw target lengths from (the training set's); default: a gamma
            fitted to the CROHME training lengths.
    """

    def __init__(
        self,
        labels: Iterable[str],
        counts: dict[str, int] | None = None,
        lengths: Sequence[int] | None = None,
    ):
        self.labels = frozenset(labels)
        if "." in self.labels:  # the layout writes \cdot and \cdots with `.` ink when the bank has none
            self.labels |= {"\\cdot", "\\cdots"}
        counts = counts or {}

        def weights(symbols: Iterable[str], base: dict[str, float] | None = None) -> dict[str, float]:
            return {
                s: (base[s] if base else max(counts.get(s, 1), 1) ** 0.6) for s in (base or symbols) if s in self.labels
            }

        self.digit = _Choice({d: w ** (0.8 / 0.6) for d, w in weights(DIGITS).items()})  # 1 and 2 dominate
        self.lower = _Choice(weights(LOWER))
        self.upper = _Choice(weights(UPPER))
        self.greek = _Choice(weights(GREEK))
        self.operator = _Choice(weights((), OPERATORS))
        self.relation = _Choice(weights((), RELATIONS))
        self.function = _Choice(weights(FUNCTIONS)) if any(f in self.labels for f in FUNCTIONS) else None
        self.brackets = _Choice({o: w for o, (c, w) in BRACKETS.items() if o in self.labels and c in self.labels})
        self.variable = _Choice(weights((), VARIABLE_LETTERS)) if any(v in self.labels for v in VARIABLE_LETTERS) else None
        self.indices = [v for v in INDEX_LETTERS if v in self.labels]
        if lengths is not None:
            lengths = np.asarray([n for n in lengths if n > 0], dtype=np.int64)
            if lengths.size == 0:
                raise ValueError("lengths must hold at least one positive token length")
        self.lengths = lengths
        has = self.labels.__contains__
        # Term kinds: (weight, minimum tokens); weights tuned so that the generated token
        # frequencies come close to the training captions' (see the module's tests).
        kinds = {
            "atom": (14, 1, True),
            "number": (7, 2, True),
            "product": (8, 2, True),
            "power": (34, 5, True),
            "subscript": (28, 5, True),
            "subsup": (6, 9, True),
            "prime": (0.7, 5, has("\\prime")),
            "call": (4, 4, has("(") and has(")")),
            "frac": (40, 7, has("-")),
            "sqrt": (9, 4, has("\\sqrt")),
            "group": (8, 3, bool(self.brackets.items)),
            "function": (6, 2, self.function is not None),
            "sum": (3, 6, has("\\sum")),
            "integral": (3, 5, has("\\int") and has("d")),
            "limit": (2.5, 8, has("\\lim") and has("\\rightarrow")),
            "factorial": (0.4, 2, has("!")),
            "list": (1.2, 7, has("\\ldots") or has("\\cdots") or has(".")),
            "polynomial": (3, 9, True),
            "set": (1, 7, has("\\{") and has("\\}") and has(",")),
            "decimal": (1, 3, has(".")),
        }
        self.kinds = [(name, weight, cost) for name, (weight, cost, ok) in kinds.items() if ok]

    # ------------------------------------------------------------------ lengths

    def sample_length(self, rng: np.random.Generator) -> int:
        """A target token length: one of `lengths`, or from the default fitted distribution."""
        if self.lengths is not None:
            return int(self.lengths[int(rng.integers(len(self.lengths)))])
        if rng.random() < _DEFAULT_SINGLE:
            return 1
        return int(min(100, max(2, round(rng.gamma(_DEFAULT_LENGTH_SHAPE, _DEFAULT_LENGTH_SCALE)))))

    def __call__(self, rng: np.random.Generator, length: int | None = None) -> list[str]:
        """A canonical formula of `length` tokens (default: a sampled length), as close as the
        grammar allows; left unchanged by `normalize` (drawn again in the rare case it is not)."""
        target = self.sample_length(rng) if length is None else int(length)
        if target < 1:
            raise ValueError(f"a formula needs at least one token, got length {target}")
        for _ in range(20):
            tokens = _Formula(self, rng).formula(target)
            # Letter runs spelling a function name (`s i n`) would be read as the command.
            if normalize(" ".join(tokens)) == tokens:
                return tokens
        return tokens if normalize(" ".join(tokens)) == tokens else [self.digit(rng)]


@dataclass
class _Formula:
    """The state of one formula being written: its grammar, rng and main variables."""

    grammar: FormulaGrammar
    rng: np.random.Generator
    main: list[str] = field(default_factory=list)
    depth: int = 0
    implicit: bool = False  # the next term is an implicit product's factor

    def __post_init__(self):
        g, rng = self.grammar, self.rng
        count = 1 + int(rng.random() < 0.5) + int(rng.random() < 0.2)
        self.main = [g.variable(rng) for _ in range(count)] if g.variable else []

    # ------------------------------------------------------------------ leaves

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, items: Sequence[str]) -> str:
        return items[int(self.rng.integers(len(items)))]

    def letter(self) -> str:
        g, r = self.grammar, self.rng.random()
        if self.main and r < 0.35:
            return self.pick(self.main)
        if r < 0.87:
            return g.lower(self.rng)
        return g.upper(self.rng) if r < 0.935 else g.greek(self.rng)

    def leaf(self) -> str:
        """One symbol: a digit, a letter, or (rarely) a constant; a letter in an implicit product."""
        r = self.rng.random()
        if r < 0.42 and not self.implicit:
            return self.grammar.digit(self.rng)
        self.implicit = False
        if r < 0.975:
            return self.letter()
        constant = "\\infty" if self.chance(0.3) else "\\pi"
        return constant if constant in self.grammar.labels else self.letter()

    def number(self, n: int) -> list[str]:
        first = self.grammar.digit(self.rng)
        while n > 1 and first == "0":
            first = self.grammar.digit(self.rng)
        return [first] + [self.grammar.digit(self.rng) for _ in range(n - 1)]

    def small(self, budget: int) -> list[str]:
        """A short script: mostly one symbol (2, n, i), sometimes `n + 1` or `2 x`."""
        if budget >= 3 and self.chance(0.15):
            return self.sub(lambda: self.expression(min(budget, 3 + int(self.chance(0.3)))))
        if budget >= 2 and self.chance(0.08):
            return ["-", self.grammar.digit(self.rng)] if "-" in self.grammar.labels else [self.leaf()]
        return [self.grammar.digit(self.rng) if self.chance(0.6) else self.letter()]

    def sub(self, build):
        """Runs `build` one nesting level deeper."""
        self.depth += 1
        try:
            return build()
        finally:
            self.depth -= 1

    # ------------------------------------------------------------------ formula and expressions

    def formula(self, length: int) -> list[str]:
        g = self.grammar
        quantifiers = [q for q in ("\\forall", "\\exists") if q in g.labels]
        if length >= 4 and quantifiers and self.chance(0.008):
            return [self.pick(quantifiers), self.letter()] + self.formula(length - 2)
        if length >= 3 and self.chance(0.48):
            # lhs relation rhs; the left side is usually short (y =, f ( x ) =)
            left = max(1, min(length - 2, int(round(length * self.rng.uniform(0.08, 0.55)))))
            out = self.expression(left) + [g.relation(self.rng)]
            rest = length - len(out)
            if rest >= 5 and self.chance(0.08):  # a chain a < b < c
                middle = max(1, int(rest * self.rng.uniform(0.3, 0.6)))
                out += self.expression(middle) + [g.relation(self.rng)]
                rest = length - len(out)
            return out + self.expression(max(1, rest))
        return self.expression(length)

    def expression(self, budget: int) -> list[str]:
        """Terms joined by operators (or juxtaposed), `budget` tokens in all when possible."""
        out: list[str] = []
        while budget > 0:
            if out:
                if budget >= 2 and not self.chance(0.25):
                    out.append(self.grammar.operator(self.rng))
                    budget -= 1
                elif self.juxtaposable(out[-1]):
                    self.implicit = True  # an implicit product: the next term starts with a letter
                else:
                    break
            share = budget if self.chance(0.35) else 1 + min(budget - 1, int(self.rng.exponential(10.0)))
            term = self.term(share)
            out += term
            budget -= len(term)
        return out or [self.leaf()]

    @staticmethod
    def juxtaposable(token: str) -> bool:
        # Implicit products `2 x`, `( a ) ( b )`, `x ^ { 2 } y`: after a symbol, a closing
        # bracket or a script, never after an operator or a comma.
        return token in _CLOSING or token == "}" or len(token) == 1 and token.isalnum() or token in GREEK

    def term(self, budget: int) -> list[str]:
        """One term of at most `budget` tokens."""
        kinds = [(name, w) for name, w, cost in self.grammar.kinds if cost <= budget]
        if self.implicit:
            kinds = [(name, w) for name, w in kinds if name in _IMPLICIT_KINDS]
        if self.depth >= 2:
            kinds = [(name, w) for name, w in kinds if name in ("atom", "number", "product", "power", "subscript", "group")]
        if not kinds:
            return [self.leaf()]
        total = sum(w for _, w in kinds)
        r, name = self.rng.random() * total, kinds[-1][0]
        for kind, w in kinds:
            r -= w
            if r < 0:
                name = kind
                break
        return getattr(self, "term_" + name)(budget)

    # ------------------------------------------------------------------ terms

    def term_atom(self, budget):
        return [self.leaf()]

    def term_number(self, budget):
        r = self.rng.random()
        return self.number(min(budget, 2 if r < 0.7 else 3 if r < 0.92 else 4))

    def term_product(self, budget):
        n = min(budget, 2 + int(self.chance(0.25)))
        first = self.grammar.digit(self.rng) if self.chance(0.5) else self.letter()
        return [first] + [self.letter() for _ in range(n - 1)]

    def base(self) -> str:
        digit = self.chance(0.25) and not self.implicit
        self.implicit = False
        return self.grammar.digit(self.rng) if digit else self.letter()

    def term_power(self, budget):
        return [self.base(), "^", "{", *self.sub(lambda: self.small(budget - 4)), "}"]

    def term_subscript(self, budget):
        index = [self.pick(self.grammar.indices)] if self.grammar.indices and self.chance(0.35) else self.small(budget - 4)
        return [self.letter(), "_", "{", *self.sub(lambda: index), "}"]

    def term_subsup(self, budget):
        index = [self.pick(self.grammar.indices)] if self.grammar.indices and self.chance(0.5) else [self.grammar.digit(self.rng)]
        return [self.letter(), "_", "{", *index, "}", "^", "{", *self.sub(lambda: self.small(budget - 8)), "}"]

    def term_prime(self, budget):
        name = self.pick([f for f in ("f", "g", "y", "u") if f in self.grammar.labels] or [self.letter()])
        primes = ["\\prime"] * (1 + int(self.chance(0.15)))
        out = [name, "^", "{", *primes, "}"]
        if budget - len(out) >= 3 and "(" in self.grammar.labels and self.chance(0.6):
            out += ["(", self.pick(self.main or ["x"]), ")"]
        return out

    def term_call(self, budget):
        name = self.pick([f for f in ("f", "g", "h", "F", "P") if f in self.grammar.labels] or [self.letter()])
        inner = budget - 3
        if inner >= 3 and "," in self.grammar.labels and self.chance(0.2):
            return [name, "(", self.letter(), ",", self.letter(), ")"]
        args = self.sub(lambda: self.expression(min(inner, 1 + int(self.rng.exponential(1.5)))))
        return [name, "(", *args, ")"]

    def term_frac(self, budget):
        inner = budget - 5
        top = max(1, min(inner - 1, int(round(inner * self.rng.uniform(0.3, 0.7)))))
        numerator = self.sub(lambda: self.expression(top))
        denominator = self.sub(lambda: self.expression(max(1, inner - len(numerator))))
        return ["\\frac", "{", *numerator, "}", "{", *denominator, "}"]

    def term_sqrt(self, budget):
        if budget >= 7 and self.chance(0.2):
            index = [self.grammar.digit(self.rng) if self.chance(0.7) else "n"]
            return ["\\sqrt", "[", *index, "]", "{", *self.sub(lambda: self.expression(budget - 6)), "}"]
        return ["\\sqrt", "{", *self.sub(lambda: self.expression(budget - 3)), "}"]

    def term_group(self, budget):
        opening = self.grammar.brackets(self.rng)
        closing = BRACKETS[opening][0]
        power = budget >= 8 and self.chance(0.25)
        inner = budget - 2 - (5 if power else 0)
        out = [opening, *self.sub(lambda: self.expression(max(1, inner))), closing]
        if power:
            out += ["^", "{", *self.sub(lambda: self.small(1)), "}"]
        return out

    def term_function(self, budget):
        name = self.grammar.function(self.rng)
        out = [name]
        if budget >= 6 and self.chance(0.2):
            script = "_" if name == "\\log" else "^"
            if script == "_":
                out += ["_", "{", self.pick(["2", "1", "0", "e", "a"]) if self.chance(0.8) else self.grammar.digit(self.rng), "}"]
            else:
                out += ["^", "{", *(["2"] if self.chance(0.8) else ["-", "1"] if self.chance(0.5) else ["3"]), "}"]
        left = budget - len(out)
        if left >= 3 and "(" in self.grammar.labels and self.chance(0.4):
            return out + ["(", *self.sub(lambda: self.expression(min(left - 2, 1 + int(self.rng.exponential(2))))), ")"]
        if left >= 2 and self.chance(0.2):
            return out + [self.grammar.digit(self.rng), self.pick(self.main or ["x"])]
        return out + [self.pick(self.main) if self.main and self.chance(0.6) else self.letter()]

    def term_sum(self, budget):
        i = self.pick(self.grammar.indices or ["n"])
        out = ["\\sum"]
        if budget >= 12 and self.chance(0.75):
            start = "0" if self.chance(0.3) else "1"
            top = self.pick(["n", "N", "\\infty", "n", "k", "m"])
            top = top if top in self.grammar.labels else "n"
            out += ["_", "{", i, "=", start, "}", "^", "{", top, "}"]
        elif budget >= 6:
            out += ["_", "{", i, "}"]
        left = budget - len(out)
        body = self.sub(lambda: self.expression(max(1, min(left, 1 + int(self.rng.exponential(5))))))
        return out + body

    def term_integral(self, budget):
        var = self.pick(self.main) if self.main and self.main[0] in LOWER else "x"
        out = ["\\int"]
        if budget >= 13 and self.chance(0.6):
            low = self.pick(["0", "1", "a", "0"]) if self.chance(0.8) else "-"
            low = ["-", "\\infty"] if low == "-" and "\\infty" in self.grammar.labels else [low if low != "-" else "0"]
            high = self.pick(["1", "b", "\\infty", "2", "x"])
            out += ["_", "{", *low, "}", "^", "{", high if high in self.grammar.labels else "1", "}"]
        left = budget - len(out) - 2
        body = self.sub(lambda: self.expression(max(1, min(left, 1 + int(self.rng.exponential(4))))))
        return out + body + ["d", var]

    def term_limit(self, budget):
        var = self.pick(self.main) if self.main and self.main[0] in LOWER else "x"
        target = "\\infty" if "\\infty" in self.grammar.labels and self.chance(0.4) else self.pick(["0", "0", "1", "a"])
        out = ["\\lim", "_", "{", var, "\\rightarrow", target, "}"]
        left = budget - len(out)
        if left <= 0:
            return out + [var]
        return out + self.sub(lambda: self.expression(min(left, 1 + int(self.rng.exponential(6)))))

    def term_factorial(self, budget):
        if budget >= 6 and "(" in self.grammar.labels and self.chance(0.3):
            return ["(", self.letter(), self.grammar.operator(self.rng), self.grammar.digit(self.rng), ")", "!"]
        return [self.letter() if self.chance(0.7) else self.grammar.digit(self.rng), "!"]

    def term_list(self, budget):
        g = self.grammar
        dots = [d for d in ("\\ldots", "\\cdots") if d in g.labels]
        dots = self.pick(dots) if dots else None
        join = "," if "," in g.labels and (dots != "\\cdots" or self.chance(0.3)) else "+"
        name = self.letter()
        if budget >= 19 and self.chance(0.6):
            item = lambda index: [name, "_", "{", index, "}"]  # noqa: E731
            last = self.pick(g.indices or ["n"])
        else:
            item = lambda index: [index]  # noqa: E731
            last = "n" if "n" in g.labels else "9"
        ellipsis = [dots] if dots else [".", ".", "."]
        out = item("1") + [join] + item("2") + [join] + ellipsis + [join] + item(last)
        if len(out) > budget:
            out = item("1") + [join] + ellipsis + [join] + item(last)
        return out if len(out) <= budget else [name]

    def term_polynomial(self, budget):
        out: list[str] = []
        degree = int(self.rng.integers(2, 5))
        var = self.pick(self.main) if self.main else "x"
        for power in range(degree, -1, -1):
            piece = []
            if out:
                piece.append("+" if self.chance(0.65) else "-")
            if power == 0 or self.chance(0.6):
                piece += self.number(1 + int(self.chance(0.1))) if self.chance(0.7) else [self.grammar.lower(self.rng)]
            if power > 0:
                piece.append(var)
                if power > 1:
                    piece += ["^", "{", str(power), "}"]
            if len(out) + len(piece) > budget:
                break
            if out or power < degree or piece:
                out += piece
            if power > 0 and power < degree and self.chance(0.2):
                continue
        return out or [var]

    def term_set(self, budget):
        n = max(2, min(4, (budget - 1) // 2))
        out = ["\\{"]
        for k in range(n):
            out += ([","] if k else []) + [self.leaf()]
        return out + ["\\}"]

    def term_decimal(self, budget):
        n = min(budget - 1, 2 + int(self.rng.integers(0, 3)))
        point = 1 + int(self.rng.integers(0, max(1, n - 1)))
        digits = self.number(n)
        return digits[:point] + ["."] + digits[point:] if point < n else digits[:1] + ["."] + digits[1:]


# =====================================================================================
# Part 2: the layout
# =====================================================================================


@dataclass
class Atom:
    """One element of a row: a base with optional scripts.

    kind: ``"symbol"`` (label in `value`), ``"frac"`` (`args` = [numerator, denominator]),
    ``"sqrt"`` (`args` = [radicand] or [radicand, index]) or ``"empty"`` (a script with no base);
    sub, sup: the script rows, or None.
    """

    kind: str
    value: str = ""
    args: list[list["Atom"]] = field(default_factory=list)
    sub: list["Atom"] | None = None
    sup: list["Atom"] | None = None


def parse_tokens(tokens: Sequence[str]) -> list[Atom]:
    """Parses canonical tokens (see `modeling_hmer.latex.normalize`) into a row of atoms.

    Raises ValueError on tokens that are not in canonical form (an unbraced argument, an
    unbalanced brace).
    """
    tokens = list(tokens)
    pos = 0

    def expect(token: str) -> None:
        nonlocal pos
        if pos >= len(tokens) or tokens[pos] != token:
            found = tokens[pos] if pos < len(tokens) else "the end"
            raise ValueError(f"expected {token!r} at token {pos}, found {found!r} in {' '.join(tokens)!r}")
        pos += 1

    def group() -> list[Atom]:
        expect("{")
        inside = row("}")
        expect("}")
        return inside

    def row(stop: str | None) -> list[Atom]:
        nonlocal pos
        out: list[Atom] = []
        while pos < len(tokens) and tokens[pos] != stop:
            token = tokens[pos]
            if token == "}" or token == "{":
                raise ValueError(f"unexpected {token!r} at token {pos} in {' '.join(tokens)!r}")
            if token in ("_", "^"):
                atom = Atom("empty")
            else:
                pos += 1
                if token == "\\frac":
                    atom = Atom("frac", args=[group(), group()])
                elif token == "\\sqrt":
                    index = None
                    if pos < len(tokens) and tokens[pos] == "[":
                        pos += 1
                        index = row("]")
                        expect("]")
                    atom = Atom("sqrt", args=[group()] + ([index] if index is not None else []))
                else:
                    atom = Atom("symbol", value=token)
            for script in ("_", "^"):
                if pos < len(tokens) and tokens[pos] == script:
                    pos += 1
                    if script == "_":
                        atom.sub = group()
                    else:
                        atom.sup = group()
            out.append(atom)
        return out

    atoms = row(None)
    if pos != len(tokens):
        raise ValueError(f"unexpected {tokens[pos]!r} at token {pos} in {' '.join(tokens)!r}")
    return atoms


@dataclass
class _Box:
    """Laid-out ink: strokes with x from the box's left edge (0) and y from its line's centre.

    width is the right edge of the ink, top/bottom its vertical extent (y down, top < bottom);
    labels: the symbol each stroke belongs to (a fraction bar is a ``-``).
    """

    strokes: list[np.ndarray]
    width: float
    top: float
    bottom: float
    labels: list[str] = field(default_factory=list)

    @staticmethod
    def union(parts: Sequence[tuple["_Box", float, float]]) -> "_Box":
        """The boxes moved by (dx, dy) each, joined and shifted so that the left edge is at 0."""
        parts = [(b, dx, dy) for b, dx, dy in parts if b.strokes]
        if not parts:
            return _Box([], 0.0, 0.0, 0.0)
        left = min(dx for _, dx, _ in parts)
        strokes, labels = [], []
        for b, dx, dy in parts:
            shift = np.array([dx - left, dy], dtype=np.float32)
            strokes += [s + shift for s in b.strokes]
            labels += b.labels
        return _Box(
            strokes,
            max(b.width + dx for b, dx, _ in parts) - left,
            min(b.top + dy for b, _, dy in parts),
            max(b.bottom + dy for b, _, dy in parts),
            labels,
        )


# Labels whose typical place or size in the bank is not the one on a main line, as (height or
# None to keep the bank's, centre) in line units: `\rightarrow` and `\infty` are mostly written
# inside limits (`x \rightarrow \infty` under a \lim), so the bank's densest offset is a
# subscript's; the bank's `.` mixes decimal points with centred dots; `\lim` and `\log` come out
# 1.8 and 2.1 high in the bank (their expressions' small limits and bases pull the unit down),
# where an `l` with an `m` or a `g` spans about 1.15 and 1.55.
_GEOMETRY_FIXES = {
    "\\rightarrow": (None, 0.08),
    "\\infty": (0.5, 0.15),
    ".": (None, 0.42),
    "\\lim": (1.15, -0.05),
    "\\log": (1.55, 0.2),
}
# Stretchable delimiters (a `|` is both).
_OPENING = {"(": ")", "[": "]", "\\{": "\\}", "|": "|"}
_CLOSING = {")", "]", "\\}", "|"}
_SPACED = frozenset(RELATIONS) | frozenset(OPERATORS) - {"/"}
_LIMIT_OPERATORS = ("\\sum", "\\lim")


class _Writer:
    """One formula being laid out: the bank, the rng, the writer and the hand's style."""

    def __init__(self, layout: "FormulaLayout", rng: np.random.Generator, writer: str | None):
        self.layout, self.bank, self.rng, self.writer = layout, layout.bank, rng, writer
        # A hand's style, drawn once per formula.
        spacing = layout.writer_width(writer) if writer is not None else 1.0
        self.gap = rng.uniform(0.15, 0.45) * spacing
        self.script_scale = rng.uniform(0.55, 0.75)
        self.frac_scale = rng.uniform(0.8, 1.0)
        self.drift = rng.uniform(0.0, 0.05)
        self.slope = rng.normal(0.0, 0.025)

    # ------------------------------------------------------------------ symbols

    def symbol(self, label: str, size: float) -> _Box:
        """One instance of `label` at `size` (fitted to its label's height and offset)."""
        if label not in self.bank and label in ("\\cdot", "\\cdots"):
            return self.dots(3 if label == "\\cdots" else 1, size)
        strokes, width, top, bottom = self.layout.ink(label).fitted(self.sample(label))
        factor = np.float32(size)
        return _Box([s * factor for s in strokes], width * size, top * size, bottom * size, [label] * len(strokes))

    def sample(self, label: str) -> int:
        """The index of a random instance of `label` in the bank, as `InkBank.sample` draws it."""
        return self.layout.ink(label).sample(self.rng, self.writer)

    def dots(self, count: int, size: float) -> _Box:
        """A centred dot or three (\\cdot, \\cdots) from `.` ink, for banks without them."""
        parts, x = [], 0.0
        for _ in range(count):
            dot = self.symbol(".", size)
            parts.append((dot, x, (0.05 - 0.42) * size))
            x += dot.width + self.rng.uniform(0.15, 0.3) * size
        box = _Box.union(parts)
        box.labels = ["\\cdots" if count > 1 else "\\cdot"] * len(box.strokes)
        return box

    def stretched(self, label: str, size: float, top: float, bottom: float) -> _Box:
        """A delimiter at `size`, stretched in y (and a little in x) to span top..bottom."""
        box = self.symbol(label, size)
        height = box.bottom - box.top
        if height <= 0 or bottom - top <= height * 1.1:
            return box
        sy = (bottom - top) / height
        sx = min(math.sqrt(sy), 1.6)
        strokes = [np.column_stack((s[:, 0] * sx, (s[:, 1] - box.top) * sy + top)).astype(np.float32) for s in box.strokes]
        return _Box(strokes, box.width * sx, top, bottom, box.labels)

    # ------------------------------------------------------------------ structures

    def row(self, atoms: Sequence[Atom], size: float) -> _Box:
        """Atoms side by side: brackets stretched to their content, gaps, a drifting line."""
        boxes: list[_Box | None] = [None] * len(atoms)
        # Brackets are laid out once their content is, so that they can cover it.
        for i, atom in enumerate(atoms):
            if not (atom.kind == "symbol" and (atom.value in _OPENING or atom.value in _CLOSING)):
                boxes[i] = self.atom(atom, size)
        stack: list[int] = []
        for i, atom in enumerate(atoms):
            if boxes[i] is not None:
                continue
            label = atom.value
            if stack and label in _CLOSING and _OPENING[atoms[stack[-1]].value] == label:
                start = stack.pop()
                inner = [b for b in boxes[start + 1 : i] if b is not None and b.strokes]
                top = min([b.top for b in inner] + [-0.5 * size]) - 0.12 * size
                bottom = max([b.bottom for b in inner] + [0.5 * size]) + 0.12 * size
                boxes[start] = self.atom(atoms[start], size, (top, bottom))
                boxes[i] = self.atom(atom, size, (top, bottom))
            elif label in _OPENING:
                stack.append(i)
            else:
                boxes[i] = self.atom(atom, size)
        for i in stack:  # unmatched openings
            boxes[i] = self.atom(atoms[i], size)

        parts, x, y = [], 0.0, 0.0
        previous: Atom | None = None
        for atom, box in zip(atoms, boxes):
            if not box.strokes:
                continue
            if previous is not None:
                x += self.gap * size * self.rng.uniform(0.6, 1.4) * self.spacing(previous, atom)
            y += self.rng.normal(0.0, self.drift) * size
            parts.append((box, x, y + self.slope * x))
            x += box.width
            previous = atom
        return _Box.union(parts)

    @staticmethod
    def spacing(previous: Atom, atom: Atom) -> float:
        """How much wider (or narrower) than usual the gap between two atoms is."""
        a, b = previous.value, atom.value
        if a in _SPACED or b in _SPACED:
            return 1.7
        if a == "," or b in _CLOSING or a in _OPENING:
            return 0.6 if a != "," else 1.3
        if b == "," or b == "!" or b == "(" and previous.kind == "symbol" and previous.sup is None:
            return 0.5
        if a in DIGITS and b in DIGITS or a == "." or b == ".":
            return 0.55
        return 1.0

    def atom(self, atom: Atom, size: float, span: tuple[float, float] | None = None) -> _Box:
        """An atom's base (a delimiter stretched over `span`, when given) with its scripts."""
        if atom.kind == "frac":
            base = self.frac(atom.args[0], atom.args[1], size)
        elif atom.kind == "sqrt":
            base = self.sqrt(atom.args[0], atom.args[1] if len(atom.args) > 1 else None, size)
        elif atom.kind == "empty":
            base = _Box([], 0.0, -0.3 * size, 0.3 * size)
        elif span is not None:
            base = self.stretched(atom.value, size, *span)
        else:
            base = self.symbol(atom.value, size)
        if atom.sub is None and atom.sup is None:
            return base
        above_below = atom.value in _LIMIT_OPERATORS or atom.value == "\\int" and self.rng.random() < 0.25
        if atom.kind == "symbol" and above_below:
            return self.limits(base, atom, size)
        return self.scripts(base, atom, size)

    def scripts(self, base: _Box, atom: Atom, size: float) -> _Box:
        """Superscript raised and subscript lowered, right of the base."""
        small = size * self.script_scale * self.rng.uniform(0.93, 1.07)
        parts = [(base, 0.0, 0.0)]
        x = base.width + self.rng.uniform(0.02, 0.12) * size
        integral = atom.value == "\\int"
        top_ref = min(base.top, -0.35 * size) if base.strokes else -0.35 * size
        bottom_ref = max(base.bottom, 0.45 * size) if base.strokes else 0.45 * size
        sup_box = sub_box = None
        if atom.sup is not None:
            primes = all(a.kind == "symbol" and a.value == "\\prime" for a in atom.sup)
            # A prime keeps its own size and height (the bank's instances float above the line).
            sup_box = self.row(atom.sup, size if primes else small)
            if primes:
                sup_dy = 0.0 if top_ref > -0.6 * size else top_ref + 0.35 * size - sup_box.top
            else:
                above = 0.5 * size - top_ref
                sup_dy = top_ref + self.rng.uniform(0.3, 0.5) * above - sup_box.bottom
        if atom.sub is not None:
            sub_box = self.row(atom.sub, small)
            sub_dy = bottom_ref - self.rng.uniform(0.35, 0.55) * (sub_box.bottom - sub_box.top) - sub_box.top
        if sup_box is not None and sub_box is not None:
            # Both scripts: keep a gap between them.
            overlap = (sup_box.bottom + sup_dy) - (sub_box.top + sub_dy) + 0.08 * size
            if overlap > 0:
                sup_dy -= overlap / 2
                sub_dy += overlap / 2
        if sub_box is not None:
            sub_x = base.width * 0.55 if integral else x - 0.05 * size * self.rng.random()
            parts.append((sub_box, sub_x, sub_dy))
        if sup_box is not None:
            parts.append((sup_box, x, sup_dy))
        return _Box.union(parts)

    def limits(self, base: _Box, atom: Atom, size: float) -> _Box:
        """Limits centred below and above a big operator (\\sum, \\lim, some \\int)."""
        small = size * self.script_scale * self.rng.uniform(0.95, 1.1)
        center = base.width / 2
        parts = [(base, 0.0, 0.0)]
        if atom.sub is not None:
            below = self.row(atom.sub, small)
            dy = base.bottom + self.rng.uniform(0.1, 0.25) * size - below.top
            parts.append((below, center - below.width / 2 + self.rng.normal(0, 0.05) * size, dy))
        if atom.sup is not None:
            above = self.row(atom.sup, small)
            dy = base.top - self.rng.uniform(0.1, 0.25) * size - above.bottom
            parts.append((above, center - above.width / 2 + self.rng.normal(0, 0.05) * size, dy))
        return _Box.union(parts)

    def frac(self, numerator: list[Atom], denominator: list[Atom], size: float) -> _Box:
        """Numerator and denominator centred over a stretched `-` bar."""
        inner = size * self.frac_scale
        top, bottom = self.row(numerator, inner), self.row(denominator, inner)
        overhang = self.rng.uniform(0.1, 0.3) * size
        width = max(top.width, bottom.width, 0.5 * size) + 2 * overhang
        bar_y = self.rng.uniform(0.0, 0.12) * size
        bar = self.bar(width, size, bar_y)
        # gaps from the bar's ink, which wobbles
        top_dy = bar.top - self.rng.uniform(0.12, 0.28) * size - top.bottom
        bottom_dy = bar.bottom + self.rng.uniform(0.15, 0.3) * size - bottom.top

        def centred(part: _Box) -> float:
            # a little off centre, never past the bar's ends
            room = (width - part.width) / 2
            return room + float(np.clip(self.rng.normal(0.0, 0.04) * size, -room, room))

        return _Box.union([(bar, 0.0, 0.0), (top, centred(top), top_dy), (bottom, centred(bottom), bottom_dy)])

    def bar(self, width: float, size: float, y: float) -> _Box:
        """A `-` instance stretched to `width`, its centre at height `y`."""
        ink = self.bank.instances["-"][self.sample("-")]
        points = np.concatenate(ink.strokes)
        (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
        center, span = (top + bottom) / 2, max(right - left, 1e-6)
        # The bar's wobble grows with its length, but less than in proportion.
        sy = size * min(1.0, math.sqrt(width / (span * size))) if span * size < width else size
        strokes = [
            np.column_stack(((s[:, 0] - left) / span * width, (s[:, 1] - center) * sy + y)).astype(np.float32)
            for s in ink.strokes
        ]
        half = (bottom - top) / 2 * sy
        return _Box(strokes, width, y - half, y + half, ["-"] * len(strokes))

    def sqrt(self, radicand: list[Atom], index: list[Atom] | None, size: float) -> _Box:
        """A root sign stretched over its radicand: y to its height, x along the bar only."""
        body = self.row(radicand, size)
        sign_strokes, hook = self.layout.root_shape(self.sample("\\sqrt"))
        points = np.concatenate(sign_strokes)
        (left, top), (right, bottom) = points.min(axis=0).tolist(), points.max(axis=0).tolist()
        height = max(bottom - top, 1e-6)
        body_top = min(body.top, -0.55 * size) if body.strokes else -0.55 * size
        body_bottom = max(body.bottom, 0.45 * size) if body.strokes else 0.45 * size
        sign_top = body_top - self.rng.uniform(0.15, 0.35) * size
        sign_bottom = body_bottom + self.rng.uniform(0.03, 0.15) * size
        sy = (sign_bottom - sign_top) / height
        has_bar = right - hook > 0.3 * height
        hook_width = float(np.clip((hook - left) * sy, 0.4 * size, max(0.4 * size, 0.6 * (sign_bottom - sign_top))))
        if not has_bar:
            hook, hook_width = right, float(np.clip((right - left) * sy, 0.3 * size, 1.2 * size))
        start = hook_width + self.rng.uniform(0.12, 0.3) * size
        end = start + body.width + self.rng.uniform(0.1, 0.3) * size
        strokes = []
        for s in sign_strokes:
            x = s[:, 0]
            if has_bar:
                x = np.where(
                    x <= hook,
                    (x - left) / max(hook - left, 1e-6) * hook_width,
                    hook_width + (x - hook) / max(right - hook, 1e-6) * (end - hook_width),
                )
            else:
                x = (x - left) / max(right - left, 1e-6) * hook_width
            strokes.append(np.column_stack((x, (s[:, 1] - top) * sy + sign_top)).astype(np.float32))
        sign = _Box(strokes, end if has_bar else hook_width, sign_top, sign_bottom, ["\\sqrt"] * len(strokes))
        parts = [(sign, 0.0, 0.0), (body, start, 0.0)]
        if index is not None:
            box = self.row(index, size * self.script_scale * 0.85)
            dy = sign_top + 0.5 * (sign_bottom - sign_top) - box.bottom
            parts.append((box, 0.55 * hook_width - box.width, dy))
        return _Box.union(parts)


def _root_shape(strokes: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """(strokes, hook end) of a root sign: where its hook ends and its bar begins, and the
    strokes with the bar's slope mostly taken out (a bar that runs downhill would cut through
    the radicand once stretched).

    A root is written as a tick from its lowest point (the valley) up to the top, then a bar to
    the right, in one stroke or two, in either direction: the hook ends at the leftmost point
    near the top (within 15% of the height) right of the valley.
    """
    points = np.concatenate(strokes)
    top, bottom = float(points[:, 1].min()), float(points[:, 1].max())
    valley_x = float(points[np.argmax(points[:, 1]), 0])
    band = points[(points[:, 1] <= top + 0.15 * (bottom - top)) & (points[:, 0] >= valley_x)]
    apex = band[np.argmin(band[:, 0])] if len(band) else points[np.argmin(points[:, 1])]
    hook_x, hook_y = float(apex[0]), float(apex[1])
    bar = points[points[:, 0] > hook_x]
    if len(bar) < 2:
        return strokes, hook_x
    end = bar[np.argmax(bar[:, 0])]
    slope = (float(end[1]) - hook_y) / max(float(end[0]) - hook_x, 1e-6)
    levelled = []
    for s in strokes:
        over = np.maximum(s[:, 0] - hook_x, 0.0)
        levelled.append(np.column_stack((s[:, 0], s[:, 1] - 0.8 * slope * over)).astype(np.float32))
    return levelled, hook_x


class _LabelInk:
    """The instances of one label ready to be set: sampling pools and fitted strokes.

    Sampling draws from the same pools as `InkBank.sample(label, rng, writer=...)` (the writer's
    instances written on a line, else all the writer's, else every writer's on-line ones) with
    the same draw, without rebuilding them on every call. An instance is *fitted* once, on first
    use: scaled to its label's typical height (flat symbols: width), keeping up to a quarter of
    its own deviation, and moved to its label's typical offset (keeping up to 0.12 of its own),
    then shifted to x = 0; ``_GEOMETRY_FIXES`` replaces the typical figures the bank gets wrong.
    """

    def __init__(self, bank: InkBank, label: str):
        self.label = label
        self.items = bank.instances[label]
        self.geometry: LabelGeometry = bank.geometry[label]
        by_writer: dict[str, list[int]] = {}
        for i, ink in enumerate(self.items):
            by_writer.setdefault(ink.writer, []).append(i)
        self.by_writer = {w: [i for i in pool if self.items[i].on_line] or pool for w, pool in by_writer.items()}
        self.on_line = [i for i, ink in enumerate(self.items) if ink.on_line] or list(range(len(self.items)))
        self._fitted: dict[int, tuple[list[np.ndarray], float, float, float]] = {}

    def sample(self, rng: np.random.Generator, writer: str | None) -> int:
        pool = self.by_writer.get(writer, self.on_line) if writer is not None else self.on_line
        return pool[int(rng.integers(len(pool)))]

    def fitted(self, i: int) -> tuple[list[np.ndarray], float, float, float]:
        """(strokes, width, top, bottom) of instance `i` fitted at size 1."""
        if i not in self._fitted:
            self._fitted[i] = self._fit(self.items[i].strokes)
        return self._fitted[i]

    def _fit(self, strokes: list[np.ndarray]) -> tuple[list[np.ndarray], float, float, float]:
        points = np.concatenate(strokes)
        (left, top), (right, bottom) = points.min(axis=0).tolist(), points.max(axis=0).tolist()
        geometry = self.geometry
        fixed_height, fixed_center = _GEOMETRY_FIXES.get(self.label, (None, None))
        own_center = (top + bottom) / 2
        if self.label in FLAT_SYMBOLS:
            # No telling height: keep the instance's width within reason of its label's.
            width = right - left
            scale = min(max(width / geometry.width, 0.7), 1.4) * geometry.width / width if width > 0.2 else 1.0
        else:
            own = max(bottom - top, 1e-6)
            scale = min(max(own / geometry.height, 0.8), 1.25) * (fixed_height or geometry.height) / own
        if fixed_center is None:
            target = geometry.center + min(max(own_center - geometry.center, -0.12), 0.12)
        else:  # the instance's offset from a wrong typical one says nothing
            target = fixed_center
        origin = np.array([left, own_center], dtype=np.float32)
        shift = np.array([0.0, target], dtype=np.float32)
        fitted = [(s - origin) * np.float32(scale) + shift for s in strokes]
        half = (bottom - top) / 2 * scale
        return fitted, (right - left) * scale, target - half, target + half


def _written_labels(atoms: Sequence[Atom]) -> set[str]:
    """The labels whose ink a row needs (a fraction needs a `-` for its bar)."""
    labels: set[str] = set()
    for atom in atoms:
        if atom.kind == "symbol":
            labels.add(atom.value)
        elif atom.kind == "frac":
            labels.add("-")
        elif atom.kind == "sqrt":
            labels.add("\\sqrt")
        for row in [*atom.args, atom.sub or [], atom.sup or []]:
            labels |= _written_labels(row)
    return labels


class FormulaLayout:
    """Writes canonical token lists with a bank's ink (see the module docstring, part 2).

    Per-writer figures (which labels a writer wrote, how wide they write) are computed on first
    use and kept, so reuse one layout for many formulas.
    """

    def __init__(self, bank: InkBank):
        self.bank = bank
        self._labels: dict[str, _LabelInk] = {}
        self._roots: dict[int, tuple[list[np.ndarray], float]] = {}
        self._writers_of: dict[str, int] = {}  # label -> bit mask over bank.writers
        self._writer_width: dict[str, float] = {}

    def ink(self, label: str) -> _LabelInk:
        if label not in self._labels:
            self._labels[label] = _LabelInk(self.bank, label)
        return self._labels[label]

    def root_shape(self, i: int) -> tuple[list[np.ndarray], float]:
        """Root sign `i` of the bank (cached): its strokes with the bar levelled, and the x where
        the hook ends and the bar begins (see `_root_shape`)."""
        if i not in self._roots:
            self._roots[i] = _root_shape(self.bank.instances["\\sqrt"][i].strokes)
        return self._roots[i]

    def _writer_stats(self) -> None:
        """Who wrote each label (a bit per writer of `bank.writers`), and how wide each writer writes: the median over (up to 3 of
        each label's) instances of its width / its label's typical width, clipped to 0.7..1.4."""
        ratios: dict[str, list[float]] = {}
        self._writer_bit = {w: i for i, w in enumerate(self.bank.writers)}
        for label, items in self.bank.instances.items():
            typical = max(self.bank.geometry[label].width, 1e-6)
            seen: dict[str, int] = {}
            for ink in items:
                seen[ink.writer] = seen.get(ink.writer, 0) + 1
                if label not in FLAT_SYMBOLS and seen[ink.writer] <= 3:  # x runs from the left edge (0)
                    ratios.setdefault(ink.writer, []).append(max(float(s[:, 0].max()) for s in ink.strokes) / typical)
            self._writers_of[label] = sum(1 << self._writer_bit[w] for w in seen)
        self._writer_width = {w: float(np.clip(np.median(r), 0.7, 1.4)) for w, r in ratios.items()}

    def writer_width(self, writer: str) -> float:
        """How wide `writer` writes relative to the bank's typical widths (1.0 if unknown)."""
        if not self._writers_of:
            self._writer_stats()
        return self._writer_width.get(writer, 1.0)

    def choose_writer(self, labels: Iterable[str], rng: np.random.Generator) -> str:
        """A writer who wrote every one of `labels`, or else one who wrote the most of them."""
        if not self._writers_of:
            self._writer_stats()
        masks = [self._writers_of[label] for label in labels if label in self._writers_of]
        full = -1  # all bits: the writers who wrote every label so far
        for mask in masks:
            full &= mask
        if not masks:
            full = (1 << len(self.bank.writers)) - 1
        if not full:
            coverage = [sum(mask >> i & 1 for mask in masks) for i in range(len(self.bank.writers))]
            best = max(coverage)
            full = sum(1 << i for i, n in enumerate(coverage) if n == best)
        candidates = [w for i, w in enumerate(self.bank.writers) if full >> i & 1]
        return candidates[int(rng.integers(len(candidates)))]

    def layout(
        self, tokens: Sequence[str], rng: np.random.Generator, writer: str | None = None
    ) -> tuple[list[np.ndarray], list[str]]:
        """(strokes, labels): the strokes of `tokens`, float32 arrays of shape (N, 2), y down, in
        line units, and the symbol each stroke writes (a fraction bar is a ``-``).

        `writer`: whose ink to prefer (symbols that writer never wrote come from other writers);
        default: a writer chosen with `choose_writer`. Raises KeyError when the bank has no ink
        for a symbol, ValueError when `tokens` are not canonical.
        """
        atoms = parse_tokens(tokens)
        written = _written_labels(atoms)
        missing = sorted(label for label in written if label not in self.bank and label not in ("\\cdot", "\\cdots"))
        if missing:
            raise KeyError(f"no ink in the bank for {', '.join(missing)} (needed by {' '.join(tokens)!r})")
        if writer is None:
            writer = self.choose_writer(written, rng)
        box = _Writer(self, rng, writer).row(atoms, 1.0)
        if not box.strokes:
            raise ValueError(f"nothing to write in {' '.join(tokens)!r}")
        return box.strokes, box.labels

    def __call__(self, tokens: Sequence[str], rng: np.random.Generator, writer: str | None = None) -> list[np.ndarray]:
        """The strokes of `tokens` (see `layout`)."""
        return self.layout(tokens, rng, writer)[0]


def compose_layout(
    tokens: Sequence[str], bank: InkBank, rng: np.random.Generator, writer: str | None = None
) -> list[np.ndarray]:
    """Lays out one canonical token list with `bank` ink (a one-off `FormulaLayout`)."""
    return FormulaLayout(bank)(tokens, rng, writer=writer)


class FormulaComposer:
    """Generator B: a random new formula, written in one writer's hand where the bank allows.

    Args:
        bank: the ink bank (built from the training part only).
        lengths: token lengths to follow (the training part's); default: a fitted distribution.

    Calling it with a `numpy.random.Generator` returns (strokes, tokens): float32 arrays of
    shape (N, 2) in line units (y down) and the canonical token list. The same rng state gives
    the same sample.
    """

    def __init__(self, bank: InkBank, lengths: Sequence[int] | None = None):
        self.bank = bank
        counts = {label: geometry.count for label, geometry in bank.geometry.items()}
        self.grammar = FormulaGrammar(bank.labels, counts, lengths)
        self.layout = FormulaLayout(bank)

    def __call__(self, rng: np.random.Generator, length: int | None = None) -> tuple[list[np.ndarray], list[str]]:
        """A sample of `length` tokens (as close as the grammar allows; default: a length drawn from `lengths`)."""
        tokens = self.grammar(rng, length)
        return self.layout(tokens, rng), tokens
