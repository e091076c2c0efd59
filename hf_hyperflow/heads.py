"""The ProtoNet cosine classifier of P>M>F: prototypes, cosine logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["class_prototypes", "cosine_logits", "prototype_logits"]


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of every class.

    Args:
        features: ``Tensor[S, D]``; labels: ``LongTensor[S]`` in ``0..num_classes-1``.

    Returns:
        ``Tensor[num_classes, D]`` (a class without images gets zeros).
    """
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).to(features.dtype)
    return sums / counts[:, None]


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``cos(f_q, p_c)`` for ``features: [..., Q, D]`` and ``prototypes: [..., C, D]`` -> ``[..., Q, C]``."""
    return F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float,
                     bias: torch.Tensor | float) -> torch.Tensor:
    """P>M>F's classifier: ``scale * (cos(f_q, p_c) + bias)``; shapes as :func:`cosine_logits`."""
    return scale * (cosine_logits(features, prototypes) + bias)
