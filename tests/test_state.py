"""TaskState: keys, vector arithmetic for the integrators (per-task scaling), task selection and concatenation."""

from __future__ import annotations

import pytest
import torch

from hf_hyperflow.state import HEAD_KEY, StateEntry, TaskState, parse_state_key, state_key


def _state(seed: int, tasks: int = 3) -> TaskState:
    generator = torch.Generator().manual_seed(seed)
    return TaskState({state_key("lora", "A", "fc"): torch.randn(tasks, 2, 4, generator=generator),
                      state_key("shift", "bias", "norm"): torch.randn(tasks, 4, generator=generator),
                      HEAD_KEY: torch.randn(tasks, 5, 6, generator=generator)})


def test_keys_round_trip_and_bad_keys_are_refused():
    assert state_key("lora", "A", "blocks.0.fc1") == "lora.A:blocks.0.fc1"
    assert parse_state_key("lora.A:blocks.0.fc1") == ("lora", "A", "blocks.0.fc1")
    assert parse_state_key(HEAD_KEY) == ("head", "prototypes", "")
    with pytest.raises(ValueError, match="is not a state key"):
        parse_state_key("lora:fc")
    entry = StateEntry("lora.B:fc", (6, 2))
    assert (entry.group, entry.param, entry.module, entry.numel) == ("lora", "B", "fc", 12)


def test_arithmetic_is_entrywise_with_per_task_scaling():
    a, b = _state(0), _state(1)
    factor = torch.tensor([1.0, -2.0, 0.5])
    combined = a + b * factor - (-a) * 0.5
    for key in a:
        expected = a[key] + b[key] * factor.reshape(-1, *[1] * (a[key].dim() - 1)) + 0.5 * a[key]
        torch.testing.assert_close(combined[key], expected)
    torch.testing.assert_close((2.0 * a)[HEAD_KEY], a[HEAD_KEY] * 2)
    norms = a.squared_norms()
    assert norms.shape == (3,)
    torch.testing.assert_close(norms[1], sum(v[1].pow(2).sum() for v in a.values()))


def test_tasks_are_selected_and_concatenated():
    a = _state(0)
    one = a.select(1)
    assert one.num_tasks == 1 and torch.equal(one[HEAD_KEY][0], a[HEAD_KEY][1])
    again = TaskState.cat([a.select(0), a.select(slice(1, 3))])
    assert all(torch.equal(again[k], a[k]) for k in a)
    assert set(a.group("shift")) == {"shift.bias:norm"}


def test_states_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="same number of tasks"):
        TaskState({"lora.A:fc": torch.zeros(2, 1), "lora.B:fc": torch.zeros(3, 1)})
    other = TaskState({"lora.A:fc": torch.zeros(3, 2, 4)})
    with pytest.raises(ValueError, match="different entries cannot be combined"):
        _state(0) + other
    with pytest.raises(ValueError, match="at least one state"):
        TaskState.cat([])
