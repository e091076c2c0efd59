"""``glyphs_default``: the embedded default benchmark, needing nothing but pip.

Characters rendered from the fonts that matplotlib's wheel ships (DejaVu Sans / Serif / Sans Mono in four
styles each, STIX General in four styles), over the scripts and symbol blocks those fonts cover
(Latin, Greek, Cyrillic, Armenian, Georgian, Braille, maths, arrows, shapes...), with the same rendering
as ``glyphs``.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import matplotlib

from .glyphs import GlyphRenderer, build_glyph_dataset, font_version

NAME = "glyphs_default"
# Font files of matplotlib's mpl-data/fonts/ttf used, in this order (the first covering font of a character
# is the one its look-alike check uses). The Display, Computer Modern, STIX size / non-Unicode variants and
# LastResort fonts are left out: they cover few characters or draw placeholders.
FONT_FILES = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
]
MIN_FONTS = 3


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def sources_missing(cache_dir: Path | None = None) -> str | None:
    absent = [name for name in FONT_FILES if not (font_dir() / name).is_file()]
    return f"matplotlib at {font_dir()} lacks {absent}" if absent else None


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None, seed: int = 0,
          instances: int = 20, image_size: int = 64, per_group: int = 40, min_group: int = 20) -> datasets.Dataset:
    """Build ``glyphs_default`` into ``output_dir`` (``cache_dir`` is unused: the fonts come with matplotlib)."""
    missing = sources_missing()
    if missing:
        raise RuntimeError(missing)
    renderer = GlyphRenderer([font_dir() / name for name in FONT_FILES])
    in_matplotlib = f"(in matplotlib {matplotlib.__version__})"
    return build_glyph_dataset(
        renderer, output_dir, name=NAME,
        fonts_text=f"the {len(FONT_FILES)} DejaVu and STIX fonts shipped inside matplotlib's wheel (needs nothing but pip)",
        pretty_name="Glyphs (matplotlib's DejaVu and STIX fonts)", licenses=["other", "ofl-1.1"],
        sources=[{"name": f"DejaVu fonts {in_matplotlib}", "version": font_version(font_dir() / FONT_FILES[0]),
                  "license": "Bitstream Vera / DejaVu font licence (free, permissive)",
                  "url": "https://dejavu-fonts.github.io"},
                 {"name": f"STIX fonts {in_matplotlib}", "version": font_version(font_dir() / "STIXGeneral.ttf"),
                  "license": "OFL-1.1", "url": "https://www.stixfonts.org"}],
        min_fonts=MIN_FONTS, max_classes=max_classes, seed=seed, instances=instances, image_size=image_size,
        per_group=per_group, min_group=min_group)
