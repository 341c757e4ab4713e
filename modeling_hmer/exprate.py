"""Expression recognition metrics for HMER, as an `evaluate` module.

The project's one metric: training, the evaluation CLI and the benchmarks all load it with

    >>> import evaluate
    >>> from modeling_hmer import exprate
    >>> metric = evaluate.load(exprate.__file__)
    >>> metric.compute(predictions=["x ^ { 2 }"], references=["x ^ { 2 }"])["exprate"]
    1.0

Predictions and references are token sequences written as space-separated strings (what
`HMERTokenizer.decode` returns) or lists of tokens. Figures (fractions in [0, 1]):

- `exprate`: share of expressions whose predicted tokens equal the reference exactly;
- `le1`, `le2`, `le3`: share with a token edit distance of at most 1, 2, 3;
- `ser`: symbol error rate, total token edit distance / total reference tokens (the seed's "WER");
- `n`: number of expressions scored.

The module imports only `datasets` and `evaluate` (one import per line, as `evaluate` requires) so
it also loads where the package is not installed.
"""

import datasets
import evaluate

_CITATION = """\
@inproceedings{mouchere2016crohme,
  title={ICFHR2016 CROHME: Competition on Recognition of Online Handwritten Mathematical Expressions},
  author={Mouch{\\`e}re, Harold and Viard-Gaudin, Christian and Zanibbi, Richard and Garain, Utpal},
  booktitle={ICFHR},
  year={2016}
}
"""

_DESCRIPTION = """\
Expression rate (exact match of the token sequence), the share of expressions within 1, 2 and 3
token edits, and the symbol error rate, as reported for handwritten mathematical expression
recognition on CROHME.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted token sequences (space-separated strings or lists of tokens).
    references: list of reference token sequences, same form.
Returns:
    exprate, le1, le2, le3, ser (floats in [0, 1]) and n (int).
Examples:
    >>> metric = evaluate.load("modeling_hmer/exprate.py")
    >>> metric.compute(predictions=["a + b", "x"], references=["a + b", "y"])
    {'exprate': 0.5, 'le1': 1.0, 'le2': 1.0, 'le3': 1.0, 'ser': 0.25, 'n': 2}
"""


def edit_distance(a, b) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, token_a in enumerate(a, start=1):
        current = [i]
        for j, token_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token_a != token_b)))
        previous = current
    return previous[-1]


def _as_tokens(sequence):
    return sequence.split() if isinstance(sequence, str) else list(sequence)


def compute_scores(predictions, references) -> dict:
    """The metric's figures as a plain function (what `evaluate`'s `compute` returns)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        return {"exprate": 0.0, "le1": 0.0, "le2": 0.0, "le3": 0.0, "ser": 0.0, "n": 0}
    distances = []
    reference_tokens = 0
    for prediction, reference in zip(predictions, references):
        reference = _as_tokens(reference)
        distances.append(edit_distance(_as_tokens(prediction), reference))
        reference_tokens += len(reference)
    return {
        "exprate": sum(d == 0 for d in distances) / n,
        "le1": sum(d <= 1 for d in distances) / n,
        "le2": sum(d <= 2 for d in distances) / n,
        "le3": sum(d <= 3 for d in distances) / n,
        "ser": sum(distances) / max(reference_tokens, 1),
        "n": n,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HMERExpRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("string")),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
            ],
        )

    def _compute(self, predictions, references):
        return compute_scores(predictions, references)
