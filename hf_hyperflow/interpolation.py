"""Continuous paths through stored fine-tuning trajectories.

A trajectory is ``K + 1`` snapshots ``theta_0 .. theta_K`` of a flattened adapted state (``D`` numbers)
at knot times ``0 = t_0 < t_1 < ... < t_K = 1`` (uniform ``t_k = k / K`` unless given). A batch of ``B``
trajectories is a tensor ``[B, K + 1, D]``. :func:`interpolate` turns it into a :class:`TrajectoryPath`
whose ``position(t)`` and ``velocity(t)`` are the regression inputs and targets of flow matching.

Kinds:

- ``"linear"``: the straight line ``theta_0 + t (theta_K - theta_0)``; constant velocity
  ``theta_K - theta_0`` (intermediate snapshots are ignored).
- ``"piecewise"``: piecewise linear through every snapshot; on ``[t_k, t_{k+1})`` the velocity is
  ``(theta_{k+1} - theta_k) / (t_{k+1} - t_k)`` (at ``t = 1``, the last segment's).
- ``"cubic"``: the natural cubic spline through every snapshot (second derivative zero at ``t = 0`` and
  ``t = 1``), with continuous velocity. Its knot second derivatives come from a tridiagonal system solved
  once by the Thomas algorithm (diagonally dominant, so stable without pivoting), batched over ``B`` and
  ``D``: ``O(K B D)`` time and memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["INTERPOLATION_KINDS", "TrajectoryPath", "interpolate"]

INTERPOLATION_KINDS: tuple[str, ...] = ("linear", "piecewise", "cubic")


def _natural_spline_second_derivatives(snapshots: Tensor, times: Tensor) -> Tensor:
    """Knot second derivatives ``M`` of the natural cubic spline.

    Solves, for ``k = 1 .. K-1``,
    ``h_{k-1} M_{k-1} + 2 (h_{k-1} + h_k) M_k + h_k M_{k+1} = 6 (s_k - s_{k-1})`` with ``M_0 = M_K = 0``,
    ``h_k = t_{k+1} - t_k`` and slopes ``s_k = (theta_{k+1} - theta_k) / h_k``.

    Args:
        snapshots: ``[B, K + 1, D]``.
        times: ``[K + 1]``, same dtype and device.

    Returns:
        ``[B, K + 1, D]``.
    """
    num_knots = snapshots.shape[1]
    if num_knots < 3:
        return torch.zeros_like(snapshots)  # two knots: the spline is the straight line
    # The coefficients depend on the knot times only: Python floats, so that autograd saves no tensors.
    h = (times[1:] - times[:-1]).tolist()  # [K]

    def rhs(k: int) -> Tensor:  # row k = 1 .. K-1 of the right-hand side, [B, D]
        ahead = (snapshots[:, k + 1] - snapshots[:, k]) / h[k]
        behind = (snapshots[:, k] - snapshots[:, k - 1]) / h[k - 1]
        return 6.0 * (ahead - behind)

    # Forward sweep of the Thomas algorithm over rows k = 1 .. K-1: c'_k (shared) and d'_k ([B, D]).
    c_prime: list[float] = []
    d_prime: list[Tensor] = []
    for k in range(1, num_knots - 1):
        lower, diag, upper = h[k - 1], 2.0 * (h[k - 1] + h[k]), h[k]
        if k == 1:
            denominator = diag
            d_prime.append(rhs(k) / denominator)
        else:
            denominator = diag - lower * c_prime[-1]
            d_prime.append((rhs(k) - lower * d_prime[-1]) / denominator)
        c_prime.append(upper / denominator)
    # Back substitution, M_{K-1} .. M_1, freeing d' as it goes.
    second = [torch.zeros_like(snapshots[:, 0])]  # M_K = 0
    for k in range(num_knots - 2, 0, -1):
        second.append(d_prime.pop() - c_prime[k - 1] * second[-1])
    second.append(torch.zeros_like(snapshots[:, 0]))  # M_0 = 0
    return torch.stack(second[::-1], dim=1)


class TrajectoryPath:
    """A batch of ``B`` continuous paths on ``[0, 1]`` through ``D``-dimensional snapshots.

    Build it with :func:`interpolate`. Row ``b`` of every query evaluates trajectory ``b``.

    Attributes:
        kind: "linear", "piecewise" or "cubic".
        snapshots: ``[B, K + 1, D]``.
        times: ``[K + 1]`` knot times, from 0 to 1.
    """

    def __init__(self, snapshots: Tensor, times: Tensor, kind: str) -> None:
        self.kind = kind
        self.snapshots = snapshots
        self.times = times
        self._second = _natural_spline_second_derivatives(snapshots, times) if kind == "cubic" else None

    @property
    def batch_size(self) -> int:
        return self.snapshots.shape[0]

    @property
    def num_snapshots(self) -> int:
        return self.snapshots.shape[1]

    @property
    def dim(self) -> int:
        return self.snapshots.shape[2]

    def __repr__(self) -> str:
        return (
            f"TrajectoryPath(kind={self.kind!r}, batch_size={self.batch_size}, "
            f"num_snapshots={self.num_snapshots}, dim={self.dim})"
        )

    def _check_t(self, t: Tensor | float) -> Tensor:
        """``t``: ``[B]`` (or a number / 0-d tensor used for every row) -> ``[B]`` in the snapshots' dtype."""
        if isinstance(t, bool) or not isinstance(t, Tensor | int | float):
            raise TypeError(f"t must be a tensor of shape [B] = [{self.batch_size}], got {type(t).__name__}")
        t = torch.as_tensor(t, dtype=self.snapshots.dtype, device=self.snapshots.device)
        if t.ndim == 0:
            t = t.expand(self.batch_size)
        if t.shape != (self.batch_size,):
            raise ValueError(
                f"t must have shape [B] = [{self.batch_size}] (one time per trajectory), got {tuple(t.shape)}"
            )
        if not bool(((t >= 0) & (t <= 1)).all()):
            bad = t[~((t >= 0) & (t <= 1))]
            raise ValueError(f"t must lie in [0, 1], got values {bad[:5].tolist()}")
        return t

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Segment index ``k`` with ``t_k <= t <= t_{k+1}`` and its endpoints, for each row.

        Returns ``k`` ``[B]`` (long), ``t_k``, ``h_k`` ``[B, 1]`` and ``theta_k``, ``theta_{k+1}`` ``[B, D]``.
        """
        k = torch.searchsorted(self.times, t.contiguous(), right=True) - 1
        k = k.clamp(0, self.num_snapshots - 2)
        rows = torch.arange(self.batch_size, device=t.device)
        start = self.times[k].unsqueeze(1)
        width = (self.times[k + 1] - self.times[k]).unsqueeze(1)
        return k, start, width, self.snapshots[rows, k], self.snapshots[rows, k + 1]

    def position(self, t: Tensor | float) -> Tensor:
        """The state on each path at its time. t: ``[B]`` in ``[0, 1]`` -> ``[B, D]``."""
        t = self._check_t(t)
        if self.kind == "linear":
            return self.snapshots[:, 0] + t.unsqueeze(1) * (self.snapshots[:, -1] - self.snapshots[:, 0])
        k, start, width, left, right = self._segment(t)
        u = t.unsqueeze(1) - start  # time since the left knot, [B, 1]
        if self.kind == "piecewise":
            return left + (u / width) * (right - left)
        rows = torch.arange(self.batch_size, device=t.device)
        m_left, m_right = self._second[rows, k], self._second[rows, k + 1]
        v = width - u  # time to the right knot
        return (
            m_left * v**3 / (6 * width)
            + m_right * u**3 / (6 * width)
            + (left / width - m_left * width / 6) * v
            + (right / width - m_right * width / 6) * u
        )

    def velocity(self, t: Tensor | float) -> Tensor:
        """d position / dt on each path at its time. t: ``[B]`` in ``[0, 1]`` -> ``[B, D]``."""
        t = self._check_t(t)
        if self.kind == "linear":
            return self.snapshots[:, -1] - self.snapshots[:, 0]
        k, start, width, left, right = self._segment(t)
        if self.kind == "piecewise":
            return (right - left) / width
        u = t.unsqueeze(1) - start
        rows = torch.arange(self.batch_size, device=t.device)
        m_left, m_right = self._second[rows, k], self._second[rows, k + 1]
        v = width - u
        return (
            -m_left * v**2 / (2 * width)
            + m_right * u**2 / (2 * width)
            + (right - left) / width
            - (m_right - m_left) * width / 6
        )


def interpolate(snapshots: Tensor, kind: str = "linear", times: Tensor | None = None) -> TrajectoryPath:
    """A continuous path through each trajectory of snapshots.

    Args:
        snapshots: ``[B, K + 1, D]`` floating point, ``K + 1 >= 2`` snapshots per trajectory.
        kind: "linear", "piecewise" or "cubic" (see the module docstring).
        times: ``[K + 1]`` strictly increasing knot times from 0 to 1; default ``k / K``.

    Returns:
        A :class:`TrajectoryPath` with ``position(t)`` and ``velocity(t)``, ``t`` of shape ``[B]``.

    Raises:
        TypeError / ValueError: for a wrong rank, dtype, too few snapshots, bad times or unknown kind.
    """
    if not isinstance(kind, str) or kind not in INTERPOLATION_KINDS:
        raise ValueError(
            f"unknown interpolation kind {kind!r}; choose one of {', '.join(INTERPOLATION_KINDS)}"
        )
    if not isinstance(snapshots, Tensor):
        raise TypeError(f"snapshots must be a torch.Tensor [B, K+1, D], got {type(snapshots).__name__}")
    if snapshots.ndim != 3:
        raise ValueError(
            f"snapshots must have shape [B, K+1, D] (rank 3), got shape {tuple(snapshots.shape)}; "
            "for a single trajectory use snapshots.unsqueeze(0), and flatten the state to D numbers"
        )
    if not snapshots.is_floating_point():
        raise TypeError(f"snapshots must be floating point, got dtype {snapshots.dtype}")
    if snapshots.shape[1] < 2:
        raise ValueError(
            f"a path needs at least 2 snapshots (K+1 >= 2) per trajectory, got {snapshots.shape[1]} "
            f"in snapshots of shape {tuple(snapshots.shape)}"
        )
    num_knots = snapshots.shape[1]
    if times is None:
        times = torch.arange(num_knots, dtype=snapshots.dtype, device=snapshots.device) / (num_knots - 1)
    else:
        if not isinstance(times, Tensor):
            raise TypeError(f"times must be a torch.Tensor [K+1] or None, got {type(times).__name__}")
        if times.shape != (num_knots,):
            raise ValueError(
                f"times must have shape [K+1] = [{num_knots}] to match the snapshots, got {tuple(times.shape)}"
            )
        times = times.to(dtype=snapshots.dtype, device=snapshots.device)
        if not bool((times[1:] > times[:-1]).all()):
            raise ValueError(f"times must be strictly increasing, got {times.tolist()}")
        if not math.isclose(times[0].item(), 0.0, abs_tol=1e-12) or not math.isclose(
            times[-1].item(), 1.0, abs_tol=1e-12
        ):
            raise ValueError(
                f"times must start at 0 and end at 1, got {times[0].item()} .. {times[-1].item()}; "
                "rescale them, e.g. times / times[-1] for step counts"
            )
        times = times.clone()
        times[0], times[-1] = 0.0, 1.0
    return TrajectoryPath(snapshots, times, kind)
