"""The code files a saved HMER folder carries, and a command that refreshes them in one.

    python -m modeling_hmer.checkpoint_code checkpoints     # (make checkpoint-code)

`save_pretrained` copies, for each class registered with `register_for_auto_class` and for the pipeline, its
module and every module it imports relatively (`transformers.dynamic_module_utils.custom_object_save`): those
are what `trust_remote_code=True` runs. This command does the same into an existing folder without touching its
weights, and rewrites its config.json from the package's `HMERConfig` (so its `auto_map` and `custom_pipelines`
match the code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def code_classes() -> list:
    """The classes whose modules a saved folder carries (the Auto-registered ones and the pipeline)."""
    from . import HMERConfig, HMERForConditionalGeneration, HMERImageProcessor, HMERImageToLatexPipeline
    from . import HMERProcessor, HMERTokenizer

    return [HMERConfig, HMERForConditionalGeneration, HMERTokenizer, HMERImageProcessor, HMERProcessor,
            HMERImageToLatexPipeline]


def code_files() -> list[Path]:
    """The package files `save_pretrained` copies into a saved folder, each once."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files = []
    for cls in code_classes():
        module_file = Path(sys.modules[cls.__module__].__file__)
        for path in (module_file, *map(Path, get_relative_import_files(str(module_file)))):
            if path not in files:
                files.append(path)
    return files


def refresh(folder: str | Path) -> list[Path]:
    """Copy the code files into `folder` (a saved model) and rewrite its config.json; returns the files written."""
    from transformers.dynamic_module_utils import custom_object_save

    from . import HMERConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} holds no saved model (no config.json)")
    written = []
    for cls in code_classes():
        written += [Path(p) for p in custom_object_save(cls, folder)]
    HMERConfig.from_pretrained(folder).save_pretrained(folder)  # config.json (and its auto_map) from this code
    return sorted(set(written)) + [folder / "config.json"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder written by save_pretrained, e.g. checkpoints")
    args = parser.parse_args(argv)
    for path in refresh(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
