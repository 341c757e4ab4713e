"""Does LaTeX typeset? KaTeX (the copy gradio ships, run by node) over a list of formulas or prediction files.

    python -m train.katex_check results/test_2014.predictions.tsv results/test_2016.predictions.tsv
    python -m train.katex_check --column reference results/test_2014.predictions.tsv

A predictions file is the TSV `train.evaluate_model --output_json` writes next to its JSON (name, reference,
prediction, distance). Prints, per file, how many formulas typeset and the ones that do not with KaTeX's
message; the exit code is 1 when any fails. Needs `node` and gradio's frontend (the `space` extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

# Renders every formula of a JSON list; prints a JSON list of error messages (null where it typeset).
_CHECK_SCRIPT = """import katex from './katex.mjs';
import fs from 'fs';
const errors = JSON.parse(fs.readFileSync(process.argv[2])).map((latex) => {
  try { katex.renderToString(latex, {throwOnError: true, displayMode: true}); return null; }
  catch (err) { return err.message; }
});
console.log(JSON.stringify(errors));
"""


def katex_bundle() -> Optional[Path]:
    """The KaTeX ES module in gradio's frontend, or None without gradio or node."""
    try:
        import gradio
    except ImportError:
        return None
    bundles = sorted((Path(gradio.__file__).parent / "templates" / "frontend" / "assets").glob("katex-*.js"))
    return bundles[0] if bundles and shutil.which("node") else None


def typeset_errors(formulas: Sequence[str], timeout: float = 300) -> list[Optional[str]]:
    """KaTeX's error message for each formula, None where it typesets (display mode, errors thrown)."""
    bundle = katex_bundle()
    if bundle is None:
        raise RuntimeError("typesetting needs node and gradio (its frontend ships KaTeX): pip install -e '.[space]'")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        shutil.copy(bundle, folder / "katex.mjs")
        (folder / "check.mjs").write_text(_CHECK_SCRIPT)
        (folder / "formulas.json").write_text(json.dumps(list(formulas)))
        run = subprocess.run(["node", str(folder / "check.mjs"), str(folder / "formulas.json")],
                             capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"node failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout)


def read_predictions(path: Path, column: str = "prediction") -> list[tuple[str, str]]:
    """(name, formula) of each row of an evaluate_model predictions TSV."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and column not in rows[0]:
        raise SystemExit(f"{path} has no column {column!r} (columns: {', '.join(rows[0])})")
    return [(row["name"], row[column]) for row in rows]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="predictions TSV files of train.evaluate_model")
    parser.add_argument("--column", default="prediction", help="column to typeset (default: prediction)")
    args = parser.parse_args(argv)
    failed_any = False
    for path in args.files:
        rows = read_predictions(path, args.column)
        errors = typeset_errors([formula for _, formula in rows])
        failed = [(name, formula, error) for (name, formula), error in zip(rows, errors) if error is not None]
        print(f"{path}: {len(rows) - len(failed)} of {len(rows)} typeset in KaTeX")
        for name, formula, error in failed:
            print(f"  {name}\t{formula}\t{error}")
        failed_any = failed_any or bool(failed)
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
