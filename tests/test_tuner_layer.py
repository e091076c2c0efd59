"""Per-task delta layers: every task's rows through the batched path equal that task's parameters applied
alone (a copy of the base layer with the task's merged parameters), for equal and unequal task sizes.

Tolerances follow from the dtype and the magnitudes involved, not from one machine's kernels: two ways of
summing n products differ by at most about ``2 n eps sum |terms|`` (the standard bound ``gamma_n`` on a dot
product, for each of the two computations).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_hyperflow.tuner.layer import (
    POINTWISE_SLOW_IMAGES,
    HyperFlowConv2d,
    HyperFlowLinear,
    HyperFlowNorm,
    TaskRows,
    pointwise_conv,
    split_rows,
)

SCALING = 2.0
DTYPES = [torch.float32, torch.float64]
SIZES = {"equal": [3, 3, 3], "unequal": [2, 5, 1], "one task": [4]}


def close(actual: torch.Tensor, expected: torch.Tensor, terms: int, magnitude: torch.Tensor) -> None:
    """``|actual - expected| <= 2 * terms * eps * magnitude`` elementwise (magnitude: the sum of |terms|)."""
    bound = 2 * terms * torch.finfo(expected.dtype).eps * magnitude + torch.finfo(expected.dtype).tiny
    excess = (actual - expected).abs() - bound
    assert excess.max() <= 0, f"off by {float((actual - expected).abs().max()):.3g}, bound {float(bound.max()):.3g}"


def random_delta(layer, num_tasks: int, generator: torch.Generator, rank: int = 3) -> dict[str, torch.Tensor]:
    base = layer.get_base_layer()
    dtype = base.weight.dtype
    delta = {}
    if "lora" in layer.roles:
        in_shape = (base.in_channels, *base.kernel_size) if isinstance(base, nn.Conv2d) else (base.in_features,)
        delta["A"] = torch.randn(num_tasks, rank, *in_shape, generator=generator, dtype=dtype)
        delta["B"] = torch.randn(num_tasks, layer.out_features, rank, generator=generator, dtype=dtype) * 0.1
    if "shift" in layer.roles:
        channels = layer.out_features
        delta["bias"] = torch.randn(num_tasks, channels, generator=generator, dtype=dtype) * 0.1
        if isinstance(layer, HyperFlowNorm):
            delta["weight"] = torch.randn(num_tasks, channels, generator=generator, dtype=dtype) * 0.1
    return delta


def task_copies(layer, delta: dict[str, torch.Tensor], num_tasks: int) -> list[nn.Module]:
    """One plain copy of the base layer per task, with that task's parameters merged in (the definition)."""
    copies = []
    for i in range(num_tasks):
        module = copy.deepcopy(layer.get_base_layer())
        with torch.no_grad():
            if "A" in delta:
                a = delta["A"][i].reshape(delta["A"].shape[1], -1)
                module.weight += (SCALING * delta["B"][i] @ a).reshape(module.weight.shape)
            for name in ("weight", "bias"):
                if name in delta and not (name == "weight" and "A" in delta):
                    getattr(module, name).add_(delta[name][i])
        copies.append(module)
    return copies


def per_task(modules: list[nn.Module], x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return torch.cat([m(x_i) for m, x_i in zip(modules, x.split(rows), strict=True)])


def absolute(module: nn.Module) -> nn.Module:
    """A copy with |parameters| and no normalisation: the sum of |terms| of a Linear / Conv2d output."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.abs_()
    return module


def run(layer, x: torch.Tensor, sizes: list[int], seed: int = 0):
    """The batched output and the per-task reference for random deltas of ``len(sizes)`` tasks."""
    generator = torch.Generator().manual_seed(seed)
    delta = random_delta(layer, len(sizes), generator)
    layer.set_task_delta(delta, sizes, SCALING)
    with torch.no_grad():
        batched = layer(x)
        copies = task_copies(layer, delta, len(sizes))
        expected = per_task(copies, x, split_rows(x.shape[0], sizes))
        magnitude = per_task([absolute(m) for m in copies], x.abs(), split_rows(x.shape[0], sizes))
    return batched, expected, magnitude, delta


def linear_layer(dtype, roles=frozenset({"lora", "shift"})):
    torch.manual_seed(0)
    return HyperFlowLinear(nn.Linear(12, 10).to(dtype), "default", roles)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("roles", [{"lora"}, {"shift"}, {"lora", "shift"}])
def test_linear_tasks_equal_each_task_alone(dtype, sizes, roles):
    layer = linear_layer(dtype, frozenset(roles))
    tokens = 4  # rows of [N, tokens, in]: a ViT's sequence
    x = torch.randn(sum(sizes), tokens, 12, dtype=dtype)
    batched, expected, magnitude, _ = run(layer, x, sizes)
    close(batched, expected, 12 + 3, magnitude)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_linear_with_several_rows_per_image(dtype, sizes):
    layer = linear_layer(dtype)
    x = torch.randn(2 * sum(sizes), 12, dtype=dtype)  # two rows per image (e.g. Swin windows)
    batched, expected, magnitude, _ = run(layer, x, sizes)
    close(batched, expected, 15, magnitude)


CONVS = {
    "1x1": lambda: nn.Conv2d(6, 8, 1),
    "3x3 stride 2": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "3x3 reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "5x5 dilated same": lambda: nn.Conv2d(6, 8, 5, padding="same", dilation=2, bias=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv2d_tasks_equal_each_task_alone(dtype, sizes, kind):
    torch.manual_seed(0)
    base = CONVS[kind]().to(dtype)
    layer = HyperFlowConv2d(base, "default", frozenset({"lora", "shift"}))
    x = torch.randn(sum(sizes), 6, 9, 9, dtype=dtype)
    batched, expected, magnitude, _ = run(layer, x, sizes)
    terms = 6 * base.kernel_size[0] * base.kernel_size[1] + 3
    close(batched, expected, terms, magnitude)


@pytest.fixture
def one_thread():
    """torch on one thread within the test (the case where a 1x1 convolution over few images is a matrix product)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_is_the_1x1_convolution(bias):
    conv = nn.Conv2d(6, 8, 1, bias=bias).double()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        close(pointwise_conv(x, conv.weight, conv.bias), conv(x), 7, absolute(conv)(x.abs()))


@pytest.mark.parametrize("sizes", [[4], [POINTWISE_SLOW_IMAGES]], ids=["few images", "many images"])
def test_one_task_1x1_conv_on_one_thread(one_thread, sizes):
    torch.manual_seed(0)
    layer = HyperFlowConv2d(nn.Conv2d(6, 8, 1).double(), "default", frozenset({"lora", "shift"}))
    x = torch.randn(sum(sizes), 6, 9, 9, dtype=torch.float64)
    assert layer._pointwise_by_matmul(x) == (sum(sizes) < POINTWISE_SLOW_IMAGES)
    batched, expected, magnitude, _ = run(layer, x, sizes)
    close(batched, expected, 6 + 3, magnitude)


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_conv2d_subclass_with_its_own_padding(sizes):
    """timm's Conv2dSame pads in its forward (TF 'same' with stride 2): the LoRA convolution pads as it does."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    layer = HyperFlowConv2d(Conv2dSame(6, 8, 3, stride=2), "default", frozenset({"lora", "shift"}))
    x = torch.randn(sum(sizes), 6, 8, 8)
    batched, expected, magnitude, _ = run(layer, x, sizes)
    close(batched, expected, 6 * 9 + 3, magnitude)


def batch_norm_act():
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(8, act_layer=nn.SiLU)


def convnext_channels_first():
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    return ConvNextLayerNorm(8, data_format="channels_first")


NORMS = {
    "BatchNorm2d": (lambda: nn.BatchNorm2d(8), (8, 5, 5)),
    "BatchNormAct2d": (batch_norm_act, (8, 5, 5)),
    "LayerNorm": (lambda: nn.LayerNorm(8), (4, 8)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 8), (8, 3, 3)),
    "channels-first LayerNorm": (convnext_channels_first, (8, 3, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_tasks_equal_each_task_alone(dtype, sizes, kind):
    make, shape = NORMS[kind]
    torch.manual_seed(0)
    base = make().to(dtype).eval()
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-0.5, 0.5)
        if isinstance(base, nn.BatchNorm2d):
            base.running_mean.uniform_(-1, 1)
            base.running_var.uniform_(0.5, 2.0)
    layer = HyperFlowNorm(base, "default", frozenset({"shift"}))
    x = torch.randn(sum(sizes), *shape, dtype=dtype) * 3 + 1
    batched, expected, _, _ = run(layer, x, sizes)
    # A few roundings of normalised values (|x - mean| / std, a mean over <= 64 values) times |weight|, + |bias|.
    magnitude = expected.abs() + 4 * (x - x.mean()).abs().max() / x.std() + 2
    close(batched, expected, 64, magnitude)


def gradient_case(kind: str):
    """A float64 layer of ``kind`` and an input of 8 images."""
    torch.manual_seed(0)
    dtype = torch.float64
    if kind == "Linear":
        layer, x = linear_layer(dtype), torch.randn(8, 12, dtype=dtype)
    elif kind == "Conv2d 3x3":
        layer = HyperFlowConv2d(nn.Conv2d(6, 8, 3, padding=1).to(dtype), "default", frozenset({"lora", "shift"}))
        x = torch.randn(8, 6, 5, 5, dtype=dtype)
    else:
        base = (batch_norm_act() if kind == "BatchNormAct2d" else nn.LayerNorm(8)).to(dtype).eval()
        layer = HyperFlowNorm(base, "default", frozenset({"shift"}))
        x = torch.randn(8, 8, 3, 3, dtype=dtype) if kind == "BatchNormAct2d" else torch.randn(8, 8, dtype=dtype)
    return layer, x


GRADIENT_KINDS = ["Linear", "Conv2d 3x3", "BatchNormAct2d", "LayerNorm"]


@pytest.mark.parametrize("sizes", [[3, 5], [8]], ids=["two tasks", "one task"])
@pytest.mark.parametrize("kind", GRADIENT_KINDS)
def test_gradients_through_the_batched_path_equal_per_task_gradients(kind, sizes):
    """Fine-tuning and meta-training differentiate through the layers with respect to the deltas."""
    layer, x = gradient_case(kind)
    dtype = x.dtype
    generator = torch.Generator().manual_seed(1)
    delta = {k: v.requires_grad_() for k, v in random_delta(layer, len(sizes), generator).items()}
    layer.set_task_delta(delta, sizes, SCALING)
    weights = torch.randn(layer(x).shape, dtype=dtype)
    batched = torch.autograd.grad((layer(x) * weights).sum(), list(delta.values()))
    each = torch.autograd.grad((layer.forward_each(x) * weights).sum(), list(delta.values()))
    for g_batched, g_each in zip(batched, each, strict=True):
        torch.testing.assert_close(g_batched, g_each, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", GRADIENT_KINDS)
def test_one_task_merged_into_the_base_layer_equals_the_batched_math(kind):
    """With one task set, a layer runs its base layer once with the task's parameters (LoRA merged into the
    weight); the batched path's math gives the same output and gradients."""
    layer, x = gradient_case(kind)
    delta = {k: v.requires_grad_() for k, v in random_delta(layer, 1, torch.Generator().manual_seed(1)).items()}
    layer.set_task_delta(delta, [x.shape[0]], SCALING)
    merged = layer(x)
    batched = layer._forward_tasks(x, TaskRows([x.shape[0]], x.device))
    torch.testing.assert_close(merged, batched, rtol=1e-10, atol=1e-10)
    weights = torch.randn(merged.shape, dtype=x.dtype)
    for g_merged, g_batched in zip(torch.autograd.grad((merged * weights).sum(), list(delta.values())),
                                   torch.autograd.grad((batched * weights).sum(), list(delta.values())), strict=True):
        torch.testing.assert_close(g_merged, g_batched, rtol=1e-10, atol=1e-10)


def test_forward_each_is_the_per_task_definition():
    layer = linear_layer(torch.float64)
    x = torch.randn(7, 12, dtype=torch.float64)
    batched, expected, magnitude, _ = run(layer, x, [2, 5])
    close(layer.forward_each(x), expected, 15, magnitude)


def test_no_delta_is_the_base_layer():
    layer = linear_layer(torch.float32)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [[3, 3], [1, 4, 2], [5]])
def test_task_rows_split_and_join_are_inverse(rows):
    x = torch.arange(sum(rows) * 2.0).reshape(sum(rows), 2)
    task_rows = TaskRows(rows, x.device)
    split = task_rows.split(x)
    assert split.shape == (len(rows), max(rows), 2)
    for i, part in enumerate(x.split(rows)):
        torch.testing.assert_close(split[i, : rows[i]], part, rtol=0, atol=0)
        if rows[i] < max(rows):  # padding repeats the task's last row (never another task's)
            torch.testing.assert_close(split[i, rows[i]:], part[-1:].expand(max(rows) - rows[i], 2), rtol=0, atol=0)
    torch.testing.assert_close(task_rows.join(split), x, rtol=0, atol=0)


def test_rows_that_do_not_split_over_tasks():
    with pytest.raises(ValueError, match="cannot be split"):
        split_rows(7, [2, 2])
    with pytest.raises(ValueError, match="at least one image"):
        split_rows(4, [4, 0])
    layer = linear_layer(torch.float32)
    layer.set_task_delta(random_delta(layer, 2, torch.Generator().manual_seed(0)), [2, 2], SCALING)
    with pytest.raises(ValueError, match="task after task"):
        layer(torch.randn(5, 12))
