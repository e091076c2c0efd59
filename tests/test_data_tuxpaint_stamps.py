"""The ``tuxpaint_stamps`` builder on a small source tree laid out like Debian's tuxpaint-stamps-default."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
from data_sources import blocks, fake_package
from PIL import Image, ImageOps
from test_data_builders import check_card

from hf_hyperflow.episodes import ClassSplit
from recipes.data import get_builder
from recipes.data.tuxpaint_stamps import (
    LICENSES,
    collect_classes,
    description,
    find_stamps,
    stamp_class,
    stamps_dir,
)

VERSION = "2022.06.04-1"
# town/houses/cartoon holds 25 stamps: 20 are kept, evenly spaced (np.linspace(0, 24, 20) rounded)
HOUSES_LEFT_OUT = {2, 7, 12, 17, 22}


def fake_tuxpaint(cache: Path) -> Path:
    """A small tuxpaint-stamps-default package in ``cache``; returns its ``stamps`` folder."""
    stamps = fake_package(cache, "tuxpaint-stamps-default", VERSION) / "usr/share/tuxpaint/stamps"
    rng = np.random.default_rng(5)

    def put(relative: str, image: Image.Image | None = None) -> Image.Image:
        image = image if image is not None else blocks(rng, (24, 32), fill=0.75)
        (stamps / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(stamps / relative)
        return image

    for k in range(5):
        put(f"animals/birds/b{k}.png", blocks(rng, (600, 400), fill=0.8) if k == 4 else None)
    b2 = Image.open(stamps / "animals/birds/b2.png").convert("RGBA")
    b3 = np.asarray(Image.open(stamps / "animals/birds/b3.png").convert("RGBA")).copy()
    put("animals/birds/b1_mirror.png")                              # Tux Paint's mirror image of b1: left out
    put("animals/birds/b5.png", ImageOps.mirror(b2))                # a mirrored copy of b2: dropped
    b3[..., :3] = np.clip(b3[..., :3].astype(int) + 3, 0, 255)
    put("animals/birds/b6.png", Image.fromarray(b3, "RGBA"))        # a recoloured b3, 3 levels off: dropped
    put("animals/birds/cartoon/c0.png")                             # style folder: merged into animals/birds
    put("animals/birds/cartoon/c1.png")
    (stamps / "animals/birds/b0.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")   # beside b0.png
    (stamps / "animals/birds/only.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")  # SVG-only
    (stamps / "animals/birds/b0.txt").write_text("A bird.\nfr.utf8=Un oiseau.\n")
    (stamps / "animals/birds/b1.txt").write_text("fr.utf8=Un oiseau.\n")                        # no English
    for k in range(4):
        put(f"animals/fish/f{k}.png")
        put(f"clothes/t{k}.png")                                    # loose in a top folder: class "clothes"
        put(f"food/fruit/fruit{k}.png")
        put(f"hobbies/music/piece{k}.png")
        put(f"symbols/chess/piece{k}.png")                          # symbols: left out
        put(f"vehicles/auto/car{k}.png")
    shared = put("clothes/shared.png")                              # in two classes: dropped from both
    put("vehicles/auto/shared.png", shared)
    for k in range(3):
        put(f"clothes/hats/hat{k}.png")                             # too few: dropped
    (stamps / "food/fruit/broken.png").write_bytes(b"not a png")   # unreadable: skipped
    for letter in "ABCDE":
        put(f"symbols/alphabets/english/filled/uppercase/{letter}.png")   # alphabets: left out
    for k in range(25):
        put(f"town/houses/cartoon/h{k:02d}.png")
    return stamps


EXPECTED = {
    "animals/birds": ["b0", "b1", "b2", "b3", "b4", "cartoon/c0", "cartoon/c1"],
    "animals/fish": [f"f{k}" for k in range(4)],
    "clothes": [f"t{k}" for k in range(4)],
    "food/fruit": [f"fruit{k}" for k in range(4)],
    "hobbies/music": [f"piece{k}" for k in range(4)],
    "town/houses": [f"cartoon/h{k:02d}" for k in range(25) if k not in HOUSES_LEFT_OUT],
    "vehicles/auto": [f"car{k}" for k in range(4)],
}


def test_stamp_classes_merge_style_folders_and_leave_out_symbols():
    assert stamp_class(PurePosixPath("food/fruit/cartoon/apple.png")) == ("food/fruit", "cartoon")
    assert stamp_class(PurePosixPath("animals/mammals/bears/toys/teddy.png")) == ("animals/mammals/bears", "toys")
    assert stamp_class(PurePosixPath("plants/flowers/plastic/rose.png")) == ("plants/flowers", "plastic")
    assert stamp_class(PurePosixPath("clothes/coat.png")) == ("clothes", "default")
    assert stamp_class(PurePosixPath("town/cartoon/castle.png")) == ("town", "cartoon")
    assert stamp_class(PurePosixPath("symbols/alphabets/asl/a.png")) is None
    assert stamp_class(PurePosixPath("symbols/math/one.png")) is None
    assert stamp_class(PurePosixPath("symbolsoup/a.png")) == ("symbolsoup", "default")
    assert stamp_class(PurePosixPath("loose.png")) is None


def test_tuxpaint_stamps_builder_on_a_small_package(tmp_path):
    stamps = fake_tuxpaint(tmp_path / "cache")
    assert stamps_dir(stamps.parents[3]) == stamps
    assert description(stamps / "animals/birds/b0.png") == "A bird."
    assert description(stamps / "animals/birds/b1_mirror.png") == ""      # b1.txt has no English line
    by_class, skipped = find_stamps(stamps)
    assert skipped == {"SVG-only": 1, "unreadable": 1, "mirror file": 1}
    classes, dropped = collect_classes(by_class)
    assert dropped == {"shared": 2, "mirrored": 1, "duplicate": 1, "in small classes": 3}
    assert {label: [s.file for s in kept] for label, kept in classes} == {
        label: [f"{label}/{stem}.png" for stem in stems] for label, stems in EXPECTED.items()}

    dataset = get_builder("tuxpaint_stamps").build(tmp_path / "out", cache_dir=tmp_path / "cache")
    names = dataset.features["label"].names
    assert names == sorted(EXPECTED)
    assert len(dataset) == sum(len(s) for s in EXPECTED.values()) == 47
    assert set(dataset.column_names) == {"image", "label", "category", "style", "file", "description"}
    rows = dataset.select_columns(["label", "category", "style", "file", "description"]).to_list()
    for row in rows:
        label = names[row["label"]]
        assert row["category"] == label.split("/")[0]
        assert row["file"].startswith(label + "/")
        assert row["style"] == ("cartoon" if "/cartoon/" in row["file"] else "default")
    assert {r["file"]: r["description"] for r in rows if r["description"]} == {"animals/birds/b0.png": "A bird."}
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    assert (pixels[:2] == 255).all() and (pixels != 255).any()            # centred on white, 2 px margin
    check_card(tmp_path / "out", dataset, "category", LICENSES)
    card = (tmp_path / "out" / "README.md").read_text()
    assert VERSION in card and "`symbols`" in card and "https://tuxpaint.org" in card
    assert "1 unreadable PNG files" in card and "1 mirrored near-duplicates" in card

    sliced = get_builder("tuxpaint_stamps").build(tmp_path / "slice", cache_dir=tmp_path / "cache", max_classes=3)
    assert sliced.features["label"].names == ["animals/birds", "clothes", "food/fruit"]   # one per category
    split = ClassSplit.from_dataset(dataset, group_column="category", seed=0)
    assert not set(split.groups["train"]) & set(split.groups["test"])
