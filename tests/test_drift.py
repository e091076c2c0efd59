"""DriftNet: integrating in the output maps' coordinates equals integrating the full state."""

from __future__ import annotations

import pytest
import torch

from hf_hyperflow.drift import DriftNet, FlowCoordinates
from hf_hyperflow.integrators import INTEGRATORS, integrate
from hf_hyperflow.state import StateEntry, TaskState, state_key

FEATURES = 12
ENTRIES = [
    StateEntry(state_key("lora", "A", "fc1"), (3, 8)),
    StateEntry(state_key("lora", "B", "fc1"), (6, 3)),
    StateEntry(state_key("shift", "bias", "fc1"), (6,)),
    StateEntry(state_key("shift", "weight", "norm"), (6,)),
    StateEntry(state_key("shift", "bias", "norm"), (6,)),
    StateEntry(state_key("lora", "A", "conv"), (3, 4, 3, 3)),
    StateEntry(state_key("lora", "B", "conv"), (5, 3)),
]
GROUPS = {"lora+shift+head": ["lora", "shift", "head"], "lora+shift": ["lora", "shift"], "head": ["head"]}


def make_drift(groups: list[str], dtype=torch.float64, seed: int = 0) -> DriftNet:
    entries = [e for e in ENTRIES if e.group in groups]
    net = DriftNet(entries, feature_size=FEATURES, groups=groups, hidden_size=16, output_rank=5,
                   state_projection_size=4, init_seed=seed).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero output maps (an untrained network outputs zero drift)
        for name, parameter in net.named_parameters():
            if name.startswith("state_out") or name.startswith("head_net"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.3)
    return net


def encode(net: DriftNet, dtype=torch.float64, sizes=(6, 4, 9), classes=(3, 2, 3)):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(sum(sizes), FEATURES, generator=generator, dtype=dtype)
    labels = torch.cat([torch.arange(s) % c for s, c in zip(sizes, classes, strict=True)])
    return net.encode_tasks(features, labels, list(sizes), list(classes))


# The longest sum either computation forms: a module's flattened state through its input map.
LONGEST_SUM = max(sum(e.numel for e in ENTRIES if e.module == m) for m in ("fc1", "norm", "conv"))


def assert_states_close(actual: TaskState, expected: TaskState, dtype) -> None:
    """Within ``2 n eps`` of the state's scale (theta_0 plus the integrated drift), n the longest sum formed."""
    assert list(actual) == list(expected)
    eps = torch.finfo(dtype).eps
    for key in expected:
        scale = float(expected[key].detach().abs().max()) + 1
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=2 * LONGEST_SUM * eps * scale, msg=key)


@pytest.mark.parametrize("method", list(INTEGRATORS))
@pytest.mark.parametrize("groups", list(GROUPS.values()), ids=list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reduced_integration_equals_full_state_integration(method, groups, dtype):
    net = make_drift(groups, dtype)
    encoding = encode(net, dtype)
    full = integrate(lambda s, t: net(s, t, encoding), net.initial_state(encoding), 3, method=method)
    reduced = net.integrate(encoding, 3, method=method)
    assert_states_close(reduced, full, dtype)
    assert (full[next(iter(full))] - net.initial_state(encoding)[next(iter(full))]).abs().max() > 1e-3


def test_reduced_integration_from_another_state_with_path_and_times():
    net = make_drift(GROUPS["lora+shift+head"])
    encoding = encode(net)
    start = net.initial_state(encoding).map(lambda v: v + 0.1 * torch.randn_like(v))
    full = integrate(lambda s, t: net(s, t, encoding), start, 4, method="heun", t0=0.25, t1=0.75, return_path=True)
    reduced = net.integrate(encoding, 4, method="heun", state0=start, t0=0.25, t1=0.75, return_path=True)
    assert len(reduced) == len(full) == 5
    for a, b in zip(reduced, full, strict=True):
        assert_states_close(a, b, torch.float64)
    picked = net.integrate(encoding, 4, method="heun", state0=start, t0=0.25, t1=0.75, return_path=True,
                           path_steps=[0, 2, 4])
    for a, b in zip(picked, [full[0], full[2], full[4]], strict=True):
        assert_states_close(a, b, torch.float64)
    with pytest.raises(ValueError, match=r"path_steps must lie in 0\.\.4"):
        net.integrate(encoding, 4, return_path=True, path_steps=[0, 5])


def test_per_task_scaling_of_coordinates_matches_task_states():
    """A per-task step (e.g. a different integration time per task) scales coordinates like TaskStates."""
    net = make_drift(GROUPS["lora+shift+head"])
    encoding = encode(net)
    factor = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def full_step(s):
        return s + factor * net(s, 0.3, encoding)

    start = net.initial_state(encoding)
    expected = full_step(full_step(start))
    got = net.integrate(encoding, 2, method="euler")  # uniform steps, then the per-task version by hand
    from hf_hyperflow.drift import _ReducedFlow

    flow = _ReducedFlow(net, encoding, start, at_theta0=True)
    point = flow.start()
    for _ in range(2):
        point = point + factor * flow(point, 0.3)
    assert_states_close(flow.state(point), expected, torch.float64)
    assert isinstance(point, FlowCoordinates) and got.num_tasks == 3


def test_gradients_equal_through_both_integrations():
    """Unrolled meta-training differentiates through the integration with respect to the drift network."""
    net = make_drift(GROUPS["lora+shift+head"])
    encoding_inputs = encode(net)
    weights = {k: torch.randn_like(v) for k, v in net.initial_state(encoding_inputs).items()}

    def loss(state):
        return sum((state[k] * weights[k]).sum() for k in state)

    def gradients(run):
        net.zero_grad()
        encoding = encode(net)
        loss(run(encoding)).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    full = gradients(lambda e: integrate(lambda s, t: net(s, t, e), net.initial_state(e), 3, method="midpoint"))
    reduced = gradients(lambda e: net.integrate(e, 3, method="midpoint"))
    assert full.keys() == reduced.keys()
    for name in full:
        torch.testing.assert_close(reduced[name], full[name], rtol=1e-9, atol=1e-10, msg=name)


def test_untrained_drift_stays_at_theta0():
    net = DriftNet(ENTRIES, feature_size=FEATURES, groups=["lora", "shift", "head"], hidden_size=16).double()
    encoding = encode(net)
    state = net.integrate(encoding, 5, method="rk4")
    assert_states_close(state, net.initial_state(encoding), torch.float64)


# -- module input statistics ----------------------------------------------------------------------------
from hf_hyperflow.drift import input_statistics  # noqa: E402
from hf_hyperflow.tuner.model import channel_moments  # noqa: E402

CHANNELS = {"fc1": 8, "norm": 6, "conv": 4}


def moments_for(sizes, seed=2, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    out = {}
    for module, c in CHANNELS.items():
        mean = torch.randn(n, c, generator=generator, dtype=dtype)
        out[module] = (mean, mean.pow(2) + torch.rand(n, c, generator=generator, dtype=dtype))
    return out


def test_channel_moments_channels_first_last_and_folded_rows():
    x = torch.randn(3, 4, 5, 6)  # NCHW, 4 channels
    mean, square = channel_moments(x, 4, 3)
    torch.testing.assert_close(mean, x.mean((2, 3)))
    torch.testing.assert_close(square, x.pow(2).mean((2, 3)))
    tokens = torch.randn(3, 7, 5)  # [N, L, C]
    torch.testing.assert_close(channel_moments(tokens, 5, 3)[0], tokens.mean(1))
    windows = torch.randn(6, 7, 5)  # two windows per image folded into the batch axis
    torch.testing.assert_close(channel_moments(windows, 5, 3)[0], windows.reshape(3, 14, 5).mean(1))
    with pytest.raises(ValueError, match=r"Cannot read 9 channels of 3 images"):
        channel_moments(x, 9, 3)


def test_input_statistics_known_answer():
    # two classes, one channel: image means 0, 2 (class 0) and 4, 6 (class 1); every mean square = mean^2 + 1
    mean = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=torch.float64)
    square = mean.pow(2) + 1
    stats = input_statistics(mean, square, torch.tensor([0, 0, 1, 1]), 2)
    variance = (square.mean() - mean.mean() ** 2) + 1e-5  # 1 + 5 = 6
    assert stats.shape == (3,)
    # computed in float32: within a few float32 epsilons
    assert float(stats[2]) == pytest.approx(2.0 / float(variance.sqrt()), rel=8 * torch.finfo(torch.float32).eps)
    assert float(stats[0]) == 0.0 and float(stats[1]) == 0.0  # one channel standardises to 0


def test_input_statistics_of_modules_side_by_side_equal_separate_calls():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    channels = [3, 1, 5]
    mean = torch.randn(6, sum(channels), generator=generator, dtype=torch.float64) * 3
    square = mean.pow(2) + torch.rand(6, sum(channels), generator=generator, dtype=torch.float64)
    together = input_statistics(mean, square, labels, 3, segments=channels).reshape(3, -1).split(channels, dim=1)
    for part, a, b in zip(together, mean.split(channels, dim=1), square.split(channels, dim=1), strict=True):
        torch.testing.assert_close(part.reshape(-1), input_statistics(a, b, labels, 3))


def test_statistics_change_the_drift_and_reduced_integration_still_matches():
    net = DriftNet(ENTRIES, feature_size=FEATURES, groups=["lora", "shift", "head"], hidden_size=16, output_rank=5,
                   state_projection_size=4, module_channels=CHANNELS, statistics_size=3).to(torch.float64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith("state_out") or name.startswith("head_net"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.3)
    sizes, classes = [6, 4], [3, 2]
    labels = torch.cat([torch.arange(s) % c for s, c in zip(sizes, classes, strict=True)])
    features = torch.randn(sum(sizes), FEATURES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"reads the input statistics of its modules, but none were given"):
        net.encode_tasks(features, labels, sizes, classes)
    statistics = net.module_statistics(moments_for(sizes), labels, sizes, classes)
    assert {k: tuple(v.shape) for k, v in statistics.items()} == {m: (2, 3 * c) for m, c in CHANNELS.items()
                                                                  if m in net.modules_order}
    encoding = net.encode_tasks(features, labels, sizes, classes, statistics)
    assert encoding.module_statistics.shape == (2, len(net.modules_order), 3)
    reduced = net.integrate(encoding, 4)
    full = integrate(lambda s, t: net(s, t, encoding), net.initial_state(encoding), 4)
    assert_states_close(reduced, full, torch.float64)
    other = net.encode_tasks(features, labels, sizes, classes,
                             net.module_statistics(moments_for(sizes, seed=5), labels, sizes, classes))
    changed = net.integrate(other, 4)
    assert any(not torch.allclose(changed[k], reduced[k]) for k in reduced if not k.startswith("head"))


def test_kept_maps_follow_parameter_changes():
    """Without autograd the composed maps are kept between calls, until a parameter changes in place."""
    net = make_drift(GROUPS["lora+shift+head"])
    with torch.no_grad():
        encoding = encode(net)
        first = net.integrate(encoding, 2)
        assert_states_close(net.integrate(encoding, 2), first, torch.float64)
        for parameter in (net.state_out_weight[0], net.state_in[1], net.head_net[-1].weight):
            parameter.add_(0.05)  # an optimizer step, in place
            full = integrate(lambda s, t: net(s, t, encoding), net.initial_state(encoding), 2)
            assert_states_close(net.integrate(encoding, 2), full, torch.float64)
