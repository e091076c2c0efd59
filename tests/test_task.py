"""AdaptedTask: loading a task onto another backbone is refused."""

from __future__ import annotations

import pytest
from conftest import make_backbone
from conftest import random_pixels as pixels

from hf_hyperflow import AdaptedTask


def test_task_for_another_backbone(adapter, tmp_path):
    adapter.adapt(pixels(4), [0, 1, 0, 1]).save_pretrained(tmp_path / "task")
    with pytest.raises(ValueError, match="task was made for a 'vit' backbone, but the backbone given is a 'dinov2'"):
        AdaptedTask.from_pretrained(make_backbone("dinov2"), tmp_path / "task")
