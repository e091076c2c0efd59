"""FrozenPrefix: the whole first pass keeps the frozen prefix's output on its way."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.backbones import embed
from hf_hyperflow.prefix import FrozenPrefix, block_output_sizes


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
        torch.testing.assert_close(embed(adapter.backbone, pixels), features, rtol=1e-6, atol=1e-6)
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
