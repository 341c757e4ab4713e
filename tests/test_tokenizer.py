"""HMERTokenizer: vocabulary layout, normalization of raw LaTeX, unknown symbols, save/load, captions."""

import json
from pathlib import Path

import pytest

from modeling_hmer import tokenization_hmer
from modeling_hmer.latex import CROHME_SYMBOLS, normalize
from modeling_hmer.tokenization_hmer import HMERTokenizer

CROHME_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "crohme"


@pytest.fixture(scope="module")
def tokenizer():
    return HMERTokenizer()


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == 114
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(CROHME_SYMBOLS) == list(range(4, 114))


def test_raw_latex_is_normalized_and_ends_with_eos(tokenizer):
    ids = tokenizer("\\frac{a}{b}").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[:-1]) == ["\\frac", "{", "a", "}", "{", "b", "}"]
    # every spelling of the same expression gives the same ids
    for spelling in ["$\\frac a b$", "\\frac {a} b", "\\left. \\frac{{a}}{b} \\right."]:
        assert tokenizer(spelling).input_ids == ids, spelling


def test_decode_gives_space_separated_latex(tokenizer):
    ids = tokenizer("x_1^{2} \\lt \\sqrt[3]{64.4}").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x _ { 1 } ^ { 2 } < \\sqrt [ 3 ] { 6 4 . 4 }"
    assert tokenizer.decode(ids).endswith("</s>")


def test_special_token_strings_are_latex(tokenizer):
    # `a<s>b` is "a < s > b", not a bos token between a and b
    assert tokenizer.tokenize("a<s>b") == ["a", "<", "s", ">", "b"]
    assert tokenizer.bos_token_id not in tokenizer("a<s>b").input_ids


def test_unknown_symbols_become_unk_with_a_warning(tokenizer, monkeypatch):
    warnings = []
    monkeypatch.setattr(tokenization_hmer.logger, "warning", lambda message, *a, **k: warnings.append(message))
    ids = tokenizer("\\epsilon + \\aleph_0").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<unk>", "+", "<unk>", "_", "{", "0", "}", "</s>"]
    assert len(warnings) == 1 and "\\epsilon" in warnings[0] and "\\aleph" in warnings[0]
    assert tokenizer.convert_ids_to_tokens(999) == "<unk>"


def test_batch_padding(tokenizer):
    batch = tokenizer(["x", "\\frac 1 2"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 8)
    assert batch.input_ids[0].tolist() == [tokenizer.convert_tokens_to_ids("x"), 2] + [0] * 6
    assert batch.attention_mask[0].tolist() == [1, 1] + [0] * 6
    assert tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True) == ["x", "\\frac { 1 } { 2 }"]


def test_save_and_load_round_trip(tokenizer, tmp_path):
    files = tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and any(str(f).endswith("vocab.json") for f in files)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and vocab["\\geq"] == 4 and len(vocab) == 114
    loaded = HMERTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    text = "\\sum_{i=1}^n x_i'"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.eos_token_id == 2 and loaded.special_tokens_pattern == "eos"


def test_save_vocabulary_with_prefix_and_custom_vocab(tokenizer, tmp_path):
    (path,) = tokenizer.save_vocabulary(str(tmp_path), filename_prefix="hmer")
    assert Path(path).name == "hmer-vocab.json"
    assert HMERTokenizer(vocab_file=path).get_vocab() == tokenizer.get_vocab()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 5}))
    with pytest.raises(ValueError, match="ids"):
        HMERTokenizer(vocab_file=bad)
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2}))
    with pytest.raises(ValueError, match="<unk>"):
        HMERTokenizer(vocab_file=small)


@pytest.mark.skipif(not (CROHME_DIR / "seed_captions").is_dir(), reason=f"CROHME captions not found at {CROHME_DIR}")
def test_every_training_caption_survives_tokenize_decode_tokenize(tokenizer):
    lines = (CROHME_DIR / "seed_captions" / "train_caption.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8835
    for line in lines:
        name, _, caption = line.partition("\t")
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids, name
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded == " ".join(normalize(caption)), name
        assert tokenizer(decoded).input_ids == ids, name


def _katex_bundle():
    """The KaTeX ES module that gradio ships, if gradio and node are installed."""
    import shutil

    try:
        import gradio
    except ImportError:
        return None
    bundles = sorted((Path(gradio.__file__).parent / "templates" / "frontend" / "assets").glob("katex-*.js"))
    return bundles[0] if bundles and shutil.which("node") else None


@pytest.mark.skipif(_katex_bundle() is None, reason="needs node and the KaTeX bundle shipped with gradio")
def test_decoded_latex_renders_in_katex(tokenizer, tmp_path):
    import shutil
    import subprocess

    texts = ["\\frac {\\sqrt x} 2", "\\sqrt[3]{x}", "f''(x)", "\\left\\{ x \\right\\}", "\\lim_{x\\to0}",
             "|x \\parallel y|", "\\int\\limits_0^1 x dx \\ldots \\cdots", "A^2_k \\geq \\Delta", "{}_{14}C"]
    if (CROHME_DIR / "seed_captions").is_dir():
        lines = (CROHME_DIR / "seed_captions" / "test_caption.txt").read_text(encoding="utf-8").splitlines()
        texts += [line.partition("\t")[2] for line in lines]
    decoded = [tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) for text in texts]
    shutil.copy(_katex_bundle(), tmp_path / "katex.mjs")
    (tmp_path / "inputs.json").write_text(json.dumps(decoded))
    (tmp_path / "check.mjs").write_text(
        "import katex from './katex.mjs';\nimport fs from 'fs';\n"
        "const failed = [];\n"
        "for (const e of JSON.parse(fs.readFileSync(process.argv[2]))) {\n"
        "  try { katex.renderToString(e, {throwOnError: true}); } catch (err) { failed.push(e + ' : ' + err.message); }\n"
        "}\n"
        "console.log(JSON.stringify(failed));\n"
    )
    result = subprocess.run(["node", str(tmp_path / "check.mjs"), str(tmp_path / "inputs.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
