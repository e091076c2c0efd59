"""``tuxpaint_stamps``: the rubber stamps of Tux Paint (Debian's ``tuxpaint-stamps-default``), objects sorted
into folders by kind.

The stamps are pictures cut out on transparency: photographs of objects, drawings and cartoons, and grey
"colorable" templates. Classes are the stamp folders (``food/fruit``, ``animals/birds``, ``vehicles/auto``...)
with their ``cartoon`` / ``toys`` / ``plastic`` style subfolders merged in; instances are the folder's stamps.
The ``category`` column (the top folder: ``animals``, ``food``, ``town``...) lets whole categories be held out.
"""

from __future__ import annotations

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

NAME = "tuxpaint_stamps"
PACKAGES = [("deb", "tuxpaint-stamps-default")]
IMAGE_SIZE = 64
MARGIN = 2
MAX_SOURCE = 256           # stamps are shrunk to at most this many px a side as soon as they are read
SIGNATURE_SIZE = 32
MIN_INSTANCES = 4          # classes with fewer distinct stamps are dropped
MAX_INSTANCES = 20
DUPLICATE_LEVEL = 6.0      # mean absolute difference (0-255, at 32 px) under which two stamps are one
STYLES = ("cartoon", "toys", "plastic")   # style subfolders, merged into their parent folder's class
DEFAULT_STYLE = "default"
# letters, digits, signs, chess pieces, coins: marks of the glyphs source's kind (digits: a test set's), not objects
LEFT_OUT = ("symbols",)
MIRROR_SUFFIX = "_mirror"  # Tux Paint's ready-made mirror image of the stamp without the suffix
# The Debian copyright file puts the whole package under GPL-2.0-or-later; upstream's CHANGES.txt (the package's
# changelog.gz) credits some photographs, kept here, to Wikimedia Commons and others under their own licences
LICENSES = ["gpl-2.0", "gfdl", "cc-by-sa-3.0", "cc-by-2.5", "cc-by-2.0", "other"]
LICENSE_TEXT = ("GPL-2.0-or-later (Debian copyright file); some photographs GFDL, CC-BY-SA-2.5, CC-BY-SA-3.0, "
                "CC-BY-2.5, CC-BY-2.0, from Stock.xchng or public domain (upstream CHANGES.txt)")


def stamps_dir(root: Path) -> Path:
    """``usr/share/tuxpaint/stamps`` of an extracted tuxpaint-stamps package."""
    folder = root / "usr/share/tuxpaint/stamps"
    if not folder.is_dir():
        raise FileNotFoundError(f"no usr/share/tuxpaint/stamps under {root}: not a tuxpaint-stamps package")
    return folder


def stamp_class(relative: PurePosixPath) -> tuple[str, str] | None:
    """(class, style) of a stamp file given by its path relative to ``stamps/``; None when it is left out
    (under ``LEFT_OUT``, or not in a folder). The class is the file's folder with a trailing style folder
    (``cartoon``, ``toys``, ``plastic``) merged into its parent; the style is that folder's name, else
    ``DEFAULT_STYLE``."""
    parts = list(relative.parent.parts)
    style = DEFAULT_STYLE
    if len(parts) > 1 and parts[-1] in STYLES:
        style = parts.pop()
    folder = "/".join(parts)
    if not folder or any(folder == x or folder.startswith(x + "/") for x in LEFT_OUT):
        return None
    return folder, style


def description(png: Path) -> str:
    """The English description of a stamp: the first line of its ``.txt`` file (a ``_mirror`` image uses its
    stamp's), or "" when there is none."""
    stem = png.stem.removesuffix(MIRROR_SUFFIX)
    text = png.with_name(stem + ".txt")
    if not text.is_file():
        return ""
    lines = text.read_text(encoding="utf-8", errors="replace").splitlines()
    first = lines[0].strip() if lines else ""
    return "" if ".utf8=" in first else first


def read_stamp(path: Path) -> Image.Image | None:
    """The stamp as RGBA, shrunk to at most ``MAX_SOURCE`` px a side; None when the file cannot be read."""
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    rgba.thumbnail((MAX_SOURCE, MAX_SOURCE), Image.Resampling.LANCZOS)
    return rgba


@dataclass(frozen=True)
class Stamp:
    file: str            # path relative to stamps/
    label: str           # class: folder path relative to stamps/
    style: str
    description: str
    image: Image.Image   # fitted: IMAGE_SIZE x IMAGE_SIZE RGB
    signature: Image.Image  # fitted to SIGNATURE_SIZE, for the duplicate rules

    @property
    def category(self) -> str:
        return self.label.split("/")[0]


def find_stamps(stamps: Path) -> tuple[dict[str, list[Stamp]], Counter]:
    """The readable PNG stamps by class, in sorted path order, and counts of the files skipped
    (``unreadable``; ``mirror file``: a ``_mirror`` image beside its stamp; ``SVG-only``: an SVG without a PNG)."""
    by_class: dict[str, list[Stamp]] = defaultdict(list)
    skipped: Counter = Counter()
    skipped["SVG-only"] = sum(1 for p in stamps.rglob("*.svg") if not p.with_suffix(".png").is_file()
                              and stamp_class(PurePosixPath(p.relative_to(stamps).as_posix())) is not None)
    for path in sorted(stamps.rglob("*.png")):
        relative = PurePosixPath(path.relative_to(stamps).as_posix())
        found = stamp_class(relative)
        if found is None:
            continue
        stem = path.stem.removesuffix(MIRROR_SUFFIX)
        if stem != path.stem and path.with_name(stem + ".png").is_file():
            skipped["mirror file"] += 1
            continue
        image = read_stamp(path)
        if image is None:
            skipped["unreadable"] += 1
            continue
        label, style = found
        by_class[label].append(Stamp(str(relative), label, style, description(path),
                                     fit_sprite(image, IMAGE_SIZE, MARGIN), fit_sprite(image, SIGNATURE_SIZE)))
    return by_class, skipped


def collect_classes(by_class: dict[str, list[Stamp]], min_instances: int = MIN_INSTANCES,
                    max_instances: int = MAX_INSTANCES) -> tuple[list[tuple[str, list[Stamp]]], Counter]:
    """Classes with at least ``min_instances`` distinct stamps, sorted by name, and counts of the stamps dropped.

    Dropped stamps: one whose fitted pixels two or more classes have (``shared``); one within
    ``DUPLICATE_LEVEL`` of a stamp kept before it for the class (``duplicate``), or of its mirror image
    (``mirrored``). At most ``max_instances`` kept, evenly spaced in path order."""
    owners: dict[bytes, set[str]] = defaultdict(set)
    for label, stamps in by_class.items():
        for stamp in stamps:
            owners[pixel_digest(stamp.signature)].add(label)
    chosen, dropped = [], Counter()
    for label in sorted(by_class):
        kept: list[Stamp] = []
        signatures: list[np.ndarray] = []
        for stamp in by_class[label]:
            if len(owners[pixel_digest(stamp.signature)]) > 1:
                dropped["shared"] += 1
                continue
            signature = np.asarray(stamp.signature, dtype=np.float32)
            near = is_near_copy(signature, signatures, DUPLICATE_LEVEL)
            if near or is_near_copy(signature[:, ::-1], signatures, DUPLICATE_LEVEL):
                dropped["duplicate" if near else "mirrored"] += 1
                continue
            signatures.append(signature)
            kept.append(stamp)
        if len(kept) < min_instances:
            dropped["in small classes"] += len(kept)
            continue
        kept = evenly_spaced(kept, max_instances)
        chosen.append((label, kept))
    return chosen, dropped


def sources_missing(cache_dir: Path | None = None) -> str | None:
    """None when the source package is in the cache, else a sentence naming it."""
    return missing_sources(PACKAGES, cache_dir)


CONSTRUCTION = """Classes are the folders of `usr/share/tuxpaint/stamps`, named by their path below it (`food/fruit`,
`animals/mammals/bovines`...); a trailing style folder ({styles}) is merged into its parent, so
`food/fruit/cartoon/*.png` belongs to `food/fruit`, and the stamps lying directly in a top folder
(`clothes/*.png`) form the class named by that folder. `{left_out}` (letters of several alphabets, digits, math
and music signs, chess pieces, coins: marks rather than objects) is left out entirely. Only the PNG stamps are used: an SVG beside a PNG of the same
name is the same stamp, and stamps drawn only as SVG are left out. Tux Paint's `*_mirror.png` images (the
ready-made mirror image of the stamp of the same name) are not stamps of their own and are left out.

Stamps come in recoloured and mirrored variants and are reused across folders, so a stamp is dropped when
another class has a stamp with the same pixels (once fitted to {sig} px), or when it, or its mirror image, is
within a mean absolute difference of {dup} (of 255, both fitted to {sig} px) of a stamp kept before it for the
class. Folders with fewer than {min_instances} stamps left are dropped; at most {max_instances} are kept, evenly
spaced in path order. Stamps left out of this version of the package (outside `{left_out}`): {skipped}.

Each stamp is shrunk to at most {source} px a side as it is read, cropped to its visible pixels (alpha > 8),
scaled with Lanczos so that its longer side is {inner} px, and centred on white: {size} x {size} RGB. Some
stamps are grey templates that Tux Paint tints at will: they stay grey.

`category` is the top folder (hold out whole categories with it); `style` is the style folder a stamp came
from, else `{default}` (photographs and drawings alike); `file` is the PNG's path below `stamps/`;
`description` is the first (English) line of the stamp's `.txt` file, or empty.

Licences: Debian's copyright file puts the whole package under the GPL, version 2 or later. Upstream's
CHANGES.txt (shipped as `changelog.gz`) credits some of the photographs kept here to other authors under their
own terms: GFDL (e.g. `food/fruit/Apricot_whole`, `household/Lightbulb`, `animals/insects/Woodlouse`),
CC-BY-SA-3.0 (the Kerala flowers, e.g. `plants/flowers/adeenia`), CC-BY-SA-2.5 (`town/monuments/inukshuk-photo`,
`animals/birds/heron_greatblue`), CC-BY-2.5 (`seasonal/christmas/Mince_Pie`), CC-BY-2.0
(`seasonal/christmas/Roast_turkey`), Stock.xchng's terms (`food/fruit/grapes`, `food/fruit/sliced_lime`: the
changelog names the site, not the licence) or the public domain (NOAA photographs in `animals/fish`,
`medical/stethoscope`); `other` stands for those without a Hub id. Check CHANGES.txt before reusing a stamp."""


# counts of find_stamps and collect_classes -> their wording in the card
COUNT_TEXT = {"SVG-only": "drawn only as SVG", "unreadable": "unreadable PNG files",
              "mirror file": "`_mirror` images", "shared": "shared by two classes", "duplicate": "near-duplicates",
              "mirrored": "mirrored near-duplicates", "in small classes": "in folders with too few stamps"}


def _columns(classes: list[tuple[str, list[Stamp]]]) -> dict[str, list]:
    """The dataset's columns, label k for ``classes[k]``."""
    columns: dict[str, list] = {"image": [], "label": [], "category": [], "style": [], "file": [],
                                "description": []}
    for label, (_, stamps) in enumerate(tqdm(classes, desc=NAME, unit="class", mininterval=5)):
        for stamp in stamps:
            columns["image"].append(png_bytes(stamp.image))
            columns["label"].append(label)
            columns["category"].append(stamp.category)
            columns["style"].append(stamp.style)
            columns["file"].append(stamp.file)
            columns["description"].append(stamp.description)
    return columns


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``tuxpaint_stamps`` into ``output_dir``; ``max_classes`` takes classes in turn from each category.
    (``seed`` is unused: nothing is drawn at random.)"""
    (source,) = (fetch_source(kind, name, cache_dir) for kind, name in PACKAGES)
    stamps = stamps_dir(source.root)
    by_class, skipped = find_stamps(stamps)
    if not by_class:
        raise RuntimeError(f"no readable PNG stamp in a class folder under {stamps}")
    found, dropped = collect_classes(by_class)
    classes = round_robin(found, lambda c: c[0].split("/")[0], max_classes)
    if not classes:
        raise RuntimeError(f"no stamp folder under {stamps} has {MIN_INSTANCES} distinct PNG stamps")
    summary = (f"{len(classes)} kinds of object (stamp folders in {len({c.split('/')[0] for c, _ in classes})} "
               f"categories), {sum(len(s) for _, s in classes)} Tux Paint rubber stamps (photographs, drawings "
               f"and cartoons cut out on transparency), from Debian's {source.name} {source.version}.")
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label([c for c, _ in classes]),
        "category": datasets.Value("string"), "style": datasets.Value("string"), "file": datasets.Value("string"),
        "description": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(_columns(classes), features=features,
                                         info=datasets.DatasetInfo(description=summary, features=features))
    counts = skipped + dropped
    skipped_text = ", ".join(f"{counts[key]} {text}" for key, text in COUNT_TEXT.items())
    return write_dataset(
        dataset, output_dir, pretty_name="Tux Paint stamps (objects by category)", licenses=LICENSES,
        summary=summary,
        sources=[{"name": f"Debian {source.name}", "version": source.version, "license": LICENSE_TEXT,
                  "url": "https://tuxpaint.org"}],
        construction=CONSTRUCTION.format(styles=", ".join(f"`{s}`" for s in STYLES), left_out=LEFT_OUT[0],
                                         sig=SIGNATURE_SIZE, dup=DUPLICATE_LEVEL, min_instances=MIN_INSTANCES,
                                         max_instances=MAX_INSTANCES, skipped=skipped_text, source=MAX_SOURCE,
                                         inner=IMAGE_SIZE - 2 * MARGIN, size=IMAGE_SIZE, default=DEFAULT_STYLE),
        group_column="category", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["photographs", "clip-art", "object-categories"])
