"""AdaptedTask: loading a task onto another backbone is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone, randomize_drift

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig


@pytest.fixture(scope="module")
def adapter():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=2))
    randomize_drift(adapter)
    return adapter


def pixels(n=4):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(n))


def test_task_for_another_backbone(adapter, tmp_path):
    adapter.adapt(pixels(4), [0, 1, 0, 1]).save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="task was made for a 'vit' backbone, but the backbone given is a 'dinov2'"):
        AdaptedTask.from_pretrained(make_backbone("dinov2"), tmp_path / "task")
