"""Episodic evaluation of direct transfer, gradient fine-tuning and HyperFlow on the same seeded episodes.

    python recipes/evaluate.py --backbone PATH_OR_ID --adapter PATH_OR_ID --dataset PATH_OR_ID [--dataset ...]
        --episodes 600 --protocol md|fixed --ways N --shots K --queries Q --methods dt,ft-shift,hyperflow
        [--episodes-per-method ft-full=100] [--steps-sweep 1,2,4,8] --output DIR

A dataset is a Hub id, a ``load_from_disk`` folder, a parquet file or an image folder, optionally named
``name=path``; its test classes are used (``--split``), its validation classes choose the fine-tuning lr.
Writes results.json, results.md and PNG plots to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

import torch


def parse_pairs(values: list[str], what: str) -> dict[str, int]:
    pairs = {}
    for value in values:
        name, _, count = value.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise SystemExit(f"error: {what} takes METHOD=COUNT with a positive count, got {value!r}")
        pairs[name] = int(count)
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, help="AutoModel folder or Hub id")
    parser.add_argument("--adapter", default=None,
                        help="HyperFlow adapter folder or Hub id (needed for the hyperflow methods)")
    parser.add_argument("--revision", default=None, help="revision of a Hub adapter")
    parser.add_argument("--dataset", action="append", required=True, help="[NAME=]PATH_OR_ID, repeatable")
    parser.add_argument("--split", default="test", help="class split evaluated (train / validation / test / all)")
    parser.add_argument("--class-split", default=None, type=Path, help="JSON class split (default: made by seed 0)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--episodes-per-method", nargs="*", default=[], metavar="METHOD=COUNT")
    parser.add_argument("--protocol", choices=["fixed", "md"], default="fixed")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--methods", default="dt,ft-shift,hyperflow")
    parser.add_argument("--image-size", type=int, default=None, help="resize side (default: the adapter's)")
    parser.add_argument("--ft-steps", type=int, default=50)
    parser.add_argument("--lr-grid", default="0,1e-4,1e-3,1e-2")
    parser.add_argument("--lr-episodes", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="fixed fine-tuning lr (skips the selection)")
    parser.add_argument("--memory-episodes", type=int, default=2)
    parser.add_argument("--batch-tasks", type=int, default=8, help="tasks adapted together for the throughput row")
    parser.add_argument("--steps-sweep", default="", help="e.g. 1,2,4,8,16: accuracy vs integration steps")
    parser.add_argument("--sweep-integrators", default="euler,rk4")
    parser.add_argument("--sweep-episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
    from hf_hyperflow.episodes import ClassSplit, load_image_dataset
    from hf_hyperflow.evaluation import Evaluator, machine_description, parse_method, run_evaluation
    from hf_hyperflow.results import write_outputs

    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        parsed = [parse_method(m) for m in methods]
        per_method = parse_pairs(args.episodes_per_method, "--episodes-per-method")
        unknown = sorted(set(per_method) - set(methods))
        if unknown:
            raise ValueError(f"--episodes-per-method names {unknown}, which are not in --methods {methods}.")
        if any(m.kind == "hyperflow" for m in parsed) and args.adapter is None:
            raise ValueError("the hyperflow methods need --adapter (a trained HyperFlow adapter folder or Hub id).")
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}.")
        lr_grid = [float(x) for x in args.lr_grid.split(",") if x]
        sweep_steps = [int(x) for x in args.steps_sweep.split(",") if x]
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    torch.manual_seed(args.seed)
    backbone = AutoModel.from_pretrained(args.backbone).eval()
    if args.adapter:
        adapter = HyperFlowAdapter.from_pretrained(backbone, args.adapter, revision=args.revision)
    else:
        adapter = HyperFlowAdapter(backbone, HyperFlowConfig(image_size=args.image_size))
    if args.image_size and args.image_size != adapter.config.image_size:
        from hf_hyperflow.inputs import default_image_processor

        adapter.image_processor = default_image_processor(adapter.backbone, args.image_size)
    class_split = ClassSplit.load(args.class_split) if args.class_split else None
    split = None if args.split == "all" else args.split
    sampler_kwargs = {"protocol": args.protocol, "split": split, "class_split": class_split}
    if args.protocol == "fixed":
        sampler_kwargs.update(ways=args.ways, shots=args.shots, queries=args.queries)
    datasets = {}
    for spec in args.dataset:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        datasets[name or Path(path).name or path] = load_image_dataset(path)

    evaluator = Evaluator(adapter, methods, ft_steps=args.ft_steps, lr_grid=lr_grid, lr_episodes=args.lr_episodes,
                          fixed_lr=args.lr, memory_episodes=args.memory_episodes, seed=args.seed,
                          progress=not args.no_progress)
    meta = {
        "backbone": str(args.backbone), "adapter": str(args.adapter), "protocol": args.protocol,
        "ways": args.ways if args.protocol == "fixed" else None,
        "shots": args.shots if args.protocol == "fixed" else None,
        "queries": args.queries if args.protocol == "fixed" else None,
        "image_size": int(adapter.config.image_size if not args.image_size else args.image_size),
        "machine": machine_description(),
        "date": date.today().isoformat(),
        "command": "python recipes/evaluate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "split": args.split, "seed": args.seed, "ft_steps": args.ft_steps,
    }
    domains = {name: (dataset, sampler_kwargs) for name, dataset in datasets.items()}
    results, sweeps = run_evaluation(evaluator, domains, episodes=args.episodes, meta=meta,
                                     episodes_per_method=per_method, batch_tasks=args.batch_tasks,
                                     sweep_steps=sweep_steps if args.adapter else (),
                                     sweep_integrators=args.sweep_integrators.split(","),
                                     sweep_episodes=args.sweep_episodes)
    paths = write_outputs(results, args.output, sweeps)
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return results


if __name__ == "__main__":
    main()
