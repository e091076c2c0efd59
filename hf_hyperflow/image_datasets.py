"""Image classification datasets: opened from wherever they live (Hub id, ``save_to_disk`` folder, parquet,
image folder), their image and label columns, and the per-class row index built once from the Arrow label
column."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

LABEL_COLUMN_NAMES = ("label", "labels", "class")

# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_image_dataset(source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
                       split: str = "train") -> datasets.Dataset:
    """Open an image classification dataset from wherever it lives.

    ``source`` may be a ``datasets.Dataset`` (returned as is), a ``DatasetDict`` (``split`` is taken), a
    folder written by ``save_to_disk``, a ``.parquet`` file or a folder of them, a folder of class
    subfolders (loaded with the ``imagefolder`` builder), or a Hub dataset id (``datasets.load_dataset``).
    ``split`` picks the split when the source has several; a local source with a single split returns it.
    """
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, str(source))
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be a path, a Hub dataset id or a datasets.Dataset, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{path} is a file but not a .parquet file; pass a parquet file, a folder written by "
                             "save_to_disk, a folder of class subfolders, or a Hub dataset id")
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.Dataset) else _pick_split(loaded, split, str(path))
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            return datasets.load_dataset("parquet", data_files=parquet, split="train")
        if any(child.is_dir() for child in path.iterdir()):
            return _pick_split(datasets.load_dataset("imagefolder", data_dir=str(path)), split, str(path))
        raise ValueError(f"{path} holds no dataset: expected a save_to_disk folder, parquet files, or class "
                         "subfolders of images")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".parquet") or os.sep in text.replace("/", ""):
        raise ValueError(f"{text} does not exist (and is not a Hub dataset id such as 'org/name')")
    try:
        return datasets.load_dataset(text, split=split)
    except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset on the Hub
        raise FileNotFoundError(f"{text!r} is no local folder (nothing exists at {path.resolve()}) and the Hub gave no "
                                f"dataset of that id ({type(error).__name__}: {error}). Build or copy the dataset to "
                                f"that folder, or check the Hub id and the connection.") from error


def _pick_split(dataset_dict: datasets.DatasetDict, split: str, where: str) -> datasets.Dataset:
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"split {split!r} is not in {where}; its splits are {sorted(dataset_dict)}: pass one as split=")


# --------------------------------------------------------------------------------------------------
# Columns and the per-class index
# --------------------------------------------------------------------------------------------------


def resolve_image_column(dataset: datasets.Dataset, image_column: str | None = None) -> str:
    """Name of the image column: ``image_column`` if given (checked), else the only ``Image`` feature."""
    features = dataset.features
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column {image_column!r} is not a column; columns are {list(features)}")
        if not isinstance(features[image_column], datasets.Image):
            raise TypeError(f"column {image_column!r} is {features[image_column]!r}, not an Image feature; cast it "
                            f"with dataset.cast_column({image_column!r}, datasets.Image())")
        return image_column
    candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"no Image column among {list(features)}; pass image_column= (a column cast to "
                         "datasets.Image())")
    raise ValueError(f"several Image columns {candidates}: pass image_column= to choose one")


def _is_int_or_str(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and (
        feature.dtype in ("string", "large_string") or "int" in feature.dtype)


def resolve_label_column(dataset: datasets.Dataset, label_column: str | None = None) -> str:
    """Name of the label column: ``label_column`` if given (checked), else the only ``ClassLabel`` column,
    else the only column named label / labels / class holding ints or strings."""
    features = dataset.features
    if label_column is not None:
        if label_column not in features:
            raise ValueError(f"label_column {label_column!r} is not a column; columns are {list(features)}")
        feature = features[label_column]
        if not (isinstance(feature, datasets.ClassLabel) or _is_int_or_str(feature)):
            raise TypeError(f"label column {label_column!r} is {feature!r}; it must be a ClassLabel, an integer or a "
                            "string column")
        return label_column
    class_labels = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(class_labels) == 1:
        return class_labels[0]
    if len(class_labels) > 1:
        raise ValueError(f"several ClassLabel columns {class_labels}: pass label_column= to choose one")
    named = [name for name, feature in features.items()
             if name.lower() in LABEL_COLUMN_NAMES and _is_int_or_str(feature)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"several candidate label columns {named}: pass label_column= to choose one")
    raise ValueError(f"no label column among {list(features)}: expected a ClassLabel column or an int/str column "
                     f"named one of {list(LABEL_COLUMN_NAMES)}; pass label_column=")


def arrow_column(dataset: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """One column as Arrow, in the dataset's row order (honours select/shuffle index mappings)."""
    return dataset.select_columns([column]).with_format("arrow")[:].column(column)


@dataclass(frozen=True)
class LabelIndex:
    """Per-class row index of a dataset.

    ``codes``: int64 [rows], the class id of every row (-1: unlabelled); ``names``: class id -> name;
    ``rows(c)``: int64 [n_c], the rows of class ``c`` in ascending order.
    """

    column: str
    codes: np.ndarray
    names: list[str]
    order: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def build(cls, dataset: datasets.Dataset, label_column: str) -> LabelIndex:
        feature = dataset.features[label_column]
        column = arrow_column(dataset, label_column)
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
            codes = column.fill_null(-1).to_numpy().astype(np.int64)
        else:
            values = pc.unique(column.drop_null())
            if feature.dtype in ("string", "large_string"):
                ordered = sorted(values.to_pylist())
                names = ordered
            else:
                ordered = sorted(values.to_pylist())
                names = [str(v) for v in ordered]
            value_set = pa.array(ordered, type=column.type)
            codes = pc.index_in(column, value_set=value_set).fill_null(-1).to_numpy().astype(np.int64)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        ids = np.arange(len(names))
        starts = np.searchsorted(sorted_codes, ids, side="left")
        ends = np.searchsorted(sorted_codes, ids, side="right")
        return cls(label_column, codes, names, order, starts, ends)

    def rows(self, class_id: int) -> np.ndarray:
        return self.order[self.starts[class_id]:self.ends[class_id]]

    def counts(self) -> np.ndarray:
        """int64 [classes]: rows per class."""
        return (self.ends - self.starts).astype(np.int64)

    def present(self) -> list[str]:
        """Names of the classes that have at least one row, in class-id order."""
        counts = self.counts()
        return [name for name, n in zip(self.names, counts, strict=True) if n > 0]
