"""Per-task delta layers. They know only their math.

A layer wraps a frozen ``base_layer``. While the deltas of T tasks are set, task i owns the rows
``[sum(rows[:i]), sum(rows[:i+1]))`` of a batch, ``rows[i] = sizes[i] * rows per image`` (e.g. Swin folds windows
into the batch axis), and those rows see task i's parameters: ``W + scaling * B_i @ A_i``, ``bias + db_i``, norm
``weight + dw_i``. With no delta set, a layer is its base layer.

All T tasks go through one call of every kernel. The base layer runs once over all rows; the deltas are applied
on a ``[T, n, ...]`` view of the rows (tasks of unequal sizes are padded to the largest by one gather and unpadded
by another, see :class:`TaskRows`):

- LoRA: ``scaling * B_i (A_i x)`` added to the base output: two batched matmuls (for a k x k Conv2d, ``A_i x`` is
  the base convolution with ``A_i`` as its weight, vmapped over tasks: one grouped convolution);
- bias shifts: a broadcast add;
- BatchNorm shifts (running statistics): the per-task affine map ``x * a_i + c_i`` the norm amounts to, broadcast,
  then the base layer with identity statistics, so that whatever follows inside it (timm's activation) still runs;
- LayerNorm / GroupNorm shifts: normalisation without affine, then the per-task affine, broadcast.
Norm layers of other kinds (subclasses with their own forward) call the base layer once per task with that task's
parameters, as :meth:`HyperFlowLayer.forward_each` does for any layer: the definition the batched paths equal up to
float rounding. With one task set (``adapt``, and each bounded adapted pass of ``adapt_many`` on a CPU), every layer
runs its base layer once with that task's parameters (the LoRA update merged into the weight: one convolution
instead of the base one plus ``A_i x`` and ``B_i h``; one norm instead of an affine map and an identity norm; a
1x1 convolution over fewer than ``POINTWISE_SLOW_IMAGES`` images on one CPU thread as one matrix product).

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
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["HyperFlowLayer", "HyperFlowLinear", "HyperFlowConv2d", "HyperFlowNorm", "TaskRows", "split_rows"]


def split_rows(rows: int, sizes: list[int]) -> list[int]:
    """Rows per task for a tensor with ``rows`` rows over ``sum(sizes)`` images (several rows per image
    when a model folds windows or tokens into the batch axis)."""
    images = sum(sizes)
    if images == 0 or rows % images or min(sizes) < 1:
        raise ValueError(
            f"A batch of {rows} rows cannot be split over tasks of {sizes} images: pass the images of all tasks "
            f"in one batch, task after task, at least one image per task, inside the task-delta context."
        )
    per_image = rows // images
    return [s * per_image for s in sizes]


class TaskRows:
    """The rows of T tasks in a batch ``[N, ...]`` seen as ``[T, n, ...]``, n the largest task's row count.

    Tasks of equal sizes: a view both ways. Unequal: :meth:`split` pads every task with copies of its last row
    (one gather) and :meth:`join` drops the padding (another gather).
    """

    def __init__(self, rows: list[int], device: torch.device):
        self.num_tasks = len(rows)
        self.width = max(rows)
        self.equal = min(rows) == self.width
        if not self.equal:
            counts = torch.tensor(rows, device=device)
            starts = counts.cumsum(0) - counts
            offsets = torch.arange(self.width, device=device)
            self._padded = (starts[:, None] + torch.minimum(offsets[None], counts[:, None] - 1)).flatten()
            self._valid = (offsets[None] < counts[:, None]).flatten().nonzero().squeeze(1)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, ...] -> Tensor[T, n, ...]``."""
        if not self.equal:
            x = x.index_select(0, self._padded)
        return x.reshape(self.num_tasks, self.width, *x.shape[1:])

    def join(self, x: torch.Tensor) -> torch.Tensor:
        """``Tensor[T, n, ...] -> Tensor[N, ...]``, the inverse of :meth:`split`."""
        x = x.reshape(self.num_tasks * self.width, *x.shape[2:])
        return x if self.equal else x.index_select(0, self._valid)


def _per_task(vector: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """``[T, C] -> [T, 1, ..., C, ..., 1]`` of ``ndim`` dims with C on ``axis``, to broadcast over ``[T, n, ...]``."""
    shape = [1] * ndim
    shape[0], shape[axis] = vector.shape
    return vector.reshape(shape)


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
        rows = split_rows(x.shape[0], self.task_sizes)
        if len(rows) == 1:
            return self._forward_one(x, *args, **kwargs)
        return self._forward_tasks(x, TaskRows(rows, x.device), *args, **kwargs)

    def _forward_one(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One task: the base layer's own forward, once, with the task's parameters (:meth:`forward_each`)."""
        params = self._task_parameters({k: v[0] for k, v in self.task_delta.items()})
        return functional_call(self.get_base_layer(), params, (x, *args), kwargs)

    def _forward_tasks(self, x: torch.Tensor, rows: TaskRows, *args, **kwargs) -> torch.Tensor:
        """The output for all tasks' rows, batched over tasks (each subclass's math)."""
        raise NotImplementedError

    def forward_each(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The output computed one task at a time: the base layer's own forward with each task's parameters."""
        base = self.get_base_layer()
        outputs = []
        for i, x_i in enumerate(x.split(split_rows(x.shape[0], self.task_sizes))):
            params = self._task_parameters({k: v[i] for k, v in self.task_delta.items()})
            outputs.append(functional_call(base, params, (x_i, *args), kwargs))
        return torch.cat(outputs)

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

    def _forward_tasks(self, x: torch.Tensor, rows: TaskRows, *args, **kwargs) -> torch.Tensor:
        """``x: [N, ..., in] -> [N, ..., out]``; LoRA as ``[T, m, in] @ A^T @ B^T`` (m rows x tokens per task)."""
        delta, num_tasks = self.task_delta, rows.num_tasks
        y = rows.split(self.get_base_layer()(x, *args, **kwargs))  # [T, n, ..., out]
        shape = y.shape
        y = y.reshape(num_tasks, -1, shape[-1])  # [T, m, out]
        if "A" in delta:
            a, b = delta["A"].to(y.dtype), delta["B"].to(y.dtype)
            xt = rows.split(x).to(y.dtype).reshape(num_tasks, -1, x.shape[-1])
            h = torch.bmm(xt, a.transpose(1, 2))  # [T, m, r]
            y = torch.baddbmm(y, h, b.transpose(1, 2), alpha=self.scaling)
        if "bias" in delta:
            y = y + delta["bias"].to(y.dtype)[:, None]
        return rows.join(y.reshape(shape))

    def _task_parameters(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        params = {}
        if "A" in delta:
            update = self.scaling * (delta["B"] @ delta["A"].reshape(delta["A"].shape[0], -1))
            params["weight"] = base.weight + update.reshape(base.weight.shape).to(base.weight.dtype)
        if "bias" in delta:
            params["bias"] = base.bias + delta["bias"].to(base.bias.dtype)
        return params


# Below this many images, PyTorch runs a 1x1 convolution on one CPU thread through its unfold-and-multiply
# kernel ("THNN is faster when single-threaded"), several times slower here than one matrix product.
POINTWISE_SLOW_IMAGES = 16


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1, stride-1, unpadded, ungrouped convolution as one matrix product over the pixels.

    Args:
        x: ``Tensor[N, C, H, W]``; weight: ``Tensor[O, C, 1, 1]``; bias: ``Tensor[O]`` or None.

    Returns:
        ``Tensor[N, O, H, W]`` (contiguous), equal to ``F.conv2d(x, weight, bias)`` up to float rounding.
    """
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # [NHW, C]
    matrix = weight.reshape(weight.shape[0], c).T  # [C, O]
    y = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    return y.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


class HyperFlowConv2d(HyperFlowLinear):
    """Conv2d with per-task LoRA factors (groups=1 only) and / or bias shift."""

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, roles: frozenset[str]):
        nn.Module.__init__(self)
        if "lora" in roles and base_layer.groups != 1:
            raise ValueError(f"LoRA needs a Conv2d with groups=1, got groups={base_layer.groups}.")
        self._init_hyperflow(base_layer, adapter_name, roles)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def _forward_tasks(self, x: torch.Tensor, rows: TaskRows, *args, **kwargs) -> torch.Tensor:
        """``x: [N, C, H, W] -> [N, out, H', W']``; LoRA as ``B_i @ (A_i x)`` per output pixel."""
        delta, num_tasks, n = self.task_delta, rows.num_tasks, rows.width
        y = rows.split(self.get_base_layer()(x, *args, **kwargs))  # [T, n, out, H', W']
        if "A" in delta:
            a, b = delta["A"].to(y.dtype), delta["B"].to(y.dtype)
            h = self._lora_a(rows.split(x).to(y.dtype), a)  # [T, n, r, H'W']
            out, rank = b.shape[1:]
            b = b[:, None].expand(num_tasks, n, out, rank).reshape(num_tasks * n, out, rank)
            y = torch.baddbmm(y.reshape(num_tasks * n, out, -1), b, h.reshape(num_tasks * n, rank, -1),
                              alpha=self.scaling).reshape(y.shape)
        if "bias" in delta:
            y = y + _per_task(delta["bias"].to(y.dtype), y.dim(), 2)
        return rows.join(y)

    def _forward_one(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if type(base) is not nn.Conv2d:
            return super()._forward_one(x, *args, **kwargs)
        params = self._task_parameters({k: v[0] for k, v in self.task_delta.items()})
        weight, bias = params.get("weight", base.weight), params.get("bias", base.bias)
        if self._pointwise_by_matmul(x):
            return pointwise_conv(x, weight, bias)
        return base._conv_forward(x, weight, bias)

    def _pointwise_by_matmul(self, x: torch.Tensor) -> bool:
        """Whether this layer is a plain 1x1 convolution over so few images on one CPU thread that PyTorch would
        take its slow kernel (see ``POINTWISE_SLOW_IMAGES``): then :func:`pointwise_conv` computes it."""
        base = self.get_base_layer()
        return (type(base) is nn.Conv2d and base.kernel_size == (1, 1) and base.stride == (1, 1)
                and base.dilation == (1, 1) and base.groups == 1 and base.padding in ((0, 0), "valid", "same")
                and x.dim() == 4 and x.device.type == "cpu" and x.shape[0] < POINTWISE_SLOW_IMAGES
                and torch.get_num_threads() == 1)

    def _lora_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``A_i x`` per task: ``x: [T, n, C, H, W]``, ``a: [T, r, C, kh, kw]`` -> ``[T, n, r, H'W']``."""
        base = self.get_base_layer()
        if base.kernel_size == (1, 1) and base.stride == (1, 1) and base.padding in ((0, 0), "valid", "same"):
            return torch.matmul(a.flatten(2)[:, None], x.flatten(3))  # [T, 1, r, C] @ [T, n, C, HW]
        # The base layer's own convolution (its padding, stride, dilation) with A_i as the weight.
        zero_bias = {} if base.bias is None else {"bias": a.new_zeros(a.shape[1])}

        def conv(a_i, x_i):
            return functional_call(base, {"weight": a_i, **zero_bias}, (x_i,))

        return vmap(conv)(a, x).flatten(3)


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

    def _forward_tasks(self, x: torch.Tensor, rows: TaskRows, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if isinstance(base, _BatchNorm) and not base.training and base.running_mean is not None:
            return self._batch_norm_tasks(x, rows, *args, **kwargs)
        if type(base) is nn.LayerNorm or type(base) is nn.GroupNorm:
            return self._normalize_then_affine(x, rows)
        return self.forward_each(x, *args, **kwargs)

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every task's affine weight and bias: ``[T or 1, C]`` each (bias None when the norm has none)."""
        base, delta = self.get_base_layer(), self.task_delta
        weight = base.weight.to(dtype)[None] + (delta["weight"].to(dtype) if "weight" in delta else 0)
        bias = None
        if base.bias is not None:
            bias = base.bias.to(dtype)[None] + (delta["bias"].to(dtype) if "bias" in delta else 0)
        return weight, bias

    def _batch_norm_tasks(self, x: torch.Tensor, rows: TaskRows, *args, **kwargs) -> torch.Tensor:
        """``x: [N, C, ...]``: ``x * a_i + c_i`` per task (the norm with task i's affine), then the base layer with
        identity statistics and affine (its own ops after the norm, e.g. an activation, still apply)."""
        base = self.get_base_layer()
        weight, bias = self._affine(x.dtype)
        scale = weight * torch.rsqrt(base.running_var.to(x.dtype) + base.eps)  # [T, C]
        shift = (0 if bias is None else bias) - base.running_mean.to(x.dtype) * scale
        xt = rows.split(x)
        normalized = torch.addcmul(_per_task(shift, xt.dim(), 2), xt, _per_task(scale, xt.dim(), 2))
        return functional_call(base, self._identity_norm(base, x), (rows.join(normalized), *args), kwargs)

    @staticmethod
    def _identity_norm(base: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Statistics and affine that make a BatchNorm the identity map: mean 0, var 1 - eps, weight 1, bias 0."""
        channels = base.weight.shape[0]
        identity = {"running_mean": x.new_zeros(channels), "running_var": x.new_full((channels,), 1.0 - base.eps),
                    "weight": x.new_ones(channels)}
        if base.bias is not None:
            identity["bias"] = x.new_zeros(channels)
        return identity

    def _normalize_then_affine(self, x: torch.Tensor, rows: TaskRows) -> torch.Tensor:
        """nn.LayerNorm (affine over the trailing dims) / nn.GroupNorm (affine on axis 1), batched over tasks."""
        base = self.get_base_layer()
        weight, bias = self._affine(x.dtype)
        if isinstance(base, nn.LayerNorm):
            normalized = rows.split(F.layer_norm(x, base.normalized_shape, None, None, base.eps))
            axis = normalized.dim() - 1
        else:
            normalized = rows.split(F.group_norm(x, base.num_groups, None, None, base.eps))
            axis = 2
        weight = _per_task(weight, normalized.dim(), axis)
        out = normalized * weight if bias is None else torch.addcmul(
            _per_task(bias, normalized.dim(), axis), normalized, weight)
        return rows.join(out)

    def _task_parameters(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.get_base_layer()
        return {name: getattr(base, name) + delta[name].to(base.weight.dtype) for name in ("weight", "bias")
                if name in delta}
