"""``fashion_mnist``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files, an out-of-domain test set."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from .common import class_label, fetch_source, missing_sources, png_bytes, rebuild_command, write_dataset

NAME = "fashion_mnist"
PACKAGES = [("deb", "dataset-fashion-mnist")]
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (unsigned bytes, as used by MNIST): uint8 [n] for labels, [n, rows, cols] for images."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    dims = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``fashion_mnist`` into ``output_dir``: all 70,000 images (train then test), or those of the first
    ``max_classes`` classes. (``seed`` is unused: nothing is drawn at random.)"""
    source = fetch_source("deb", "dataset-fashion-mnist", cache_dir)
    folder = source.root / "usr" / "share" / "datasets" / "fashion-mnist"
    columns: dict[str, list] = {"image": [], "label": [], "original_split": []}
    for split, (image_file, label_file) in FILES.items():
        images, labels = read_idx(folder / image_file), read_idx(folder / label_file)
        if len(images) != len(labels):
            raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
        keep = np.arange(len(labels)) if max_classes is None else np.nonzero(labels < max_classes)[0]
        columns["image"] += [png_bytes(Image.fromarray(255 - images[k], mode="L")) for k in keep]
        columns["label"] += labels[keep].tolist()
        columns["original_split"] += [split] * len(keep)
    names = CLASS_NAMES if max_classes is None else CLASS_NAMES[:max_classes]
    summary = ("Fashion-MNIST (Zalando): 28 x 28 grey images of ten kinds of clothing, from Debian's "
               "`dataset-fashion-mnist` package: an out-of-domain few-shot test set.")
    features = datasets.Features({"image": datasets.Image(), "label": class_label(names),
                                  "original_split": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        columns, features=features,
        info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Fashion-MNIST", licenses=["mit"], summary=summary,
        sources=[{"name": "Debian dataset-fashion-mnist", "version": source.version, "license": "MIT (Expat)",
                  "url": "https://github.com/zalandoresearch/fashion-mnist"}],
        construction=("Classes are the ten Fashion-MNIST categories; instances are the 60,000 training and 10,000 "
                      "test images together (the `original_split` column keeps where each came from). Fashion-MNIST "
                      "stores negated intensities (its conversion inverted the product photos); they are inverted "
                      "back (255 - value), giving objects on a white background as in the other sets; size "
                      "unchanged. No "
                      "grouping column: the whole set is a held-out test domain."),
        group_column=None, command=rebuild_command(NAME, output_dir, max_classes, seed), tags=["fashion-mnist"])
