"""Two or more adapters compared on the same seeded episodes: each one's paired gain over direct transfer and the
paired difference of every later run against the first, per domain, from their results.json files.

    python benchmarks/paired_runs.py --method hyperflow:auto \
        shipped=runs/validation_shipped/results.json candidate=runs/validation_candidate/results.json

A run may name its own method after ``@`` (``step=runs/probe/results.json@ft-lora+shift:sgd:1``): two methods of
one results.json, or of two runs, compared on the same episodes.

The runs must have evaluated the same episodes (the same sources and seed: their support and query rows must agree,
or, in results without rows, dt's per-episode accuracies); the first run's dt is the reference, and only the domains
every run has are compared, on the episodes every run has. Differences are per episode
(the later run's accuracy minus the first's), mean and 95% CI in points.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.results import load_results  # noqa: E402
from hf_hyperflow.stats import mean_confidence_interval  # noqa: E402


def episode_accuracies(results: dict, domain: str, method: str) -> list[float]:
    """``[n]`` per-episode accuracies in percent of ``method`` on ``domain``."""
    per_method = results.get("details", {}).get(domain, {}).get("per_episode_accuracy", {})
    if method not in per_method:
        raise SystemExit(f"error: {domain!r} has no per-episode accuracies of {method!r} "
                         f"(methods: {sorted(per_method)}).")
    return [100.0 * a for a in per_method[method]]


def same_episodes(first: dict, other: dict, domain: str, count: int) -> bool:
    """Whether two runs' first ``count`` episodes of ``domain`` are the same: their support and query rows agree
    (results.json's ``episode_rows``), or, where a run has no rows, direct transfer's per-episode accuracies do.
    Rows, not accuracies, where there are rows: on another CPU a near tie of direct transfer's cosine scores can
    round the other way."""
    rows = [run.get("details", {}).get(domain, {}).get("episode_rows") for run in (first, other)]
    if all(r is not None and len(r) >= count for r in rows):
        return rows[0][:count] == rows[1][:count]
    return episode_accuracies(first, domain, "dt")[:count] == episode_accuracies(other, domain, "dt")[:count]


def _cell(values: list[float]) -> str:
    mean, half = mean_confidence_interval(values)
    return f"{mean:+.2f} ±{half:.2f}"


def paired_table(runs: dict[str, dict], method: str, methods: dict[str, str] | None = None) -> str:
    """A markdown table: per domain, dt's accuracy, each run's paired gain over dt and each later run's paired
    difference against the first run (``runs``: name -> results.json content, in order; ``methods``: name -> the
    method compared in that run, default ``method``)."""
    methods = {name: (methods or {}).get(name, method) for name in runs}
    names = list(runs)
    domains = [d for d in runs[names[0]]["results"] if all(d in r["results"] for r in runs.values())]
    if not domains:
        raise SystemExit("error: the runs have no domain in common.")
    first = names[0]
    header = (["domain", "episodes", "dt"] + [f"{n}: gain over dt" for n in names]
              + [f"{n} minus {first}" for n in names[1:]])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for domain in domains:
        dt = {n: episode_accuracies(r, domain, "dt") for n, r in runs.items()}
        count = min(len(v) for v in dt.values())
        for name in names[1:]:
            if not same_episodes(runs[first], runs[name], domain, count):
                raise SystemExit(f"error: {domain!r}: the episodes of {first!r} and {name!r} are not the same (their "
                                 "support and query rows differ, or, without rows, direct transfer does): sources, "
                                 "seed or backbone differ.")
        accuracy = {n: episode_accuracies(r, domain, methods[n])[:count] for n, r in runs.items()}
        base = dt[first][:count]
        gains = [_cell([a - b for a, b in zip(accuracy[n], base, strict=True)]) for n in names]
        differences = [_cell([a - b for a, b in zip(accuracy[n], accuracy[first], strict=True)]) for n in names[1:]]
        lines.append("| " + " | ".join([domain, str(count), f"{sum(base) / count:.2f}", *gains, *differences]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=RESULTS_JSON[@METHOD]", help="the first one is the reference")
    parser.add_argument("--method", default="hyperflow:auto", help="the method of the runs that name none")
    args = parser.parse_args(argv)
    runs, methods = {}, {}
    for item in args.runs:
        name, _, path = item.partition("=")
        path, _, method = path.partition("@")
        if not name or not path:
            raise SystemExit(f"error: runs are NAME=RESULTS_JSON[@METHOD], got {item!r}")
        if name in runs:
            raise SystemExit(f"error: the run name {name!r} is given twice; name each run once.")
        runs[name] = load_results(Path(path))
        methods[name] = method or args.method
    if len(runs) < 2:
        raise SystemExit("error: give at least two runs to compare.")
    table = paired_table(runs, args.method, methods)
    print(table)
    return table


if __name__ == "__main__":
    main()
