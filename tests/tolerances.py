"""Tolerances for comparing two float computations of the same math, derived from the dtype's precision.

Two paths to the same result (batched or one by one, cached prefix or not, merged weights or LoRA, another
process) round differently: CPU kernels pick blockings and vector widths by batch shape and by instruction set
(AVX2, AVX-512, or none under ``ATEN_CPU_CAPABILITY=default``), so sums run in other orders. Each rounding is at
most ``eps`` (the dtype's machine epsilon) relative to the magnitude of what is summed, and a tiny network composes
a few hundred of them at most. The bound used is therefore

    |actual - expected| <= ROUNDINGS * eps(dtype) * scale

with ``scale`` the largest magnitude among the values compared (or of the intermediates, when the caller knows
they are larger), and ``ROUNDINGS = 2**10``: in float32 about 1.2e-4 of the scale, in float64 about 2.3e-13 of it.
A real error (a task's rows mixed with another's, a delta left out, a wrong weight) moves results by far more
than that: the drift deltas in these tests change features by percents.
"""

from __future__ import annotations

import numpy as np
import torch

ROUNDINGS = 2**10


def float_tolerance(expected, *, scale: float | None = None, roundings: int = ROUNDINGS) -> float:
    """The absolute tolerance for values compared with ``expected`` (a tensor or array)."""
    if isinstance(expected, np.ndarray):
        eps = float(np.finfo(expected.dtype).eps) if np.issubdtype(expected.dtype, np.floating) else 0.0
        largest = float(np.abs(expected).max()) if expected.size else 0.0
    else:
        eps = torch.finfo(expected.dtype).eps if expected.dtype.is_floating_point else 0.0
        largest = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return roundings * eps * max(largest if scale is None else scale, 1e-30)


def assert_same_math(actual, expected, *, scale: float | None = None, roundings: int = ROUNDINGS, msg=None) -> None:
    """``actual`` equals ``expected`` up to the rounding of two float paths (see the module's doc)."""
    atol = float_tolerance(expected, scale=scale, roundings=roundings)
    if isinstance(expected, np.ndarray):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=msg or "")
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg)
