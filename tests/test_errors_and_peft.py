"""Bad input, PEFT registration and loading, config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone, randomize_drift
from PIL import Image

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.inputs import encode_labels


@pytest.fixture(scope="module")
def adapter():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=2))
    randomize_drift(adapter)
    return adapter


def pixels(n=4):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(n))


# ------------------------------------------------------------------------------------------------ labels
def test_labels_strings_and_predictions_of_the_same_kind(adapter):
    task = adapter.adapt(pixels(4), ["cat", "dog", "cat", "dog"])
    assert task.classes == ["cat", "dog"]
    assert set(task.predict(pixels(3))) <= {"cat", "dog"}
    task = adapter.adapt(pixels(4), [1, 0, 1, 0])
    assert all(isinstance(y, int) for y in task.predict(pixels(3)))
    probabilities = task.predict_proba(pixels(3))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))


def test_one_class_only(adapter):
    with pytest.raises(ValueError, match="at least two classes"):
        adapter.adapt(pixels(3), [0, 0, 0])


def test_class_without_support_image(adapter):
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no support image"):
        adapter.adapt(pixels(3), [0, 2, 2])
    with pytest.raises(ValueError, match=r"Class\(es\) \['bird'\] have no support image"):
        adapter.adapt(pixels(2), ["cat", "dog"], classes=["cat", "dog", "bird"])


def test_labels_that_do_not_match_images(adapter):
    with pytest.raises(ValueError, match="4 support images but 3 labels"):
        adapter.adapt(pixels(4), [0, 1, 0])


def test_mixed_label_types():
    with pytest.raises(TypeError, match="all ints or all strings"):
        encode_labels([0, "a"])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        encode_labels(torch.tensor([0.0, 1.0]))


def test_label_not_in_classes():
    with pytest.raises(ValueError, match=r"not among classes"):
        encode_labels(["cat", "cow"], classes=["cat", "dog"])


# ------------------------------------------------------------------------------------------------ images
def test_wrong_tensor_rank_and_channels(adapter):
    with pytest.raises(ValueError, match=r"4-D tensor \[B, 3, H, W\].*unsqueeze"):
        adapter.adapt(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE), [0])
    with pytest.raises(ValueError, match="3 channels on axis 1"):
        adapter.adapt(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE), [0, 1])
    with pytest.raises(TypeError, match="float tensor"):
        adapter.adapt(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), [0, 1])
    with pytest.raises(TypeError, match="PIL images or one pixel_values tensor"):
        adapter.adapt([np.zeros((8, 8, 3))] * 2, [0, 1])


def test_grayscale_rgba_and_palette_images_are_converted(adapter):
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(4)]
    gray = [im.convert("L") for im in rgb]
    rgba = [im.convert("RGBA") for im in rgb]
    palette = [im.convert("P") for im in rgb]
    labels = [0, 1, 0, 1]
    for images in (gray, rgba, palette):
        task = adapter.adapt(images, labels)
        assert task.logits(images).shape == (4, 2)
    # RGBA of an opaque RGB image is the same image
    torch.testing.assert_close(adapter.adapt(rgba, labels).logits(rgb), adapter.adapt(rgb, labels).logits(rgb))


# ------------------------------------------------------------------------------------------------ files
def test_adapter_for_another_backbone(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "vit-adapter")
    with pytest.raises(ValueError, match="made for a 'vit' backbone, but the backbone given is a 'dinov2'"):
        HyperFlowAdapter.from_pretrained(make_backbone("dinov2"), tmp_path / "vit-adapter")
    # same model_type, other weights: the content fingerprint catches it
    with pytest.raises(ValueError, match="strict_backbone=False"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit", seed=5), tmp_path / "vit-adapter")
    with pytest.warns(UserWarning, match="differ from those this adapter was trained with"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit", seed=5), tmp_path / "vit-adapter", strict_backbone=False)


def test_adapter_for_another_feature_size(tmp_path):
    from transformers import AutoConfig, AutoModel

    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=1))
    adapter.save_pretrained(tmp_path / "a")
    wider = AutoModel.from_config(AutoConfig.for_model(
        "vit", hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8))
    with pytest.raises(ValueError, match="differ from those this adapter|features of size 32"):
        HyperFlowAdapter.from_pretrained(wider, tmp_path / "a", strict_backbone=False)


def test_task_for_another_backbone(adapter, tmp_path):
    adapter.adapt(pixels(4), [0, 1, 0, 1]).save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="adapted on a 'vit' backbone, but a 'dinov2' backbone was given"):
        AdaptedTask.from_pretrained(make_backbone("dinov2"), tmp_path / "task")


def test_truncated_safetensors(adapter, tmp_path):
    adapter.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupt or truncated"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "adapter")
    adapter.adapt(pixels(4), [0, 1, 0, 1]).save_pretrained(tmp_path / "task")
    head = tmp_path / "task" / "hyperflow_head.safetensors"
    head.write_bytes(head.read_bytes()[:20])
    with pytest.raises(ValueError, match="hyperflow_head.safetensors is corrupt or truncated"):
        AdaptedTask.from_pretrained(make_backbone("vit"), tmp_path / "task")


def test_missing_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=[]), "non-empty list"),
        (dict(groups=["lora", "bias"]), r"groups=\['lora', 'bias'\] is not valid"),
        (dict(integrator="rk5"), "integrator='rk5' is unknown"),
        (dict(steps=0), "steps=0 must be a positive integer"),
        (dict(r=0), "r=0 must be a positive integer"),
        (dict(lora_alpha=-1.0), "lora_alpha=-1.0 must be > 0"),
        (dict(time_embedding_size=15), "must be even"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HyperFlowConfig(**kwargs)


def test_config_fields_have_help():
    import dataclasses

    own = {f.name for f in dataclasses.fields(HyperFlowConfig)} - {
        f.name for f in dataclasses.fields(__import__("peft").PeftConfig)}
    for field in dataclasses.fields(HyperFlowConfig):
        if field.name in own:
            assert field.metadata.get("help"), field.name


def test_unknown_target_modules_and_block_range():
    with pytest.raises(ValueError, match="No module of this vit backbone matches"):
        HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(target_modules="nothing_here$", shift_modules="nope$"))
    with pytest.raises(ValueError, match="first_adapted_block=5 is out of range: this backbone has 2 blocks"):
        HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(first_adapted_block=5))


def test_first_adapted_block_keeps_only_last_blocks():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(first_adapted_block=-1))
    names = [name for name, _ in adapter.tuner.hyperflow_layers()]
    assert names and all(name.startswith("layers.1.") for name in names)


# ------------------------------------------------------------------------------------------------ PEFT
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


def test_first_adapted_block_counts_timm_blocks_once():
    adapter = HyperFlowAdapter(make_backbone("timm_wrapper"), HyperFlowConfig(first_adapted_block=-1))
    names = sorted(name for name, _ in adapter.tuner.hyperflow_layers())
    # test_efficientnet's last block is blocks.4.0; conv_head and the final bn2 come after it
    assert names == sorted(["timm_model.bn2", "timm_model.conv_head"] + [
        f"timm_model.blocks.4.0.{n}" for n in ("bn1", "bn2", "bn3", "conv_pw", "conv_pwl")])


@pytest.mark.parametrize("model_type", ["vit", "timm_wrapper"])
def test_adapt_runs_the_frozen_prefix_once_and_matches_the_uncached_path(model_type):
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(first_adapted_block=-1, steps=2))
    randomize_drift(adapter)
    prefix = adapter.frozen_prefix()
    assert prefix is not None
    inner = next(m for m in prefix.blocks[0][1].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    calls = []
    handle = inner.register_forward_pre_hook(lambda module, args: calls.append(1))
    images, labels = pixels(4), [0, 1, 0, 1]
    cached = adapter.adapt(images, labels)
    assert len(calls) == 1, "the frozen prefix runs once for the theta_0 pass and the adapted pass"
    handle.remove()
    adapter._frozen_prefix = None  # the uncached path
    uncached = adapter.adapt(images, labels)
    torch.testing.assert_close(cached.prototypes, uncached.prototypes, rtol=1e-5, atol=1e-6)
    for key in cached.state:
        torch.testing.assert_close(cached.state[key], uncached.state[key], rtol=1e-5, atol=1e-6)


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
    config["backbone_fingerprint"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapts modules this vit backbone does not have \(\['layers.7"):
        HyperFlowAdapter.from_pretrained(make_backbone("vit"), tmp_path / "a")
