"""Where one ``adapt()`` spends its time: a torch.profiler profile of adaptation, split into the regions the
adapter marks, beside direct transfer on the same support set.

    taskset -c 1 python benchmarks/profile_adapt.py [--sizes 64,128] [--repeats 20] [--data data]
        [--output benchmarks/profile_adapt.md]

EfficientNet-Lite0 (ImageNet weights) with the shipped adapter settings (benchmarks/speed_setup.py), one 5-way
5-shot support set of glyphs_default, one torch thread. ``adapt`` and ``direct_transfer`` take turns
``--repeats`` times under the profiler (after an untimed warm-up); every row is the profiler's CPU time of a
``record_function`` region per call. Regions (hf_hyperflow/adapter.py, ``adapt_batch``):

- ``hyperflow.frozen_pass``: the frozen backbone over the support at theta_0 (direct transfer's features and
  forward pass), keeping the frozen prefix's output on the way;
- ``hyperflow.task_encoding``: class prototypes, set encoder, task embedding;
- ``hyperflow.drift``: the integration (all drift evaluations, the state formed once);
- ``hyperflow.adapted_pass``: the adapted blocks over the support with the task's deltas (prefix reused);
- ``hyperflow.head``: prototypes of the adapted features plus the head delta;
- other: input checks, label encoding, the AdaptedTask.

The profiler's own cost inflates short operations, so the shares matter more than the milliseconds; the last
table lists the operators that take most of ``adapt``'s time.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.speed_setup import (
    lite0_backbone,
    load_average,
    settings_description,
    shipped_adapter,
    support_tasks,
    warm_up,
)

REGIONS = ["hyperflow.frozen_pass", "hyperflow.task_encoding", "hyperflow.drift", "hyperflow.adapted_pass",
           "hyperflow.head"]


def profile_once(adapter, task, repeats: int) -> tuple[dict[str, float], list]:
    """Milliseconds per call of adapt, direct transfer and every region; the top operators of adapt."""
    pixels, labels = task
    with profile(activities=[ProfilerActivity.CPU]) as session:
        for _ in range(repeats):
            with record_function("adapt"):
                adapter.adapt(pixels, labels)
            with record_function("direct_transfer"):
                adapter.direct_transfer(pixels, labels)
    totals = {e.key: e.cpu_time_total / 1000 / repeats for e in session.key_averages()}
    rows = {name: totals.get(name, 0.0) for name in ["adapt", "direct_transfer", *REGIONS]}
    with profile(activities=[ProfilerActivity.CPU]) as adapt_only:
        for _ in range(repeats):
            adapter.adapt(pixels, labels)
    top = sorted((e for e in adapt_only.key_averages() if not e.key.startswith("hyperflow.")),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return rows, [(e.key, e.self_cpu_time_total / 1000 / repeats, e.count // repeats) for e in top]


def section(size: int, rows: dict[str, float], top: list) -> list[str]:
    adapt, dt = rows["adapt"], rows["direct_transfer"]
    regions = sum(rows[r] for r in REGIONS)
    lines = [f"## {size} px", "", f"adapt {adapt:.1f} ms, direct transfer {dt:.1f} ms per call under the profiler: "
             f"adapt / dt = {adapt / dt:.2f}x.", "",
             "| region | ms per adapt | share of adapt | / direct transfer |", "|---|---|---|---|"]
    for name in REGIONS:
        lines.append(f"| {name} | {rows[name]:.2f} | {100 * rows[name] / adapt:.1f}% | {rows[name] / dt:.2f}x |")
    lines.append(f"| other (inputs, labels, AdaptedTask) | {adapt - regions:.2f} | {100 * (adapt - regions) / adapt:.1f}% | "
                 f"{(adapt - regions) / dt:.2f}x |")
    lines += ["", "Operators with the most self time in adapt:", "", "| operator | ms per adapt | calls per adapt |",
              "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {calls} |" for name, ms, calls in top]
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    from hf_hyperflow.episodes import load_image_dataset
    from hf_hyperflow.evaluation import machine_description

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/profile_adapt.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    dataset = load_image_dataset(args.data / "glyphs_default")
    command = "python benchmarks/profile_adapt.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Profile of one adapt()", "", f"Command: `{command}`  ",
             f"EfficientNet-Lite0, {settings_description()}, one 5-way 5-shot support set of glyphs_default; CPU "
             "time per call from torch.profiler.", ""]
    for size in (int(s) for s in args.sizes.split(",")):
        adapter = shipped_adapter(lite0_backbone(), size)
        task = support_tasks(adapter, dataset, 1)[0]
        warm_up(adapter, task)
        rows, top = profile_once(adapter, task, args.repeats)
        lines += section(size, rows, top)
        print("\n".join(lines[-30:]), flush=True)
    lines += [f"Machine: {machine_description()}; load average {load} at the start; {date.today().isoformat()}; "
              f"{time.perf_counter() - started:.0f} s.", ""]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
