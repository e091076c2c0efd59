"""Support sets and query images from files, with errors that name the file and say what to do.

A support folder is an image folder in the ``datasets`` ``imagefolder`` layout: one subfolder per class,
holding that class's images (``support/cat/1.jpg``, ``support/dog/7.png``...). It is read with the
``imagefolder`` builder, then checked for what the builder passes over in silence: a class subfolder
without images, a file that is not an image, an image that cannot be decoded, files outside the class
subfolders.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

__all__ = ["SupportFolderError", "load_support_folder", "load_image_files", "image_files"]


class SupportFolderError(ValueError):
    """A support folder or an image file that cannot be used as it is."""


def _visible(path: Path, root: Path) -> bool:
    """Whether ``path`` counts as content (hidden files and folders such as ``.DS_Store`` do not)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_files(root: Path) -> dict[str, list[Path]]:
    """``{class subfolder name: its visible files}``; raises for files outside or below the class subfolders."""
    classes: dict[str, list[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if _visible(p, root)):
        depth = len(path.relative_to(root).parts)
        if path.is_dir():
            if depth == 1:
                classes.setdefault(path.name, [])
            elif depth > 1:
                raise SupportFolderError(f"{path} is a folder inside the class folder {path.parent}: put each "
                                         f"class's images directly in its subfolder of {root}.")
        elif depth == 1:
            raise SupportFolderError(f"{path} is not in a class subfolder: {root} must hold one subfolder per "
                                     f"class (e.g. {root}/cat/1.jpg), and no files of its own.")
        else:
            classes[path.relative_to(root).parts[0]].append(path)
    return classes


def load_support_folder(folder: str | os.PathLike, *, progress: bool = False) -> tuple[list[Image.Image], list[str]]:
    """The images and labels of a support folder (one subfolder per class), read with ``imagefolder``
    (``progress``: a tqdm bar while decoding, shown on a terminal).

    Returns:
        ``(images, labels)``: RGB PIL images (EXIF orientation applied) and their class names (the subfolder
        names), in the order of the classes (sorted as strings), then of the file names.

    Raises:
        SupportFolderError: the folder is missing or not a folder; fewer than two class subfolders; a class
        subfolder without images; a file that is not an image or cannot be decoded; files outside the class
        subfolders.
    """
    import datasets

    from .episodes import load_image_dataset

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SupportFolderError(f"{root} is not a folder: give a folder with one subfolder of images per class.")
    classes = _class_files(root)
    if len(classes) < 2:
        found = f"only {sorted(classes)}" if classes else "no subfolders"
        raise SupportFolderError(f"{root} has {found}: a task needs at least two classes, one subfolder of "
                                 f"images each (e.g. {root}/cat, {root}/dog).")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise SupportFolderError(f"Class folder {root / empty[0]} has no images: put at least one image in "
                                 f"each class folder, or remove it.")
    dataset = load_image_dataset(root).cast_column("image", datasets.Image(decode=False))
    names = dataset.features["label"].names
    loaded = {Path(row["path"]).resolve() for row in dataset["image"]}
    skipped = [path for files in classes.values() for path in files if path.resolve() not in loaded]
    if skipped:
        raise SupportFolderError(f"{skipped[0]} is not an image file (imagefolder reads {_extensions_hint()}): "
                                 f"remove it from the support folder.")
    decoder = datasets.Image(mode="RGB")
    images = []
    for row in _progress(dataset["image"], progress, "support images"):
        try:
            images.append(decoder.decode_example(row))
        except (OSError, ValueError) as error:  # PIL.UnidentifiedImageError is an OSError
            raise SupportFolderError(f"{row['path']} cannot be read as an image ({error}): replace or remove "
                                     f"it.") from error
    labels = [names[i] for i in dataset.data.column("label").to_pylist()]
    return images, labels


def _progress(items, progress: bool, desc: str):
    """``items`` wrapped in a tqdm bar when ``progress`` (tqdm shows it on a terminal only)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image", disable=None if progress else True, leave=False)


def _extensions_hint() -> str:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    common = [ext for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif") if ext in ImageFolder.EXTENSIONS]
    return f"{', '.join(common)} and {len(ImageFolder.EXTENSIONS) - len(common)} more image extensions"


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths``: files as given, folders expanded to their visible files (sorted,
    recursively). Raises SupportFolderError for a path that does not exist or a folder without files."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and _visible(p, path))
            if not inside:
                raise SupportFolderError(f"{path} holds no files: give image files or folders of images.")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise SupportFolderError(f"{path} does not exist.")
    return files


def load_image_files(paths: list[str | os.PathLike]) -> list[Image.Image]:
    """Open image files as RGB PIL images, EXIF orientation applied (as transformers' ``load_image`` does).

    Raises:
        SupportFolderError: a file that does not exist or cannot be decoded as an image.
    """
    from transformers.image_utils import load_image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise SupportFolderError(f"{path} does not exist.")
        try:
            images.append(load_image(str(path)))
        except (OSError, ValueError) as error:
            raise SupportFolderError(f"{path} cannot be read as an image ({error}): give image files.") from error
    return images
