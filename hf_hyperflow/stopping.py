"""Do no harm: how far to integrate the drift, chosen per task from forward passes only.

Along the integration path theta_0 (direct transfer), ..., theta_K the support set itself tells which
point classifies best. At each candidate point every support image is classified against class prototypes
computed without it (leave-one-out) from the features at that point (plus that point's head shift); the
point with the lowest mean cross-entropy wins, ties going to the earlier point, so that direct transfer is
kept when adapting does not help. Images whose class has a single support image have no leave-one-out
prototype and do not count; a task where every class has one image cannot be judged this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .heads import prototype_logits

__all__ = ["any_task_judged", "candidate_steps", "choose_point", "leave_one_out_logits", "leave_one_out_loss"]


def candidate_steps(steps: int, points: int) -> list[int]:
    """``points`` step indices evenly spread over ``0..steps``, always with 0 and ``steps`` (fewer when
    ``steps + 1 < points``), increasing.

    >>> candidate_steps(8, 3)
    [0, 4, 8]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2 (theta_0 and the end of the path), got {points!r}.")
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


def leave_one_out_logits(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         head_shift: torch.Tensor | None, scale: torch.Tensor | float,
                         bias: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Logits of each support image against the prototypes of the others.

    The prototype of an image's own class is the mean of the other images of that class; the other classes'
    prototypes are their full means; ``head_shift`` (if any) is added to every prototype, as the adapted
    classifier does.

    Args:
        features: ``Tensor[S, D]``, the support features at one point of the path.
        labels: ``LongTensor[S]`` in ``0..num_classes-1``, every class present.
        num_classes: C.
        head_shift: ``Tensor[C, D]`` or None.
        scale, bias: the cosine classifier's scale and bias.

    Returns:
        ``(logits Tensor[S', C], labels LongTensor[S'])`` of the S' images whose class has two or more support
        images, or None when no class has.
    """
    features = features.float()
    counts = torch.bincount(labels, minlength=num_classes).to(features.dtype)  # [C]
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counted = counts[labels] >= 2  # [S]
    if not bool(counted.any()):
        return None
    features, labels = features[counted], labels[counted]
    prototypes = (sums / counts[:, None]).expand(features.shape[0], -1, -1).clone()  # [S', C, D]
    rows = torch.arange(features.shape[0], device=features.device)
    prototypes[rows, labels] = (sums[labels] - features) / (counts[labels, None] - 1)
    if head_shift is not None:
        prototypes = prototypes + head_shift.float()[None]
    return prototype_logits(features[:, None], prototypes, scale, bias)[:, 0], labels


def leave_one_out_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       head_shift: torch.Tensor | None, scale: torch.Tensor | float,
                       bias: torch.Tensor | float) -> torch.Tensor | None:
    """Mean cross-entropy of :func:`leave_one_out_logits` (same arguments): a 0-d tensor, or None when no class
    has two or more support images."""
    judged = leave_one_out_logits(features, labels, num_classes, head_shift, scale, bias)
    return None if judged is None else F.cross_entropy(*judged)


def any_task_judged(labels: torch.Tensor, sizes: list[int]) -> bool:
    """Whether the rule can judge any of T tasks: some task's support (``labels: LongTensor[N]`` split by ``sizes``)
    has a class of two or more images (else :func:`leave_one_out_loss` is None for every task and every point)."""
    return any(bool((torch.bincount(y) >= 2).any()) for y in labels.split(sizes) if y.numel())


def choose_point(losses: list[torch.Tensor]) -> int:
    """Index of the smallest of the candidate points' losses, the earliest on ties."""
    if not losses:
        raise ValueError("choose_point needs the loss of at least one point.")
    values = [float(v) for v in losses]
    return min(range(len(values)), key=lambda i: (values[i], i))
