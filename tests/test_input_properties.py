"""Property-based tests of what users hand in: images (PIL modes, sizes, value ranges, NaN / Inf; tensors of any
dtype, shape and value) and labels. Every input is answered by a clear error (TypeError / ValueError whose message
names what was wrong) or by the correct result, computed here independently of the package's own conversion.

Each property test records its outcome with ``hypothesis.event``: ``pytest --hypothesis-show-statistics`` prints
how many cases ended in a clear error and how many in a checked result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, make_backbone, randomize_drift
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.inputs import PIXEL_LIMIT, encode_labels, to_pixel_values

SIDE = 8  # the processor's output side: small, so that each case costs a millisecond
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# One 8-bit step of the input after the processor's (x / 255 - 0.5) / 0.5, plus one for resampling's rounding.
LSB = 1 / 255 / 0.5


@pytest.fixture(scope="module")
def processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def processed(processor, rgb: np.ndarray) -> torch.Tensor:
    """What the processor makes of an 8-bit RGB array ``uint8 [H, W, 3]``: the expected pixel values."""
    return processor(images=[Image.fromarray(rgb, "RGB")], return_tensors="pt")["pixel_values"]


def clear_error(error: Exception, *words: str) -> None:
    """A user error: TypeError or ValueError whose message says what it is about (one of ``words``)."""
    assert isinstance(error, (TypeError, ValueError)), f"{type(error).__name__}: {error}"
    message = str(error).lower()
    assert any(w.lower() in message for w in words), f"unclear message: {error}"


# ------------------------------------------------------------------------------------------------ PIL images
def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha composited onto white, ``uint8 [H, W, 3]``."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb * a + 255 * (1 - a)).astype(np.uint8)


@st.composite
def pil_images(draw):
    """``(image, expected uint8 [H, W, 3] or the words of the error it must raise)``."""
    width, height = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    kind = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "CMYK", "I;16", "I", "F", "HSV"]))
    shape = (height, width)
    if kind in ("I", "F"):
        dtype = np.int32 if kind == "I" else np.float32
        scale = draw(st.sampled_from(["8-bit", "unit", "16-bit", "negative", "huge", "nan", "inf"]))
        low, high = {"8-bit": (0, 255), "unit": (0, 1), "16-bit": (0, 65535), "negative": (-300, 255),
                     "huge": (0, float(np.float32(1e30))), "nan": (0, 255), "inf": (0, 255)}[scale]
        if kind == "I":
            high = min(high, 2**31 - 1)
        elements = (st.integers(int(low), int(high)) if kind == "I"
                    else st.floats(low, high, width=32, allow_nan=False, allow_infinity=False))
        values = draw(hnp.arrays(dtype, shape, elements=elements))
        if scale in ("nan", "inf") and kind == "F" and values.size:
            values.flat[draw(st.integers(0, values.size - 1))] = np.nan if scale == "nan" else np.inf
        return Image.fromarray(values), _expected_wide(values)
    if kind == "I;16":
        values = draw(hnp.arrays(np.uint16, shape, elements=st.integers(0, 65535)))
        gray = np.round(values / 257).astype(np.uint8)
        return Image.fromarray(values), (("at least one pixel",) if 0 in shape else np.repeat(gray[..., None], 3, -1))
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 1, "1": 1, "CMYK": 4, "HSV": 3}[kind]
    values = draw(hnp.arrays(np.uint8, (*shape, channels), elements=st.integers(0, 255)))
    if kind == "1":
        values = values > 127
    image = _eight_bit_image(kind, values)
    return image, _expected_eight_bit(kind, image, values)


def _eight_bit_image(kind: str, values: np.ndarray) -> Image.Image:
    if kind == "L":
        return Image.fromarray(values[..., 0])
    if kind == "1":
        return Image.fromarray(values[..., 0].astype(np.uint8) * 255).convert("1")
    if kind in ("RGB", "RGBA", "LA"):
        return Image.fromarray(values)  # the mode follows from the channel count
    if kind == "P":  # a grey palette: index i is grey (i, i, i)
        image = Image.fromarray(values[..., 0]).convert("P")
        image.putpalette([v for i in range(256) for v in (i, i, i)])
        return image
    return Image.frombytes(kind, (values.shape[1], values.shape[0]), values.tobytes())


def _expected_eight_bit(kind: str, image: Image.Image, values: np.ndarray):
    if 0 in values.shape[:2]:
        return ("at least one pixel",)
    if kind == "L":
        return np.repeat(values, 3, -1)
    if kind == "1":
        return np.repeat(np.where(values, 255, 0).astype(np.uint8), 3, -1)
    if kind == "RGB":
        return values
    if kind == "RGBA":
        return over_white(values[..., :3], values[..., 3])
    if kind == "LA":
        return over_white(np.repeat(values[..., :1], 3, -1), values[..., 1])
    if kind == "P":
        return np.repeat(np.asarray(image)[..., None], 3, -1)
    return np.asarray(image.convert("RGB"))  # CMYK, HSV: PIL's own colour conversion is the reference


def _expected_wide(values: np.ndarray):
    if 0 in values.shape:
        return ("at least one pixel",)
    data = values.astype(np.float64)
    if not np.isfinite(data).all():
        return ("nan or infinite",)
    if data.min() < 0 or data.max() > 255:
        return ("8-bit", "0..255")
    if 0 < data.max() <= 1:
        return ("within [0, 1]",)
    gray = np.round(data).astype(np.uint8)
    return np.repeat(gray[..., None], 3, -1)


@PROPERTY_SETTINGS
@given(case=pil_images())
def test_pil_images_are_read_as_image_processors_read_them_or_refused(processor, case):
    image, expected = case
    try:
        got = to_pixel_values([image], processor)
    except Exception as error:  # noqa: BLE001 - the assertions say which errors are right
        assert isinstance(expected, tuple), f"{image.mode} {image.size} refused: {error}"
        clear_error(error, *expected)
        event(f"PIL {image.mode}: clear error")
        return
    assert not isinstance(expected, tuple), f"{image.mode} {image.size} accepted, expected an error {expected}"
    assert got.shape == (1, 3, SIDE, SIDE) and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, processed(processor, expected), rtol=0, atol=2 * LSB)
    event(f"PIL {image.mode}: correct pixels")


def test_sixteen_bit_and_float_images_keep_their_contrast(processor):
    """The cases that used to become all white or all black: a 16-bit gradient and a float one stay gradients."""
    ramp = np.zeros((64, 64))
    ramp[:, 32:] = 1.0  # black left half, white right half
    sixteen = to_pixel_values([Image.fromarray((ramp * 65535).astype(np.uint16))], processor)
    floats = to_pixel_values([Image.fromarray((ramp * 255).astype(np.float32))], processor)
    wide = to_pixel_values([Image.fromarray((ramp * 255).astype(np.int32))], processor)
    for pixels in (sixteen, floats, wide):
        assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0  # the full range, black to white
    with pytest.raises(ValueError, match=r"within \[0, 1\].*\* 255"):
        to_pixel_values([Image.fromarray(ramp.astype(np.float32))], processor)
    with pytest.raises(ValueError, match=r"outside the 8-bit scale.*/ 257"):
        to_pixel_values([Image.fromarray((ramp * 65535).astype(np.int32))], processor)


def test_empty_image_and_unreadable_mode_are_refused(processor):
    with pytest.raises(ValueError, match=r"image 1 of 2 is 0x0 pixels"):
        to_pixel_values([Image.new("RGB", (4, 4)), Image.new("RGB", (0, 0))], processor)
    with pytest.raises(ValueError, match=r"image 0 of 1 is 5x0 pixels"):
        to_pixel_values([Image.new("L", (5, 0))], processor)


# ------------------------------------------------------------------------------------------------ tensors
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHER_DTYPES = [torch.uint8, torch.int64, torch.bool, torch.complex64]


@st.composite
def pixel_tensors(draw):
    if draw(st.sampled_from(["pixels", "pixels", "pixels", "any"])) == "pixels":  # [B, 3, H, W], else any shape
        shape = (draw(st.integers(0, 3)), 3, draw(st.integers(0, 5)), draw(st.integers(0, 5)))
        shape = shape if draw(st.integers(0, 3)) == 0 else tuple(max(n, 1) for n in shape)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=2, max_size=5)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 3 + OTHER_DTYPES))
    numel = math.prod(shape)
    kind = draw(st.sampled_from(["normal"] * 4 + ["nan", "inf", "huge", "raw 0..255"]))
    values = torch.randn(numel, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if kind == "raw 0..255":
        values = values.abs() * 100 + 150
    if numel and kind in ("nan", "inf", "huge"):
        values[draw(st.integers(0, numel - 1))] = {"nan": math.nan, "inf": -math.inf, "huge": 1e30}[kind]
    return values.reshape(shape).to(dtype) if dtype.is_floating_point or dtype.is_complex else \
        values.reshape(shape).clamp(0, 1).to(dtype)


def expected_tensor_outcome(x: torch.Tensor):
    """None when ``x`` is valid pixel values, else the words of the error."""
    if x.dim() != 4:
        return ("4-d tensor",)
    if x.shape[1] != 3:
        return ("3 channels",)
    if not x.is_floating_point():
        return ("float tensor",)
    if x.shape[0] == 0:
        return ("no images",)
    if x.shape[2] == 0 or x.shape[3] == 0:
        return ("no pixels",)
    if not bool(torch.isfinite(x).all()):
        return ("nan or infinite",)
    if float(x.abs().max()) > PIXEL_LIMIT:
        return ("magnitude",)
    return None


@PROPERTY_SETTINGS
@given(x=pixel_tensors())
def test_pixel_tensors_are_taken_as_they_are_or_refused(processor, x):
    expected = expected_tensor_outcome(x)
    try:
        got = to_pixel_values(x, processor, dtype=torch.float32)
    except Exception as error:  # noqa: BLE001
        assert expected is not None, f"{x.dtype} {tuple(x.shape)} refused: {error}"
        clear_error(error, *expected)
        event(f"tensor: clear error ({expected[0]})")
        return
    assert expected is None, f"{x.dtype} {tuple(x.shape)} accepted, expected an error {expected}"
    torch.testing.assert_close(got, x.float(), rtol=0, atol=0)
    event("tensor: taken as it is")


# ------------------------------------------------------------------------------------------------ labels
scalars = st.one_of(st.integers(-3, 6), st.integers(-2**70, 2**70), st.text(max_size=3), st.floats(allow_nan=True),
                    st.booleans(), st.none())


@st.composite
def label_inputs(draw):
    kind = draw(st.sampled_from(["ints", "names", "mixed", "scalar", "string", "set", "array", "tensor", "float tensor",
                                 "2-d array"]))
    size = draw(st.integers(0, 8))
    if kind == "ints":
        return draw(st.lists(st.integers(-2, 5) | st.just(2**40), min_size=size, max_size=size))
    if kind == "names":
        return draw(st.lists(st.sampled_from(["cat", "dog", "bird", ""]), min_size=size, max_size=size))
    if kind == "mixed":
        return draw(st.lists(scalars, min_size=size, max_size=size))
    if kind == "scalar":
        return draw(scalars)
    if kind == "string":
        return draw(st.text(min_size=1, max_size=5))
    if kind == "set":
        return set(draw(st.lists(st.integers(0, 4), max_size=size)))
    values = draw(st.lists(st.integers(-1, 4), min_size=size, max_size=size))
    if kind == "array":
        return np.array(values, dtype=np.int64)
    if kind == "2-d array":
        return np.array(values, dtype=np.int64).reshape(1, -1)
    return torch.tensor(values, dtype=torch.float32 if kind == "float tensor" else torch.long)


def expected_labels(labels):
    """``{"classes", "codes"}`` for valid labels, else the words of the error; from the documented contract."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.is_floating_point():
            return ("1-d integer tensor",)
        labels = labels.tolist()
    elif isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            return ("1-d",)
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        return ("one label per image",)
    if not labels:
        return ("no support labels",)
    ints = all(type(y) is int for y in labels)
    if not ints and not all(type(y) is str for y in labels):
        return ("all ints or all strings",)
    classes = sorted(set(labels))
    if ints and classes[0] < 0:
        return ("0..c-1",)
    if ints and classes != list(range(len(classes))):
        return ("no support image",)
    if len(classes) < 2:
        return ("at least two classes",)
    return {"classes": classes, "codes": [classes.index(y) for y in labels]}


@PROPERTY_SETTINGS
@given(labels=label_inputs())
def test_labels_are_encoded_or_refused(labels):
    expected = expected_labels(labels)
    try:
        codes, classes = encode_labels(labels)
    except Exception as error:  # noqa: BLE001
        assert isinstance(expected, tuple), f"{labels!r:.80} refused: {error}"
        clear_error(error, *expected)
        event(f"labels: clear error ({expected[0]})")
        return
    assert not isinstance(expected, tuple), f"{labels!r:.80} accepted as {classes}, expected an error {expected}"
    assert {"classes": classes, "codes": codes.tolist()} == expected
    event("labels: encoded")


@st.composite
def labels_and_classes(draw):
    labels = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6))
    if draw(st.booleans()):  # the task's classes in any order
        return labels, draw(st.permutations(sorted(set(labels))))
    return labels, draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=5))


@PROPERTY_SETTINGS
@given(case=labels_and_classes())
def test_labels_against_given_classes(case):
    labels, classes = case
    try:
        codes, names = encode_labels(labels, classes)
    except ValueError as error:
        wrong = (len(set(classes)) != len(classes) or not set(labels) <= set(classes)
                 or set(classes) - set(labels) or len(classes) < 2)
        assert wrong, f"{labels} with classes {classes} refused: {error}"
        event("labels with classes: clear error")
        return
    assert names == classes and [classes[i] for i in codes.tolist()] == labels
    event("labels with classes: encoded")


def test_the_label_examples():
    with pytest.raises(ValueError, match=r"Integer labels must be 0..C-1, got -1"):
        encode_labels([-1, 0])
    with pytest.raises(TypeError, match=r"got int 3: wrap a single label in a list"):
        encode_labels(3)
    with pytest.raises(TypeError, match=r"got str 'cat'"):
        encode_labels("cat")  # not the labels ['c', 'a', 't']
    with pytest.raises(ValueError, match=r"class\(es\) \[1, 2, 3"):
        encode_labels([0, 10**12])  # answered at once, without a list of 10**12 classes


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def adapter():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=2))
    randomize_drift(adapter)
    return adapter


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
def test_bad_pixels_in_support_or_query_are_refused_before_any_work(adapter, bad):
    support = images(4)
    support[2, 1, 5, 7] = bad
    words = "magnitude" if bad == 1e30 else "NaN or infinite"
    with pytest.raises(ValueError, match=words):
        adapter.adapt(support, [0, 1, 0, 1])
    # in adapt_many, a bad last task stops everything before the first task is adapted
    calls = []
    adapter.backbone.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=rf"Task 2 of 3: .*{words}"):
        adapter.adapt_many([(images(4), [0, 1, 0, 1]), (images(4, 1), [0, 1, 0, 1]), (support, [0, 1, 0, 1])])
    assert not calls
    task = adapter.adapt(images(4), [0, 1, 0, 1])
    query = images(3, 5)
    query[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=words):
        task.predict(query)


def test_labels_reach_adapt_as_clear_errors(adapter):
    with pytest.raises(TypeError, match="wrap a single label in a list"):
        adapter.adapt(images(1), 0)
    with pytest.raises(ValueError, match="got -1"):
        adapter.adapt(images(2), [-1, 0])
