"""The meta-training config: today's config files load, overrides apply through draccus, and a bad config stops
before any work with a message naming the key (an unknown key names the keys of its section)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_train_config

from hf_hyperflow.training import TrainConfig, config_from_dict, load_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def test_smoke_config_loads_and_overrides_apply():
    config = load_config(CONFIGS / "smoke.yaml", ["--training.max_steps", "7", "--optimizer.lr=1e-3",
                                                  "--flow.generate.episodes", "2", "--training.report_to", "null"])
    assert config.training.max_steps == 7 and config.optimizer.lr == 1e-3 and config.flow.generate.episodes == 2
    assert config.backbone.random_init["model_type"] == "resnet" and config.adapter.first_adapted_block == -1
    assert config.datasets[0].max_classes == 40 and config.datasets[0].class_split["fractions"] == [0.7, 0.15, 0.15]
    whole = load_config(CONFIGS / "smoke.yaml", ["--datasets", "[{source: data/glyphs_default, builder: "
                                                               "glyphs_default, max_classes: 30}]"])
    assert whole.datasets[0].max_classes == 30 and whole.datasets[0].class_split is None  # a list goes whole


def test_efficientnet_lite0_config_loads():
    config = load_config(CONFIGS / "efficientnet_lite0.yaml")
    assert config.backbone.build == "efficientnet_lite0" and config.adapter.image_size == 64
    assert config.losses.unrolled > 0 and config.losses.flow > 0 and config.flow.generate.episodes >= 100


def test_the_yaml_layout_round_trips(tmp_path):
    config = load_config(CONFIGS / "smoke.yaml")
    data = config.to_dict()
    assert data["adapter"] == {"pretrained": None, "groups": ["lora", "shift", "head"], "r": 2,
                               "first_adapted_block": -1, "image_size": 32, "steps": 4, "integrator": "euler",
                               "hidden_size": 32, "output_rank": 8}
    json.dumps(data)  # plain data
    assert config_from_dict(data) == config


@pytest.mark.parametrize("name", ["cpu_2proc", "single_gpu", "multi_gpu", "multi_node"])
def test_accelerate_launch_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    expected = {"cpu_2proc": ("MULTI_GPU", True, 2, 1), "single_gpu": ("NO", False, 1, 1),
                "multi_gpu": ("MULTI_GPU", False, 8, 1), "multi_node": ("MULTI_GPU", False, 16, 2)}[name]
    assert (config.distributed_type.value, config.use_cpu, config.num_processes, config.num_machines) == expected


@pytest.mark.parametrize("changes,message", [
    ({"optimizer.lrr": 0.1}, r"Unknown key 'optimizer.lrr'; the keys of optimizer are \['lr', 'weight_decay'"),
    ({"trainer": {"steps": 3}}, r"Unknown key 'trainer'; the keys of the top level are \['output_dir'"),
    ({"adapter.rank": 4}, r"Unknown key 'adapter.rank'; the keys of adapter are \['pretrained', 'groups', 'r'"),
    ({"datasets.0.source": "/nowhere/glyphs"}, r"datasets\[0\].source: /nowhere/glyphs does not exist"),
    ({"datasets.0.class_split": {"train": ["c00", "c01", "c02"], "validation": []}},
     r"datasets\[0\].class_split: the validation split has no classes"),
    ({"datasets.0.episodes": {"way": 2}}, r"Unknown key 'datasets\[0\].episodes.way'; the keys of "
                                          r"datasets\[0\].episodes are \['protocol', 'ways', 'shots', 'queries', 'max_ways'"),
    ({"training.max_steps": 0}, "training.max_steps must be an integer >= 1, got 0"),
    ({"adapter.steps": 0}, "adapter.steps must be an integer >= 1, got 0"),
    ({"adapter.integrator": "rk5"}, "adapter.integrator: integrator='rk5' is unknown"),
    ({"unrolled.steps": 0}, "unrolled.steps must be an integer >= 1, got 0"),
    ({"flow.generate.steps": 0}, "flow.generate.steps must be an integer >= 1, got 0"),
    ({"optimizer.lr": "fast"}, "optimizer.lr: Couldn't parse 'fast' into a float"),
    ({"training.max_steps": 2.5}, "training.max_steps: .*2.5"),
    ({"losses.flow": 0.0, "losses.unrolled": 0.0}, "give at least one a positive weight"),
    ({"training.report_to": "wandb"}, "training.report_to must be null or one of"),
    ({"training.episodes_per_step": 0}, "training.episodes_per_step must be an integer >= 1, got 0"),
    ({"backbone.path": "models/nowhere"}, "backbone: set exactly one of backbone.path"),
])
def test_bad_config_names_the_key_before_any_work(tmp_path, synthetic_dataset, changes, message):
    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **changes)
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(data)
    # The command line says the same and stops before creating anything.
    sys.path.insert(0, str(ROOT))
    from recipes.train import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--config", str(path)]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,message", [
    (["--training.max_stpes", "9"], r"Unknown key 'training.max_stpes'; the keys of training are \['max_steps'"),
    (["--datasets.0.source", "x"], r"datasets is a list, overridden whole on the command line: --datasets"),
    (["--training.max_steps", "many"], r"training.max_steps: Couldn't parse 'many' into an int"),
])
def test_bad_overrides_name_the_key(overrides, message, capsys):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "smoke.yaml", overrides)
    from recipes.train import main

    assert main(["--config", str(CONFIGS / "smoke.yaml"), *overrides]) == 2
    assert "error: " in capsys.readouterr().err


def test_a_config_is_checked_when_built_and_when_changed(tmp_path, synthetic_dataset):
    with pytest.raises(ValueError, match="output_dir is missing"):
        TrainConfig()
    config = config_from_dict(tiny_train_config(tmp_path / "run", synthetic_dataset))
    config.training.max_steps = 0
    with pytest.raises(ValueError, match="training.max_steps must be an integer >= 1, got 0"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_empty_class_split_from_the_data_fails_before_training(tmp_path, synthetic_dataset):
    data = tiny_train_config(tmp_path / "run", synthetic_dataset,
                             **{"datasets.0.class_split": {"fractions": [1.0, 0.0, 0.0], "seed": 0}})
    with pytest.raises(ValueError, match=r"datasets\[0\].class_split: the validation split has no classes"):
        train(config_from_dict(data))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "trajectories").exists()


def test_a_builder_name_is_checked_against_the_builders_given(tmp_path, synthetic_dataset, monkeypatch):
    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{"datasets.0.builder": "glyphs"})
    config_from_dict(data)  # no builders given: checked when needed
    with pytest.raises(ValueError, match=r"datasets\[0\].builder: unknown builder 'glyphs'; known: \['digits'\]"):
        config_from_dict(data, data_builders={"digits": object()})
    import hf_hyperflow.training.loop as loop

    monkeypatch.setattr(loop, "_installed_builders", lambda: None)  # a wheel without the repository's builders
    missing = tiny_train_config(tmp_path / "run", str(tmp_path / "absent"), **{"datasets.0.builder": "digits"})
    with pytest.raises(ValueError, match=r"datasets\[0\].builder: no data builder 'digits' is installed or was "
                                         r"given to train\(\); build .*hf-hyperflow data build --name digits"):
        train(config_from_dict(missing))
