import math

import numpy as np
import pytest
import torch
from scipy.interpolate import CubicSpline

from hf_hyperflow.interpolation import INTERPOLATION_KINDS, TrajectoryPath, interpolate

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _nonuniform_times(num_knots, seed=0):
    inner = torch.sort(torch.rand(num_knots - 2, generator=_gen(seed), dtype=F64)).values
    return torch.cat([torch.zeros(1, dtype=F64), inner, torch.ones(1, dtype=F64)])


def _repeat(values, batch):
    """``[K+1]`` samples of one scalar function -> ``[batch, K+1, 1]``."""
    return values.view(1, -1, 1).expand(batch, -1, 1).contiguous()


def _slope(step_counts, errors):
    return -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]


@pytest.mark.parametrize("kind", INTERPOLATION_KINDS)
@pytest.mark.parametrize("uniform", [True, False])
def test_linear_data_reproduced_exactly(kind, uniform):
    batch, num_knots, dim = 4, 6, 5
    times = None if uniform else _nonuniform_times(num_knots, seed=1)
    knots = torch.arange(num_knots, dtype=F64) / (num_knots - 1) if uniform else times
    start = torch.randn(batch, 1, dim, generator=_gen(2), dtype=F64)
    slope = torch.randn(batch, 1, dim, generator=_gen(3), dtype=F64)
    snapshots = start + knots.view(1, -1, 1) * slope
    path = interpolate(snapshots, kind, times)
    t = torch.tensor([0.0, 0.13, 0.77, 1.0], dtype=F64)
    torch.testing.assert_close(
        path.position(t), start[:, 0] + t.view(-1, 1) * slope[:, 0], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(path.velocity(t), slope[:, 0], rtol=0, atol=1e-11)


@pytest.mark.parametrize("kind", ["piecewise", "cubic"])
@pytest.mark.parametrize("uniform", [True, False])
def test_knots_are_hit(kind, uniform):
    num_knots = 7
    times = None if uniform else _nonuniform_times(num_knots, seed=4)
    snapshots = torch.randn(num_knots, num_knots, 3, generator=_gen(5), dtype=F64)
    path = interpolate(snapshots, kind, times)
    knots = path.times  # row b asks for knot b
    torch.testing.assert_close(
        path.position(knots), snapshots[torch.arange(num_knots), torch.arange(num_knots)], rtol=0, atol=1e-12
    )


def test_default_times_are_uniform():
    path = interpolate(torch.zeros(1, 5, 2))
    torch.testing.assert_close(path.times, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_linear_kind_ignores_intermediate_snapshots():
    snapshots = torch.tensor([[[0.0, 1.0], [5.0, -5.0], [2.0, 3.0]]], dtype=F64)  # [1, 3, 2]
    path = interpolate(snapshots, "linear")
    torch.testing.assert_close(
        path.position(torch.tensor([0.5], dtype=F64)), torch.tensor([[1.0, 2.0]], dtype=F64)
    )
    for t in (0.0, 0.3, 1.0):
        torch.testing.assert_close(
            path.velocity(torch.tensor([t], dtype=F64)), torch.tensor([[2.0, 2.0]], dtype=F64)
        )


def test_piecewise_known_values():
    snapshots = torch.tensor([[[0.0], [2.0], [1.0]]], dtype=F64).expand(5, 3, 1)
    path = interpolate(snapshots, "piecewise")
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
    assert path.position(t)[:, 0].tolist() == [0.0, 1.0, 2.0, 1.5, 1.0]
    # on [t_k, t_{k+1}) the slope of that segment; at t = 1 the last segment's
    assert path.velocity(t)[:, 0].tolist() == [4.0, 4.0, -2.0, -2.0, -2.0]


def test_cubic_matches_scipy_natural_spline():
    batch, num_knots, dim = 3, 9, 4
    times = _nonuniform_times(num_knots, seed=6)
    snapshots = torch.randn(batch, num_knots, dim, generator=_gen(7), dtype=F64)
    path = interpolate(snapshots, "cubic", times)
    reference = CubicSpline(times.numpy(), snapshots.numpy(), axis=1, bc_type="natural")
    for t in (torch.rand(batch, generator=_gen(8), dtype=F64), torch.tensor([0.0, 1.0, 0.5], dtype=F64)):
        expected_position = np.stack([reference(t[b].item())[b] for b in range(batch)])
        expected_velocity = np.stack([reference(t[b].item(), 1)[b] for b in range(batch)])
        np.testing.assert_allclose(path.position(t).numpy(), expected_position, rtol=0, atol=1e-12)
        np.testing.assert_allclose(path.velocity(t).numpy(), expected_velocity, rtol=0, atol=1e-10)


def test_cubic_second_derivative_is_zero_at_the_ends():
    snapshots = torch.randn(2, 6, 3, generator=_gen(9), dtype=F64) * 3
    path = interpolate(snapshots, "cubic")

    def second_derivative(t, eps):
        # the velocity is quadratic on a segment: Richardson on one-sided differences is exact there
        def one_sided(step):
            moved = path.velocity(torch.full((2,), t + step, dtype=F64))
            return (moved - path.velocity(torch.full((2,), t, dtype=F64))) / step

        return 2 * one_sided(eps) - one_sided(2 * eps)

    assert second_derivative(0.0, 1e-3).abs().max().item() < 1e-8
    assert second_derivative(1.0, -1e-3).abs().max().item() < 1e-8
    # while in the interior it is not zero: the checks above can fail
    assert second_derivative(0.5, 1e-3).abs().max().item() > 1.0


@pytest.mark.parametrize("kind", INTERPOLATION_KINDS)
def test_velocity_matches_central_differences(kind):
    num_knots = 6
    snapshots = torch.randn(4, num_knots, 3, generator=_gen(10), dtype=F64)
    times = _nonuniform_times(num_knots, seed=11)
    path = interpolate(snapshots, kind, times)
    # points away from the knots (piecewise velocity jumps there)
    t = (times[:-1] + times[1:])[:4] / 2
    eps = 1e-6
    finite = (path.position(t + eps) - path.position(t - eps)) / (2 * eps)
    torch.testing.assert_close(path.velocity(t), finite, rtol=0, atol=1e-6)


def test_cubic_converges_at_fourth_order():
    # f(t) = sin(pi t) + 0.5 sin(2 pi t) + t has f''(0) = f''(1) = 0, the natural end condition, so the natural
    # spline converges at O(h^4) in position and O(h^3) in velocity on all of [0, 1].
    def f(t):
        return torch.sin(math.pi * t) + 0.5 * torch.sin(2 * math.pi * t) + t

    def df(t):
        return math.pi * torch.cos(math.pi * t) + math.pi * torch.cos(2 * math.pi * t) + 1

    t = torch.linspace(0, 1, 513, dtype=F64)
    step_counts = (8, 16, 32)
    position_errors, velocity_errors = [], []
    for steps in step_counts:
        knots = torch.arange(steps + 1, dtype=F64) / steps
        path = interpolate(_repeat(f(knots), t.numel()), "cubic")
        position_errors.append((path.position(t)[:, 0] - f(t)).abs().max().item())
        velocity_errors.append((path.velocity(t)[:, 0] - df(t)).abs().max().item())
    assert _slope(step_counts, position_errors) == pytest.approx(4.0, abs=0.3)
    assert _slope(step_counts, velocity_errors) == pytest.approx(3.0, abs=0.3)
    assert position_errors[-1] < 1e-5


def test_cubic_natural_end_condition_limits_order_for_sin():
    # sin(t) has sin''(1) != 0: the natural end condition costs O(h^2) near t = 1, while the error in the
    # interior (away from the ends by several knots) is far smaller.
    whole = torch.linspace(0.0, 1.0, 513, dtype=F64)
    interior = torch.linspace(0.25, 0.75, 513, dtype=F64)
    step_counts = (8, 16, 32)
    whole_errors, interior_errors = [], []
    for steps in step_counts:
        knots = torch.arange(steps + 1, dtype=F64) / steps
        path = interpolate(_repeat(torch.sin(knots), 513), "cubic")
        whole_errors.append((path.position(whole)[:, 0] - torch.sin(whole)).abs().max().item())
        interior_errors.append((path.position(interior)[:, 0] - torch.sin(interior)).abs().max().item())
    assert _slope(step_counts, whole_errors) == pytest.approx(2.0, abs=0.3)
    assert interior_errors[1] < whole_errors[1] / 100 and interior_errors[2] < whole_errors[2] / 100


@pytest.mark.parametrize("kind", INTERPOLATION_KINDS)
def test_each_row_evaluates_its_own_trajectory(kind):
    snapshots = torch.randn(5, 4, 3, generator=_gen(12), dtype=F64)
    t = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=F64)
    path = interpolate(snapshots, kind)
    for b in range(5):
        single = interpolate(snapshots[b : b + 1], kind)
        torch.testing.assert_close(path.position(t)[b], single.position(t[b : b + 1])[0], rtol=0, atol=1e-14)
        torch.testing.assert_close(path.velocity(t)[b], single.velocity(t[b : b + 1])[0], rtol=0, atol=1e-14)


def test_two_snapshots_all_kinds_agree():
    snapshots = torch.randn(3, 2, 4, generator=_gen(13), dtype=F64)
    t = torch.tensor([0.1, 0.6, 1.0], dtype=F64)
    paths = [interpolate(snapshots, kind) for kind in INTERPOLATION_KINDS]
    for path in paths[1:]:
        torch.testing.assert_close(path.position(t), paths[0].position(t), rtol=0, atol=1e-14)
        torch.testing.assert_close(path.velocity(t), paths[0].velocity(t), rtol=0, atol=1e-14)


def test_scalar_time_broadcasts_and_float32_is_kept():
    snapshots = torch.randn(3, 5, 2, generator=_gen(14))
    path = interpolate(snapshots, "cubic")
    assert isinstance(path, TrajectoryPath)
    assert (path.batch_size, path.num_snapshots, path.dim) == (3, 5, 2)
    out = path.position(0.5)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, path.position(torch.full((3,), 0.5)))
    torch.testing.assert_close(out, snapshots[:, 2])


def test_gradient_flows_to_snapshots():
    snapshots = torch.randn(2, 5, 3, generator=_gen(15), dtype=F64, requires_grad=True)
    path = interpolate(snapshots, "cubic")
    (
        path.position(torch.tensor([0.3, 0.8], dtype=F64)).sum()
        + path.velocity(torch.tensor([0.1, 0.5], dtype=F64)).sum()
    ).backward()
    assert (
        snapshots.grad is not None and torch.isfinite(snapshots.grad).all() and snapshots.grad.abs().sum() > 0
    )


def test_errors():
    snapshots = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"at least 2 snapshots \(K\+1 >= 2\) per trajectory, got 1"):
        interpolate(torch.zeros(2, 1, 3), "cubic")
    with pytest.raises(
        ValueError, match=r"unknown interpolation kind 'spline'; choose one of linear, piecewise, cubic"
    ):
        interpolate(snapshots, "spline")
    with pytest.raises(ValueError, match=r"rank 3\), got shape \(4, 3\)"):
        interpolate(snapshots[0], "linear")
    with pytest.raises(TypeError, match=r"snapshots must be floating point, got dtype torch.int64"):
        interpolate(snapshots.long(), "linear")
    with pytest.raises(ValueError, match=r"times must have shape \[K\+1\] = \[4\]"):
        interpolate(snapshots, "cubic", torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"times must be strictly increasing"):
        interpolate(snapshots, "cubic", torch.tensor([0.0, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"times must start at 0 and end at 1, got 0.0 .. 3.0"):
        interpolate(snapshots, "cubic", torch.tensor([0.0, 1.0, 2.0, 3.0]))
    path = interpolate(snapshots, "piecewise")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got values \[1.5\]"):
        path.position(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\], got values \[-0.25\]"):
        path.velocity(torch.tensor([-0.25, 0.0]))
    with pytest.raises(
        ValueError, match=r"t must have shape \[B\] = \[2\] \(one time per trajectory\), got \(3,\)"
    ):
        path.position(torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(TypeError, match=r"t must be a tensor of shape \[B\] = \[2\], got list"):
        path.position([0.1, 0.2])
