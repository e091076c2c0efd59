"""Per-task delta layers. They know only their math.

A layer wraps a frozen ``base_layer``. While a task delta is set, the rows of task i's images (rows
``[sum(sizes[:i]), sum(sizes[:i+1]))`` of the batch, times the rows per image, e.g. Swin's windows) go
through the base layer's own forward with task i's parameters: ``W + scaling * B_i @ A_i``, ``bias + db_i``,
norm ``weight + dw_i``. One call of the base layer per task, whatever its kind (Conv2d with "same" padding,
channels-first LayerNorm, timm's BatchNormAct2d...), and exact. With no delta set, a layer is its base layer.

Delta tensors (T tasks):
- LoRA on Linear: ``A: [T, r, in]``, ``B: [T, out, r]``; on Conv2d: ``A: [T, r, in, kh, kw]``,
  ``B: [T, out, r]``; the update is ``scaling * B @ A``.
- Bias shift on Linear / Conv2d: ``bias: [T, out]``.
- Affine shift on a norm layer: ``weight: [T, C]``, ``bias: [T, C]``.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["HyperFlowLayer", "HyperFlowLinear", "HyperFlowConv2d", "HyperFlowNorm", "split_rows"]


def split_rows(rows: int, sizes: list[int]) -> list[int]:
    """Rows per task for a tensor with ``rows`` rows over ``sum(sizes)`` images (several rows per image
    when a model folds windows or tokens into the batch axis)."""
    images = sum(sizes)
    if images == 0 or rows % images:
        raise ValueError(
            f"A batch of {rows} rows cannot be split over tasks of {sizes} images: pass the images of all tasks "
            f"in one batch, task after task, inside the task-delta context."
        )
    per_image = rows // images
    return [s * per_image for s in sizes]


class HyperFlowLayer(BaseTunerLayer):
    """Common state of every HyperFlow layer: the task delta currently set, and merge bookkeeping."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def _init_hyperflow(self, base_layer: nn.Module, adapter_name: str, roles: frozenset[str]) -> None:
        self.base_layer = base_layer
        self.roles = roles
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.task_delta: dict[str, torch.Tensor] | None = None
        self.task_sizes: list[int] | None = None
        self.scaling = 1.0
        self._merged_delta: dict[str, torch.Tensor] | None = None

    def set_task_delta(self, delta: dict[str, torch.Tensor], sizes: list[int], scaling: float = 1.0) -> None:
        """Set the deltas of T tasks (see the module docstring for the shapes); ``sizes[i]`` = images of task i."""
        num_tasks = {t.shape[0] for t in delta.values()}
        if num_tasks != {len(sizes)}:
            raise ValueError(f"Deltas for {sorted(num_tasks)} tasks, but {len(sizes)} task sizes were given.")
        self.task_delta = delta
        self.task_sizes = list(sizes)
        self.scaling = scaling

    def clear_task_delta(self) -> None:
        self.task_delta = None
        self.task_sizes = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._active():
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        rows = split_rows(x.shape[0], self.task_sizes)
        outputs = []
        for i, x_i in enumerate(x.split(rows)):
            params = self._task_parameters({k: v[i] for k, v in self.task_delta.items()})
            outputs.append(torch.func.functional_call(base, params, (x_i, *args), kwargs))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _task_parameters(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base layer's parameters with one task's delta applied (tensors without the task axis)."""
        raise NotImplementedError

    def _active(self) -> bool:
        return self.task_delta is not None and not self.disable_adapters and not self.merged

    # Merge one task's delta into the base layer (in place) and back.
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if self.task_delta is None:
            raise ValueError("No task delta is set on this layer: adapt a task before merging.")
        if self.merged:
            raise ValueError("A task delta is already merged into this layer: unmerge it first.")
        if len(self.task_sizes) != 1:
            raise ValueError(f"Only one task can be merged, {len(self.task_sizes)} are set.")
        increments = self._merge_increments({k: v[0].detach() for k, v in self.task_delta.items()})
        if safe_merge:
            for name, inc in increments.items():
                if not torch.isfinite(inc).all():
                    raise ValueError(f"The delta of {name} contains NaN or inf; not merged.")
        base = self.get_base_layer()
        with torch.no_grad():
            for name, inc in increments.items():
                getattr(base, name).add_(inc.to(getattr(base, name).dtype))
        self._merged_delta = increments
        self.merged_adapters.append(self.active_adapter if isinstance(self.active_adapter, str) else "default")

    def unmerge(self) -> None:
        if not self.merged:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            for name, inc in self._merged_delta.items():
                getattr(base, name).sub_(inc.to(getattr(base, name).dtype))
        self._merged_delta = None
        self.merged_adapters.clear()

    def _merge_increments(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Increments of the base layer's parameters for one task's delta (no task axis)."""
        base = self.get_base_layer()
        return {name: value - getattr(base, name) for name, value in self._task_parameters(delta).items()}

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled


class HyperFlowLinear(nn.Module, HyperFlowLayer):
    """Linear layer with per-task LoRA factors and / or bias shift."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, roles: frozenset[str]):
        super().__init__()
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    forward = HyperFlowLayer.forward

    def _task_parameters(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        params = {}
        if "A" in delta:
            update = self.scaling * (delta["B"] @ delta["A"].reshape(delta["A"].shape[0], -1))
            params["weight"] = base.weight + update.reshape(base.weight.shape).to(base.weight.dtype)
        if "bias" in delta:
            params["bias"] = base.bias + delta["bias"].to(base.bias.dtype)
        return params


class HyperFlowConv2d(HyperFlowLinear):
    """Conv2d with per-task LoRA factors (groups=1 only) and / or bias shift."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, roles: frozenset[str]):
        nn.Module.__init__(self)
        if "lora" in roles and base_layer.groups != 1:
            raise ValueError(f"LoRA needs a Conv2d with groups=1, got groups={base_layer.groups}.")
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels


class HyperFlowNorm(nn.Module, HyperFlowLayer):
    """LayerNorm / BatchNorm2d / GroupNorm (and subclasses such as timm's BatchNormAct2d or a
    channels-first LayerNorm) with per-task shifts of the affine weight and bias."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, roles: frozenset[str]):
        super().__init__()
        if getattr(base_layer, "weight", None) is None or base_layer.weight.dim() != 1:
            raise ValueError(f"{type(base_layer).__name__} has no 1-D affine weight to shift.")
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = self.out_features = base_layer.weight.shape[0]

    forward = HyperFlowLayer.forward

    def _task_parameters(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        return {name: getattr(base, name) + delta[name].to(base.weight.dtype) for name in ("weight", "bias")
                if name in delta}
