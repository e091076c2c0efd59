"""Class splits: which classes of a dataset are for meta-training, validation and test.

A split is seeded fractions of the classes (or of groups of classes, e.g. whole scripts of a font dataset,
given by a column), or the class lists themselves; it is saved as JSON and checked against the dataset it is
applied to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from .image_datasets import LabelIndex, arrow_column, resolve_label_column

SPLIT_NAMES = ("train", "validation", "test")


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
        check_seed(seed)
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


def check_seed(seed: Any) -> None:
    """A seed of class splits and episodes: a non-negative integer."""
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
    groups = arrow_column(dataset, group_column).cast(pa.string()).to_numpy(zero_copy_only=False)
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
