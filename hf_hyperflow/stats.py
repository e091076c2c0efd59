"""Summary statistics for episodic evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["mean_confidence_interval", "paired_difference"]


def mean_confidence_interval(values: Sequence[float] | np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Mean and half width of the normal-approximation confidence interval of the mean.

    The half width is ``z * std / sqrt(n)`` with the population standard deviation (``np.std``,
    ``ddof=0``), as in the Meta-Dataset evaluation code; ``z = 1.96`` gives the usual 95% interval
    reported as ``mean +- half_width``.

    Args:
        values: ``[n]`` finite numbers, e.g. one accuracy per episode (a 1-D sequence, array or CPU tensor).
        z: the normal quantile, ``>= 0``.

    Returns:
        ``(mean, half_width)`` as Python floats; ``half_width`` is 0.0 for a single value.

    Raises:
        ValueError: no values, values that are not 1-D or not finite, or a negative / non-finite ``z``.
    """
    if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z) or z < 0:
        raise ValueError(f"z must be a finite number >= 0 (1.96 for a 95% interval), got {z!r}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"values must be a 1-D sequence of numbers, got {type(values).__name__}: {error}"
        ) from None
    if array.ndim != 1:
        raise ValueError(f"values must be 1-D (one number per episode), got shape {array.shape}")
    if array.size < 1:
        raise ValueError("values is empty: a confidence interval needs at least one value")
    if not np.isfinite(array).all():
        raise ValueError(f"values must all be finite, got {array[~np.isfinite(array)][:5].tolist()}")
    n = array.size
    return float(array.mean()), float(z * array.std() / math.sqrt(n))


def paired_difference(values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      z: float = 1.96) -> tuple[float, float]:
    """Mean and CI half width of ``values[i] - baseline[i]`` over paired episodes.

    Both methods ran on the same seeded episodes, so the per-episode difference removes the variance that
    comes from how hard each episode is; its interval is much narrower than the difference of two
    independent intervals.

    Args:
        values, baseline: ``[n]`` numbers, one per episode, the same episodes in the same order.
        z: the normal quantile (1.96 for 95%).

    Returns:
        ``(mean_difference, half_width)`` as Python floats.

    Raises:
        ValueError: the two have different lengths, or (via :func:`mean_confidence_interval`) are empty,
            not 1-D or not finite.
    """
    a = np.asarray(values, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same episodes: got shapes {a.shape} and {b.shape}")
    return mean_confidence_interval(a - b, z=z)
