"""Meta-training data: which episodes each rank uses at each step, and the weighted mix of datasets."""

from __future__ import annotations

import numpy as np
import pytest

from hf_hyperflow.training import EpisodeMix, step_sample_ids


@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_every_episode_is_used_once_per_step_across_ranks(world_size, accumulation):
    per_step = 8
    for step in range(3):
        used = [i for rank in range(world_size) for micro in range(accumulation)
                for i in step_sample_ids(step, micro, per_step, accumulation, rank, world_size)]
        assert sorted(used) == list(range(step * per_step, (step + 1) * per_step))
        for rank in range(world_size):  # rank r takes i % world_size == r, as EpisodeSampler shards
            mine = [i for micro in range(accumulation)
                    for i in step_sample_ids(step, micro, per_step, accumulation, rank, world_size)]
            assert all(i % world_size == rank for i in mine)
    with pytest.raises(ValueError, match="cannot be split over 2 accumulation steps x 2 processes"):
        step_sample_ids(0, 0, 6, 2, 0, 2)


def test_a_mix_of_datasets_follows_the_weights_and_is_seeded():
    class Sampler(list):
        pass

    mix = EpisodeMix([Sampler(range(4000)), Sampler(range(4000))], [1.0, 3.0], seed=0)
    share = np.mean([mix.source_of(i) for i in range(4000)])
    assert 0.72 < share < 0.78  # weights 1 : 3
    assert [mix.source_of(i) for i in range(50)] == [mix.source_of(i) for i in range(50)]
    assert [mix.source_of(i) for i in range(50)] != [EpisodeMix(mix.samplers, [1.0, 3.0], seed=1).source_of(i)
                                                     for i in range(50)]


def test_classes_too_small_for_the_episodes_can_be_left_out(synthetic_dataset, tmp_path, fresh_accelerate):
    import datasets
    from conftest import tiny_train_config

    from hf_hyperflow.training import config_from_dict, train

    # c00..c02 keep 3 images each, fewer than shots + queries = 5
    full = datasets.load_from_disk(synthetic_dataset)
    seen: dict[int, int] = {}

    def keep(row):
        seen[row["label"]] = seen.get(row["label"], 0) + 1
        return row["label"] > 2 or seen[row["label"]] <= 3

    small = str(tmp_path / "small")
    full.filter(keep).save_to_disk(small)
    run = {"losses.flow": 0.0, "flow.generate": None, "validation.episodes": 0, "training.max_steps": 1,
           "datasets.0.class_split": {"fractions": [1.0, 0.0, 0.0], "seed": 0}}
    with pytest.raises(ValueError, match=r"datasets\[0\] \(train episodes\): 3 classes of the 'train' split have fewer "
                                         r"than shots \+ queries = 5 images.*pass min_images_per_class=5 to use only the "
                                         r"9 classes"):
        train(config_from_dict(tiny_train_config(tmp_path / "refused", small, **run)))
    result = train(config_from_dict(tiny_train_config(tmp_path / "kept", small, **run,
                                                      **{"datasets.0.min_images_per_class": 5})))
    assert result.step == 1
    with pytest.raises(ValueError, match=r"datasets\[0\].min_images_per_class must be an integer >= 1, got 0"):
        config_from_dict(tiny_train_config(tmp_path / "zero", small, **run, **{"datasets.0.min_images_per_class": 0}))


def test_a_dataset_shown_without_colour_has_grey_episodes_and_its_own_cache_rows(synthetic_dataset):
    import numpy as np
    from conftest import tiny_train_config

    from hf_hyperflow.training import DatasetSection, config_from_dict
    from hf_hyperflow.training.data import Source, _class_split, load_source, make_sampler, row_key

    config = config_from_dict(tiny_train_config("unused", synthetic_dataset))
    samplers = {}
    for grey in (False, True):
        entry = DatasetSection(source=synthetic_dataset, without_colour=grey, class_split={"seed": 0})
        dataset, label_column = load_source(entry, "entry")
        source = Source("s", entry, dataset, label_column, _class_split(entry, dataset, label_column, "entry"))
        samplers[grey] = make_sampler(source, config, "train", seed=3, num_episodes=2, transform=None, key="entry")
    colour, grey = samplers[False][1], samplers[True][1]
    assert colour.support_indices == grey.support_indices  # the same episodes, only the pixels differ
    for c, g in zip(colour.support_images + colour.query_images, grey.support_images + grey.query_images, strict=True):
        values = np.asarray(g, dtype=np.int16)
        assert (values == values[..., :1]).all()
        assert np.abs(values[..., 0] - np.asarray(c.convert("L"), dtype=np.int16)).max() == 0
    assert row_key(DatasetSection(source="x", without_colour=True)) != row_key(DatasetSection(source="x"))


def test_a_dataset_shown_at_low_resolution_has_thumbnail_episodes_and_its_own_cache_rows(synthetic_dataset):
    import numpy as np
    from conftest import tiny_train_config

    from hf_hyperflow.inputs import at_low_resolution
    from hf_hyperflow.training import DatasetSection, config_from_dict
    from hf_hyperflow.training.data import Source, _class_split, load_source, make_sampler, row_key

    config = config_from_dict(tiny_train_config("unused", synthetic_dataset))
    episodes = {}
    for side in (None, 4):
        entry = DatasetSection(source=synthetic_dataset, low_resolution=side, class_split={"seed": 0})
        dataset, label_column = load_source(entry, "entry")
        source = Source("s", entry, dataset, label_column, _class_split(entry, dataset, label_column, "entry"))
        episodes[side] = make_sampler(source, config, "train", seed=3, num_episodes=2, transform=None, key="entry")[1]
    sharp, low = episodes[None], episodes[4]
    assert sharp.support_indices == low.support_indices  # the same episodes, only the pixels differ
    for s, t in zip(sharp.support_images, low.support_images, strict=True):
        assert t.size == s.size
        np.testing.assert_array_equal(np.asarray(t), np.asarray(at_low_resolution([s], 4)[0]))
    keys = {row_key(DatasetSection(source="x", **extra)) for extra in
            ({}, {"low_resolution": 16}, {"low_resolution": 8}, {"without_colour": True, "low_resolution": 16})}
    assert len(keys) == 4
    with pytest.raises(ValueError, match=r"datasets\[0\].low_resolution must be an integer >= 1, got 0"):
        config_from_dict(tiny_train_config("unused", synthetic_dataset, **{"datasets.0.low_resolution": 0}))
