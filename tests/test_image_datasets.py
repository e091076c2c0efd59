"""Image datasets: opening them from local sources, detecting their image and label columns, the per-class index."""

from __future__ import annotations

import time

import datasets
import numpy as np
import pytest
from conftest import make_dataset, png
from PIL import Image

from hf_hyperflow.episodes import EpisodeSampler
from hf_hyperflow.image_datasets import LabelIndex, load_image_dataset


@pytest.mark.parametrize("kind", ["int", "str"])
def test_int_and_string_label_columns_are_detected(kind):
    name = {"int": "labels", "str": "class"}[kind]
    dataset = make_dataset([6, 7, 8, 9], label_kind=kind, label_name=name)
    sampler = EpisodeSampler(dataset, ways=4, shots=2, queries=3, split=None)
    assert sampler.label_column == name
    expected = [str(100 + c) for c in range(4)] if kind == "int" else [f"class{c:03d}" for c in range(4)]
    assert sampler.class_names == expected
    episode = sampler[0]
    values = dataset[episode.support_indices][name]
    assert [str(v) for v in values] == [episode.classes[k] for k in episode.support_labels.tolist()]


def test_column_overrides():
    dataset = make_dataset([6, 6, 6], label_kind="str", label_name="species").add_column(
        "thumb", [png(1)] * 18).cast_column("thumb", datasets.Image())
    with pytest.raises(ValueError, match=r"several Image columns \['image', 'thumb'\]: pass image_column="):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None)
    with pytest.raises(ValueError, match=r"no label column among .*pass label_column="):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, image_column="thumb")
    sampler = EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, image_column="thumb",
                             label_column="species")
    assert sampler[0].support_images[0].getpixel((0, 0)) == (1, 1, 1)


def test_column_errors():
    dataset = make_dataset([6, 6, 6])
    with pytest.raises(ValueError, match=r"image_column 'img' is not a column; columns are \['image', 'label'\]"):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, image_column="img")
    with pytest.raises(TypeError, match=r"column 'label' is .* not an Image feature; cast it"):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, image_column="label")
    with pytest.raises(ValueError, match=r"label_column 'y' is not a column"):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, label_column="y")
    with pytest.raises(TypeError, match=r"label column 'image' is .* must be a ClassLabel, an integer or a string"):
        EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, label_column="image")
    no_image = dataset.remove_columns("image")
    with pytest.raises(ValueError, match=r"no Image column among \['label'\]; pass image_column="):
        EpisodeSampler(no_image, ways=3, shots=1, queries=1, split=None)
    two = dataset.add_column("coarse", [0] * len(dataset)).cast_column("coarse", datasets.ClassLabel(names=["a"]))
    with pytest.raises(ValueError, match=r"several ClassLabel columns \['label', 'coarse'\]: pass label_column="):
        EpisodeSampler(two, ways=3, shots=1, queries=1, split=None)
    assert EpisodeSampler(two, ways=3, shots=1, queries=1, split=None, label_column="label").label_column == "label"
    named = make_dataset([4, 4], label_kind="int", label_name="label").add_column("labels", [1] * 8)
    with pytest.raises(ValueError, match=r"several candidate label columns \['label', 'labels'\]"):
        EpisodeSampler(named, ways=2, shots=1, queries=1, split=None)


def test_label_index_is_fast_on_many_rows():
    n = 200_000
    labels = np.random.default_rng(0).integers(0, 1000, n)
    image = png(0)
    dataset = datasets.Dataset.from_dict(
        {"image": [image] * n, "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)}))
    start = time.perf_counter()
    index = LabelIndex.build(dataset, "label")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"per-class index took {elapsed:.1f} s"
    assert index.counts().tolist() == np.bincount(labels, minlength=1000).tolist()
    assert np.array_equal(index.rows(17), np.nonzero(labels == 17)[0])


def test_a_missing_folder_that_reads_as_a_hub_id_says_both(monkeypatch, tmp_path):
    """'data/name' is a Hub id or a relative folder: when neither gives a dataset, the error says so, not only the
    Hub's connection error."""
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'data/missing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'data/missing' is no local folder \(nothing exists at .*data/missing\) "
                                                r"and the Hub gave no dataset of that id \(ConnectionError"):
        load_image_dataset("data/missing")


def test_load_image_dataset_from_local_sources(tmp_path):
    dataset = make_dataset([3, 3])
    dataset.save_to_disk(str(tmp_path / "disk"))
    assert load_image_dataset(tmp_path / "disk")["label"][:6] == dataset["label"][:6]
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_image_dataset(str(tmp_path / "dict"), split="test")) == 2
    with pytest.raises(ValueError, match=r"split 'validation' is not in .*; its splits are \['test', 'train'\]"):
        load_image_dataset(str(tmp_path / "dict"), split="validation")
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    from_parquet = load_image_dataset(str(tmp_path / "data.parquet"))
    assert len(from_parquet) == 6 and isinstance(from_parquet.features["image"], datasets.Image)
    for name in ("cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / "folder" / name / f"{k}.png")
    folder = load_image_dataset(str(tmp_path / "folder"))
    assert len(folder) == 6 and folder.features["label"].names == ["cat", "dog"]
    episode = EpisodeSampler(folder, ways=2, shots=1, queries=2, split=None)[0]
    assert sorted(episode.classes) == ["cat", "dog"] and episode.support_images[0].mode == "RGB"
    assert load_image_dataset(dataset) is dataset
    with pytest.raises(ValueError, match=r"does not exist"):
        load_image_dataset(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is a file but not a .parquet file"):
        load_image_dataset(tmp_path / "notes.txt")
