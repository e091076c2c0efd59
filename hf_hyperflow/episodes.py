"""Few-shot episodes drawn from Hugging Face Datasets, and class splits.

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

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image as PILImage

from .fingerprint import fingerprint

SPLIT_NAMES = ("train", "validation", "test")
PROTOCOLS = ("fixed", "md")
LABEL_COLUMN_NAMES = ("label", "labels", "class")

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
# Loading
# --------------------------------------------------------------------------------------------------


def load_image_dataset(source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
                       split: str = "train") -> datasets.Dataset:
    """Open an image classification dataset from wherever it lives.

    ``source`` may be a ``datasets.Dataset`` (returned as is), a ``DatasetDict`` (``split`` is taken), a
    folder written by ``save_to_disk``, a ``.parquet`` file or a folder of them, a folder of class
    subfolders (loaded with the ``imagefolder`` builder), or a Hub dataset id (``datasets.load_dataset``).
    ``split`` picks the split when the source has several; a local source with a single split returns it.
    """
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, str(source))
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be a path, a Hub dataset id or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path} is a file but not a .parquet file; pass a parquet file, a folder written by "
                             "save_to_disk, a folder of class subfolders, or a Hub dataset id")
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.Dataset) else _pick_split(loaded, split, str(path))
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files=parquet, split="train")
        if any(child.is_dir() for child in path.iterdir()):
            return _pick_split(datasets.load_dataset("imagefolder", data_dir=str(path)), split, str(path))
        raise ValueError(f"{path} holds no dataset: expected a save_to_disk folder, parquet files, or class "
                         "subfolders of images")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".parquet") or os.sep in text.replace("/", ""):
        raise ValueError(f"{text} does not exist (and is not a Hub dataset id such as 'org/name')")
    return datasets.load_dataset(text, split=split)


def _pick_split(dataset_dict: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"split {split!r} is not in {where}; its splits are {sorted(dataset_dict)}: pass one as split=")


# --------------------------------------------------------------------------------------------------
# Columns and the per-class index
# --------------------------------------------------------------------------------------------------


def resolve_image_column(dataset: datasets.Dataset, image_column: str | None = None) -> str:
    """Name of the image column: ``image_column`` if given (checked), else the only ``Image`` feature."""
    features = dataset.features
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column {image_column!r} is not a column; columns are {list(features)}")
        if not isinstance(features[image_column], datasets.Image):
            raise TypeError(f"column {image_column!r} is {features[image_column]!r}, not an Image feature; cast it "
                            f"with dataset.cast_column({image_column!r}, datasets.Image())")
        return image_column
    candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"no Image column among {list(features)}; pass image_column= (a column cast to "
                         "datasets.Image())")
    raise ValueError(f"several Image columns {candidates}: pass image_column= to choose one")


def _is_int_or_str(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and (
        feature.dtype in ("string", "large_string") or "int" in feature.dtype)


def resolve_label_column(dataset: datasets.Dataset, label_column: str | None = None) -> str:
    """Name of the label column: ``label_column`` if given (checked), else the only ``ClassLabel`` column,
    else the only column named label / labels / class holding ints or strings."""
    features = dataset.features
    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"label_column {label_column!r} is not a column; columns are {list(features)}")
        feature = features[label_column]
        if not (isinstance(feature, datasets.ClassLabel) or _is_int_or_str(feature)):
            raise TypeError(f"label column {label_column!r} is {feature!r}; it must be a ClassLabel, an integer or a "
                            "string column")
        return label_column
    class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    if len(class_labels) > 1:
        raise ValueError(f"several ClassLabel columns {class_labels}: pass label_column= to choose one")
    named = [name for name, feature in features.items()
             if name.lower() in LABEL_COLUMN_NAMES and _is_int_or_str(feature)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"several candidate label columns {named}: pass label_column= to choose one")
    raise ValueError(f"no label column among {list(features)}: expected a ClassLabel column or an int/str column "
                     f"named one of {list(LABEL_COLUMN_NAMES)}; pass label_column=")


def _arrow_column(dataset: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """One column as Arrow, in the dataset's row order (honours select/shuffle index mappings)."""
    return dataset.select_columns([column]).with_format("arrow")[:].column(column)


@dataclass(frozen=True)
class LabelIndex:
    """Per-class row index of a dataset.

    ``codes``: int64 [rows], the class id of every row (-1: unlabelled); ``names``: class id -> name;
    ``rows(c)``: int64 [n_c], the rows of class ``c`` in ascending order.
    """

    column: str
    codes: np.ndarray
    names: list[str]
    order: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def build(cls, dataset: datasets.Dataset, label_column: str) -> LabelIndex:
        feature = dataset.features[label_column]
        column = _arrow_column(dataset, label_column)
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            codes = column.fill_null(-1).to_numpy().astype(np.int64)
        else:
            values = pc.unique(column.drop_null())
            if feature.dtype in ("string", "large_string"):
                ordered = sorted(values.to_pylist())
                names = ordered
            else:
                ordered = sorted(values.to_pylist())
                names = [str(v) for v in ordered]
            value_set = pa.array(ordered, type=column.type)
            codes = pc.index_in(column, value_set=value_set).fill_null(-1).to_numpy().astype(np.int64)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        ids = np.arange(len(names))
        starts = np.searchsorted(sorted_codes, ids, side="left")
        ends = np.searchsorted(sorted_codes, ids, side="right")
        return cls(label_column, codes, names, order, starts, ends)

    def rows(self, class_id: int) -> np.ndarray:
        return self.order[self.starts[class_id]:self.ends[class_id]]

    def counts(self) -> np.ndarray:
        """int64 [classes]: rows per class."""
        return (self.ends - self.starts).astype(np.int64)

    def present(self) -> list[str]:
        """Names of the classes that have at least one row, in class-id order."""
        counts = self.counts()
        return [name for name, n in zip(self.names, counts, strict=True) if n > 0]


# --------------------------------------------------------------------------------------------------
# Class splits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassSplit:
    """Disjoint train / validation / test sets of class names.

    ``groups`` records, when the split was made by a grouping column, which groups went to which split.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None
    group_column: str | None = None
    groups: dict[str, tuple[str, ...]] | None = field(default=None, compare=False)

    def __post_init__(self):
        seen: dict[str, str] = {}
        for split_name in SPLIT_NAMES:
            names = getattr(self, split_name)
            if not all(isinstance(n, str) for n in names):
                raise TypeError(f"class names must be strings; the {split_name} split holds "
                                f"{sorted({type(n).__name__ for n in names})}")
            for name in names:
                if name in seen:
                    raise ValueError(f"class {name!r} is in both the {seen[name]} and the {split_name} split; "
                                     "splits must be disjoint")
                seen[name] = split_name

    def classes(self, split: str | None) -> tuple[str, ...]:
        """Class names of ``split`` ("train", "validation" or "test"); ``None``: all of them."""
        if split is None:
            return self.train + self.validation + self.test
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {list(SPLIT_NAMES)} or None, got {split!r}")
        return getattr(self, split)

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset, label_column: str | None = None,
                     fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                     group_column: str | None = None) -> ClassSplit:
        """Split the classes of ``dataset`` by ``fractions`` (train, validation, test), deterministically.

        Without ``group_column`` the classes are shuffled by ``seed`` and cut. With it, whole groups (for
        example scripts or categories) are shuffled and given one by one to the split furthest below its
        target class count, so that no group has classes in two splits.
        """
        fractions = _check_fractions(fractions)
        _check_seed(seed)
        label_column = resolve_label_column(dataset, label_column)
        index = LabelIndex.build(dataset, label_column)
        present = index.present()
        if not present:
            raise ValueError(f"the dataset has no labelled rows in column {label_column!r}; nothing to split")
        rng = np.random.default_rng(seed)
        if group_column is None:
            order = [present[i] for i in rng.permutation(len(present))]
            sizes = _split_sizes(len(present), fractions)
            cut1, cut2 = sizes[0], sizes[0] + sizes[1]
            return cls(tuple(sorted(order[:cut1])), tuple(sorted(order[cut1:cut2])), tuple(sorted(order[cut2:])),
                       seed=seed, fractions=fractions)
        class_groups = _class_groups(dataset, index, group_column)
        group_names = sorted(set(class_groups.values()))
        needed = sum(f > 0 for f in fractions)
        if len(group_names) < needed:
            raise ValueError(f"group column {group_column!r} has {len(group_names)} groups but {needed} splits have a "
                             "non-zero fraction; use a column with more groups or set some fractions to 0")
        members: dict[str, list[str]] = {g: [] for g in group_names}
        for name, group in class_groups.items():
            members[group].append(name)
        targets = np.asarray(fractions) * len(class_groups)
        assigned = {s: [] for s in SPLIT_NAMES}
        counts = np.zeros(3)
        shuffled = [group_names[i] for i in rng.permutation(len(group_names))]
        # Every split with a non-zero fraction first receives one group, then groups go to the largest deficit.
        for k, split_name in enumerate(SPLIT_NAMES):
            if fractions[k] > 0 and shuffled:
                group = shuffled.pop(0)
                assigned[split_name].append(group)
                counts[k] += len(members[group])
        for group in shuffled:
            deficit = np.where(np.asarray(fractions) > 0, targets - counts, -np.inf)
            k = int(np.argmax(deficit))
            assigned[SPLIT_NAMES[k]].append(group)
            counts[k] += len(members[group])
        splits = {s: tuple(sorted(n for g in assigned[s] for n in members[g])) for s in SPLIT_NAMES}
        groups = {s: tuple(sorted(assigned[s])) for s in SPLIT_NAMES}
        return cls(splits["train"], splits["validation"], splits["test"], seed=seed, fractions=fractions,
                   group_column=group_column, groups=groups)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: list(getattr(self, s)) for s in SPLIT_NAMES}
        out["seed"] = self.seed
        out["fractions"] = list(self.fractions) if self.fractions is not None else None
        out["group_column"] = self.group_column
        out["groups"] = {k: list(v) for k, v in self.groups.items()} if self.groups is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassSplit:
        """Inverse of ``to_dict``. Only the three lists of class names are required; a missing one is empty."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a dict with keys {list(SPLIT_NAMES)}, got {type(data).__name__}")
        unknown = set(data) - set(SPLIT_NAMES) - {"seed", "fractions", "group_column", "groups"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in a class split; expected {list(SPLIT_NAMES)}")
        if not any(data.get(s) for s in SPLIT_NAMES):
            raise ValueError(f"a class split needs class names under at least one of {list(SPLIT_NAMES)}")
        for s in SPLIT_NAMES:
            if not isinstance(data.get(s, []), list | tuple):
                raise TypeError(f"{s!r} must be a list of class names, got {type(data[s]).__name__}")
        fractions = data.get("fractions")
        groups = data.get("groups")
        return cls(tuple(data.get("train", ())), tuple(data.get("validation", ())), tuple(data.get("test", ())),
                   seed=data.get("seed"), fractions=tuple(fractions) if fractions is not None else None,
                   group_column=data.get("group_column"),
                   groups={k: tuple(v) for k, v in groups.items()} if groups is not None else None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassSplit:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be three numbers (train, validation, test), got {fractions!r}")
    values = tuple(float(f) for f in fractions)
    if any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions!r}")
    return values


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> list[int]:
    """Class counts per split: rounded, every non-zero fraction gets at least one class when possible."""
    sizes = [int(np.floor(f * n)) for f in fractions]
    remainders = [f * n - s for f, s in zip(fractions, sizes, strict=True)]
    for k in np.argsort(remainders, kind="stable")[::-1][: n - sum(sizes)]:
        sizes[k] += 1
    for k, f in enumerate(fractions):
        if f > 0 and sizes[k] == 0:
            donor = int(np.argmax(sizes))
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[k] += 1
    return sizes


def _class_groups(dataset: datasets.Dataset, index: LabelIndex, group_column: str) -> dict[str, str]:
    if group_column not in dataset.features:
        raise ValueError(f"group_column {group_column!r} is not a column; columns are {list(dataset.features)}")
    groups = _arrow_column(dataset, group_column).cast(pa.string()).to_numpy(zero_copy_only=False)
    out: dict[str, str] = {}
    labelled = np.nonzero(index.codes >= 0)[0]
    pairs = {(int(index.codes[r]), groups[r]) for r in labelled}
    for code, group in sorted(pairs, key=lambda p: (p[0], str(p[1]))):
        name = index.names[code]
        if group is None:
            raise ValueError(f"class {name!r} has rows with no {group_column!r} value; every row needs a group")
        if name in out and out[name] != group:
            raise ValueError(f"class {name!r} belongs to several {group_column!r} groups ({out[name]!r}, "
                             f"{group!r}); a grouping column must give one group per class")
        out[name] = group
    return out


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
    """

    def __init__(self, dataset: datasets.Dataset, protocol: str = "fixed", ways: int | None = None,
                 shots: int | None = None, queries: int | None = None, seed: int = 0, split: str | None = "test",
                 class_split: ClassSplit | None = None, image_column: str | None = None,
                 label_column: str | None = None, num_episodes: int = 600,
                 image_transform: Callable[[list[PILImage.Image]], Any] | None = None,
                 rank: int = 0, world_size: int = 1, max_ways: int | None = None, max_support: int | None = None):
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"dataset must be a datasets.Dataset (see load_image_dataset), got {type(dataset).__name__}")
        ways, shots, queries = _check_protocol(protocol, ways, shots, queries, max_ways, max_support)
        _check_seed(seed)
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
                                 f"e.g. {short[:5]} (name, images); lower shots or queries, or use protocol='md'")
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
        for value in values:
            out.append(to_rgb(decoder.decode_example(value) if decoder is not None else value))
        return out


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any PIL image as RGB; transparent areas are composited over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
