"""The backbone table: which modules are adapted (patterns, first_adapted_block, timm blocks counted once), the
content fingerprint and embedding across backbones, and how many images a forward pass takes."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import CPU_LATE_PASS_IMAGES, CPU_PASS_SIDES, images_per_pass


def test_images_per_pass_on_cpu_and_accelerators():
    cpu = torch.device("cpu")
    assert images_per_pass(64, cpu) == CPU_PASS_SIDES // 64 == 8
    assert images_per_pass(128, cpu) == 4
    assert images_per_pass(4 * CPU_PASS_SIDES, cpu) == 1  # never zero
    assert images_per_pass(64, cpu, late=True) == images_per_pass(128, cpu, late=True) == CPU_LATE_PASS_IMAGES
    assert images_per_pass(16, cpu, late=True) == CPU_PASS_SIDES // 16 > CPU_LATE_PASS_IMAGES  # never below early
    # a small support: early passes of a quarter of it, at least CPU_SMALLEST_PASS; a large one: as without it
    assert [images_per_pass(64, cpu, support_size=n) for n in (1, 5, 10, 15, 25, 32, 500)] == [2, 2, 2, 3, 6, 8, 8]
    assert [images_per_pass(128, cpu, support_size=n) for n in (5, 25, 500)] == [2, 4, 4]
    assert images_per_pass(4 * CPU_PASS_SIDES, cpu, support_size=5) == 1
    assert images_per_pass(64, torch.device("meta"), support_size=5) is None
    assert images_per_pass(224, torch.device("cuda")) is None  # all at once on an accelerator
    assert images_per_pass(224, torch.device("cuda"), late=True) is None


def test_unknown_target_modules_and_block_range():
    with pytest.raises(ValueError, match="No module of this vit backbone matches"):
        HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(target_modules="nothing_here$", shift_modules="nope$"))
    with pytest.raises(ValueError, match="first_adapted_block=5 is out of range: this backbone has 2 blocks"):
        HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(first_adapted_block=5))


def test_first_adapted_block_keeps_only_last_blocks():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(first_adapted_block=-1))
    names = [name for name, _ in adapter.tuner.hyperflow_layers()]
    assert names and all(name.startswith("layers.1.") for name in names)


def test_first_adapted_block_counts_timm_blocks_once():
    adapter = HyperFlowAdapter(make_backbone("timm_wrapper"), HyperFlowConfig(first_adapted_block=-1))
    names = sorted(name for name, _ in adapter.tuner.hyperflow_layers())
    # test_efficientnet's last block is blocks.4.0; conv_head and the final bn2 come after it
    assert names == sorted(["timm_model.bn2", "timm_model.conv_head"] + [
        f"timm_model.blocks.4.0.{n}" for n in ("bn1", "bn2", "bn3", "conv_pw", "conv_pwl")])


def test_the_fingerprint_is_the_weights_not_the_wrapping(model_type):
    from hf_hyperflow.backbones import backbone_fingerprint, embed, probe_feature_size

    plain = make_backbone(model_type)
    before = backbone_fingerprint(plain)
    adapter = HyperFlowAdapter(plain, HyperFlowConfig())  # wraps the backbone's layers in place
    assert backbone_fingerprint(adapter.backbone) == before
    assert backbone_fingerprint(make_backbone(model_type, seed=1)) != before
    size = probe_feature_size(adapter.backbone, IMAGE_SIZE)
    assert embed(adapter.backbone, torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (2, size)
