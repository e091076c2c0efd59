"""Builders of the local few-shot benchmark datasets.

Each builder module has ``NAME``, ``build(output_dir, cache_dir=None, max_classes=None, seed=0)`` returning
the saved ``datasets.Dataset``, and ``sources_missing(cache_dir=None)``: None when its sources are at hand
without the network, else why not. ``python -m recipes.data.build --name NAME --output DIR`` runs one.
``BUILDERS[name]`` is the builder module (imported on first use: the builders pull in fontTools, cairosvg,
scikit-learn...).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

_MODULES = {
    "glyphs_default": "recipes.data.glyphs_default",
    "digits": "recipes.data.digits",
    "glyphs": "recipes.data.glyphs",
    "emoji": "recipes.data.emoji",
    "fashion_mnist": "recipes.data.fashion_mnist",
    "wesnoth_units": "recipes.data.wesnoth_units",
    "cataclysm_tiles": "recipes.data.cataclysm_tiles",
    "openclipart": "recipes.data.openclipart",
    "tuxpaint_stamps": "recipes.data.tuxpaint_stamps",
    "quickdraw": "recipes.data.quickdraw",
}


class _Builders(Mapping):
    """Dataset name -> builder module, imported on access."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in _MODULES:
            raise KeyError(name)
        return importlib.import_module(_MODULES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


BUILDERS: Mapping[str, ModuleType] = _Builders()


def get_builder(name: str) -> ModuleType:
    """The builder module of dataset ``name``; ValueError naming the builders if there is none."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; builders: {sorted(BUILDERS)}")
    return BUILDERS[name]
