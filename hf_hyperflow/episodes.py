"""Few-shot episodes drawn from Hugging Face Datasets.

An episode is a small classification task: a support set of labelled images and a query set to
classify, over N classes relabelled 0..N-1. Two protocols are implemented:

- ``"fixed"``: N-way K-shot Q-query (K support and Q query images per class).
- ``"md"``: the Meta-Dataset variable-way variable-shot protocol. Ways are uniform in
  [5, min(50, classes)]; queries per class are min(10, half the images of the smallest chosen class);
  the support set holds at most 500 images and at most 100 per class, with a class imbalance drawn from
  log-uniform weights in [log 0.5, log 2] (Triantafillou et al., 2020).

Episode ``i`` is drawn by a generator seeded from ``(seed, i)`` alone, so any episode can be rebuilt on
its own, in any process, on any machine. The per-class row index is built once from the Arrow label
column; images are decoded only for the rows an episode uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image as PILImage

from .class_split import SPLIT_NAMES, ClassSplit, check_seed
from .fingerprint import fingerprint
from .image_datasets import (
    LABEL_COLUMN_NAMES,
    LabelIndex,
    load_image_dataset,
    resolve_image_column,
    resolve_label_column,
)
from .inputs import to_rgb

__all__ = ["Episode", "EpisodePlan", "EpisodeSampler", "ClassSplit", "LabelIndex", "load_image_dataset",
           "resolve_image_column", "resolve_label_column", "to_rgb", "SPLIT_NAMES", "PROTOCOLS",
           "LABEL_COLUMN_NAMES"]

PROTOCOLS = ("fixed", "md")

# Meta-Dataset episode constants.
MD_MIN_WAYS = 5
MD_MAX_WAYS = 50
MD_MAX_QUERY_PER_CLASS = 10
MD_MAX_SUPPORT = 500
MD_MAX_SUPPORT_PER_CLASS = 100
MD_LOG_WEIGHT_RANGE = (float(np.log(0.5)), float(np.log(2.0)))

# Fixed-protocol defaults.
DEFAULT_WAYS = 5
DEFAULT_SHOTS = 5
DEFAULT_QUERIES = 15


# --------------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One few-shot task.

    support_images: S RGB ``PIL.Image`` (or ``image_transform``'s output for them); support_labels:
    int64 [S] in 0..N-1; query_images / query_labels: the same for Q query images; classes: N class names
    (``classes[k]`` is label k); support_indices / query_indices: the dataset rows used; spec: what
    rebuilds the episode (dataset fingerprint, split, protocol, seed, index, ways, shots, queries).
    """

    support_images: Any
    support_labels: torch.Tensor
    query_images: Any
    query_labels: torch.Tensor
    classes: list[str]
    support_indices: list[int]
    query_indices: list[int]
    spec: dict[str, Any]

    @property
    def ways(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class EpisodePlan:
    """The rows and labels of an episode, before any image is decoded (see ``Episode``)."""

    classes: list[str]
    support_indices: list[int]
    support_labels: list[int]
    query_indices: list[int]
    query_labels: list[int]
    shots: list[int]
    queries: int


def _check_protocol(protocol: str, ways, shots, queries, max_ways, max_support) -> tuple:
    """``(ways, shots, queries)`` of the protocol (the fixed protocol's defaults filled in; None for md)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "md":
        given = {k: v for k, v in (("ways", ways), ("shots", shots), ("queries", queries)) if v is not None}
        if given:
            raise ValueError(f"the md protocol draws ways, shots and queries itself; do not pass {sorted(given)} "
                             "(use protocol='fixed' for N-way K-shot Q-query episodes)")
        for name, value, low in (("max_ways", max_ways, MD_MIN_WAYS), ("max_support", max_support, MD_MIN_WAYS)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)
                                      or value < low):
                raise ValueError(f"{name} must be an integer >= {low} (or None for the protocol's default), "
                                 f"got {value!r}")
        return ways, shots, queries
    if max_ways is not None or max_support is not None:
        raise ValueError("max_ways and max_support bound the md protocol's draws; the fixed protocol takes "
                         "ways, shots and queries instead")
    ways = DEFAULT_WAYS if ways is None else ways
    shots = DEFAULT_SHOTS if shots is None else shots
    queries = DEFAULT_QUERIES if queries is None else queries
    for name, value, low in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return ways, shots, queries


class EpisodeSampler(Sequence):
    """Seeded few-shot episodes over a ``datasets.Dataset``.

    ``sampler[i]`` draws episode ``i`` from a generator seeded by ``(seed, i)``; ``len(sampler)`` is
    ``num_episodes``. Iteration yields the episodes ``i`` with ``i % world_size == rank`` so that each
    episode is seen exactly once across ranks (pass ``rank=accelerator.process_index``,
    ``world_size=accelerator.num_processes``, and do not hand the sampler to ``accelerator.prepare``).

    Classes come from ``split`` of ``class_split`` (default: ``ClassSplit.from_dataset`` with seed 0 and
    fractions 0.7/0.15/0.15); ``split=None`` uses every class. ``ways``, ``shots`` and ``queries`` set the
    fixed protocol (default 5, 5, 15); the "md" protocol draws them itself and takes none of them, but its
    upper bounds can be lowered for cheaper training episodes: ``max_ways`` (default 50) and ``max_support``
    (support images in all, default 500).

    ``min_images_per_class``: use only the classes of the split with at least this many images (e.g. shots +
    queries, so that every class can fill a fixed episode); None (default): every class, and a class too small for
    the protocol is an error that says so.
    """

    def __init__(self, dataset: datasets.Dataset, protocol: str = "fixed", ways: int | None = None,
                 shots: int | None = None, queries: int | None = None, seed: int = 0, split: str | None = "test",
                 class_split: ClassSplit | None = None, image_column: str | None = None,
                 label_column: str | None = None, num_episodes: int = 600,
                 image_transform: Callable[[list[PILImage.Image]], Any] | None = None,
                 rank: int = 0, world_size: int = 1, max_ways: int | None = None, max_support: int | None = None,
                 min_images_per_class: int | None = None):
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset (see load_image_dataset), got {type(dataset).__name__}")
        ways, shots, queries = _check_protocol(protocol, ways, shots, queries, max_ways, max_support)
        check_seed(seed)
        if isinstance(num_episodes, bool) or not isinstance(num_episodes, int | np.integer) or num_episodes < 1:
            raise ValueError(f"num_episodes must be a positive integer, got {num_episodes!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if image_transform is not None and not callable(image_transform):
            raise TypeError("image_transform must be callable on a list of PIL images")
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {list(SPLIT_NAMES)} or None (all classes), got {split!r}")
        if len(dataset) == 0:
            raise ValueError("the dataset has no rows")
        if min_images_per_class is not None and (isinstance(min_images_per_class, bool) or not isinstance(
                min_images_per_class, int | np.integer) or min_images_per_class < 1):
            raise ValueError(f"min_images_per_class must be a positive integer or None, got {min_images_per_class!r}")
        self.min_images_per_class = None if min_images_per_class is None else int(min_images_per_class)

        self.dataset = dataset
        self.protocol = protocol
        self.ways, self.shots, self.queries = ways, shots, queries
        self.max_ways = MD_MAX_WAYS if max_ways is None else int(max_ways)
        self.max_support = MD_MAX_SUPPORT if max_support is None else int(max_support)
        self.seed = int(seed)
        self.split = split
        self.num_episodes = int(num_episodes)
        self.image_transform = image_transform
        self.rank, self.world_size = rank, world_size
        self.image_column = resolve_image_column(dataset, image_column)
        self.label_column = resolve_label_column(dataset, label_column)
        self._select_classes(LabelIndex.build(dataset, self.label_column), class_split)
        self._images = dataset.select_columns([self.image_column])
        self._spec_base = {
            "dataset": getattr(dataset, "_fingerprint", None) or (dataset.info.dataset_name or ""),
            "split": split, "split_classes": len(self.class_names),
            "split_digest": fingerprint(["\n".join(self.class_names)]), "protocol": protocol, "seed": self.seed,
            # lowered md bounds only, so that specs of default episodes stay as they were
            **({"max_ways": self.max_ways} if self.max_ways != MD_MAX_WAYS else {}),
            **({"max_support": self.max_support} if self.max_support != MD_MAX_SUPPORT else {}),
            **({"min_images_per_class": self.min_images_per_class} if self.min_images_per_class is not None else {}),
        }

    def _select_classes(self, index: LabelIndex, class_split: ClassSplit | None) -> None:
        """The classes of ``self.split`` (all with None), their rows, and the checks that they can make episodes."""
        split = self.split
        if split is None:
            names = index.present() if class_split is None else list(class_split.classes(None))
        else:
            if class_split is None:
                class_split = ClassSplit.from_dataset(self.dataset, label_column=self.label_column)
            names = list(class_split.classes(split))
        self.class_split = class_split
        where = "the dataset" if split is None else f"the {split!r} split"
        if not names:
            raise ValueError(f"{where} has no classes; pass split=None for all classes or another class_split")
        id_of = {name: k for k, name in enumerate(index.names)}
        unknown = [n for n in names if n not in id_of]
        if unknown:
            raise ValueError(f"{len(unknown)} classes of {where} are not in column {self.label_column!r}, e.g. "
                             f"{unknown[:5]}; the class split does not belong to this dataset")
        class_ids = sorted(id_of[n] for n in names)
        if self.min_images_per_class is not None:
            kept = [c for c in class_ids if len(index.rows(c)) >= self.min_images_per_class]
            if not kept:
                raise ValueError(f"no class of {where} has min_images_per_class={self.min_images_per_class} images "
                                 f"(the largest has {max(len(index.rows(c)) for c in class_ids)})")
            class_ids = kept
            where = f"{where} (classes with >= {self.min_images_per_class} images)"
        self.class_names = [index.names[c] for c in class_ids]
        self._rows = [index.rows(c) for c in class_ids]
        self._counts = np.array([len(r) for r in self._rows])
        self._check_counts(where)

    def _check_counts(self, where: str) -> None:
        """Enough classes, and enough images in every class, for this protocol's episodes."""
        classes = len(self.class_names)
        if self.protocol == "fixed":
            if classes < self.ways:
                raise ValueError(f"{where} has {classes} classes, fewer than ways={self.ways}; lower ways, or pass "
                                 "split=None or a class_split with more classes in this split")
            need = self.shots + self.queries
            short = [(self.class_names[k], int(n)) for k, n in enumerate(self._counts) if n < need]
            if short:
                raise ValueError(f"{len(short)} classes of {where} have fewer than shots + queries = {need} images, "
                                 f"e.g. {short[:5]} (name, images); pass min_images_per_class={need} to use only the "
                                 f"{classes - len(short)} classes that have enough, lower shots or queries, or use "
                                 "protocol='md'")
            return
        if classes < MD_MIN_WAYS:
            raise ValueError(f"{where} has {classes} classes; the md protocol needs at least {MD_MIN_WAYS}; "
                             "pass split=None or use protocol='fixed' with fewer ways")
        short = [(self.class_names[k], int(n)) for k, n in enumerate(self._counts) if n < 2]
        if short:
            raise ValueError(f"{len(short)} classes of {where} have fewer than 2 images (the md protocol needs one "
                             f"support and one query image per class), e.g. {short[:5]}")

    def __len__(self) -> int:
        return self.num_episodes

    def local_indices(self) -> range:
        """The episode indices this rank iterates over."""
        return range(self.rank, self.num_episodes, self.world_size)

    def __iter__(self) -> Iterator[Episode]:
        for i in self.local_indices():
            yield self[i]

    def __getitem__(self, index: int) -> Episode:
        index = self._check_index(index)
        plan = self.plan(index)
        rows = plan.support_indices + plan.query_indices
        images = self._decode(rows)
        support, query = images[: len(plan.support_indices)], images[len(plan.support_indices):]
        if self.image_transform is not None:
            support, query = self.image_transform(support), self.image_transform(query)
        spec = dict(self._spec_base, index=int(index), ways=len(plan.classes),
                    shots=plan.shots[0] if self.protocol == "fixed" else list(plan.shots), queries=plan.queries)
        return Episode(support, torch.tensor(plan.support_labels, dtype=torch.long), query,
                       torch.tensor(plan.query_labels, dtype=torch.long), plan.classes,
                       plan.support_indices, plan.query_indices, spec)

    def plan(self, index: int) -> EpisodePlan:
        """Rows and labels of episode ``index`` (no decoding). Support and query rows are listed class by class."""
        index = self._check_index(index)
        rng = np.random.default_rng([self.seed, int(index)])
        num_classes = len(self._rows)
        if self.protocol == "fixed":
            ways = self.ways
            chosen = rng.choice(num_classes, size=ways, replace=False)
            queries = self.queries
            shots = np.full(ways, self.shots)
        else:
            ways = int(rng.integers(MD_MIN_WAYS, min(self.max_ways, num_classes) + 1))
            chosen = rng.choice(num_classes, size=ways, replace=False)
            images_per_class = self._counts[chosen]
            queries = int(min(MD_MAX_QUERY_PER_CLASS, int(images_per_class.min()) // 2))
            remaining = images_per_class - queries
            beta = rng.uniform()
            contributions = np.minimum(MD_MAX_SUPPORT_PER_CLASS, remaining)
            support_size = int(min(np.floor(beta * contributions + 1).sum(), max(self.max_support, ways)))
            weights = images_per_class * np.exp(rng.uniform(*MD_LOG_WEIGHT_RANGE, size=ways))
            desired = np.floor(weights / weights.sum() * (support_size - ways)).astype(np.int64) + 1
            shots = np.minimum(np.minimum(desired, remaining), MD_MAX_SUPPORT_PER_CLASS)
        support_rows, support_labels, query_rows, query_labels = [], [], [], []
        for label, (c, k) in enumerate(zip(chosen, shots, strict=True)):
            if self.protocol == "fixed":
                picks = rng.choice(self._rows[c], size=int(k) + queries, replace=False)
                support, query = picks[:k], picks[k:]
            else:
                picks = rng.permutation(self._rows[c])
                query, support = picks[:queries], picks[queries:queries + int(k)]
            support_rows += support.tolist()
            query_rows += query.tolist()
            support_labels += [label] * len(support)
            query_labels += [label] * len(query)
        return EpisodePlan([self.class_names[c] for c in chosen], support_rows, support_labels, query_rows,
                           query_labels, [int(k) for k in shots], queries)

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"episode index must be an integer, got {type(index).__name__}")
        if index < 0:
            index += self.num_episodes
        if not 0 <= index < self.num_episodes:
            raise IndexError(f"episode index {index} out of range for {self.num_episodes} episodes")
        return int(index)

    def _decode(self, rows: list[int]) -> list[PILImage.Image]:
        values = self._images[rows][self.image_column]
        feature = self._images.features[self.image_column]
        out = []
        decoder = None if feature.decode else datasets.Image(decode=True)
        for row, value in zip(rows, values, strict=True):
            out.append(to_rgb(decoder.decode_example(value) if decoder is not None else value, f"row {row}"))
        return out

