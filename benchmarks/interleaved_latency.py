"""Adaptation time of two or more adapters over direct transfer, measured in one run on the same seeded episodes,
interleaved: on each episode direct transfer and every adapter's ``adapt`` run one after the other, their order
rotated from episode to episode, so that a change of the machine's load falls on all of them alike.

    python benchmarks/interleaved_latency.py --adapter e10=runs/e10/final --adapter e11b=runs/e11b \
        --source glyphs_2shot=data/glyphs:script:2:3 --class-splits runs/e10/class_splits \
        --episodes 60 --output runs/latency_e10_e11b

Sources as in ``benchmarks/validation.py`` (the same flags, the same seeded episodes for the same ``--seed``).
Every adapter runs on the same backbone weights and must use the same image size (the episodes are prepared once).
Per source: each adapter's mean adaptation time over direct transfer's mean (``latency_vs_dt``, as the validation
runs report it), and each later adapter's paired difference from the first, per episode in units of dt's mean
time, with its 95% CI. ``results.json`` and ``results.md`` in ``--output``. One torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.validation import add_source_arguments, checked_sources, domains_from_arguments  # noqa: E402


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``["LABEL=PATH", ...]`` -> ``{label: path}`` in order; SystemExit for a malformed or repeated label."""
    adapters: dict[str, Path] = {}
    for value in values:
        label, _, path = value.partition("=")
        if not label or not path:
            raise SystemExit(f"error: --adapter takes LABEL=PATH, got {value!r}")
        if label in adapters or label == "dt":
            raise SystemExit(f"error: --adapter label {label!r} is repeated or reserved (dt)")
        adapters[label] = Path(path)
    if len(adapters) < 2:
        raise SystemExit("error: give at least two --adapter LABEL=PATH to compare")
    return adapters


def time_source(adapters: dict, dataset, sampler_kwargs: dict, episodes: int, seed: int) -> dict[str, list[float]]:
    """``label -> [episodes]`` adaptation seconds of ``"dt"`` (the first adapter's direct transfer) and of every
    adapter's ``adapt`` (its own stopping rule), interleaved with a rotating order; one unrecorded warm-up episode."""
    import torch

    from hf_hyperflow.episodes import EpisodeSampler
    from hf_hyperflow.evaluation import _clock

    first = next(iter(adapters.values()))
    calls = {"dt": lambda s, y: first.direct_transfer(s, y),
             **{label: (lambda s, y, a=adapter: a.adapt(s, y)) for label, adapter in adapters.items()}}
    sampler = EpisodeSampler(dataset, **{**sampler_kwargs, "num_episodes": episodes, "seed": seed})
    times: dict[str, list[float]] = {label: [] for label in calls}
    order = list(calls)
    for i in range(-1, episodes):
        episode = sampler[max(i, 0)]
        support = first.pixel_values(episode.support_images)
        labels = torch.as_tensor(episode.support_labels)
        rotation = order[i % len(order):] + order[:i % len(order)]
        for label in rotation:
            start = _clock()
            calls[label](support, labels)
            if i >= 0:
                times[label].append(_clock() - start)
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    """Per adapter: mean seconds, ``latency_vs_dt``, and (after the first) the paired per-episode difference from
    the first adapter in units of dt's mean time, mean and 95% CI half width."""
    from hf_hyperflow.stats import paired_difference

    dt_mean = sum(times["dt"]) / len(times["dt"])
    labels = [label for label in times if label != "dt"]
    rows = {"dt": {"adapt_latency_s": dt_mean}}
    for label in labels:
        mean = sum(times[label]) / len(times[label])
        row = {"adapt_latency_s": mean, "latency_vs_dt": mean / dt_mean}
        if label != labels[0]:
            diff, half = paired_difference([t / dt_mean for t in times[label]],
                                           [t / dt_mean for t in times[labels[0]]])
            row[f"minus_{labels[0]}_vs_dt"] = {"mean": diff, "ci95": half}
        rows[label] = row
    return rows


def markdown(results: dict) -> str:
    """The table of ``results.json``: one row per source."""
    labels = [label for label in next(iter(results["sources"].values())) if label != "dt"]
    first = labels[0]
    header = (["source", "dt (ms)"] + [f"{label} / dt" for label in labels]
              + [f"{label} minus {first} (x dt)" for label in labels[1:]])
    lines = [f"# Interleaved adaptation time\n\n`{results['command']}`\n\n{results['machine']}, {results['date']}; "
             f"{results['episodes']} episodes per source, one warm-up episode.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rows in results["sources"].items():
        cells = [name, f"{1000 * rows['dt']['adapt_latency_s']:.1f}"]
        cells += [f"{rows[label]['latency_vs_dt']:.2f}x" for label in labels]
        cells += [f"{rows[label][f'minus_{first}_vs_dt']['mean']:+.3f} ±{rows[label][f'minus_{first}_vs_dt']['ci95']:.3f}"
                  for label in labels[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--adapter", action="append", required=True, metavar="LABEL=PATH",
                        help="an adapter folder under a label (repeat: the first is the reference)")
    add_source_arguments(parser)
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    paths = parse_adapters(args.adapter)
    sources, low_resolution = checked_sources(args)
    import torch
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.evaluation import machine_description

    torch.set_num_threads(args.threads)
    adapters = {label: HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.backbone).eval(), path)
                for label, path in paths.items()}
    sizes = {label: int(adapter.config.image_size) for label, adapter in adapters.items()}
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"error: the adapters' image sizes differ ({sizes}); compare adapters of one image size")
    results = {"command": "python benchmarks/interleaved_latency.py " + " ".join(shlex.quote(a) for a in
                                                                                  (argv or sys.argv[1:])),
               "machine": machine_description(), "date": date.today().isoformat(), "episodes": args.episodes,
               "threads": args.threads, "adapters": {label: str(path) for label, path in paths.items()}, "sources": {}}
    for name, (dataset, sampler_kwargs) in domains_from_arguments(args, sources, low_resolution).items():
        times = time_source(adapters, dataset, sampler_kwargs, args.episodes, args.seed)
        results["sources"][name] = summarise(times)
        print(name, {label: round(row.get("latency_vs_dt", 1.0), 3) for label, row in results["sources"][name].items()},
              flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    (args.output / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
