"""The meta-training config: :class:`TrainConfig` and its sections, read by draccus from YAML and overrides.

    config = load_config("recipes/configs/smoke.yaml", ["--training.max_steps", "7", "--losses.flow", "0.5"])

draccus parses the YAML file and the ``--section.key value`` overrides (values read as YAML) into the nested
dataclasses below, types included. Every section checks its own ranges and choices (``check``, naming the
key); :meth:`TrainConfig.validate` runs them and the checks that span sections. Both happen when a config is
built, before any work; an unknown key stops the load naming the valid keys of its section. A list section
(``datasets``) is overridden whole: ``--datasets '[{source: data/glyphs, builder: glyphs}]'``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import draccus

from ..checks import check_int, check_number
from ..config import ADAPTED_GROUPS, INTEGRATOR_NAMES, HyperFlowConfig
from ..episodes import PROTOCOLS
from ..hub import looks_local
from ..interpolation import INTERPOLATION_KINDS
from ..parsing import decode, option, parse

__all__ = [
    "TrainConfig", "BackboneSection", "AdapterSection", "DatasetSection", "EpisodeShape", "EpisodesSection",
    "LossesSection", "UnrolledSection", "FlowSection", "GenerateSection", "ValidationSection",
    "DomainReferenceSection", "OptimizerSection",
    "RunSection", "load_config", "config_from_dict", "dataset_name", "episode_shape",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TRACKERS = ("tensorboard", "trackio")
# HyperFlowConfig fields a training config may set (the others are filled in from the backbone).
ADAPTER_FIELDS = ("groups", "r", "lora_alpha", "target_modules", "shift_modules", "exclude_modules",
                  "first_adapted_block", "integrator", "steps", "hidden_size", "time_embedding_size",
                  "module_embedding_size", "output_rank", "state_projection_size", "statistics_size", "image_size",
                  "init_seed", "stopping", "stopping_points", "domain_gate")
EPISODE_SHAPE = ("protocol", "ways", "shots", "queries", "max_ways", "max_support")
# Backbones that can be written to a folder offline (hf_hyperflow.pretrained).
BACKBONE_BUILDERS = ("efficientnet_lite0",)


def _must_exist(path: str | None, key: str, advice: str = "") -> None:
    """A value that names a local path (not a Hub id) must exist."""
    if path is not None and looks_local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"{key}: {path} does not exist{advice}.")


# ================================================================================================
# Sections
# ================================================================================================
@dataclass
class BackboneSection:
    """The frozen backbone: a folder or Hub id (``path``), or a small random one built from a config."""

    path: str | None = option("Folder or Hub id of a transformers vision backbone.")
    build: str | None = option(f"Write the folder `path` first when it does not exist, with a builder of "
                              f"{list(BACKBONE_BUILDERS)}.")
    random_init: dict | None = option("Build a randomly initialised backbone instead: {model_type: ..., seed: 0, "
                                     "<config fields>}. It is saved to <output_dir>/backbone so that the trained "
                                     "adapter can be loaded onto it.")

    def check(self, key: str = "backbone") -> None:
        if (self.path is None) == (self.random_init is None):
            raise ValueError(f"{key}: set exactly one of {key}.path (a folder or Hub id) and {key}.random_init "
                             "({model_type: ..., <config fields>}).")
        if self.random_init is not None and not isinstance(self.random_init.get("model_type"), str):
            raise ValueError(f"{key}.random_init.model_type is missing: name the transformers model_type to build.")
        if self.build is not None and self.build not in BACKBONE_BUILDERS:
            raise ValueError(f"{key}.build must be one of {list(BACKBONE_BUILDERS)}, got {self.build!r}.")
        if self.build is not None and self.path is None:
            raise ValueError(f"{key}.build needs {key}.path: the folder to write the backbone to.")
        if self.build is None:
            _must_exist(self.path, f"{key}.path", f" (a local folder was expected; set {key}.build: "
                                                  "efficientnet_lite0 to write the pretrained EfficientNet-Lite0 there)")


def _adapter_fields() -> list[tuple[str, Any, Any]]:
    """``pretrained`` and the HyperFlowConfig fields of :data:`ADAPTER_FIELDS`, with their types (or None) and
    help: one source of truth for what the adapter section takes."""
    hints = typing.get_type_hints(HyperFlowConfig)
    help_of = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(HyperFlowConfig)}
    fields = [("pretrained", str | None, option("A saved HyperFlow adapter (folder or Hub id) to start from, e.g. "
                                               "<trajectory store>/adapter; its config replaces the fields below."))]
    for name in ADAPTER_FIELDS:
        fields.append((name, hints[name] | None, option(f"HyperFlowConfig.{name} (null: its default). "
                                                       f"{help_of[name]}")))
    return fields


class _AdapterChecks:
    """What the adapter section does besides holding its fields."""

    def settings(self) -> dict:
        """The HyperFlowConfig fields given (not None)."""
        return {name: getattr(self, name) for name in ADAPTER_FIELDS if getattr(self, name) is not None}

    def check(self, key: str = "adapter") -> None:
        settings = self.settings()
        if self.pretrained is not None:
            if settings:
                raise ValueError(f"{key}: with {key}.pretrained the adapter's own config is used; remove "
                                 f"{sorted(settings)} or {key}.pretrained.")
            _must_exist(self.pretrained, f"{key}.pretrained")
            return
        if "steps" in settings:
            check_int(settings["steps"], f"{key}.steps", 1)
        try:
            HyperFlowConfig(**settings)
        except (TypeError, ValueError) as error:
            name = next((k for k in settings if str(error).startswith(f"{k}=")), None)
            raise type(error)(f"{key}.{name}: {error}" if name else f"{key}: {error}") from None


AdapterSection = dataclasses.make_dataclass(
    "AdapterSection", _adapter_fields(), bases=(_AdapterChecks,),
    namespace={"__doc__": "The adapter whose drift network is trained: HyperFlowConfig fields (written directly "
                          "under ``adapter:``), or a saved adapter to start from (``pretrained``)."})
AdapterSection.__module__ = __name__


@dataclass
class EpisodeShape:
    """A dataset's own episode shape; a field left null is taken from the ``episodes`` section."""

    protocol: str | None = option("'fixed' or 'md' (then ways, shots and queries are drawn per episode).")
    ways: int | None = option("Classes per episode (fixed protocol).")
    shots: int | None = option("Support images per class (fixed protocol).")
    queries: int | None = option("Query images per class (fixed protocol).")
    max_ways: int | None = option("md protocol: the largest number of ways drawn.")
    max_support: int | None = option("md protocol: the most support images of an episode.")


def _check_shape(shape: dict, key: str) -> None:
    """``{protocol, ways, shots, queries, max_ways, max_support}`` of the fixed or md protocol."""
    if shape["protocol"] not in PROTOCOLS:
        raise ValueError(f"{key}.protocol must be one of {list(PROTOCOLS)}, got {shape['protocol']!r}.")
    if shape["protocol"] == "fixed":
        for name, low in (("ways", 2), ("shots", 1), ("queries", 1)):
            if shape[name] is not None:
                check_int(shape[name], f"{key}.{name}", low)
        if shape.get("max_ways") is not None or shape.get("max_support") is not None:
            raise ValueError(f"{key}: max_ways and max_support bound the md protocol; the fixed protocol takes ways, "
                             f"shots and queries.")
    elif any(shape[name] is not None for name in ("ways", "shots", "queries")):
        raise ValueError(f"{key}: the md protocol draws ways, shots and queries itself; set {key}.ways, "
                         f"{key}.shots and {key}.queries to null.")


_SPLIT_LISTS, _SPLIT_SETTINGS = ("train", "validation", "test"), ("fractions", "seed", "group_column")


@dataclass
class DatasetSection:
    """One image classification dataset and its class split."""

    source: str = option("A save_to_disk folder, a parquet file or folder, an image folder, or a Hub dataset id.", "")
    name: str | None = option("Short name in metrics (default: the folder name).")
    builder: str | None = option("Name of a data builder (hf_hyperflow.registry, e.g. glyphs_default) that creates "
                                "`source` when the folder does not exist.")
    hub_split: str = option("Split of a Hub / multi-split source to read.", "train")
    max_classes: int | None = option("Keep a seeded random subset of this many classes (a small slice for quick runs).")
    min_images_per_class: int | None = option("Use only the classes with at least this many images in its episodes "
                                              "(e.g. shots + queries, for a dataset whose classes are too small for "
                                              "the protocol).")
    class_split: Any = option("None (seeded 70/15/15 split), a ClassSplit JSON path, {fractions, seed, group_column}, "
                             "or {train: [...], validation: [...], test: [...]}.")
    image_column: str | None = option("Image column (default: the only Image one).")
    label_column: str | None = option("Label column (default: detected).")
    weight: float = option("Relative frequency of this dataset's training episodes.", 1.0)
    without_colour: bool = option("Show this dataset's images in grey (training and validation episodes): the same "
                                  "classes without their colours, so that the drift does not learn colour as a sign "
                                  "of the domain. List the source twice (in colour and in grey) under distinct "
                                  "`name`s to train on both.", False)
    low_resolution: int | None = option("Show this dataset's images as thumbnails of at most this many pixels on "
                                        "their longer side, enlarged back (training and validation episodes): the "
                                        "same classes as a coarse scan would show them, so that sharpness is not "
                                        "what tells the drift the domain. List the source again under another "
                                        "`name` to train on both.")
    episodes: EpisodeShape | None = option("This dataset's own protocol / ways / shots / queries, replacing those of "
                                          "the episodes section (e.g. {shots: 1, queries: 3} for a dataset with 4 "
                                          "images per class).")

    def check(self, key: str) -> None:
        if not self.source:
            raise ValueError(f"{key}.source is missing: give a save_to_disk folder, parquet, image folder or Hub id.")
        if self.builder is None:
            _must_exist(self.source, f"{key}.source", f". Build it first (hf-hyperflow data build --name NAME "
                                                      f"--output {self.source}) or set {key}.builder to build it")
        if self.max_classes is not None:
            check_int(self.max_classes, f"{key}.max_classes", 2)
        if self.min_images_per_class is not None:
            check_int(self.min_images_per_class, f"{key}.min_images_per_class", 1)
        check_number(self.weight, f"{key}.weight", 0.0, strict_low=True)
        if self.low_resolution is not None:
            check_int(self.low_resolution, f"{key}.low_resolution", 1)
        split = self.class_split
        if isinstance(split, str) and not Path(split).is_file():
            raise ValueError(f"{key}.class_split: no class split file at {split}.")
        if isinstance(split, dict):
            lists, settings = set(_SPLIT_LISTS) & set(split), set(_SPLIT_SETTINGS) & set(split)
            if set(split) - {*_SPLIT_LISTS, *_SPLIT_SETTINGS} or (lists and settings):
                raise ValueError(f"{key}.class_split takes either class lists (train / validation / test) or split "
                                 f"settings (fractions / seed / group_column), got keys {sorted(split)}.")
        elif split is not None and not isinstance(split, str):
            raise TypeError(f"{key}.class_split must be null, a file path or a mapping, got {split!r}.")

    def split_lacks(self, split: str) -> bool:
        """Whether class lists are given and ``split``'s is empty."""
        return (isinstance(self.class_split, dict) and bool(set(_SPLIT_LISTS) & set(self.class_split))
                and not self.class_split.get(split))


@dataclass
class EpisodesSection:
    """How training and validation episodes are drawn."""

    protocol: str = option("'fixed' (N-way K-shot) or 'md' (Meta-Dataset).", "fixed")
    ways: int | None = option("Classes per episode (fixed protocol; default 5).")
    shots: int | None = option("Support images per class (fixed protocol; default 5).")
    queries: int | None = option("Query images per class (fixed protocol; default 15).")
    max_ways: int | None = option("md protocol: the largest number of ways drawn (default 50); lower it for cheaper "
                                  "training episodes.")
    max_support: int | None = option("md protocol: the most support images of an episode (default 500).")
    seed: int = option("Seed of the training episodes (episode i comes from (seed, i)).", 0)

    def check(self, key: str = "episodes") -> None:
        _check_shape({name: getattr(self, name) for name in EPISODE_SHAPE}, key)
        check_int(self.seed, f"{key}.seed", 0)


@dataclass
class LossesSection:
    """Weights of the two training signals (0 turns one off)."""

    unrolled: float = option("Weight of the unrolled query cross-entropy.", 1.0)
    flow: float = option("Weight of the flow-matching loss (needs trajectories).", 0.0)

    def check(self, key: str = "losses") -> None:
        check_number(self.unrolled, f"{key}.unrolled", 0.0)
        check_number(self.flow, f"{key}.flow", 0.0)
        if self.unrolled == 0 and self.flow == 0:
            raise ValueError(f"{key}: both {key}.unrolled and {key}.flow are 0; give at least one a positive weight.")


@dataclass
class UnrolledSection:
    """The unrolled loss: how the drift is integrated during training."""

    steps: int | None = option("Integration steps (default: adapter.steps).")
    integrator: str | None = option(f"Integrator, one of {list(INTEGRATOR_NAMES)} (default: adapter.integrator).")

    def check(self, key: str = "unrolled") -> None:
        if self.steps is not None:
            check_int(self.steps, f"{key}.steps", 1)
        if self.integrator is not None and self.integrator not in INTEGRATOR_NAMES:
            raise ValueError(f"{key}.integrator must be one of {list(INTEGRATOR_NAMES)}, got {self.integrator!r}.")


@dataclass
class GenerateSection:
    """Fine-tuning trajectories recorded before training (one store per dataset, train classes)."""

    episodes: int = option("Episodes fine-tuned per dataset.", 16)
    steps: int = option("Adam steps of each fine-tuning run (K).", 20)
    lr: float = option("Fine-tuning learning rate.", 1e-3)
    groups: list[str] | None = option("Groups fine-tuned (default: the adapter's).")
    inits: int = option("Initialisations per episode (init 0 is theta_0).", 1)
    noise_std: float = option("Noise of the initialisations after the first.", 0.0)
    snapshot_every: int = option("Keep every k-th snapshot (and the last).", 1)
    augment_pool: int | None = option("Pseudo-queries from N augmented copies.")
    seed: int = option("Seed of the trajectory episodes and of fine-tuning.", 1)
    output: str | None = option("Store parent folder (default <output_dir>/trajectories).")

    def check(self, key: str = "flow.generate") -> None:
        for name, low in (("episodes", 1), ("steps", 1), ("inits", 1), ("snapshot_every", 1), ("seed", 0)):
            check_int(getattr(self, name), f"{key}.{name}", low)
        check_number(self.lr, f"{key}.lr", 0.0, strict_low=True)
        check_number(self.noise_std, f"{key}.noise_std", 0.0)
        if self.augment_pool is not None:
            check_int(self.augment_pool, f"{key}.augment_pool", 1)
        if self.groups is not None and (not self.groups or any(g not in ADAPTED_GROUPS for g in self.groups)):
            raise ValueError(f"{key}.groups must be a non-empty mix of {list(ADAPTED_GROUPS)}, got {self.groups!r}.")


@dataclass
class FlowSection:
    """The flow-matching loss: which trajectories, how they are interpolated, how many per step."""

    trajectories: list[str] = option("Trajectory store folders (hf_hyperflow.trajectories) recorded with this "
                                    "adapter's state layout.", list)
    generate: GenerateSection | None = option("Record trajectories with the fine-tuning teacher before training "
                                             "(added to `trajectories`).")
    interpolation: str = option(f"One of {list(INTERPOLATION_KINDS)}.", "linear")
    trajectories_per_step: int | None = option("Trajectories per optimizer step over all processes (default: "
                                              "training.episodes_per_step).")
    normalizer_trajectories: int = option("The per-group scales of the loss come from the first N trajectories.", 64)
    seed: int = option("Seed of the trajectory order and of the times t.", 0)

    def check(self, key: str = "flow") -> None:
        if self.interpolation not in INTERPOLATION_KINDS:
            raise ValueError(f"{key}.interpolation must be one of {list(INTERPOLATION_KINDS)}, got "
                             f"{self.interpolation!r}.")
        for k, store in enumerate(self.trajectories):
            if not (Path(store) / "store.json").is_file():
                raise ValueError(f"{key}.trajectories[{k}]: {store} is not a trajectory store (no store.json); "
                                 "record one with recipes/make_trajectories.py or set flow.generate.")
        if self.generate is not None:
            self.generate.check(f"{key}.generate")
        if self.trajectories_per_step is not None:
            check_int(self.trajectories_per_step, f"{key}.trajectories_per_step", 1)
        check_int(self.normalizer_trajectories, f"{key}.normalizer_trajectories", 1)
        check_int(self.seed, f"{key}.seed", 0)


@dataclass
class ValidationSection:
    """Fixed validation episodes (validation classes), evaluated every ``every`` steps."""

    episodes: int = option("Validation episodes per dataset (0: no validation).", 50)
    every: int = option("Validate every N optimizer steps (and at the end).", 50)
    seed: int = option("Seed of the validation episodes.", 12345)
    tasks_per_batch: int = option("Episodes adapted together during validation.", 8)

    def check(self, key: str = "validation") -> None:
        for name, low in (("episodes", 0), ("every", 1), ("seed", 0), ("tasks_per_batch", 1)):
            check_int(getattr(self, name), f"{key}.{name}", low)


@dataclass
class DomainReferenceSection:
    """The domain reference fitted at the end of a run whose adapter has a ``domain_gate``
    (:mod:`hf_hyperflow.domain_reference`): support statistics of train-class episodes of every dataset, saved with
    the final and best adapters."""

    episodes: int = option("Train-class episodes per dataset.", 300)
    seed: int = option("Seed of the episodes.", 1)

    def check(self, key: str = "domain_reference") -> None:
        check_int(self.episodes, f"{key}.episodes", 2)
        check_int(self.seed, f"{key}.seed", 0)


@dataclass
class OptimizerSection:
    """AdamW on the drift network and a transformers learning-rate schedule."""

    lr: float = option("Peak learning rate.", 1e-3)
    weight_decay: float = option("AdamW weight decay.", 0.0)
    betas: list[float] = option("AdamW betas.", lambda: [0.9, 0.999])
    eps: float = option("AdamW epsilon.", 1e-8)
    max_grad_norm: float | None = option("Gradient clipping (null: off).", 1.0)
    scheduler: str = option(f"One of {list(SCHEDULERS)}.", "cosine")
    warmup_steps: int = option("Linear warm-up steps.", 0)

    def check(self, key: str = "optimizer") -> None:
        check_number(self.lr, f"{key}.lr", 0.0, strict_low=True)
        check_number(self.weight_decay, f"{key}.weight_decay", 0.0)
        check_number(self.eps, f"{key}.eps", 0.0, strict_low=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"{key}.betas must be two numbers in [0, 1), got {self.betas!r}.")
        if self.max_grad_norm is not None:
            check_number(self.max_grad_norm, f"{key}.max_grad_norm", 0.0, strict_low=True)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"{key}.scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}.")
        check_int(self.warmup_steps, f"{key}.warmup_steps", 0)


@dataclass
class RunSection:
    """Steps, batch sizes, precision, checkpoints, logging."""

    max_steps: int = option("Optimizer steps in all.", 1000)
    episodes_per_step: int = option("Episodes per optimizer step over all processes and accumulation steps; must be "
                                   "divisible by processes x gradient_accumulation_steps.", 8)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", 1)
    mixed_precision: str = option("'no', 'bf16' (CPU and GPU) or 'fp16' (GPU).", "no")
    checkpoint_every: int = option("A checkpoint (safetensors + JSON) every N steps.", 100)
    keep_checkpoints: int = option("Most recent checkpoints kept.", 2)
    log_every: int = option("Steps between records of the training history.", 10)
    report_to: str | None = option(f"Tracker: null, {' or '.join(TRACKERS)}.")
    cpu: bool | None = option("Force CPU (null: CPU when no accelerator exists).")
    threads: int | None = option("torch threads per process (null: cores / local processes on CPU).")
    num_workers: int = option("DataLoader workers decoding episodes.", 0)
    prefix_cache_mb: float = option("Memory for frozen-prefix outputs kept per image (0: recompute the prefix "
                                   "every time).", 1024.0)
    log_episodes: bool = option("Write the episode and trajectory ids of every step to "
                               "<output_dir>/episodes/rank_<r>.jsonl.", False)

    def check(self, key: str = "training") -> None:
        for name, low in (("max_steps", 1), ("episodes_per_step", 1), ("gradient_accumulation_steps", 1),
                          ("checkpoint_every", 1), ("keep_checkpoints", 1), ("log_every", 1), ("num_workers", 0)):
            check_int(getattr(self, name), f"{key}.{name}", low)
        check_number(self.prefix_cache_mb, f"{key}.prefix_cache_mb", 0.0)
        if self.threads is not None:
            check_int(self.threads, f"{key}.threads", 1)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"{key}.mixed_precision must be one of {list(MIXED_PRECISION)}, got "
                             f"{self.mixed_precision!r}.")
        if self.report_to is not None:
            if self.report_to not in TRACKERS:
                raise ValueError(f"{key}.report_to must be null or one of {list(TRACKERS)}, got {self.report_to!r}.")
            if importlib.util.find_spec(self.report_to) is None:
                raise ValueError(f"{key}.report_to: {self.report_to!r} is not installed (pip install "
                                 f"{self.report_to}), or set {key}.report_to: null.")


# ================================================================================================
# The config
# ================================================================================================
@dataclass
class TrainConfig:
    """A meta-training run. YAML sections map onto the fields; see recipes/configs/*.yaml.

    Building one validates it (:meth:`validate`): an invalid config never exists.
    """

    output_dir: str = option("Where checkpoints, the best adapter and metrics go.", "")
    seed: int = option("Seed of the drift network's initialisation.", 0)
    backbone: BackboneSection = option("The frozen backbone.", BackboneSection)
    adapter: AdapterSection = option("The adapter whose drift network is trained.", AdapterSection)
    datasets: list[DatasetSection] = option("The meta-training datasets (a list: overridden whole).", list)
    episodes: EpisodesSection = option("How episodes are drawn.", EpisodesSection)
    losses: LossesSection = option("Weights of the two training signals.", LossesSection)
    unrolled: UnrolledSection = option("Integration of the unrolled loss.", UnrolledSection)
    flow: FlowSection = option("The flow-matching loss.", FlowSection)
    validation: ValidationSection = option("Validation episodes.", ValidationSection)
    domain_reference: DomainReferenceSection = option("The domain reference saved with an adapter that has a "
                                                      "domain_gate.", DomainReferenceSection)
    optimizer: OptimizerSection = option("AdamW and its schedule.", OptimizerSection)
    training: RunSection = option("Steps, batch sizes, precision, checkpoints, logging.", RunSection)

    def __post_init__(self):
        self.validate()

    def validate(self, data_builders: Mapping | None = None) -> None:
        """Every check that needs no data: each section's ranges and choices, files that must exist, and what
        spans sections. ``data_builders`` (name -> an object with ``build(output_dir)``): the builders a dataset's
        ``builder`` may name; without them the name is checked when it is needed.

        Raises:
            ValueError / TypeError: naming the key (e.g. ``training.max_steps``) and what to do.
        """
        if not self.output_dir:
            raise ValueError("output_dir is missing: set the folder where checkpoints and the adapter are written.")
        check_int(self.seed, "seed", 0)
        for name in ("backbone", "adapter", "episodes", "losses", "unrolled", "flow", "validation",
                     "domain_reference", "optimizer", "training"):
            getattr(self, name).check(name)
        self._check_datasets(data_builders)
        if self.losses.flow > 0 and not self.flow.trajectories and self.flow.generate is None:
            raise ValueError("flow.trajectories is empty but losses.flow > 0: list trajectory stores or set "
                             "flow.generate to record some first.")

    def _check_datasets(self, data_builders: Mapping | None) -> None:
        if not self.datasets:
            raise ValueError("datasets is empty: list at least one dataset (source: a folder, parquet file or Hub id).")
        for k, entry in enumerate(self.datasets):
            key = f"datasets[{k}]"
            entry.check(key)
            if entry.builder is not None and data_builders is not None and entry.builder not in data_builders:
                raise ValueError(f"{key}.builder: unknown builder {entry.builder!r}; known: {sorted(data_builders)}.")
            if entry.split_lacks("train") and self.losses.unrolled > 0:
                raise ValueError(f"{key}.class_split: the train split has no classes.")
            if entry.split_lacks("validation") and self.validation.episodes > 0:
                raise ValueError(f"{key}.class_split: the validation split has no classes (needed for validation "
                                 f"episodes; or set validation.episodes: 0).")
            if entry.episodes is not None:
                _check_shape(episode_shape(self, entry), f"{key}.episodes")
        names = [dataset_name(entry) for entry in self.datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"datasets: two datasets are named {duplicates[0]!r}; give them distinct `name`s.")

    def to_dict(self) -> dict:
        """Plain data in the YAML layout (only the adapter fields and episode shapes that are set)."""
        data = {f.name: draccus.encode(getattr(self, f.name)) for f in dataclasses.fields(TrainConfig)}
        data["adapter"] = {"pretrained": self.adapter.pretrained, **self.adapter.settings()}
        for entry in data["datasets"]:
            if entry["episodes"] is not None:
                entry["episodes"] = {k: v for k, v in entry["episodes"].items() if v is not None}
        return data


def dataset_name(entry: DatasetSection) -> str:
    """The name of a dataset in metrics: ``entry.name`` or the last part of its source."""
    return entry.name or Path(entry.source.rstrip("/")).name or entry.source


def episode_shape(config: TrainConfig, entry: DatasetSection) -> dict:
    """``protocol``, ``ways``, ``shots``, ``queries`` of one dataset's episodes: its own, else the config's."""
    shape = {name: getattr(config.episodes, name) for name in EPISODE_SHAPE}
    own = {k: v for k, v in dataclasses.asdict(entry.episodes).items() if v is not None} if entry.episodes else {}
    if own.get("protocol") == "md":
        shape.update(ways=None, shots=None, queries=None)
    elif own.get("protocol") == "fixed":
        shape.update(max_ways=None, max_support=None)
    shape.update(own)
    return shape


# ================================================================================================
# Loading
# ================================================================================================
def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), data_builders: Mapping | None = None,
                config_class: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Read a YAML config with draccus, apply ``--section.key value`` overrides, validate (before any work).

    Args:
        overrides: command-line tokens, e.g. ``["--training.max_steps", "7", "--losses.flow=0.5"]``.
        data_builders: see :meth:`TrainConfig.validate`.
        config_class: TrainConfig or a subclass that adds command-line options (recipes/train.py).

    Raises:
        FileNotFoundError: no file at ``path``. ValueError / TypeError: an unknown key (naming the valid keys of
            its section), a value of the wrong type or out of range, a missing local dataset... naming the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    config = parse(config_class, ["--config_path", str(path), *overrides])
    config.validate(data_builders)
    return config


def config_from_dict(data: dict, data_builders: Mapping | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data in the YAML layout (errors as :func:`load_config`)."""
    config = decode(TrainConfig, data)
    config.validate(data_builders)
    return config
