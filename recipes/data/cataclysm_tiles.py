"""``cataclysm_tiles``: items, monsters and furniture of Cataclysm: Dark Days Ahead as drawn by the tilesets
that Debian's ``cataclysm-dda-data`` ships.

Each tileset is pixel art by a different team of artists that maps game ids (``mon_zombie``, ``pistol``,
``f_fridge``...) to sprites; classes are game ids, instances are the tilesets' drawings of them (plus a
tileset's own random or animated variants). The ``category`` column (``item: tools``, ``monster: zombie``,
``furniture: storage``...) comes from the game's JSON definitions and lets whole categories be held out.
"""

from __future__ import annotations

import json
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
    pixel_digest,
    png_bytes,
    rebuild_command,
    round_robin,
    write_dataset,
)

NAME = "cataclysm_tiles"
PACKAGES = [("deb", "cataclysm-dda-data")]
IMAGE_SIZE = 64
MARGIN = 4
MIN_TILE = 16              # tilesets with smaller base tiles (10 px retro / ASCII sets) are left out
MIN_INSTANCES = 4          # classes with fewer distinct drawings are dropped
MAX_INSTANCES = 20
DUPLICATE_LEVEL = 6.0      # mean absolute difference (0-255, at 32 px) under which two drawings are one
# JSON "type"s of items; their default item category when the definition names none (as the game does)
ITEM_CATEGORIES = {"GUN": "guns", "MAGAZINE": "magazines", "AMMO": "ammo", "TOOL": "tools", "ARMOR": "clothing",
                   "TOOL_ARMOR": "clothing", "PET_ARMOR": "clothing", "BOOK": "books", "GUNMOD": "mods",
                   "TOOLMOD": "mods", "BIONIC_ITEM": "bionics", "GENERIC": "other", "CONTAINER": "container",
                   "ENGINE": "veh_parts", "WHEEL": "veh_parts", "BATTERY": "tools", "COMESTIBLE": "food"}


def game_dir(root: Path) -> Path:
    """``usr/share/games/cataclysm-dda`` of an extracted cataclysm-dda-data package (has ``gfx`` and ``json``)."""
    found = [p for p in sorted(root.glob("usr/share/games/cataclysm-dda*")) if (p / "gfx").is_dir() and (p / "json").is_dir()]
    if not found:
        raise FileNotFoundError(f"no usr/share/games/cataclysm-dda/{{gfx,json}} under {root}: not a cataclysm-dda-data package")
    return found[0]


@dataclass(frozen=True)
class Definition:
    id: str
    kind: str        # "item", "monster" or "furniture"
    category: str    # e.g. "item: tools", "monster: zombie", "furniture: storage"
    name: str        # English name


def _text(name) -> str | None:
    if isinstance(name, str):
        return name
    if isinstance(name, dict):
        return name.get("str") or name.get("str_sp")
    return None


def load_definitions(json_dir: Path) -> dict[str, Definition]:
    """Items, monsters and furniture of the game's JSON (``copy-from`` inheritance resolved), by id.

    The category of an item is its ``category`` (else the game's default for its type; medicine, a
    ``COMESTIBLE`` of ``comestible_type`` MED, is ``drugs``); of a monster its first ``species``; of a
    piece of furniture the name of its ``furniture-*.json`` file."""
    entries: dict[str, tuple[dict, str]] = {}   # id or abstract id -> (entry, file stem)
    for path in sorted(json_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        for entry in data if isinstance(data, list) else [data]:
            if not isinstance(entry, dict):
                continue
            kind_type = entry.get("type")
            if kind_type not in ITEM_CATEGORIES and kind_type not in ("MONSTER", "furniture"):
                continue
            key = entry.get("id") or entry.get("abstract")
            if isinstance(key, str) and key not in entries:
                entries[key] = (entry, path.stem)

    def resolve(key: str, field: str, depth: int = 0):
        if key not in entries or depth > 20:
            return None
        entry = entries[key][0]
        if field in entry:
            return entry[field]
        parent = entry.get("copy-from")
        return resolve(parent, field, depth + 1) if isinstance(parent, str) else None

    definitions = {}
    for key, (entry, stem) in entries.items():
        if "abstract" in entry and "id" not in entry:
            continue
        kind_type = entry["type"]
        if kind_type == "MONSTER":
            species = resolve(key, "species") or ["unknown"]
            species = species[0] if isinstance(species, list) and species else species
            kind, category = "monster", str(species).lower()
        elif kind_type == "furniture":
            kind, category = "furniture", stem.removeprefix("furniture-").replace("_", " ")
        else:
            kind = "item"
            category = resolve(key, "category")
            if not isinstance(category, str):
                category = ("drugs" if kind_type == "COMESTIBLE" and resolve(key, "comestible_type") == "MED"
                            else ITEM_CATEGORIES[kind_type])
            category = category.replace("_", " ")
        name = _text(resolve(key, "name")) or key
        definitions[key] = Definition(key, kind, f"{kind}: {category}", name)
    return definitions


def _first_sprites(fg) -> list[int]:
    """Sprite indices of a tile's ``fg``, one per variant: an int; a list of ints (one variant, its
    rotations: the first); a list of {"weight", "sprite"} variants (sprite an int or a list of rotations)."""
    if isinstance(fg, int):
        return [fg]
    if not isinstance(fg, list) or not fg:
        return []
    if all(isinstance(x, int) for x in fg):
        return [fg[0]]
    out = []
    for variant in fg:
        sprite = variant.get("sprite") if isinstance(variant, dict) else None
        if isinstance(sprite, list) and sprite and isinstance(sprite[0], int):
            out.append(sprite[0])
        elif isinstance(sprite, int):
            out.append(sprite)
    return out


class Tileset:
    """One tileset folder: its ``tile_config.json`` and sprite sheets (sprite indices run on from sheet to
    sheet in ``tiles-new`` order)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.name = folder.name
        config = json.loads((folder / "tile_config.json").read_text(encoding="utf-8"))
        info = config["tile_info"][0]
        self.tile_size = (int(info["width"]), int(info["height"]))
        self._sheets = []       # (first index, count, path, sprite w, sprite h, columns)
        self.tiles: dict[str, list[int]] = {}
        first = 0
        for sheet in config.get("tiles-new", []):
            width = int(sheet.get("sprite_width", self.tile_size[0]))
            height = int(sheet.get("sprite_height", self.tile_size[1]))
            path = folder / sheet["file"]
            if path.is_file():
                with Image.open(path) as image:
                    columns, rows = image.width // width, image.height // height
            else:
                columns = rows = 0
            self._sheets.append((first, columns * rows, path, width, height, columns))
            for tile in sheet.get("tiles", []):
                ids = tile.get("id")
                for tile_id in ids if isinstance(ids, list) else [ids]:
                    sprites = _first_sprites(tile.get("fg"))
                    if isinstance(tile_id, str) and sprites and tile_id not in self.tiles:
                        self.tiles[tile_id] = sprites
            first += columns * rows
        self._images: dict[Path, Image.Image] = {}

    def sprite(self, index: int) -> Image.Image | None:
        """Sprite ``index`` cropped to its visible pixels (RGBA), or None when it is out of range or empty."""
        for first, count, path, width, height, columns in self._sheets:
            if first <= index < first + count:
                if path not in self._images:
                    self._images[path] = Image.open(path).convert("RGBA")
                k = index - first
                left, top = (k % columns) * width, (k // columns) * height
                tile = self._images[path].crop((left, top, left + width, top + height))
                box = tile.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
                return tile.crop(box) if box else None
        return None


@dataclass(frozen=True)
class Drawing:
    tileset: str
    sprite: int
    image: Image.Image


def tilesets(gfx: Path, min_tile: int = MIN_TILE) -> list[Tileset]:
    """The tileset folders whose base tile is at least ``min_tile`` px on both sides, by name."""
    found = [Tileset(p.parent) for p in sorted(gfx.glob("*/tile_config.json"))]
    return [t for t in found if min(t.tile_size) >= min_tile]


def collect_classes(sets: list[Tileset], definitions: dict[str, Definition], min_instances: int = MIN_INSTANCES,
                    max_instances: int = MAX_INSTANCES) -> list[tuple[Definition, list[Drawing]]]:
    """Game ids drawn in at least ``min_instances`` distinct ways, sorted by (category, id).

    Dropped drawings: one whose pixels two or more classes have (in any tileset: generic placeholders that a
    tileset uses for many ids, and drawings borrowed for a look-alike id); one within ``DUPLICATE_LEVEL`` of
    a drawing kept before it for the class (a tileset copying another). At most ``max_instances`` kept,
    evenly spaced in tileset order."""
    drawings: dict[str, list[Drawing]] = defaultdict(list)
    owners: dict[bytes, set[str]] = defaultdict(set)
    for tileset in sets:
        for tile_id, sprites in tileset.tiles.items():
            if tile_id not in definitions:
                continue
            for index in sprites:
                image = tileset.sprite(index)
                if image is not None:
                    drawings[tile_id].append(Drawing(tileset.name, index, image))
                    owners[pixel_digest(image)].add(tile_id)
    chosen = []
    for tile_id in sorted(drawings, key=lambda i: (definitions[i].category, i)):
        kept: list[Drawing] = []
        signatures: list[np.ndarray] = []
        for drawing in drawings[tile_id]:
            if len(owners[pixel_digest(drawing.image)]) > 1:
                continue
            signature = np.asarray(fit_sprite(drawing.image, 32, pixel_art=True), dtype=np.float32)
            if is_near_copy(signature, signatures, DUPLICATE_LEVEL):
                continue
            signatures.append(signature)
            kept.append(drawing)
        if len(kept) < min_instances:
            continue
        kept = evenly_spaced(kept, max_instances)
        chosen.append((definitions[tile_id], kept))
    return chosen


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


CONSTRUCTION = """Classes are the items, monsters and pieces of furniture defined in the game's core JSON
(`json/`, mods left out), named by game id; `name` is the English name. Instances are the drawings of the id
in the tilesets whose base tile is at least {min_tile} px ({tilesets}; the 10 px retro and ASCII sets are left
out): a tile's foreground sprite, and each of its random or animation variants, the unrotated one where a
tile has rotations. The sprite sheets are cut by the index arithmetic of `tile_config.json`.

Tilesets borrow from each other and fill gaps with generic sprites, so a drawing is dropped when another
class has a drawing with the same pixels (in any tileset: placeholders used for many ids, a sprite borrowed
for a look-alike id), or when it is within a mean absolute difference of {dup} (of 255, both fitted to 32 px)
of a drawing kept before it for the class (a tileset copying another). Ids with fewer than {min_instances} drawings left are dropped; at most
{max_instances} are kept, evenly spaced in tileset order. `tileset` and `sprite` say where each image comes from.

Each sprite is cropped to its visible pixels, enlarged by the largest whole factor that fits with
nearest-neighbour (pixel art stays crisp) and then with Lanczos so that its longer side is {inner} px, and
centred on white: {size} x {size} RGB.

`category` is `item: <item category>` (the definition's `category`, or the game's default for its type),
`monster: <first species>` or `furniture: <furniture-*.json file>`; `kind` is item / monster / furniture.
Hold out whole categories with `category`."""


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``cataclysm_tiles`` into ``output_dir``; ``max_classes`` takes classes in turn from each category.
    (``seed`` is unused: nothing is drawn at random.)"""
    (source,) = (fetch_source(kind, name, cache_dir) for kind, name in PACKAGES)
    game = game_dir(source.root)
    definitions = load_definitions(game / "json")
    sets = tilesets(game / "gfx")
    if not sets:
        raise RuntimeError(f"no tileset under {game / 'gfx'} has tiles of at least {MIN_TILE} px")
    classes = round_robin(collect_classes(sets, definitions), lambda c: c[0].category, max_classes)
    if not classes:
        raise RuntimeError(f"no game id is drawn in {MIN_INSTANCES} distinct ways by the tilesets under {game / 'gfx'}")
    columns: dict[str, list] = {"image": [], "label": [], "category": [], "kind": [], "name": [], "tileset": [],
                                "sprite": []}
    for label, (definition, drawings) in enumerate(tqdm(classes, desc=NAME, unit="class", mininterval=5)):
        for drawing in drawings:
            columns["image"].append(png_bytes(fit_sprite(drawing.image, IMAGE_SIZE, MARGIN, pixel_art=True)))
            columns["label"].append(label)
            columns["category"].append(definition.category)
            columns["kind"].append(definition.kind)
            columns["name"].append(definition.name)
            columns["tileset"].append(drawing.tileset)
            columns["sprite"].append(drawing.sprite)
    used = sorted({d.tileset for _, drawings in classes for d in drawings})
    summary = (f"{len(classes)} items, monsters and pieces of furniture of Cataclysm: Dark Days Ahead, each drawn "
               f"by several of {len(used)} pixel-art tilesets (different artists), from Debian's {source.name} "
               f"{source.version}.")
    features = datasets.Features({
        "image": datasets.Image(), "label": class_label([d.id for d, _ in classes]),
        "category": datasets.Value("string"), "kind": datasets.Value("string"), "name": datasets.Value("string"),
        "tileset": datasets.Value("string"), "sprite": datasets.Value("int32")})
    dataset = datasets.Dataset.from_dict(columns, features=features,
                                         info=datasets.DatasetInfo(description=summary, features=features))
    tileset_text = ", ".join(f"{t.name} {t.tile_size[0]}x{t.tile_size[1]}" for t in sets)
    return write_dataset(
        dataset, output_dir, pretty_name="Cataclysm: DDA tiles (several tilesets)", licenses=["cc-by-sa-3.0"],
        summary=summary,
        sources=[{"name": f"Debian {source.name}", "version": source.version,
                  "license": "CC-BY-SA-3.0 (game data and tilesets; Debian copyright file)",
                  "url": "https://github.com/CleverRaven/Cataclysm-DDA"}],
        construction=CONSTRUCTION.format(min_tile=MIN_TILE, tilesets=tileset_text,
                                         dup=DUPLICATE_LEVEL, min_instances=MIN_INSTANCES,
                                         max_instances=MAX_INSTANCES, inner=IMAGE_SIZE - 2 * MARGIN,
                                         size=IMAGE_SIZE),
        group_column="category", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["game-sprites", "pixel-art", "multi-style"])
