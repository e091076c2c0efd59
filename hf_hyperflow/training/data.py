"""Where meta-training episodes come from: the datasets of a config with their class splits, the episode
samplers, which episode ids each rank uses at each step, and the DataLoader of micro-batches.

Episodes are not handed to ``accelerator.prepare``: episode ``i`` is rebuilt from ``(seed, i)`` alone and every
rank takes its own share (see :func:`step_sample_ids`), so every episode is used exactly once per optimizer
step across ranks, whatever the number of processes, and a resumed run continues with exactly the episodes
an uninterrupted run would have used.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..episodes import ClassSplit, EpisodeSampler, LabelIndex, load_image_dataset, resolve_label_column
from ..inputs import domain_view
from ..prefix import PrefixCache
from .config import DatasetSection, TrainConfig, dataset_name, episode_shape
from .losses import UnrolledInputs

__all__ = ["step_sample_ids", "step_episode_ids", "seeds", "EpisodeMix", "Source", "load_source",
           "prepare_sources", "load_sources", "make_sampler", "entry_transform", "row_key", "LoadedEpisode", "episode_loader",
           "unrolled_inputs"]


# ------------------------------------------------------------------------------------------------
# Which episodes each rank uses at each step
# ------------------------------------------------------------------------------------------------
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


def seeds(*parts: int) -> list[int]:
    """A seed sequence for ``numpy.random.default_rng`` from integer parts (an episode, a step...)."""
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
        rng = np.random.default_rng(seeds(self.seed, index, 17))
        return int(rng.choice(len(self.samplers), p=self.probabilities))

    def __getitem__(self, index: int):
        source = self.source_of(index)
        return source, self.samplers[source][index]


# ------------------------------------------------------------------------------------------------
# Datasets and samplers
# ------------------------------------------------------------------------------------------------
def _slice_classes(dataset, label_column: str, max_classes: int, seed: int):
    index = LabelIndex.build(dataset, label_column)
    present = np.nonzero(index.counts() > 0)[0]
    if len(present) <= max_classes:
        return dataset
    chosen = np.sort(np.random.default_rng(seed).choice(present, size=max_classes, replace=False))
    rows = np.nonzero(np.isin(index.codes, chosen))[0]
    return dataset.select(rows)


def load_source(entry: DatasetSection, key: str):
    """The dataset of one config entry (sliced to ``max_classes``) and its resolved label column."""
    try:
        dataset = load_image_dataset(entry.source, split=entry.hub_split)
        label_column = resolve_label_column(dataset, entry.label_column)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise type(error)(f"{key}.source: {error}") from None
    if entry.max_classes is not None:
        dataset = _slice_classes(dataset, label_column, entry.max_classes, seed=0)
    return dataset, label_column


def _class_split(entry: DatasetSection, dataset, label_column: str, key: str):
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
class Source:
    """One dataset of a config: its entry, the loaded dataset, its label column and class split."""

    name: str
    entry: DatasetSection
    dataset: Any
    label_column: str
    class_split: Any
    class_split_file: Path | None = None


def prepare_sources(config: TrainConfig, accelerator, output_dir: Path,
                    data_builders: Mapping | None = None) -> list[Source]:
    """Load (or build) every dataset and its class split; checks that the splits can feed the run."""
    sources = []
    for k, entry in enumerate(config.datasets):
        key = f"datasets[{k}]"
        if entry.builder is not None and not Path(entry.source).exists():
            if data_builders is None or entry.builder not in data_builders:
                raise ValueError(f"{key}.builder: no data builder {entry.builder!r} is installed or was given to "
                                 f"train(); build {entry.source} first (hf-hyperflow data build --name {entry.builder} "
                                 f"--output {entry.source}), or install a source checkout (pip install -e .).")
            with accelerator.main_process_first():
                if accelerator.is_main_process and not Path(entry.source).exists():
                    data_builders[entry.builder].build(entry.source)
        source = _source(entry, key)
        class_split = source.class_split
        needs_train = config.losses.unrolled > 0 or config.flow.generate is not None
        if needs_train and not class_split.train:
            raise ValueError(f"{key}.class_split: the train split has no classes.")
        if config.validation.episodes > 0 and not class_split.validation:
            raise ValueError(f"{key}.class_split: the validation split has no classes (needed for validation "
                             f"episodes; or set validation.episodes: 0).")
        source.class_split_file = output_dir / "class_splits" / f"{source.name}.json"
        sources.append(source)
    if accelerator.is_main_process:
        for source in sources:
            source.class_split_file.parent.mkdir(parents=True, exist_ok=True)
            source.class_split.save(source.class_split_file)
    accelerator.wait_for_everyone()
    return sources


def load_sources(config: TrainConfig) -> list[Source]:
    """Every dataset of a config with its class split, as meta-training sees them (nothing built or written)."""
    return [_source(entry, f"datasets[{k}]") for k, entry in enumerate(config.datasets)]


def _source(entry: DatasetSection, key: str) -> Source:
    dataset, label_column = load_source(entry, key)
    return Source(dataset_name(entry), entry, dataset, label_column, _class_split(entry, dataset, label_column, key))


def entry_transform(entry: DatasetSection, transform):
    """The ``image_transform`` of a dataset entry's episode samplers: ``transform`` (None: PIL images), after
    showing the images as the entry's copy of its domain does (``without_colour``, ``low_resolution``)."""
    if not entry.without_colour and entry.low_resolution is None:
        return transform
    return functools.partial(domain_view, grey=entry.without_colour, low_resolution=entry.low_resolution,
                             then=transform)


def make_sampler(source: Source, config: TrainConfig, split: str, seed: int, num_episodes: int, transform, key: str,
             rank: int = 0, world_size: int = 1):
    shape = episode_shape(config, source.entry)
    transform = entry_transform(source.entry, transform)
    try:
        return EpisodeSampler(source.dataset, **shape, seed=seed, split=split, class_split=source.class_split,
                              image_column=source.entry.image_column, label_column=source.label_column,
                              num_episodes=num_episodes, image_transform=transform, rank=rank, world_size=world_size,
                              min_images_per_class=source.entry.min_images_per_class)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{key} ({split} episodes): {error}") from None


# ------------------------------------------------------------------------------------------------
# Episode loading (DataLoader items are whole micro-batches; never handed to accelerator.prepare)
# ------------------------------------------------------------------------------------------------
def row_key(entry: DatasetSection) -> str:
    """What identifies the rows of a dataset in the prefix cache (the same source sliced the same way)."""
    return (f"{entry.source}|{entry.hub_split}|{entry.max_classes}" + ("|grey" if entry.without_colour else "")
            + (f"|low{entry.low_resolution}" if entry.low_resolution is not None else ""))


@dataclass
class LoadedEpisode:
    """One decoded episode: pixels, labels and the dataset rows of its images (keys of the prefix cache)."""

    index: int
    source: str
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    support_rows: list[int]
    query_rows: list[int]

    @classmethod
    def of(cls, index: int, source: str, episode) -> LoadedEpisode:
        """Episode ``index`` (an :class:`~hf_hyperflow.episodes.Episode` with pixel tensors) of ``source``."""
        return cls(index, source, episode.support_images, episode.support_labels, episode.query_images,
                   episode.query_labels, list(episode.support_indices), list(episode.query_indices))


class _MicroBatches(torch.utils.data.Dataset):
    """Item m: the episodes of this rank's m-th micro-batch, decoded and turned into pixel values."""

    def __init__(self, mix: EpisodeMix, schedule: list[list[int]], row_keys: list[str]):
        self.mix = mix
        self.schedule = schedule
        self.row_keys = row_keys

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, m: int) -> list[LoadedEpisode]:
        out = []
        for index in self.schedule[m]:
            source, episode = self.mix[index]
            out.append(LoadedEpisode.of(index, self.row_keys[source], episode))
        return out


def _identity(item):
    return item


def episode_loader(mix: EpisodeMix, schedule: list[list[int]], row_keys: list[str], num_workers: int):
    """A DataLoader whose item m is the decoded episodes of ``schedule[m]`` (this rank's m-th micro-batch)."""
    return torch.utils.data.DataLoader(_MicroBatches(mix, schedule, row_keys), batch_size=None, shuffle=False,
                                       num_workers=num_workers, collate_fn=_identity)


def unrolled_inputs(episodes: list[LoadedEpisode], device, dtype, prefix: PrefixCache | None) -> UnrolledInputs:
    """The episodes as one :class:`UnrolledInputs` on ``device`` (pixels in ``dtype``), with their frozen-prefix
    outputs from ``prefix`` (kept per dataset row) when the backbone has a frozen prefix."""
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
