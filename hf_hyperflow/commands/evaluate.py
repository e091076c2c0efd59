"""Episodic evaluation of direct transfer, gradient fine-tuning and HyperFlow on the same seeded episodes:
:class:`EvaluateConfig` and :func:`run_evaluate`.

    hf-hyperflow evaluate --backbone PATH_OR_ID --adapter PATH_OR_ID --datasets "[PATH_OR_ID, NAME=PATH]"
        --episodes 600 --protocol md|fixed --ways N --shots K --queries Q --methods "[dt, ft-shift, hyperflow]"
        [--episodes_per_method "{ft-full: 100}"] [--steps_sweep "[1, 2, 4, 8]"] --output DIR
    hf-hyperflow evaluate --config_path evaluation.yaml [--key value ...]

A dataset is a Hub id, a ``load_from_disk`` folder, a parquet file or an image folder, optionally named
``name=path``; its test classes are used (``--split``), its validation classes choose the fine-tuning lr.
Writes results.json, results.md and PNG plots to ``--output``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from ..checks import check_int
from ..parsing import option

__all__ = ["EvaluateConfig", "load_adapter", "domains", "run_evaluate"]


@dataclass
class EvaluateConfig:
    """What to evaluate, on which episodes, and where the results go."""

    backbone: str = option("AutoModel folder or Hub id.", "")
    adapter: str | None = option("HyperFlow adapter folder or Hub id (needed for the hyperflow methods).")
    revision: str | None = option("Revision of a Hub adapter.")
    datasets: list[str] = option("Datasets, each [NAME=]PATH_OR_ID.", list)
    split: str = option("Class split evaluated: train, validation, test or all.", "test")
    class_split: str | None = option("A ClassSplit JSON (default: made by seed 0).")
    episodes: int = option("Episodes per dataset.", 600)
    episodes_per_method: dict[str, int] = option("Fewer episodes for some methods, e.g. {ft-full: 100}.", dict)
    protocol: str = option("'fixed' or 'md'.", "fixed")
    ways: int = option("Classes per episode (fixed protocol).", 5)
    shots: int = option("Support images per class (fixed protocol).", 5)
    queries: int = option("Query images per class (fixed protocol).", 15)
    min_images_per_class: int | None = option("Use only the classes with at least this many images (e.g. shots + "
                                              "queries, for datasets whose classes are too small for the protocol).")
    methods: list[str] = option("Methods: dt, ft-full, ft-lora, ft-shift, ft-head, hyperflow, "
                                "hyperflow:<integrator>:<steps>.", lambda: ["dt", "ft-shift", "hyperflow"])
    image_size: int | None = option("Resize side (default: the adapter's).")
    ft_steps: int = option("Fine-tuning steps.", 50)
    lr_grid: list[float] = option("Fine-tuning learning rates tried on validation episodes.",
                                  lambda: [0.0, 1e-4, 1e-3, 1e-2])
    lr_episodes: int = option("Validation episodes that choose the fine-tuning lr.", 5)
    lr: float | None = option("A fixed fine-tuning lr (skips the selection).")
    memory_episodes: int = option("Episodes per method whose peak memory is measured.", 2)
    batch_tasks: int = option("Tasks adapted together for the throughput row.", 8)
    steps_sweep: list[int] = option("Accuracy against integration steps at these counts, e.g. [1, 2, 4, 8].", list)
    sweep_integrators: list[str] = option("Integrators of the steps sweep.", lambda: ["euler", "rk4"])
    sweep_episodes: int = option("Episodes of the steps sweep.", 50)
    seed: int = option("Seed of the episodes.", 0)
    output: str = option("Folder of results.json, results.md and the plots.", "")
    progress: bool = option("Show progress bars.", True)

    def __post_init__(self):
        from ..episodes import PROTOCOLS
        from ..evaluation import parse_method

        if not self.backbone:
            raise ValueError("--backbone is missing: give the AutoModel folder or Hub id of the backbone.")
        if not self.datasets:
            raise ValueError("--datasets is missing: give at least one dataset, e.g. --datasets \"[data/digits]\".")
        if not self.output:
            raise ValueError("--output is missing: give the folder the results are written to.")
        parsed = [parse_method(m) for m in self.methods]
        unknown = sorted(set(self.episodes_per_method) - set(self.methods))
        if unknown:
            raise ValueError(f"--episodes_per_method names {unknown}, which are not in --methods {self.methods}.")
        for method, count in self.episodes_per_method.items():
            check_int(count, f"--episodes_per_method {method}", 1)
        if any(m.kind == "hyperflow" for m in parsed) and self.adapter is None:
            raise ValueError("the hyperflow methods need --adapter (a trained HyperFlow adapter folder or Hub id).")
        check_int(self.episodes, "--episodes", 1)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}.")


def load_adapter(config: EvaluateConfig):
    """The HyperFlowAdapter on the backbone: the saved one, or an untrained one (dt / fine-tuning only).

    Raises:
        FileNotFoundError: a backbone path that does not exist or holds no saved model, named as such.
    """
    from ..adapter import HyperFlowAdapter
    from ..backbones import load_backbone
    from ..config import HyperFlowConfig
    from ..inputs import default_image_processor

    backbone = load_backbone(config.backbone, option="--backbone")
    if config.adapter:
        adapter = HyperFlowAdapter.from_pretrained(backbone, config.adapter, revision=config.revision)
    else:
        adapter = HyperFlowAdapter(backbone, HyperFlowConfig(image_size=config.image_size))
    if config.image_size and config.image_size != adapter.config.image_size:
        adapter.image_processor = default_image_processor(adapter.backbone, config.image_size)
    return adapter


def domains(config: EvaluateConfig) -> dict[str, tuple]:
    """``name -> (dataset, EpisodeSampler keywords)`` of every dataset."""
    from ..episodes import ClassSplit, load_image_dataset

    class_split = ClassSplit.load(config.class_split) if config.class_split else None
    sampler_kwargs = {"protocol": config.protocol, "split": None if config.split == "all" else config.split,
                      "class_split": class_split, "min_images_per_class": config.min_images_per_class}
    if config.protocol == "fixed":
        sampler_kwargs.update(ways=config.ways, shots=config.shots, queries=config.queries)
    out = {}
    for spec in config.datasets:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        out[name or Path(path).name or path] = (load_image_dataset(path), sampler_kwargs)
    return out


def run_evaluate(config: EvaluateConfig, command: str) -> tuple[dict, dict[str, Path]]:
    """Evaluate every method on every dataset and write the outputs; returns (results, ``{kind: path}`` written).

    ``command`` is the command line recorded in the results' meta data.
    """
    import torch

    from ..evaluation import Evaluator, machine_description, run_evaluation
    from ..results import write_outputs

    torch.manual_seed(config.seed)
    adapter = load_adapter(config)
    evaluator = Evaluator(adapter, config.methods, ft_steps=config.ft_steps, lr_grid=config.lr_grid,
                          lr_episodes=config.lr_episodes, fixed_lr=config.lr, memory_episodes=config.memory_episodes,
                          seed=config.seed, progress=config.progress)
    fixed = config.protocol == "fixed"
    meta = {
        "backbone": config.backbone, "adapter": str(config.adapter), "protocol": config.protocol,
        "ways": config.ways if fixed else None, "shots": config.shots if fixed else None,
        "queries": config.queries if fixed else None,
        "image_size": int(config.image_size or adapter.config.image_size), "machine": machine_description(),
        "date": date.today().isoformat(), "command": command,
        "split": config.split, "seed": config.seed, "ft_steps": config.ft_steps,
    }
    results, sweeps = run_evaluation(evaluator, domains(config), episodes=config.episodes, meta=meta,
                                     episodes_per_method=config.episodes_per_method, batch_tasks=config.batch_tasks,
                                     sweep_steps=config.steps_sweep if config.adapter else (),
                                     sweep_integrators=config.sweep_integrators,
                                     sweep_episodes=config.sweep_episodes)
    return results, write_outputs(results, config.output, sweeps)
