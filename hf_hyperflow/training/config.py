"""The meta-training config: :class:`TrainConfig` and its sections, read from YAML with dotted overrides and
validated before any work (every message names the key)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_int, check_number
from ..config import ADAPTED_GROUPS, INTEGRATOR_NAMES, HyperFlowConfig
from ..hub import looks_local
from ..interpolation import INTERPOLATION_KINDS

__all__ = [
    "TrainConfig", "BackboneSection", "AdapterSection", "DatasetSection", "EpisodesSection", "LossesSection",
    "UnrolledSection", "FlowSection", "GenerateSection", "ValidationSection", "OptimizerSection", "RunSection",
    "load_config", "apply_overrides", "config_from_dict", "validate_config", "dataset_name", "episode_shape",
]

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TRACKERS = ("tensorboard", "trackio")
# HyperFlowConfig fields a training config may set (the others are filled in from the backbone).
ADAPTER_FIELDS = ("groups", "r", "lora_alpha", "target_modules", "shift_modules", "exclude_modules",
                  "first_adapted_block", "integrator", "steps", "hidden_size", "time_embedding_size",
                  "module_embedding_size", "output_rank", "state_projection_size", "statistics_size", "image_size",
                  "init_seed", "stopping", "stopping_points")
# Backbones that can be written to a folder offline (hf_hyperflow.pretrained).
BACKBONE_BUILDERS = ("efficientnet_lite0",)
EPISODE_SHAPE = ("protocol", "ways", "shots", "queries", "max_ways", "max_support")


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
    max_ways: int | None = field(default=None, metadata={
        "help": "md protocol: the largest number of ways drawn (default 50); lower it for cheaper training episodes."})
    max_support: int | None = field(default=None, metadata={
        "help": "md protocol: the most support images of an episode (default 500)."})
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


def config_from_dict(data: dict, data_builders: Mapping | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from plain data (the YAML layout).

    Raises:
        ValueError / TypeError: an unknown key, a value of the wrong type or out of range, a missing local
            dataset, an empty class split, ... always naming the key (e.g. ``training.max_steps``).
    """
    config = _section_from_dict(TrainConfig, data, "")
    validate_config(config, data_builders)
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


def load_config(path: str | os.PathLike, overrides: Sequence[str] | dict = (),
                data_builders: Mapping | None = None) -> TrainConfig:
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
    return config_from_dict(apply_overrides(data, overrides), data_builders)


def _check_ints(section, prefix: str, **lows: int) -> None:
    """``check_int`` on several fields of a section: ``name=lowest allowed value``."""
    for name, low in lows.items():
        check_int(getattr(section, name), f"{prefix}.{name}", low)


def validate_config(config: TrainConfig, data_builders: Mapping | None = None) -> None:
    """Every check that needs no data: ranges, choices, files that must exist. Messages name the key.

    ``data_builders`` (name -> an object with ``build(output_dir)``, e.g. ``recipes.data.BUILDERS``) are the
    builders a dataset's ``builder`` may name; without them the name is checked when it is needed.
    """
    if not config.output_dir:
        raise ValueError("output_dir is missing: set the folder where checkpoints and the adapter are written.")
    check_int(config.seed, "seed", 0)
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
    if (backbone.path is not None and backbone.build is None and looks_local(backbone.path)
            and not Path(backbone.path).expanduser().exists()):
        raise ValueError(f"backbone.path: {backbone.path} does not exist (a local folder was expected; set "
                         f"backbone.build: efficientnet_lite0 to write the pretrained EfficientNet-Lite0 there).")
    # adapter
    adapter = config.adapter
    if adapter.pretrained is not None:
        if adapter.config:
            raise ValueError(f"adapter: with adapter.pretrained the adapter's own config is used; remove "
                             f"{sorted(adapter.config)} or adapter.pretrained.")
        if looks_local(adapter.pretrained) and not Path(adapter.pretrained).expanduser().exists():
            raise ValueError(f"adapter.pretrained: {adapter.pretrained} does not exist.")
    else:
        if "steps" in adapter.config:
            check_int(adapter.config["steps"], "adapter.steps", 1)
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
        if looks_local(entry.source) and not Path(entry.source).expanduser().exists() and entry.builder is None:
            raise ValueError(f"{key}.source: {entry.source} does not exist. Build it first (python -m recipes.data."
                             f"build --name NAME --output {entry.source}) or set {key}.builder to build it.")
        if entry.builder is not None:
            if data_builders is not None and entry.builder not in data_builders:
                raise ValueError(f"{key}.builder: unknown builder {entry.builder!r}; known: {sorted(data_builders)}.")
        if entry.max_classes is not None:
            check_int(entry.max_classes, f"{key}.max_classes", 2)
        check_number(entry.weight, f"{key}.weight", 0.0, strict_low=True)
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
    check_int(config.episodes.seed, "episodes.seed", 0)
    # losses
    check_number(config.losses.unrolled, "losses.unrolled", 0.0)
    check_number(config.losses.flow, "losses.flow", 0.0)
    if config.losses.unrolled == 0 and config.losses.flow == 0:
        raise ValueError("losses: both losses.unrolled and losses.flow are 0; give at least one a positive weight.")
    if config.unrolled.steps is not None:
        check_int(config.unrolled.steps, "unrolled.steps", 1)
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
        check_number(generate.lr, "flow.generate.lr", 0.0, strict_low=True)
        check_number(generate.noise_std, "flow.generate.noise_std", 0.0)
        if generate.augment_pool is not None:
            check_int(generate.augment_pool, "flow.generate.augment_pool", 1)
        if generate.groups is not None:
            bad = [g for g in generate.groups if g not in ADAPTED_GROUPS]
            if bad or not generate.groups:
                raise ValueError(f"flow.generate.groups must be a non-empty mix of {list(ADAPTED_GROUPS)}, got "
                                 f"{generate.groups!r}.")
    if flow.trajectories_per_step is not None:
        check_int(flow.trajectories_per_step, "flow.trajectories_per_step", 1)
    _check_ints(flow, "flow", normalizer_trajectories=1, seed=0)
    _check_ints(config.validation, "validation", episodes=0, every=1, seed=0, tasks_per_batch=1)
    # optimizer
    optimizer = config.optimizer
    check_number(optimizer.lr, "optimizer.lr", 0.0, strict_low=True)
    check_number(optimizer.weight_decay, "optimizer.weight_decay", 0.0)
    check_number(optimizer.eps, "optimizer.eps", 0.0, strict_low=True)
    if (len(optimizer.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in optimizer.betas)):
        raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {optimizer.betas!r}.")
    if optimizer.max_grad_norm is not None:
        check_number(optimizer.max_grad_norm, "optimizer.max_grad_norm", 0.0, strict_low=True)
    if optimizer.scheduler not in SCHEDULERS:
        raise ValueError(f"optimizer.scheduler must be one of {list(SCHEDULERS)}, got {optimizer.scheduler!r}.")
    check_int(optimizer.warmup_steps, "optimizer.warmup_steps", 0)
    run = config.training
    _check_ints(run, "training", max_steps=1, episodes_per_step=1, gradient_accumulation_steps=1, checkpoint_every=1,
                keep_checkpoints=1, log_every=1, num_workers=0)
    check_number(run.prefix_cache_mb, "training.prefix_cache_mb", 0.0)
    if run.threads is not None:
        check_int(run.threads, "training.threads", 1)
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
                check_int(shape[name], f"{key}.{name}", low)
        if shape.get("max_ways") is not None or shape.get("max_support") is not None:
            raise ValueError(f"{key}: max_ways and max_support bound the md protocol; the fixed protocol takes ways, "
                             f"shots and queries.")
    elif any(shape[name] is not None for name in ("ways", "shots", "queries")):
        raise ValueError(f"{key}: the md protocol draws ways, shots and queries itself; set {key}.ways, "
                         f"{key}.shots and {key}.queries to null.")


def dataset_name(entry: DatasetSection) -> str:
    """The name of a dataset in metrics: ``entry.name`` or the last part of its source."""
    return entry.name or Path(entry.source.rstrip("/")).name or entry.source


def episode_shape(config: TrainConfig, entry: DatasetSection) -> dict:
    """``protocol``, ``ways``, ``shots``, ``queries`` of one dataset's episodes: its own, else the config's."""
    shape = {name: getattr(config.episodes, name) for name in EPISODE_SHAPE}
    if entry.episodes:
        if entry.episodes.get("protocol") == "md":
            shape.update(ways=None, shots=None, queries=None)
        elif entry.episodes.get("protocol") == "fixed":
            shape.update(max_ways=None, max_support=None)
        shape.update(entry.episodes)
    return shape
