"""Episode samplers and class splits over Hugging Face Datasets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_hyperflow.episodes import (
    MD_MAX_SUPPORT,
    MD_MAX_SUPPORT_PER_CLASS,
    ClassSplit,
    Episode,
    EpisodeSampler,
    LabelIndex,
    load_image_dataset,
    to_rgb,
)


def png(value: int, size: int = 4, mode: str = "L") -> dict:
    """A tiny image whose pixels all equal ``value`` (so a decoded image tells which row it came from)."""
    if mode == "RGBA":
        image = Image.new("RGBA", (size, size), (value, value, value, 0))
    elif mode == "P":
        image = Image.new("P", (size, size), 0)
        image.putpalette([value, 255 - value, 7] * 256)
    else:
        image = Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def make_dataset(counts: list[int], label_kind: str = "classlabel", groups: list[str] | None = None,
                 label_name: str = "label") -> datasets.Dataset:
    """``counts[c]`` rows of class c; image pixel value = row % 256. Rows of a class are interleaved."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    order = np.random.default_rng(123).permutation(len(labels))
    labels = [labels[i] for i in order]
    names = [f"class{c:03d}" for c in range(len(counts))]
    columns = {"image": [png(r % 256) for r in range(len(labels))]}
    if label_kind == "classlabel":
        columns[label_name] = labels
        label_feature = datasets.ClassLabel(names=names)
    elif label_kind == "int":
        columns[label_name] = [100 + c for c in labels]
        label_feature = datasets.Value("int64")
    else:
        columns[label_name] = [names[c] for c in labels]
        label_feature = datasets.Value("string")
    features = {"image": datasets.Image(), label_name: label_feature}
    if groups is not None:
        columns["group"] = [groups[c] for c in labels]
        features["group"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def row_labels(dataset: datasets.Dataset, column: str = "label") -> np.ndarray:
    return np.asarray(dataset.data.column(column).to_numpy())


def check_plan_common(plan, labels: np.ndarray, names: list[str], allowed: set[str]):
    ways = len(plan.classes)
    assert len(set(plan.classes)) == ways and set(plan.classes) <= allowed
    assert not set(plan.support_indices) & set(plan.query_indices)
    assert len(set(plan.support_indices)) == len(plan.support_indices)
    assert len(set(plan.query_indices)) == len(plan.query_indices)
    assert sorted(set(plan.support_labels)) == list(range(ways)) == sorted(set(plan.query_labels))
    for rows, episode_labels in ((plan.support_indices, plan.support_labels), (plan.query_indices, plan.query_labels)):
        for row, label in zip(rows, episode_labels, strict=True):
            assert names[labels[row]] == plan.classes[label]


COUNTS = [20 + (7 * c) % 23 for c in range(12)]


def test_fixed_protocol_rules_hold_over_many_seeds():
    dataset = make_dataset(COUNTS)
    labels, names = row_labels(dataset), dataset.features["label"].names
    for seed in range(25):
        for ways, shots, queries in ((5, 1, 15), (3, 5, 4), (12, 2, 3)):
            sampler = EpisodeSampler(dataset, ways=ways, shots=shots, queries=queries, seed=seed, split=None,
                                     num_episodes=8)
            for i in range(len(sampler)):
                plan = sampler.plan(i)
                check_plan_common(plan, labels, names, set(names))
                assert len(plan.classes) == ways
                assert len(plan.support_indices) == ways * shots and len(plan.query_indices) == ways * queries
                assert np.bincount(plan.support_labels).tolist() == [shots] * ways
                assert np.bincount(plan.query_labels).tolist() == [queries] * ways


def test_md_protocol_rules_and_caps_hold_over_many_seeds():
    # 60 classes from 2 to ~450 images: exercises the 10-query, 100-per-class and 500-total caps.
    counts = [2, 3, 5] + [int(x) for x in np.geomspace(8, 450, 57)]
    dataset = make_dataset(counts)
    labels, names = row_labels(dataset), dataset.features["label"].names
    ways_seen, totals, per_class_max, queries_seen = [], [], 0, set()
    for seed in range(6):
        sampler = EpisodeSampler(dataset, protocol="md", seed=seed, split=None, num_episodes=60)
        for i in range(len(sampler)):
            plan = sampler.plan(i)
            check_plan_common(plan, labels, names, set(names))
            ways = len(plan.classes)
            assert 5 <= ways <= 50
            sizes = np.array([counts[names.index(c)] for c in plan.classes])
            expected_queries = min(10, int(sizes.min()) // 2)
            assert plan.queries == expected_queries
            assert np.bincount(plan.query_labels, minlength=ways).tolist() == [expected_queries] * ways
            shots = np.bincount(plan.support_labels, minlength=ways)
            assert shots.tolist() == plan.shots
            assert shots.min() >= 1 and shots.max() <= MD_MAX_SUPPORT_PER_CLASS
            assert shots.sum() <= MD_MAX_SUPPORT
            assert np.all(shots + expected_queries <= sizes)
            ways_seen.append(ways)
            totals.append(int(shots.sum()))
            per_class_max = max(per_class_max, int(shots.max()))
            queries_seen.add(expected_queries)
    # The draws span the protocol's range: both ends of the ways, the caps binding (the per-class floors of
    # Meta-Dataset's allocation keep a capped total a few images under 500), small and full query sets.
    assert min(ways_seen) == 5 and max(ways_seen) == 50
    assert MD_MAX_SUPPORT - 25 <= max(totals) <= MD_MAX_SUPPORT and per_class_max == MD_MAX_SUPPORT_PER_CLASS
    assert {1, 10} <= queries_seen


def test_md_support_sizes_follow_class_sizes():
    # Log-uniform weights in [0.5, 2] times the class size: a class 8x larger gets more support on average.
    counts = [40] * 10 + [320] * 10
    dataset = make_dataset(counts)
    names = dataset.features["label"].names
    small, large = [], []
    sampler = EpisodeSampler(dataset, protocol="md", seed=3, split=None, num_episodes=200)
    for i in range(len(sampler)):
        plan = sampler.plan(i)
        for k, name in enumerate(plan.classes):
            (large if counts[names.index(name)] == 320 else small).append(plan.shots[k])
    assert np.mean(large) > 2 * np.mean(small)


def test_episode_images_labels_and_spec():
    dataset = make_dataset(COUNTS)
    sampler = EpisodeSampler(dataset, ways=4, shots=2, queries=3, seed=7, split=None, num_episodes=5)
    episode = sampler[2]
    assert isinstance(episode, Episode) and episode.ways == 4
    assert episode.support_labels.dtype == torch.long and episode.support_labels.shape == (8,)
    assert episode.query_labels.tolist() == sampler.plan(2).query_labels and episode.query_labels.shape == (12,)
    assert len(episode.support_images) == 8 and len(episode.query_images) == 12
    for image, row in zip(episode.support_images + episode.query_images,
                          episode.support_indices + episode.query_indices, strict=True):
        assert image.mode == "RGB" and image.size == (4, 4)
        assert image.getpixel((0, 0)) == (row % 256,) * 3
    assert episode.spec == {"dataset": dataset._fingerprint, "split": None, "split_classes": 12,
                            "split_digest": episode.spec["split_digest"], "protocol": "fixed", "seed": 7,
                            "index": 2, "ways": 4, "shots": 2, "queries": 3}


def test_image_transform_gets_the_pil_lists():
    seen = []

    def transform(images):
        seen.append(len(images))
        return torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) for im in images])

    sampler = EpisodeSampler(make_dataset(COUNTS), ways=3, shots=2, queries=4, split=None, image_transform=transform)
    episode = sampler[0]
    assert seen == [6, 12]
    assert episode.support_images.shape == (6, 3, 4, 4) and episode.query_images.shape == (12, 3, 4, 4)
    assert episode.support_images[0, 0, 0, 0].item() == episode.support_indices[0] % 256


def test_grayscale_rgba_and_palette_become_rgb():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("L", (2, 2), 9)).getpixel((1, 1)) == (9, 9, 9)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 100, 50] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (200, 100, 50)
    modes = ["RGBA", "P", "L", "RGB"]
    columns = {"image": [png(50, mode=modes[r % 4]) for r in range(40)], "label": [r % 4 for r in range(40)]}
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)}))
    episode = EpisodeSampler(dataset, ways=4, shots=2, queries=2, split=None)[0]
    expected = {"RGBA": (255, 255, 255), "P": (50, 205, 7), "L": (50, 50, 50), "RGB": (50, 0, 0)}
    for image, row in zip(episode.support_images + episode.query_images,
                          episode.support_indices + episode.query_indices, strict=True):
        assert image.mode == "RGB" and image.getpixel((1, 1)) == expected[modes[row % 4]]


def test_episodes_are_rebuilt_alone_from_seed_and_index():
    dataset = make_dataset(COUNTS)
    first = EpisodeSampler(dataset, protocol="md", seed=11, split=None, num_episodes=50)
    forward = [first.plan(i) for i in range(50)]
    second = EpisodeSampler(dataset, protocol="md", seed=11, split=None, num_episodes=50)
    assert second.plan(37) == forward[37]          # no replay of 0..36
    assert [second.plan(i) for i in reversed(range(50))] == forward[::-1]
    other = EpisodeSampler(dataset, protocol="md", seed=12, split=None, num_episodes=50)
    assert sum(other.plan(i) == forward[i] for i in range(50)) == 0
    assert first[-1].spec["index"] == 49


DETERMINISM_SCRIPT = textwrap.dedent("""
    import json, sys
    import datasets
    from hf_hyperflow.episodes import EpisodeSampler
    dataset = datasets.load_from_disk(sys.argv[1])
    out = []
    for protocol in ("fixed", "md"):
        sampler = EpisodeSampler(dataset, protocol=protocol, seed=5, split=None, num_episodes=20)
        out += [[p.classes, p.support_indices, p.query_indices] for p in map(sampler.plan, range(20))]
    print(json.dumps(out))
""")


def test_same_episodes_in_another_process(tmp_path):
    make_dataset(COUNTS).save_to_disk(str(tmp_path / "ds"))
    dataset = datasets.load_from_disk(str(tmp_path / "ds"))
    here = []
    for protocol in ("fixed", "md"):
        sampler = EpisodeSampler(dataset, protocol=protocol, seed=5, split=None, num_episodes=20)
        here += [[p.classes, p.support_indices, p.query_indices] for p in map(sampler.plan, range(20))]
    done = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(tmp_path / "ds")], capture_output=True,
                          text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="77"))
    assert json.loads(done.stdout) == here


def test_rank_sharding_covers_every_episode_once():
    dataset = make_dataset(COUNTS)
    single = EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, num_episodes=23)
    seen = []
    for rank in range(4):
        sharded = EpisodeSampler(dataset, ways=3, shots=1, queries=1, split=None, num_episodes=23,
                                 rank=rank, world_size=4)
        assert len(sharded) == 23
        for episode in sharded:
            index = episode.spec["index"]
            assert index % 4 == rank
            assert episode.support_indices == single[index].support_indices
            seen.append(index)
    assert sorted(seen) == list(range(23))


def test_indices_refer_to_rows_of_a_shuffled_selected_view():
    base = make_dataset(COUNTS)
    view = base.shuffle(seed=3).select(range(200))
    labels = np.array(view["label"])
    names = view.features["label"].names
    sampler = EpisodeSampler(view, ways=5, shots=2, queries=2, split=None, num_episodes=10)
    for i in range(10):
        episode = sampler[i]
        for row, label in zip(episode.query_indices, episode.query_labels.tolist(), strict=True):
            assert names[labels[row]] == episode.classes[label]
            assert episode.query_images[episode.query_indices.index(row)].getpixel((0, 0))[0] == \
                view[row]["image"].getpixel((0, 0))


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


def test_sampler_errors_come_before_any_work():
    dataset = make_dataset([10, 10, 10, 4])
    with pytest.raises(ValueError, match=r"the dataset has 4 classes, fewer than ways=5; lower ways"):
        EpisodeSampler(dataset, ways=5, shots=1, queries=1, split=None)
    with pytest.raises(ValueError, match=r"1 classes of the dataset have fewer than shots \+ queries = 6 images, "
                                         r"e.g. \[\('class003', 4\)\]"):
        EpisodeSampler(dataset, ways=2, shots=3, queries=3, split=None)
    empty = ClassSplit(train=("class000", "class001", "class002", "class003"), validation=(), test=())
    with pytest.raises(ValueError, match=r"the 'test' split has no classes"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=1, split="test", class_split=empty)
    foreign = ClassSplit(train=(), validation=(), test=("class000", "zebra"))
    with pytest.raises(ValueError, match=r"1 classes of the 'test' split are not in column 'label', e.g. \['zebra'\]"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=1, split="test", class_split=foreign)
    with pytest.raises(ValueError, match=r"the md protocol needs at least 5"):
        EpisodeSampler(dataset, protocol="md", split=None)
    with pytest.raises(ValueError, match=r"the md protocol draws ways, shots and queries itself; do not pass \['shots'\]"):
        EpisodeSampler(make_dataset([3] * 6), protocol="md", shots=5, split=None)
    with pytest.raises(ValueError, match=r"fewer than 2 images .* e.g. \[\('class005', 1\)\]"):
        EpisodeSampler(make_dataset([3] * 5 + [1]), protocol="md", split=None)
    with pytest.raises(ValueError, match=r"protocol must be one of \['fixed', 'md'\], got 'mixed'"):
        EpisodeSampler(dataset, protocol="mixed")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation', 'test'\] or None"):
        EpisodeSampler(dataset, split="val")
    with pytest.raises(ValueError, match=r"shots must be an integer >= 1, got 0"):
        EpisodeSampler(dataset, ways=2, shots=0, split=None)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got -1"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=1, split=None, seed=-1)
    with pytest.raises(ValueError, match=r"need 0 <= rank < world_size, got rank=2, world_size=2"):
        EpisodeSampler(dataset, ways=2, shots=1, queries=1, split=None, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"the dataset has no rows"):
        EpisodeSampler(dataset.select([]), ways=2, shots=1, queries=1, split=None)
    with pytest.raises(TypeError, match=r"dataset must be a datasets.Dataset"):
        EpisodeSampler({"image": []})
    sampler = EpisodeSampler(dataset, ways=2, shots=1, queries=1, split=None, num_episodes=3)
    with pytest.raises(IndexError, match=r"episode index 3 out of range for 3 episodes"):
        sampler[3]


def test_default_split_is_the_test_classes_of_the_default_class_split():
    dataset = make_dataset([8] * 40)
    sampler = EpisodeSampler(dataset, ways=5, shots=2, queries=2)
    expected = ClassSplit.from_dataset(dataset)
    assert sampler.class_names == list(expected.test) and len(expected.test) == 6
    for i in range(20):
        assert set(sampler.plan(i).classes) <= set(expected.test)
    train = EpisodeSampler(dataset, ways=5, shots=2, queries=2, split="train", class_split=expected)
    assert train.class_names == list(expected.train)


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


def test_md_bounds_lower_ways_and_support():
    import datasets as hf_datasets
    from PIL import Image as PILImage

    rows = [{"image": PILImage.new("RGB", (4, 4), (k, 0, 0)), "label": str(k % 30)} for k in range(30 * 12)]
    dataset = hf_datasets.Dataset.from_list(rows).cast_column("label", hf_datasets.ClassLabel(
        names=sorted({r["label"] for r in rows})))
    bounded = EpisodeSampler(dataset, protocol="md", split=None, num_episodes=40, max_ways=8, max_support=30)
    ways = [bounded.plan(i) for i in range(40)]
    assert max(len(p.classes) for p in ways) <= 8
    assert max(len(p.support_indices) for p in ways) <= 30
    assert bounded[0].spec["max_ways"] == 8 and bounded[0].spec["max_support"] == 30
    default = EpisodeSampler(dataset, protocol="md", split=None, num_episodes=40)
    assert "max_ways" not in default[0].spec
    assert max(len(default.plan(i).classes) for i in range(40)) > 8
    with pytest.raises(ValueError, match=r"max_ways must be an integer >= 5"):
        EpisodeSampler(dataset, protocol="md", split=None, max_ways=2)
    with pytest.raises(ValueError, match=r"max_ways and max_support bound the md protocol"):
        EpisodeSampler(dataset, protocol="fixed", split=None, max_ways=8)
