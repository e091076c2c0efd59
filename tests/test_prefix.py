"""The frozen prefix: the blocks it holds, skipping them with a kept output (the first pass keeps it on its way),
the high-resolution early blocks, and the per-image cache of meta-training."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone
from tolerances import assert_same_math

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import embed
from hf_hyperflow.prefix import FrozenPrefix, PrefixCache, block_output_sizes, innermost_blocks, skip_prefix


@pytest.mark.parametrize("model_type", ["timm_wrapper", "vit", "resnet", "clip_vision_model", "swin"])
def test_embed_and_keep_is_embed_plus_the_prefix_output(model_type):
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(first_adapted_block=-1))
    prefix = adapter.frozen_prefix()
    pixels = torch.randn(5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    features, output = prefix.embed_and_keep(pixels)
    with torch.no_grad():
        torch.testing.assert_close(features, embed(adapter.backbone, pixels), rtol=0, atol=0)
    torch.testing.assert_close(output, prefix.compute(pixels), rtol=0, atol=0)
    # Inside replaced() the kept output stands in for the frozen blocks, and the stem (patch embedding, stem
    # convolution) does not run either.
    first_block = prefix.blocks[0][0]
    stem = next(m for n, m in adapter.backbone.named_modules()
                if isinstance(m, torch.nn.Conv2d) and not n.startswith(first_block.rsplit(".", 1)[0]))
    computed = []  # outputs the stem's convolution really computed (a placeholder is a zero with stride 0)
    handle = stem.register_forward_hook(lambda module, args, out: computed.append(min(out.stride()) > 0))
    with torch.no_grad(), prefix.replaced(output, pixels.shape[0]):
        assert_same_math(embed(adapter.backbone, pixels), features)
    handle.remove()
    assert not any(computed)


def test_early_blocks_are_the_high_resolution_start():
    backbone = make_backbone("timm_wrapper")
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    sizes = block_output_sizes(backbone, image)
    names = list(sizes)
    early = FrozenPrefix.early(backbone, sizes)
    kept = [name for name, _ in early.blocks]
    assert kept == names[: len(kept)] and 0 < len(kept) < len(names)
    assert all(8 * sizes[n] <= max(sizes.values()) for n in names[len(kept):])  # the rest: small outputs
    assert 8 * sizes[kept[-1]] > max(sizes.values())
    assert [n for n, _ in FrozenPrefix.early(backbone, sizes, until=names[0]).blocks] == names[:1]
    assert FrozenPrefix.early(make_backbone("vit"), block_output_sizes(make_backbone("vit"), image)) is None


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["vit", "resnet", "timm_wrapper"])
def test_skipping_the_prefix_with_its_output_gives_the_same_features(model_type):
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(first_adapted_block=-1))
    prefix = FrozenPrefix.find(adapter.backbone)
    assert prefix is not None
    blocks = innermost_blocks(adapter.backbone)
    assert [name for name, _ in prefix.blocks] == blocks[: len(prefix.blocks)] and len(prefix.blocks) < len(blocks)
    x = _pixels(4)
    with torch.no_grad():
        expected = embed(adapter.backbone, x)
        with skip_prefix(prefix, prefix.compute(x), x.shape[0]):
            skipped = embed(adapter.backbone, x)
    assert_same_math(skipped, expected)
    assert skip_prefix(None, None, 4).__class__.__name__ == "nullcontext"


def test_no_prefix_when_every_block_is_adapted():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig())
    assert FrozenPrefix.find(adapter.backbone) is None
    cache = PrefixCache(adapter.backbone, max_bytes=2**20)
    assert not cache.active
    with pytest.raises(ValueError, match="no frozen prefix"):
        cache.outputs(_pixels(2))


def test_the_cache_keeps_outputs_per_image_within_its_budget():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(first_adapted_block=-1))
    cache = PrefixCache(adapter.backbone, max_bytes=2**20)
    x = _pixels(4)
    first = cache.outputs(x, ["a", "b", "c", "d"])
    assert (cache.hits, cache.misses, cache.images_kept) == (0, 4, 4)
    again = cache.outputs(torch.cat([x[2:], _pixels(1, seed=9)]), ["c", "d", "e"])
    assert (cache.hits, cache.misses, cache.images_kept) == (2, 5, 5)
    per_image = first.shape[0] // 4
    torch.testing.assert_close(again[: 2 * per_image], first[2 * per_image:])
    small = PrefixCache(adapter.backbone, max_bytes=first[:per_image].numel() * first.element_size())
    small.outputs(x, ["a", "b", "c", "d"])
    assert small.images_kept == 1 and small.used_bytes <= small.max_bytes
    with torch.no_grad():
        expected = embed(adapter.backbone, x)
        with cache.context(x, ["a", "b", "c", "d"]):
            assert_same_math(embed(adapter.backbone, x), expected)


@pytest.mark.parametrize("model_type", ["timm_wrapper", "resnet"])
def test_an_images_cached_output_does_not_depend_on_what_was_missing_with_it(model_type):
    """A run resumed from a checkpoint refills its cache in another order: every image's output must be the same
    bits whichever images were missing with it (float kernels round by batch size: timm's EfficientNet differs
    between batches of 30 and 7, ResNet between 1 and more)."""
    adapter = HyperFlowAdapter(make_backbone(model_type), HyperFlowConfig(first_adapted_block=-1))
    x = _pixels(30, seed=3)
    keys = list(range(30))
    whole = PrefixCache(adapter.backbone, max_bytes=2**30).outputs(x, keys)
    for order in ([list(range(0, 30, 7)), list(range(30))], [[5], list(range(1, 30, 2)), list(range(30))],
                  [list(range(30))[::-1][:17], list(range(30))]):
        cache = PrefixCache(adapter.backbone, max_bytes=2**30)
        for chosen in order:  # earlier batches leave other images missing from the last one
            got = cache.outputs(x[chosen], [keys[i] for i in chosen])
        assert torch.equal(got, whole), order
