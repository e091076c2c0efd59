"""``digits``: scikit-learn's bundled handwritten digits (8 x 8, 1,797 images), an out-of-domain test set."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import sklearn
from PIL import Image
from sklearn.datasets import load_digits

from .common import class_label, png_bytes, rebuild_command, write_dataset

NAME = "digits"
IMAGE_SIZE = 32


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return None  # bundled with scikit-learn


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``digits`` into ``output_dir``: every image, or those of the first ``max_classes`` digits.
    (``cache_dir`` and ``seed`` are unused: nothing is fetched or drawn at random.)"""
    bunch = load_digits()
    keep = np.arange(len(bunch.target)) if max_classes is None else np.nonzero(bunch.target < max_classes)[0]
    names = [str(d) for d in range(10 if max_classes is None else min(10, max_classes))]
    images = []
    for k in keep:
        grey = np.round(255 - bunch.images[k] * (255 / 16)).astype(np.uint8)  # 0..16 ink -> black on white
        images.append(png_bytes(Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)))
    summary = ("Handwritten digits bundled with scikit-learn (the test part of the UCI Optical Recognition of "
               "Handwritten Digits data: 8 x 8 images of 0-16 counts, from 13 writers), upscaled to "
               f"{IMAGE_SIZE} x {IMAGE_SIZE}: an out-of-domain few-shot test set.")
    features = datasets.Features({"image": datasets.Image(), "label": class_label(names)})
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": bunch.target[keep].tolist()}, features=features,
        info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Digits (scikit-learn)", licenses=["cc-by-4.0"], summary=summary,
        sources=[{"name": "scikit-learn load_digits", "version": sklearn.__version__,
                  "license": "CC-BY-4.0 (UCI ML repository)",
                  "url": "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"}],
        construction=("Classes are the ten digits; instances are the dataset's images, every one kept. Each 8 x 8 "
                      "image of ink counts 0-16 is mapped to 8-bit grey (255 - 255 * count / 16: black ink on "
                      f"white) and resized to {IMAGE_SIZE} x {IMAGE_SIZE} with bicubic interpolation. There is no "
                      "grouping column: the whole set is a held-out test domain."),
        group_column=None, command=rebuild_command(NAME, output_dir, max_classes, seed), tags=["digits"])
