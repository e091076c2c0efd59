"""The frozen prefix of a backbone: the blocks before its first HyperFlow layer, run once and reused.

When HyperFlow layers live only in the later blocks (``HyperFlowConfig.first_adapted_block``), the blocks
before them compute the same thing for an image whatever the task delta. :class:`FrozenPrefix` runs them
once (no autograd) and, inside :meth:`FrozenPrefix.replaced`, makes the backbone skip them: the last frozen
block returns the kept output, the earlier ones zero-cost placeholders (the cheap embedding stem still runs).
Fine-tuning, meta-training and ``adapt`` use it; results equal the uncached ones up to float rounding.
:class:`PrefixCache` keeps those outputs per image across batches (meta-training sees an image many times).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import BACKBONE_TABLE, embed, model_type_of
from .tuner.layer import HyperFlowLayer

__all__ = ["FrozenPrefix", "PrefixCache", "Uncacheable", "block_output_sizes", "cat_leaves", "image_range",
           "innermost_blocks", "select_images", "skip_prefix"]


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


def innermost_blocks(backbone: nn.Module) -> list[str]:
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


class _StemWatch:
    """Which modules finish before the first frozen block starts (and never run after it), outermost only."""

    def __init__(self, backbone: nn.Module, spec):
        self.spec, self.started = spec, False
        self.before: dict[str, object] = {}
        self.after: set[str] = set()

    def block_starts(self, module, args) -> None:
        self.started = True

    def note(self, name: str):
        def hook(module, args, output):
            if self.started:
                self.after.add(name)
                return
            try:
                self.before.setdefault(name, _map_leaves(self.spec, output))
            except Uncacheable:  # an output this cache cannot describe: that module keeps running
                pass
        return hook

    def modules(self) -> dict[str, object]:
        """``name -> output spec`` of the outermost stem modules."""
        kept = {n: s for n, s in self.before.items() if n not in self.after}
        return {n: s for n, s in kept.items() if not any(n.startswith(other + ".") for other in kept)}


class FrozenPrefix:
    """The blocks that come before the first HyperFlow layer, and their cached output.

    ``compute(pixel_values)`` runs the backbone up to the last frozen block without autograd and returns
    that block's output (``embed_and_keep`` runs the whole backbone and returns its features too); inside
    ``replaced(output)`` the frozen blocks do not run: the last one returns ``output`` and the earlier ones,
    like the stem (the modules that run before the first block and never after it: patch embedding, stem
    convolution), return zero placeholders of their usual shape (expanded, no memory).
    """

    def __init__(self, backbone: nn.Module, blocks: list[tuple[str, nn.Module]]):
        self.backbone = backbone
        self.blocks = blocks
        self._specs: dict[str, object] | None = None
        self._stem: dict[str, object] | None = None  # learnt from the first forward pass

    @classmethod
    def find(cls, backbone: nn.Module) -> FrozenPrefix | None:
        blocks = innermost_blocks(backbone)
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

    @classmethod
    def early(cls, backbone: nn.Module, sizes: dict[str, int], until: str | None = None) -> FrozenPrefix | None:
        """The backbone's high-resolution start: its blocks up to the last one whose output per image is larger
        than 1/8 of the largest (``sizes``: :func:`block_output_sizes`), and no further than block ``until``. A
        forward pass's memory and cache traffic peak there, so those blocks are worth running a few images at a
        time while the later, smaller ones take all images at once. None for a backbone whose block outputs keep
        one size (a ViT) or without blocks."""
        names = [n for n in innermost_blocks(backbone) if n in sizes]
        large = [n for n in names if 8 * sizes[n] > max(sizes.values(), default=0)]
        if not large or len(large) == len(names):
            return None
        last = names.index(large[-1]) if until is None else min(names.index(large[-1]), names.index(until))
        modules = dict(backbone.named_modules())
        return cls(backbone, [(n, modules[n]) for n in names[: last + 1]])

    @property
    def last(self) -> nn.Module:
        return self.blocks[-1][1]

    @torch.no_grad()
    def compute(self, pixel_values: torch.Tensor):
        """The last frozen block's output for ``pixel_values`` (nested tuples of tensors, rows image-major); the
        forward pass stops there."""
        return self._run(pixel_values, to_the_end=False)[1]

    @torch.no_grad()
    def embed_and_keep(self, pixel_values: torch.Tensor):
        """One whole forward pass: ``(embed's features Tensor[N, D], the last frozen block's output)``, i.e. the
        frozen backbone's features (direct transfer's) and what later passes over the same images reuse."""
        return self._run(pixel_values, to_the_end=True)

    def _run(self, pixel_values: torch.Tensor, to_the_end: bool):
        """``(features or None, last frozen block's output)``, from a hook on the last frozen block (and, the first
        time, hooks on the others that note their output shapes for the placeholders)."""
        num_images = pixel_values.shape[0]
        captured: dict[str, object] = {}

        def spec(tensor):
            return _TensorSpec(_rows_per_image(tensor, num_images), tuple(tensor.shape[1:]), tensor.dtype, tensor.device)

        def keep(name, last):
            def hook(module, args, output):
                captured[name] = output if last else _map_leaves(spec, output)
                if last and not to_the_end:
                    raise _StopForward
            return hook

        handles = [module.register_forward_hook(keep(name, i == len(self.blocks) - 1))
                   for i, (name, module) in enumerate(self.blocks) if i == len(self.blocks) - 1 or self._specs is None]
        stem = self._watch_stem(spec, handles) if self._stem is None else None
        features = None
        try:
            features = embed(self.backbone, pixel_values)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        last_name = self.blocks[-1][0]
        if last_name not in captured:
            raise Uncacheable("the last frozen block did not run")
        if self._specs is None:
            self._specs = {name: captured[name] for name, _ in self.blocks[:-1]}
        if stem is not None:
            self._stem = stem.modules()
        output = captured[last_name]
        _map_leaves(lambda t: _rows_per_image(t, num_images), output)
        return features, _map_leaves(torch.Tensor.detach, output)

    def _watch_stem(self, spec, handles: list) -> _StemWatch:
        """Hooks (added to ``handles``) that note which modules run before the first frozen block, and their
        output shapes (``spec`` of an output tensor)."""
        watch = _StemWatch(self.backbone, spec)
        handles.append(self.blocks[0][1].register_forward_pre_hook(watch.block_starts))
        handles += [module.register_forward_hook(watch.note(name)) for name, module in self.backbone.named_modules()
                    if name and not any(name == b or name.startswith(b + ".") for b, _ in self.blocks)]
        return watch

    @contextlib.contextmanager
    def replaced(self, output, num_images: int):
        """Within the block, the frozen blocks return ``output`` (the last) or placeholders (the others)."""
        def constant(value):
            return lambda *args, **kwargs: value

        def placeholder(spec):
            return _map_leaves(lambda s: torch.zeros((), dtype=s.dtype, device=s.device).expand(
                s.rows_per_image * num_images, *s.shape), spec, _TensorSpec)

        modules = dict(self.backbone.named_modules())
        patched = []
        try:
            for module, spec in [(modules[n], spec) for n, spec in (self._stem or {}).items()] + \
                    [(module, self._specs[name]) for name, module in self.blocks[:-1]]:
                module.forward = constant(placeholder(spec))
                patched.append(module)
            self.last.forward = constant(output)
            patched.append(self.last)
            yield
        finally:
            for module in patched:
                if "forward" in module.__dict__:
                    del module.forward


def image_range(structure, start: int, stop: int, num_images: int):
    """Images ``start:stop`` (views) of every tensor in a block output of ``num_images`` images."""
    def rows(tensor):
        per = _rows_per_image(tensor, num_images)
        return tensor[start * per : stop * per]
    return _map_leaves(rows, structure)


def block_output_sizes(backbone: nn.Module, image: torch.Tensor) -> dict[str, int]:
    """``block name -> elements of its output`` for one image (``Tensor[1, 3, H, W]``), from one forward pass;
    empty when a block's output is not made of tensors."""
    modules, sizes = dict(backbone.named_modules()), {}

    def size_of(name):
        def hook(module, args, output):
            leaves: list[torch.Tensor] = []
            _map_leaves(leaves.append, output)
            sizes.setdefault(name, sum(t.numel() for t in leaves))
        return hook

    handles = [modules[n].register_forward_hook(size_of(n)) for n in innermost_blocks(backbone)]
    try:
        with torch.no_grad():
            embed(backbone, image)
    except Uncacheable:
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def cat_leaves(structures: list):
    """Concatenate block outputs of the same structure along the image (row) axis."""
    return _zip_leaves(torch.cat, structures)


def skip_prefix(prefix: FrozenPrefix | None, output, num_images: int):
    """The context in which the backbone skips ``prefix``'s blocks and uses ``output`` (their output for a batch
    of ``num_images`` images); a null context when either is None (the blocks then run as usual)."""
    if prefix is None or output is None:
        return contextlib.nullcontext()
    return prefix.replaced(output, num_images)


class PrefixCache:
    """Outputs of the frozen blocks (those before the first HyperFlow layer), kept per image.

    ``outputs(pixel_values, keys)`` returns the last frozen block's output for a batch, computing only the
    images whose key (any hashable, e.g. ``(dataset, row)``) is not kept yet; ``context(pixel_values, keys)``
    (or :func:`skip_prefix` with ``cache.prefix``) is where the backbone uses it instead of running those blocks.
    Outputs are kept while their total size stays under ``max_bytes`` (0: nothing is kept; the prefix still runs
    once per batch rather than once per forward pass).

    An image's output does not depend on which other images were missing with it: the missing images run in
    passes of :attr:`CHUNK` images (the last one filled with zero images), so that every image is computed in a
    pass of the same shape. Float kernels give results that depend on a batch's size (~1e-6 here), and a cache
    filled in another order (a run resumed from a checkpoint starts with an empty cache) would otherwise hold
    other numbers, which training amplifies; with fixed passes a resumed run equals an uninterrupted one.

    Args:
        backbone: the backbone (with its HyperFlow layers) whose frozen prefix is cached.
        max_bytes: memory budget of the kept outputs.
    """

    CHUNK = 16  # images per pass over missing images (16 took 0.7x the time of one pass of 75 at 64 px)

    def __init__(self, backbone: nn.Module, max_bytes: float):
        self.prefix = FrozenPrefix.find(backbone)
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._kept: dict[Any, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._nested = False  # block outputs that are not one tensor: computed per batch, not kept

    @property
    def active(self) -> bool:
        return self.prefix is not None

    @property
    def images_kept(self) -> int:
        return len(self._kept)

    def outputs(self, pixel_values: torch.Tensor, keys: Sequence | None = None):
        """The last frozen block's output for ``pixel_values: Tensor[N, 3, H, W]`` (rows image-major)."""
        if self.prefix is None:
            raise ValueError("This backbone has no frozen prefix (set HyperFlowConfig.first_adapted_block).")
        if keys is None or self.max_bytes <= 0 or self._nested:
            return self.prefix.compute(pixel_values)
        missing = [i for i, key in enumerate(keys) if key not in self._kept]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = None
        if missing:
            fresh = self._compute_in_chunks(pixel_values[missing] if len(missing) < len(keys) else pixel_values)
            if fresh is None:  # nested block outputs: no per-image cache
                return self.prefix.compute(pixel_values)
        if fresh is not None and len(missing) == len(keys) and self.used_bytes >= self.max_bytes:
            return fresh
        per_image = {}
        if fresh is not None:
            for i, part in zip(missing, fresh.chunk(len(missing)), strict=True):
                per_image[i] = part
                size = part.numel() * part.element_size()
                if self.used_bytes + size <= self.max_bytes:
                    self._kept[keys[i]] = part
                    self.used_bytes += size
        return torch.cat([per_image[i] if i in per_image else self._kept[key] for i, key in enumerate(keys)])

    def _compute_in_chunks(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The prefix output of ``pixel_values`` computed in passes of exactly :attr:`CHUNK` images; None for block
        outputs that are not one tensor."""
        parts = []
        for start in range(0, pixel_values.shape[0], self.CHUNK):
            chunk = pixel_values[start: start + self.CHUNK]
            count = chunk.shape[0]
            if count < self.CHUNK:
                chunk = torch.cat([chunk, chunk.new_zeros((self.CHUNK - count, *chunk.shape[1:]))])
            out = self.prefix.compute(chunk)
            if not isinstance(out, torch.Tensor):
                self._nested = True
                return None
            parts.append(out[: out.shape[0] // self.CHUNK * count])
        return torch.cat(parts)

    def context(self, pixel_values: torch.Tensor, keys: Sequence | None = None):
        """The backbone skips its frozen prefix for this batch (outputs from the cache); a null context when
        the backbone has no frozen prefix."""
        if self.prefix is None:
            return contextlib.nullcontext()
        return skip_prefix(self.prefix, self.outputs(pixel_values, keys), pixel_values.shape[0])
