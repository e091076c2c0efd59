"""Adaptation against its floor, as ratios measured within one run: ``adapt`` latency against direct transfer,
its peak memory against full fine-tuning, and tasks per second of ``adapt_many`` against ``adapt`` one by one.

    taskset -c 1 python benchmarks/adapt_speed.py --label after [--sizes 64,128] [--tasks 1,2,4,8,16,32,64]
        [--episodes 20] [--repeats 5] [--data data] [--output benchmarks/adapt_speed.md]
        [--adapter adapters/efficientnet_lite0 --dataset digits]

EfficientNet-Lite0 (ImageNet weights) with the shipped adapter settings (benchmarks/speed_setup.py), 5-way
5-shot episodes of glyphs_default (all classes), one torch thread. ``--adapter`` measures a trained adapter
instead (its weights, stopping rule and domain gate; ``--sizes`` its image size), ``--dataset`` another dataset of
``--data`` (e.g. one whose tasks the gate keeps at direct transfer). Latency and memory come from
:class:`hf_hyperflow.evaluation.Evaluator` (dt, hyperflow and ft-full one after the other on each episode; peak
memory from a profiled run of the first episode; ft-full: 50 Adam steps at lr 1e-4, its lr in
benchmarks/RESULTS.md). Throughput from ``Evaluator.batched_throughput`` (one by one, then batched, on the same
tasks), repeated ``--repeats`` times over every task count in turn; the ratio is the median of the repetitions'
ratios. Results are kept per ``--label`` in ``<stem>.json`` (run the script on the code before and after a change
with two labels) and the Markdown page shows every label side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed_setup import (
    lite0_backbone,
    load_average,
    save_labelled_run,
    settings_description,
    shipped_adapter,
    support_tasks,
    throughput,
    warm_up,
)

FT_FULL_LR = 1e-4


def latency_and_memory(adapter, dataset, episodes: int, name: str = "glyphs_default") -> dict:
    """hyperflow's adaptation latency / dt's and peak memory / ft-full's (and the values behind them)."""
    from hf_hyperflow.evaluation import Evaluator

    evaluator = Evaluator(adapter, ["dt", "hyperflow", "ft-full"], fixed_lr={"ft-full": FT_FULL_LR},
                          memory_episodes=1, progress=False)
    methods = evaluator.evaluate_dataset(name, dataset, episodes=episodes,
                                         episodes_per_method={"ft-full": 1},
                                         sampler_kwargs={"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15,
                                                         "split": None})["methods"]
    row = {"latency_vs_dt": methods["hyperflow"]["latency_vs_dt"],
           "memory_vs_ft_full": methods["hyperflow"]["memory_vs_ft_full"],
           "adapt_s": {m: methods[m]["adapt_latency_s"] for m in methods},
           "peak_memory_mib": {m: methods[m]["peak_memory_bytes"] / 2**20 for m in methods}}
    if "adapt_latency_median_s" in methods["dt"]:
        row["median_latency_vs_dt"] = (methods["hyperflow"]["adapt_latency_median_s"]
                                       / methods["dt"]["adapt_latency_median_s"])
    return row


def markdown(results: dict) -> str:
    lines = ["# Adaptation speed and memory: ratios measured within one run", "",
             "Written by benchmarks/adapt_speed.py; each label is one run of it (its command, code and load below).",
             f"EfficientNet-Lite0, {settings_description()} (random drift outputs) unless a label names a trained "
             "adapter, 5-way 5-shot episodes of glyphs_default unless it names another dataset, one torch thread.", ""]
    labels = list(results)
    for label, run in results.items():
        what = "".join(f", {key} {run[key]}" for key in ("adapter", "dataset") if run.get(key))
        lines.append(f"- **{label}**: `{run['command']}` at commit {run['commit']} on {run['date']}, "
                     f"{run['machine']}, load average {run['load']} at the start ({run['seconds']:.0f} s){what}.")
    lines += ["", "| measure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    sizes = sorted({size for run in results.values() for size in run["sizes"]}, key=int)
    for size in sizes:
        def cell(label, fn, size=size):
            row = results[label]["sizes"].get(size)
            return "-" if row is None else fn(row)

        lines.append(f"| {size} px: adapt latency / dt | " + " | ".join(
            cell(lb, lambda r: f"{r['latency']['latency_vs_dt']:.2f}x") for lb in labels) + " |")
        lines.append(f"| {size} px: adapt peak memory / ft-full | " + " | ".join(
            cell(lb, lambda r: f"{100 * r['latency']['memory_vs_ft_full']:.1f}%") for lb in labels) + " |")
        counts = sorted({c for lb in labels for c in results[lb]["sizes"].get(size, {}).get("throughput", {})},
                        key=int)
        for count in counts:
            lines.append(f"| {size} px: {count} tasks, batched / one by one (tasks/s) | " + " | ".join(
                cell(lb, lambda r, c=count: f"{r['throughput'][c]['speedup']:.2f}x" if c in r["throughput"] else "-")
                for lb in labels) + " |")
    lines += ["", "Values behind the ratios (seconds per task, MiB):", "", "```json",
              json.dumps({lb: {s: {"adapt_s": r["latency"]["adapt_s"], "peak_memory_mib": r["latency"]["peak_memory_mib"]}
                               for s, r in run["sizes"].items()} for lb, run in results.items()}, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:

    from hf_hyperflow.episodes import load_image_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="name of this run's column, e.g. before / after")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--tasks", default="1,2,4,8,16,32,64")
    parser.add_argument("--episodes", type=int, default=20, help="episodes of dt and hyperflow per size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/adapt_speed.md"))
    parser.add_argument("--adapter", type=Path, help="a trained adapter folder instead of random drift outputs")
    parser.add_argument("--dataset", default="glyphs_default", help="a dataset folder of --data")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    dataset = load_image_dataset(args.data / args.dataset)
    counts = [int(c) for c in args.tasks.split(",")]
    sizes = {}
    for size in args.sizes.split(","):
        adapter = measured_adapter(args.adapter, int(size))
        tasks = support_tasks(adapter, dataset, max(counts))
        warm_up(adapter, tasks[0], ft_groups=("full",))
        sizes[size] = {"latency": latency_and_memory(adapter, dataset, args.episodes, args.dataset),
                       "throughput": throughput(adapter, tasks, counts, args.repeats)}
        print(size, json.dumps(sizes[size]), flush=True)
    save_labelled_run(args.output, args.label, "adapt_speed.py", argv, started, load, markdown, sizes=sizes,
                      adapter=str(args.adapter) if args.adapter else None, dataset=args.dataset)


def measured_adapter(folder: Path | None, size: int):
    """The shipped settings with random drift outputs, or the trained adapter in ``folder`` (at its image size)."""
    if folder is None:
        return shipped_adapter(lite0_backbone(), size)
    from hf_hyperflow import HyperFlowAdapter

    adapter = HyperFlowAdapter.from_pretrained(lite0_backbone(), folder)
    if adapter.config.image_size != size:
        raise SystemExit(f"error: {folder} adapts {adapter.config.image_size} px images; give --sizes "
                         f"{adapter.config.image_size}")
    return adapter


if __name__ == "__main__":
    main()
