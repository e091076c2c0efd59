"""The domain reference of a trained adapter: fitted on its training sources' train-class episodes, saved by
recipes/domain_reference.py into the adapter's folder."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import yaml
from conftest import make_random_adapter, tiny_train_config

from hf_hyperflow import HyperFlowAdapter
from hf_hyperflow.training import config_from_dict, train
from hf_hyperflow.training.data import load_sources, make_sampler
from hf_hyperflow.training.reference import fit_domain_reference, support_statistics


def test_reference_of_each_source_is_its_train_episodes_statistics(tmp_path, synthetic_dataset):
    changes = {"datasets": [{"source": synthetic_dataset, "class_split": {"fractions": [0.6, 0.4, 0.0], "seed": 0}},
                            {"source": synthetic_dataset, "name": "grey", "without_colour": True, "weight": 0.5,
                             "class_split": {"fractions": [0.6, 0.4, 0.0], "seed": 0}}]}
    config = config_from_dict(tiny_train_config(tmp_path / "run", synthetic_dataset, **changes))
    adapter = make_random_adapter("timm_wrapper", first_adapted_block=-1, statistics_size=3)
    reference = fit_domain_reference(adapter, config, episodes=3, seed=5, progress=False)
    assert reference.sources == ["synthetic", "grey"] and reference.episodes == 3
    source = load_sources(config)[1]
    sampler = make_sampler(source, config, "train", 5 + 104729, 3, None, "datasets[1]")
    assert {c for i in range(3) for c in sampler[i].classes} <= set(source.class_split.train)
    torch.testing.assert_close(reference.centres[1], support_statistics(adapter, sampler, 3).mean(0))
    assert not torch.allclose(reference.centres[0], reference.centres[1])  # the grey copy looks otherwise


def test_an_adapter_without_module_statistics_has_no_reference(tmp_path, synthetic_dataset):
    config = config_from_dict(tiny_train_config(tmp_path / "run", synthetic_dataset))
    with pytest.raises(ValueError, match="statistics_size=0"):
        fit_domain_reference(make_random_adapter("timm_wrapper"), config, episodes=3)


def test_recipe_writes_the_reference_and_gate_into_a_trained_adapter(tmp_path, synthetic_dataset, monkeypatch):
    from recipes.domain_reference import main

    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{"adapter.statistics_size": 3,
                                                                     "losses.flow": 0.0, "flow.generate": None,
                                                                     "training.max_steps": 2})
    train(config_from_dict(data))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    final = tmp_path / "run" / "final"
    monkeypatch.setattr(sys, "argv", ["recipes/domain_reference.py"])
    assert main(["--config", str(tmp_path / "config.yaml"), "--adapter", str(final), "--episodes", "3",
                 "--gate", "1.5"]) == 0
    from transformers import AutoModel

    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(tmp_path / "run" / "backbone"), final)
    assert adapter.config.domain_gate == 1.5 and adapter.domain_reference.sources == ["synthetic"]
    assert adapter.domain_reference.episodes == 3
    # meta-training on from this adapter integrates every task: the gate is for adapting, not for training
    from hf_hyperflow.training.components import build_adapter

    again = config_from_dict({**data, "output_dir": str(tmp_path / "again"), "adapter": {"pretrained": str(final)}})
    assert build_adapter(again, AutoModel.from_pretrained(tmp_path / "run" / "backbone")).domain_reference is None
    with pytest.raises(SystemExit, match="--episodes must be >= 2"):
        main(["--config", str(tmp_path / "config.yaml"), "--adapter", str(final), "--episodes", "1"])
    # the same through the hf-hyperflow command
    from hf_hyperflow.cli import main as cli

    assert cli(["domain-reference", "--config", str(tmp_path / "config.yaml"), "--adapter", str(final),
                "--episodes", "4"]) == 0
    loaded = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(tmp_path / "run" / "backbone"), final)
    assert loaded.domain_reference.episodes == 4 and loaded.config.domain_gate == 1.5


def test_a_run_with_a_domain_gate_saves_the_reference_with_its_adapters(tmp_path, synthetic_dataset):
    """The reference depends on the frozen backbone and the datasets only: fitted once at the end of the run, it is
    saved with final/ and best/, which then load and gate without a separate step."""
    from transformers import AutoModel

    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{
        "adapter.statistics_size": 3, "adapter.domain_gate": 1.5, "domain_reference.episodes": 3,
        "domain_reference.seed": 4, "losses.flow": 0.0, "flow.generate": None, "training.max_steps": 2})
    config = config_from_dict(data)
    result = train(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a gate without its reference would warn
        adapters = [HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(tmp_path / "run" / "backbone"), folder)
                    for folder in (result.final_dir, result.best_dir)]
    expected = fit_domain_reference(adapters[0], config, episodes=3, seed=4, progress=False)
    for adapter in adapters:
        assert adapter.config.domain_gate == 1.5 and adapter.domain_reference.episodes == 3
        torch.testing.assert_close(adapter.domain_reference.centres, expected.centres)
    with pytest.raises(ValueError, match="domain_reference.episodes must be an integer >= 2"):
        config_from_dict({**data, "domain_reference": {"episodes": 1}})
