"""Training and inference speed of the HMER models on this machine.

    python -m train.bench            # both decoders, fp32 / bf16, with and without channels_last
    python -m train.bench --quick    # the default model only, fewer settings and repeats
    python -m train.bench --profile  # where the time of a training step and of greedy decoding goes
    python -m train.bench --inputs   # ms of the input path: rendering, augmentation, the image processor
    python -m train.bench --chunks --data_dir ../shared/crohme   # padding and speed of real batches per chunk size

Training: images per second of a full step (forward, backward, AdamW) on a batch of 8 images of
one size with 40-token targets. Inference: milliseconds per image to decode one image with greedy
search and with beam search (beam 10), end-of-sequence forbidden (`min_new_tokens`) so that every
run decodes exactly 40 tokens. Weights are random: only the amount of work matters here. Each figure
is the fastest of several repeats, so that a machine shared with other jobs disturbs it less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch


if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SIZES = {"64x256": (64, 256), "100x400": (100, 400), "128x512": (128, 512)}
SETTINGS = {  # name: (autocast dtype or None, channels_last)
    "fp32": (None, False),
    "fp32 + channels_last": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16 + channels_last": (torch.bfloat16, True),
}


def build_model(decoder: str, channels_last: bool, **overrides):
    from modeling_hmer.configuration_hmer import HMERConfig
    from modeling_hmer.modeling_hmer import HMERForConditionalGeneration

    torch.manual_seed(0)
    model = HMERForConditionalGeneration(HMERConfig(decoder_type=decoder, **overrides))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def fake_batch(batch_size: int, height: int, width: int, target_length: int, vocab_size: int, eos: int,
               channels_last: bool) -> dict:
    """Random ink-like images (a few dark-on-light strokes do not change the work) and targets."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = (torch.rand(batch_size, 1, height, width, generator=generator) > 0.9).float()
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(4, vocab_size, (batch_size, target_length), generator=generator)
    labels[:, -1] = eos
    return {
        "pixel_values": pixel_values,
        "pixel_mask": torch.ones(batch_size, height, width, dtype=torch.long),
        "labels": labels,
    }


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_images_per_second(model, batch: dict, dtype, steps: int, warmup: int = 1) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(dtype):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # The fastest step: on a shared machine the others measure the neighbours' load.
    return batch["labels"].shape[0] / min(times)


@torch.no_grad()
def inference_ms(model, batch: dict, dtype, num_beams: int, tokens: int, repeats: int) -> float:
    model.eval()
    pixel_values, pixel_mask = batch["pixel_values"][:1], batch["pixel_mask"][:1]
    # min_new_tokens forbids end-of-sequence, so random weights decode exactly `tokens` tokens.
    settings = {"num_beams": num_beams, "max_new_tokens": tokens, "min_new_tokens": tokens}
    with autocast(dtype):
        model.generate(pixel_values=pixel_values, pixel_mask=pixel_mask, **settings)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(pixel_values=pixel_values, pixel_mask=pixel_mask, **settings)
            times.append(time.perf_counter() - start)
    sequences = out if torch.is_tensor(out) else out.sequences
    if sequences.shape[-1] < tokens:
        print(f"  note: decoding stopped after {sequences.shape[-1]} tokens", file=sys.stderr)
    return 1000 * min(times)


def run_benchmark(decoders, settings, sizes, batch_size, target_length, train_steps, beams, repeats) -> list[dict]:
    results = []
    for decoder in decoders:
        for setting in settings:
            dtype, channels_last = SETTINGS[setting]
            model = build_model(decoder, channels_last)
            eos, vocab = model.config.eos_token_id, model.config.vocab_size
            for size in sizes:
                height, width = SIZES[size]
                batch = fake_batch(batch_size, height, width, target_length, vocab, eos, channels_last)
                row = {"decoder": decoder, "setting": setting, "size": size,
                       "train_images_per_s": train_images_per_second(model, batch, dtype, train_steps)}
                for beam in beams:
                    row[f"ms_beam{beam}"] = inference_ms(model, batch, dtype, beam, target_length, repeats)
                results.append(row)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
    return results


def format_tables(results: list[dict], sizes, beams) -> str:
    lines = []
    for decoder in dict.fromkeys(r["decoder"] for r in results):
        rows = [r for r in results if r["decoder"] == decoder]
        lines += ["", f"### {decoder} decoder: training images/s (batch of same-size images)", "",
                  "| setting | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        for setting in dict.fromkeys(r["setting"] for r in rows):
            cells = {r["size"]: r["train_images_per_s"] for r in rows if r["setting"] == setting}
            lines.append(f"| {setting} | " + " | ".join(f"{cells[s]:.1f}" for s in sizes) + " |")
        for beam in beams:
            lines += ["", f"### {decoder} decoder: inference ms per image, {'greedy' if beam == 1 else f'beam {beam}'}",
                      "", "| setting | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
            for setting in dict.fromkeys(r["setting"] for r in rows):
                cells = {r["size"]: r[f"ms_beam{beam}"] for r in rows if r["setting"] == setting}
                lines.append(f"| {setting} | " + " | ".join(f"{cells[s]:.0f}" for s in sizes) + " |")
    return "\n".join(lines)


def profile(decoder: str, size: str, batch_size: int, target_length: int, rows: int) -> None:
    """torch.profiler tables (self CPU time) of two training steps and one greedy decoding."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dtype, channels_last = SETTINGS["bf16 + channels_last"]
    model = build_model(decoder, channels_last)
    height, width = SIZES[size]
    batch = fake_batch(batch_size, height, width, target_length, model.config.vocab_size,
                       model.config.eos_token_id, channels_last)
    train_images_per_second(model, batch, dtype, steps=1)  # warm up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train_images_per_second(model, batch, dtype, steps=2, warmup=0)
    print(f"\n## training step, {decoder} decoder, batch {batch_size} of {size}, bf16 + channels_last\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    inference_ms(model, batch, dtype, 1, target_length, 1)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        inference_ms(model, batch, dtype, 1, target_length, 1)
    print(f"\n## greedy decoding of one {size} image, {target_length} tokens\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def pen_strokes(n_strokes: int = 20, seed: int = 0) -> list:
    """Random-walk pen strokes (x, y) of about a symbol each, laid out left to right like a formula."""
    import numpy as np

    rng = np.random.default_rng(seed)
    strokes = []
    for k in range(n_strokes):
        steps = rng.normal(0, 1.5, (rng.integers(15, 40), 2))
        strokes.append(np.cumsum(steps, axis=0) + [12.0 * k, 0.0])
    return strokes


def millis(function, repeats: int) -> float:
    """Fastest of `repeats` calls of `function()`, in ms (the others measure a shared machine's load)."""
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def input_path_ms(repeats: int = 5) -> dict:
    """ms per call of each step between ink and model input, on typical and on oversized inputs."""
    import numpy as np
    from PIL import Image, ImageDraw

    from data_scripts.augment import augment_strokes
    from data_scripts.render import render_strokes
    from modeling_hmer.image_processing_hmer import HMERImageProcessor

    strokes = pen_strokes()
    processor = HMERImageProcessor()
    drawing = render_strokes([stroke * 4 for stroke in strokes])  # a sketch-pad sized drawing
    typical = Image.fromarray(255 - drawing)
    huge = Image.new("L", (10000, 10000), 255)
    huge.paste(Image.fromarray(255 - render_strokes([stroke * 40 for stroke in strokes])).convert("L"), (200, 3000))
    strip = Image.new("L", (20000, 300), 0)
    pen = ImageDraw.Draw(strip)
    for x in range(100, 19800, 400):
        pen.line([(x, 50), (x + 200, 250)], fill=255, width=8)
    rng = np.random.default_rng(0)
    return {
        "render 20 strokes": millis(lambda: render_strokes(strokes), 10 * repeats),
        "augment 20 strokes": millis(lambda: augment_strokes(strokes, rng), 10 * repeats),
        f"processor, {typical.width}x{typical.height} drawing": millis(lambda: processor(typical), repeats),
        "processor, 10000x10000 image": millis(lambda: processor.to_model_image(huge), repeats),
        "processor, 20000x300 strip": millis(lambda: processor.to_model_image(strip), repeats),
    }


def chunking_cost(data_dir: str, batches_per_chunk: list[int], num_batches: int, timed_batches: int = 0,
                  model_dir: str = "checkpoints", synthetic_share: float = 0.5) -> dict:
    """Padding and training speed of the same real training images, collated in chunks of each size.

    The sampler plans batches from each row's standard render, but augmentation rescales every image
    (and a synthetic sample replaces its row by another formula), so the collator re-splits each chunk
    of planned batches by the real sizes; a bigger chunk gives it more images to pair. Groups of
    max(batches_per_chunk) consecutive planned batches of epoch 0, drawn at random, are rendered
    once as training renders them; each chunk size splits every group into chunks. With
    `timed_batches` (a multiple of the largest chunk size, so that every size times the same images),
    that many training steps of the `model_dir` model (one thread, bf16 + channels_last) are timed.

    Returns {chunk size: {"images", "batches", "padding" (share of the batch pixels),
    "images_per_s" (with timed_batches)}}.
    """
    import numpy as np
    from accelerate import Accelerator

    from modeling_hmer import HMERProcessor
    from train.config import TrainingConfig
    from train.data import HMERCollator, size_grouped_batches
    from train.train import build_data

    largest = max(batches_per_chunk)
    if timed_batches % largest:
        raise ValueError(f"timed_batches must be a multiple of {largest}, got {timed_batches}")
    config = TrainingConfig(heldout_by="expression_unseen", synthetic_share=synthetic_share,
                            synthetic_match_length=synthetic_share > 0)
    data = build_data(Accelerator(cpu=True), config, data_dir, None)
    sampler = data.sampler
    planned = size_grouped_batches(sampler.sizes, sampler.pixel_budget, sampler.max_batch_size,
                                   np.random.default_rng((sampler.seed, 0)), sampler.jitter)
    draw = np.random.default_rng(0).permutation(len(planned) // largest)[: max(1, num_batches // largest)]
    groups = [planned[g * largest:(g + 1) * largest] for g in draw]
    items = {position: data.train_set[(0, position)] for group in groups for batch in group for position in batch}
    processor = HMERProcessor.from_pretrained(model_dir)
    results = {}
    for chunk_size in batches_per_chunk:
        collator = HMERCollator(processor, chunk_size)
        batches = [batch for group in groups for start in range(0, largest, chunk_size)
                   for batch in collator([items[p] for planned_batch in group[start:start + chunk_size]
                                          for p in planned_batch])]
        image_pixels = sum(int(batch["pixel_mask"].sum()) for batch in batches)
        results[chunk_size] = {"images": len(items), "batches": len(batches),
                               "padding": 1 - image_pixels / sum(batch["pixel_mask"].numel() for batch in batches)}
        if timed_batches:
            results[chunk_size]["images_per_s"] = _train_images_per_second_on(model_dir, batches[:timed_batches])
    return results


def _train_images_per_second_on(model_dir: str, batches: list[dict]) -> float:
    """Images per second of training steps on these batches (after one warm-up step), as train.py runs them."""
    from modeling_hmer import HMERForConditionalGeneration

    torch.manual_seed(0)
    model = HMERForConditionalGeneration.from_pretrained(model_dir).to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch):
        with autocast(torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(len(batch["labels"]) for batch in batches) / (time.perf_counter() - start)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="default model, fp32 and bf16 + channels_last only")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead")
    parser.add_argument("--inputs", action="store_true", help="time the input path (render, augment, processor) instead")
    parser.add_argument("--chunks", action="store_true",
                        help="padding and speed of real training batches per chunk size (needs --data_dir) instead")
    parser.add_argument("--data_dir", default=None, help="chunks: the CROHME folder")
    parser.add_argument("--batches_per_chunk", type=int, nargs="+", default=[4, 16], help="chunks: chunk sizes")
    parser.add_argument("--chunk_batches", type=int, default=512, help="chunks: planned batches rendered")
    parser.add_argument("--timed_batches", type=int, default=32, help="chunks: training steps timed per chunk size")
    parser.add_argument("--model_dir", default="checkpoints", help="chunks: the model trained in the timed steps")
    parser.add_argument("--synthetic_share", type=float, default=0.5, help="chunks: as in training")
    parser.add_argument("--decoders", nargs="+", default=None, choices=["gru", "transformer"])
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--target_length", type=int, default=40)
    parser.add_argument("--train_steps", type=int, default=None, help="timed training steps per cell")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rows", type=int, default=25, help="profile: rows per table")
    parser.add_argument("--output_json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    if args.inputs:
        figures = input_path_ms()
        print("\n| input step | ms |\n|---|---|")
        print("\n".join(f"| {name} | {ms:.1f} |" for name, ms in figures.items()))
        return [figures]
    if args.chunks:
        if not args.data_dir:
            parser.error("--chunks needs --data_dir (the CROHME folder)")
        figures = chunking_cost(args.data_dir, args.batches_per_chunk, args.chunk_batches, args.timed_batches,
                                args.model_dir, args.synthetic_share)
        print(f"\n| batches per chunk | images | batches | padded share of the pixels | training images/s "
              f"({args.timed_batches} steps) |\n|---|---|---|---|---|")
        print("\n".join(f"| {k} | {v['images']} | {v['batches']} | {100 * v['padding']:.1f}% "
                        f"| {v.get('images_per_s', float('nan')):.2f} |" for k, v in figures.items()))
        return [figures]
    if args.profile:
        profile((args.decoders or ["gru"])[0], args.sizes[1] if len(args.sizes) > 1 else args.sizes[0],
                args.batch_size, args.target_length, args.rows)
        return []
    decoders = args.decoders or (["gru"] if args.quick else ["gru", "transformer"])
    settings = args.settings or (["fp32", "bf16 + channels_last"] if args.quick else list(SETTINGS))
    train_steps = args.train_steps or (3 if args.quick else 5)
    results = run_benchmark(decoders, settings, args.sizes, args.batch_size, args.target_length, train_steps,
                            args.beams, repeats=2 if args.quick else 3)
    print(format_tables(results, args.sizes, args.beams))
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
