"""Direct transfer and HyperFlow variants on the validation classes of the meta-training sources: the figure
every method choice (architecture, losses, steps, stopping) is made on.

    python benchmarks/validation.py --adapter runs/X/best --class-splits runs/X/class_splits \
        --source glyphs=data/glyphs:script --source emoji=data/emoji:category:1:3 \
        --methods dt,hyperflow,hyperflow:auto --episodes 200 --output runs/X/validation

A source is ``NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES]`` (5-way; default 5 shots, 15 queries). Its class split is
``<class-splits>/<NAME>.json`` when that file exists (the run's own), else ``ClassSplit.from_dataset(dataset,
group_column=GROUP_COLUMN, seed=0)``. Every method runs on the same seeded episodes; results.json / results.md
in ``--output`` carry the paired gains over dt. Fine-tuning methods (``ft-lora+shift``, ``ft-lora+shift:sgd:1``) choose
their lr per source from ``--lr-grid`` on other episodes of the same classes. ``--without-colour NAME`` shows a source's images in grey and
``--low-resolution NAME=PIXELS`` as thumbnails enlarged back (a second ``--source`` of the same folder under
another name gives both). ``--outside-training NAME`` marks a source
that no training source covers (a domain held out of meta-training as a whole): its episodes draw on every class.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.teacher_study import parse_source  # noqa: E402


def validation_domains(sources: list[dict], class_splits: Path | None, without_colour: Sequence[str] = (),
                       outside_training: Sequence[str] = (),
                       low_resolution: Mapping[str, int] | None = None) -> dict[str, tuple]:
    """``name -> (dataset, sampler kwargs)`` of the sources' validation classes; the sources named in
    ``without_colour`` are shown in grey and those in ``low_resolution`` (name -> pixels) as thumbnails (as a
    training config's ``without_colour`` / ``low_resolution`` show them), those named in ``outside_training`` (no
    training source covers them) give episodes over every class."""
    from hf_hyperflow.episodes import ClassSplit, load_image_dataset
    from hf_hyperflow.inputs import domain_view

    low_resolution = low_resolution or {}

    domains = {}
    for source in sources:
        dataset = load_image_dataset(source["path"])
        # classes too small for the episode's shape are left out (wesnoth_units at 5 shots)
        shape = {"protocol": "fixed", "ways": 5, "shots": source["shots"], "queries": source["queries"],
                 "min_images_per_class": source["shots"] + source["queries"]}
        grey, side = source["name"] in without_colour, low_resolution.get(source["name"])
        transform = ({"image_transform": functools.partial(domain_view, grey=grey, low_resolution=side)}
                     if grey or side is not None else {})
        if source["name"] in outside_training:
            domains[f"{source['name']} (outside training)"] = (dataset, {**shape, **transform, "split": None})
            continue
        saved = class_splits / f"{source['name']}.json" if class_splits else None
        split = (ClassSplit.load(saved) if saved is not None and saved.is_file()
                 else ClassSplit.from_dataset(dataset, group_column=source["group_column"], seed=0))
        domains[f"{source['name']} (validation)"] = (dataset, {**shape, **transform, "split": "validation",
                                                               "class_split": split})
    return domains


def check_source_flags(sources: list[dict], flags: dict[str, Sequence[str]]) -> None:
    """SystemExit when a flag (``"--without-colour" -> names``) names a source that no ``--source`` gives; to be
    called before any model or dataset is loaded."""
    names = {source["name"] for source in sources}
    for flag, named in flags.items():
        if set(named) - names:
            raise SystemExit(f"error: {flag} names no --source: {sorted(set(named) - names)}")


def parse_low_resolution(values: Sequence[str]) -> dict[str, int]:
    """``["NAME=PIXELS", ...]`` -> ``{name: pixels}``; SystemExit naming a value that is not of that form."""
    sides = {}
    for value in values:
        name, _, pixels = value.partition("=")
        if not name or not pixels.isdigit() or int(pixels) < 1:
            raise SystemExit(f"error: --low-resolution takes NAME=PIXELS (a --source name and an integer >= 1), "
                             f"got {value!r}")
        sides[name] = int(pixels)
    return sides


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name validation sources and how they are shown (read back by :func:`domains_from_arguments`)."""
    parser.add_argument("--class-splits", type=Path, default=None, help="folder of <name>.json class splits")
    parser.add_argument("--source", action="append", required=True, help="NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES]")
    parser.add_argument("--without-colour", action="append", default=[], metavar="NAME",
                        help="show this source's images in grey (repeatable)")
    parser.add_argument("--low-resolution", action="append", default=[], metavar="NAME=PIXELS",
                        help="show this source's images as thumbnails of at most PIXELS on a side, enlarged back "
                             "(repeatable)")
    parser.add_argument("--outside-training", action="append", default=[], metavar="NAME",
                        help="a source no training source covers: episodes over every class (repeatable)")


def checked_sources(args: argparse.Namespace) -> tuple[list[dict], dict[str, int]]:
    """``(sources, low resolution per name)`` of :func:`add_source_arguments`' flags; SystemExit where a flag names
    no source (before any model or dataset is loaded)."""
    sources = [parse_source(s) for s in args.source]
    low_resolution = parse_low_resolution(args.low_resolution)
    check_source_flags(sources, {"--without-colour": args.without_colour, "--outside-training": args.outside_training,
                                 "--low-resolution": list(low_resolution)})
    return sources, low_resolution


def domains_from_arguments(args: argparse.Namespace, sources: list[dict], low_resolution: dict[str, int]) -> dict:
    """:func:`validation_domains` of the flags of :func:`add_source_arguments`."""
    return validation_domains(sources, args.class_splits, args.without_colour, args.outside_training, low_resolution)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--adapter", type=Path, required=True)
    add_source_arguments(parser)
    parser.add_argument("--methods", default="dt,hyperflow,hyperflow:auto")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--lr-grid", default="0,1e-4,1e-3,1e-2",
                        help="learning rates the ft-* methods choose from, per source (comma-separated)")
    parser.add_argument("--lr-episodes", type=int, default=5, help="episodes the lr is chosen on, per source")
    parser.add_argument("--ft-augment-pool", type=int, default=4,
                        help="fine-tuning's pseudo-queries from N augmented copies of the support (0: anew each step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    sources, low_resolution = checked_sources(args)
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.evaluation import Evaluator, machine_description, run_evaluation
    from hf_hyperflow.results import write_outputs

    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.backbone).eval(), args.adapter)
    evaluator = Evaluator(adapter, args.methods.split(","), lr_grid=[float(x) for x in args.lr_grid.split(",")],
                          lr_episodes=args.lr_episodes, ft_augment_pool=args.ft_augment_pool or None, memory_episodes=0,
                          seed=args.seed, progress=False)
    meta = {"backbone": str(args.backbone), "adapter": str(args.adapter), "protocol": "fixed", "ways": 5,
            "shots": None, "queries": None, "image_size": int(adapter.config.image_size),
            "machine": machine_description(), "date": date.today().isoformat(), "split": "validation",
            "command": "python benchmarks/validation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    domains = domains_from_arguments(args, sources, low_resolution)
    results, _ = run_evaluation(evaluator, domains, episodes=args.episodes, meta=meta, batch_tasks=0)
    paths = write_outputs(results, args.output)
    print(paths["markdown"].read_text())
    return results


if __name__ == "__main__":
    main()
