"""HMERProcessor, Auto classes, trust_remote_code loading without the package, push_to_hub round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from modeling_hmer import (
    HMERConfig,
    HMERForConditionalGeneration,
    HMERImageProcessor,
    HMERProcessor,
    HMERTokenizer,
)

from hub_server import HubServer


CODE_FILES = {
    "configuration_hmer.py",
    "modeling_hmer.py",
    "tokenization_hmer.py",
    "latex.py",
    "image_processing_hmer.py",
    "processing_hmer.py",
    "generation_hmer.py",
    "latex_grammar.py",
    "pipeline_hmer.py",
}

# Run first in a subprocess: removes the editable install's import hooks and the repository from the path,
# (any folder holding a modeling_hmer/ directory) and proves that `modeling_hmer` cannot be imported any more.
HIDE_PACKAGE = textwrap.dedent(
    """
    import importlib.util, os, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "modeling_hmer"))]
    sys.path_importer_cache.clear()
    if importlib.util.find_spec("modeling_hmer") is not None:
        raise SystemExit("modeling_hmer is still importable")
    """
)

# read(source, **kwargs): loads model + processor with the Auto classes and returns the greedy ids of a fixed
# image, with the modules the classes came from.
READ = textwrap.dedent(
    """
    import json, numpy as np, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
    torch.set_num_threads(1)
    def read(source, **kwargs):
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
        image = np.zeros((60, 120), np.uint8)
        image[20:40, 10:110:9] = 255
        ids = model.generate(**processor(images=image), max_new_tokens=6)
        # the random model's answers are no readings (unsure, unfinished): the expression check off
        reader = pipeline("image-to-latex", model=source, max_new_tokens=6, check_expression=False, **kwargs)
        return {"ids": ids.tolist(), "processor": type(processor).__module__, "model": type(model).__module__,
                "pipeline": type(reader).__module__, "latex": reader(image)["latex"],
                "decoded": processor.batch_decode(ids)[0]}
    """
)

REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _fixed_image() -> np.ndarray:
    image = np.zeros((60, 120), np.uint8)
    image[20:40, 10:110:9] = 255
    return image


def _expected_ids(folder) -> list:
    torch.set_num_threads(1)
    model = HMERForConditionalGeneration.from_pretrained(folder).eval()
    processor = HMERProcessor.from_pretrained(folder)
    return model.generate(**processor(images=_fixed_image()), max_new_tokens=6).tolist()


def _run_python(code: str, cwd, env_extra: dict, timeout: int = 240) -> dict:
    """Runs `code` in a fresh interpreter (no PYTHONPATH, cwd outside the repository); returns RESULT's JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_ENDPOINT")}
    env.update({"HF_HOME": str(Path(cwd) / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}, **env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------- processor


@pytest.fixture(scope="module")
def processor():
    return HMERProcessor(HMERImageProcessor(), HMERTokenizer())


def test_processor_images_and_text(processor, draw_expression):
    batch = processor(images=[draw_expression(), draw_expression(zoom=30)], text=["x^2+1=y", "\\frac a b"])
    assert set(batch) == {"pixel_values", "pixel_mask", "labels"}
    assert batch["pixel_values"].shape[:2] == (2, 1)
    assert batch["pixel_mask"].shape == (2, *batch["pixel_values"].shape[2:])
    labels = batch["labels"]
    assert labels.dtype == torch.int64
    tokenizer = processor.tokenizer
    first = tokenizer("x^2+1=y")["input_ids"]
    second = tokenizer("\\frac a b")["input_ids"]
    assert labels.shape == (2, max(len(first), len(second)))
    assert labels[0, : len(first)].tolist() == first and first[-1] == tokenizer.eos_token_id
    assert labels[1, : len(second)].tolist() == second
    assert (labels[0, len(first) :] == -100).all() and (labels[1, len(second) :] == -100).all()
    assert tokenizer.bos_token_id not in labels.tolist()[0]
    assert processor.batch_decode(labels) == ["x ^ { 2 } + 1 = y", "\\frac { a } { b }"]


def test_processor_text_only_and_errors(processor, draw_expression):
    batch = processor(text="\\sqrt{2}")
    assert set(batch) == {"labels"} and batch["labels"].shape[0] == 1
    assert processor.decode(batch["labels"][0]) == "\\sqrt { 2 }"
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        processor(images=[draw_expression(), draw_expression()], text=["x"])
    with pytest.raises(ValueError, match="images, text or both"):
        processor()
    with pytest.raises(ValueError, match="blank"):
        processor(images=np.full((40, 40), 255, np.uint8))
    assert processor.model_input_names == ["pixel_values", "pixel_mask"]


def test_processor_save_load(tmp_path, draw_expression):
    processor = HMERProcessor(HMERImageProcessor(margin=6, max_width=900), HMERTokenizer())
    processor.save_pretrained(tmp_path)
    loaded = HMERProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, HMERImageProcessor) and isinstance(loaded.tokenizer, HMERTokenizer)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    a = processor(images=draw_expression(), text="a+b")
    b = loaded(images=draw_expression(), text="a+b")
    for key in a:
        assert torch.equal(a[key], b[key])


# ---------------------------------------------------------------------------------------------- Auto classes


def test_saved_folder_layout(tiny_model_dir):
    files = {p.name for p in Path(tiny_model_dir).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert CODE_FILES <= files
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert config["model_type"] == "hmer"
    assert config["auto_map"]["AutoConfig"] == "configuration_hmer.HMERConfig"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_hmer.HMERForConditionalGeneration"
    tokenizer_config = json.loads((Path(tiny_model_dir) / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_hmer.HMERTokenizer"
    processor_config = json.loads((Path(tiny_model_dir) / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_hmer.HMERProcessor"


def test_auto_classes_load(tiny_model_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), HMERConfig)
    assert isinstance(AutoModel.from_pretrained(tiny_model_dir), HMERForConditionalGeneration)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), HMERForConditionalGeneration)
    assert isinstance(AutoTokenizer.from_pretrained(tiny_model_dir), HMERTokenizer)
    assert isinstance(AutoImageProcessor.from_pretrained(tiny_model_dir), HMERImageProcessor)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert isinstance(processor, HMERProcessor)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    ids = model.generate(**processor(images=_fixed_image()), max_new_tokens=6)
    assert ids.tolist() == _expected_ids(tiny_model_dir)


@pytest.fixture(scope="module")
def hub_and_remote(tiny_model_dir, tmp_path_factory):
    """Two fresh interpreters against a local Hub look-alike (each costs a torch + transformers import):

    1. with the package: push_to_hub("user/tiny-hmer") of model and processor, then load them by repo id;
    2. without the package: load a copy of the saved folder, and the Hub repository, with trust_remote_code.
    """
    work = tmp_path_factory.mktemp("hub")
    copied = work / "copied_model"
    shutil.copytree(tiny_model_dir, copied)
    with HubServer() as hub:
        hub_env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "0"}
        push = textwrap.dedent(
            f"""
            from modeling_hmer import HMERForConditionalGeneration, HMERProcessor
            HMERForConditionalGeneration.from_pretrained({str(tiny_model_dir)!r}).push_to_hub("user/tiny-hmer")
            HMERProcessor.from_pretrained({str(tiny_model_dir)!r}).push_to_hub("user/tiny-hmer")
            print("RESULT", json.dumps(read("user/tiny-hmer")))
            """
        )
        (work / "a").mkdir()
        # this checkout's package (not whichever one is pip-installed)
        with_package = _run_python(READ + push, work / "a", {**hub_env, "PYTHONPATH": REPO_ROOT})
        (work / "b").mkdir()
        remote = textwrap.dedent(
            f"""
            local = read({str(copied)!r}, trust_remote_code=True)
            hub = read("user/tiny-hmer", trust_remote_code=True)
            print("RESULT", json.dumps({{"local": local, "hub": hub}}))
            """
        )
        without_package = _run_python(f"REPO = {REPO_ROOT!r}\n" + HIDE_PACKAGE + READ + remote, work / "b", hub_env)
        files = dict(hub.repos["user/tiny-hmer"].files)
        unknown = list(hub.unknown)
    return {"with_package": with_package, "files": files, "unknown": unknown, **without_package}


def test_trust_remote_code_without_the_package(hub_and_remote, tiny_model_dir):
    """A copy of the saved folder loads in an interpreter where `modeling_hmer` cannot be imported."""
    result = hub_and_remote["local"]
    assert result["model"].startswith("transformers_modules.")  # the folder's own code, not the package
    assert result["processor"].startswith("transformers_modules.")
    assert result["ids"] == _expected_ids(tiny_model_dir)
    # and the pipeline the folder's config names: pipeline("image-to-latex", model=folder, trust_remote_code=True)
    assert result["pipeline"].startswith("transformers_modules.") and result["latex"] == result["decoded"]


def test_hiding_the_package_works(tmp_path):
    """The subprocess recipe really hides the package (else the test above proves nothing)."""
    code = f"REPO = {REPO_ROOT!r}\n" + HIDE_PACKAGE + "\ntry:\n    import modeling_hmer\nexcept ImportError:\n    print('RESULT {\"hidden\": true}')\n"
    assert _run_python(code, tmp_path, {"HF_HUB_OFFLINE": "1"}) == {"hidden": True}


# ---------------------------------------------------------------------------------------------- Hub


def test_push_to_hub_and_load_by_repo_id(hub_and_remote, tiny_model_dir):
    """push_to_hub to the local Hub, then from_pretrained("user/tiny-hmer"), with and without the package."""
    files = hub_and_remote["files"]
    assert {"config.json", "model.safetensors", "processor_config.json", "vocab.json"} <= set(files)
    assert CODE_FILES <= set(files)
    assert files["model.safetensors"] == (Path(tiny_model_dir) / "model.safetensors").read_bytes()
    assert not hub_and_remote["unknown"], f"routes the test hub does not serve: {hub_and_remote['unknown']}"
    expected = _expected_ids(tiny_model_dir)
    assert hub_and_remote["with_package"]["ids"] == expected
    assert hub_and_remote["with_package"]["model"] == "modeling_hmer.modeling_hmer"
    # with the package, the registered pipeline serves a Hub id without trust_remote_code
    assert hub_and_remote["with_package"]["pipeline"] == "modeling_hmer.pipeline_hmer"
    assert hub_and_remote["with_package"]["latex"] == hub_and_remote["with_package"]["decoded"]
    assert hub_and_remote["hub"]["pipeline"].startswith("transformers_modules.")
    assert hub_and_remote["hub"]["ids"] == expected
    assert hub_and_remote["hub"]["model"].startswith("transformers_modules.")
