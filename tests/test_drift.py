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

    flow = _ReducedFlow(net, encoding, start)
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
