"""Source packages for the dataset builders' tests: extracted Debian packages in a builder's source cache, laid
out as ``recipes.data.common.fetch_source`` leaves them, and random images to fill them with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def fake_package(cache: Path, name: str, version: str, kind: str = "deb") -> Path:
    """An extracted Debian (or npm) package in the builders' source cache, as fetch_source leaves it; returns its
    root."""
    root = cache / kind / name
    (root / "files").mkdir(parents=True)
    (root / ".complete.json").write_text(json.dumps({"kind": kind, "name": name, "version": version}))
    return root / "files"


def blocks(rng: np.random.Generator, size: tuple[int, int], cells: int = 6, fill: float = 1.0) -> Image.Image:
    """A random pattern of coloured blocks covering ``fill`` of an RGBA canvas (transparent elsewhere)."""
    width, height = size
    canvas = np.zeros((height, width, 4), np.uint8)
    inner_w, inner_h = max(1, int(width * fill)), max(1, int(height * fill))
    x0, y0 = (width - inner_w) // 2, (height - inner_h) // 2
    colours = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    ys = np.arange(inner_h) * cells // inner_h
    xs = np.arange(inner_w) * cells // inner_w
    canvas[y0:y0 + inner_h, x0:x0 + inner_w, :3] = colours[ys[:, None], xs[None, :]]
    canvas[y0:y0 + inner_h, x0:x0 + inner_w, 3] = 255
    return Image.fromarray(canvas, "RGBA")
