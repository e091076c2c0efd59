"""``emoji``: the same emoji drawn by several designers (Google Noto, Twitter Twemoji, OpenMoji colour and
OpenMoji black line art). Classes are emoji, instances are the designs; a ``category`` column (Unicode emoji
group) lets whole categories be held out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
from PIL import Image
from tqdm.auto import tqdm

from .common import (
    class_label,
    fetch_source,
    missing_sources,
    png_bytes,
    rebuild_command,
    round_robin,
    write_dataset,
)

NAME = "emoji"
PACKAGES = [("npm", "emoji-datasource-google"), ("npm", "emoji-datasource-twitter"), ("npm", "openmoji")]
STYLES = ("google", "twitter", "openmoji-color", "openmoji-black")
SKIPPED_CATEGORIES = {"Flags", "Component"}
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
IMAGE_SIZE = 64


def sequence_key(hexcode: str) -> str:
    """A code point sequence without variation selector 16, upper case: how the sources are matched."""
    return "-".join(part for part in hexcode.upper().split("-") if part != "FE0F")


def flatten(image: Image.Image) -> Image.Image:
    """RGBA over white, as RGB, ``IMAGE_SIZE`` square."""
    rgba = image.convert("RGBA")
    if rgba.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgba = rgba.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def render_svg(path: Path) -> Image.Image:
    """An SVG rendered with cairosvg (the ``data`` extra: pip install "hf-hyperflow[data]", and libcairo2)."""
    import cairosvg

    return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), output_width=IMAGE_SIZE, output_height=IMAGE_SIZE)))


def sources_missing(cache_dir: Path | None = None) -> str | None:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as error:
        return f"rendering OpenMoji's SVGs needs cairosvg and libcairo2 ({error}): pip install 'hf-hyperflow[data]'"
    return missing_sources(PACKAGES, cache_dir)


def emoji_classes(google: Path, twitter: Path, openmoji: Path) -> list[dict]:
    """Entries of emoji-datasource's emoji.json kept as classes: not a flag or component, no skin tone, and
    drawn by all four designs. Sorted by emoji-datasource's sort order. Each gets ``paths`` (style -> file)
    and ``annotation`` (the CLDR short name, from OpenMoji's metadata)."""
    entries = json.loads((google / "emoji.json").read_text(encoding="utf-8"))
    openmoji_entries = {sequence_key(e["hexcode"]): e
                        for e in json.loads((openmoji / "data" / "openmoji.json").read_text(encoding="utf-8"))}
    kept = []
    for entry in sorted(entries, key=lambda e: e["sort_order"]):
        key = sequence_key(entry["unified"])
        if entry["category"] in SKIPPED_CATEGORIES or SKIN_TONES & set(key.split("-")) or key not in openmoji_entries:
            continue
        hexcode = openmoji_entries[key]["hexcode"]
        paths = {"google": google / "img" / "google" / "64" / entry["image"],
                 "twitter": twitter / "img" / "twitter" / "64" / entry["image"],
                 "openmoji-color": openmoji / "color" / "svg" / f"{hexcode}.svg",
                 "openmoji-black": openmoji / "black" / "svg" / f"{hexcode}.svg"}
        if all(p.is_file() for p in paths.values()):
            kept.append(dict(entry, paths=paths, annotation=openmoji_entries[key]["annotation"]))
    return kept


def class_name(entry: dict) -> str:
    """The CLDR short name ("grinning face", "person in tuxedo"); Unicode character names repeat (two
    emoji are named MAN IN TUXEDO)."""
    return entry["annotation"] or entry["short_name"].replace("_", " ")


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``emoji`` into ``output_dir``; ``max_classes`` takes classes in turn from each category.
    (``seed`` is unused: nothing is drawn at random.)"""
    google, twitter, openmoji = (fetch_source(kind, name, cache_dir) for kind, name in PACKAGES)
    entries = emoji_classes(google.root / "package", twitter.root / "package", openmoji.root / "package")
    entries = round_robin(entries, lambda e: e["category"], max_classes)
    names = [class_name(e) for e in entries]
    columns: dict[str, list] = {"image": [], "label": [], "category": [], "subcategory": [], "style": [],
                                "emoji": [], "unified": []}
    for label, entry in enumerate(tqdm(entries, desc="emoji", unit="class", mininterval=5)):
        for style in STYLES:
            path = entry["paths"][style]
            image = render_svg(path) if path.suffix == ".svg" else Image.open(path)
            columns["image"].append(png_bytes(flatten(image)))
            columns["label"].append(label)
            columns["category"].append(entry["category"])
            columns["subcategory"].append(entry["subcategory"])
            columns["style"].append(style)
            columns["emoji"].append("".join(chr(int(part, 16)) for part in entry["unified"].split("-")))
            columns["unified"].append(entry["unified"])
    summary = (f"{len(entries)} emoji, each drawn in {len(STYLES)} designs (Google Noto, Twitter Twemoji, OpenMoji "
               "colour, OpenMoji black line art), from the npm packages emoji-datasource-google, "
               "emoji-datasource-twitter and openmoji.")
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label(names), "category": datasets.Value("string"),
        "subcategory": datasets.Value("string"), "style": datasets.Value("string"), "emoji": datasets.Value("string"),
        "unified": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(columns, features=features, info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Emoji (four designs)", licenses=["apache-2.0", "cc-by-4.0", "cc-by-sa-4.0"],
        summary=summary,
        sources=[{"name": "npm emoji-datasource-google", "version": google.version,
                  "license": "images Apache-2.0 (Noto Emoji); metadata MIT", "url": "https://github.com/iamcal/emoji-data"},
                 {"name": "npm emoji-datasource-twitter", "version": twitter.version,
                  "license": "images CC-BY-4.0 (Twemoji); metadata MIT", "url": "https://github.com/iamcal/emoji-data"},
                 {"name": "npm openmoji", "version": openmoji.version, "license": "CC-BY-SA-4.0",
                  "url": "https://openmoji.org"}],
        construction=("Classes are the emoji of emoji-datasource's `emoji.json` outside the Flags and Component "
                      "categories, without skin-tone modifiers (base emoji only), that all four designs draw; "
                      "sequences are matched to OpenMoji ignoring variation selector 16. Class names are the "
                      "CLDR short names (OpenMoji's `annotation`). Instances are the designs, one image each (`style` column): "
                      f"Google's and Twitter's {IMAGE_SIZE} x {IMAGE_SIZE} PNGs, and OpenMoji's colour and black "
                      f"SVGs rendered with CairoSVG at {IMAGE_SIZE} x {IMAGE_SIZE}; transparency is composited over "
                      "white (RGB). `category` and `subcategory` are emoji-datasource's Unicode emoji group and "
                      "subgroup: hold out whole categories with them."),
        group_column="category", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["emoji", "multi-style"])
