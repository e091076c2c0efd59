"""Labels and images in: label encoding and its errors, pixel tensors and PIL images (grayscale, RGBA, palette)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone, transformers_notices
from conftest import random_pixels as pixels
from PIL import Image

from hf_hyperflow.inputs import at_low_resolution, domain_view, encode_labels, without_colour


def test_labels_strings_and_predictions_of_the_same_kind(adapter):
    task = adapter.adapt(pixels(4), ["cat", "dog", "cat", "dog"])
    assert task.classes == ["cat", "dog"]
    assert set(task.predict(pixels(3))) <= {"cat", "dog"}
    task = adapter.adapt(pixels(4), [1, 0, 1, 0])
    assert all(isinstance(y, int) for y in task.predict(pixels(3)))
    probabilities = task.predict_proba(pixels(3))
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))


def test_one_class_only(adapter):
    with pytest.raises(ValueError, match="at least two classes"):
        adapter.adapt(pixels(3), [0, 0, 0])


def test_class_without_support_image(adapter):
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no support image"):
        adapter.adapt(pixels(3), [0, 2, 2])
    with pytest.raises(ValueError, match=r"Class\(es\) \['bird'\] have no support image"):
        adapter.adapt(pixels(2), ["cat", "dog"], classes=["cat", "dog", "bird"])


def test_labels_that_do_not_match_images(adapter):
    with pytest.raises(ValueError, match="4 support images but 3 labels"):
        adapter.adapt(pixels(4), [0, 1, 0])


def test_mixed_label_types():
    with pytest.raises(TypeError, match="all ints or all strings"):
        encode_labels([0, "a"])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        encode_labels(torch.tensor([0.0, 1.0]))


def test_label_not_in_classes():
    with pytest.raises(ValueError, match=r"not among classes"):
        encode_labels(["cat", "cow"], classes=["cat", "dog"])


def test_wrong_tensor_rank_and_channels(adapter):
    with pytest.raises(ValueError, match=r"4-D tensor \[B, 3, H, W\].*unsqueeze"):
        adapter.adapt(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE), [0])
    with pytest.raises(ValueError, match="3 channels on axis 1"):
        adapter.adapt(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE), [0, 1])
    with pytest.raises(TypeError, match="float tensor"):
        adapter.adapt(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), [0, 1])
    with pytest.raises(TypeError, match="PIL images or one pixel_values tensor"):
        adapter.adapt([np.zeros((8, 8, 3))] * 2, [0, 1])


def test_grayscale_rgba_and_palette_images_are_converted(adapter):
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(4)]
    gray = [im.convert("L") for im in rgb]
    rgba = [im.convert("RGBA") for im in rgb]
    palette = [im.convert("P") for im in rgb]
    labels = [0, 1, 0, 1]
    for images in (gray, rgba, palette):
        task = adapter.adapt(images, labels)
        assert task.logits(images).shape == (4, 2)
    # RGBA of an opaque RGB image is the same image
    torch.testing.assert_close(adapter.adapt(rgba, labels).logits(rgb), adapter.adapt(rgb, labels).logits(rgb))


def test_images_without_colour_keep_their_luma_in_every_channel():
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 200, 90]]], dtype=np.uint8)
    rgb = Image.fromarray(colours)
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # composited onto white first, as the processors read it
    grey_rgb, grey_transparent = without_colour([rgb, transparent])
    values = np.asarray(grey_rgb)
    assert grey_rgb.mode == "RGB" and (values == values[..., :1]).all()
    # ITU-R 601 luma, L = (299 R + 587 G + 114 B) / 1000, rounded by PIL
    expected = np.rint(colours.astype(float) @ [0.299, 0.587, 0.114])
    np.testing.assert_allclose(values[..., 0], expected, atol=1)
    assert (np.asarray(grey_transparent) == 255).all()
    with pytest.raises(TypeError, match=r"must be PIL images .*; got \['ndarray'\]"):
        without_colour([rgb, np.zeros((2, 2, 3))])


def test_images_at_low_resolution_are_thumbnails_enlarged_back():
    stripes = np.zeros((32, 64, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: no 8-pixel thumbnail can hold them
    block = np.full((32, 64, 3), 255, dtype=np.uint8)
    block[:, :32] = 0  # a half-black image: as coarse as the thumbnail
    small = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    shown = at_low_resolution([Image.fromarray(stripes), Image.fromarray(block), small], 8)
    assert [image.size for image in shown] == [(64, 32), (64, 32), (6, 4)]
    assert all(image.mode == "RGB" for image in shown)
    np.testing.assert_allclose(np.asarray(shown[0], dtype=float), 127.5, atol=1)  # box filter: the stripes' mean
    left, right = np.asarray(shown[1], dtype=int)[:, :28], np.asarray(shown[1], dtype=int)[:, 36:]
    assert (left == 0).all() and (right == 255).all()  # edges blur, flat parts stay
    assert (np.asarray(shown[2]) == 255).all()  # already small: composited onto white, not resized
    grey_low = domain_view([Image.fromarray(block)], grey=True, low_resolution=8, then=lambda images: len(images))
    assert grey_low == 1
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"side must be an integer >= 1"):
            at_low_resolution([small], bad)
    with pytest.raises(TypeError, match=r"must be PIL images"):
        at_low_resolution([stripes], 8)


def test_the_backbones_own_processor_is_read_without_a_backend_notice(tmp_path):
    """A backbone folder's own image processor is read with the PIL backend, the one the package uses: the same
    pixels with or without torchvision, and no "Requested torchvision backend is not available" line."""
    import json

    from transformers import AutoModel

    from hf_hyperflow.inputs import default_image_processor

    make_backbone("timm_wrapper").save_pretrained(tmp_path / "backbone")
    config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    config["pretrained_cfg"] = {"input_size": [3, 48, 48], "interpolation": "bicubic", "mean": [0.5] * 3,
                                "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}  # as a timm checkpoint has
    (tmp_path / "backbone" / "config.json").write_text(json.dumps(config))
    backbone = AutoModel.from_pretrained(tmp_path / "backbone")
    with transformers_notices() as notices:
        processor = default_image_processor(backbone, IMAGE_SIZE)
    assert [notice for notice in notices if "backend" in notice] == []
    pixels = processor(Image.new("RGB", (40, 40), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # the checkpoint's mean / std
