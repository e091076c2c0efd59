import pytest
import torch

from hf_hyperflow.augment import (
    AUGMENT_POLICIES,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    diff_augment,
    flip_horizontal,
    translate,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(batch=6, channels=3, size=16, seed=0, dtype=torch.float32):
    return torch.randn(batch, channels, size, size, generator=_gen(seed), dtype=dtype)


def _reference_translate(images, shift_y, shift_x):
    out = torch.zeros_like(images)
    _, _, height, width = images.shape
    for b in range(images.shape[0]):
        for i in range(height):
            for j in range(width):
                si, sj = i - int(shift_y[b]), j - int(shift_x[b])
                if 0 <= si < height and 0 <= sj < width:
                    out[b, :, i, j] = images[b, :, si, sj]
    return out


def test_same_seed_same_output_different_seed_different():
    images = _images()
    a = diff_augment(images, _gen(1))
    b = diff_augment(images, _gen(1))
    c = diff_augment(images, _gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_generator_state_advances():
    images = _images()
    gen = _gen(3)
    first = diff_augment(images, gen)
    second = diff_augment(images, gen)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("policy", [AUGMENT_POLICIES, ("color",), ("translation",), ("flip",)])
def test_probability_zero_is_identity(policy):
    images = _images()
    out = diff_augment(images, _gen(0), probability=0.0, policy=policy)
    torch.testing.assert_close(out, images, rtol=0, atol=0)


def test_probability_one_with_colour_changes_every_image():
    images = _images(batch=32)
    out = diff_augment(images, _gen(0), probability=1.0, policy=("color",))
    changed = (out != images).flatten(1).any(dim=1)
    assert bool(changed.all())


def test_probability_is_per_image():
    images = _images(batch=400, size=4)
    out = diff_augment(images, _gen(5), probability=0.5, policy=("color",))
    unchanged = (out == images).flatten(1).all(dim=1)
    fraction = unchanged.float().mean().item()
    assert 0.4 < fraction < 0.6  # 400 Bernoulli(0.5) draws: sd 0.025
    # the augmented images really changed
    assert bool((out[~unchanged] != images[~unchanged]).flatten(1).any(dim=1).all())


def test_empty_policy_is_identity():
    images = _images()
    out = diff_augment(images, _gen(0), probability=1.0, policy=())
    torch.testing.assert_close(out, images, rtol=0, atol=0)


def test_translate_moves_a_delta_by_the_known_shift():
    images = torch.zeros(3, 2, 8, 10)
    images[:, :, 3, 4] = 1.0
    out = translate(images, torch.tensor([2, -3, 0]), torch.tensor([-1, 5, 6]))
    expected = torch.zeros_like(images)
    expected[0, :, 5, 3] = 1.0  # down 2, left 1
    # image 1: row 3 - 3 = 0, column 4 + 5 = 9 (last column)
    expected[1, :, 0, 9] = 1.0
    # image 2: column 4 + 6 = 10 leaves the frame: zero padding, nothing wraps around
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_translate_matches_reference_loop():
    images = _images(batch=5, channels=2, size=7)
    shift_y = torch.tensor([0, 1, -2, 3, -7])
    shift_x = torch.tensor([0, -1, 2, 4, 1])
    torch.testing.assert_close(
        translate(images, shift_y, shift_x), _reference_translate(images, shift_y, shift_x), rtol=0, atol=0
    )


def test_translate_gradient_counts_pixels_kept():
    images = torch.randn(1, 1, 5, 5, requires_grad=True)
    translate(images, torch.tensor([1]), torch.tensor([-2])).sum().backward()
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, :4, 2:] = 1.0  # source rows 0..3 and columns 2..4 land inside the frame
    torch.testing.assert_close(images.grad, expected, rtol=0, atol=0)


def test_diff_augment_translation_bounds_on_delta_images():
    size, ratio = 16, 0.125
    max_shift = int(size * ratio + 0.5)  # 2
    images = torch.zeros(300, 1, size, size)
    images[:, :, 8, 8] = 1.0
    out = diff_augment(images, _gen(7), probability=1.0, policy=("translation",), translation_ratio=ratio)
    assert torch.equal(out.flatten(1).sum(dim=1), torch.ones(300))  # centre delta never leaves the frame
    positions = out.flatten(1).argmax(dim=1)
    dy, dx = positions // size - 8, positions % size - 8
    assert set(dy.tolist()) == set(range(-max_shift, max_shift + 1))
    assert set(dx.tolist()) == set(range(-max_shift, max_shift + 1))


def test_flip_horizontal_known_image():
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(2, 3, 2, 4)
    out = flip_horizontal(ramp, torch.tensor([True, False]))
    assert out[0, 0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert out[1, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_diff_augment_flip_is_either_identity_or_mirror():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(100, 3, 8, 8).contiguous()
    out = diff_augment(ramp, _gen(11), probability=1.0, policy=("flip",))
    same = (out == ramp).flatten(1).all(dim=1)
    mirrored = (out == ramp.flip(-1)).flatten(1).all(dim=1)
    assert bool((same | mirrored).all())
    assert 30 < int(mirrored.sum()) < 70


def test_colour_operations_known_values():
    images = torch.tensor([[[[1.0]], [[2.0]], [[6.0]]]])  # one 1x1 RGB pixel, channel mean 3
    torch.testing.assert_close(
        adjust_brightness(images, torch.tensor([0.25])), torch.tensor([[[[1.25]], [[2.25]], [[6.25]]]])
    )
    torch.testing.assert_close(adjust_saturation(images, torch.tensor([0.0])), torch.full_like(images, 3.0))
    torch.testing.assert_close(
        adjust_saturation(images, torch.tensor([2.0])), torch.tensor([[[[-1.0]], [[1.0]], [[9.0]]]])
    )
    two_pixels = torch.tensor([[[[0.0, 4.0]]]])  # image mean 2
    torch.testing.assert_close(
        adjust_contrast(two_pixels, torch.tensor([0.5])), torch.tensor([[[[1.0, 3.0]]]])
    )
    torch.testing.assert_close(adjust_contrast(two_pixels, torch.tensor([1.0])), two_pixels)


def test_colour_ranges():
    # a grey image: saturation and contrast leave it alone, brightness adds U(-0.5, 0.5)
    grey = torch.full((500, 3, 2, 2), 0.3, dtype=torch.float64)
    out = diff_augment(grey, _gen(13), probability=1.0, policy=("color",))
    offsets = out[:, 0, 0, 0] - 0.3
    torch.testing.assert_close(out, (0.3 + offsets).view(-1, 1, 1, 1).expand_as(out))
    assert offsets.min() >= -0.5 and offsets.max() <= 0.5
    assert offsets.min() < -0.45 and offsets.max() > 0.45
    # channels (+1, -1) everywhere: the output is b +- s * c with s ~ U(0, 2), c ~ U(0.5, 1.5)
    image = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)]).expand(500, 2, 2, 2).double()
    out = diff_augment(image, _gen(17), probability=1.0, policy=("color",))
    gain = (out[:, 0] - out[:, 1]).flatten(1)[:, 0] / 2
    assert gain.min() >= 0.0 and gain.max() < 3.0
    assert gain.min() < 0.1 and gain.max() > 2.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device_preserved_and_input_untouched(dtype):
    images = _images(batch=4, channels=3, size=12, dtype=dtype)
    before = images.clone()
    out = diff_augment(images, _gen(0), probability=1.0)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    torch.testing.assert_close(images, before, rtol=0, atol=0)


def test_differentiable_with_respect_to_images():
    images = _images(batch=4).requires_grad_(True)
    out = diff_augment(images, _gen(0), probability=1.0)
    out.square().sum().backward()
    assert images.grad is not None and images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # flip alone is a permutation: the gradient of the sum is all ones
    images.grad = None
    diff_augment(images, _gen(0), probability=1.0, policy=("flip",)).sum().backward()
    torch.testing.assert_close(images.grad, torch.ones_like(images))


def test_input_validation_messages():
    images = _images()
    with pytest.raises(ValueError, match=r"rank 4\), got shape \(3, 16, 16\)"):
        diff_augment(images[0], _gen(0))
    with pytest.raises(ValueError, match=r"probability must be a number in \[0, 1\], got 1.5"):
        diff_augment(images, _gen(0), probability=1.5)
    with pytest.raises(ValueError, match=r"probability must be a number in \[0, 1\], got nan"):
        diff_augment(images, _gen(0), probability=float("nan"))
    with pytest.raises(
        ValueError,
        match=r"unknown augmentation policy name\(s\) \['cutout'\]; choose from color, translation, flip",
    ):
        diff_augment(images, _gen(0), policy=("color", "cutout"))
    with pytest.raises(TypeError, match=r"policy must be a tuple of operation names"):
        diff_augment(images, _gen(0), policy="color")
    with pytest.raises(ValueError, match=r"translation_ratio must be a number in \[0, 1\], got -0.1"):
        diff_augment(images, _gen(0), translation_ratio=-0.1)
    with pytest.raises(TypeError, match=r"images must be floating point, got dtype torch.uint8"):
        diff_augment(images.to(torch.uint8), _gen(0))
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator, got int"):
        diff_augment(images, 0)
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor"):
        diff_augment(images.numpy(), _gen(0))
