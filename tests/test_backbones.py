"""backbones: how many images a forward pass of the frozen backbone takes."""

from __future__ import annotations

import torch

from hf_hyperflow.backbones import CPU_LATE_PASS_IMAGES, CPU_PASS_SIDES, images_per_pass


def test_images_per_pass_on_cpu_and_accelerators():
    cpu = torch.device("cpu")
    assert images_per_pass(64, cpu) == CPU_PASS_SIDES // 64 == 8
    assert images_per_pass(128, cpu) == 4
    assert images_per_pass(4 * CPU_PASS_SIDES, cpu) == 1  # never zero
    assert images_per_pass(64, cpu, late=True) == images_per_pass(128, cpu, late=True) == CPU_LATE_PASS_IMAGES
    assert images_per_pass(16, cpu, late=True) == CPU_PASS_SIDES // 16 > CPU_LATE_PASS_IMAGES  # never below early
    assert images_per_pass(224, torch.device("cuda")) is None  # all at once on an accelerator
    assert images_per_pass(224, torch.device("cuda"), late=True) is None
