"""Which fine-tuning is worth emulating: gains of fine-tuning variants over direct transfer on the validation
classes of the meta-training sources, at several image sizes and numbers of adapted blocks.

    python benchmarks/teacher_study.py --backbone models/efficientnet-lite0 \
        --source glyphs=data/glyphs:script --source emoji=data/emoji:category:1:3 \
        --sizes 64,96,128 --first-blocks -2,-4 --variants shift,lora,lora+shift,head,blocks \
        --lrs 1e-4,1e-3,1e-2 --episodes 12 --output benchmarks/teacher_study

A source is ``NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES]`` (5-way; default 5 shots, 15 queries); its validation
classes come from ``ClassSplit.from_dataset(dataset, group_column=GROUP_COLUMN, seed=0)``; ``--outside-training
NAME`` marks a source held out of meta-training as a whole, whose episodes draw from every class with enough
images; ``--low-resolution NAME=PIXELS`` shows a source as thumbnails enlarged back (as a training config's
``low_resolution``). Every variant runs
at every lr on the same seeded episodes as direct transfer (50 Adam steps, the P>M>F protocol; other ``--steps``
or ``--optimizer sgd``, plain gradient steps, are rows of their own, e.g. ``lora+shift, sgd x1``). The lr of a
variant is chosen on the first half of the episodes and its paired gain over dt is reported on the second
half, so the reported figure is not the maximum over the grid. Pseudo-queries come from a pool of augmented
copies of the support (``--augment-pool``, as the trajectory teacher records them), so that the frozen prefix
runs once per task. Results are appended to
``<output>/records.jsonl`` as they come (a rerun skips what is there) and summarised in ``<output>/README.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_source(text: str) -> dict:
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    if not name or len(parts) not in (2, 4):
        raise SystemExit(f"error: --source takes NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES], got {text!r}")
    shots, queries = (int(parts[2]), int(parts[3])) if len(parts) == 4 else (5, 15)
    return {"name": name, "path": parts[0], "group_column": parts[1], "shots": shots, "queries": queries}


def load_records(path: Path) -> dict[tuple, dict]:
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            records[record_key(row["source"], row["size"], row["first_block"], row["variant"], row["lr"],
                               row.get("steps", 50), row.get("optimizer", "adam"))] = row
    return records


def record_key(source: str, size: int, first_block: int, variant: str, lr: float | None, steps: int,
               optimizer: str) -> tuple:
    """What a record measured; direct transfer's (``variant == "dt"``) does not depend on the steps or optimizer."""
    if variant == "dt":
        return source, size, first_block, variant, None, None, None
    return source, size, first_block, variant, lr, steps, optimizer


def cell_label(variant: str, steps: int | None, optimizer: str | None) -> str:
    """The variant as the summary names it: ``lora+shift`` for the P>M>F protocol's 50 Adam steps, else with the
    steps and optimizer (``lora+shift, sgd x1``)."""
    if variant == "dt" or (steps, optimizer) == (50, "adam"):
        return variant
    return f"{variant}, {optimizer} x{steps}"


def make_adapter(backbone, size: int, first_block: int):
    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    return HyperFlowAdapter(backbone, HyperFlowConfig(groups=["lora", "shift", "head"], r=4, image_size=size,
                                                      first_adapted_block=first_block))


def episodes_for(source: dict, count: int, seed: int, outside_training: bool = False,
                 low_resolution: int | None = None):
    """The source's validation classes; every class of a source ``outside_training`` (no training source covers it);
    shown as thumbnails of at most ``low_resolution`` pixels enlarged back, where that is set."""
    import functools

    from hf_hyperflow.episodes import ClassSplit, EpisodeSampler, load_image_dataset
    from hf_hyperflow.inputs import domain_view

    dataset = load_image_dataset(source["path"])
    split = None if outside_training else ClassSplit.from_dataset(dataset, group_column=source["group_column"], seed=0)
    sampler = EpisodeSampler(dataset, protocol="fixed", ways=5, shots=source["shots"], queries=source["queries"],
                             split=None if outside_training else "validation", class_split=split,
                             min_images_per_class=source["shots"] + source["queries"] if outside_training else None,
                             num_episodes=count, seed=seed,
                             image_transform=(functools.partial(domain_view, low_resolution=low_resolution)
                                              if low_resolution is not None else None))
    return [sampler[i] for i in range(count)]


def run_cell(adapter, episodes, variant: str, lr: float | None, steps: int, augment_pool: int | None,
             optimizer: str = "adam") -> list[float]:
    """Query accuracy (%) per episode of ``dt`` (lr None) or of fine-tuning ``variant`` at ``lr``."""
    import torch

    from hf_hyperflow.finetune import finetune, query_accuracy

    accuracies = []
    for j, episode in enumerate(episodes):
        support = adapter.pixel_values(episode.support_images)
        labels = torch.as_tensor(episode.support_labels)
        query = adapter.pixel_values(episode.query_images)
        query_labels = torch.as_tensor(episode.query_labels)
        if lr is None:
            task = adapter.direct_transfer(support, labels)
        else:
            task = finetune(adapter, support, labels, groups=tuple(variant.split("+")), steps=steps, lr=lr,
                            seed=j, augment_pool=augment_pool, optimizer=optimizer).task
        accuracies.append(100.0 * query_accuracy(task, query, query_labels))
    return accuracies


def summarise(records: dict[tuple, dict]) -> list[str]:
    """Per source / size / first block / variant: the lr chosen on the first half, the paired gain on the rest."""
    from hf_hyperflow.stats import paired_difference

    cells: dict[tuple, dict] = {}
    for (source, size, first_block, variant, lr, steps, optimizer), row in records.items():
        label = cell_label(variant, steps, optimizer)
        cells.setdefault((source, size, first_block), {}).setdefault(label, {})[lr] = row
    lines = ["| source | px | adapted blocks | variant | lr (chosen on episodes 1-h) | gain vs dt on episodes h+1-n "
             "(paired, 95% CI) | dt accuracy | s per task |", "|---|---|---|---|---|---|---|---|"]
    for (source, size, first_block), variants in sorted(cells.items()):
        dt = variants.get("dt", {}).get(None)
        if dt is None:
            continue
        dt_acc = dt["accuracy"]
        half = len(dt_acc) // 2
        for variant, by_lr in sorted(variants.items()):
            if variant == "dt":
                continue
            best_lr = max(by_lr, key=lambda lr: sum(by_lr[lr]["accuracy"][:half]))
            row = by_lr[best_lr]
            gain, ci = paired_difference(row["accuracy"][half:], dt_acc[half:len(row["accuracy"])])
            lines.append(f"| {source} | {size} | {-first_block} | {variant} | {best_lr:g} | {gain:+.2f} ±{ci:.2f} | "
                         f"{sum(dt_acc[half:]) / len(dt_acc[half:]):.2f} | {row['seconds_per_task']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--source", action="append", required=True, help="NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES]")
    parser.add_argument("--sizes", default="64,96,128")
    parser.add_argument("--first-blocks", default="-2,-4")
    parser.add_argument("--variants", default="shift,lora,lora+shift,head,blocks")
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="fine-tuning's steps: Adam (the P>M>F protocol) or plain gradient steps")
    parser.add_argument("--augment-pool", type=int, default=4,
                        help="pseudo-queries drawn from N augmented copies of the support (0: augment anew each step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/teacher_study"))
    parser.add_argument("--outside-training", action="append", default=[], metavar="NAME",
                        help="a --source held out of meta-training as a whole: episodes over every class")
    parser.add_argument("--low-resolution", action="append", default=[], metavar="NAME=PIXELS",
                        help="show a --source's images as thumbnails of at most PIXELS on a side, enlarged back")
    args = parser.parse_args(argv)
    from benchmarks.validation import check_source_flags, parse_low_resolution

    sources = [parse_source(s) for s in args.source]
    low_resolution = parse_low_resolution(args.low_resolution)
    check_source_flags(sources, {"--outside-training": args.outside_training, "--low-resolution": list(low_resolution)})
    import torch
    from transformers import AutoModel

    from hf_hyperflow.pretrained import build_efficientnet_lite0

    if not (args.backbone / "config.json").exists():
        build_efficientnet_lite0(args.backbone)
    args.output.mkdir(parents=True, exist_ok=True)
    log = args.output / "records.jsonl"
    records = load_records(log)
    lrs = [float(x) for x in args.lrs.split(",")]
    torch.manual_seed(args.seed)
    for size in (int(x) for x in args.sizes.split(",")):
        for first_block in (int(x) for x in args.first_blocks.split(",")):
            adapter = make_adapter(AutoModel.from_pretrained(args.backbone).eval(), size, first_block)
            for source in sources:
                episodes = episodes_for(source, args.episodes, args.seed, source["name"] in args.outside_training,
                                        low_resolution.get(source["name"]))
                cells = [("dt", None)] + [(v, lr) for v in args.variants.split(",") for lr in lrs]
                for variant, lr in cells:
                    key = record_key(source["name"], size, first_block, variant, lr, args.steps, args.optimizer)
                    if key in records:
                        continue
                    start = time.perf_counter()
                    accuracy = run_cell(adapter, episodes, variant, lr, args.steps, args.augment_pool or None,
                                        args.optimizer)
                    row = {"source": source["name"], "size": size, "first_block": first_block, "variant": variant,
                           "lr": lr, "steps": args.steps, "optimizer": args.optimizer, "accuracy": accuracy,
                           "seconds_per_task": (time.perf_counter() - start) / len(episodes)}
                    records[key] = row
                    with log.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"{source['name']} {size}px blocks {-first_block} "
                          f"{cell_label(variant, args.steps, args.optimizer)} lr {lr}: "
                          f"{sum(accuracy) / len(accuracy):.2f} ({row['seconds_per_task']:.1f} s/task)", flush=True)
    command = "python benchmarks/teacher_study.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = ["# Teacher study: fine-tuning gains over direct transfer on validation classes", "",
            f"Command: `{command}`", "", __doc__.split("\n\n", 2)[2].strip(), "", *summarise(records), ""]
    (args.output / "README.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
