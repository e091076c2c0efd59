"""Labels and images in: label encoding, pixel coercion, the default image processor.

Users give support labels as ints or strings and images as PIL images or a ``pixel_values`` tensor; these
functions turn them into ``LongTensor[S]`` labels in ``0..C-1`` and ``Tensor[B, 3, H, W]`` pixels, with errors
that say what was wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

__all__ = ["encode_labels", "default_image_processor", "to_pixel_values", "check_pair", "processor_size",
           "PixelTransform"]


def encode_labels(labels, classes: Sequence | None = None) -> tuple[torch.Tensor, list]:
    """Map user labels (ints or strings) to ``LongTensor[S]`` in ``0..C-1`` and the list of C classes.

    Without ``classes``, the classes are the sorted distinct labels; integer labels must then be
    ``0..C-1`` (a gap means a class without support images).

    Raises:
        TypeError: labels that are neither all ints nor all strings.
        ValueError: fewer than two classes, a class without support images, a label not in ``classes``.
    """
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.is_floating_point():
            raise TypeError(f"Labels as a tensor must be a 1-D integer tensor, got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}.")
        labels = labels.tolist()
    labels = list(labels)
    if not labels:
        raise ValueError("No support labels were given: a task needs labelled support images.")
    if all(isinstance(y, str) for y in labels):
        kind = str
    elif all(isinstance(y, int) and not isinstance(y, bool) for y in labels) or all(
        hasattr(y, "__index__") and not isinstance(y, (str, bool)) for y in labels
    ):
        kind = int
        labels = [int(y) for y in labels]
    else:
        kinds = sorted({type(y).__name__ for y in labels})
        raise TypeError(f"Labels must be all ints or all strings, got a mix of {kinds}.")
    if classes is None:
        classes = sorted(set(labels))
        if kind is int and classes != list(range(len(classes))):
            missing = sorted(set(range(max(classes) + 1)) - set(classes))
            raise ValueError(
                f"Integer labels must be 0..C-1, but class(es) {missing[:10]} have no support image. Give each class "
                f"at least one support image, or pass classes=[...] to name the classes of the task."
            )
    else:
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes={classes!r} lists a class twice.")
        unknown = sorted({str(y) for y in labels if y not in classes})
        if unknown:
            raise ValueError(f"Labels {unknown[:10]} are not among classes={classes!r}.")
        empty = [c for c in classes if c not in set(labels)]
        if empty:
            raise ValueError(f"Class(es) {empty[:10]} have no support image: every class needs at least one.")
    if len(classes) < 2:
        raise ValueError(f"A task needs at least two classes, got only {classes!r}.")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[y] for y in labels], dtype=torch.long), classes


def default_image_processor(backbone: nn.Module, image_size: int):
    """A ViT image processor (PIL backend: the faster one on CPU for small batches) that resizes to
    ``image_size`` with the backbone's mean / std.

    The mean / std come from the backbone's own image processor when its folder has one, else from timm's
    ``pretrained_cfg``, else ImageNet's. When the backbone's own processor already outputs ``image_size``
    it is used as it is.
    """
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    name = getattr(backbone.config, "_name_or_path", None) or ""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pretrained_cfg = getattr(backbone.config, "pretrained_cfg", None) or {}
    if pretrained_cfg:
        mean, std = pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std)
    if name and os.path.isdir(name):
        try:
            own = AutoImageProcessor.from_pretrained(name, backend="pil")  # the same pixels with or without torchvision
        except (OSError, ValueError):
            own = None
        if own is not None:
            if processor_size(own) == image_size:
                return own
            mean, std = getattr(own, "image_mean", None) or mean, getattr(own, "image_std", None) or std
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                image_std=list(std))


def to_pixel_values(images, image_processor, device=None, dtype=None) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` from a list of PIL images (converted to RGB, then processed) or a pixel tensor.

    Raises:
        TypeError: images of another type.
        ValueError: a tensor of the wrong rank or channel count, or an empty batch.
    """
    if isinstance(images, torch.Tensor):
        pixel_values = images
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be a 4-D tensor [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
                + (" (add the batch axis with .unsqueeze(0))" if pixel_values.dim() == 3 else "") + "."
            )
        if pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have 3 channels on axis 1 ([B, 3, H, W]), got shape {tuple(pixel_values.shape)}."
                " Convert grayscale / RGBA images to RGB first (or pass PIL images)."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor (as image processors return), got {pixel_values.dtype}.")
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images were given.")
        bad = sorted({type(im).__name__ for im in images if not isinstance(im, Image.Image)})
        if bad:
            raise TypeError(f"Images must be PIL images or one pixel_values tensor [B, 3, H, W]; got {bad}.")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixel_values = image_processor(images=rgb, return_tensors="pt")["pixel_values"]
    else:
        raise TypeError(
            f"Images must be a list of PIL images or a pixel_values tensor [B, 3, H, W], got {type(images).__name__}."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("No images were given.")
    return pixel_values.to(device=device, dtype=dtype)


def check_pair(images, labels) -> None:
    """One label per image: ``images`` (a list or a tensor) and ``labels`` must have the same length."""
    n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    n_labels = labels.shape[0] if isinstance(labels, torch.Tensor) else len(labels)
    if n_images != n_labels:
        raise ValueError(f"Got {n_images} support images but {n_labels} labels: give one label per image.")


def processor_size(processor) -> int | None:
    """The output side of an image processor, when it states one."""
    for size in (getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None,
                 getattr(processor, "size", None)):
        if size is None:
            continue
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
        else:  # transformers' SizeDict
            side = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
        if side:
            return int(side)
    data_config = getattr(processor, "data_config", None) or {}
    if data_config.get("input_size"):
        return int(data_config["input_size"][-1])
    return None


class PixelTransform:
    """PIL images -> ``Tensor[B, 3, H, W]`` with an image processor, as a picklable callable (an episode
    sampler's ``image_transform``, run in DataLoader workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images) -> torch.Tensor:
        return to_pixel_values(list(images), self.image_processor)
