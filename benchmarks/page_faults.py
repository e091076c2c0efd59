"""How much of an adaptation's time is the memory allocator: latency and minor page faults per call of direct
transfer and HyperFlow, in this process's allocator settings.

    python benchmarks/page_faults.py --label default [--shots 1,5] [--tasks 10] [--repeats 4] [--data data]
        [--output benchmarks/page_faults.md]
    MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=2000000000 \\
        python benchmarks/page_faults.py --label "glibc thresholds raised"

The shipped adapter (``adapters/efficientnet_lite0``, its trained weights) on the ImageNet EfficientNet-Lite0 at
64 px, 5-way support sets of glyphs_default, one torch thread. Per call: the median wall time and the median
number of minor page faults (``getrusage``) of ``direct_transfer``, ``adapt`` (the adapter's own stopping rule)
and ``adapt(..., stopping="fixed")``, the methods taking turns over the same tasks after two untimed rounds.
Results are kept per ``--label`` in ``<stem>.json`` (run once per allocator setting); the page shows every label.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed_setup import (
    SHIPPED_ADAPTER,
    lite0_backbone,
    load_average,
    save_labelled_run,
    support_tasks,
)

METHODS = ("dt", "adapt", "adapt, fixed")


def measure(adapter, tasks: list, repeats: int) -> dict:
    """``method -> {"ms": median ms per call, "faults": median minor faults per call, "vs_dt": ms / dt's ms}``."""
    calls = {"dt": adapter.direct_transfer, "adapt": adapter.adapt,
             "adapt, fixed": lambda p, y: adapter.adapt(p, y, stopping="fixed")}
    for _ in range(2):  # untimed: kernel selection and first allocations
        for call in calls.values():
            for pixels, labels in tasks:
                call(pixels, labels)
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    faults: dict[str, list[int]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method, call in calls.items():
            for pixels, labels in tasks:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                call(pixels, labels)
                seconds[method].append(time.perf_counter() - start)
                faults[method].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    dt_ms = statistics.median(seconds["dt"]) * 1000
    return {m: {"ms": statistics.median(seconds[m]) * 1000, "faults": statistics.median(faults[m]),
                "vs_dt": statistics.median(seconds[m]) * 1000 / dt_ms} for m in METHODS}


def markdown(results: dict) -> str:
    lines = ["# Latency and page faults per call", "",
             "Written by benchmarks/page_faults.py (its docstring says what is measured); one row per label, "
             "shots and method.", ""]
    for label, run in results.items():
        lines.append(f"- **{label}**: `{run['command']}`{run['environment']} at commit {run['commit']} on "
                     f"{run['date']}, {run['machine']}, load average {run['load']} at the start.")
    lines += ["", "| label | support | method | ms per call (median) | / dt | minor page faults per call |",
              "|---|---|---|---|---|---|"]
    for label, run in results.items():
        for shots, rows in run["shots"].items():
            for method, row in rows.items():
                lines.append(f"| {label} | 5-way {shots}-shot | {method} | {row['ms']:.1f} | {row['vs_dt']:.2f}x | "
                             f"{row['faults']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import os

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.episodes import load_image_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="name of this run's rows, e.g. the allocator setting")
    parser.add_argument("--shots", default="1,5")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/page_faults.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, load = time.perf_counter(), load_average()
    adapter = HyperFlowAdapter.from_pretrained(lite0_backbone(), SHIPPED_ADAPTER)
    dataset = load_image_dataset(args.data / "glyphs_default")
    shots = {s: measure(adapter, support_tasks(adapter, dataset, args.tasks, shots=int(s)), args.repeats)
             for s in args.shots.split(",")}
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    save_labelled_run(args.output, args.label, "page_faults.py", argv, started, load, markdown,
                      environment=f" with {malloc}" if malloc else "", shots=shots)


if __name__ == "__main__":
    main()
