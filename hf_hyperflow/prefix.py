"""The frozen prefix of a backbone: the blocks before its first HyperFlow layer, run once and reused.

When HyperFlow layers live only in the later blocks (``HyperFlowConfig.first_adapted_block``), the blocks
before them compute the same thing for an image whatever the task delta. :class:`FrozenPrefix` runs them
once (no autograd) and, inside :meth:`FrozenPrefix.replaced`, makes the backbone skip them: the last frozen
block returns the kept output, the earlier ones zero-cost placeholders (the cheap embedding stem still runs).
Fine-tuning, meta-training and ``adapt`` use it; results equal the uncached ones up to float rounding.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import BACKBONE_TABLE, embed, model_type_of
from .tuner.layer import HyperFlowLayer

__all__ = ["FrozenPrefix", "Uncacheable", "cat_leaves", "select_images"]


class Uncacheable(Exception):
    """A block output this cache cannot slice by image (an unknown container or a batch it cannot split)."""


class _StopForward(Exception):
    """Raised by a hook to stop a forward pass once the prefix output is captured."""


@dataclass(frozen=True)
class _TensorSpec:
    rows_per_image: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _map_leaves(fn: Callable, structure, leaf_type=torch.Tensor):
    """Apply ``fn`` to every ``leaf_type`` leaf of nested tuples / lists; other scalars are kept."""
    if isinstance(structure, leaf_type):
        return fn(structure)
    if isinstance(structure, (tuple, list)) and not hasattr(structure, "_fields"):
        return type(structure)(_map_leaves(fn, s, leaf_type) for s in structure)
    if structure is None or isinstance(structure, (bool, int, float, str)):
        return structure
    raise Uncacheable(f"block outputs of type {type(structure).__name__} are not supported")


def _zip_leaves(fn: Callable, structures: list):
    """``fn([leaf_1, leaf_2, ...])`` over the tensor leaves of structures of the same shape."""
    first = structures[0]
    if isinstance(first, torch.Tensor):
        return fn(structures)
    if isinstance(first, (tuple, list)):
        return type(first)(_zip_leaves(fn, list(parts)) for parts in zip(*structures, strict=True))
    return first


def _rows_per_image(tensor: torch.Tensor, num_images: int) -> int:
    if tensor.dim() == 0 or tensor.shape[0] % num_images:
        raise Uncacheable(f"a block output of shape {tuple(tensor.shape)} has no batch axis over {num_images} images")
    return tensor.shape[0] // num_images


def select_images(structure, images: torch.Tensor, num_images: int):
    """The rows of the given images (``LongTensor[n]``) of every tensor in a block output of ``num_images``."""
    def pick(tensor):
        per = _rows_per_image(tensor, num_images)
        rows = (images.to(tensor.device)[:, None] * per + torch.arange(per, device=tensor.device)).flatten()
        return tensor.index_select(0, rows)
    return _map_leaves(pick, structure)


def _innermost_blocks(backbone: nn.Module) -> list[str]:
    """Names of the backbone's blocks (the table's block pattern), innermost only, in module order."""
    spec = BACKBONE_TABLE.get(model_type_of(backbone))
    if spec is None:
        return []
    pattern = re.compile(spec.block_pattern)
    names = []
    for name, _ in backbone.named_modules():
        match = pattern.search(name + ".") if name else None
        if match and match.group(1) == name:
            names.append(name)
    return [n for n in names if not any(other.startswith(n + ".") for other in names)]


class FrozenPrefix:
    """The blocks that come before the first HyperFlow layer, and their cached output.

    ``compute(pixel_values)`` runs the backbone up to the last frozen block without autograd and returns
    that block's output; inside ``replaced(output)`` the frozen blocks do not run: the last one returns
    ``output`` and the earlier ones return zero placeholders of their usual shape (expanded, no memory).
    """

    def __init__(self, backbone: nn.Module, blocks: list[tuple[str, nn.Module]]):
        self.backbone = backbone
        self.blocks = blocks
        self._specs: dict[str, object] | None = None

    @classmethod
    def find(cls, backbone: nn.Module) -> FrozenPrefix | None:
        blocks = _innermost_blocks(backbone)
        if not blocks:
            return None
        modules = dict(backbone.named_modules())
        first_layer = next((n for n, m in backbone.named_modules() if isinstance(m, HyperFlowLayer)), None)
        if first_layer is None:
            return None
        order = {name: i for i, (name, _) in enumerate(backbone.named_modules())}
        frozen = [b for b in blocks if order[b] < order[first_layer] and not first_layer.startswith(b + ".")]
        # Every module of a frozen block must come before the first HyperFlow layer.
        frozen = [b for b in frozen if not any(isinstance(m, HyperFlowLayer) for m in modules[b].modules())]
        if not frozen:
            return None
        return cls(backbone, [(b, modules[b]) for b in frozen])

    @property
    def last(self) -> nn.Module:
        return self.blocks[-1][1]

    @torch.no_grad()
    def compute(self, pixel_values: torch.Tensor):
        """The last frozen block's output for ``pixel_values`` (nested tuples of tensors, rows image-major)."""
        num_images = pixel_values.shape[0]
        captured: dict[str, object] = {}
        handles = []

        def keep(name, stop):
            def hook(module, args, output):
                captured[name] = output
                if stop:
                    raise _StopForward
            return hook

        for i, (name, module) in enumerate(self.blocks):
            if i == len(self.blocks) - 1 or self._specs is None:
                handles.append(module.register_forward_hook(keep(name, i == len(self.blocks) - 1)))
        try:
            embed(self.backbone, pixel_values)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        last_name = self.blocks[-1][0]
        if last_name not in captured:
            raise Uncacheable("the last frozen block did not run")
        if self._specs is None:
            self._specs = {
                name: _map_leaves(lambda t: _TensorSpec(_rows_per_image(t, num_images), tuple(t.shape[1:]), t.dtype,
                                                        t.device), captured[name])
                for name, _ in self.blocks[:-1]
            }
        output = captured[last_name]
        _map_leaves(lambda t: _rows_per_image(t, num_images), output)
        return _map_leaves(torch.Tensor.detach, output)

    @contextlib.contextmanager
    def replaced(self, output, num_images: int):
        """Within the block, the frozen blocks return ``output`` (the last) or placeholders (the others)."""
        def constant(value):
            return lambda *args, **kwargs: value

        patched = []
        try:
            for name, module in self.blocks[:-1]:
                placeholder = _map_leaves(
                    lambda s: torch.zeros((), dtype=s.dtype, device=s.device).expand(s.rows_per_image * num_images,
                                                                                    *s.shape),
                    self._specs[name], _TensorSpec)
                module.forward = constant(placeholder)
                patched.append(module)
            self.last.forward = constant(output)
            patched.append(self.last)
            yield
        finally:
            for module in patched:
                if "forward" in module.__dict__:
                    del module.forward


def cat_leaves(structures: list):
    """Concatenate block outputs of the same structure along the image (row) axis."""
    return _zip_leaves(torch.cat, structures)

