"""Episode samplers over Hugging Face Datasets: the protocols' rules, seeding, sharding, decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from conftest import make_dataset, png
from PIL import Image

from hf_hyperflow.episodes import (
    MD_MAX_SUPPORT,
    MD_MAX_SUPPORT_PER_CLASS,
    ClassSplit,
    Episode,
    EpisodeSampler,
    to_rgb,
)


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


def test_sampler_errors_come_before_any_work():
    dataset = make_dataset([10, 10, 10, 4])
    with pytest.raises(ValueError, match=r"the dataset has 4 classes, fewer than ways=5; lower ways"):
        EpisodeSampler(dataset, ways=5, shots=1, queries=1, split=None)
    with pytest.raises(ValueError, match=r"1 classes of the dataset have fewer than shots \+ queries = 6 images, "
                                         r"e.g. \[\('class003', 4\)\] \(name, images\); pass min_images_per_class=6 "
                                         r"to use only the 3 classes that have enough"):
        EpisodeSampler(dataset, ways=2, shots=3, queries=3, split=None)
    # ... which does what it says: the small class is left out, every episode is full
    kept = EpisodeSampler(dataset, ways=2, shots=3, queries=3, split=None, min_images_per_class=6, num_episodes=20)
    assert kept.class_names == ["class000", "class001", "class002"]
    assert all(len(e.support_labels) == 6 and len(e.query_labels) == 6 for e in kept)
    with pytest.raises(ValueError, match=r"the dataset \(classes with >= 11 images\) has 0 classes|no class of the "
                                         r"dataset has min_images_per_class=11 images \(the largest has 10\)"):
        EpisodeSampler(dataset, ways=2, shots=3, queries=3, split=None, min_images_per_class=11)
    with pytest.raises(ValueError, match=r"min_images_per_class must be a positive integer or None, got 0"):
        EpisodeSampler(dataset, ways=2, shots=3, queries=3, split=None, min_images_per_class=0)
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
