"""Labels and images in: label encoding, pixel coercion, the default image processor.

Users give support labels as ints or strings and images as PIL images or a ``pixel_values`` tensor; these
functions turn them into ``LongTensor[S]`` labels in ``0..C-1`` and ``Tensor[B, 3, H, W]`` pixels, with errors
that say what was wrong.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .io import read_json_checked

__all__ = ["encode_labels", "default_image_processor", "to_pixel_values", "check_images", "to_rgb", "without_colour",
           "at_low_resolution", "domain_view", "check_pair", "processor_size", "PixelTransform", "PIXEL_LIMIT",
           "PROCESSOR_FILE", "load_image_processor"]

PROCESSOR_FILE = "preprocessor_config.json"

# The largest pixel value magnitude accepted. Image processors rescale to [0, 1] and normalise with a mean and
# std of the data (ImageNet: at most (1 - 0.406) / 0.225 = 2.6); 100 leaves room for any such normalisation and
# augmentation while catching raw 0..255 or unscaled data and overflowing values.
PIXEL_LIMIT = 100.0
# PIL modes read as they are (8 bits a channel), 16-bit modes (scaled), 32-bit integer and float modes (8-bit scale).
EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBX", "RGBa",
                             "La"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
WIDE_MODES = frozenset({"I", "F"})


def encode_labels(labels, classes: Sequence | None = None) -> tuple[torch.Tensor, list]:
    """Map user labels (ints or strings) to ``LongTensor[S]`` in ``0..C-1`` and the list of C classes.

    ``labels``: a list, tuple, 1-D array or 1-D integer tensor with one label per image. Without ``classes``,
    the classes are the sorted distinct labels; integer labels must then be ``0..C-1`` (a gap means a class
    without support images).

    Raises:
        TypeError: labels that are not a sequence (a single label, a string, a set), or neither all ints nor
            all strings.
        ValueError: fewer than two classes, a class without support images, a negative integer label, a label
            not in ``classes``.
    """
    labels, kind = _label_values(labels)
    if classes is None:
        classes = _classes_of(labels, kind)
    else:
        classes = _given_classes(labels, classes)
    if len(classes) < 2:
        raise ValueError(f"A task needs at least two classes, got only {classes!r}.")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[y] for y in labels], dtype=torch.long), classes


def _label_values(labels) -> tuple[list, type]:
    """``(labels as a list of Python ints or strings, int or str)``; TypeError / ValueError for anything else."""
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"Labels as a tensor must be a 1-D integer tensor, got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}.")
        labels = labels.tolist()
    elif not isinstance(labels, (str, bytes, Mapping, np.ndarray)) and hasattr(labels, "__array__"):
        labels = np.asarray(labels)  # e.g. a pandas Series
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise TypeError(f"Labels as an array must be 1-D (one label per image), got shape {labels.shape}"
                            + (": wrap a single label in a list, [label]." if labels.ndim == 0 else "."))
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        single = isinstance(labels, (str, bytes, int, float)) or hasattr(labels, "__index__")
        raise TypeError(f"Labels must be a list (or tuple, 1-D array or tensor) with one label per image, got "
                        f"{type(labels).__name__} {labels!r:.60}" + (": wrap a single label in a list, [label]."
                                                                    if single else "."))
    labels = list(labels)
    if not labels:
        raise ValueError("No support labels were given: a task needs labelled support images.")
    if all(isinstance(y, str) for y in labels):
        return labels, str
    if all(hasattr(y, "__index__") and not isinstance(y, (str, bool, np.bool_)) for y in labels):
        return [int(y) for y in labels], int
    kinds = sorted({type(y).__name__ for y in labels})
    raise TypeError(f"Labels must be all ints or all strings, got {kinds}" + (
        " (floats are not labels: convert them with int(), or use class names)." if "float" in kinds else "."))


def _classes_of(labels: list, kind: type) -> list:
    """The sorted distinct labels; integer ones must be ``0..C-1``."""
    classes = sorted(set(labels))
    if kind is int and classes[0] < 0:
        raise ValueError(f"Integer labels must be 0..C-1, got {classes[0]}: number the classes from 0, name them "
                         "with strings, or pass classes=[...] listing the task's classes.")
    if kind is int and classes[-1] != len(classes) - 1:
        present = set(classes)
        missing = list(itertools.islice((c for c in range(classes[-1]) if c not in present), 10))
        raise ValueError(
            f"Integer labels must be 0..C-1, but class(es) {missing} have no support image. Give each class "
            f"at least one support image, or pass classes=[...] to name the classes of the task."
        )
    return classes


def _given_classes(labels: list, classes) -> list:
    """``classes`` as a list, checked against the labels (each class has a support image, no unknown label)."""
    if isinstance(classes, (str, bytes, Mapping)) or not isinstance(classes, (Sequence, np.ndarray)):
        raise TypeError(f"classes must be a list of the task's classes, got {type(classes).__name__} {classes!r:.60}.")
    classes = classes.tolist() if isinstance(classes, np.ndarray) else list(classes)
    try:
        distinct = set(classes)
    except TypeError:
        raise TypeError(f"classes must hold ints or strings, got {classes!r:.80}.") from None
    if len(distinct) != len(classes):
        raise ValueError(f"classes={classes!r} lists a class twice.")
    unknown = sorted({str(y) for y in labels if y not in distinct})
    if unknown:
        raise ValueError(f"Labels {unknown[:10]} are not among classes={classes!r}.")
    present = set(labels)
    empty = [c for c in classes if c not in present]
    if empty:
        raise ValueError(f"Class(es) {empty[:10]} have no support image: every class needs at least one.")
    return classes


def default_image_processor(backbone: nn.Module, image_size: int):
    """A ViT image processor (PIL backend: the faster one on CPU for small batches) that resizes to
    ``image_size`` with the backbone's mean / std.

    The mean / std come from the backbone's own image processor when its folder has one, else from timm's
    ``pretrained_cfg``, else ImageNet's. When the backbone's own processor already outputs ``image_size``
    it is used as it is.
    """
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    name = getattr(backbone.config, "_name_or_path", None) or ""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pretrained_cfg = getattr(backbone.config, "pretrained_cfg", None) or {}
    if pretrained_cfg:
        mean, std = pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std)
    if name and os.path.isdir(name):
        try:
            own = AutoImageProcessor.from_pretrained(name, backend="pil")  # the same pixels with or without torchvision
        except (OSError, ValueError):
            own = None
        if own is not None:
            if processor_size(own) == image_size:
                return own
            mean, std = getattr(own, "image_mean", None) or mean, getattr(own, "image_std", None) or std
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                image_std=list(std))


def load_image_processor(folder: Path):
    """The image processor saved in ``folder`` (``preprocessor_config.json``).

    Raises:
        ValueError: a file that is not valid JSON or not an image processor's config, naming it.
    """
    from transformers import AutoImageProcessor

    path = Path(folder) / PROCESSOR_FILE
    read_json_checked(path)
    try:
        processor = AutoImageProcessor.from_pretrained(str(folder))
        # a field of the wrong kind (a size of [], a mean of "x") shows only when an image is processed: try one
        probe = processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"]
        if probe.ndim != 4 or probe.shape[1] != 3 or probe.shape[2] < 1 or probe.shape[3] < 1:
            raise ValueError(f"it turns an RGB image into pixel values of shape {tuple(probe.shape)}")
    except Exception as error:  # whatever the processor raises on its own fields
        raise ValueError(f"{path} is not a valid image processor config ({type(error).__name__}: {error}). Save it "
                         "again.") from None
    return processor


def to_pixel_values(images, image_processor, device=None, dtype=None) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` from a list of PIL images (read as :func:`to_rgb` does, then processed) or a pixel
    tensor, checked with :func:`check_images` (finite, of the magnitudes an image processor gives).

    Raises:
        TypeError: images of another type.
        ValueError: see :func:`check_images`.
    """
    check_images(images)
    if isinstance(images, torch.Tensor):
        pixel_values = images
    else:
        rgb = [to_rgb(im, _where(i, len(images), im)) for i, im in enumerate(images)]
        pixel_values = image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        _check_values(pixel_values)
    return pixel_values.to(device=device, dtype=dtype)


def check_images(images) -> None:
    """Check images without processing them: a non-empty list of PIL images with at least one pixel each (and, for
    32-bit and float ones, values :func:`to_rgb` can read), or a float ``Tensor[B, 3, H, W]`` of finite values
    within ``PIXEL_LIMIT``.

    Raises:
        TypeError: images of another type, a tensor that is not floating point.
        ValueError: no images, a tensor of the wrong shape, NaN / Inf or huge pixel values, an empty image, an
            image mode that cannot be read.
    """
    if isinstance(images, torch.Tensor):
        _check_tensor(images)
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images were given.")
        _check_all_pil(images)
        for i, image in enumerate(images):
            _check_pil(image, _where(i, len(images), image))
    else:
        raise TypeError(
            f"Images must be a list of PIL images or a pixel_values tensor [B, 3, H, W], got {type(images).__name__}."
        )


def _check_all_pil(images: list | tuple) -> None:
    """TypeError naming the types in ``images`` that are not PIL images."""
    bad = sorted({type(im).__name__ for im in images if not isinstance(im, Image.Image)})
    if bad:
        raise TypeError(f"Images must be PIL images or one pixel_values tensor [B, 3, H, W]; got {bad}.")


def _where(index: int, count: int, image: Image.Image) -> str:
    name = getattr(image, "filename", "") or ""
    return f"image {index} of {count}" + (f" ({name})" if name else "")


def _check_tensor(pixel_values: torch.Tensor) -> None:
    """Shape, dtype, finiteness and magnitude of a pixel tensor."""
    if pixel_values.dim() != 4:
        raise ValueError(
            f"pixel_values must be a 4-D tensor [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
            + (" (add the batch axis with .unsqueeze(0))" if pixel_values.dim() == 3 else "") + "."
        )
    if pixel_values.shape[1] != 3:
        raise ValueError(
            f"pixel_values must have 3 channels on axis 1 ([B, 3, H, W]), got shape {tuple(pixel_values.shape)}."
            " Convert grayscale / RGBA images to RGB first (or pass PIL images)."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor (as image processors return), got {pixel_values.dtype}.")
    if pixel_values.shape[0] == 0:
        raise ValueError("No images were given.")
    if pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} have no pixels.")
    _check_values(pixel_values)


def _check_values(pixel_values: torch.Tensor) -> None:
    """Finite values within ``PIXEL_LIMIT``, naming the images that are not (one pass over the values when
    they are fine: NaN and infinities carry through the minimum and maximum)."""
    low, high = (float(v) for v in torch.aminmax(pixel_values))
    if not (math.isfinite(low) and math.isfinite(high)):
        finite = torch.isfinite(pixel_values).flatten(1).all(1)
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"pixel_values of image(s) {bad[:10]} hold NaN or infinite values: check how they were made "
                         "(a division by zero, a failed decode), or pass PIL images.")
    peak = max(-low, high)
    if peak > PIXEL_LIMIT:
        raise ValueError(
            f"pixel_values reach {peak:.3g} in magnitude, but an image processor's output (rescaled to [0, 1], then "
            f"normalised) stays within a few units (this check allows {PIXEL_LIMIT:g}). Raw 0..255 pixels or "
            "unscaled data? Pass PIL images, or the image processor's pixel_values (adapter.pixel_values(images))."
        )


def _check_pil(image: Image.Image, where: str) -> None:
    """A PIL image :func:`to_rgb` can read: at least one pixel, a known mode, 32-bit / float values on the 8-bit
    scale."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{where} is {image.width}x{image.height} pixels: every image needs at least one pixel "
                         "(remove it from the list).")
    if image.mode not in EIGHT_BIT_MODES | SIXTEEN_BIT_MODES | WIDE_MODES:
        raise ValueError(f"{where} has the PIL mode {image.mode!r}, which cannot be read as an RGB image: convert it "
                         "first (image.convert('RGB') for colour modes).")
    if image.mode in WIDE_MODES:
        _eight_bit_values(image, where)


def _eight_bit_values(image: Image.Image, where: str) -> np.ndarray:
    """``uint8 [H, W]`` of a 32-bit integer ('I') or float ('F') image, whose values must be on the 8-bit scale
    0..255 (as transformers' image processors read them)."""
    try:
        values = np.asarray(image, dtype=np.float64)
    except OSError as error:
        raise ValueError(f"{where} cannot be decoded ({error}): the file may be truncated or damaged.") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{where} (mode {image.mode!r}) holds NaN or infinite values; replace them first, e.g. "
                         "Image.fromarray(np.nan_to_num(np.asarray(image)).astype(np.float32)).")
    low, high = float(values.min()), float(values.max())
    recipe = ("16-bit data: Image.fromarray((np.asarray(image) / 257).round().astype(np.uint8)); data in [0, 1]: "
              "Image.fromarray((np.asarray(image) * 255).round().astype(np.uint8))")
    if low < 0 or high > 255:
        raise ValueError(f"{where} (mode {image.mode!r}) holds values from {low:g} to {high:g}, outside the 8-bit "
                         f"scale 0..255 that images are read on. Convert it to 8 bits first ({recipe}).")
    if 0 < high <= 1:
        raise ValueError(f"{where} (mode {image.mode!r}) holds values within [0, 1]: on the 8-bit scale 0..255 that "
                         f"is an almost black image; if it holds data scaled to [0, 1], convert it first ({recipe}).")
    return np.round(values).astype(np.uint8)


def without_colour(images: list[Image.Image]) -> list[Image.Image]:
    """The images in grey: each pixel's luma (ITU-R 601, PIL's ``convert("L")``) in all three RGB channels,
    transparency composited onto white first (:func:`to_rgb`)."""
    _check_all_pil(images)
    return [to_rgb(image, f"image {i}").convert("L").convert("RGB") for i, image in enumerate(images)]


def at_low_resolution(images: list[Image.Image], side: int) -> list[Image.Image]:
    """The images as thumbnails of at most ``side`` pixels on their longer side (each thumbnail pixel the mean of the
    pixels it covers: PIL's box filter), enlarged back to their own size with bicubic resampling: what a coarse
    scan or an enlarged thumbnail shows. Transparency composited onto white first (:func:`to_rgb`); an image no
    larger than ``side`` is returned as it is (in RGB)."""
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ValueError(f"side must be an integer >= 1 (pixels on the thumbnail's longer side), got {side!r}.")
    _check_all_pil(images)
    shown = []
    for i, image in enumerate(images):
        rgb = to_rgb(image, f"image {i}")
        scale = side / max(rgb.size)
        if scale >= 1:
            shown.append(rgb)
            continue
        thumbnail = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                               Image.Resampling.BOX)
        shown.append(thumbnail.resize(rgb.size, Image.Resampling.BICUBIC))
    return shown


def domain_view(images: list[Image.Image], grey: bool = False, low_resolution: int | None = None, then=None):
    """The images as a copy of their domain shows them: in grey when ``grey`` (:func:`without_colour`), then at
    ``low_resolution`` (:func:`at_low_resolution`), then through ``then`` (e.g. an episode's pixel transform;
    None: the PIL images)."""
    if grey:
        images = without_colour(images)
    if low_resolution is not None:
        images = at_low_resolution(images, low_resolution)
    return images if then is None else then(images)


def to_rgb(image: Image.Image, where: str = "the image") -> Image.Image:
    """An 8-bit RGB image, read as transformers' image processors read PIL images: transparency composited onto
    white; 32-bit integer ('I') and float ('F') values on the 8-bit scale 0..255. 16-bit images ('I;16', which
    transformers refuses) are scaled by 255 / 65535, the full 16-bit range onto the full 8-bit one.

    Raises:
        ValueError: an image :func:`check_images` refuses.
    """
    _check_pil(image, where)
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if image.mode in SIXTEEN_BIT_MODES:
            values = np.asarray(image, dtype=np.float64)
            return Image.fromarray(np.round(values / 257).astype(np.uint8), "L").convert("RGB")
        if image.mode in WIDE_MODES:
            return Image.fromarray(_eight_bit_values(image, where), "L").convert("RGB")
        if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
            rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except OSError as error:
        raise ValueError(f"{where} cannot be decoded ({error}): the file may be truncated or damaged.") from None


def check_pair(images, labels) -> None:
    """One label per image: ``images`` (a list or a tensor) and ``labels`` (a sequence or a tensor, e.g. encoded
    by :func:`encode_labels`) must have the same length."""
    n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    n_labels = labels.shape[0] if isinstance(labels, torch.Tensor) else len(labels)
    if n_images != n_labels:
        raise ValueError(f"Got {n_images} support images but {n_labels} labels: give one label per image.")


def processor_size(processor) -> int | None:
    """The output side of an image processor, when it states one."""
    for size in (getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None,
                 getattr(processor, "size", None)):
        if size is None:
            continue
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
        else:  # transformers' SizeDict
            side = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
        if side:
            return int(side)
    data_config = getattr(processor, "data_config", None) or {}
    if data_config.get("input_size"):
        return int(data_config["input_size"][-1])
    return None


class PixelTransform:
    """PIL images -> ``Tensor[B, 3, H, W]`` with an image processor, as a picklable callable (an episode
    sampler's ``image_transform``, run in DataLoader workers)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, images) -> torch.Tensor:
        return to_pixel_values(list(images), self.image_processor)
