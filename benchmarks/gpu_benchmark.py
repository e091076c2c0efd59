"""Accelerator benchmark: HyperFlow's adaptation latency and peak memory against full fine-tuning and direct
transfer, and tasks per second when many tasks are adapted in one batch.

    python benchmarks/gpu_benchmark.py [--backbones vit-s16,vit-b16,efficientnet-lite0] [--tasks 16,64,256]
        [--episodes 10] [--ft-episodes 3] [--output benchmarks/gpu_benchmark.md]
    python benchmarks/gpu_benchmark.py --tiny --device cpu --output /tmp/gpu_check.md   # the CPU check

Backbones (random weights: the cost of a forward pass does not depend on their values): ViT-S/16 (384 wide,
12 layers, 6 heads) and ViT-B/16 (768, 12, 12) as transformers ``ViTModel``, and EfficientNet-Lite0 as timm's
``tf_efficientnet_lite0`` through ``TimmWrapperModel``, at 224 px. The adapter uses the shipped settings
(benchmarks/speed_setup.py: those of adapters/efficientnet_lite0) with random, non-zero drift outputs.
Episodes are 5-way 5-shot 15-query over scikit-learn's digits (built offline into a temporary folder).

Latency and peak memory come from :class:`hf_hyperflow.evaluation.Evaluator` (dt, hyperflow and ft-full on the
same episodes; ft-full: 50 Adam steps of the whole backbone); tasks per second from ``Evaluator.batched_throughput``
(``adapt_many`` against ``adapt`` one task after another, repeated with the task counts taking turns, medians).
``--tiny`` swaps in tiny shapes (32 px, 4 layers: as many blocks as the shipped settings adapt) and few steps
so that the whole script runs on a CPU in seconds. Writes the Markdown table and ``<output stem>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed_setup import settings_description, shipped_adapter, support_tasks, throughput, warm_up

METHODS = ["dt", "hyperflow", "ft-full"]
FT_FULL_LR = 1e-4  # the lr chosen for ft-full on validation episodes in benchmarks/RESULTS.md


def make_backbone(name: str, tiny: bool):
    """A randomly initialised transformers backbone of the named shape (tiny: the test-sized variant)."""
    from transformers import AutoModel, TimmWrapperConfig, ViTConfig

    torch.manual_seed(0)
    if name.startswith("vit"):
        width, heads = {"vit-s16": (384, 6), "vit-b16": (768, 12)}[name]
        if tiny:
            config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8)
        else:
            config = ViTConfig(hidden_size=width, num_hidden_layers=12, num_attention_heads=heads,
                               intermediate_size=4 * width, image_size=224, patch_size=16)
        return AutoModel.from_config(config).eval()
    if name == "efficientnet-lite0":
        architecture = "test_efficientnet" if tiny else "tf_efficientnet_lite0"
        return AutoModel.from_config(TimmWrapperConfig(architecture=architecture, num_classes=0)).eval()
    raise ValueError(f"unknown backbone {name!r}; choose from vit-s16, vit-b16, efficientnet-lite0")


def benchmark_backbone(name: str, dataset, args, device: torch.device) -> dict:
    """Latency / memory ratios of one backbone and its batched throughput for every task count."""
    from hf_hyperflow.evaluation import Evaluator

    adapter = shipped_adapter(make_backbone(name, args.tiny), args.image_size, device)
    tasks = support_tasks(adapter, dataset, max(args.tasks))
    warm_up(adapter, tasks[0], ft_groups=("full",))
    evaluator = Evaluator(adapter, METHODS, ft_steps=args.ft_steps, fixed_lr={"ft-full": FT_FULL_LR},
                          memory_episodes=args.memory_episodes, progress=False)
    started = time.perf_counter()
    evaluated = evaluator.evaluate_dataset(
        name, dataset, episodes=args.episodes, episodes_per_method={"ft-full": args.ft_episodes},
        sampler_kwargs={"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15, "split": None})
    rates = throughput(adapter, tasks, args.tasks, args.repeats)
    methods = {m: {k: v for k, v in row.items() if k != "lr_table"} for m, row in evaluated["methods"].items()}
    return {"methods": methods, "throughput": rates, "seconds": round(time.perf_counter() - started, 1),
            "drift_parameters": sum(p.numel() for p in adapter.drift.parameters())}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"## Adaptation on {meta['machine']}", "",
             f"Command: `{meta['command']}`  ",
             f"Date {meta['date']}; image size {meta['image_size']} px; 5-way 5-shot; {meta['note']}", "",
             "| backbone | method | adapt s | peak memory MiB | vs dt (time) | vs ft-full (time) | vs ft-full (memory) |",
             "|---|---|---|---|---|---|---|"]
    for backbone, row in results["backbones"].items():
        for method, values in row["methods"].items():
            memory = values.get("peak_memory_bytes")
            lines.append(
                f"| {backbone} | {method} | {values['adapt_latency_s']:.4f} | "
                f"{'-' if memory is None else f'{memory / 2**20:.1f}'} | {values.get('latency_vs_dt', float('nan')):.2f}x | "
                f"{values.get('latency_vs_ft_full', float('nan')):.4f}x | {values.get('memory_vs_ft_full', float('nan')):.4f}x |")
    lines += ["", "| backbone | tasks | one by one tasks/s | batched tasks/s | batched / one by one |", "|---|---|---|---|---|"]
    for backbone, row in results["backbones"].items():
        for count, values in row["throughput"].items():
            lines.append(f"| {backbone} | {count} | {values['one_by_one_tasks_per_s']:.2f} | "
                         f"{values['batched_tasks_per_s']:.2f} | {values['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="vit-s16,vit-b16,efficientnet-lite0")
    parser.add_argument("--tasks", default="16,64,256", help="task counts for the batched throughput")
    parser.add_argument("--episodes", type=int, default=10, help="episodes of dt and hyperflow")
    parser.add_argument("--ft-episodes", type=int, default=3, help="episodes of ft-full")
    parser.add_argument("--ft-steps", type=int, default=50)
    parser.add_argument("--memory-episodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of the throughput runs")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: the CPU check")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/gpu_benchmark.md"))
    args = parser.parse_args(argv)
    args.tasks = [int(t) for t in args.tasks.split(",")]
    if args.tiny:
        args.image_size, args.ft_steps = 32, min(args.ft_steps, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    from hf_hyperflow.episodes import load_image_dataset
    from hf_hyperflow.evaluation import machine_description
    from recipes.data import BUILDERS

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as folder:
        BUILDERS["digits"].build(Path(folder) / "digits")
        dataset = load_image_dataset(Path(folder) / "digits")
        backbones = {name: benchmark_backbone(name, dataset, args, device) for name in args.backbones.split(",")}
    command = "python benchmarks/gpu_benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = {"meta": {"machine": machine_description(), "date": date.today().isoformat(), "command": command,
                        "image_size": args.image_size,
                        "note": "tiny shapes (a check that the script runs, not a measurement)" if args.tiny else
                        f"random weights, the {settings_description()}"},
               "backbones": backbones}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown(results))
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
