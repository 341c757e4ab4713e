"""Latency of the Space: time from request to answer, median and 95th percentile.

Starts space/app.py on 127.0.0.1 in this process and sends requests one at a time with gradio_client
to the `/recognize` endpoint (image file in, LaTeX and candidates out), cycling through the drawings
in space/examples/ (made on the sketch pad by the browser test). The page's own events (the
Recognize buttons) are private, so no client can call them: tests/test_space_browser.py drives them
in a browser instead.

Without a trained model (no --model, no checkpoints/), a model with the default architecture
(densenet-b encoder, GRU decoder) and random weights is used; since random weights stop at random
lengths, its output length is fixed with --tokens (a trained model decides it alone).

    python space/bench_latency.py --requests 40 --num_beams 1 5 [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def random_model(folder: Path, tokens: int) -> Path:
    """Default-architecture model with random weights whose outputs are exactly `tokens` long (eos included)."""
    import torch

    from modeling_hmer import HMERConfig, HMERForConditionalGeneration, HMERImageProcessor, HMERProcessor, HMERTokenizer

    torch.manual_seed(0)
    model = HMERForConditionalGeneration(HMERConfig()).eval()
    model.generation_config.min_new_tokens = tokens - 1
    model.generation_config.max_new_tokens = tokens
    model.save_pretrained(folder)
    HMERProcessor(HMERImageProcessor(), HMERTokenizer()).save_pretrained(folder)
    return folder


def load_app():
    spec = importlib.util.spec_from_file_location("hmer_space_app", HERE / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hmer_space_app"] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: HMER_MODEL, checkpoints/, "
                        "else random weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (app.py's default: 1)")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per setting")
    parser.add_argument("--num_beams", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--tokens", type=int, default=12, help="output length of the random-weight model")
    parser.add_argument("--images", nargs="*", default=None, help="drawings to send (default: space/examples/*.png)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = load_app()
    from gradio_client import Client, handle_file

    images = args.images or [str(p) for p in sorted((HERE / "examples").glob("*.png"))]
    if not images:
        parser.error("no drawings: give --images or create space/examples/*.png")

    workdir = tempfile.TemporaryDirectory()
    try:
        model_path, weights = app.find_model(args.model), "trained"
    except FileNotFoundError:  # ModelNotFoundError
        model_path, weights = str(random_model(Path(workdir.name), args.tokens)), f"random, {args.tokens} tokens"

    demo = app.build_demo(model_path)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True, **app.launch_kwargs())
    # The answer is there when the event's result arrives; like a browser, fetch the gallery's
    # pictures after that (not timed).
    client = Client(demo.local_url, verbose=False, download_files=False)

    def request(image: str, beams: int):
        return client.predict(handle_file(image), beams, api_name="/recognize")

    results = []
    try:
        for beams in args.num_beams:
            for image in images:  # warm-up: one of each
                request(image, beams)
            times = []
            for k in range(args.requests):
                start = time.perf_counter()
                request(images[k % len(images)], beams)
                times.append(time.perf_counter() - start)
            row = {
                "endpoint": "/recognize", "num_beams": beams, "requests": len(times),
                "median_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 95),
            }
            results.append(row)
            print(f"/recognize beam {beams:2d}: median {row['median_ms']:6.0f} ms, p95 {row['p95_ms']:6.0f} ms "
                  f"({len(times)} requests)", flush=True)
    finally:
        demo.close()
        workdir.cleanup()

    report = {
        "model": model_path if weights == "trained" else "default architecture (densenet-b + gru)",
        "weights": weights, "torch_threads": args.threads, "cpus": os.cpu_count(),
        "load_average": os.getloadavg(), "images": [Path(p).name for p in images], "results": results,
    }
    print(f"\nmodel: {report['model']} ({weights}); torch threads {args.threads}; "
          f"load average {report['load_average'][0]:.1f}")
    print("| endpoint | beam | median ms | p95 ms |\n|---|---:|---:|---:|")
    for row in results:
        print(f"| {row['endpoint']} | {row['num_beams']} | {row['median_ms']:.0f} | {row['p95_ms']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
