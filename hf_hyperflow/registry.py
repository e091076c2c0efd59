"""Dataset builders found through the entry-point group ``hf_hyperflow.data_builders``.

Each entry point names a mapping of dataset name -> builder: an object (usually a module) with
``build(output_dir, cache_dir=None, max_classes=None, seed=0)`` returning the saved ``datasets.Dataset`` and
``sources_missing(cache_dir=None)`` (None when its sources are at hand, else why not). This repository
declares its recipes' builders (``recipes.data:BUILDERS``), which a source checkout installed with
``pip install -e .`` can load; the package reaches them only through the entry point, never by import.
"""

from __future__ import annotations

import os
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = ["ENTRY_POINT_GROUP", "data_builders", "build_missing"]

ENTRY_POINT_GROUP = "hf_hyperflow.data_builders"


def data_builders() -> Mapping[str, object]:
    """Every declared builder by dataset name (the mappings stay lazy: a builder is imported when looked up).

    Raises:
        LookupError: no entry point could be loaded; the message lists what was tried and why it failed.
    """
    from importlib.metadata import entry_points

    mappings, problems = [], []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            mappings.append(point.load())
        except ImportError as error:
            problems.append(f"{point.value} ({error})")
    if not mappings:
        tried = f": {'; '.join(problems)}" if problems else ""
        raise LookupError(f"No dataset builders are installed (entry points {ENTRY_POINT_GROUP!r}{tried}). They come "
                          f"with the repository's recipes: install a source checkout with pip install -e .")
    return ChainMap(*mappings)


def build_missing(data_dir: str | os.PathLike, names: Iterable[str],
                  announce: Callable[[Path], None] | None = None) -> list[Path]:
    """The folders ``data_dir / name``, each built first with the builder of its name (the folder's last part)
    when it does not exist; ``announce(folder)`` is called before a build.

    Raises:
        LookupError: no builder of that name (or none installed).
    """
    folders = [Path(data_dir) / name for name in names]
    for folder in folders:
        if not folder.exists():
            builders = data_builders()
            if folder.name not in builders:
                raise LookupError(f"{folder} does not exist and no dataset builder is named {folder.name!r}; known: "
                                  f"{sorted(builders)}.")
            if announce is not None:
                announce(folder)
            builders[folder.name].build(folder)
    return folders
