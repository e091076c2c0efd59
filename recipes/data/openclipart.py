"""``openclipart``: clip art of the Open Clip Art Library 0.18 by category, as Debian's ``openclipart-png`` ships
it (``usr/share/openclipart/png/<top>/<sub>/.../*.png``).

Classes are the library's sorted folders below the top level (``food/fruit``, ``animals/mammals``,
``transportation/roadsigns``...); instances are the drawings filed directly in such a folder, by many different
artists. The ``category`` column (the top folder: ``food``, ``animals``...) lets whole categories be held out.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .common import (
    class_label,
    evenly_spaced,
    fetch_source,
    fit_sprite,
    is_near_copy,
    missing_sources,
    pixel_digest,
    png_bytes,
    rebuild_command,
    round_robin,
    write_dataset,
)

NAME = "openclipart"
PACKAGES = [("deb", "openclipart-png")]
IMAGE_SIZE = 64
MARGIN = 2
SOURCE_SIZE = 256          # drawings are cropped to their visible pixels, then shrunk to at most this (px)
MAX_PIXELS = 40_000_000    # larger PNGs (posters of 100+ megapixels: seconds and gigabytes each) are skipped
MIN_INSTANCES = 8          # classes with fewer distinct drawings are dropped
MAX_INSTANCES = 20
DUPLICATE_LEVEL = 6.0      # mean absolute difference (0-255, at 32 px) under which two drawings are one
# folders left out whole: desktop icons and buttons (icon sets stay out of this project's data); clip art nobody
# sorted; gradients and fill patterns (not objects); playing cards, one folder per deck style of the same faces
# (classes told apart by style only)
LEFT_OUT = ("computer", "unsorted", "special", "recreation/games/cards")


def _is_left_out(relative: PurePosixPath) -> bool:
    """Whether a path relative to ``png`` lies in a ``LEFT_OUT`` folder."""
    return any(relative.parts[:len(PurePosixPath(f).parts)] == PurePosixPath(f).parts for f in LEFT_OUT)


def png_dir(root: Path) -> Path:
    """``usr/share/openclipart/png`` of an extracted openclipart-png package."""
    folder = root / "usr/share/openclipart/png"
    if not folder.is_dir():
        raise FileNotFoundError(f"no usr/share/openclipart/png under {root}: not an openclipart-png package")
    return folder


def _left_out(path: Path, png: Path) -> bool:
    """Whether ``path`` (a link followed to its target) lies outside ``png`` or in a left-out top folder."""
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(png.resolve()):
        return True
    return _is_left_out(PurePosixPath(target.relative_to(png.resolve()).as_posix()))


def class_folders(png: Path) -> dict[str, list[Path]]:
    """Class name (folder path relative to ``png``, at depth >= 2, not under a ``LEFT_OUT`` folder) -> the
    PNG files directly in it, sorted by name. Links into a left-out folder (a desktop icon filed under
    ``shapes/arrows``) are left out too."""
    folders: dict[str, list[Path]] = {}
    for folder in sorted(p for p in png.glob("*/*/**") if p.is_dir()):
        relative = folder.relative_to(png)
        if _is_left_out(PurePosixPath(relative.as_posix())):
            continue
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        files = [p for p in files if not _left_out(p, png)]
        if files:
            folders[relative.as_posix()] = files
    return folders


class Skipped(Exception):
    """A PNG that can be read but is left out; the message says why."""


def _decode(path: Path) -> Image.Image:
    """The PNG in ``path`` decoded to RGBA; ``Skipped`` when it is over ``MAX_PIXELS``."""
    too_large = Skipped(f"over {MAX_PIXELS / 1e6:g} megapixels")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:   # PIL's own limit, past MAX_PIXELS
        raise too_large from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise too_large
        return image.convert("RGBA")      # PNG has no draft mode: decoded in full once, then cropped and shrunk


def open_clip(path: Path) -> Image.Image:
    """The drawing in ``path``: RGBA cropped to its visible pixels (alpha > 8; all of an image without alpha),
    shrunk by the smallest whole factor (averaging blocks of pixels) that brings its longer side to at most
    ``SOURCE_SIZE`` px. Raises ``Skipped`` for a PNG over
    ``MAX_PIXELS`` or with nothing visible; PIL's errors for an unreadable one."""
    with warnings.catch_warnings():       # MAX_PIXELS, not PIL's warning, is the limit on size here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        rgba = _decode(path)
        box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
        if box is None:
            raise Skipped("nothing visible")
        clip = rgba.crop(box)
    factor = -(-max(clip.size) // SOURCE_SIZE)
    return clip.reduce(factor) if factor > 1 else clip


@dataclass(frozen=True)
class Clip:
    file: str               # path relative to png/
    image: Image.Image      # IMAGE_SIZE x IMAGE_SIZE RGB, fitted
    signature: np.ndarray   # the drawing fitted to 32 px, float32 RGB
    digest: bytes           # of the 32 px fit


def read_clip(path: Path, png: Path) -> Clip:
    """The fitted image, 32 px signature and its digest of the drawing in ``path``; ``open_clip``'s errors."""
    source = open_clip(path)
    small = fit_sprite(source, 32)
    return Clip(path.relative_to(png).as_posix(), fit_sprite(source, IMAGE_SIZE, MARGIN),
                np.asarray(small, dtype=np.float32), pixel_digest(small))


UNREADABLE = (OSError, SyntaxError, ValueError, zlib.error)   # PIL's errors on a broken PNG


def read_classes(png: Path, folders: dict[str, list[Path]]) -> tuple[dict[str, list[Clip]], Counter]:
    """The readable drawings of each class folder, and a count of the files skipped, by reason."""
    clips: dict[str, list[Clip]] = defaultdict(list)
    skipped: Counter = Counter()
    for name, files in tqdm(folders.items(), desc=NAME, unit="folder", mininterval=5):
        for path in files:
            try:
                clips[name].append(read_clip(path, png))
            except Skipped as reason:
                skipped[str(reason)] += 1
            except UNREADABLE:
                skipped["unreadable"] += 1
    return clips, skipped


def choose_clips(clips: dict[str, list[Clip]], min_instances: int = MIN_INSTANCES,
                 max_instances: int = MAX_INSTANCES) -> list[tuple[str, list[Clip]]]:
    """Classes with at least ``min_instances`` distinct drawings, sorted by name, each with at most
    ``max_instances`` drawings evenly spaced in file-name order.

    Dropped drawings: one whose 32 px fit another class also has (the same drawing filed in two folders);
    one within ``DUPLICATE_LEVEL`` of a drawing kept before it for the class (a recoloured copy)."""
    owners: dict[bytes, set[str]] = defaultdict(set)
    for name, found in clips.items():
        for clip in found:
            owners[clip.digest].add(name)
    chosen = []
    for name in sorted(clips):
        kept: list[Clip] = []
        for clip in clips[name]:
            if len(owners[clip.digest]) > 1:
                continue
            if is_near_copy(clip.signature, [k.signature for k in kept], DUPLICATE_LEVEL):
                continue
            kept.append(clip)
        if len(kept) < min_instances:
            continue
        kept = evenly_spaced(kept, max_instances)
        chosen.append((name, kept))
    return chosen


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


CONSTRUCTION = """Classes are the folders of `usr/share/openclipart/png` at depth 2 or more (`food/fruit`,
`animals/mammals`, `signs_and_symbols/flags/europe/france`...), named by their path; instances are the PNG
drawings directly in the folder (a subfolder is a class of its own). Left out: the folders {left_out}
(`computer` holds desktop icons and buttons, and icon sets stay out of this data; `unsorted` is clip art
nobody sorted; `special` holds gradients and fill patterns, not objects; the playing cards come in one folder
per deck style of the same faces, classes told apart by style only), links into them (an icon filed under
`shapes/arrows` as well), and the PNGs lying directly in a top folder (a mixed bag). Files skipped while
reading: {skipped}.

The library files one drawing in several folders (links in the package), so a drawing is dropped when
another class has one with the same pixels (both fitted to 32 px), and when it is within a mean absolute
difference of {dup} (of 255, at 32 px) of a drawing kept before it for the class (a recoloured copy).
Classes with fewer than {min_instances} drawings left are dropped; at most {max_instances} are kept, evenly
spaced in file-name order. `file` is the PNG's path below `png/`.

Each PNG is cropped to its visible pixels (alpha > 8; all of an image without alpha), shrunk by a whole
factor (averaging blocks of pixels) to at most {source} px, scaled with Lanczos so that its longer side is {inner} px and centred on white: {size} x {size}
RGB. The drawings are vector clip art rendered to PNG by the library, not pixel art.

`category` is the top folder (`food`, `animals`, `signs_and_symbols`...): hold out whole categories with it."""


def _skipped_text(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``openclipart`` into ``output_dir``; ``max_classes`` takes classes in turn from each category.
    (``seed`` is unused: nothing is drawn at random.)"""
    (source,) = (fetch_source(kind, name, cache_dir) for kind, name in PACKAGES)
    png = png_dir(source.root)
    folders = class_folders(png)
    if not folders:
        raise RuntimeError(f"no PNG in a folder at depth 2 or more under {png} (left out: {', '.join(LEFT_OUT)})")
    clips, skipped = read_classes(png, folders)
    classes = round_robin(choose_clips(clips), lambda c: c[0].split("/")[0], max_classes)
    if not classes:
        raise RuntimeError(f"no folder under {png} has {MIN_INSTANCES} distinct readable drawings")
    columns: dict[str, list] = {"image": [], "label": [], "category": [], "file": []}
    for label, (name, kept) in enumerate(classes):
        for clip in kept:
            columns["image"].append(png_bytes(clip.image))
            columns["label"].append(label)
            columns["category"].append(name.split("/")[0])
            columns["file"].append(clip.file)
    summary = (f"{len(classes)} categories of clip art ({len(columns['image'])} drawings by many artists) from "
               f"the Open Clip Art Library 0.18, as Debian's {source.name} {source.version} ships it.")
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label([name for name, _ in classes]),
        "category": datasets.Value("string"), "file": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(columns, features=features,
                                         info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Open Clip Art Library (clip art by category)", licenses=["cc0-1.0"],
        summary=summary,
        sources=[{"name": f"Debian {source.name}", "version": source.version,
                  "license": "public domain (Creative Commons Public Domain Dedication, Debian copyright file; "
                             "openclipart.org now states CC0 1.0)",
                  "url": "https://openclipart.org"}],
        construction=CONSTRUCTION.format(left_out=", ".join(f"`{t}`" for t in LEFT_OUT),
                                         skipped=_skipped_text(skipped), dup=DUPLICATE_LEVEL,
                                         min_instances=MIN_INSTANCES, max_instances=MAX_INSTANCES,
                                         source=SOURCE_SIZE, inner=IMAGE_SIZE - 2 * MARGIN, size=IMAGE_SIZE),
        group_column="category", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["clip-art", "drawings", "object-categories"])
