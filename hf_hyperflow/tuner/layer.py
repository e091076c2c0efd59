"""Per-task delta layers. They know only their math.

A layer wraps a frozen ``base_layer`` and, while a task delta is set, adds the delta of each task to the
rows of that task's images. Images of task i occupy rows ``[sum(sizes[:i]), sum(sizes[:i+1]))`` of the
batch (times the rows per image, e.g. Swin's windows). With no delta set, a layer is its base layer.

Delta tensors (T tasks):
- LoRA on Linear: ``A: [T, r, in]``, ``B: [T, out, r]``; on Conv2d: ``A: [T, r, in, kh, kw]``,
  ``B: [T, out, r]``; the update is ``scaling * B @ A``.
- Bias shift on Linear / Conv2d: ``bias: [T, out]``.
- Affine shift on a norm layer: ``weight: [T, C]``, ``bias: [T, C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _channel_view(delta: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """View a per-task channel delta ``[T, C]`` so that it broadcasts over ``[T, rows, *y.shape[1:]]``.

    ``ndim`` is the rank of the layer output y; ``axis`` the channel axis of y (negative counts from the end).
    """
    axis = axis % ndim
    shape = [delta.shape[0]] + [1] * ndim
    shape[axis + 1] = delta.shape[1]
    return delta.reshape(shape)


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

    def _per_task(self, x: torch.Tensor, y: torch.Tensor, add) -> torch.Tensor:
        """``y + add(x_t, y_t, delta_t)`` per task, where ``x_t, y_t`` are ``[T', rows, ...]`` views.

        Equal task sizes run as one batched call; otherwise one call per task.
        """
        sizes = self.task_sizes
        rows = split_rows(x.shape[0], sizes)
        if len(set(rows)) == 1:
            t = len(rows)
            return add(x.reshape(t, rows[0], *x.shape[1:]), y.reshape(t, rows[0], *y.shape[1:]), self.task_delta
                       ).reshape(y.shape)
        outs = []
        for i, (x_i, y_i) in enumerate(zip(x.split(rows), y.split(rows), strict=True)):
            delta_i = {k: v[i : i + 1] for k, v in self.task_delta.items()}
            outs.append(add(x_i.unsqueeze(0), y_i.unsqueeze(0), delta_i)[0])
        return torch.cat(outs)

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
        raise NotImplementedError

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled


class HyperFlowLinear(nn.Module, HyperFlowLayer):
    """Linear layer with per-task LoRA factors and / or bias shift."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, roles: frozenset[str]):
        super().__init__()
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self._active():
            return y

        def add(x_t, y_t, delta):
            out = y_t
            if "A" in delta:
                a, b = delta["A"].to(x_t.dtype), delta["B"].to(x_t.dtype)
                flat = x_t.reshape(x_t.shape[0], -1, x_t.shape[-1])
                lora = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
                out = out + self.scaling * lora.reshape(y_t.shape)
            if "bias" in delta:
                out = out + _channel_view(delta["bias"].to(y_t.dtype), y_t.dim() - 1, -1)
            return out

        return self._per_task(x, y, add)

    def _merge_increments(self, delta):
        increments = {}
        if "A" in delta:
            increments["weight"] = self.scaling * delta["B"] @ delta["A"]
        if "bias" in delta:
            increments["bias"] = delta["bias"]
        return increments


class HyperFlowConv2d(nn.Module, HyperFlowLayer):
    """Conv2d (groups=1) with per-task LoRA factors (grouped convolutions, one group per task) and / or
    bias shift."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, roles: frozenset[str]):
        super().__init__()
        if "lora" in roles and (base_layer.groups != 1 or base_layer.padding_mode != "zeros"):
            raise ValueError(
                f"LoRA needs a Conv2d with groups=1 and zero padding, got groups={base_layer.groups}, "
                f"padding_mode={base_layer.padding_mode!r}."
            )
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self._active():
            return y
        conv = self.get_base_layer()

        def add(x_t, y_t, delta):
            out = y_t
            if "A" in delta:
                t, n = x_t.shape[:2]
                a = delta["A"].to(x_t.dtype)  # [T, r, in, kh, kw]
                b = delta["B"].to(x_t.dtype)  # [T, out, r]
                rank = a.shape[1]
                grouped = x_t.transpose(0, 1).reshape(n, t * x_t.shape[2], *x_t.shape[3:])
                hidden = F.conv2d(grouped, a.reshape(t * rank, *a.shape[2:]), None, conv.stride, conv.padding,
                                  conv.dilation, groups=t)
                lora = F.conv2d(hidden, b.reshape(t * b.shape[1], rank, 1, 1), None, groups=t)
                lora = lora.reshape(n, t, b.shape[1], *lora.shape[2:]).transpose(0, 1)
                out = out + self.scaling * lora
            if "bias" in delta:
                out = out + _channel_view(delta["bias"].to(y_t.dtype), y_t.dim() - 1, 1)
            return out

        return self._per_task(x, y, add)

    def _merge_increments(self, delta):
        increments = {}
        if "A" in delta:
            a, b = delta["A"], delta["B"]
            weight = b @ a.reshape(a.shape[0], -1)
            increments["weight"] = self.scaling * weight.reshape(self.get_base_layer().weight.shape)
        if "bias" in delta:
            increments["bias"] = delta["bias"]
        return increments


class HyperFlowNorm(nn.Module, HyperFlowLayer):
    """LayerNorm / BatchNorm2d / GroupNorm (and subclasses such as timm's BatchNormAct2d or a
    channels-first LayerNorm) with per-task shifts of the affine weight and bias."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, roles: frozenset[str]):
        super().__init__()
        if getattr(base_layer, "weight", None) is None or base_layer.weight.dim() != 1:
            raise ValueError(f"{type(base_layer).__name__} has no 1-D affine weight to shift.")
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = self.out_features = base_layer.weight.shape[0]

    def _channel_axis(self) -> int:
        base = self.get_base_layer()
        if isinstance(base, nn.LayerNorm) and getattr(base, "data_format", "channels_last") == "channels_last":
            return -1
        return 1

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output with unit weight and zero bias (and without a fused activation)."""
        base = self.get_base_layer()
        ones = torch.ones_like(base.weight)
        zeros = torch.zeros_like(base.weight)
        if isinstance(base, nn.BatchNorm2d):
            use_batch_stats = base.training or base.running_mean is None
            return F.batch_norm(x, base.running_mean, base.running_var, ones, zeros,
                                use_batch_stats and base.training, base.momentum or 0.0, base.eps)
        return torch.func.functional_call(base, {"weight": ones, "bias": zeros}, (x,))

    def _has_fused_activation(self) -> bool:
        base = self.get_base_layer()
        return isinstance(base, nn.BatchNorm2d) and hasattr(base, "act") and hasattr(base, "drop")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._active():
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        fused = self._has_fused_activation()
        x_hat = self._normalise(x)
        axis = self._channel_axis()
        bias = base.bias if base.bias is not None else torch.zeros_like(base.weight)
        y = (x_hat * _channel_view(base.weight[None], x_hat.dim(), axis)[0]
             + _channel_view(bias[None], x_hat.dim(), axis)[0])

        def add(xh_t, y_t, delta):
            out = y_t
            if "weight" in delta:
                out = out + xh_t * _channel_view(delta["weight"].to(y_t.dtype), y_t.dim() - 1, axis)
            if "bias" in delta:
                out = out + _channel_view(delta["bias"].to(y_t.dtype), y_t.dim() - 1, axis)
            return out

        y = self._per_task(x_hat, y, add)
        if fused:
            y = base.act(base.drop(y))
        return y

    def _merge_increments(self, delta):
        return {name: delta[name] for name in ("weight", "bias") if name in delta}
