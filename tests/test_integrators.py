import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hf_hyperflow.integrators import (
    DRIFT_EVALUATIONS_PER_STEP,
    INTEGRATORS,
    euler,
    heun,
    integrate,
    midpoint,
    rk4,
)

EXPECTED_ORDER = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}
STEP_COUNTS = (8, 16, 32)


def _decay(y, t):
    return -y


def _logistic(y, t):
    return y * (1.0 - y)


def _logistic_exact(y0, t):
    return 1.0 / (1.0 + (1.0 / y0 - 1.0) * math.exp(-t))


def _time_dependent(y, t):
    # dy/dt = t y  =>  y(t1) = y(t0) exp((t1^2 - t0^2) / 2); sensitive to the times the drift is called at.
    return t * y


def _observed_order(errors, step_counts=STEP_COUNTS):
    slope = np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    return -slope


CASES = {
    "decay": (
        _decay,
        torch.tensor([1.0, -2.0], dtype=torch.float64),
        0.0,
        1.0,
        lambda y0, t1: y0 * math.exp(-t1),
    ),
    "logistic": (
        _logistic,
        torch.tensor([0.1, 0.6], dtype=torch.float64),
        0.0,
        2.0,
        lambda y0, t1: torch.tensor([_logistic_exact(v, t1) for v in y0.tolist()], dtype=torch.float64),
    ),
    "time_dependent": (
        _time_dependent,
        torch.tensor([1.0, 3.0], dtype=torch.float64),
        0.2,
        1.0,
        lambda y0, t1: y0 * math.exp(0.5 * (t1**2 - 0.2**2)),
    ),
}


@pytest.mark.parametrize("method", sorted(INTEGRATORS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_observed_convergence_order(method, case):
    drift, y0, t0, t1, exact = CASES[case]
    target = exact(y0, t1)
    errors = []
    for steps in STEP_COUNTS:
        y = integrate(drift, y0, steps, method=method, t0=t0, t1=t1)
        errors.append((y - target).abs().max().item())
    assert all(e > 0 for e in errors)
    assert errors[0] > errors[1] > errors[2]
    assert _observed_order(errors) == pytest.approx(EXPECTED_ORDER[method], abs=0.3)


def test_euler_single_step_known_value():
    y = euler(_decay, torch.tensor([2.0], dtype=torch.float64), 1)
    assert y.item() == 0.0  # 2 + 1 * (-2)
    y = euler(_decay, torch.tensor([1.0], dtype=torch.float64), 2)
    assert y.item() == 0.25  # (1 - 1/2)^2


def test_rk4_is_exact_for_cubic_in_time():
    # dy/dt = 3 t^2 => y = t^3; RK4 reduces to Simpson's rule, exact for cubics.
    y = rk4(lambda y, t: torch.full_like(y, 3.0 * t * t), torch.zeros(1, dtype=torch.float64), 3)
    assert y.item() == pytest.approx(1.0, abs=1e-15)


def test_heun_and_midpoint_exact_for_linear_in_time():
    for fn in (heun, midpoint):
        y = fn(
            lambda y, t: torch.full_like(y, 2.0 * t), torch.zeros(1, dtype=torch.float64), 5, t0=1.0, t1=3.0
        )
        assert y.item() == pytest.approx(8.0, abs=1e-14)  # 3^2 - 1^2


@pytest.mark.parametrize("method", sorted(INTEGRATORS))
def test_return_path_and_time_grid(method):
    times = []

    def drift(y, t):
        times.append(t)
        return -y

    y0 = torch.ones(3, dtype=torch.float64)
    path = integrate(drift, y0, 4, method=method, t0=0.2, t1=1.0, return_path=True)
    assert isinstance(path, list) and len(path) == 5
    assert path[0] is y0
    final = integrate(_decay, y0, 4, method=method, t0=0.2, t1=1.0)
    torch.testing.assert_close(path[-1], final, rtol=0, atol=0)
    assert len(times) == 4 * DRIFT_EVALUATIONS_PER_STEP[method]
    # the first evaluation of every step is at the grid time t_k = t0 + k * dt
    per_step = DRIFT_EVALUATIONS_PER_STEP[method]
    grid = [times[k * per_step] for k in range(4)]
    assert grid == pytest.approx([0.2, 0.4, 0.6, 0.8], abs=1e-15)
    assert min(times) == pytest.approx(0.2) and max(times) <= 1.0 + 1e-15


def test_drift_evaluation_counts_table():
    assert DRIFT_EVALUATIONS_PER_STEP == {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    assert set(INTEGRATORS) == set(DRIFT_EVALUATIONS_PER_STEP)
    assert INTEGRATORS["rk4"] is rk4 and INTEGRATORS["euler"] is euler


def test_backward_integration_inverts_forward():
    y0 = torch.tensor([0.3], dtype=torch.float64)
    forward = rk4(_logistic, y0, 32, t0=0.0, t1=1.0)
    back = rk4(_logistic, forward, 32, t0=1.0, t1=0.0)
    torch.testing.assert_close(back, y0, rtol=0, atol=1e-9)


def test_integrators_keep_autograd_graph():
    scale = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = rk4(lambda y, t: scale * y, torch.ones(1, dtype=torch.float64), 16)
    y.sum().backward()
    # y(1) = exp(scale) => dy/dscale = exp(0.5)
    assert scale.grad.item() == pytest.approx(math.exp(0.5), rel=1e-6)


@dataclass
class _Pair:
    """A minimal structured state: position and velocity tensors."""

    x: torch.Tensor
    v: torch.Tensor

    def __add__(self, other):
        return _Pair(self.x + other.x, self.v + other.v)

    def __mul__(self, scalar):
        return _Pair(self.x * scalar, self.v * scalar)

    __rmul__ = __mul__


@pytest.mark.parametrize("method", sorted(INTEGRATORS))
def test_structured_state_matches_tensor_state(method):
    # harmonic oscillator x' = v, v' = -x
    def pair_drift(s, t):
        return _Pair(s.v, -s.x)

    def tensor_drift(s, t):
        return torch.stack([s[1], -s[0]])

    x0, v0 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = integrate(pair_drift, _Pair(x0, v0), 10, method=method)
    ref = integrate(tensor_drift, torch.stack([x0, v0]), 10, method=method)
    assert isinstance(out, _Pair)
    torch.testing.assert_close(out.x, ref[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(out.v, ref[1], rtol=0, atol=1e-15)
    if method == "rk4":
        exact_x = x0 * math.cos(1.0) + v0 * math.sin(1.0)
        torch.testing.assert_close(out.x, exact_x, rtol=0, atol=1e-5)
    path = integrate(pair_drift, _Pair(x0, v0), 3, method=method, return_path=True)
    assert len(path) == 4 and all(isinstance(p, _Pair) for p in path)


def test_unknown_method_lists_choices():
    with pytest.raises(
        ValueError, match=r"unknown integration method 'rk5'; choose one of euler, heun, midpoint, rk4"
    ):
        integrate(_decay, torch.ones(1), 4, method="rk5")


@pytest.mark.parametrize("fn", [euler, midpoint, heun, rk4])
def test_invalid_steps(fn):
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        fn(_decay, torch.ones(1), 0)
    with pytest.raises(ValueError, match=r"steps must be >= 1, got -3"):
        integrate(_decay, torch.ones(1), -3, method="heun")
    with pytest.raises(TypeError, match=r"steps must be an int >= 1, got 2.5"):
        fn(_decay, torch.ones(1), 2.5)
    with pytest.raises(TypeError, match=r"steps must be an int >= 1, got True"):
        fn(_decay, torch.ones(1), True)


def test_invalid_drift_and_times():
    with pytest.raises(TypeError, match=r"drift must be a callable"):
        euler(torch.ones(1), torch.ones(1), 2)
    with pytest.raises(ValueError, match=r"t1 must be finite, got inf"):
        euler(_decay, torch.ones(1), 2, t1=float("inf"))
    with pytest.raises(TypeError, match=r"t0 must be a real number"):
        euler(_decay, torch.ones(1), 2, t0="0")
