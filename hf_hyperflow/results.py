"""Evaluation results: the ``results.json`` schema, its Markdown tables, and every plot of them.

Schema: ``{"meta": {...}, "results": {dataset: {method: {"accuracy", "ci95", "episodes", ...}}}}`` plus optional
``details`` (per dataset: ``episode_rows``, the ``[support rows, query rows]`` of each episode, stored once since
every method runs on a prefix of the same seeded episodes, and ``per_episode_accuracy`` per method),
``batched_throughput`` and ``steps_sweep``. Files are compact: arrays of numbers on one line (:func:`results_json`). Plots use
matplotlib's object API with one style (:data:`PLOT_STYLE`); nothing changes matplotlib's global backend.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .checks import is_number
from .io import read_json_checked

__all__ = ["validate_results", "load_results", "results_markdown", "result_rows", "gain_fraction",
           "save_results_plot", "save_steps_plot", "write_outputs", "results_json", "compact_rows", "format_seconds",
           "format_ratio", "format_bytes", "protocol_text", "headline_method", "PLOT_STYLE"]

# The one look of every plot: matplotlib rc settings applied while a figure is drawn and saved.
PLOT_STYLE = {"axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 7, "savefig.dpi": 110,
              "errorbar.capsize": 3}


# ---------------------------------------------------------------------------------------------- schema
_OPTIONAL_NUMBERS = ("adapt_latency_s", "query_latency_s", "peak_memory_bytes", "latency_vs_dt",
                     "latency_vs_ft_full", "memory_vs_ft_full")
_META_STRINGS = ("backbone", "adapter", "protocol", "machine", "date", "command")
_META_INTS = ("ways", "shots", "queries", "image_size")


def validate_results(data: Any, source: str = "results") -> dict:
    """Check an evaluation ``results.json`` object; returns it unchanged.

    Schema: ``{"meta": {...}, "results": {dataset: {method: {"accuracy", "ci95", "episodes", ...}}}}`` with
    accuracy and ci95 in percent; the latency / memory fields and their ratios are optional numbers >= 0.

    Raises:
        ValueError: naming ``source`` and the first field that does not fit.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with 'meta' and 'results', got {type(data).__name__}.")
    missing = [k for k in ("meta", "results") if k not in data]
    if missing:
        raise ValueError(f"{source}: missing {missing}; an evaluation results file has 'meta' and 'results'.")
    meta = data["meta"]
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: 'meta' must be an object, got {type(meta).__name__}.")
    for key in ("backbone", "protocol"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"{source}: meta.{key} must be a non-empty string, got {meta.get(key)!r}.")
    for key in _META_STRINGS:
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"{source}: meta.{key} must be a string, got {meta[key]!r}.")
    for key in _META_INTS:
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{source}: meta.{key} must be a positive integer (or null), got {value!r}.")
    results = data["results"]
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{source}: 'results' must be a non-empty object {{dataset: {{method: metrics}}}}.")
    for dataset, methods in results.items():
        if not isinstance(methods, dict) or not methods:
            raise ValueError(f"{source}: results[{dataset!r}] must be a non-empty object {{method: metrics}}.")
        for method, metrics in methods.items():
            where = f"{source}: results[{dataset!r}][{method!r}]"
            if not isinstance(metrics, dict):
                raise ValueError(f"{where} must be an object of metrics, got {type(metrics).__name__}.")
            accuracy = metrics.get("accuracy")
            if not is_number(accuracy) or not 0 <= accuracy <= 100:
                raise ValueError(f"{where}.accuracy must be a number in [0, 100] (percent), got {accuracy!r}.")
            ci95 = metrics.get("ci95")
            if not is_number(ci95) or ci95 < 0:
                raise ValueError(f"{where}.ci95 must be a number >= 0 (percent), got {ci95!r}.")
            episodes = metrics.get("episodes")
            if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes <= 0:
                raise ValueError(f"{where}.episodes must be a positive integer, got {episodes!r}.")
            for key in _OPTIONAL_NUMBERS:
                value = metrics.get(key)
                if value is not None and (not is_number(value) or value < 0):
                    raise ValueError(f"{where}.{key} must be a number >= 0 (or absent), got {value!r}.")
    return data


def load_results(path: str | os.PathLike) -> dict:
    """Read and check an evaluation ``results.json`` (schema: :func:`validate_results`).

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not JSON, or not the results schema.
    """
    return validate_results(read_json_checked(path), source=str(path))


def headline_method(results: dict, eval_method: str | None) -> str:
    """The results' method that is an adapter's own: ``eval_method``, else ``"hyperflow"``, else the only
    ``"hyperflow*"`` method; ValueError when that cannot be told."""
    methods = list(dict.fromkeys(m for per_dataset in results["results"].values() for m in per_dataset))
    if eval_method is not None:
        if eval_method not in methods:
            raise ValueError(f"eval_method {eval_method!r} is not in the results; they have {methods}.")
        return eval_method
    if "hyperflow" in methods:
        return "hyperflow"
    candidates = [m for m in methods if m.startswith("hyperflow")]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"Cannot tell which method of {methods} is this adapter's: pass eval_method= (the method "
                     "whose accuracy goes into the card metadata).")


# ---------------------------------------------------------------------------------------------- tables
def protocol_text(meta: dict) -> str:
    """The episode protocol of a results' meta block in words, e.g. ``5-way 5-shot, 15 queries per class, ...``."""
    ways, shots, queries = meta.get("ways"), meta.get("shots"), meta.get("queries")
    if ways and shots:
        parts = [f"{ways}-way {shots}-shot"]
    elif ways and meta.get("protocol") == "fixed":
        parts = [f"{ways}-way, shots and queries per dataset"]
    else:
        parts = ["variable-way variable-shot"]
    if queries:
        parts.append(f"{queries} queries per class")
    if meta.get("image_size"):
        parts.append(f"{meta['image_size']} px images")
    parts.append(f"{meta['protocol']} episodes")
    return ", ".join(parts)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}×"


def format_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def result_rows(results: dict, headline: str | None) -> list[dict[str, str]]:
    """One row of formatted cells per (dataset, method); the ``headline`` method in bold."""
    rows = []
    for dataset, methods in results["results"].items():
        for method, metrics in methods.items():
            rows.append({
                "dataset": dataset,
                "method": f"**{method}**" if method == headline else method,
                "accuracy": f"{metrics['accuracy']:.1f}",
                "ci95": f"± {metrics['ci95']:.1f}",
                "episodes": str(metrics["episodes"]),
                "adapt": format_seconds(metrics.get("adapt_latency_s")),
                "query": format_seconds(metrics.get("query_latency_s")),
                "memory": format_bytes(metrics.get("peak_memory_bytes")),
                "latency_vs_dt": format_ratio(metrics.get("latency_vs_dt")),
                "latency_vs_ft_full": format_ratio(metrics.get("latency_vs_ft_full")),
                "memory_vs_ft_full": format_ratio(metrics.get("memory_vs_ft_full")),
            })
    return rows


def gain_fraction(summary: dict[str, dict], method: str = "hyperflow", reference: str = "ft-shift") -> float | None:
    """``(acc[method] - acc[dt]) / (acc[reference] - acc[dt])``: the share of the reference's gain over dt
    (None when the reference does not beat dt)."""
    if not {"dt", method, reference} <= set(summary):
        return None
    gain = summary[reference]["accuracy"] - summary["dt"]["accuracy"]
    if gain <= 1e-9:  # the reference does not beat dt: no gain to take a share of
        return None
    return (summary[method]["accuracy"] - summary["dt"]["accuracy"]) / gain


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def _paired(row: dict) -> str:
    if row.get("gain_vs_dt") is None:
        return "-"
    return f"{row['gain_vs_dt']:+.2f} ±{row['gain_vs_dt_ci95']:.2f}"


def results_markdown(results: dict) -> str:
    """The results as Markdown tables, one per dataset."""
    meta = results.get("meta", {})
    lines = [f"Protocol: {meta.get('protocol')}, ways {meta.get('ways')}, shots {meta.get('shots')}, queries "
             f"{meta.get('queries')}, image size {meta.get('image_size')} px; machine: {meta.get('machine')}; "
             f"date {meta.get('date')}.", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    for dataset, methods in results["results"].items():
        lines += [f"### {dataset}", "",
                  "| method | accuracy % | 95% CI | episodes | gain vs dt (paired) | share of best ft | adapt s | "
                  "query s | peak memory | vs dt (time) | vs ft-full (time) | vs ft-full (memory) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in methods.items():
            memory = row.get("peak_memory_bytes")
            lines.append(
                f"| {name} | {row['accuracy']:.2f} | ±{row['ci95']:.2f} | {row['episodes']} | "
                f"{_paired(row)} | {_fmt(row.get('share_of_best_ft'), '{:.0%}')} | "
                f"{row['adapt_latency_s']:.4f} | {row['query_latency_s']:.4f} | "
                f"{_fmt(memory / 2**20 if memory is not None else None, '{:.1f} MiB')} | "
                f"{_fmt(row.get('latency_vs_dt'), '{:.2f}x')} | {_fmt(row.get('latency_vs_ft_full'), '{:.4f}x')} | "
                f"{_fmt(row.get('memory_vs_ft_full'), '{:.3f}x')} |")
        best = next((row["best_ft"] for row in methods.values() if row.get("best_ft")), None)
        if best:
            lines += ["", f"Paired gains: mean over the same episodes of (method - dt), ±95% CI. Share of best ft: "
                          f"the method's paired gain on the first {methods[best]['episodes']} episodes over that of "
                          f"{best}, the fine-tuning variant that gains most here."]
        share = gain_fraction(methods)
        if share is not None:
            lines.append("")
            lines.append(f"hyperflow's accuracy gain over dt is {100 * share:.0f}% of ft-shift's gain.")
        elif {"dt", "ft-shift", "hyperflow"} <= set(methods):
            lines.append("")
            lines.append("ft-shift does not beat dt here, so there is no gain to compare with.")
        lines.append("")
    extra = results.get("batched_throughput")
    if extra:
        lines += ["### Many tasks at once", ""]
        for dataset, row in extra.items():
            lines.append(f"- {dataset}: {row['tasks']} tasks; one by one {row['one_by_one_tasks_per_s']:.2f} tasks/s, "
                         f"batched {row['batched_tasks_per_s']:.2f} tasks/s ({row['speedup']:.2f}x).")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
@contextmanager
def _figure(panels: int, columns: int, size: tuple[float, float]) -> Iterator[tuple[Any, list]]:
    """A matplotlib Figure (Agg canvas, :data:`PLOT_STYLE`) with ``panels`` axes on a grid of ``columns``."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = math.ceil(panels / columns)
    with matplotlib.rc_context(PLOT_STYLE):
        figure = Figure(figsize=(size[0] * columns, size[1] * rows), constrained_layout=True)
        FigureCanvasAgg(figure)
        yield figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def save_results_plot(results: dict, path: str | os.PathLike, *, highlight: str | None = None) -> Path:
    """Draw accuracy (with its 95% CI) against adaptation latency, one panel per dataset, into ``path`` (PNG).

    Raises:
        ValueError: the results are not the results schema, or no method has ``adapt_latency_s``.
    """
    validate_results(results)
    datasets = [d for d, methods in results["results"].items()
                if any(m.get("adapt_latency_s") for m in methods.values())]
    if not datasets:
        raise ValueError("No method in the results has adapt_latency_s > 0: there is no latency to plot.")
    methods = list(dict.fromkeys(m for d in datasets for m in results["results"][d]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method across panels
    with _figure(len(datasets), min(3, len(datasets)), (4.2, 3.4)) as (figure, panels):
        for axes, dataset in zip(panels, datasets, strict=True):
            for method, metrics in results["results"][dataset].items():
                latency = metrics.get("adapt_latency_s")
                if not latency:
                    continue
                strong = method == highlight
                axes.errorbar(latency, metrics["accuracy"], yerr=metrics["ci95"], fmt="*" if strong else "o",
                              color=colours[method], markersize=11 if strong else 6, label=method)
            axes.set_xscale("log")
            axes.set_xlabel("adaptation latency per task (s, log)")
            axes.set_ylabel("accuracy (%) ± 95% CI")
            axes.set_title(dataset)
            axes.legend()
        return _save(figure, path)


def save_steps_plot(sweeps: dict, path: str | os.PathLike) -> Path:
    """Accuracy against the number of integration steps, one line per integrator, one panel per dataset.

    ``sweeps``: ``{dataset: {integrator: {"steps": [...], "accuracy": [...], "ci95": [...]}}}``.
    """
    datasets = list(sweeps)
    with _figure(len(datasets), len(datasets), (5.0, 4.0)) as (figure, panels):
        for axes, dataset in zip(panels, datasets, strict=True):
            for integrator, points in sweeps[dataset].items():
                axes.errorbar(points["steps"], points["accuracy"], yerr=points["ci95"], marker="o", label=integrator)
            axes.set_xscale("log", base=2)
            axes.set_xlabel("integration steps")
            axes.set_ylabel("accuracy (%) ± 95% CI")
            axes.set_title(dataset)
            axes.legend()
        return _save(figure, path)


# ---------------------------------------------------------------------------------------------- files
def compact_rows(episode_rows: dict[str, list] | list) -> list:
    """The episode rows of a domain stored once: every method runs on a prefix of the same seeded episode
    sequence, so the longest method's rows hold everyone's. Rows already stored once are returned as they are.

    Raises:
        ValueError: methods whose rows are not prefixes of one sequence (not the same episodes).
    """
    if isinstance(episode_rows, list):
        return episode_rows
    longest = max(episode_rows.values(), key=len, default=[])
    for method, rows in episode_rows.items():
        if rows != longest[: len(rows)]:
            raise ValueError(f"The episodes of {method!r} are not a prefix of the others': these results do not come "
                             f"from one seeded episode sequence, and their rows cannot be stored once.")
    return longest


def results_json(results: dict) -> str:
    """``results`` as JSON text: objects indented; an array of numbers, or of such arrays (one episode's rows), on
    one line; longer nestings (the episodes of a domain) one item a line."""
    arrays: list[str] = []

    def inline(value):
        if isinstance(value, dict):
            return {key: inline(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            if _depth(value) <= 2:
                arrays.append(json.dumps(value, separators=(",", ":")))
                return f"\0{len(arrays) - 1}\0"
            return [inline(item) for item in value]
        return value

    text = json.dumps(inline(results), indent=1)
    return re.sub(r'"\\u0000(\d+)\\u0000"', lambda match: arrays[int(match.group(1))], text) + "\n"


def _depth(value) -> float:
    """How deep arrays nest in ``value`` (1: an array of numbers); infinite when it holds an object."""
    if isinstance(value, dict):
        return float("inf")
    if isinstance(value, (list, tuple)):
        return 1 + max((_depth(item) for item in value), default=0)
    return 0


def write_outputs(results: dict, output_dir: str | Path, sweeps: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.md and the plots into ``output_dir``; returns their paths."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "markdown": output / "results.md"}
    paths["json"].write_text(results_json(results))
    markdown = results_markdown(results)
    paths["plot"] = save_results_plot({"meta": results["meta"], "results": results["results"]},
                                      output / "accuracy_vs_latency.png")
    markdown += "\n![accuracy vs adaptation latency](accuracy_vs_latency.png)\n"
    if sweeps:
        paths["steps_plot"] = save_steps_plot(sweeps, output / "accuracy_vs_steps.png")
        markdown += "\n![accuracy vs integration steps](accuracy_vs_steps.png)\n"
    paths["markdown"].write_text(markdown)
    return paths
