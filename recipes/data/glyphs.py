"""``glyphs``: characters of many scripts rendered from Debian's Noto, FreeFont and ancient-scripts fonts,
Omniglot style.

Classes are characters; instances are fonts x seeded random affine and stroke-width distortions; the
``script`` column (the Unicode script, or the Unicode block for shared symbols) lets whole scripts be
held out, as Omniglot holds out alphabets. The rendering engine here also serves ``glyphs_default``.
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets
import fontTools.unicodedata as font_unicodedata
import numpy as np
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
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

NAME = "glyphs"
PACKAGES = [("deb", "fonts-noto-core"), ("deb", "fonts-freefont-ttf"), ("deb", "fonts-ancient-scripts")]
# Unicode general categories kept: letters, digits, maths / currency / other symbols.
CATEGORIES = {"Lu", "Ll", "Lt", "Lo", "Nd", "Sm", "Sc", "So"}
# Blocks of glyph fragments (lines, shades, quadrants) rather than characters.
EXCLUDED_BLOCKS = {"Box Drawing", "Block Elements"}
RENDER_POINTS = 96          # glyph rendering size before fitting
DEDUP_POINTS = 40           # size of the bitmaps compared to drop look-alike characters
MIN_INK_PIXELS = 40         # at RENDER_POINTS; fewer inked pixels: a mark, not a character


@dataclass(frozen=True)
class GlyphClass:
    codepoint: int
    group: str
    fonts: tuple[int, ...]    # indices into the font list, in list order

    @property
    def char(self) -> str:
        return chr(self.codepoint)

    @property
    def name(self) -> str:
        return unicodedata.name(self.char, f"U+{self.codepoint:04X}")


def character_group(char: str) -> str:
    """The Unicode script name of ``char``; for shared characters (Common / Inherited) its Unicode block."""
    script = font_unicodedata.script(char)
    if script in ("Zyyy", "Zinh", "Zzzz"):
        return font_unicodedata.block(char)
    return font_unicodedata.script_name(script)


class GlyphRenderer:
    """Renders characters from a list of font files (the fonts are opened once)."""

    def __init__(self, font_paths: list[Path]):
        self.font_paths = [Path(p) for p in font_paths]
        self._fonts: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}

    def font(self, index: int, points: int) -> ImageFont.FreeTypeFont:
        key = (index, points)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(self.font_paths[index]), points,
                                                  layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[key]

    def coverage(self) -> dict[int, list[int]]:
        """codepoint -> indices of the fonts whose cmap maps it."""
        covered: dict[int, list[int]] = defaultdict(list)
        for k, path in enumerate(self.font_paths):
            with TTFont(str(path), lazy=True) as font:
                for codepoint in font.getBestCmap():
                    covered[codepoint].append(k)
        return covered

    def has_outline(self, index: int, char: str) -> bool:
        """Whether font ``index`` gives ``char`` a non-empty bounding box (cheap: nothing is drawn)."""
        left, top, right, bottom = self.font(index, DEDUP_POINTS).getbbox(char)
        return right > left and bottom > top

    def glyph(self, index: int, char: str, points: int = RENDER_POINTS) -> Glyph | None:
        """``char`` typeset in font ``index`` at ``points``, or None when it has (almost) no ink."""
        font = self.font(index, points)
        ascent, descent = font.getmetrics()
        advance = font.getlength(char)
        left, top, right, bottom = font.getbbox(char, anchor="ls")
        x0, y0 = min(left, 0), min(top, -ascent)
        x1, y1 = max(right, advance), max(bottom, descent)
        canvas = Image.new("L", (int(np.ceil(x1 - x0)) + 2, int(np.ceil(y1 - y0)) + 2), 0)
        origin = (1 - x0, 1 - y0)
        ImageDraw.Draw(canvas).text(origin, char, fill=255, font=font, anchor="ls")
        ink = canvas.getbbox()
        if ink is None or (np.asarray(canvas) > 127).sum() < MIN_INK_PIXELS * (points / RENDER_POINTS) ** 2:
            return None
        centre = (origin[0] + advance / 2, origin[1] + (descent - ascent) / 2)
        return Glyph(canvas, centre, float(ascent + descent), ink)


@dataclass(frozen=True)
class Glyph:
    """A typeset glyph: ``mask`` (L, ink 255), the centre of its em box (x, y in mask pixels), the em height
    (ascent + descent, pixels) and the ink bounding box (left, top, right, bottom)."""

    mask: Image.Image
    centre: tuple[float, float]
    em: float
    ink: tuple[int, int, int, int]

    def fingerprint(self) -> bytes:
        """Equal for glyphs that draw the same pixels at the same place in the em box."""
        return hashlib.sha1(self.mask.tobytes() + repr((self.mask.size, self.centre)).encode()).digest()


def distort(glyph: Glyph, rng: np.random.Generator, size: int) -> Image.Image:
    """One instance of ``glyph`` in a ``size`` x ``size`` square: its em box scaled to 80-100% of the square
    (shrunk when the ink would leave it) and centred, under a random rotation (+-15 deg), horizontal shear
    (+-0.25), aspect change (x0.85-1.15), shift (+-8%) and stroke-width change. Drawn at twice ``size`` and
    downsampled with Lanczos; returned as L, black ink on white."""
    work = 2 * size
    aspect = float(np.exp(rng.uniform(-0.15, 0.15)))
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.25, 0.25)
    shift = rng.uniform(-0.08, 0.08, size=2) * work
    left, top, right, bottom = glyph.ink
    cx, cy = glyph.centre
    radius = max(np.hypot(x - cx, y - cy) for x in (left, right) for y in (top, bottom))
    fit = (0.5 * work - np.abs(shift).max()) / (radius * max(aspect, 1 / aspect) * (1 + abs(shear)))
    scale = min(rng.uniform(0.8, 1.0) * work / glyph.em, fit)
    centre = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    stretch = np.diag([scale * aspect, scale / aspect, 1.0])
    skew = np.array([[1, shear, 0], [0, 1, 0], [0, 0, 1]])
    rotate = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    place = np.array([[1, 0, work / 2 + shift[0]], [0, 1, work / 2 + shift[1]], [0, 0, 1]])
    inverse = np.linalg.inv(place @ rotate @ skew @ stretch @ centre)
    image = glyph.mask.transform((work, work), Image.Transform.AFFINE, tuple(inverse[:2].ravel()),
                                 resample=Image.Resampling.BILINEAR)
    stroke = rng.choice(["thinner", "same", "same", "thicker", "thickest"])
    if stroke == "thinner":
        thinner = image.filter(ImageFilter.MinFilter(3))
        if np.asarray(thinner).sum() > 0.4 * np.asarray(image).sum():
            image = thinner
    elif stroke == "thicker":
        image = image.filter(ImageFilter.MaxFilter(3))
    elif stroke == "thickest":
        image = image.filter(ImageFilter.MaxFilter(5))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return ImageOps.invert(image)


def select_classes(renderer: GlyphRenderer, *, min_fonts: int, per_group: int, min_group: int, seed: int,
                   groups: set[str] | None = None) -> list[GlyphClass]:
    """Characters to use as classes, sorted by (group, codepoint).

    Candidates: letters, digits and symbols without a Unicode decomposition (no precomposed accented
    letters, ligatures or compatibility forms); a candidate whose bitmap equals that of an earlier one in
    the same font (e.g. Latin A and Greek Alpha) is dropped. Per group, candidates are visited in a seeded
    random order and kept while fewer than ``per_group`` are, if at least ``min_fonts`` fonts draw them
    with ink; groups that end with fewer than ``min_group`` are dropped.
    """
    candidates: dict[str, list[GlyphClass]] = defaultdict(list)
    seen: set[tuple[int, bytes]] = set()
    for codepoint, fonts in sorted(renderer.coverage().items()):
        char = chr(codepoint)
        if unicodedata.category(char) not in CATEGORIES or unicodedata.decomposition(char):
            continue
        group = character_group(char)
        if group in EXCLUDED_BLOCKS or (groups is not None and group not in groups) or len(fonts) < min_fonts:
            continue
        first = next((k for k in fonts if renderer.has_outline(k, char)), None)
        reference = None if first is None else renderer.glyph(first, char, DEDUP_POINTS)
        if reference is None:
            continue
        key = (first, reference.fingerprint())
        if key in seen:
            continue
        seen.add(key)
        candidates[group].append(GlyphClass(codepoint, group, tuple(fonts)))
    chosen: list[GlyphClass] = []
    for group in sorted(candidates):
        members = candidates[group]
        if len(members) < min_group:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(group.encode("utf-8"))])
        kept = []
        for k in rng.permutation(len(members)):
            if len(kept) == per_group:
                break
            candidate = members[k]
            inked = tuple(f for f in candidate.fonts if renderer.has_outline(f, candidate.char)
                          and renderer.glyph(f, candidate.char, DEDUP_POINTS) is not None)
            if len(inked) >= min_fonts:
                kept.append(GlyphClass(candidate.codepoint, group, inked))
        if len(kept) >= min_group:
            chosen += sorted(kept, key=lambda c: c.codepoint)
    return chosen


def render_dataset(renderer: GlyphRenderer, classes: list[GlyphClass], *, instances: int, image_size: int,
                   seed: int, description: str) -> datasets.Dataset:
    """``instances`` images per class. Fonts are shuffled per class by a generator seeded with
    (seed, codepoint) and cycled when fewer than ``instances`` cover the character; each instance gets its
    own distortion from the same generator."""
    names = [c.name for c in classes]
    columns: dict[str, list] = {"image": [], "label": [], "script": [], "character": [], "codepoint": [],
                                "font": [], "instance": []}
    for label, glyph_class in enumerate(tqdm(classes, desc="render", unit="class", mininterval=5)):
        rng = np.random.default_rng([seed, glyph_class.codepoint])
        fonts = [glyph_class.fonts[i] for i in rng.permutation(len(glyph_class.fonts))][:instances]
        glyphs = {f: renderer.glyph(f, glyph_class.char) for f in fonts}
        fonts = [f for f in fonts if glyphs[f] is not None]
        if not fonts:
            raise RuntimeError(f"no font draws {glyph_class.name} at {RENDER_POINTS} pt; it should not have been selected")
        for j in range(instances):
            font = fonts[j % len(fonts)]
            glyph = glyphs[font]
            columns["image"].append(png_bytes(distort(glyph, rng, image_size)))
            columns["label"].append(label)
            columns["script"].append(glyph_class.group)
            columns["character"].append(glyph_class.char)
            columns["codepoint"].append(f"U+{glyph_class.codepoint:04X}")
            columns["font"].append(renderer.font_paths[font].stem)
            columns["instance"].append(j)
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label(names), "script": datasets.Value("string"),
        "character": datasets.Value("string"), "codepoint": datasets.Value("string"),
        "font": datasets.Value("string"), "instance": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(columns, features=features, info=datasets.DatasetInfo(description=description, features=features))


CONSTRUCTION = """Classes are Unicode characters: letters, digits and symbols (general categories {categories})
without a Unicode decomposition, so no precomposed accented letters, ligatures or compatibility forms. A
character whose {dedup} pt bitmap (at its place in the em box) equals that of an earlier character in the same
font (for example Latin A, Greek Alpha, Cyrillic A) is dropped. Characters are grouped in the `script`
column by Unicode script, or by Unicode block for characters shared between scripts (maths, arrows,
shapes...; box drawing and block elements are left out). Within a group, characters are visited in a
seeded random order and the first {per_group} that at least {min_fonts} font(s) draw with ink are kept; groups with fewer than {min_group} such characters are dropped.

Instances: {instances} per class. The fonts that draw the character are shuffled (seed {seed} and the code
point), the first {instances} taken and cycled if fewer; each instance is the glyph typeset at {points} pt with its em box (advance width x ascent +
descent) centred in a {size} x {size} square and scaled so that the em height is 80-100% of the square (less
when the ink would leave it), so small and off-centre characters keep their size and place; then a random
rotation (+-15 deg), horizontal shear (+-0.25), aspect change (x0.85-1.15), shift (+-8%) and stroke-width
change (thinner / same / thicker by a 3 or 5 px min / max filter). Drawn at twice the size and downsampled
with Lanczos; black ink on white, 8-bit grayscale. Columns `font` and `instance` record how each image was
made."""


def construction_text(*, min_fonts, min_group, per_group, instances, seed, size) -> str:
    return CONSTRUCTION.format(categories=", ".join(sorted(CATEGORIES)), min_fonts=min_fonts, dedup=DEDUP_POINTS,
                               min_group=min_group, per_group=per_group, instances=instances, seed=seed,
                               points=RENDER_POINTS, size=size)


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


def font_version(path: Path) -> str:
    """The version string in a font's name table."""
    with TTFont(str(path), lazy=True) as font:
        return (font["name"].getDebugName(5) or "unknown").replace("Version ", "").split(";")[0].strip()


def font_files(roots: list[Path]) -> list[Path]:
    """TrueType / OpenType files under the roots; NotoSans-Regular first, the rest sorted by name."""
    paths = sorted({p for root in roots for pattern in ("*.ttf", "*.otf") for p in root.rglob(pattern)},
                   key=lambda p: (p.stem != "NotoSans-Regular", p.name))
    return paths


def build_glyph_dataset(renderer: GlyphRenderer, output_dir: str | Path, *, name: str, fonts_text: str,
                        pretty_name: str, licenses: list[str], sources: list[dict], min_fonts: int,
                        max_classes: int | None, seed: int, instances: int, image_size: int, per_group: int,
                        min_group: int) -> datasets.Dataset:
    """Select classes from the renderer's fonts, render them and save the dataset with its card.
    ``fonts_text`` completes "rendered from ..." in the card's summary."""
    classes = select_classes(renderer, min_fonts=min_fonts, per_group=per_group, min_group=min_group, seed=seed)
    classes = round_robin(classes, lambda c: c.group, max_classes)
    summary = (f"Characters of {len({c.group for c in classes})} scripts and symbol blocks rendered from "
               f"{fonts_text}: an Omniglot-like few-shot benchmark (classes = characters, instances = fonts x random "
               "distortions).")
    dataset = render_dataset(renderer, classes, instances=instances, image_size=image_size, seed=seed,
                             description=summary)
    return write_dataset(
        dataset, output_dir, pretty_name=pretty_name, licenses=licenses, summary=summary, sources=sources,
        construction=construction_text(min_fonts=min_fonts, min_group=min_group, per_group=per_group,
                                       instances=instances, seed=seed, size=image_size),
        group_column="script", command=rebuild_command(name, output_dir, max_classes, seed),
        tags=["omniglot", "characters", "scripts", "unicode"])


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None, seed: int = 0,
          instances: int = 20, image_size: int = 64, per_group: int = 50, min_group: int = 15) -> datasets.Dataset:
    """Build ``glyphs`` into ``output_dir``; returns the dataset."""
    sources = [fetch_source(kind, name, cache_dir) for kind, name in PACKAGES]
    renderer = GlyphRenderer(font_files([s.root / "usr" / "share" / "fonts" for s in sources]))
    noto, free, ancient = sources
    return build_glyph_dataset(
        renderer, output_dir, name=NAME,
        fonts_text=(f"{len(renderer.font_paths)} fonts of Debian's `fonts-noto-core`, `fonts-freefont-ttf` and "
                    "`fonts-ancient-scripts`"),
        pretty_name="Glyphs (Noto, FreeFont, ancient scripts)", licenses=["ofl-1.1", "gpl-3.0", "other"],
        sources=[{"name": "Debian fonts-noto-core", "version": noto.version, "license": "OFL-1.1",
                  "url": "https://github.com/notofonts"},
                 {"name": "Debian fonts-freefont-ttf", "version": free.version,
                  "license": "GPL-3.0-or-later with the font exception", "url": "https://www.gnu.org/software/freefont/"},
                 {"name": "Debian fonts-ancient-scripts", "version": ancient.version,
                  "license": "free for any use (George Douros)", "url": "https://dn-works.com/ufas/"}],
        min_fonts=1, max_classes=max_classes, seed=seed, instances=instances, image_size=image_size,
        per_group=per_group, min_group=min_group)
