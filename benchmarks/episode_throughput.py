"""Episode throughput next to backbone forward time, measured in one run.

For each dataset folder, draws 5-way 5-shot 15-query episodes (100 images; 1-shot 3-query where classes
hold fewer than 20 images), decodes them and turns them into 224 x 224 pixel_values with a transformers
image processor (``EpisodeSampler(image_transform=...)``), then times a forward pass of a timm
``tf_efficientnet_lite0`` (random weights: the time does not depend on them) on the same images.

    python benchmarks/episode_throughput.py --data data --episodes 20 --forward-episodes 3 \
        --output benchmarks/episode_throughput.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import datasets
import numpy as np
import timm
import torch
import transformers
from transformers import ViTImageProcessor, ViTImageProcessorPil

from hf_hyperflow.episodes import EpisodeSampler, LabelIndex, resolve_label_column

WAYS, SHOTS, QUERIES, SIZE = 5, 5, 15, 224


def processors() -> dict:
    """The two ViT image processors of transformers, built from code: torchvision backend and PIL backend."""
    kwargs = {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"ViTImageProcessor (torchvision)": ViTImageProcessor(**kwargs),
            "ViTImageProcessorPil (PIL)": ViTImageProcessorPil(**kwargs)}


def episode_shape(dataset: datasets.Dataset) -> tuple[int, int]:
    """(shots, queries): 5 and 15, or 1 and 3 for datasets whose classes hold fewer than 20 images (emoji)."""
    smallest = int(LabelIndex.build(dataset, resolve_label_column(dataset)).counts().min())
    return (SHOTS, QUERIES) if smallest >= SHOTS + QUERIES else (1, 3)


def time_episodes(dataset: datasets.Dataset, processor, episodes: int, keep: int,
                  warmup: int = 2) -> tuple[list[float], list]:
    """Seconds per episode for sampling + decoding + processing; returns them and the first ``keep`` episodes."""
    shots, queries = episode_shape(dataset)
    sampler = EpisodeSampler(dataset, protocol="fixed", ways=WAYS, shots=shots, queries=queries, seed=0, split=None,
                             num_episodes=episodes + warmup,
                             image_transform=lambda images: processor(images, return_tensors="pt")["pixel_values"])
    for i in range(warmup):
        sampler[episodes + i]
    seconds, kept = [], []
    for i in range(episodes):
        start = time.perf_counter()
        episode = sampler[i]
        seconds.append(time.perf_counter() - start)
        if i < keep:
            kept.append(episode)
    return seconds, kept


@torch.inference_mode()
def time_forward(model: torch.nn.Module, episodes: list) -> list[float]:
    """Seconds per episode for one forward pass over its support + query pixel_values [images, 3, 224, 224]."""
    batches = [torch.cat([e.support_images, e.query_images]) for e in episodes]
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        model(batch)
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> dict:
    return {"mean_ms": round(1000 * statistics.mean(seconds), 1), "median_ms": round(1000 * statistics.median(seconds), 1),
            "min_ms": round(1000 * min(seconds), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder holding save_to_disk dataset folders")
    parser.add_argument("--datasets", nargs="*", default=None, help="names under --data (default: all found)")
    parser.add_argument("--episodes", type=int, default=20, help="episodes timed for data per dataset")
    parser.add_argument("--forward-episodes", type=int, default=3,
                        help="episodes (the first ones drawn) timed for the forward pass per dataset")
    parser.add_argument("--output", type=Path, default=None, help="Markdown report (a .json beside it)")
    args = parser.parse_args(argv)
    names = args.datasets or sorted(p.name for p in args.data.iterdir() if (p / "state.json").is_file())
    if not names:
        parser.error(f"no dataset folders under {args.data}; build them with python -m recipes.data.build")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():  # warm-up
        model(torch.zeros(WAYS * (SHOTS + QUERIES), 3, SIZE, SIZE))
    rows = []
    for name in names:
        dataset = datasets.load_from_disk(str(args.data / name))
        forward = None
        for processor_name, processor in processors().items():
            data_s, episodes = time_episodes(dataset, processor, args.episodes, args.forward_episodes)
            if forward is None:  # the same pixel_values whichever processor made them
                forward = summary(time_forward(model, episodes))
            shots, queries = episode_shape(dataset)
            row = {"dataset": name, "rows": len(dataset), "episode": f"{WAYS}-way {shots}-shot {queries}-query",
                   "images": WAYS * (shots + queries), "processor": processor_name, "data": summary(data_s),
                   "forward": forward, "ratio_data_to_forward": round(statistics.mean(data_s) / (forward["mean_ms"] / 1000), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
               "transformers": transformers.__version__, "datasets": datasets.__version__, "numpy": np.__version__}
    print(json.dumps(machine))
    if args.output is not None:
        args.output.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        lines = [
            "# Episode throughput", "",
            f"{WAYS}-way {SHOTS}-shot {QUERIES}-query episodes ({WAYS * (SHOTS + QUERIES)} images) at {SIZE} px "
            "(emoji, with 4 images per class: 5-way 1-shot 3-query, 20 images), "
            f"per dataset {args.episodes} episodes timed for data and the first {args.forward_episodes} of them for the "
            "forward pass, after warm-up. *data* = `sampler[i]`: drawing the "
            "episode, decoding its rows, converting to RGB and the image processor (resize, rescale, normalise) "
            "into pixel_values [images, 3, 224, 224]. *forward* = one `torch.inference_mode` forward pass of timm "
            "`tf_efficientnet_lite0` (random weights, `num_classes=0`: pooled features [images, 1280]) over the same "
            "pixel_values, on the same CPU, in the same process.", "",
            f"Machine: {machine['cpu_count']} CPU cores, {machine['torch_threads']} torch threads, no GPU; torch "
            f"{machine['torch']}, timm {machine['timm']}, transformers {machine['transformers']}, datasets "
            f"{machine['datasets']}.", "",
            "| dataset | rows | episode | image processor | data ms / episode (mean, median) "
            "| forward ms / episode (mean, median) | data / forward |", "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(f"| {r['dataset']} | {r['rows']} | {r['episode']} | {r['processor']} | {r['data']['mean_ms']}, "
                         f"{r['data']['median_ms']} | {r['forward']['mean_ms']}, {r['forward']['median_ms']} | "
                         f"{r['ratio_data_to_forward']} |")
        lines += ["", "Command:", "", "```bash",
                  f"python benchmarks/episode_throughput.py --data {args.data} --episodes {args.episodes} "
                  f"--forward-episodes {args.forward_episodes} --output {args.output}", "```", ""]
        args.output.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
