"""The shipped checkpoint in checkpoints/: complete, small, loadable, and used by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_hmer import HMERForConditionalGeneration, HMERProcessor, predict

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO_ROOT / "checkpoints"
EXAMPLES = sorted((REPO_ROOT / "space" / "examples").glob("*.png"))


def test_folder_is_complete_and_small():
    names = {p.name for p in CHECKPOINT.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "README.md"):
        assert required in names, f"checkpoints/ lacks {required}"
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names), "weights must be safetensors only"
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 25 * 2**20
    assert json.loads((CHECKPOINT / "config.json").read_text())["model_type"] == "hmer"
    card = (CHECKPOINT / "README.md").read_text()
    assert "ExpRate" in card and "Reproduce" in card


def test_shipped_code_is_the_package_code():
    """checkpoints/*.py are what trust_remote_code runs: byte for byte the package files save_pretrained copies
    (`make checkpoint-code` refreshes them), and config.json names the pipeline they hold."""
    from modeling_hmer.checkpoint_code import code_files

    files = code_files()
    assert {p.name for p in CHECKPOINT.glob("*.py")} == {p.name for p in files}, "run `make checkpoint-code`"
    stale = [p.name for p in files if (CHECKPOINT / p.name).read_bytes() != p.read_bytes()]
    assert stale == [], f"checkpoints/ holds old copies of {stale}: run `make checkpoint-code`"
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["custom_pipelines"]["image-to-latex"]["impl"] == "pipeline_hmer.HMERImageToLatexPipeline"


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return HMERForConditionalGeneration.from_pretrained(CHECKPOINT).eval(), HMERProcessor.from_pretrained(CHECKPOINT)


def test_recognizes_the_space_examples(shipped):
    model, processor = shipped
    assert EXAMPLES, "space/examples holds the project's drawings"
    images = [Image.open(p) for p in EXAMPLES]
    inputs = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, num_beams=3, max_new_tokens=60, return_dict_in_generate=True)
    for sequence, latex in zip(output.sequences, processor.batch_decode(output.sequences)):
        assert latex.strip(), "a trained model writes something for a clear drawing"
        assert (sequence == model.config.eos_token_id).any(), "decoding ends with eos, not at the length limit"


def test_prediction_cli_uses_it_by_default(capsys):
    assert predict.DEFAULT_MODEL_DIR == CHECKPOINT
    assert predict.main([str(EXAMPLES[0])]) == 0
    name, latex = capsys.readouterr().out.splitlines()[0].split("\t")
    assert name == str(EXAMPLES[0]) and latex.strip()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_decoding_reads_each_image_as_alone(shipped, num_beams):
    """Rows that finish early leave the batch: the others must read on exactly as if decoded alone."""
    model, processor = shipped
    images = [Image.open(p) for p in EXAMPLES]
    kwargs = dict(num_beams=num_beams, max_new_tokens=60, return_dict_in_generate=True, output_attentions=True)
    with torch.inference_mode():
        batched = model.generate(**processor(images=images, return_tensors="pt"), **kwargs)
        alone = [model.generate(**processor(images=image, return_tensors="pt"), **kwargs) for image in images]
    lengths = [int((out.sequences[0] != model.config.pad_token_id).sum()) for out in alone]
    assert len(set(lengths)) > 1, "the examples end at different steps, so some rows finish early"
    for i, out in enumerate(alone):
        assert batched.sequences[i, : lengths[i]].tolist() == out.sequences[0, : lengths[i]].tolist()
        assert (batched.sequences[i, lengths[i]:] == model.config.pad_token_id).all()
        assert torch.allclose(batched.sequences_scores[i], out.sequences_scores[0], atol=1e-4)
        assert torch.allclose(batched.attentions[i], out.attentions[0], atol=1e-4)
