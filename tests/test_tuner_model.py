"""The PEFT tuner: round trips through PEFT's own loaders, the error without the package imported, and the modules a saved adapter records."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_backbone, randomize_drift
from conftest import random_pixels as pixels

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig


def test_peft_round_trips(tmp_path):
    from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model

    backbone_dir = tmp_path / "backbone"
    make_backbone("vit").save_pretrained(backbone_dir)
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(backbone_dir), HyperFlowConfig(steps=2))
    randomize_drift(HyperFlowAdapter(model))
    model.save_pretrained(tmp_path / "adapter")
    config = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert isinstance(config, HyperFlowConfig) and config.steps == 2
    expected = model.base_model.drift.state_dict()
    for loaded in (
        PeftModel.from_pretrained(AutoModel.from_pretrained(backbone_dir), tmp_path / "adapter"),
        AutoPeftModel.from_pretrained(tmp_path / "adapter"),
    ):
        got = loaded.base_model.drift.state_dict()
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_loading_without_importing_the_package_says_to_import_it(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "adapter")
    script = (
        "import sys\n"
        "from peft import PeftConfig\n"
        "try:\n"
        f"    PeftConfig.from_pretrained({str(tmp_path / 'adapter')!r})\n"
        "except Exception as error:\n"
        "    print(type(error).__name__ + ': ' + str(error))\n"
        "assert 'hf_hyperflow' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "import hf_hyperflow" in result.stdout, result.stdout
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HYPERFLOW"


def test_saved_adapter_keeps_its_resolved_modules(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert sorted(config["adapted_modules"]) == sorted(name for name, _ in adapter.tuner.hyperflow_layers())
    config["target_modules"] = "pattern_that_matches_nothing$"  # loading uses the recorded modules, not patterns
    config_path.write_text(json.dumps(config))
    loaded = HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "a")
    torch.testing.assert_close(loaded.adapt(pixels(4), [0, 1, 0, 1]).logits(pixels(3)),
                               adapter.adapt(pixels(4), [0, 1, 0, 1]).logits(pixels(3)))
    config["adapted_modules"]["layers.7.attention.q_proj"] = ["lora"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"differ(s)? from the copy saved with adapter_model.safetensors in adapted_modules"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "a")


def test_a_second_adapter_on_one_backbone_says_how(tmp_path):
    from hf_hyperflow import AdaptedTask

    backbone = make_backbone("vit")
    fresh = {k: v.clone() for k, v in make_backbone("vit").state_dict().items()}
    first = HyperFlowAdapter(backbone, HyperFlowConfig(steps=2))
    randomize_drift(first)
    first.save_pretrained(tmp_path / "a")
    task = first.adapt(pixels(4), [0, 1, 0, 1])
    task.save_pretrained(tmp_path / "task")
    how = r"already carries an adapter .* take the first one off with its unload\(\)"
    with pytest.raises(ValueError, match=how):
        HyperFlowAdapter.from_pretrained(backbone, tmp_path / "a")
    with pytest.raises(ValueError, match=how):
        HyperFlowAdapter(backbone, HyperFlowConfig())
    with pytest.raises(ValueError, match=how):
        AdaptedTask.from_pretrained(backbone, tmp_path / "task")
    with pytest.raises(ValueError, match=r"call that adapter's unload\(\)"):
        task.unload()
    plain = first.unload()  # the backbone as it was: the second adapter loads onto it
    assert plain is backbone and plain.state_dict().keys() == fresh.keys()
    assert all(torch.equal(plain.state_dict()[k], fresh[k]) for k in fresh)
    second = HyperFlowAdapter.from_pretrained(plain, tmp_path / "a")
    plain = second.unload()
    loaded = AdaptedTask.from_pretrained(plain, tmp_path / "task")  # a task with norms saved whole
    torch.testing.assert_close(loaded.logits(pixels(3)), task.logits(pixels(3)))
    plain = loaded.unload()
    assert all(torch.equal(plain.state_dict()[k], fresh[k]) for k in fresh)
