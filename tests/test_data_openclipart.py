"""The openclipart builder on a small source tree laid out like Debian's openclipart-png."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # recipes/ is not an installed package
    sys.path.insert(0, str(REPO))

from data_sources import blocks, fake_package  # noqa: E402
from test_data_builders import check_card  # noqa: E402

from recipes.data import get_builder, openclipart  # noqa: E402
from recipes.data.common import fit_sprite  # noqa: E402

VERSION = "1:0.18+dfsg-19"
MAX_PIXELS = 400_000       # the builder's limit in these tests: a 700 x 700 poster is over it
CLASSES = ["animals/birds", "animals/mammals", "food/fruit", "food/fruit/citrus", "people/stickmen", "shapes/arrows"]


def fake_openclipart(cache: Path) -> tuple[Path, dict[str, list[str]], dict[str, Image.Image]]:
    """A small openclipart-png package; returns its png folder, per class the files the builder must keep (in
    order), and some source images by file."""
    png = fake_package(cache, "openclipart-png", VERSION) / "usr/share/openclipart/png"
    rng = np.random.default_rng(5)
    images: dict[str, Image.Image] = {}

    def draw(relative: str, image: Image.Image | None = None) -> Image.Image:
        image = blocks(rng, (40, 40), fill=0.8) if image is None else image
        (png / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(png / relative)
        images[relative] = image
        return image

    def shifted(image: Image.Image, by: int) -> Image.Image:
        pixels = np.asarray(image).astype(int)
        pixels[..., :3] = np.clip(pixels[..., :3] + by, 0, 255)
        return Image.fromarray(pixels.astype(np.uint8), "RGBA")

    for k in range(9):
        draw(f"animals/mammals/mammal_{k:02d}.png")
    draw("animals/mammals/mammal_00b.png", shifted(images["animals/mammals/mammal_00.png"], 3))   # near-duplicate
    draw("animals/mammals/mammal_09.png", shifted(images["animals/mammals/mammal_01.png"], 12))   # different enough
    draw("animals/mammals/mammal_10_poster.png", blocks(rng, (700, 700)))                          # over MAX_PIXELS
    for k in range(8):
        draw(f"animals/birds/bird_{k:02d}.png")
    shared = draw("animals/birds/bird_08_shared.png")                          # filed in two classes: dropped
    for k in range(25):
        draw(f"food/fruit/fruit_{k:02d}.png")
    draw("food/fruit/fruit_shared.png", shared)
    buffer = io.BytesIO()
    blocks(rng, (40, 40)).save(buffer, format="PNG")
    (png / "food/fruit/fruit_zz_broken.png").write_bytes(buffer.getvalue()[:120])   # truncated: unreadable
    for k in range(8):
        draw(f"food/fruit/citrus/citrus_{k:02d}.png")
    draw("food/fruit/citrus/citrus_03.png", blocks(rng, (40, 30), fill=0.5).convert("RGB"))  # no alpha: all of it
    for k in range(7):
        draw(f"food/vegetables/vegetable_{k:02d}.png")                      # too few
    for k in range(10):
        draw(f"people/person_{k:02d}.png")                                  # loose in a top folder
    for k in range(7):
        draw(f"people/stickmen/stick_{k:02d}.png")
    canvas = Image.new("RGBA", (600, 600))
    canvas.paste(blocks(rng, (30, 20)), (500, 40))
    draw("people/stickmen/stick_07_small.png", canvas)                     # a small drawing on a big page
    draw("people/stickmen/stick_08_blank.png", Image.new("RGBA", (40, 40)))  # nothing visible
    for k in range(10):
        draw(f"computer/icons/icon_{k:02d}.png")                            # left out
    for k in range(8):
        draw(f"shapes/arrows/arrow_{k:02d}.png")
    draw("shapes/arrows/arrow_07.png", blocks(rng, (600, 300), cells=40))   # over 256 px: shrunk by 3 first
    os.symlink("../../computer/icons/icon_00.png", png / "shapes/arrows/arrow_icon.png")   # an icon filed twice
    for top in ("unsorted/misc", "special/patterns", "recreation/games/cards/simple"):   # left out
        for k in range(9):
            draw(f"{top}/other_{k:02d}.png")
    fruit = [f"food/fruit/fruit_{k:02d}.png" for k in range(25) if k not in (2, 7, 12, 17, 22)]   # 20 evenly spaced
    keep = {"animals/birds": [f"animals/birds/bird_{k:02d}.png" for k in range(8)],
            "animals/mammals": [f"animals/mammals/mammal_{k:02d}.png" for k in range(10)],
            "food/fruit": fruit,
            "food/fruit/citrus": [f"food/fruit/citrus/citrus_{k:02d}.png" for k in range(8)],
            "people/stickmen": [f"people/stickmen/stick_{k:02d}.png" for k in range(7)]
            + ["people/stickmen/stick_07_small.png"],
            "shapes/arrows": [f"shapes/arrows/arrow_{k:02d}.png" for k in range(8)]}
    return png, keep, images


def test_openclipart_builder_on_a_small_package(tmp_path, monkeypatch):
    monkeypatch.setattr(openclipart, "MAX_PIXELS", MAX_PIXELS)
    png, keep, images = fake_openclipart(tmp_path / "cache")
    folders = openclipart.class_folders(png)
    assert sorted(folders) == sorted(CLASSES + ["food/vegetables"])   # no computer/, unsorted/, special/, cards, people/
    assert "shapes/arrows/arrow_icon.png" not in [p.relative_to(png).as_posix() for p in folders["shapes/arrows"]]
    dataset = get_builder("openclipart").build(tmp_path / "out", cache_dir=tmp_path / "cache")
    names = dataset.features["label"].names
    assert names == CLASSES
    rows = dataset.select_columns(["label", "category", "file"]).to_list()
    for name, files in keep.items():
        assert [r["file"] for r in rows if names[r["label"]] == name] == files, name
    assert all(r["category"] == names[r["label"]].split("/")[0] for r in rows)
    assert sorted({r["category"] for r in rows}) == ["animals", "food", "people", "shapes"]
    # each image is its drawing cropped to its visible pixels and fitted to 64 px (all of an image without alpha),
    # the small drawing on a big page cropped before it is shrunk
    position = {r["file"]: k for k, r in enumerate(rows)}
    for file in ("animals/birds/bird_00.png", "food/fruit/citrus/citrus_03.png", "people/stickmen/stick_07_small.png"):
        image = dataset[position[file]]["image"]
        assert image.mode == "RGB" and image.size == (64, 64)
        assert np.array_equal(np.asarray(image), np.asarray(fit_sprite(images[file], 64, 2))), file
    wide = np.asarray(dataset[position["shapes/arrows/arrow_07.png"]]["image"])
    assert np.array_equal(wide, np.asarray(fit_sprite(images["shapes/arrows/arrow_07.png"].reduce(3), 64, 2)))
    assert not np.array_equal(wide, np.asarray(fit_sprite(images["shapes/arrows/arrow_07.png"], 64, 2)))
    check_card(tmp_path / "out", dataset, "category", ["cc0-1.0"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert VERSION in card and "https://openclipart.org" in card and "`computer`" in card
    assert "1 nothing visible, 1 over 0.4 megapixels, 1 unreadable" in card
    sliced = get_builder("openclipart").build(tmp_path / "slice", cache_dir=tmp_path / "cache", max_classes=5)
    assert sliced.features["label"].names == ["animals/birds", "animals/mammals", "food/fruit", "people/stickmen",
                                              "shapes/arrows"]                  # in turn from each category
    assert sliced["file"] == [r["file"] for r in rows if names[r["label"]] != "food/fruit/citrus"]


def test_openclipart_builder_says_when_nothing_is_found(tmp_path):
    png = fake_package(tmp_path / "empty", "openclipart-png", VERSION) / "usr/share/openclipart/png"
    rng = np.random.default_rng(0)
    for relative in ("computer/icons/a.png", "people/b.png", "food/fruit/c.png"):
        (png / relative).parent.mkdir(parents=True, exist_ok=True)
        blocks(rng, (20, 20)).save(png / relative)
    with pytest.raises(RuntimeError, match="has 8 distinct readable drawings"):
        get_builder("openclipart").build(tmp_path / "out", cache_dir=tmp_path / "empty")
    (png / "food/fruit/c.png").unlink()
    with pytest.raises(RuntimeError, match="no PNG in a folder at depth 2 or more"):
        get_builder("openclipart").build(tmp_path / "out", cache_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not an openclipart-png package"):
        openclipart.png_dir(tmp_path)
