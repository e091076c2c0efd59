"""The domain gate's threshold scanned on validation runs: for each threshold, what gating the episodes beyond it
(direct transfer there, the method's own result elsewhere) changes on each source, from the validation driver's
per-episode results and each episode's distance to the training sources.

    python benchmarks/gate_study.py --adapter runs/X/final --results runs/X/validation/results.json \
        --results runs/X/outside_training/results.json --class-splits runs/X/class_splits \
        --source glyphs_2shot=data/glyphs:script:2:3 ... --outside-training stamps_5shot \
        --gates 1.9,2.0,2.1,2.2,2.3,2.4,2.5 --output runs/X/gate.md

The adapter folder holds the domain reference (``recipes/domain_reference.py`` fits it); the ``--source`` flags are
those of the validation runs (``benchmarks/validation.py``), whose seeded episodes are drawn again here and checked
against the runs' recorded rows. A task's distance needs only the first pass over its support (no integration), so
the scan costs a fraction of the validation run: the method's accuracies come from the runs, ``hyperflow:auto``
without a gate (the adapter's own ``domain_gate`` is not applied there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paired_runs import episode_accuracies  # noqa: E402
from benchmarks.validation import add_source_arguments, checked_sources, domains_from_arguments  # noqa: E402


def gated_accuracies(method: list[float], dt: list[float], distances: list[float], gate: float) -> list[float]:
    """Per episode, direct transfer's accuracy where the distance lies beyond ``gate``, else the method's."""
    return [d if distance > gate else m for m, d, distance in zip(method, dt, distances, strict=True)]


def gate_table(domains: dict[str, dict], gates: list[float]) -> str:
    """A markdown table: per threshold and domain, the paired difference of the gated method against the method
    without a gate (mean ±95% CI, points) and the share of episodes gated. ``domains``: name -> ``{"method": [...],
    "dt": [...], "distance": [...]}`` per episode."""
    from hf_hyperflow.stats import mean_confidence_interval

    names = list(domains)
    lines = ["| gate | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for gate in gates:
        cells = []
        for name in names:
            d = domains[name]
            gated = gated_accuracies(d["method"], d["dt"], d["distance"], gate)
            mean, half = mean_confidence_interval([g - m for g, m in zip(gated, d["method"], strict=True)])
            share = 100.0 * sum(x > gate for x in d["distance"]) / len(d["distance"])
            cells.append(f"{mean:+.2f} ±{half:.2f} ({share:.0f}%)")
        lines.append(f"| {gate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def episode_distances(adapter, dataset, sampler_kwargs: dict, rows: list, seed: int) -> list[float]:
    """The distance to the training sources of the support of each of the validation run's episodes (drawn again
    with the run's seed; SystemExit, before any pass, where they are not the run's ``rows``)."""
    from hf_hyperflow.episodes import EpisodeSampler
    from hf_hyperflow.training.reference import support_statistics

    sampler = EpisodeSampler(dataset, **{**sampler_kwargs, "num_episodes": len(rows), "seed": seed})
    for i, row in enumerate(rows):
        plan = sampler.plan(i)
        if [list(plan.support_indices), list(plan.query_indices)] != [list(x) for x in row]:
            raise SystemExit(f"error: episode {i} is not the validation run's (its rows differ): give the run's own "
                             "--source flags, class splits and --seed.")
    return adapter.domain_reference.distance(support_statistics(adapter, sampler, len(rows))).tolist()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--adapter", type=Path, required=True, help="an adapter folder with its domain reference")
    parser.add_argument("--results", type=Path, action="append", required=True,
                        help="a validation run's results.json (repeatable)")
    add_source_arguments(parser)
    parser.add_argument("--method", default="hyperflow:auto")
    parser.add_argument("--gates", default="1.9,2.0,2.1,2.2,2.3,2.4,2.5")
    parser.add_argument("--seed", type=int, default=0, help="the validation runs' --seed")
    parser.add_argument("--output", type=Path, required=True, help="markdown file")
    args = parser.parse_args(argv)
    sources, low_resolution = checked_sources(args)
    gates = [float(x) for x in args.gates.split(",")]
    import torch
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.results import load_results

    runs = [load_results(path) for path in args.results]
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.backbone).eval(), args.adapter)
    if adapter.domain_reference is None:
        raise SystemExit(f"error: {args.adapter} has no domain reference: fit one first (python "
                         f"recipes/domain_reference.py --config <its training config> --adapter {args.adapter}).")
    scanned = {}
    with torch.no_grad():
        for name, (dataset, sampler_kwargs) in domains_from_arguments(args, sources, low_resolution).items():
            run = next((r for r in runs if name in r.get("details", {})), None)
            if run is None:
                raise SystemExit(f"error: no --results file has the domain {name!r}.")
            rows = run["details"][name]["episode_rows"]
            scanned[name] = {"method": episode_accuracies(run, name, args.method),
                             "dt": episode_accuracies(run, name, "dt"),
                             "distance": episode_distances(adapter, dataset, sampler_kwargs, rows, args.seed)}
            print(f"{name}: {len(rows)} episodes", flush=True)
    table = gate_table(scanned, gates)
    command = "python benchmarks/gate_study.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    text = (f"# The domain gate scanned on validation runs\n\nCommand: `{command}`\n\nPaired difference of "
            f"{args.method} with the gate against without it (points, 95% CI) and the share of episodes gated:\n\n"
            f"{table}\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
