"""Fixed-step ODE integrators as pure functions.

Each integrator solves ``d state / dt = drift(state, t)`` from ``t0`` to ``t1`` on the uniform grid
``t_k = t0 + k * dt`` with ``dt = (t1 - t0) / steps``, ``k = 0 .. steps``.

The state is generic: anything that supports ``a + b`` and ``a * float`` / ``float * a`` works, e.g. a
``torch.Tensor`` of any shape ``[...]`` or the package's ``TaskState`` (named tensor groups batched over
tasks). ``drift(state, t)`` takes the state and a Python ``float`` time and returns a state-like object of
the same structure (for a tensor: the same shape ``[...]``). The integrators call nothing else on the
state, so they run under ``torch.no_grad()`` (adaptation) and with autograd (unrolled training) alike.

Drift evaluations per step: euler 1, midpoint 2, heun 2, rk4 4 (see ``DRIFT_EVALUATIONS_PER_STEP``);
global error orders 1, 2, 2 and 4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

State = TypeVar("State")
Drift = Callable[[Any, float], Any]
Step = Callable[[Drift, Any, float, float], Any]

__all__ = [
    "DRIFT_EVALUATIONS_PER_STEP",
    "INTEGRATORS",
    "euler",
    "heun",
    "integrate",
    "midpoint",
    "rk4",
]


def _euler_step(drift: Drift, state: Any, t: float, dt: float) -> Any:
    return state + dt * drift(state, t)


def _midpoint_step(drift: Drift, state: Any, t: float, dt: float) -> Any:
    k1 = drift(state, t)
    k2 = drift(state + (0.5 * dt) * k1, t + 0.5 * dt)
    return state + dt * k2


def _heun_step(drift: Drift, state: Any, t: float, dt: float) -> Any:
    k1 = drift(state, t)
    k2 = drift(state + dt * k1, t + dt)
    return state + (0.5 * dt) * k1 + (0.5 * dt) * k2


def _rk4_step(drift: Drift, state: Any, t: float, dt: float) -> Any:
    half = 0.5 * dt
    k1 = drift(state, t)
    k2 = drift(state + half * k1, t + half)
    k3 = drift(state + half * k2, t + half)
    k4 = drift(state + dt * k3, t + dt)
    return state + (dt / 6.0) * k1 + (dt / 3.0) * k2 + (dt / 3.0) * k3 + (dt / 6.0) * k4


def _check_arguments(drift: Any, steps: Any, t0: Any, t1: Any) -> tuple[int, float, float]:
    if not callable(drift):
        raise TypeError(f"drift must be a callable drift(state, t) -> state, got {type(drift).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int >= 1, got {steps!r} of type {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}; pass the number of integration steps to take")
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    return steps, float(t0), float(t1)


def _run(
    step: Step, drift: Drift, state0: State, steps: int, t0: float, t1: float, return_path: bool
) -> State | list[State]:
    steps, t0, t1 = _check_arguments(drift, steps, t0, t1)
    dt = (t1 - t0) / steps
    state = state0
    path = [state0] if return_path else None
    for k in range(steps):
        state = step(drift, state, t0 + k * dt, dt)
        if path is not None:
            path.append(state)
    return path if path is not None else state


def euler(
    drift: Drift, state0: State, steps: int, t0: float = 0.0, t1: float = 1.0, return_path: bool = False
) -> State | list[State]:
    """Explicit Euler: ``s_{k+1} = s_k + dt * drift(s_k, t_k)``. Global error O(dt).

    Args:
        drift: ``drift(state, t: float) -> state-like`` (for tensors: shape ``[...]`` in, ``[...]`` out).
        state0: the state at ``t0`` (tensor ``[...]`` or any object with ``+`` and scalar ``*``).
        steps: number of steps (>= 1).
        t0, t1: start and end time; ``t1 < t0`` integrates backwards.
        return_path: if True, return ``[state_0, ..., state_steps]`` (``steps + 1`` states).

    Returns:
        The state at ``t1`` (same structure as ``state0``), or the list of states on the grid.
    """
    return _run(_euler_step, drift, state0, steps, t0, t1, return_path)


def midpoint(
    drift: Drift, state0: State, steps: int, t0: float = 0.0, t1: float = 1.0, return_path: bool = False
) -> State | list[State]:
    """Explicit midpoint rule (RK2): ``s_{k+1} = s_k + dt * drift(s_k + dt/2 * k1, t_k + dt/2)``.

    Two drift evaluations per step; global error O(dt^2). Arguments and return value as in :func:`euler`.
    """
    return _run(_midpoint_step, drift, state0, steps, t0, t1, return_path)


def heun(
    drift: Drift, state0: State, steps: int, t0: float = 0.0, t1: float = 1.0, return_path: bool = False
) -> State | list[State]:
    """Heun's method (explicit trapezoid): Euler predictor, average of the slopes at both ends.

    Two drift evaluations per step; global error O(dt^2). Arguments and return value as in :func:`euler`.
    """
    return _run(_heun_step, drift, state0, steps, t0, t1, return_path)


def rk4(
    drift: Drift, state0: State, steps: int, t0: float = 0.0, t1: float = 1.0, return_path: bool = False
) -> State | list[State]:
    """Classical fourth-order Runge-Kutta.

    Four drift evaluations per step; global error O(dt^4). Arguments and return value as in :func:`euler`.
    """
    return _run(_rk4_step, drift, state0, steps, t0, t1, return_path)


INTEGRATORS: dict[str, Callable[..., Any]] = {
    "euler": euler,
    "midpoint": midpoint,
    "heun": heun,
    "rk4": rk4,
}

DRIFT_EVALUATIONS_PER_STEP: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def integrate(
    drift: Drift,
    state0: State,
    steps: int,
    method: str = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    return_path: bool = False,
) -> State | list[State]:
    """Integrate ``d state / dt = drift(state, t)`` from ``t0`` to ``t1`` with the named method.

    Args:
        method: one of ``INTEGRATORS`` ("euler", "midpoint", "heun", "rk4").
        Other arguments as in :func:`euler`.

    Returns:
        The state at ``t1``, or ``[state_0, ..., state_steps]`` when ``return_path`` is True.

    Raises:
        ValueError: unknown ``method`` or ``steps < 1``.
    """
    if not isinstance(method, str) or method not in INTEGRATORS:
        raise ValueError(
            f"unknown integration method {method!r}; choose one of {', '.join(sorted(INTEGRATORS))}"
        )
    return INTEGRATORS[method](drift, state0, steps, t0=t0, t1=t1, return_path=return_path)
