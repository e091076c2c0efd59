"""DiffAugment on image tensors (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN
Training", 2020), as P>M>F uses it to turn a support set into pseudo-queries during test-time
fine-tuning.

Images are ``[B, C, H, W]`` floating-point tensors. Operations (each one a pure function of the images and
explicit per-image parameters, so that they can be tested and reused on their own):

- colour: brightness ``x + b`` with ``b ~ U(-0.5, 0.5)``; saturation ``(x - mean_c) * s + mean_c`` with
  the per-pixel mean over channels and ``s ~ U(0, 2)``; contrast ``(x - mean) * c + mean`` with the
  per-image mean and ``c ~ U(0.5, 1.5)``;
- translation: an integer shift of up to ``round(ratio * side)`` pixels along each axis, zero padding;
- flip: a horizontal flip with probability 0.5.

:func:`diff_augment` draws every random number from the ``torch.Generator`` it is given (on the
generator's device, then moved to the images' device), so a seeded generator reproduces the output
exactly, and the draws do not depend on which images end up augmented. Everything is differentiable with
respect to the images and nothing is modified in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "AUGMENT_POLICIES",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "diff_augment",
    "flip_horizontal",
    "translate",
]

AUGMENT_POLICIES: tuple[str, ...] = ("color", "translation", "flip")


def _per_image(values: Tensor, images: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` on the images' device and dtype."""
    return values.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)


def adjust_brightness(images: Tensor, delta: Tensor) -> Tensor:
    """Add ``delta[b]`` to every pixel of image ``b``. images ``[B, C, H, W]``, delta ``[B]``."""
    return images + _per_image(delta, images)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's channels around their mean by ``factor[b]``. images ``[B, C, H, W]``, factor ``[B]``."""
    mean = images.mean(dim=1, keepdim=True)
    return (images - mean) * _per_image(factor, images) + mean


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Scale image ``b`` around its mean over ``C, H, W`` by ``factor[b]``. images ``[B, C, H, W]``, factor ``[B]``."""
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * _per_image(factor, images) + mean


def translate(images: Tensor, shift_y: Tensor, shift_x: Tensor) -> Tensor:
    """Shift image ``b`` down by ``shift_y[b]`` and right by ``shift_x[b]`` pixels, filling with zeros.

    ``out[b, :, i, j] = images[b, :, i - shift_y[b], j - shift_x[b]]`` where that index is inside the
    image, else 0. Negative shifts move up / left.

    Args:
        images: ``[B, C, H, W]``.
        shift_y, shift_x: integer tensors ``[B]``.

    Returns:
        ``[B, C, H, W]``, same dtype and device as ``images``.
    """
    batch, _, height, width = images.shape
    device = images.device
    shift_y = shift_y.to(device=device, dtype=torch.long).view(batch, 1)
    shift_x = shift_x.to(device=device, dtype=torch.long).view(batch, 1)
    rows = torch.arange(height, device=device).view(1, height) - shift_y  # [B, H] source row
    cols = torch.arange(width, device=device).view(1, width) - shift_x  # [B, W] source column
    valid = ((rows >= 0) & (rows < height)).view(batch, 1, height, 1) & ((cols >= 0) & (cols < width)).view(
        batch, 1, 1, width
    )
    rows = rows.clamp(0, height - 1).view(batch, 1, height, 1).expand(-1, images.shape[1], -1, width)
    cols = cols.clamp(0, width - 1).view(batch, 1, 1, width).expand(-1, images.shape[1], height, -1)
    gathered = images.gather(2, rows).gather(3, cols)
    return gathered * valid.to(images.dtype)


def flip_horizontal(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror image ``b`` left-right where ``flip[b]`` is True. images ``[B, C, H, W]``, flip bool ``[B]``."""
    mask = flip.to(device=images.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(-1), images)


def _uniform(generator: torch.Generator, batch: int, low: float, high: float) -> Tensor:
    """``[B]`` float32 draws from ``U(low, high)`` on the generator's device."""
    return torch.rand(batch, generator=generator, device=generator.device) * (high - low) + low


def _color(images: Tensor, generator: torch.Generator, translation_ratio: float) -> Tensor:
    batch = images.shape[0]
    images = adjust_brightness(images, _uniform(generator, batch, -0.5, 0.5))
    images = adjust_saturation(images, _uniform(generator, batch, 0.0, 2.0))
    return adjust_contrast(images, _uniform(generator, batch, 0.5, 1.5))


def _translation(images: Tensor, generator: torch.Generator, translation_ratio: float) -> Tensor:
    batch, _, height, width = images.shape
    max_y, max_x = int(height * translation_ratio + 0.5), int(width * translation_ratio + 0.5)
    shift_y = torch.randint(-max_y, max_y + 1, (batch,), generator=generator, device=generator.device)
    shift_x = torch.randint(-max_x, max_x + 1, (batch,), generator=generator, device=generator.device)
    return translate(images, shift_y, shift_x)


def _flip(images: Tensor, generator: torch.Generator, translation_ratio: float) -> Tensor:
    return flip_horizontal(images, _uniform(generator, images.shape[0], 0.0, 1.0) < 0.5)


_POLICY_FUNCTIONS: dict[str, Callable[[Tensor, torch.Generator, float], Tensor]] = {
    "color": _color,
    "translation": _translation,
    "flip": _flip,
}


def _check_inputs(
    images: object, generator: object, probability: object, policy: object, translation_ratio: object
) -> tuple[str, ...]:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape [B, C, H, W] (rank 4), got shape {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0) for a single image"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point, got dtype {images.dtype}; convert with images.float() "
            "(and normalise to the backbone's range) first"
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            "create one with torch.Generator().manual_seed(seed)"
        )
    if (
        isinstance(probability, bool)
        or not isinstance(probability, int | float)
        or not 0.0 <= probability <= 1.0
    ):
        raise ValueError(f"probability must be a number in [0, 1], got {probability!r}")
    if (
        isinstance(translation_ratio, bool)
        or not isinstance(translation_ratio, int | float)
        or not 0.0 <= translation_ratio <= 1.0
    ):
        raise ValueError(f"translation_ratio must be a number in [0, 1], got {translation_ratio!r}")
    if isinstance(policy, str) or not isinstance(policy, Sequence):
        raise TypeError(
            f"policy must be a tuple of operation names such as ('color', 'translation', 'flip'), got {policy!r}"
        )
    unknown = [name for name in policy if name not in _POLICY_FUNCTIONS]
    if unknown:
        raise ValueError(
            f"unknown augmentation policy name(s) {unknown}; choose from {', '.join(AUGMENT_POLICIES)}"
        )
    return tuple(policy)


def diff_augment(
    images: Tensor,
    generator: torch.Generator,
    probability: float = 0.9,
    policy: tuple[str, ...] = AUGMENT_POLICIES,
    translation_ratio: float = 0.125,
) -> Tensor:
    """Augment each image, independently, with probability ``probability``.

    The operations of ``policy`` run in the given order on the images chosen for augmentation; the
    others are returned unchanged.

    Args:
        images: ``[B, C, H, W]`` floating-point images (any normalisation; the colour ranges are those of
            DiffAugment).
        generator: the source of all randomness (CPU or the images' device).
        probability: chance that an image is augmented, in ``[0, 1]``.
        policy: names from ``AUGMENT_POLICIES``: "color", "translation", "flip".
        translation_ratio: the largest shift as a fraction of the side, in ``[0, 1]``.

    Returns:
        ``[B, C, H, W]``, same dtype and device; differentiable with respect to ``images``.

    Raises:
        TypeError / ValueError: for a wrong rank or dtype, a probability or ratio outside ``[0, 1]``,
        or an unknown policy name.
    """
    policy = _check_inputs(images, generator, probability, policy, translation_ratio)
    apply = torch.rand(images.shape[0], generator=generator, device=generator.device) < probability
    augmented = images
    for name in policy:
        augmented = _POLICY_FUNCTIONS[name](augmented, generator, float(translation_ratio))
    mask = apply.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, augmented, images)
