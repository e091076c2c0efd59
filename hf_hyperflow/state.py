"""TaskState: the adapted state theta of one or several tasks, as named tensor groups.

Keys are ``"<group>.<param>:<module name>"``, for example ``"lora.A:encoder.layer.0.attention.q_proj"``,
``"shift.bias:encoder.layer.0.norm1"`` or ``"head.prototypes:"``; every tensor has a leading task axis T.
A TaskState is a vector in the integrators' sense: it supports ``+``, ``-`` and scaling by a float or by a
per-task ``Tensor[T]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["TaskState", "StateEntry", "state_key", "parse_state_key", "HEAD_KEY"]


def state_key(group: str, param: str, module: str = "") -> str:
    """The key of one state tensor, e.g. ``state_key("lora", "A", "blocks.0.fc1")``."""
    return f"{group}.{param}:{module}"


def parse_state_key(key: str) -> tuple[str, str, str]:
    """Inverse of :func:`state_key`: ``(group, param, module)``."""
    head, _, module = key.partition(":")
    group, _, param = head.partition(".")
    if not group or not param or ":" not in key:
        raise ValueError(f"{key!r} is not a state key of the form '<group>.<param>:<module>'.")
    return group, param, module


# The head group's one entry: a per-class shift of the prototypes, ``Tensor[T, C, D]``.
HEAD_KEY = state_key("head", "prototypes")


@dataclass(frozen=True)
class StateEntry:
    """Shape information of one state tensor, without the task axis.

    ``shape`` uses ``-1`` for the number of classes of the head group (it varies per task batch).
    """

    key: str
    shape: tuple[int, ...]

    @property
    def group(self) -> str:
        return parse_state_key(self.key)[0]

    @property
    def param(self) -> str:
        return parse_state_key(self.key)[1]

    @property
    def module(self) -> str:
        return parse_state_key(self.key)[2]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class TaskState(Mapping):
    """The adapted state of T tasks: an ordered mapping ``key -> Tensor[T, ...]``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)
        sizes = {t.shape[0] for t in self._tensors.values()}
        if len(sizes) > 1:
            raise ValueError(f"All state tensors need the same number of tasks on axis 0, got {sorted(sizes)}.")

    # Mapping interface
    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"TaskState({shapes})"

    @property
    def num_tasks(self) -> int:
        """T, the size of the leading task axis (0 for an empty state)."""
        return next(iter(self._tensors.values())).shape[0] if self._tensors else 0

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of one group, keyed as in the state."""
        return {k: v for k, v in self._tensors.items() if k.startswith(name + ".")}

    # Vector arithmetic for the integrators
    def _check_keys(self, other: TaskState) -> None:
        if self._tensors.keys() != other._tensors.keys():
            missing = sorted(set(self._tensors) ^ set(other._tensors))
            raise ValueError(f"TaskStates with different entries cannot be combined; differing keys: {missing[:5]}")

    def __add__(self, other: TaskState) -> TaskState:
        if not isinstance(other, TaskState):
            return NotImplemented
        self._check_keys(other)
        return TaskState({k: v + other._tensors[k] for k, v in self._tensors.items()})

    def __sub__(self, other: TaskState) -> TaskState:
        if not isinstance(other, TaskState):
            return NotImplemented
        self._check_keys(other)
        return TaskState({k: v - other._tensors[k] for k, v in self._tensors.items()})

    def __neg__(self) -> TaskState:
        return TaskState({k: -v for k, v in self._tensors.items()})

    def __mul__(self, factor: float | torch.Tensor) -> TaskState:
        """Scale by a float, or per task by a ``Tensor[T]``."""
        if isinstance(factor, torch.Tensor) and factor.dim() == 1:
            return TaskState(
                {k: v * factor.reshape(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in self._tensors.items()}
            )
        if isinstance(factor, (int, float)) or (isinstance(factor, torch.Tensor) and factor.dim() == 0):
            return TaskState({k: v * factor for k, v in self._tensors.items()})
        return NotImplemented

    __rmul__ = __mul__

    def map(self, fn) -> TaskState:
        """Apply ``fn(tensor) -> tensor`` to every entry."""
        return TaskState({k: fn(v) for k, v in self._tensors.items()})

    def detach(self) -> TaskState:
        return self.map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> TaskState:
        return self.map(lambda t: t.to(*args, **kwargs))

    def select(self, index: int | slice | list[int] | torch.Tensor) -> TaskState:
        """The tasks at ``index`` (an int keeps the task axis with size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(states: list[TaskState]) -> TaskState:
        """Concatenate along the task axis (entries must match)."""
        if not states:
            raise ValueError("TaskState.cat needs at least one state.")
        for s in states[1:]:
            states[0]._check_keys(s)
        return TaskState({k: torch.cat([s[k] for s in states]) for k in states[0]})

    def squared_norms(self) -> torch.Tensor:
        """``Tensor[T]``: the squared L2 norm of every task's state."""
        total = None
        for v in self._tensors.values():
            sq = v.reshape(v.shape[0], -1).pow(2).sum(1)
            total = sq if total is None else total + sq
        return total

    def to_flat_dict(self) -> dict[str, torch.Tensor]:
        """Plain ``key -> tensor`` dict (contiguous), e.g. for safetensors."""
        return {k: v.contiguous() for k, v in self._tensors.items()}
