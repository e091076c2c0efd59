"""Dataset builders found through the entry-point group ``hf_hyperflow.data_builders``.

Each entry point names a mapping of dataset name -> builder: an object (usually a module) with
``build(output_dir, cache_dir=None, max_classes=None, seed=0)`` returning the saved ``datasets.Dataset`` and
``sources_missing(cache_dir=None)`` (None when its sources are at hand, else why not). This repository
declares its recipes' builders (``recipes.data:BUILDERS``), which a source checkout installed with
``pip install -e .`` can load; the package reaches them only through the entry point, never by import.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping

__all__ = ["ENTRY_POINT_GROUP", "data_builders"]

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
