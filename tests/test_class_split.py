"""Class splits: seeded, covering every class, holding out whole groups, saved and checked."""

from __future__ import annotations

import json

import pytest
from conftest import make_dataset

from hf_hyperflow.class_split import ClassSplit


def test_class_split_is_deterministic_and_covers_every_class():
    dataset = make_dataset([3] * 40)
    split = ClassSplit.from_dataset(dataset, seed=4)
    assert split == ClassSplit.from_dataset(dataset, seed=4)
    assert split != ClassSplit.from_dataset(dataset, seed=5)
    assert (len(split.train), len(split.validation), len(split.test)) == (28, 6, 6)
    assert sorted(split.classes(None)) == dataset.features["label"].names
    small = ClassSplit.from_dataset(make_dataset([3] * 3), fractions=(0.8, 0.1, 0.1))
    assert (len(small.train), len(small.validation), len(small.test)) == (1, 1, 1)
    test_only = ClassSplit.from_dataset(dataset, fractions=(0, 0, 1))
    assert len(test_only.test) == 40 and not test_only.train
    with pytest.raises(ValueError, match=r"fractions must be non-negative and sum to 1, got \(0.5, 0.5, 0.5\)"):
        ClassSplit.from_dataset(dataset, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"class 'a' is in both the train and the test split"):
        ClassSplit(train=("a", "b"), validation=(), test=("a",))
    with pytest.raises(ValueError, match=r"split must be one of"):
        split.classes("dev")


def test_class_split_holds_out_whole_groups(tmp_path):
    groups = [f"script{c // 4:02d}" for c in range(48)]      # 12 groups of 4 classes
    dataset = make_dataset([3] * 48, groups=groups)
    split = ClassSplit.from_dataset(dataset, group_column="group", seed=1)
    assert split == ClassSplit.from_dataset(dataset, group_column="group", seed=1)
    group_of = {f"class{c:03d}": groups[c] for c in range(48)}
    split_groups = {name: {group_of[c] for c in split.classes(name)} for name in ("train", "validation", "test")}
    assert not split_groups["train"] & split_groups["test"] and not split_groups["train"] & split_groups["validation"]
    assert not split_groups["validation"] & split_groups["test"]
    assert {k: set(v) for k, v in split.groups.items()} == split_groups
    assert sorted(split.classes(None)) == sorted(group_of)
    # whole groups of 4 classes: 48 * (0.7, 0.15, 0.15) = (33.6, 7.2, 7.2) -> 8, 2, 2 groups
    assert [len(split.groups[s]) for s in ("train", "validation", "test")] == [8, 2, 2]
    path = tmp_path / "split.json"
    split.save(path)
    loaded = ClassSplit.load(path)
    assert loaded == split and loaded.groups == split.groups and loaded.group_column == "group"
    assert json.loads(path.read_text())["test"] == list(split.test)
    with pytest.raises(ValueError, match=r"group column 'group' has 2 groups but 3 splits have a non-zero fraction"):
        ClassSplit.from_dataset(make_dataset([3] * 4, groups=["a", "a", "b", "b"]), group_column="group")
    mixed = make_dataset([3, 3], groups=["a", "b"])
    mixed = mixed.map(lambda row, i: {"group": "c" if i == 0 else row["group"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"belongs to several 'group' groups"):
        ClassSplit.from_dataset(mixed, group_column="group", fractions=(1, 0, 0))
    with pytest.raises(ValueError, match=r"group_column 'script' is not a column"):
        ClassSplit.from_dataset(dataset, group_column="script")


def test_class_split_from_dict_checks_its_input():
    split = ClassSplit.from_dict({"train": ["a"], "test": ["b", "c"]})
    assert split.validation == () and split.classes("test") == ("b", "c")
    with pytest.raises(ValueError, match=r"unknown keys \['dev'\]"):
        ClassSplit.from_dict({"train": ["a"], "dev": ["b"]})
    with pytest.raises(ValueError, match=r"needs class names under at least one of"):
        ClassSplit.from_dict({"train": []})
    with pytest.raises(TypeError, match=r"class names must be strings"):
        ClassSplit.from_dict({"train": [1, 2]})
