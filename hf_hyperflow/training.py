"""Meta-training of the drift network with Accelerate: flow matching, unrolled query loss, or a mix.

Two training signals, weighted by ``losses.flow`` and ``losses.unrolled``:

1. Flow matching (the paper): stored fine-tuning trajectories are turned into continuous paths (linear,
   piecewise linear or cubic); at a random time t the drift network, at the path's position and with the
   task encoded from the trajectory's support set, regresses the path's velocity. The error is a
   per-group normalised squared error: for every state group g (lora / shift / head) the squared error
   summed over the group's entries, divided by ``scale_g`` (the mean squared norm of theta_K - theta_0 of
   that group over the first trajectories of the store), then averaged over tasks and groups.
2. Unrolled task loss: integrate K steps of the drift from theta_0 on a fresh episode, classify the
   episode's query images with the adapted backbone and its cosine prototype classifier, cross-entropy.
   Gradients reach only the drift network; the backbone stays frozen.

Everything distributed goes through Accelerate: device placement, DDP (the module handed to
``accelerator.prepare`` is a :class:`DriftObjective` whose only submodule is the drift network; the
backbone is a plain attribute), gradient accumulation, bf16 autocast, ``save_state`` / ``load_state``
checkpoints, trackers. Episodes are not handed to ``prepare``: episode ``i`` is rebuilt from
``(seed, i)`` alone and every rank takes its own share (see :func:`step_episode_ids`), so every episode is
used exactly once per optimizer step across ranks, whatever the number of processes, and a resumed run
continues with exactly the episodes an uninterrupted run would have used.

Frozen prefix: with ``first_adapted_block`` set, the blocks before the first adapted one never change,
so their output for an image is computed once and kept per dataset row (:class:`PrefixCache`); a
training step then costs the adapted suffix only.

Entry point: :func:`train` (``recipes/train.py`` is its command line); configs are :class:`TrainConfig`
(YAML, validated by :func:`load_config` before any work).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ADAPTED_GROUPS, INTEGRATOR_NAMES, HyperFlowConfig
from .drift import DriftNet, TaskEncoding
from .heads import class_prototypes, prototype_logits
from .interpolation import INTERPOLATION_KINDS
from .prefix import FrozenPrefix
from .state import TaskState, parse_state_key, state_key

__all__ = [
    "TrainConfig",
    "BackboneSection",
    "AdapterSection",
    "DatasetSection",
    "EpisodesSection",
    "LossesSection",
    "UnrolledSection",
    "FlowSection",
    "GenerateSection",
    "ValidationSection",
    "OptimizerSection",
    "RunSection",
    "TrainResult",
    "DriftObjective",
    "UnrolledInputs",
    "FlowInputs",
    "PrefixCache",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "flow_matching_loss",
    "flow_inputs",
    "velocity_scales",
    "step_episode_ids",
    "step_sample_ids",
    "train",
    "drift_fingerprint",
]

HEAD_KEY = state_key("head", "prototypes")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TRACKERS = ("tensorboard", "trackio")
# HyperFlowConfig fields a training config may set (the others are filled in from the backbone).
ADAPTER_FIELDS = ("groups", "r", "lora_alpha", "target_modules", "shift_modules", "exclude_modules",
                  "first_adapted_block", "integrator", "steps", "hidden_size", "time_embedding_size",
                  "module_embedding_size", "output_rank", "state_projection_size", "image_size", "init_seed")
# Backbones that can be written to a folder offline (hf_hyperflow.pretrained).
BACKBONE_BUILDERS = ("efficientnet_lite0",)
CHECKPOINT_DIR = "checkpoints"
EPISODE_SHAPE = ("protocol", "ways", "shots", "queries")
TRAINER_STATE = "trainer_state.json"


# ================================================================================================
# Configuration
# ================================================================================================
@dataclass
class BackboneSection:
    """The frozen backbone: a folder or Hub id (``path``), or a small random one built from a config."""

    path: str | None = field(default=None, metadata={"help": "Folder or Hub id of a transformers vision backbone."})
    build: str | None = field(default=None, metadata={
        "help": f"Write the folder `path` first when it does not exist, with a builder of {list(BACKBONE_BUILDERS)}."})
    random_init: dict | None = field(default=None, metadata={
        "help": "Build a randomly initialised backbone instead: {model_type: ..., seed: 0, <config fields>}. "
                "It is saved to <output_dir>/backbone so that the trained adapter can be loaded onto it."})


@dataclass
class AdapterSection:
    """The adapter whose drift network is trained: HyperFlowConfig fields, or a saved adapter to start from."""

    pretrained: str | None = field(default=None, metadata={
        "help": "A saved HyperFlow adapter (folder or Hub id) to start from, e.g. <trajectory store>/adapter; "
                "its config replaces the fields below."})
    config: dict = field(default_factory=dict, metadata={
        "help": f"HyperFlowConfig fields, written directly under 'adapter:' ({', '.join(ADAPTER_FIELDS)})."})


@dataclass
class DatasetSection:
    """One image classification dataset and its class split."""

    source: str = field(default="", metadata={
        "help": "A save_to_disk folder, a parquet file or folder, an image folder, or a Hub dataset id."})
    name: str | None = field(default=None, metadata={"help": "Short name in metrics (default: the folder name)."})
    builder: str | None = field(default=None, metadata={
        "help": "Name of a recipes.data builder that creates `source` when the folder does not exist."})
    hub_split: str = field(default="train", metadata={"help": "Split of a Hub / multi-split source to read."})
    max_classes: int | None = field(default=None, metadata={
        "help": "Keep a seeded random subset of this many classes (a small slice for quick runs)."})
    class_split: Any = field(default=None, metadata={
        "help": "None (seeded 70/15/15 split), a ClassSplit JSON path, {fractions, seed, group_column}, or "
                "{train: [...], validation: [...], test: [...]}."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: the only Image one)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    weight: float = field(default=1.0, metadata={"help": "Relative frequency of this dataset's training episodes."})
    episodes: dict | None = field(default=None, metadata={
        "help": "This dataset's own protocol / ways / shots / queries, replacing those of the episodes section "
                "(e.g. {shots: 1, queries: 3} for a dataset with 4 images per class)."})


@dataclass
class EpisodesSection:
    """How training and validation episodes are drawn."""

    protocol: str = field(default="fixed", metadata={"help": "'fixed' (N-way K-shot) or 'md' (Meta-Dataset)."})
    ways: int | None = field(default=None, metadata={"help": "Classes per episode (fixed protocol; default 5)."})
    shots: int | None = field(default=None, metadata={"help": "Support images per class (fixed protocol; default 5)."})
    queries: int | None = field(default=None, metadata={"help": "Query images per class (fixed protocol; default 15)."})
    seed: int = field(default=0, metadata={"help": "Seed of the training episodes (episode i comes from (seed, i))."})


@dataclass
class LossesSection:
    """Weights of the two training signals (0 turns one off)."""

    unrolled: float = field(default=1.0, metadata={"help": "Weight of the unrolled query cross-entropy."})
    flow: float = field(default=0.0, metadata={"help": "Weight of the flow-matching loss (needs trajectories)."})


@dataclass
class UnrolledSection:
    """The unrolled loss: how the drift is integrated during training."""

    steps: int | None = field(default=None, metadata={"help": "Integration steps (default: adapter.steps)."})
    integrator: str | None = field(default=None, metadata={"help": "Integrator (default: adapter.integrator)."})


@dataclass
class GenerateSection:
    """Fine-tuning trajectories recorded before training (one store per dataset, train classes)."""

    episodes: int = field(default=16, metadata={"help": "Episodes fine-tuned per dataset."})
    steps: int = field(default=20, metadata={"help": "Adam steps of each fine-tuning run (K)."})
    lr: float = field(default=1e-3, metadata={"help": "Fine-tuning learning rate."})
    groups: list | None = field(default=None, metadata={"help": "Groups fine-tuned (default: the adapter's)."})
    inits: int = field(default=1, metadata={"help": "Initialisations per episode (init 0 is theta_0)."})
    noise_std: float = field(default=0.0, metadata={"help": "Noise of the initialisations after the first."})
    snapshot_every: int = field(default=1, metadata={"help": "Keep every k-th snapshot (and the last)."})
    augment_pool: int | None = field(default=None, metadata={"help": "Pseudo-queries from N augmented copies."})
    seed: int = field(default=1, metadata={"help": "Seed of the trajectory episodes and of fine-tuning."})
    output: str | None = field(default=None, metadata={"help": "Store parent folder (default <output_dir>/trajectories)."})


@dataclass
class FlowSection:
    """The flow-matching loss: which trajectories, how they are interpolated, how many per step."""

    trajectories: list = field(default_factory=list, metadata={
        "help": "Trajectory store folders (hf_hyperflow.trajectories) recorded with this adapter's state layout."})
    generate: GenerateSection | None = field(default=None, metadata={
        "help": "Record trajectories with the fine-tuning teacher before training (added to `trajectories`)."})
    interpolation: str = field(default="linear", metadata={"help": f"One of {list(INTERPOLATION_KINDS)}."})
    trajectories_per_step: int | None = field(default=None, metadata={
        "help": "Trajectories per optimizer step over all processes (default: training.episodes_per_step)."})
    normalizer_trajectories: int = field(default=64, metadata={
        "help": "The per-group scales of the loss come from the first N trajectories."})
    seed: int = field(default=0, metadata={"help": "Seed of the trajectory order and of the times t."})


@dataclass
class ValidationSection:
    """Fixed validation episodes (validation classes), evaluated every ``every`` steps."""

    episodes: int = field(default=50, metadata={"help": "Validation episodes per dataset (0: no validation)."})
    every: int = field(default=50, metadata={"help": "Validate every N optimizer steps (and at the end)."})
    seed: int = field(default=12345, metadata={"help": "Seed of the validation episodes."})
    tasks_per_batch: int = field(default=8, metadata={"help": "Episodes adapted together during validation."})


@dataclass
class OptimizerSection:
    """AdamW on the drift network and a transformers learning-rate schedule."""

    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    betas: list = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    scheduler: str = field(default="cosine", metadata={"help": f"One of {list(SCHEDULERS)}."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})


@dataclass
class RunSection:
    """Steps, batch sizes, precision, checkpoints, logging."""

    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps in all."})
    episodes_per_step: int = field(default=8, metadata={
        "help": "Episodes per optimizer step over all processes and accumulation steps; must be divisible by "
                "processes x gradient_accumulation_steps."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' (CPU and GPU) or 'fp16' (GPU)."})
    checkpoint_every: int = field(default=100, metadata={"help": "accelerator.save_state every N steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent checkpoints kept."})
    log_every: int = field(default=10, metadata={"help": "Steps between records of the training history."})
    report_to: str | None = field(default=None, metadata={"help": f"Tracker: None, {' or '.join(TRACKERS)}."})
    cpu: bool | None = field(default=None, metadata={"help": "Force CPU (None: CPU when no accelerator exists)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads per process (None: cores / local processes on CPU)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers decoding episodes."})
    prefix_cache_mb: float = field(default=1024.0, metadata={
        "help": "Memory for frozen-prefix outputs kept per image (0: recompute the prefix every time)."})
    log_episodes: bool = field(default=False, metadata={
        "help": "Write the episode and trajectory ids of every step to <output_dir>/episodes/rank_<r>.jsonl."})


@dataclass
class TrainConfig:
    """A meta-training run. YAML sections map onto the fields; see recipes/configs/*.yaml."""

    output_dir: str = field(default="", metadata={"help": "Where checkpoints, the best adapter and metrics go."})
    seed: int = field(default=0, metadata={"help": "Seed of the drift network's initialisation."})
    backbone: BackboneSection = field(default_factory=BackboneSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    datasets: list[DatasetSection] = field(default_factory=list)
    episodes: EpisodesSection = field(default_factory=EpisodesSection)
    losses: LossesSection = field(default_factory=LossesSection)
    unrolled: UnrolledSection = field(default_factory=UnrolledSection)
    flow: FlowSection = field(default_factory=FlowSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    training: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        """Plain data (the YAML layout: adapter fields directly under ``adapter``)."""
        data = dataclasses.asdict(self)
        adapter = data.pop("adapter")
        data["adapter"] = {"pretrained": adapter["pretrained"], **adapter["config"]}
        return data


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check (and mildly coerce: ``"1e-3"`` -> 1e-3, ``1`` -> 1.0) a YAML value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"{key} must not be null.")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except (TypeError, ValueError) as error:
                errors.append(error)
        raise errors[0]
    if tp is Any:
        return value
    if _is_section(tp):
        return _section_from_dict(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise TypeError(f"{key} must be a list, got {type(value).__name__} {value!r}.")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is list:
        if not isinstance(value, list):
            raise TypeError(f"{key} must be a list, got {type(value).__name__} {value!r}.")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{key} must be a mapping, got {type(value).__name__} {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise TypeError(f"{key} must be a number, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string, got {value!r}.")
        return value
    raise TypeError(f"{key}: unsupported field type {_type_name(tp)}.")


def _section_from_dict(cls, data, key: str):
    """Build a config section from a mapping; an unknown key is a ValueError naming it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"{key or 'the config'} must be a mapping of keys to values, got {type(data).__name__}.")
    prefix = f"{key}." if key else ""
    if cls is AdapterSection:
        data = dict(data)
        pretrained = data.pop("pretrained", None)
        unknown = sorted(set(data) - set(ADAPTER_FIELDS))
        if unknown:
            raise ValueError(f"Unknown key '{prefix}{unknown[0]}': the adapter section takes 'pretrained' and the "
                             f"HyperFlowConfig fields {list(ADAPTER_FIELDS)}.")
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"{prefix}pretrained must be a folder or Hub id, got {pretrained!r}.")
        return AdapterSection(pretrained=pretrained, config=data)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"Unknown key '{prefix}{unknown[0]}'; the keys of {key or 'the top level'} are {known}.")
    values = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**values)


def config_from_dict(data: dict) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data (the YAML layout).

    Raises:
        ValueError / TypeError: an unknown key, a value of the wrong type or out of range, a missing local
            dataset, an empty class split, ... always naming the key (e.g. ``training.max_steps``).
    """
    config = _section_from_dict(TrainConfig, data, "")
    validate_config(config)
    return config


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Sequence[str] | dict) -> dict:
    """Apply ``--key value`` / ``--key=value`` overrides (dotted keys, list indices: ``datasets.0.source``).

    Values are parsed as YAML (``null``, ``[a, b]``, ``1e-3``...). Returns a new dict.

    Raises:
        ValueError: a malformed override list, or an index into a list that does not have it.
    """
    data = copy.deepcopy(data)
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs, tokens = [], list(overrides)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if not token.startswith("--") or len(token) < 3:
                raise ValueError(f"Expected an override '--key value', got {token!r}.")
            if "=" in token:
                key, _, text = token[2:].partition("=")
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise ValueError(f"Override {token} has no value: write '{token} VALUE'.")
                key, text = token[2:], tokens[i + 1]
                i += 2
            pairs.append((key.replace("-", "_"), _parse_value(text)))
    for key, value in pairs:
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ValueError(f"Override {key}: {'.'.join(parts[:depth]) or 'the list'} has no item {part!r} "
                                     f"(it has {len(node)}).")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    if node[index] is None:
                        node[index] = {}
                    node = node[index]
            else:
                if not isinstance(node, dict):
                    raise ValueError(f"Override {key}: {where} is inside a value that is not a mapping.")
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
    return data


def load_config(path: str | os.PathLike, overrides: Sequence[str] | dict = ()) -> TrainConfig:
    """Read a YAML config, apply overrides, validate everything that can be checked without loading data.

    Raises:
        FileNotFoundError: no file at ``path``. ValueError / TypeError: see :func:`config_from_dict`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections, got {type(data).__name__}.")
    return config_from_dict(apply_overrides(data, overrides))


def _check_int(value, key: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key} must be an integer >= {low}, got {value!r}.")


def _check_ints(section, prefix: str, **lows: int) -> None:
    """``_check_int`` on several fields of a section: ``name=lowest allowed value``."""
    for name, low in lows.items():
        _check_int(getattr(section, name), f"{prefix}.{name}", low)


def _check_number(value, key: str, low: float, high: float = math.inf, strict_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if strict_low else f">= {low}"
        raise ValueError(f"{key} must be a number {bound}" + (f" and <= {high}" if high < math.inf else "")
                         + f", got {value!r}.")


def _looks_local(source: str) -> bool:
    """A local path rather than a Hub id (``org/name``): absolute or ``./``-relative, existing, more or fewer than
    one ``/``, a parquet file, or ``folder/name`` where ``folder`` exists here."""
    return (source.startswith((".", "/", "~")) or os.path.exists(source) or source.count("/") != 1
            or source.endswith(".parquet") or Path(source).parent.is_dir())


def validate_config(config: TrainConfig) -> None:
    """Every check that needs no data: ranges, choices, files that must exist. Messages name the key."""
    if not config.output_dir:
        raise ValueError("output_dir is missing: set the folder where checkpoints and the adapter are written.")
    _check_int(config.seed, "seed", 0)
    # backbone
    backbone = config.backbone
    if (backbone.path is None) == (backbone.random_init is None):
        raise ValueError("backbone: set exactly one of backbone.path (a folder or Hub id) and backbone.random_init "
                         "({model_type: ..., <config fields>}).")
    if backbone.random_init is not None and not isinstance(backbone.random_init.get("model_type"), str):
        raise ValueError("backbone.random_init.model_type is missing: name the transformers model_type to build.")
    if backbone.build is not None and backbone.build not in BACKBONE_BUILDERS:
        raise ValueError(f"backbone.build must be one of {list(BACKBONE_BUILDERS)}, got {backbone.build!r}.")
    if backbone.build is not None and backbone.path is None:
        raise ValueError("backbone.build needs backbone.path: the folder to write the backbone to.")
    if (backbone.path is not None and backbone.build is None and _looks_local(backbone.path)
            and not Path(backbone.path).expanduser().exists()):
        raise ValueError(f"backbone.path: {backbone.path} does not exist (a local folder was expected; set "
                         f"backbone.build: efficientnet_lite0 to write the pretrained EfficientNet-Lite0 there).")
    # adapter
    adapter = config.adapter
    if adapter.pretrained is not None:
        if adapter.config:
            raise ValueError(f"adapter: with adapter.pretrained the adapter's own config is used; remove "
                             f"{sorted(adapter.config)} or adapter.pretrained.")
        if _looks_local(adapter.pretrained) and not Path(adapter.pretrained).expanduser().exists():
            raise ValueError(f"adapter.pretrained: {adapter.pretrained} does not exist.")
    else:
        if "steps" in adapter.config:
            _check_int(adapter.config["steps"], "adapter.steps", 1)
        try:
            HyperFlowConfig(**adapter.config)
        except (TypeError, ValueError) as error:
            name = next((k for k in adapter.config if str(error).startswith(f"{k}=")), None)
            raise type(error)(f"adapter.{name}: {error}" if name else f"adapter: {error}") from None
    # datasets
    if not config.datasets:
        raise ValueError("datasets is empty: list at least one dataset (source: a folder, parquet file or Hub id).")
    names = []
    for k, entry in enumerate(config.datasets):
        key = f"datasets[{k}]"
        if not entry.source:
            raise ValueError(f"{key}.source is missing: give a save_to_disk folder, parquet, image folder or Hub id.")
        if _looks_local(entry.source) and not Path(entry.source).expanduser().exists() and entry.builder is None:
            raise ValueError(f"{key}.source: {entry.source} does not exist. Build it first (python -m recipes.data."
                             f"build --name NAME --output {entry.source}) or set {key}.builder to build it.")
        if entry.builder is not None:
            from_recipes = _data_builders()
            if from_recipes is not None and entry.builder not in from_recipes:
                raise ValueError(f"{key}.builder: unknown builder {entry.builder!r}; known: {sorted(from_recipes)}.")
        if entry.max_classes is not None:
            _check_int(entry.max_classes, f"{key}.max_classes", 2)
        _check_number(entry.weight, f"{key}.weight", 0.0, strict_low=True)
        if isinstance(entry.class_split, str) and not Path(entry.class_split).is_file():
            raise ValueError(f"{key}.class_split: no class split file at {entry.class_split}.")
        if isinstance(entry.class_split, dict):
            lists = {"train", "validation", "test"} & set(entry.class_split)
            settings = {"fractions", "seed", "group_column"} & set(entry.class_split)
            extra = set(entry.class_split) - {"train", "validation", "test", "fractions", "seed", "group_column"}
            if extra or (lists and settings):
                raise ValueError(f"{key}.class_split takes either class lists (train / validation / test) or split "
                                 f"settings (fractions / seed / group_column), got keys {sorted(entry.class_split)}.")
            if lists and not entry.class_split.get("train") and config.losses.unrolled > 0:
                raise ValueError(f"{key}.class_split: the train split has no classes.")
            if lists and not entry.class_split.get("validation") and config.validation.episodes > 0:
                raise ValueError(f"{key}.class_split: the validation split has no classes (needed for validation "
                                 f"episodes; or set validation.episodes: 0).")
        elif entry.class_split is not None and not isinstance(entry.class_split, str):
            raise TypeError(f"{key}.class_split must be null, a file path or a mapping, got {entry.class_split!r}.")
        if entry.episodes is not None:
            unknown = sorted(set(entry.episodes) - set(EPISODE_SHAPE))
            if unknown:
                raise ValueError(f"Unknown key '{key}.episodes.{unknown[0]}'; a dataset's episodes take "
                                 f"{list(EPISODE_SHAPE)}.")
            _check_episode_shape(episode_shape(config, entry), f"{key}.episodes")
        names.append(dataset_name(entry))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"datasets: two datasets are named {duplicates[0]!r}; give them distinct `name`s.")
    # episodes
    _check_episode_shape({name: getattr(config.episodes, name) for name in EPISODE_SHAPE}, "episodes")
    _check_int(config.episodes.seed, "episodes.seed", 0)
    # losses
    _check_number(config.losses.unrolled, "losses.unrolled", 0.0)
    _check_number(config.losses.flow, "losses.flow", 0.0)
    if config.losses.unrolled == 0 and config.losses.flow == 0:
        raise ValueError("losses: both losses.unrolled and losses.flow are 0; give at least one a positive weight.")
    if config.unrolled.steps is not None:
        _check_int(config.unrolled.steps, "unrolled.steps", 1)
    if config.unrolled.integrator is not None and config.unrolled.integrator not in INTEGRATOR_NAMES:
        raise ValueError(f"unrolled.integrator must be one of {list(INTEGRATOR_NAMES)}, got "
                         f"{config.unrolled.integrator!r}.")
    # flow
    flow = config.flow
    if flow.interpolation not in INTERPOLATION_KINDS:
        raise ValueError(f"flow.interpolation must be one of {list(INTERPOLATION_KINDS)}, got {flow.interpolation!r}.")
    for k, store in enumerate(flow.trajectories):
        if not isinstance(store, str):
            raise TypeError(f"flow.trajectories[{k}] must be a folder path, got {store!r}.")
        if not (Path(store) / "store.json").is_file():
            raise ValueError(f"flow.trajectories[{k}]: {store} is not a trajectory store (no store.json); record one "
                             f"with recipes/make_trajectories.py or set flow.generate.")
    if config.losses.flow > 0 and not flow.trajectories and flow.generate is None:
        raise ValueError("flow.trajectories is empty but losses.flow > 0: list trajectory stores or set flow.generate "
                         "to record some first.")
    if flow.generate is not None:
        generate = flow.generate
        _check_ints(generate, "flow.generate", episodes=1, steps=1, inits=1, snapshot_every=1, seed=0)
        _check_number(generate.lr, "flow.generate.lr", 0.0, strict_low=True)
        _check_number(generate.noise_std, "flow.generate.noise_std", 0.0)
        if generate.augment_pool is not None:
            _check_int(generate.augment_pool, "flow.generate.augment_pool", 1)
        if generate.groups is not None:
            bad = [g for g in generate.groups if g not in ADAPTED_GROUPS]
            if bad or not generate.groups:
                raise ValueError(f"flow.generate.groups must be a non-empty mix of {list(ADAPTED_GROUPS)}, got "
                                 f"{generate.groups!r}.")
    if flow.trajectories_per_step is not None:
        _check_int(flow.trajectories_per_step, "flow.trajectories_per_step", 1)
    _check_ints(flow, "flow", normalizer_trajectories=1, seed=0)
    _check_ints(config.validation, "validation", episodes=0, every=1, seed=0, tasks_per_batch=1)
    # optimizer
    optimizer = config.optimizer
    _check_number(optimizer.lr, "optimizer.lr", 0.0, strict_low=True)
    _check_number(optimizer.weight_decay, "optimizer.weight_decay", 0.0)
    _check_number(optimizer.eps, "optimizer.eps", 0.0, strict_low=True)
    if (len(optimizer.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optimizer.betas)):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {optimizer.betas!r}.")
    if optimizer.max_grad_norm is not None:
        _check_number(optimizer.max_grad_norm, "optimizer.max_grad_norm", 0.0, strict_low=True)
    if optimizer.scheduler not in SCHEDULERS:
        raise ValueError(f"optimizer.scheduler must be one of {list(SCHEDULERS)}, got {optimizer.scheduler!r}.")
    _check_int(optimizer.warmup_steps, "optimizer.warmup_steps", 0)
    run = config.training
    _check_ints(run, "training", max_steps=1, episodes_per_step=1, gradient_accumulation_steps=1, checkpoint_every=1,
                keep_checkpoints=1, log_every=1, num_workers=0)
    _check_number(run.prefix_cache_mb, "training.prefix_cache_mb", 0.0)
    if run.threads is not None:
        _check_int(run.threads, "training.threads", 1)
    if run.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"training.mixed_precision must be one of {list(MIXED_PRECISION)}, got "
                         f"{run.mixed_precision!r}.")
    if run.report_to is not None:
        if run.report_to not in TRACKERS:
            raise ValueError(f"training.report_to must be null or one of {list(TRACKERS)}, got {run.report_to!r}.")
        import importlib.util

        if importlib.util.find_spec(run.report_to) is None:
            raise ValueError(f"training.report_to: {run.report_to!r} is not installed (pip install {run.report_to}), "
                             f"or set training.report_to: null.")


def _check_episode_shape(shape: dict, key: str) -> None:
    if shape["protocol"] not in ("fixed", "md"):
        raise ValueError(f"{key}.protocol must be 'fixed' or 'md', got {shape['protocol']!r}.")
    if shape["protocol"] == "fixed":
        for name, low in (("ways", 2), ("shots", 1), ("queries", 1)):
            if shape[name] is not None:
                _check_int(shape[name], f"{key}.{name}", low)
    elif any(shape[name] is not None for name in ("ways", "shots", "queries")):
        raise ValueError(f"{key}: the md protocol draws ways, shots and queries itself; set {key}.ways, "
                         f"{key}.shots and {key}.queries to null.")


def _data_builders() -> dict | None:
    """The recipes.data builders, when the recipes folder is importable (a source checkout)."""
    try:
        from recipes.data import BUILDERS
    except ImportError:
        return None
    return BUILDERS


def dataset_name(entry: DatasetSection) -> str:
    """The name of a dataset in metrics: ``entry.name`` or the last part of its source."""
    return entry.name or Path(entry.source.rstrip("/")).name or entry.source


# ================================================================================================
# Episodes: which ones each rank uses at each step
# ================================================================================================
def step_sample_ids(step: int, micro_step: int, per_step: int, accumulation: int, rank: int,
                    world_size: int) -> list[int]:
    """Global ids of the samples (episodes or trajectory draws) rank ``rank`` uses at one micro-step.

    Optimizer step ``step`` uses ids ``step * per_step .. (step + 1) * per_step - 1``; micro-step ``a`` a
    contiguous ``per_step / accumulation`` of them, dealt round-robin to the ranks (rank r takes the ids
    ``i % world_size == r``, as :class:`~hf_hyperflow.episodes.EpisodeSampler` shards). Every id is used
    exactly once per step across ranks, and the same ids whatever the number of processes.

    Raises:
        ValueError: ``per_step`` not divisible by ``accumulation * world_size``.
    """
    if per_step % (accumulation * world_size):
        raise ValueError(f"{per_step} samples per step cannot be split over {accumulation} accumulation steps x "
                         f"{world_size} processes.")
    per_micro = per_step // accumulation
    start = step * per_step + micro_step * per_micro
    return list(range(start + rank, start + per_micro, world_size))


def step_episode_ids(step: int, per_step: int, accumulation: int, rank: int, world_size: int) -> list[list[int]]:
    """The episode ids of every micro-step of one optimizer step for one rank (see :func:`step_sample_ids`)."""
    return [step_sample_ids(step, a, per_step, accumulation, rank, world_size) for a in range(accumulation)]


def _seed_of(*parts: int) -> list[int]:
    return [int(p) for p in parts]


class EpisodeMix(Sequence):
    """Episode ``i`` of several datasets: the dataset is drawn from ``(seed, i)`` by the weights, then that
    dataset's sampler gives its episode ``i``. ``mix[i]`` is ``(dataset index, Episode)``."""

    def __init__(self, samplers: Sequence, weights: Sequence[float], seed: int):
        self.samplers = list(samplers)
        weights = np.asarray(weights, dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.seed = seed

    def __len__(self) -> int:
        return min(len(s) for s in self.samplers)

    def source_of(self, index: int) -> int:
        if len(self.samplers) == 1:
            return 0
        rng = np.random.default_rng(_seed_of(self.seed, index, 17))
        return int(rng.choice(len(self.samplers), p=self.probabilities))

    def __getitem__(self, index: int):
        source = self.source_of(index)
        return source, self.samplers[source][index]


# ================================================================================================
# Frozen-prefix cache
# ================================================================================================
class PrefixCache:
    """Outputs of the frozen blocks (those before the first HyperFlow layer), kept per image.

    ``outputs(pixel_values, keys)`` returns the last frozen block's output for a batch, computing only the
    images whose key (any hashable, e.g. ``(dataset, row)``) is not kept yet; ``replaced(output, n)`` is the
    context in which the backbone uses it instead of running those blocks. Outputs are kept while their
    total size stays under ``max_bytes`` (0: nothing is kept; the prefix still runs once per batch rather
    than once per forward pass).

    Args:
        adapter: the HyperFlowAdapter whose backbone is cached.
        max_bytes: memory budget of the kept outputs.
    """

    def __init__(self, adapter, max_bytes: float):
        self.prefix = FrozenPrefix.find(adapter.backbone)
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._kept: dict[Any, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def active(self) -> bool:
        return self.prefix is not None

    def outputs(self, pixel_values: torch.Tensor, keys: Sequence | None = None):
        """The last frozen block's output for ``pixel_values: Tensor[N, 3, H, W]`` (rows image-major)."""
        if self.prefix is None:
            raise ValueError("This backbone has no frozen prefix (set HyperFlowConfig.first_adapted_block).")
        if keys is None or self.max_bytes <= 0:
            return self.prefix.compute(pixel_values)
        missing = [i for i, key in enumerate(keys) if key not in self._kept]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = None
        if missing:
            fresh = self.prefix.compute(pixel_values[missing] if len(missing) < len(keys) else pixel_values)
            if not isinstance(fresh, torch.Tensor):  # nested block outputs: no per-image cache
                return fresh if len(missing) == len(keys) else self.prefix.compute(pixel_values)
        if fresh is not None and len(missing) == len(keys) and self.used_bytes >= self.max_bytes:
            return fresh
        per_image = {}
        if fresh is not None:
            for i, part in zip(missing, fresh.chunk(len(missing)), strict=True):
                per_image[i] = part
                size = part.numel() * part.element_size()
                if self.used_bytes + size <= self.max_bytes:
                    self._kept[keys[i]] = part
                    self.used_bytes += size
        return torch.cat([per_image[i] if i in per_image else self._kept[key] for i, key in enumerate(keys)])

    def replaced(self, output, num_images: int):
        """Context in which the frozen blocks return ``output`` (for a batch of ``num_images`` images)."""
        return self.prefix.replaced(output, num_images)

    def context(self, pixel_values: torch.Tensor, keys: Sequence | None = None):
        """``replaced(outputs(...))`` for this batch, or a null context without a prefix."""
        if self.prefix is None:
            return contextlib.nullcontext()
        return self.replaced(self.outputs(pixel_values, keys), pixel_values.shape[0])


# ================================================================================================
# Losses
# ================================================================================================
@dataclass
class UnrolledInputs:
    """T episodes for the unrolled loss.

    Attributes:
        support: ``Tensor[S, 3, H, W]`` support images of all episodes, episode after episode.
        support_labels: ``LongTensor[S]``, labels within each episode.
        support_sizes: support images per episode; num_classes: classes per episode.
        query: ``Tensor[Q, 3, H, W]``; query_labels: ``LongTensor[Q]``; query_sizes: query images per episode.
        support_prefix / query_prefix: the frozen prefix's outputs for them (None without a prefix).
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    support_sizes: list[int]
    num_classes: list[int]
    query: torch.Tensor
    query_labels: torch.Tensor
    query_sizes: list[int]
    support_prefix: Any = None
    query_prefix: Any = None


@dataclass
class FlowInputs:
    """T points on trajectories for the flow-matching loss.

    Attributes:
        features: ``Tensor[N, D]``, support features at theta_0 of all tasks; labels: ``LongTensor[N]``.
        sizes: support images per task; num_classes: classes per task.
        times: ``Tensor[T]`` in [0, 1].
        positions / velocities: TaskStates of T tasks (every entry of the adapter's state; the head padded to
            the largest number of classes).
        groups: the groups the loss is computed on (those the trajectories fine-tuned).
    """

    features: torch.Tensor
    labels: torch.Tensor
    sizes: list[int]
    num_classes: list[int]
    times: torch.Tensor
    positions: TaskState
    velocities: TaskState
    groups: list[str]


def flow_matching_loss(drift: DriftNet, inputs: FlowInputs, scales: dict[str, float],
                       encoding: TaskEncoding | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-group normalised squared error of the drift against the paths' velocities.

    ``loss = mean_g [ mean_tasks sum_{entries of g} ||drift - velocity||^2 / scale_g ]`` over the groups of
    ``inputs.groups``; padded head classes do not count.

    Returns:
        ``(loss, {group: its term})`` (0-d tensors).
    """
    if encoding is None:
        encoding = drift.encode_tasks(inputs.features, inputs.labels, inputs.sizes, inputs.num_classes)
    predicted = drift(inputs.positions, inputs.times, encoding)
    num_tasks = inputs.times.shape[0]
    terms: dict[str, torch.Tensor] = {}
    for key, target in inputs.velocities.items():
        group = parse_state_key(key)[0]
        if group not in inputs.groups:
            continue
        error = (predicted[key].float() - target.float()).pow(2)
        if key == HEAD_KEY:
            error = error * encoding.class_mask[..., None].to(error.dtype)
        term = error.sum() / (num_tasks * scales[group])
        terms[group] = terms[group] + term if group in terms else term
    if not terms:
        raise ValueError(f"No entry of the state belongs to the groups {inputs.groups}.")
    loss = torch.stack(list(terms.values())).mean()
    return loss, terms


def velocity_scales(trajectories: Sequence[TaskState] | Iterator[TaskState], groups: Sequence[str],
                    class_counts: Sequence[int] | None = None) -> dict[str, float]:
    """``scale_g``: the mean over trajectories of ``||theta_K - theta_0||^2`` restricted to group g.

    Args:
        trajectories: TaskStates with the K+1 snapshots on the task axis.
        groups: the groups to measure.

    Raises:
        ValueError: no trajectory, or a group that never moves (its scale would be 0).
    """
    totals = {g: 0.0 for g in groups}
    count = 0
    for snapshots in trajectories:
        count += 1
        for key, value in snapshots.items():
            group = parse_state_key(key)[0]
            if group in totals:
                totals[group] += float((value[-1].double() - value[0].double()).pow(2).sum())
    if count == 0:
        raise ValueError("velocity_scales needs at least one trajectory.")
    scales = {g: total / count for g, total in totals.items()}
    still = [g for g, s in scales.items() if not s > 0]
    if still:
        raise ValueError(f"The trajectories never move the group(s) {still}: a fine-tuning lr of 0, or groups that "
                         f"were not fine-tuned; remove them from the flow loss.")
    return scales


def _full_state(drift: DriftNet, partial: TaskState, num_classes: int, zeros: bool) -> TaskState:
    """Every entry of the drift's state for one task: ``partial``'s entries, the rest at theta_0 (or 0)."""
    tensors = {}
    reference = next(iter(partial.values()))
    for entry in drift.entries:
        if entry.key in partial:
            tensors[entry.key] = partial[entry.key]
        elif entry.group == "lora" and entry.param == "A" and not zeros:
            tensors[entry.key] = drift.theta0(entry.key).to(reference)[None]
        else:
            tensors[entry.key] = torch.zeros(1, *entry.shape, dtype=reference.dtype, device=reference.device)
    if "head" in drift.groups:
        tensors[HEAD_KEY] = partial[HEAD_KEY] if HEAD_KEY in partial else torch.zeros(
            1, num_classes, drift.feature_size, dtype=reference.dtype, device=reference.device)
    return TaskState(tensors)


def _pad_heads(states: list[TaskState], c_max: int) -> list[TaskState]:
    if HEAD_KEY not in states[0]:
        return states
    return [TaskState({k: (F.pad(v, (0, 0, 0, c_max - v.shape[1])) if k == HEAD_KEY else v) for k, v in s.items()})
            for s in states]


def flow_inputs(drift: DriftNet, features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], paths: Sequence,
                times: torch.Tensor, groups: Sequence[str]) -> FlowInputs:
    """Assemble :class:`FlowInputs` from T tasks.

    Args:
        features: T tensors ``[S_i, D]`` (support features at theta_0); labels: T ``LongTensor[S_i]``.
        paths: T :class:`~hf_hyperflow.trajectories.StatePath` of one trajectory each (``position(t)`` /
            ``velocity(t)`` give TaskStates of one task with the fine-tuned entries).
        times: ``Tensor[T]`` in [0, 1].
        groups: the groups of the loss.
    """
    num_classes = [int(y.max()) + 1 for y in labels]
    c_max = max(num_classes)
    positions, velocities = [], []
    device = features[0].device
    for path, t, c in zip(paths, times.tolist(), num_classes, strict=True):
        where = torch.tensor([t], dtype=torch.float32)
        positions.append(_full_state(drift, path.position(where).to(device), c, zeros=False))
        velocities.append(_full_state(drift, path.velocity(where).to(device), c, zeros=True))
    return FlowInputs(
        features=torch.cat(list(features)), labels=torch.cat(list(labels)).to(device),
        sizes=[f.shape[0] for f in features], num_classes=num_classes, times=times.to(device, torch.float32),
        positions=TaskState.cat(_pad_heads(positions, c_max)), velocities=TaskState.cat(_pad_heads(velocities, c_max)),
        groups=list(groups))


class DriftObjective(nn.Module):
    """The module Accelerate prepares: its only submodule is the drift network.

    ``forward(unrolled, flow)`` returns a dict with ``loss`` (the weighted sum) and its parts. The adapter
    (backbone, tuner) is kept as a plain attribute, outside the module tree, so that DDP synchronises the
    drift network alone and no gradient reaches the backbone.

    Args:
        adapter: the HyperFlowAdapter whose drift network is trained.
        unrolled_weight, flow_weight: weights of the two losses.
        steps, integrator: integration of the unrolled loss.
        scales: per-group scales of the flow loss.
        prefix: a :class:`PrefixCache` (its ``replaced`` context is used when inputs carry prefix outputs).
    """

    def __init__(self, adapter, *, unrolled_weight: float = 1.0, flow_weight: float = 0.0, steps: int | None = None,
                 integrator: str | None = None, scales: dict[str, float] | None = None,
                 prefix: PrefixCache | None = None):
        super().__init__()
        self.drift = adapter.drift
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "prefix", prefix)
        self.unrolled_weight = float(unrolled_weight)
        self.flow_weight = float(flow_weight)
        self.steps = steps
        self.integrator = integrator
        self.scales = dict(scales or {})

    def _replaced(self, output, num_images: int):
        if output is None or self.prefix is None:
            return contextlib.nullcontext()
        return self.prefix.replaced(output, num_images)

    def unrolled_loss(self, inputs: UnrolledInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy over the episodes and the query accuracy (0-d tensors)."""
        adapter = self.adapter
        with self._replaced(inputs.support_prefix, inputs.support.shape[0]):
            features0 = adapter.task_features(inputs.support)
            batch = adapter.adapt_batch(inputs.support, inputs.support_labels, inputs.support_sizes,
                                        inputs.num_classes, steps=self.steps, integrator=self.integrator,
                                        task_features=features0)
        with self._replaced(inputs.query_prefix, inputs.query.shape[0]):
            logits = adapter.query_logits(batch, inputs.query, inputs.query_sizes)
        losses, correct = [], 0
        for task_logits, labels in zip(logits, inputs.query_labels.split(inputs.query_sizes), strict=True):
            losses.append(F.cross_entropy(task_logits.float(), labels))
            correct += int((task_logits.argmax(-1) == labels).sum())
        accuracy = torch.tensor(correct / inputs.query.shape[0], device=inputs.query.device)
        return torch.stack(losses).mean(), accuracy

    def forward(self, unrolled: UnrolledInputs | None = None, flow: FlowInputs | None = None) -> dict[str, torch.Tensor]:
        if unrolled is None and flow is None:
            raise ValueError("DriftObjective needs unrolled inputs, flow inputs or both.")
        out: dict[str, torch.Tensor] = {}
        total = None
        if unrolled is not None:
            loss, accuracy = self.unrolled_loss(unrolled)
            out["unrolled_loss"], out["train_accuracy"] = loss, accuracy
            total = self.unrolled_weight * loss
        if flow is not None:
            loss, terms = flow_matching_loss(self.drift, flow, self.scales)
            out["flow_loss"] = loss
            for group, term in terms.items():
                out[f"flow_{group}"] = term
            total = self.flow_weight * loss if total is None else total + self.flow_weight * loss
        out["loss"] = total
        return out


# ================================================================================================
# Building the pieces of a run
# ================================================================================================
def _build_backbone(config: TrainConfig, output_dir: Path, accelerator):
    from transformers import AutoConfig, AutoModel, TimmWrapperConfig

    section = config.backbone
    if section.path is not None:
        if section.build is not None:
            from .pretrained import build_efficientnet_lite0

            with accelerator.main_process_first():
                if accelerator.is_main_process and not Path(section.path).exists():
                    build_efficientnet_lite0(section.path)
        return AutoModel.from_pretrained(section.path), section.path
    settings = dict(section.random_init)
    model_type = settings.pop("model_type")
    seed = settings.pop("seed", 0)
    if model_type == "timm_wrapper":
        backbone_config = TimmWrapperConfig(**settings)
    else:
        try:
            backbone_config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError) as error:
            raise ValueError(f"backbone.random_init: cannot build a {model_type!r} config ({error}).") from None
    torch.manual_seed(seed)
    backbone = AutoModel.from_config(backbone_config).eval()
    folder = output_dir / "backbone"
    if accelerator.is_main_process:
        backbone.save_pretrained(folder)
    accelerator.wait_for_everyone()
    return backbone, str(folder)


def _build_adapter(config: TrainConfig, backbone):
    from .adapter import HyperFlowAdapter

    if config.adapter.pretrained is not None:
        adapter = HyperFlowAdapter.from_pretrained(backbone, config.adapter.pretrained)
        adapter.config.inference_mode = False
    else:
        adapter = HyperFlowAdapter(backbone, HyperFlowConfig(**config.adapter.config))
    adapter.backbone.requires_grad_(False)
    adapter.drift.requires_grad_(True)
    # A constant added to every logit changes neither the softmax nor the cross-entropy: the bias's gradient is
    # rounding noise, which Adam would turn into a random walk of one learning rate per step. It stays fixed.
    adapter.drift.logit_bias.requires_grad_(False)
    adapter.model.eval()
    return adapter


def _slice_classes(dataset, label_column: str, max_classes: int, seed: int):
    from .episodes import LabelIndex

    index = LabelIndex.build(dataset, label_column)
    present = np.nonzero(index.counts() > 0)[0]
    if len(present) <= max_classes:
        return dataset
    chosen = np.sort(np.random.default_rng(seed).choice(present, size=max_classes, replace=False))
    rows = np.nonzero(np.isin(index.codes, chosen))[0]
    return dataset.select(rows)


def load_source(entry: DatasetSection, key: str):
    """The dataset of one config entry (sliced to ``max_classes``) and its resolved label column."""
    from .episodes import load_image_dataset, resolve_label_column

    try:
        dataset = load_image_dataset(entry.source, split=entry.hub_split)
        label_column = resolve_label_column(dataset, entry.label_column)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise type(error)(f"{key}.source: {error}") from None
    if entry.max_classes is not None:
        dataset = _slice_classes(dataset, label_column, entry.max_classes, seed=0)
    return dataset, label_column


def _class_split(entry: DatasetSection, dataset, label_column: str, key: str):
    from .episodes import ClassSplit

    spec = entry.class_split
    try:
        if spec is None:
            return ClassSplit.from_dataset(dataset, label_column=label_column)
        if isinstance(spec, str):
            return ClassSplit.load(spec)
        if {"train", "validation", "test"} & set(spec):
            return ClassSplit.from_dict(spec)
        return ClassSplit.from_dataset(dataset, label_column=label_column,
                                       fractions=spec.get("fractions", (0.7, 0.15, 0.15)), seed=spec.get("seed", 0),
                                       group_column=spec.get("group_column"))
    except (ValueError, TypeError) as error:
        raise type(error)(f"{key}.class_split: {error}") from None


@dataclass
class _Source:
    name: str
    entry: DatasetSection
    dataset: Any
    label_column: str
    class_split: Any
    class_split_file: Path | None = None


class _PixelTransform:
    """PIL images -> ``Tensor[B, 3, H, W]`` with an image processor (picklable, for DataLoader workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images):
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def _prepare_sources(config: TrainConfig, accelerator, output_dir: Path) -> list[_Source]:
    """Load (or build) every dataset and its class split; checks that the splits can feed the run."""
    sources = []
    for k, entry in enumerate(config.datasets):
        key = f"datasets[{k}]"
        if entry.builder is not None and not Path(entry.source).exists():
            builders = _data_builders()
            if builders is None:
                raise ValueError(f"{key}.builder: the recipes.data builders are not importable from here; build "
                                 f"{entry.source} first.")
            with accelerator.main_process_first():
                if accelerator.is_main_process and not Path(entry.source).exists():
                    builders[entry.builder].build(entry.source)
        dataset, label_column = load_source(entry, key)
        class_split = _class_split(entry, dataset, label_column, key)
        needs_train = config.losses.unrolled > 0 or config.flow.generate is not None
        if needs_train and not class_split.train:
            raise ValueError(f"{key}.class_split: the train split has no classes.")
        if config.validation.episodes > 0 and not class_split.validation:
            raise ValueError(f"{key}.class_split: the validation split has no classes (needed for validation "
                             f"episodes; or set validation.episodes: 0).")
        source = _Source(dataset_name(entry), entry, dataset, label_column, class_split)
        source.class_split_file = output_dir / "class_splits" / f"{source.name}.json"
        sources.append(source)
    if accelerator.is_main_process:
        for source in sources:
            source.class_split_file.parent.mkdir(parents=True, exist_ok=True)
            source.class_split.save(source.class_split_file)
    accelerator.wait_for_everyone()
    return sources


def episode_shape(config: TrainConfig, entry: DatasetSection) -> dict:
    """``protocol``, ``ways``, ``shots``, ``queries`` of one dataset's episodes: its own, else the config's."""
    shape = {name: getattr(config.episodes, name) for name in EPISODE_SHAPE}
    if entry.episodes:
        if entry.episodes.get("protocol") == "md":
            shape.update(ways=None, shots=None, queries=None)
        shape.update(entry.episodes)
    return shape


def _sampler(source: _Source, config: TrainConfig, split: str, seed: int, num_episodes: int, transform, key: str,
             rank: int = 0, world_size: int = 1):
    from .episodes import EpisodeSampler

    shape = episode_shape(config, source.entry)
    try:
        return EpisodeSampler(source.dataset, **shape, seed=seed, split=split, class_split=source.class_split,
                              image_column=source.entry.image_column, label_column=source.label_column,
                              num_episodes=num_episodes, image_transform=transform, rank=rank, world_size=world_size)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{key} ({split} episodes): {error}") from None


# ------------------------------------------------------------------------------------------------
# Episode loading (DataLoader items are whole micro-batches; never handed to accelerator.prepare)
# ------------------------------------------------------------------------------------------------
def _row_key(entry: DatasetSection) -> str:
    """What identifies the rows of a dataset in the prefix cache (the same source sliced the same way)."""
    return f"{entry.source}|{entry.hub_split}|{entry.max_classes}"


@dataclass
class _LoadedEpisode:
    index: int
    source: str
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    support_rows: list[int]
    query_rows: list[int]


class _MicroBatches(torch.utils.data.Dataset):
    """Item m: the episodes of this rank's m-th micro-batch, decoded and turned into pixel values."""

    def __init__(self, mix: EpisodeMix, schedule: list[list[int]], row_keys: list[str]):
        self.mix = mix
        self.schedule = schedule
        self.row_keys = row_keys

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, m: int) -> list[_LoadedEpisode]:
        out = []
        for index in self.schedule[m]:
            source, episode = self.mix[index]
            out.append(_LoadedEpisode(index, self.row_keys[source], episode.support_images, episode.support_labels,
                                      episode.query_images, episode.query_labels, list(episode.support_indices),
                                      list(episode.query_indices)))
        return out


def _identity(item):
    return item


def _unrolled_inputs(episodes: list[_LoadedEpisode], device, dtype, prefix: PrefixCache | None) -> UnrolledInputs:
    support = torch.cat([e.support for e in episodes]).to(device, dtype)
    query = torch.cat([e.query for e in episodes]).to(device, dtype)
    inputs = UnrolledInputs(
        support=support, support_labels=torch.cat([e.support_labels for e in episodes]).to(device),
        support_sizes=[len(e.support_labels) for e in episodes],
        num_classes=[int(e.support_labels.max()) + 1 for e in episodes],
        query=query, query_labels=torch.cat([e.query_labels for e in episodes]).to(device),
        query_sizes=[len(e.query_labels) for e in episodes])
    if prefix is not None and prefix.active:
        inputs.support_prefix = prefix.outputs(support, [(e.source, r) for e in episodes for r in e.support_rows])
        inputs.query_prefix = prefix.outputs(query, [(e.source, r) for e in episodes for r in e.query_rows])
    return inputs


# ------------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------------
class _TrajectoryPool:
    """Every trajectory of the flow loss: paths, rebuilt support sets and their cached features at theta_0."""

    def __init__(self, folders: list[Path], adapter, config: TrainConfig, sources: list[_Source], prefix: PrefixCache,
                 transform):
        from .trajectories import TrajectoryStore

        self.adapter = adapter
        self.kind = config.flow.interpolation
        self.prefix = prefix
        self.transform = transform
        self.stores = []
        self.entries: list[tuple[int, int]] = []
        expected = [[e.key, list(e.shape)] for e in adapter.drift.entries]
        identity = adapter.config.to_dict()
        groups = None
        for k, folder in enumerate(folders):
            key = f"flow.trajectories[{k}]"
            store = TrajectoryStore(folder)
            header = store.header
            if header.get("state_entries") != expected:
                raise ValueError(f"{key}: {folder} was recorded with another state layout (other groups, rank or "
                                 f"adapted blocks). Train from the adapter it was recorded with: set adapter.pretrained "
                                 f"to {folder / 'adapter'}.")
            differing = [name for name, value in (header.get("adapter") or {}).items()
                         if name in identity and identity[name] != value]
            if differing:
                raise ValueError(f"{key}: {folder} was recorded with an adapter whose {differing} differ from this "
                                 f"run's; set adapter.pretrained to {folder / 'adapter'} (or the adapter it used).")
            store_groups = list(store.settings["groups"])
            if groups is not None and store_groups != groups:
                raise ValueError(f"{key}: fine-tuned groups {store_groups} differ from the first store's {groups}.")
            groups = store_groups
            if len(store) == 0:
                raise ValueError(f"{key}: {folder} holds no trajectory.")
            self.stores.append(store)
            self.entries += [(k, i) for i in range(len(store))]
        self.groups = groups
        self._samplers: dict[str, Any] = {}
        self._row_keys: dict[str, str] = {}
        self._sources = sources
        self._features: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._orders: dict[int, np.ndarray] = {}
        self.seed = config.flow.seed
        count = min(config.flow.normalizer_trajectories, len(self.entries))
        self.scales = velocity_scales((self.stores[s][i].snapshots for s, i in self.entries[:count]), groups)

    def __len__(self) -> int:
        return len(self.entries)

    def draw(self, sample_id: int) -> tuple[int, float]:
        """Trajectory (index into the pool) and time of global sample ``sample_id``: each epoch of ``len(pool)``
        samples visits every trajectory once, in an order seeded by the epoch."""
        epoch, position = divmod(sample_id, len(self.entries))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng(_seed_of(self.seed, epoch)).permutation(len(self.entries))}
        t = float(np.random.default_rng(_seed_of(self.seed, sample_id, 1)).random())
        return int(self._orders[epoch][position]), t

    def trajectory_id(self, index: int) -> str:
        store, i = self.entries[index]
        return f"{store}:{self.stores[store].ids[i]}"

    def _episode(self, store_index: int, record: dict):
        """Rebuild the episode a trajectory was recorded on, from the store's dataset description and its spec."""
        from .episodes import ClassSplit, EpisodeSampler

        store = self.stores[store_index]
        description = store.header.get("dataset") or {}
        key = f"flow.trajectories[{store_index}]"
        cache_key = json.dumps(description, sort_keys=True)
        if cache_key not in self._samplers:
            if "source" not in description:
                raise ValueError(f"{key}: {store.path} does not say which dataset its episodes come from (no "
                                 f"dataset.source in store.json); record it with recipes/make_trajectories.py.")
            entry = DatasetSection(source=description["source"], max_classes=description.get("max_classes"),
                                   hub_split=description.get("hub_split") or "train")
            known = next((s for s in self._sources if s.entry.source == entry.source
                          and s.entry.max_classes == entry.max_classes), None)
            if known is not None:
                dataset = known.dataset
            else:
                dataset, _ = load_source(entry, key)
            class_split = (ClassSplit.load(description["class_split"]) if description.get("class_split") else None)
            size = 1 + max(int(i.split(":")[0]) for i in store.ids)
            self._row_keys[cache_key] = _row_key(entry)
            self._samplers[cache_key] = EpisodeSampler(
                dataset, protocol=description.get("protocol") or "fixed", ways=description.get("ways"),
                shots=description.get("shots"), queries=description.get("queries"),
                seed=description.get("episode_seed") or 0, split=description.get("split", "train"),
                class_split=class_split, num_episodes=size, image_transform=self.transform)
        sampler = self._samplers[cache_key]
        episode = sampler[record["episode"]]
        if json.loads(json.dumps(episode.spec)) != record["spec"]:
            raise ValueError(f"{key}: the episode of trajectory {record['id']} cannot be rebuilt identically from "
                             f"{description} (stored spec {record['spec']}, rebuilt {episode.spec}); the dataset or "
                             f"its class split changed since it was recorded.")
        return episode, self._row_keys[cache_key]

    def features(self, index: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Tensor[S, D], LongTensor[S])``: the trajectory's support features at theta_0 and labels (cached)."""
        if index not in self._features:
            store_index, i = self.entries[index]
            record = self.stores[store_index][i].meta
            episode, row_key = self._episode(store_index, record)
            pixels = episode.support_images.to(device, dtype)
            keys = [(row_key, r) for r in episode.support_indices]
            with self.prefix.context(pixels, keys):
                feats = self.adapter.task_features(pixels)
            self._features[index] = (feats, episode.support_labels.to(device))
        return self._features[index]

    def path(self, index: int):
        store_index, i = self.entries[index]
        return self.stores[store_index].path_for(i, self.kind)


def _generate_trajectories(config: TrainConfig, adapter, sources: list[_Source], accelerator, transform,
                           output_dir: Path) -> list[Path]:
    """Record ``flow.generate`` trajectories (one store per dataset) with the fine-tuning teacher; resumable."""
    from .trajectories import TrajectoryStore, record_trajectories

    generate = config.flow.generate
    parent = Path(generate.output) if generate.output else output_dir / "trajectories"
    folders = []
    for k, source in enumerate(sources):
        folder = parent / source.name
        sampler = _sampler(source, config, "train", generate.seed, generate.episodes, transform, f"datasets[{k}]")
        description = {"source": source.entry.source, "hub_split": source.entry.hub_split,
                       "max_classes": source.entry.max_classes, "split": "train",
                       **episode_shape(config, source.entry), "episode_seed": generate.seed, "class_split": str(source.class_split_file)}
        done = (folder / "store.json").is_file() and len(TrajectoryStore(folder)) >= generate.episodes * generate.inits
        if not done:
            record_trajectories(
                adapter, sampler, folder, groups=tuple(generate.groups or adapter.config.groups), steps=generate.steps,
                lr=generate.lr, inits=generate.inits, noise_std=generate.noise_std, seed=generate.seed,
                augment_pool=generate.augment_pool, snapshot_every=generate.snapshot_every,
                resume=(folder / "store.json").is_file(), accelerator=accelerator, dataset=description,
                progress=True)
        folders.append(folder)
    if accelerator.is_main_process:
        adapter_folder = parent / "adapter"
        if not adapter_folder.exists():
            adapter.save_pretrained(adapter_folder)
    accelerator.wait_for_everyone()
    return folders


# ================================================================================================
# Validation
# ================================================================================================
@torch.no_grad()
def _validate(adapter, samplers: list, sources: list[_Source], prefix: PrefixCache, accelerator, tasks_per_batch: int,
              direct_transfer: bool = False) -> dict:
    """Mean query accuracy of the fixed validation episodes of every dataset (rank-sharded, gathered).

    With ``direct_transfer`` the accuracy of the frozen backbone's prototypes (theta_0, no head delta) instead.
    """
    from accelerate.utils import gather_object

    from .stats import mean_confidence_interval

    device, dtype = adapter._device_dtype()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = []
    for k, sampler in enumerate(samplers):
        indices = list(range(rank, len(sampler), world))
        for start in range(0, len(indices), tasks_per_batch):
            episodes = []
            for i in indices[start:start + tasks_per_batch]:
                e = sampler[i]
                episodes.append(_LoadedEpisode(i, _row_key(sources[k].entry), e.support_images, e.support_labels, e.query_images,
                                               e.query_labels, list(e.support_indices), list(e.query_indices)))
            inputs = _unrolled_inputs(episodes, device, dtype, prefix)
            with accelerator.autocast():
                accuracies = _episode_accuracies(adapter, inputs, prefix, direct_transfer)
            mine += [(k, e.index, a) for e, a in zip(episodes, accuracies, strict=True)]
    everything = gather_object(mine)
    result = {}
    means = []
    for k, source in enumerate(sources):
        values = [a for s, _, a in sorted(everything) if s == k]
        mean, half = mean_confidence_interval(values)
        result[source.name] = {"accuracy": mean, "ci95": half, "episodes": len(values)}
        means.append(mean)
    result["accuracy"] = float(np.mean(means))
    return result


def _episode_accuracies(adapter, inputs: UnrolledInputs, prefix: PrefixCache, direct_transfer: bool) -> list[float]:
    def context(output, n):
        return prefix.replaced(output, n) if output is not None else contextlib.nullcontext()

    with context(inputs.support_prefix, inputs.support.shape[0]):
        features0 = adapter.task_features(inputs.support)
        if not direct_transfer:
            batch = adapter.adapt_batch(inputs.support, inputs.support_labels, inputs.support_sizes,
                                        inputs.num_classes, task_features=features0)
    with context(inputs.query_prefix, inputs.query.shape[0]):
        if direct_transfer:
            query0 = adapter.task_features(inputs.query)
            drift = adapter.drift
            logits = []
            for f, y, c, q in zip(features0.split(inputs.support_sizes), inputs.support_labels.split(inputs.support_sizes),
                                  inputs.num_classes, query0.split(inputs.query_sizes), strict=True):
                logits.append(prototype_logits(q, class_prototypes(f, y, c), drift.logit_scale, drift.logit_bias))
        else:
            logits = adapter.query_logits(batch, inputs.query, inputs.query_sizes)
    return [float((lg.argmax(-1) == y).float().mean())
            for lg, y in zip(logits, inputs.query_labels.split(inputs.query_sizes), strict=True)]


# ================================================================================================
# Checkpoints
# ================================================================================================
def _checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then renamed: a checkpoint exists whole or not at all."""
    final = output_dir / CHECKPOINT_DIR / f"step_{step:07d}"
    temporary = output_dir / CHECKPOINT_DIR / f".tmp-step_{step:07d}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def drift_fingerprint(drift: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the drift network's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(drift.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ================================================================================================
# The run
# ================================================================================================
@dataclass
class TrainResult:
    """What :func:`train` returns (the same numbers are in ``<output_dir>/metrics.json``).

    Attributes:
        output_dir: the run folder. best_dir / final_dir: the saved adapters (best by validation accuracy).
        step: the optimizer step reached. best_step / best_accuracy: the best validation (None without one).
        metrics: the metrics dict written to metrics.json.
    """

    output_dir: Path
    best_dir: Path | None
    final_dir: Path | None
    step: int
    best_step: int | None
    best_accuracy: float | None
    metrics: dict


def _has_accelerator() -> bool:
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None and hasattr(accelerator_api, "is_available"):
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def _make_accelerator(config: TrainConfig, output_dir: Path, cpu: bool | None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    run = config.training
    use_cpu = cpu if cpu is not None else (run.cpu if run.cpu is not None else not _has_accelerator())
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=config.losses.unrolled == 0)]
    accelerator = Accelerator(
        cpu=use_cpu, mixed_precision=run.mixed_precision, gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=run.report_to, project_config=ProjectConfiguration(project_dir=str(output_dir)),
        kwargs_handlers=handlers)
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(f"{accelerator.distributed_type.value} is not supported: the trained module is the drift "
                         f"network alone (a few MB) and the frozen backbone is not trained, so there is nothing for it "
                         f"to shard. Launch with DDP (accelerate launch --multi_gpu, or distributed_type: MULTI_GPU).")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: they "
                           f"would train independently. On CPU launch with `accelerate launch --multi_gpu "
                           f"--num_processes N ...` and training.cpu: true (or --cpu).")
    if run.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("training.mixed_precision: fp16 does nothing on CPU; use bf16 (or 'no').")
    return accelerator


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def _save_adapter(adapter, folder: Path, config: TrainConfig, metrics: dict, extra: dict) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    adapter.save_pretrained(folder)
    _write_json(folder / "training_config.json", config.to_dict())
    _write_json(folder / "metrics.json", {**metrics, **extra})


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False, max_steps_this_run: int | None = None,
          cpu: bool | None = None, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Meta-train the drift network as ``config`` says (call it under ``accelerate launch`` for several processes).

    Args:
        config: a validated :class:`TrainConfig` (see :func:`load_config`).
        resume: True: continue from the latest checkpoint in ``<output_dir>/checkpoints`` (start afresh when
            there is none); a path: from that checkpoint.
        max_steps_this_run: stop (with a checkpoint) after this many optimizer steps of this call.
        cpu: force CPU (overrides ``training.cpu``).
        callback: called as ``callback(step, record)`` on every rank after each optimizer step (and its
            checkpoint, if any).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError / TypeError: a config that cannot run (named key), before any training step.
    """
    from transformers import get_scheduler

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (see load_config), got {type(config).__name__}.")
    validate_config(config)
    if max_steps_this_run is not None:
        _check_int(max_steps_this_run, "max_steps_this_run", 1)
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    run = config.training
    accelerator = _make_accelerator(config, output_dir, cpu)
    world, rank = accelerator.num_processes, accelerator.process_index
    accumulation = run.gradient_accumulation_steps
    per_step = run.episodes_per_step
    flow_per_step = config.flow.trajectories_per_step or per_step
    for name, value in (("training.episodes_per_step", per_step), ("flow.trajectories_per_step", flow_per_step)):
        if value % (world * accumulation):
            raise ValueError(f"{name}={value} must be divisible by processes x gradient_accumulation_steps = "
                             f"{world} x {accumulation}.")
    threads = run.threads
    if threads is None and accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        threads = max(1, (os.cpu_count() or 1) // max(1, local_processes))
    if threads is not None:
        torch.set_num_threads(threads)

    # Where to start.
    checkpoint = None
    if resume:
        checkpoint = Path(resume) if not isinstance(resume, bool) else (_checkpoints(output_dir) or [None])[-1]
        if checkpoint is not None and not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"resume: {checkpoint} is not a checkpoint of this trainer (no {TRAINER_STATE}).")
    elif _checkpoints(output_dir):
        raise ValueError(f"output_dir={str(output_dir)!r} holds checkpoints of an earlier run: pass --resume to "
                         f"continue it, or choose another output_dir.")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / "training_config.json", config.to_dict())
        import yaml

        (output_dir / "training_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()

    # Data, backbone, adapter.
    from accelerate.utils import set_seed

    sources = _prepare_sources(config, accelerator, output_dir)
    backbone, backbone_source = _build_backbone(config, output_dir, accelerator)
    set_seed(config.seed)
    adapter = _build_adapter(config, backbone)
    adapter.model.to(accelerator.device)
    transform = _PixelTransform(adapter.image_processor)
    device, dtype = adapter._device_dtype()
    total_episodes = run.max_steps * per_step
    train_samplers = ([_sampler(s, config, "train", config.episodes.seed + 7919 * k, total_episodes, transform,
                                f"datasets[{k}]", rank, world) for k, s in enumerate(sources)]
                      if config.losses.unrolled > 0 else [])
    validation_samplers = ([_sampler(s, config, "validation", config.validation.seed + k, config.validation.episodes,
                                     transform, f"datasets[{k}]") for k, s in enumerate(sources)]
                           if config.validation.episodes > 0 else [])
    prefix = PrefixCache(adapter, run.prefix_cache_mb * 2**20)

    # Trajectories.
    pool = None
    if config.losses.flow > 0:
        folders = [Path(p) for p in config.flow.trajectories]
        if config.flow.generate is not None:
            folders += _generate_trajectories(config, adapter, sources, accelerator, transform, output_dir)
        pool = _TrajectoryPool(folders, adapter, config, sources, prefix, transform)

    # Objective, optimizer, schedule.
    unrolled = config.unrolled
    objective = DriftObjective(adapter, unrolled_weight=config.losses.unrolled, flow_weight=config.losses.flow,
                               steps=unrolled.steps, integrator=unrolled.integrator,
                               scales=pool.scales if pool is not None else None, prefix=prefix)
    opt = config.optimizer
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                  weight_decay=opt.weight_decay)
    scheduler = get_scheduler(opt.scheduler, optimizer, num_warmup_steps=opt.warmup_steps,
                              num_training_steps=run.max_steps)
    trainable = {id(p) for p in adapter.drift.parameters() if p is not adapter.drift.logit_bias}
    leaked = [n for n, p in adapter.model.named_parameters() if p.requires_grad and id(p) not in trainable]
    if leaked:
        raise RuntimeError(f"Only the drift network may be trained, but {leaked[:3]} require gradients.")
    objective, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    # Resume.
    state = {"step": 0, "best_accuracy": None, "best_step": None, "history": [], "validations": [],
             "train_seconds": 0.0, "direct_transfer": None, "processes": world}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        if accelerator.is_local_main_process:
            tqdm.write(f"resumed from {checkpoint} at step {state['step']}")
    start_step = state["step"]
    if start_step >= run.max_steps:
        raise ValueError(f"training.max_steps={run.max_steps}: the checkpoint is at step {start_step} already; raise "
                         f"training.max_steps to train further.")
    end_step = run.max_steps if max_steps_this_run is None else min(run.max_steps, start_step + max_steps_this_run)

    # Episode log (rewound to the checkpoint on resume).
    episode_log = None
    if run.log_episodes:
        episode_log = output_dir / "episodes" / f"rank_{rank}.jsonl"
        episode_log.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if episode_log.is_file():
            kept = [line for line in episode_log.read_text().splitlines()
                    if line and json.loads(line)["step"] < start_step]
        episode_log.write_text("".join(line + "\n" for line in kept))

    if run.report_to:
        accelerator.init_trackers("hyperflow", config={k: v for k, v in _flatten(config.to_dict()).items()
                                                       if isinstance(v, (int, float, str, bool))})

    def validate(step: int) -> dict | None:
        if not validation_samplers:
            return None
        began = time.perf_counter()
        result = _validate(adapter, validation_samplers, sources, prefix, accelerator, config.validation.tasks_per_batch)
        result.update(step=step, seconds=time.perf_counter() - began, train_seconds=state["train_seconds"])
        state["validations"].append(result)
        if state["best_accuracy"] is None or result["accuracy"] > state["best_accuracy"]:
            state["best_accuracy"], state["best_step"] = result["accuracy"], step
            if accelerator.is_main_process:
                _save_adapter(adapter, output_dir / "best", config, _metrics(), {"step": step, "validation": result})
        if run.report_to:
            accelerator.log({"validation/accuracy": result["accuracy"]}, step=step)
        if accelerator.is_local_main_process:
            tqdm.write(f"step {step}: validation accuracy {result['accuracy']:.4f}")
        accelerator.wait_for_everyone()
        return result

    def _metrics() -> dict:
        return {"output_dir": str(output_dir), "backbone": backbone_source, "processes": world,
                "episodes_per_step": per_step, "trajectories_per_step": flow_per_step if pool is not None else 0,
                "step": state["step"], "best_step": state["best_step"], "best_accuracy": state["best_accuracy"],
                "direct_transfer": state["direct_transfer"], "train_seconds": state["train_seconds"],
                "flow_scales": pool.scales if pool is not None else None,
                "trajectories": len(pool) if pool is not None else 0,
                "validations": state["validations"], "history": state["history"]}

    if start_step == 0 and validation_samplers:
        began = time.perf_counter()
        state["direct_transfer"] = _validate(adapter, validation_samplers, sources, prefix, accelerator,
                                             config.validation.tasks_per_batch, direct_transfer=True)
        state["direct_transfer"]["seconds"] = time.perf_counter() - began
        validate(0)

    # Episodes of this rank, from the start step on.
    loader_iter = None
    if train_samplers:
        mix = EpisodeMix(train_samplers, [s.entry.weight for s in sources], config.episodes.seed)
        schedule = [ids for step in range(start_step, end_step)
                    for ids in step_episode_ids(step, per_step, accumulation, rank, world)]
        loader = torch.utils.data.DataLoader(_MicroBatches(mix, schedule, [_row_key(s.entry) for s in sources]),
                                             batch_size=None, shuffle=False,
                                             num_workers=run.num_workers, collate_fn=_identity)
        loader_iter = iter(loader)

    unwrapped = accelerator.unwrap_model(objective)
    bar = tqdm(total=run.max_steps, initial=start_step, desc="meta-training", unit="step",
               disable=not accelerator.is_local_main_process)
    window = {"seconds": 0.0, "episodes": 0, "trajectories": 0, "sums": {}, "count": 0}
    step = start_step
    while step < end_step:
        began = time.perf_counter()
        used_episodes, used_trajectories = [], []
        sums: dict[str, float] = {}
        for micro in range(accumulation):
            with accelerator.accumulate(objective):
                unrolled_inputs = flow_batch = None
                if loader_iter is not None:
                    episodes = next(loader_iter)
                    used_episodes += [e.index for e in episodes]
                    unrolled_inputs = _unrolled_inputs(episodes, device, dtype, prefix)
                if pool is not None:
                    draws = [pool.draw(g) for g in step_sample_ids(step, micro, flow_per_step, accumulation, rank, world)]
                    used_trajectories += [pool.trajectory_id(i) for i, _ in draws]
                    feats = [pool.features(i, device, dtype) for i, _ in draws]
                    flow_batch = flow_inputs(unwrapped.drift, [f for f, _ in feats], [y for _, y in feats],
                                             [pool.path(i) for i, _ in draws],
                                             torch.tensor([t for _, t in draws]), pool.groups)
                out = objective(unrolled_inputs, flow_batch)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and opt.max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(objective.parameters(), opt.max_grad_norm)
                    sums["grad_norm"] = float(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / accumulation
        scheduler.step()
        step += 1
        seconds = time.perf_counter() - began
        state["train_seconds"] += seconds
        state["step"] = step
        reduced = accelerator.reduce(torch.tensor([sums[k] for k in sorted(sums)], device=device), "mean")
        record = dict(zip(sorted(sums), reduced.tolist(), strict=True))
        record["lr"] = scheduler.get_last_lr()[0]
        window["seconds"] += seconds
        window["episodes"] += len(used_episodes) * world
        window["trajectories"] += len(used_trajectories) * world
        window["count"] += 1
        for name, value in record.items():
            window["sums"][name] = window["sums"].get(name, 0.0) + value
        if episode_log is not None:
            with episode_log.open("a") as handle:
                handle.write(json.dumps({"step": step - 1, "episodes": used_episodes,
                                         "trajectories": used_trajectories}) + "\n")
        if run.report_to:
            accelerator.log({f"train/{k}": v for k, v in record.items()}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if step % run.log_every == 0 or step == end_step:
            entry = {k: v / window["count"] for k, v in window["sums"].items()}
            entry.update(step=step, seconds=window["seconds"], train_seconds=state["train_seconds"],
                         episodes_per_second=window["episodes"] / window["seconds"],
                         trajectories_per_second=window["trajectories"] / window["seconds"],
                         prefix_cache_mb=prefix.used_bytes / 2**20)
            state["history"].append(entry)
            window = {"seconds": 0.0, "episodes": 0, "trajectories": 0, "sums": {}, "count": 0}
        if step % config.validation.every == 0 or step == run.max_steps:
            validate(step)
        if step % run.checkpoint_every == 0 or step == end_step:
            _save_checkpoint(accelerator, output_dir, step, state, run.keep_checkpoints)
            if accelerator.is_main_process:
                _write_json(output_dir / "metrics.json", _metrics())
        if callback is not None:
            callback(step, record)
    bar.close()

    # The end of this call: final adapter and metrics.
    from accelerate.utils import gather_object

    fingerprints = gather_object([drift_fingerprint(unwrapped.drift)])
    metrics = _metrics()
    metrics["drift_fingerprints"] = fingerprints
    metrics["prefix_cache"] = {"images_kept": len(prefix._kept), "mb": prefix.used_bytes / 2**20,
                               "hits": prefix.hits, "misses": prefix.misses}
    final_dir = None
    if step == run.max_steps:
        final_dir = output_dir / "final"
        if accelerator.is_main_process:
            _save_adapter(adapter, final_dir, config, metrics, {"step": step})
    if accelerator.is_main_process:
        _write_json(output_dir / "metrics.json", metrics)
        if not validation_samplers and final_dir is not None:
            best = output_dir / "best"
            _save_adapter(adapter, best, config, metrics, {"step": step, "validation": None})
    accelerator.wait_for_everyone()
    if run.report_to:
        accelerator.end_training()
    best_dir = output_dir / "best"
    return TrainResult(output_dir=output_dir, best_dir=best_dir if best_dir.exists() else None, final_dir=final_dir,
                       step=step, best_step=state["best_step"], best_accuracy=state["best_accuracy"], metrics=metrics)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
