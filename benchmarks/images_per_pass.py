"""How many images the passes of the frozen backbone over a support set should take on a CPU: time per image
and peak memory of ``HyperFlowAdapter.frozen_features`` for every pair of pass sizes.

    taskset -c 1 python benchmarks/images_per_pass.py [--sizes 64,128] [--images 5,10,25,100] [--rounds 5]
        [--output benchmarks/images_per_pass.md]

EfficientNet-Lite0 (ImageNet weights), one torch thread. ``frozen_features`` runs the backbone's early,
high-resolution blocks ``images_per_pass`` images at a time inside passes of ``images_per_late_pass`` images
through the later blocks. For every support size of ``--images`` and every pair, the same random images go through
it; the pairs take
turns within each round (interleaved) and the table gives the median over rounds of the time per image, relative
to the best pair of that image size, and the peak memory of one run
(:func:`hf_hyperflow.evaluation.measure_peak_memory`). ``all`` is one pass over every image; the defaults of
:func:`hf_hyperflow.backbones.images_per_pass` are marked.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed_setup import lite0_backbone, load_average, shipped_adapter

EARLY = (2, 4, 8, 16, 25)
LATE = (25, 50, 100)


def run(adapter, images: torch.Tensor, early: int | None, late: int | None):
    adapter.images_per_pass, adapter.images_per_late_pass = early, late
    return adapter.frozen_features(images)


def measure(adapter, images: torch.Tensor, pairs: list[tuple], rounds: int) -> dict[tuple, tuple[float, int]]:
    """``pair -> (median seconds per image, peak memory bytes)``."""
    from hf_hyperflow.evaluation import measure_peak_memory

    for pair in pairs:  # warm-up: one-time costs of each batch shape
        run(adapter, images, *pair)
    times: dict[tuple, list[float]] = {pair: [] for pair in pairs}
    for _ in range(rounds):
        for pair in pairs:
            start = time.perf_counter()
            run(adapter, images, *pair)
            times[pair].append((time.perf_counter() - start) / images.shape[0])
    return {pair: (statistics.median(times[pair]), measure_peak_memory(lambda p=pair: run(adapter, images, *p)))
            for pair in pairs}


def support_rows(adapter, size: int, count: int, rounds: int) -> list[str]:
    """The table's rows of one image size and support size: every pair of pass sizes up to the support's."""
    from hf_hyperflow.backbones import images_per_pass

    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    whole = (count, count)  # one pass over every image
    pairs, seen = [whole], {whole}  # pairs that pass the images differently: early passes below the support's size
    for early, late in itertools.product(EARLY, LATE):
        if early <= late and early < count and (early, min(late, count)) not in seen:
            pairs.append((early, late))
            seen.add((early, min(late, count)))
    cpu = torch.device("cpu")
    default = (images_per_pass(size, cpu, support_size=count), images_per_pass(size, cpu, late=True))
    if default not in pairs:
        pairs.append(default)
    measured = measure(adapter, images, pairs, rounds)
    best = min(seconds for seconds, _ in measured.values())
    rows = []
    for (early, late), (seconds, memory) in measured.items():
        shown = ("all", "all") if (early, late) == whole else (early, late)
        rows.append(f"| {size} | {count} | {shown[0]} | {shown[1]} | {1000 * seconds:.2f} | {seconds / best:.2f}x | "
                    f"{memory / 2**20:.1f} | {'yes' if (early, late) == default else ''} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    from hf_hyperflow.evaluation import machine_description

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--images", default="5,10,25,100", help="support sizes (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/images_per_pass.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), load_average()
    command = "python benchmarks/images_per_pass.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Images per pass of the frozen backbone (CPU)", "", f"Command: `{command}`  ", "",
             "| image size | support images | early blocks: images per pass | later blocks: images per pass | "
             "ms per image | vs the best | peak memory MiB | default |", "|---|---|---|---|---|---|---|---|"]
    counts = [int(n) for n in args.images.split(",")]
    for size in (int(s) for s in args.sizes.split(",")):
        adapter = shipped_adapter(lite0_backbone(), size)
        for count in counts:
            rows = support_rows(adapter, size, count, args.rounds)
            lines += rows
            print("\n".join(rows), flush=True)
    lines += ["", f"Machine: {machine_description()}; load average {load} at the start; {date.today().isoformat()}; "
              f"{time.perf_counter() - started:.0f} s. Medians of {args.rounds} interleaved rounds.", ""]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
