"""The dataset builders of recipes/data: small slices of each, their dataset cards, their helpers."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # recipes/ is not an installed package
    sys.path.insert(0, str(REPO))

from data_sources import blocks, fake_package  # noqa: E402

from hf_hyperflow.episodes import ClassSplit, EpisodeSampler  # noqa: E402
from recipes.data import BUILDERS, get_builder  # noqa: E402
from recipes.data.cataclysm_tiles import collect_classes, load_definitions, tilesets  # noqa: E402
from recipes.data.common import (  # noqa: E402
    dataset_stats,
    evenly_spaced,
    fit_sprite,
    is_near_copy,
    pixel_digest,
    round_robin,
    write_dataset,
)
from recipes.data.emoji import sequence_key  # noqa: E402
from recipes.data.fashion_mnist import read_idx  # noqa: E402
from recipes.data.glyphs import GlyphRenderer, character_group, distort  # noqa: E402
from recipes.data.glyphs_default import FONT_FILES, font_dir  # noqa: E402
from recipes.data.wesnoth_units import expand_frames, parse_unit_types, read_team_colors, recolor, recolor_map  # noqa: E402

# name -> (classes in the slice, group column, licence ids expected in the card)
SLICES = {
    "glyphs_default": (6, "script", ["other", "ofl-1.1"]),
    "digits": (3, None, ["cc-by-4.0"]),
    "glyphs": (6, "script", ["ofl-1.1", "gpl-3.0", "other"]),
    "emoji": (8, "category", ["apache-2.0", "cc-by-4.0", "cc-by-sa-4.0"]),
    "fashion_mnist": (2, None, ["mit"]),
    "wesnoth_units": (6, "race", ["gpl-2.0"]),
    "cataclysm_tiles": (6, "category", ["cc-by-sa-3.0"]),
    "openclipart": (6, "category", ["cc0-1.0"]),
    "tuxpaint_stamps": (6, "category", ["gpl-2.0", "gfdl", "cc-by-sa-3.0", "cc-by-2.5", "cc-by-2.0", "other"]),
    "quickdraw": (6, "group", ["cc-by-4.0"]),
}
ALWAYS = {"glyphs_default", "digits"}  # their sources come with pip


def check_card(path: Path, dataset: datasets.Dataset, group_column: str | None, licenses: list[str]):
    card = DatasetCard.load(path / "README.md")
    data = card.data.to_dict()
    assert (data["license"] if isinstance(data["license"], list) else [data["license"]]) == licenses
    assert data["task_categories"] == ["image-classification"]
    stats = dataset_stats(dataset, group_column)
    assert f"- classes: {stats['classes']}\n" in card.text
    assert f"- images: {len(dataset)}\n" in card.text
    for heading in ("## Sources", "## How classes and instances were formed", "## Columns", "## Rebuild"):
        assert heading in card.text
    assert "python -m recipes.data.build --name " in card.text
    if group_column is not None:
        for group, n in stats["groups"].items():
            assert f"| {group} | {n} |" in card.text


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "glyphs" else n for n in sorted(SLICES)])
def test_builder_slice(name, tmp_path):
    builder = get_builder(name)
    missing = builder.sources_missing()
    if missing:
        assert name not in ALWAYS, f"{name} must build from pip alone: {missing}"
        pytest.skip(f"{name}: sources {missing} (run python -m recipes.data.build --name {name} to fetch them)")
    classes, group_column, licenses = SLICES[name]
    out = tmp_path / name
    dataset = builder.build(out, max_classes=classes)
    reloaded = datasets.load_from_disk(str(out))
    assert len(reloaded) == len(dataset) > 0
    assert isinstance(reloaded.features["image"], datasets.Image)
    label = reloaded.features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.num_classes == classes
    counts = np.bincount(reloaded.data.column("label").to_numpy(), minlength=classes)
    assert (counts > 0).all()
    if group_column is not None:
        # slices take classes in turn from each group, and every dataset has more groups than that
        assert len(set(reloaded.data.column(group_column).to_pylist())) == classes
    image = reloaded[0]["image"]
    assert image.size[0] == image.size[1] >= 28
    check_card(out, reloaded, group_column, licenses)
    # the episode sampler runs on it as built
    ways = min(classes, 5)
    episode = EpisodeSampler(reloaded, ways=ways, shots=1, queries=1, split=None)[0]
    assert episode.ways == ways and all(im.mode == "RGB" for im in episode.support_images)


def test_glyph_classes_form_scripts_and_instances(tmp_path):
    dataset = get_builder("glyphs_default").build(tmp_path / "g", max_classes=8, instances=5, image_size=32)
    assert len(dataset) == 8 * 5
    rows = dataset.select_columns(["label", "script", "character", "font", "instance"]).to_list()
    names = dataset.features["label"].names
    for row in rows:
        assert names[row["label"]] == unicodedata.name(row["character"])
        assert character_group(row["character"]) == row["script"]
        assert row["font"] + ".ttf" in FONT_FILES
    assert sorted({r["instance"] for r in rows}) == list(range(5))
    # 8 classes taken in turn from the groups: 8 different groups
    assert len({r["script"] for r in rows}) == 8
    # a character's instances use several fonts
    fonts_per_class = {}
    for r in rows:
        fonts_per_class.setdefault(r["label"], set()).add(r["font"])
    assert min(len(f) for f in fonts_per_class.values()) >= 3
    # the group column holds out whole scripts
    split = ClassSplit.from_dataset(dataset, group_column="script", seed=0)
    assert not set(split.groups["train"]) & set(split.groups["test"])


def test_glyph_rendering_is_seeded():
    renderer = GlyphRenderer([font_dir() / FONT_FILES[0]])
    glyph = renderer.glyph(0, "Ж")
    first = distort(glyph, np.random.default_rng([3, 0x416]), 32)
    again = distort(glyph, np.random.default_rng([3, 0x416]), 32)
    other = distort(glyph, np.random.default_rng([4, 0x416]), 32)
    assert first.mode == "L" and first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    pixels = np.asarray(first)
    assert pixels[0, 0] == 255 and pixels.min() < 64          # black ink on white, ink present
    # a small character keeps its size: a period has far less ink than a capital
    dot = 255 - np.asarray(distort(renderer.glyph(0, "."), np.random.default_rng(0), 32), dtype=float)
    capital = 255 - np.asarray(distort(renderer.glyph(0, "H"), np.random.default_rng(0), 32), dtype=float)
    assert dot.sum() < 0.25 * capital.sum()


def test_character_groups():
    assert character_group("Ж") == "Cyrillic"
    assert character_group("ζ") == "Greek"
    assert character_group("→") == "Arrows"          # shared characters: their Unicode block
    assert character_group("∑") == "Mathematical Operators"


def test_digits_images_keep_their_ink(tmp_path):
    from sklearn.datasets import load_digits

    dataset = get_builder("digits").build(tmp_path / "d")
    bunch = load_digits()
    assert len(dataset) == len(bunch.target) == 1797
    assert dataset.data.column("label").to_pylist() == bunch.target.tolist()
    image = np.asarray(dataset[0]["image"].resize((8, 8), Image.Resampling.BOX), dtype=float)
    ink = 255 - image
    assert np.corrcoef(ink.ravel(), bunch.images[0].ravel())[0, 1] > 0.9


def test_read_idx_known_answer(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes((0x0D03).to_bytes(4, "big") + header[4:] + images.tobytes())
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError, match=r"header says \(2, 3, 4\) but holds 23 values"):
        read_idx(tmp_path / "short")


def test_sequence_key_and_round_robin():
    assert sequence_key("2764-FE0F") == "2764" == sequence_key("2764")
    assert sequence_key("1f468-200d-1f9b0") == "1F468-200D-1F9B0"
    items = ["a1", "a2", "a3", "b1", "c1", "c2"]
    assert round_robin(items, lambda s: s[0], 4) == ["a1", "a2", "b1", "c1"]
    assert round_robin(items, lambda s: s[0], None) == items


def test_duplicate_rules_and_evenly_spaced_instances():
    assert evenly_spaced(list(range(25)), 20) == [k for k in range(25) if k not in (2, 7, 12, 17, 22)]
    assert evenly_spaced([1, 2, 3], 20) == [1, 2, 3]
    grey = np.full((4, 4, 3), 100, np.float32)
    assert is_near_copy(grey + 5.9, [grey], 6.0) and not is_near_copy(grey + 6.0, [grey], 6.0)
    assert not is_near_copy(grey, [], 6.0)
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert pixel_digest(image) == pixel_digest(image.copy()) != pixel_digest(Image.new("RGB", (4, 4), (1, 2, 4)))
    assert pixel_digest(image) != pixel_digest(Image.new("RGB", (2, 8), (1, 2, 3)))   # same bytes, other size


def test_write_dataset_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    dataset = datasets.Dataset.from_dict({"label": [0]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["a"])}))
    with pytest.raises(ValueError, match="exists and is not a dataset folder"):
        write_dataset(dataset, tmp_path / "mine", pretty_name="x", licenses=["mit"], summary="", sources=[],
                      construction="", group_column=None, command="", tags=[])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_builds_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recipes.data.build", "--name", "digits", "--output",
                           str(tmp_path / "digits"), "--max-classes", "3"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["name"] == "digits" and report["classes"] == 3
    assert report["images"] == len(datasets.load_from_disk(str(tmp_path / "digits")))
    assert report["size_mb"] > 0 and report["build_s"] >= 0
    assert "--max-classes 3" in (tmp_path / "digits" / "README.md").read_text()
    assert set(BUILDERS) == set(SLICES)
    assert get_builder("digits").NAME == "digits" and BUILDERS["emoji"].NAME == "emoji"
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; builders: \['cataclysm_tiles', 'digits', 'emoji'"):
        get_builder("nope")


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from recipes.data.build import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "nope", "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--name", "digits", "--output", str(tmp_path), "--max-classes", "0"])
    assert "--max-classes must be a positive integer" in capsys.readouterr().err


# --- game sprite builders on small source trees laid out like the Debian packages -------------------------

MAGENTA = ("F49AC1,3F0016,55002A,690039,7B0045,8C0051,9E005D,B10069,C30074,D6007F,EC008C,EE3D96,EF5BA1,F172AC,"
           "F287B6,F6ADCD,F8C1D9,FAD5E5,FDE9F1")

WESNOTH_UNITS = {
    "units/humans/Bowman.cfg": """#textdomain wesnoth-units
[unit_type]
    id=Bowman
    name= _ "Bowman"
    race=human
    image="units/human-loyalists/bowman.png"
    {STANDING_ANIM_DIRECTIONAL "units/human-loyalists/bowman.png" "units/human-loyalists/bowman-ne.png"}
    [attack_anim]
        [frame]
            image="units/human-loyalists/bowman-attack-[1~3,1].png:[75*2,100,65]"
        [/frame]
        [frame]
            image=units/human-loyalists/bowman-copy.png:50,units/human-loyalists/bowman-die-9.png:100
        [/frame]
    [/attack_anim]
    # image="units/human-loyalists/bowman-commented.png"
    {SHARED_ANIM "units/human-loyalists/shared-swing.png"}
    [female]
        image="units/human-loyalists/bowman+female.png"
    [/female]
    [variation]
        image="units/human-loyalists/bowman-ghost.png"
    [/variation]
[/unit_type]
""",
    "units/humans/Spearman.cfg": """#textdomain wesnoth-units
#define PATH_TEMP
units/human-loyalists/#enddef
[unit_type]
    id=Spearman
    name= _ "Spearman"
    race=human
    image="{PATH_TEMP}spearman.png"
    {DEFENSE_ANIM "{PATH_TEMP}spearman-defend-2.png" "{PATH_TEMP}spearman-defend-1.png" {SOUND_LIST:HUMAN_HIT} }
    [attack_anim]
        [frame]
            image="{PATH_TEMP}spearman-attack-[a,b].png:100"
        [/frame]
        [frame]
            image="units/human-loyalists/shared-swing.png:100"
        [/frame]
    [/attack_anim]
[/unit_type]
#undef PATH_TEMP
""",
    "units/drakes/Burner.cfg": """[unit_type]
    id=Drake Burner
    name= _ "Drake Burner"
    race=drake
    image="units/drakes/burner.png"
    [attack_anim]
        [frame]
            image="units/drakes/burner-fire-[1~4].png:80"
        [/frame]
    [/attack_anim]
[/unit_type]
[unit_type]
    id=Drake Glider
    name= _ "Drake Glider"
    race=drake
    image="units/drakes/glider.png"
    [attack_anim]
        [frame]
            image="units/drakes/glider-[1~2].png:80"
        [/frame]
    [/attack_anim]
[/unit_type]
""",
    "units/undead/Skeleton.cfg": """[unit_type]
    id=Skeleton
    name= _ "Skeleton"
    race=undead
    image="units/undead-skeletal/skeleton.png"
    [defend]
        [frame]
            image="units/undead-skeletal/skeleton-[defend,attack,idle].png:100"
        [/frame]
    [/defend]
[/unit_type]
""",
}
# frames each kept unit must end up with, in WML order
WESNOTH_FRAMES = {
    "Bowman": ["bowman.png", "bowman-ne.png", "bowman-attack-1.png", "bowman-attack-2.png", "bowman-attack-3.png"],
    "Spearman": ["spearman.png", "spearman-defend-2.png", "spearman-defend-1.png", "spearman-attack-a.png",
                 "spearman-attack-b.png"],
    "Drake Burner": ["burner.png"] + [f"burner-fire-{k}.png" for k in range(1, 5)],
    "Skeleton": ["skeleton.png", "skeleton-defend.png", "skeleton-attack.png", "skeleton-idle.png"],
}


def fake_wesnoth(cache: Path) -> Path:
    core = fake_package(cache, "wesnoth-1.16-data", "1:1.16.9-1") / "usr/share/games/wesnoth/1.16/data/core"
    (core / "units").mkdir(parents=True)
    (core / "team-colors.cfg").write_text(
        "[color_range]\n    id=red\n    rgb=FF0000,FFFFFF,000000,FF0000\n    default=yes\n[/color_range]\n"
        "[color_range]\n    id=lightred\n    rgb=D1620D,FFFFFF,000000,FF0000\n[/color_range]\n"
        "[color_range]\n    id=blue\n    rgb=2E419B,FFFFFF,0F0F0F,0000FF\n    default=yes\n[/color_range]\n"
        f"[color_palette]\n    magenta={MAGENTA}\n[/color_palette]\n")
    for relative, text in WESNOTH_UNITS.items():
        (core / relative).parent.mkdir(parents=True, exist_ok=True)
        (core / relative).write_text(text)
    folders = {"Bowman": "human-loyalists", "Spearman": "human-loyalists", "Drake Burner": "drakes",
               "Skeleton": "undead-skeletal"}
    rng = np.random.default_rng(7)
    frames = {f"units/{folders[u]}/{f}": blocks(rng, (72, 72), fill=0.7) for u, fs in WESNOTH_FRAMES.items() for f in fs}
    extra = {"units/human-loyalists/bowman-copy.png": frames["units/human-loyalists/bowman.png"],  # same pixels
             "units/human-loyalists/bowman-die-9.png": blocks(rng, (72, 72), fill=0.1),  # nearly gone
             "units/human-loyalists/bowman-commented.png": blocks(rng, (72, 72), fill=0.7),
             "units/human-loyalists/shared-swing.png": blocks(rng, (72, 72), fill=0.7),  # two units use it
             "units/human-loyalists/bowman+female.png": blocks(rng, (72, 72), fill=0.7),
             "units/human-loyalists/bowman-ghost.png": blocks(rng, (72, 72), fill=0.7),
             "units/drakes/glider.png": blocks(rng, (72, 72), fill=0.7),
             "units/drakes/glider-1.png": blocks(rng, (72, 72), fill=0.7),
             "units/drakes/glider-2.png": blocks(rng, (72, 72), fill=0.7)}
    palette = [tuple(int(c[k:k + 2], 16) for k in (0, 2, 4)) for c in MAGENTA.split(",")]
    skeleton = np.array(frames["units/undead-skeletal/skeleton.png"])
    skeleton[20:50, 20:50, :3] = palette[0]  # team-coloured cloth
    frames["units/undead-skeletal/skeleton.png"] = Image.fromarray(skeleton, "RGBA")
    for relative, image in {**frames, **extra}.items():
        (core / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(core / "images" / relative)
    return core


def test_wesnoth_frame_lists_and_team_colours(tmp_path):
    assert expand_frames("u/a-[1~3,1].png") == ["u/a-1.png", "u/a-2.png", "u/a-3.png", "u/a-1.png"]
    assert expand_frames("u/a-[3~1].png") == ["u/a-3.png", "u/a-2.png", "u/a-1.png"]
    assert expand_frames("u/[x,y]-[1,2].png") == ["u/x-1.png", "u/y-2.png"]      # brackets advance together
    assert expand_frames("u/a-[b*2,c].png") == ["u/a-b.png", "u/a-b.png", "u/a-c.png"]
    assert expand_frames("u/[x,y]-[1~3].png") == []                              # lengths disagree
    core = fake_wesnoth(tmp_path)
    palette, teams = read_team_colors(core)
    assert list(teams) == ["red", "blue"] and teams["blue"] == ((0x2E, 0x41, 0x9B), (255, 255, 255), (15, 15, 15))
    red = recolor_map(palette, teams["red"])
    # known answers of Wesnoth's rule: the reference colour becomes the team colour exactly; 3F0016 (grey 28 of
    # the reference's 197) blends towards the minimum; FDE9F1 (grey 242) towards the maximum
    assert red[(0xF4, 0x9A, 0xC1)] == (255, 0, 0)
    assert red[(0x3F, 0x00, 0x16)] == (36, 0, 0)
    assert red[(0xFD, 0xE9, 0xF1)] == (255, 197, 197)
    image = Image.new("RGBA", (3, 1))
    image.putdata([(0xF4, 0x9A, 0xC1, 255), (0x3F, 0x00, 0x16, 128), (0xF4, 0x9A, 0xC2, 255)])
    assert np.asarray(recolor(image, red)).tolist() == [[[255, 0, 0, 255], [36, 0, 0, 128], [0xF4, 0x9A, 0xC2, 255]]]


def test_wesnoth_units_builder_on_a_small_package(tmp_path):
    core = fake_wesnoth(tmp_path / "cache")
    units = {u.id: u for u in parse_unit_types(core)}
    assert set(units) == {"Bowman", "Spearman", "Drake Burner", "Drake Glider", "Skeleton"}
    bowman = units["Bowman"]
    assert bowman.race == "human" and bowman.image == "units/human-loyalists/bowman.png"
    # commented-out, [female] and [variation] images are not the unit's frames; WML order is kept
    assert not {"bowman-commented.png", "bowman+female.png", "bowman-ghost.png"} & {Path(f).name for f in bowman.frames}
    assert [Path(f).name for f in bowman.frames][:5] == WESNOTH_FRAMES["Bowman"]
    dataset = get_builder("wesnoth_units").build(tmp_path / "out", cache_dir=tmp_path / "cache")
    names = dataset.features["label"].names
    assert names == ["Drake Burner", "Bowman", "Spearman", "Skeleton"]        # by (race, id); Drake Glider has 3
    rows = dataset.select_columns(["label", "race", "frame", "team_color", "unit_name"]).to_list()
    for unit, frames in WESNOTH_FRAMES.items():
        kept = [Path(r["frame"]).name for r in rows if names[r["label"]] == unit]
        # dropped: a copy of the base image, a nearly empty death frame, a frame two units share
        assert kept == frames, unit
    assert {r["race"] for r in rows} == {"drake", "human", "undead"}
    assert {r["team_color"] for r in rows} <= {"red", "blue"} and len({r["team_color"] for r in rows}) == 2
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    # the magenta cloth of the skeleton's base image is drawn in its team colour
    skeleton = next(k for k, r in enumerate(rows) if r["frame"].endswith("skeleton.png"))
    pixels = np.asarray(dataset[skeleton]["image"]).reshape(-1, 3)
    team = {"red": (255, 0, 0), "blue": (0x2E, 0x41, 0x9B)}[rows[skeleton]["team_color"]]
    assert (np.abs(pixels.astype(int) - team).sum(1) <= 3).sum() > 100
    assert not (np.abs(pixels.astype(int) - (0xF4, 0x9A, 0xC1)).sum(1) <= 3).any()
    check_card(tmp_path / "out", dataset, "race", ["gpl-2.0"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "1:1.16.9-1" in card and "blue, red" in card
    again = get_builder("wesnoth_units").build(tmp_path / "again", cache_dir=tmp_path / "cache")
    assert again["team_color"] == dataset["team_color"]                          # seeded
    split = ClassSplit.from_dataset(dataset, group_column="race", seed=0)
    assert sorted(g for s in split.groups.values() for g in s) == ["drake", "human", "undead"]


def fake_cataclysm(cache: Path) -> tuple[Path, dict]:
    """Six 16 px tilesets and one 10 px tileset drawing seven game ids; returns the game folder and, per id,
    the (tileset, sprite) drawings the builder must keep."""
    game = fake_package(cache, "cataclysm-dda-data", "0.F-3-9") / "usr/share/games/cataclysm-dda"
    items = [{"type": "TOOL", "id": "hammer", "name": {"str": "hammer"}},
             {"type": "TOOL", "id": "saw", "category": "tools", "name": "saw"},
             {"type": "GUN", "id": "pistol", "name": {"str": "pistol"}},
             {"type": "GUN", "abstract": "gun_base", "category": "weapons", "name": {"str": "gun"}},
             {"type": "GUN", "id": "rifle", "copy-from": "gun_base", "name": {"str_sp": "rifle"}}]
    monsters = [{"type": "MONSTER", "id": "mon_zombie", "species": ["ZOMBIE"], "name": {"str": "zombie"}},
                {"type": "MONSTER", "id": "mon_dog", "species": ["MAMMAL"], "name": {"str": "dog"}}]
    furniture = [{"type": "furniture", "id": "f_crate", "name": "crate"}]
    for relative, entries in {"items/tools.json": items, "monsters/zombies.json": monsters,
                              "furniture_and_terrain/furniture-storage.json": furniture}.items():
        (game / "json" / relative).parent.mkdir(parents=True, exist_ok=True)
        (game / "json" / relative).write_text(json.dumps(entries))
    (game / "json" / "broken.json").write_text("{not json")
    rng = np.random.default_rng(11)
    copied = None
    expected: dict[str, list] = {}

    def write(name, tile, sheets):
        """sheets: [(file, sprite size, [(ids, fg, rotates)], sprite images)]"""
        folder = game / "gfx" / name
        folder.mkdir(parents=True)
        config = {"tile_info": [{"width": tile, "height": tile}], "tiles-new": []}
        for file, size, tiles, images in sheets:
            sheet = Image.new("RGBA", (size * len(images), size))
            for k, image in enumerate(images):
                sheet.paste(image, (k * size, 0))
            sheet.save(folder / file)
            entry = {"file": file, "tiles": [dict(id=i, fg=fg, rotates=r) for i, fg, r in tiles]}
            if size != tile:
                entry.update(sprite_width=size, sprite_height=size)
            config["tiles-new"].append(entry)
        (folder / "tile_config.json").write_text(json.dumps(config))

    def own(n, size=16):
        return [blocks(rng, (size, size), fill=0.75) for _ in range(n)]

    # T1: one generic sprite for hammer, saw and pistol (placeholder); own drawings for the others
    write("T1", 16, [("tiles.png", 16, [(["hammer", "saw", "pistol"], 0, False), ("rifle", 1, False),
                                        ("mon_zombie", 2, False), ("mon_dog", 3, False), ("f_crate", 4, False)], own(5))])
    # T2: pistol and rifle share a sprite (dropped from both); an id the game does not define shares hammer's
    write("T2", 16, [("tiles.png", 16, [("hammer", 0, False), ("overlay_wielded_hammer", 0, False), ("saw", 1, False),
                                        (["pistol", "rifle"], 2, False), ("mon_zombie", 3, False),
                                        ("mon_dog", 4, False), ("f_crate", 5, False)], own(6))])
    # T3: mon_zombie has two weighted variants
    write("T3", 16, [("tiles.png", 16, [("hammer", 0, False), ("saw", 1, False), ("pistol", 2, False),
                                        ("rifle", 3, False), ("mon_zombie", [{"weight": 3, "sprite": 4},
                                                                             {"weight": 1, "sprite": [5, 6]}], False),
                                        ("mon_dog", 7, False), ("f_crate", 8, False)], own(9))])
    # T4: f_crate has four rotations (only the first is a drawing)
    t4 = own(9)
    copied = t4[0]
    write("T4", 16, [("tiles.png", 16, [("hammer", 0, False), ("saw", 1, False), ("pistol", 2, False),
                                        ("rifle", 3, False), ("mon_zombie", 4, False),
                                        ("f_crate", [5, 6, 7, 8], True)], t4)])
    # T5: copies T4's hammer pixel for pixel
    write("T5", 16, [("tiles.png", 16, [("hammer", 0, False), ("saw", 1, False), ("pistol", 2, False),
                                        ("rifle", 3, False), ("mon_zombie", 4, False), ("f_crate", 5, False)],
                      [copied] + own(5))])
    # T6: its drawings sit in a second, 32 px sheet: indices run on after the first sheet's 3 sprites
    write("T6", 16, [("tiles.png", 16, [], own(3)),
                     ("big.png", 32, [("hammer", 3, False), ("saw", 4, False), ("pistol", 5, False),
                                      ("rifle", 6, False), ("mon_zombie", 7, False), ("f_crate", 8, False)],
                      own(6, 32))])
    # a 10 px tileset: left out
    write("Tiny", 10, [("tiles.png", 10, [(i, k, False) for k, i in enumerate(
        ["hammer", "saw", "pistol", "rifle", "mon_zombie", "mon_dog", "f_crate"])], own(7, 10))])
    expected = {"hammer": [("T2", 0), ("T3", 0), ("T4", 0), ("T6", 3)],
                "saw": [("T2", 1), ("T3", 1), ("T4", 1), ("T5", 1), ("T6", 4)],
                "pistol": [("T3", 2), ("T4", 2), ("T5", 2), ("T6", 5)],
                "rifle": [("T1", 1), ("T3", 3), ("T4", 3), ("T5", 3), ("T6", 6)],
                "mon_zombie": [("T1", 2), ("T2", 3), ("T3", 4), ("T3", 5), ("T4", 4), ("T5", 4), ("T6", 7)],
                "f_crate": [("T1", 4), ("T2", 5), ("T3", 8), ("T4", 5), ("T5", 5), ("T6", 8)]}
    return game, expected


def test_cataclysm_tiles_builder_on_a_small_package(tmp_path):
    game, expected = fake_cataclysm(tmp_path / "cache")
    definitions = load_definitions(game / "json")
    assert {d: definitions[d].category for d in definitions} == {
        "hammer": "item: tools", "saw": "item: tools", "pistol": "item: guns", "rifle": "item: weapons",
        "mon_zombie": "monster: zombie", "mon_dog": "monster: mammal", "f_crate": "furniture: storage"}
    assert definitions["rifle"].name == "rifle" and definitions["saw"].name == "saw"
    sets = tilesets(game / "gfx")
    assert [t.name for t in sets] == ["T1", "T2", "T3", "T4", "T5", "T6"]
    assert sets[5].sprite(3).size == (24, 24) and sets[5].sprite(9) is None   # 0.75 of 32 px; past the end
    classes = collect_classes(sets, definitions)
    assert {d.id: [(x.tileset, x.sprite) for x in drawings] for d, drawings in classes} == expected
    dataset = get_builder("cataclysm_tiles").build(tmp_path / "out", cache_dir=tmp_path / "cache")
    names = dataset.features["label"].names
    assert names == ["f_crate", "pistol", "hammer", "saw", "rifle", "mon_zombie"]   # by (category, id)
    rows = dataset.select_columns(["label", "tileset", "sprite", "category", "kind", "name"]).to_list()
    for game_id, drawings in expected.items():
        assert [(r["tileset"], r["sprite"]) for r in rows if names[r["label"]] == game_id] == drawings
    assert {r["kind"] for r in rows} == {"item", "monster", "furniture"}
    image = dataset[0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)
    check_card(tmp_path / "out", dataset, "category", ["cc-by-sa-3.0"])
    assert "T1 16x16" in (tmp_path / "out" / "README.md").read_text()
    sliced = get_builder("cataclysm_tiles").build(tmp_path / "slice", cache_dir=tmp_path / "cache", max_classes=3)
    assert len(set(sliced["category"])) == 3


def test_fit_sprite_keeps_pixel_art_crisp():
    sprite = Image.new("RGBA", (20, 20))
    sprite.paste(Image.new("RGBA", (4, 2), (200, 0, 0, 255)), (5, 9))
    sprite.putpixel((6, 10), (0, 0, 200, 255))
    crisp = np.asarray(fit_sprite(sprite, 64, 4, pixel_art=True))
    # 4 x 2 visible pixels, enlarged x14 by nearest neighbour to 56 x 28, centred: only the three colours remain
    assert {tuple(c) for c in crisp.reshape(-1, 3)} == {(255, 255, 255), (200, 0, 0), (0, 0, 200)}
    assert (crisp == (0, 0, 200)).all(-1).sum() == 14 * 14
    assert (crisp != 255).any(-1).sum(0).nonzero()[0].tolist() == list(range(4, 60))
    smooth = np.asarray(fit_sprite(sprite, 64, 4))
    assert len({tuple(c) for c in smooth.reshape(-1, 3)}) > 3
    assert fit_sprite(Image.new("RGBA", (5, 5)), 16).size == (16, 16)           # nothing visible: blank, no error
