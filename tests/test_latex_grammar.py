"""The LaTeX grammar (modeling_hmer/latex_grammar.py) and decoding constrained by it.

What must hold: every normalized CROHME caption is in the grammar (read either way), so the constraint never
forbids a right answer; everything in the grammar typesets in KaTeX; and what a model decodes under it (random
weights, both decoders, greedy, beam, right-to-left, bidirectional) is in it, where without it it is not.
The full measurement on the shipped model and both CROHME test sets is `train.evaluate_model` followed by
`python -m train.katex_check` on its predictions (see README.md).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from modeling_hmer import HMERConfig, HMERForConditionalGeneration, normalize
from modeling_hmer.latex_grammar import LatexGrammar, LatexGrammarLogitsProcessor, is_well_formed
from modeling_hmer.tokenization_hmer import default_vocab
from train.katex_check import katex_bundle, typeset_errors

CROHME_DIR = Path(__file__).resolve().parents[2] / "shared" / "crohme"
VOCAB = default_vocab()
NAMES = {i: t for t, i in VOCAB.items()}
EOS = VOCAB["</s>"]
L2R = LatexGrammar(VOCAB, EOS)
R2L = LatexGrammar(VOCAB, EOS, reverse=True)
needs_katex = pytest.mark.skipif(katex_bundle() is None, reason="needs node and the KaTeX bundle shipped with gradio")

WELL_FORMED = [
    "x ^ { 2 }", "\\frac { a } { b }", "\\frac { } { 2 }", "\\sqrt { x }", "\\sqrt [ 3 ] { x }", "x _ { i } ^ { 2 }",
    "^ { 2 } x", "[ a ] ^ { 2 }", "\\sqrt [ x ^ { \\sqrt [ 3 ] { x } } ] { y }", "\\sqrt [ x ^ { [ } ] { y }", "( ] [",
    "\\frac { \\sqrt { x } } { 2 } _ { 1 } ^ { 2 }", "\\sum _ { i = 1 } ^ { n } i", "", "x _ { a } y _ { b }",
]
ILL_FORMED = [
    "\\sqrt { 1 + \\sqrt { 2 + m }",  # the Space's unbalanced example
    "x ^ 2", "x ^ { }", "\\frac { a }", "\\frac { a } b", "\\sqrt 2", "\\sqrt [ ] { x }", "\\sqrt [ 3 { x }",
    "x _ { a } _ { b }", "x ^ { a } ^ { b }", "x ^ { a } _ { b }", "{ x }", "x }", "x ^", "\\frac", "x \\limits",
    "x '", "\\frac { a } { b } { c }", "\\sqrt [ [ ] { x }", "\\sqrt [ \\sqrt [ 3 ] { x } ] { y }",
]


def ids(latex: str) -> list[int]:
    return [VOCAB[t] for t in latex.split()]


@pytest.mark.parametrize("latex", WELL_FORMED)
def test_well_formed_is_accepted_in_both_directions(latex):
    assert L2R.accepts(ids(latex)) and R2L.accepts(ids(latex)[::-1]) and is_well_formed(latex.split())


@pytest.mark.parametrize("latex", ILL_FORMED)
def test_ill_formed_is_refused_in_both_directions(latex):
    assert not L2R.accepts(ids(latex)) and not R2L.accepts(ids(latex)[::-1]) and not is_well_formed(latex.split())


def random_walk(grammar: LatexGrammar, rng: random.Random, length: int) -> list[int]:
    """A random sequence the grammar allows, ending where it is complete (eos not included)."""
    state, out = grammar.start(), []
    while True:
        allowed = grammar.allowed(state).nonzero().flatten().tolist()
        if EOS in allowed and (len(out) >= length or rng.random() < 0.05):
            return out
        allowed = [t for t in allowed if t != EOS] if len(out) < 3 * length else \
            [t for t in allowed if t == EOS or grammar.closing_cost(grammar.step(state, t)) < grammar.closing_cost(state)]
        token = rng.choice(allowed)
        out.append(token)
        state = grammar.step(state, token)


def test_both_directions_accept_the_same_sequences():
    """Random sentences of one direction, read by the other, and random one-token edits of them."""
    rng = random.Random(0)
    structural = [VOCAB[t] for t in ("{", "}", "^", "_", "\\frac", "\\sqrt", "[", "]", "x")]
    for trial in range(400):
        grammar, other = (L2R, R2L) if trial % 2 == 0 else (R2L, L2R)
        sentence = random_walk(grammar, rng, rng.randint(1, 30))
        assert other.accepts(sentence[::-1]), [NAMES[t] for t in sentence]
        edited = list(sentence)
        position = rng.randrange(len(edited) + 1)
        if edited and rng.random() < 0.5:
            del edited[min(position, len(edited) - 1)]
        else:
            edited.insert(position, rng.choice(structural))
        assert grammar.accepts(edited) == other.accepts(edited[::-1]), [NAMES[t] for t in edited]


@pytest.mark.skipif(not (CROHME_DIR / "seed_captions").is_dir(), reason="needs ../shared/crohme/seed_captions")
def test_every_crohme_caption_is_in_the_grammar():
    """The constraint must never forbid a right answer: all 9,821 normalized captions, read either way."""
    refused = []
    for name in ("train_caption.txt", "test_caption.txt"):
        for line in (CROHME_DIR / "seed_captions" / name).read_text(encoding="utf-8").splitlines():
            tokens = normalize(line.partition("\t")[2])
            if not (L2R.accepts(ids(" ".join(tokens))) and R2L.accepts(ids(" ".join(tokens))[::-1])):
                refused.append(" ".join(tokens))
    assert refused == []


@needs_katex
def test_everything_in_the_grammar_typesets_in_katex():
    rng = random.Random(1)
    formulas = WELL_FORMED + [" ".join(NAMES[t] for t in random_walk(L2R, rng, rng.randint(1, 40)))
                              for _ in range(300)]
    failed = [(f, e) for f, e in zip(formulas, typeset_errors(formulas)) if e is not None]
    assert failed == []


def test_processor_masks_by_prefix_and_direction():
    bos, r2l_start = VOCAB["<s>"], EOS
    processor = LatexGrammarLogitsProcessor(VOCAB, EOS, r2l_start_token_id=r2l_start)
    input_ids = torch.tensor([[bos, VOCAB["x"], VOCAB["^"]], [r2l_start, VOCAB["}"], VOCAB["x"]]])
    scores = processor(input_ids, torch.zeros(2, len(VOCAB)))
    assert (scores[0] == 0).nonzero().flatten().tolist() == [VOCAB["{"]]  # `x ^` needs its group
    allowed_r2l = {NAMES[i] for i in (scores[1] == 0).nonzero().flatten().tolist()}
    assert "{" in allowed_r2l and EOS not in allowed_r2l and "}" in allowed_r2l
    # near max_new_tokens, open groups must close: `\frac {` with 3 tokens left can only be `} { }`
    closing = LatexGrammarLogitsProcessor(VOCAB, EOS, max_new_tokens=5)
    scores = closing(torch.tensor([[bos, VOCAB["\\frac"], VOCAB["{"]]]), torch.zeros(1, len(VOCAB)))
    assert (scores[0] == 0).nonzero().flatten().tolist() == [VOCAB["}"]]


TINY = dict(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, hidden_size=32, embedding_size=32,
            attention_dim=32, coverage_channels=8, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64)


def random_model(decoder: str, seed: int) -> HMERForConditionalGeneration:
    """Random weights with the structural tokens made likely, so that unconstrained output is ill-formed."""
    torch.manual_seed(seed)
    model = HMERForConditionalGeneration(HMERConfig(decoder=decoder, **TINY)).eval()
    with torch.no_grad():
        head = model.decoder.lm_head
        head.bias.zero_()
        head.bias[[VOCAB[t] for t in ("{", "}", "^", "_", "\\frac", "\\sqrt", "[", "]")]] = 2.0
        head.bias[EOS] = 1.0
    return model


@pytest.mark.parametrize("decoder,settings", [
    ("gru", dict(num_beams=1)),
    ("gru", dict(num_beams=4, num_return_sequences=4)),
    ("transformer", dict(num_beams=1)),
    ("transformer", dict(num_beams=3, num_return_sequences=3, bidirectional_rescoring=True)),
    ("transformer", dict(num_beams=3, num_return_sequences=3, bidirectional_rescoring=False)),
])
def test_constrained_decoding_writes_only_well_formed_latex(decoder, settings):
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(6, 1, 48, 96, generator=generator) > 0.8).float()
    outputs = {}
    for grammar in (True, False):
        model = random_model(decoder, seed=11)
        sequences = model.generate(pixels, max_new_tokens=25, latex_grammar=grammar, **settings)
        outputs[grammar] = [[t for t in row if t not in (0, EOS)] for row in sequences.tolist()]
    assert all(L2R.accepts(row) for row in outputs[True]), [" ".join(NAMES[t] for t in r) for r in outputs[True]]
    assert not all(L2R.accepts(row) for row in outputs[False])  # the test can fail: unconstrained, it is not
    if decoder == "transformer":  # the right-to-left search alone, as bidirectional decoding runs it
        model = random_model(decoder, seed=11)
        with torch.no_grad():
            static = model.decoder.prepare(*model.encode(pixels))
            starts = torch.full((6,), model.config.r2l_start_token_id)
            processors = model._logits_processors(model.generation_config, 25, 0, None, None)
            found = model._beam_search(static, starts, 3, False, max_new_tokens=25, processors=processors)
        rows = [[t for t in row if t not in (0, EOS)] for row in found["tokens"].tolist()]
        assert all(R2L.accepts(row) for row in rows) and all(L2R.accepts(row[::-1]) for row in rows)


def test_sequences_cut_by_max_new_tokens_are_closed():
    """With eos forbidden until the last step (as in train.bench), the grammar still closes every group."""
    model = random_model("gru", seed=5)
    pixels = (torch.rand(4, 1, 48, 96, generator=torch.Generator().manual_seed(4)) > 0.8).float()
    for beams in (1, 3):
        sequences = model.generate(pixels, num_beams=beams, max_new_tokens=12, min_new_tokens=12)
        assert sequences.shape[1] == 12
        assert all(L2R.accepts([t for t in row if t != 0]) for row in sequences.tolist())


@needs_katex
def test_constrained_output_of_the_shipped_model_typesets():
    """The shipped checkpoint, greedy and beam 5, on the Space's example drawings and a few harder strokes."""
    from PIL import Image, ImageDraw

    from modeling_hmer import HMERProcessor

    folder = Path(__file__).resolve().parents[1] / "checkpoints"
    model = HMERForConditionalGeneration.from_pretrained(folder).eval()
    processor = HMERProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("L") for p in sorted((folder.parent / "space" / "examples").glob("*.png"))]
    scribble = Image.new("L", (400, 160), 255)  # no formula at all: whatever comes out must still typeset
    ImageDraw.Draw(scribble).line([(20, 80), (90, 20), (150, 140), (230, 30), (300, 120), (380, 60)], fill=0, width=6)
    images.append(scribble)
    inputs = processor(images=images)
    formulas = []
    for beams in (1, 5):
        formulas += processor.batch_decode(model.generate(**inputs, num_beams=beams))
    assert all(is_well_formed(f.split()) for f in formulas), formulas
    assert typeset_errors(formulas) == [None] * len(formulas)
