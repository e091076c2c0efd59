"""``wesnoth_units``: the unit sprites of Battle for Wesnoth (Debian's ``wesnoth-1.16-data``).

Classes are unit types (Bowman, Elvish Shaman, Drake Burner, Giant Scorpion...); instances are the unit's
own animation frames (standing, facing north-east, attacks, defence, idle, death) in a seeded team colour;
the ``race`` column (human, elf, drake, undead, monster...) lets whole races be held out.

The unit definitions (WML ``[unit_type]`` blocks in ``data/core/units``) say which image files each unit's
animations use; they are read with a small subset of WML: file-local macros without arguments, square
bracket frame lists (``unit-attack-[1~4,1].png``) and comma-separated frame lists. Frames of ``[female]``
and ``[variation]`` blocks (another look of the unit) are left out, and so is a frame that several unit
types use (unless it is the unit's own base image).
"""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

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
    png_bytes,
    rebuild_command,
    round_robin,
    write_dataset,
)

NAME = "wesnoth_units"
PACKAGES = [("deb", "wesnoth-1.16-data")]
IMAGE_SIZE = 64
MARGIN = 3                 # pixels left free around the sprite
MAX_FRAMES = 20            # instances per class at most
MIN_FRAMES = 4             # classes with fewer distinct frames are dropped
MIN_COVER = 0.35           # a frame with less opaque area than this share of the base image's is dropped
DUPLICATE_LEVEL = 3.0      # mean absolute difference (0-255) below which two frames count as the same
TEAM_PALETTE = "magenta"   # the colour palette Wesnoth recolours to a side's team colour

# image paths inside WML: units/...png, with optional [a~b,c] frame lists
_PATH = re.compile(r"units/(?:[\w+\-/.]|\[[^\]\n\"]*\])+?\.png")
_BRACKETS = re.compile(r"\[([^\]]*)\]")


@dataclass(frozen=True)
class UnitType:
    id: str
    name: str
    race: str
    image: str | None           # the base image (standing, facing south), relative to data/core/images
    frames: tuple[str, ...]     # every image the unit's animations use, in order of first mention
    cfg: str                    # the definition file, relative to data/core


def core_dir(root: Path) -> Path:
    """``data/core`` of an extracted wesnoth-*-data package."""
    found = sorted(root.glob("usr/share/games/wesnoth/*/data/core"))
    if not found:
        raise FileNotFoundError(f"no usr/share/games/wesnoth/*/data/core under {root}: not a wesnoth data package")
    return found[-1]


def _expand_item(item: str) -> list[str]:
    item = item.strip()
    span = re.fullmatch(r"(-?\d+)~(-?\d+)", item)
    if span:
        first, last = int(span[1]), int(span[2])
        step = 1 if last >= first else -1
        return [str(k) for k in range(first, last + step, step)]
    repeat = re.fullmatch(r"(.*)\*(\d+)", item)
    if repeat:
        return [repeat[1]] * int(repeat[2])
    return [item]


def expand_frames(path: str) -> list[str]:
    """WML's square-bracket expansion: ``a-[1~3,1].png`` -> a-1, a-2, a-3, a-1; several brackets in one path
    advance together; ``x*2`` repeats. An empty list when the brackets disagree in length."""
    groups = _BRACKETS.findall(path)
    if not groups:
        return [path]
    lists = [[value for item in group.split(",") for value in _expand_item(item)] for group in groups]
    if any(len(values) != len(lists[0]) for values in lists):
        return []
    out = []
    for k in range(len(lists[0])):
        expanded = path
        for values in lists:
            expanded = _BRACKETS.sub(values[k], expanded, count=1)
        out.append(expanded)
    return out


def _strip_blocks(text: str, tag: str) -> str:
    return re.sub(rf"\[{tag}\].*?\[/{tag}\]", "", text, flags=re.S)


def _field(body: str, key: str) -> str | None:
    found = re.search(rf"^[ \t]*{key}[ \t]*=[ \t]*(?:_[ \t]*)?\"?([^\"#\n]*)", body, flags=re.M)
    return found[1].strip() if found else None


def parse_unit_types(core: Path) -> list[UnitType]:
    """The ``[unit_type]`` blocks under ``core/units`` whose images exist, sorted by cfg path."""
    images = core / "images"
    units = []
    for cfg in sorted((core / "units").rglob("*.cfg")):
        text = cfg.read_text(encoding="utf-8", errors="replace")
        macros = dict(re.findall(r"^#define[ \t]+(\w+)[ \t]*\n(.*?)#enddef", text, flags=re.M | re.S))
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for _ in range(3):  # macros that use macros
            for key, value in macros.items():
                text = text.replace("{" + key + "}", value.strip())
        for block in re.findall(r"\[unit_type\](.*?)\[/unit_type\]", text, flags=re.S):
            body = _strip_blocks(_strip_blocks(block, "variation"), "female")
            unit_id = _field(body, "id")
            if not unit_id:
                continue
            frames: list[str] = []
            for template in _PATH.findall(body):
                for path in expand_frames(template):
                    if path not in frames and (images / path).is_file():
                        frames.append(path)
            base = _field(body, "image")
            base = base.split("~")[0].split(":")[0] if base else None
            units.append(UnitType(unit_id, _field(body, "name") or unit_id, _field(body, "race") or "unknown",
                                  base if base in frames else None, tuple(frames), str(cfg.relative_to(core))))
    return units


def read_team_colors(core: Path) -> tuple[list[tuple[int, int, int]], dict[str, tuple]]:
    """Wesnoth's ``team-colors.cfg``: the magenta palette (reference colour first) and the default side
    colours, id -> (mid, max, min) RGB triples."""
    text = (core / "team-colors.cfg").read_text(encoding="utf-8")
    palette = re.search(rf"^\s*{TEAM_PALETTE}=([0-9A-Fa-f,]+)", text, flags=re.M)
    if palette is None:
        raise ValueError(f"no {TEAM_PALETTE} palette in {core / 'team-colors.cfg'}")

    def rgb(hex_code: str) -> tuple[int, int, int]:
        return int(hex_code[0:2], 16), int(hex_code[2:4], 16), int(hex_code[4:6], 16)

    ranges = {}
    for block in re.findall(r"\[color_range\](.*?)\[/color_range\]", text, flags=re.S):
        if re.search(r"^\s*default=yes", block, flags=re.M):
            colour_id = re.search(r"^\s*id=(\S+)", block, flags=re.M)[1]
            codes = re.search(r"^\s*rgb=([0-9A-Fa-f,]+)", block, flags=re.M)[1].split(",")
            ranges[colour_id] = (rgb(codes[0]), rgb(codes[1]), rgb(codes[2]))
    if not ranges:
        raise ValueError(f"no default team colours in {core / 'team-colors.cfg'}")
    return [rgb(c) for c in palette[1].split(",")], ranges


def recolor_map(palette: list[tuple[int, int, int]], colour: tuple) -> dict[tuple[int, int, int], tuple[int, int, int]]:
    """Wesnoth's team recolouring (``recolor_range`` of src/color_range.cpp): the palette's first colour becomes
    the team's mid colour; darker palette colours blend towards the team's min, lighter ones towards its max,
    by their grey level relative to the first."""
    mid, high, low = (np.asarray(c, dtype=np.float32) for c in colour)
    reference = sum(palette[0]) // 3
    mapping = {}
    for old in palette:
        grey = sum(old) // 3
        if reference and grey <= reference:
            ratio = np.float32(grey / reference)
            new = ratio * mid + (1 - ratio) * low
        else:
            ratio = np.float32((255.0 - grey) / (255.0 - reference))
            new = ratio * mid + (1 - ratio) * high
        mapping[old] = tuple(int(min(v, 255)) for v in new.astype(np.uint32))
    return mapping


def recolor(image: Image.Image, mapping: dict) -> Image.Image:
    """``image`` (RGBA) with every pixel of exactly a mapped colour replaced."""
    pixels = np.array(image.convert("RGBA"))
    rgb = pixels[..., :3]
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    for (r, g, b), new in mapping.items():
        rgb[packed == ((r << 16) | (g << 8) | b)] = new
    return Image.fromarray(pixels, "RGBA")


def opaque_area(image: Image.Image) -> int:
    return int((np.asarray(image.getchannel("A")) > 127).sum())


def _signature(image: Image.Image) -> np.ndarray:
    return np.asarray(fit_sprite(image, 32), dtype=np.float32)


@dataclass(frozen=True)
class UnitClass:
    unit: UnitType
    frames: tuple[str, ...]     # distinct, well-covered frames kept, at most MAX_FRAMES


def unit_classes(core: Path, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> list[UnitClass]:
    """Unit types with at least ``min_frames`` usable frames, sorted by (race, id).

    A frame is usable when only this unit type uses it (or it is the unit's base image), it differs from each
    frame kept before it by a mean absolute difference of at least ``DUPLICATE_LEVEL`` (both fitted to 32 px),
    and its opaque area is at least ``MIN_COVER`` of the base image's (of the median frame's when
    the unit has no base image). At most ``max_frames`` are kept, evenly spaced over the cfg order.
    """
    units = parse_unit_types(core)
    users: dict[str, set[str]] = defaultdict(set)
    for unit in units:
        for frame in unit.frames:
            users[frame].add(unit.id)
    seen_ids: set[str] = set()
    chosen = []
    for unit in units:
        if unit.id in seen_ids:
            continue
        seen_ids.add(unit.id)
        frames = [f for f in unit.frames if len(users[f]) == 1 or f == unit.image]
        loaded = {f: Image.open(core / "images" / f).convert("RGBA") for f in frames}
        areas = {f: opaque_area(im) for f, im in loaded.items()}
        if not frames:
            continue
        reference = areas[unit.image] if unit.image in areas else float(np.median(list(areas.values())))
        kept: list[str] = []
        signatures: list[np.ndarray] = []
        for frame in frames:
            if areas[frame] < MIN_COVER * reference:
                continue
            signature = _signature(loaded[frame])
            if is_near_copy(signature, signatures, DUPLICATE_LEVEL):
                continue
            signatures.append(signature)
            kept.append(frame)
        if len(kept) < min_frames:
            continue
        kept = evenly_spaced(kept, max_frames)
        chosen.append(UnitClass(unit, tuple(kept)))
    return sorted(chosen, key=lambda c: (c.unit.race, c.unit.id))


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


CONSTRUCTION = """Classes are the unit types defined in Wesnoth's core unit files (`data/core/units/**/*.cfg`,
`[unit_type]` blocks; campaign-only units are not in this package). Each unit's WML names the image files of
its animations (standing, facing north-east, melee and ranged attacks, defence, idle, movement, death);
they are read with file-local macros without arguments expanded and WML's square-bracket frame lists
(`unit-attack-[1~4,1].png`) unrolled. Images of `[female]` and `[variation]` blocks are left out (another
look of the unit), and so is an image that several unit types use, unless it is the unit's own base image.

Instances are the unit's distinct frames: a frame is dropped when it repeats an earlier one (a mean absolute
difference under {dup} of 255 once both are fitted to 32 px) or when its opaque area is
under {cover:.0%} of the unit's base image (the start or end of a death or submerge animation). Units with
fewer than {min_frames} frames left are dropped; units with more than {max_frames} keep {max_frames}, evenly
spaced over the order the WML names them in. The `frame` column names each file.

Each frame is drawn in one of Wesnoth's {teams} default team colours ({team_names}), chosen per image by a
generator seeded with (seed {seed}, CRC-32 of the unit id), with Wesnoth's own recolouring of the magenta
palette of `team-colors.cfg` (`team_color` column). The sprite is cropped to its opaque pixels,
scaled with Lanczos so that its longer side is {inner} px, centred on white: {size} x {size} RGB.

`race` is the unit's WML race (human, elf, dwarf, orc, drake, lizard = saurians, undead, monster...): hold
out whole races with it. `unit_name` is the English name, `cfg` the definition file."""


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``wesnoth_units`` into ``output_dir``; ``max_classes`` takes classes in turn from each race."""
    (source,) = (fetch_source(kind, name, cache_dir) for kind, name in PACKAGES)
    core = core_dir(source.root)
    palette, teams = read_team_colors(core)
    mappings = {team: recolor_map(palette, colour) for team, colour in teams.items()}
    team_names = sorted(teams)
    classes = round_robin(unit_classes(core), lambda c: c.unit.race, max_classes)
    if not classes:
        raise RuntimeError(f"no unit type under {core / 'units'} has {MIN_FRAMES} usable frames")
    columns: dict[str, list] = {"image": [], "label": [], "race": [], "unit_name": [], "frame": [],
                                "team_color": [], "cfg": []}
    for label, unit_class in enumerate(tqdm(classes, desc=NAME, unit="class", mininterval=5)):
        unit = unit_class.unit
        rng = np.random.default_rng([seed, zlib.crc32(unit.id.encode("utf-8"))])
        for frame in unit_class.frames:
            team = team_names[int(rng.integers(len(team_names)))]
            image = recolor(Image.open(core / "images" / frame), mappings[team])
            columns["image"].append(png_bytes(fit_sprite(image, IMAGE_SIZE, MARGIN)))
            columns["label"].append(label)
            columns["race"].append(unit.race)
            columns["unit_name"].append(unit.name)
            columns["frame"].append(frame)
            columns["team_color"].append(team)
            columns["cfg"].append(unit.cfg)
    races = sorted({c.unit.race for c in classes})
    summary = (f"{len(classes)} unit types of Battle for Wesnoth ({len(races)} races), each drawn in its own "
               "animation frames (standing, facing away, attacking, defending, idle, dying) in a random team "
               f"colour, from Debian's {source.name} {source.version}.")
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label([c.unit.id for c in classes]),
        "race": datasets.Value("string"), "unit_name": datasets.Value("string"), "frame": datasets.Value("string"),
        "team_color": datasets.Value("string"), "cfg": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(columns, features=features,
                                         info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Wesnoth units (animation frames)", licenses=["gpl-2.0"],
        summary=summary,
        sources=[{"name": f"Debian {source.name}", "version": source.version,
                  "license": "GPL-2.0-or-later (Battle for Wesnoth art and data)", "url": "https://www.wesnoth.org"}],
        construction=CONSTRUCTION.format(dup=DUPLICATE_LEVEL, cover=MIN_COVER, min_frames=MIN_FRAMES,
                                         max_frames=MAX_FRAMES, teams=len(team_names),
                                         team_names=", ".join(team_names), seed=seed,
                                         inner=IMAGE_SIZE - 2 * MARGIN, size=IMAGE_SIZE),
        group_column="race", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["game-sprites", "pixel-art", "animation-frames"])
