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

from hf_hyperflow.episodes import ClassSplit, EpisodeSampler  # noqa: E402
from recipes.data import BUILDERS, get_builder  # noqa: E402
from recipes.data.common import dataset_stats, round_robin, write_dataset  # noqa: E402
from recipes.data.emoji import sequence_key  # noqa: E402
from recipes.data.fashion_mnist import read_idx  # noqa: E402
from recipes.data.glyphs import GlyphRenderer, character_group, distort  # noqa: E402
from recipes.data.glyphs_default import FONT_FILES, font_dir  # noqa: E402

# name -> (classes in the slice, group column, licence ids expected in the card)
SLICES = {
    "glyphs_default": (6, "script", ["other", "ofl-1.1"]),
    "digits": (3, None, ["cc-by-4.0"]),
    "glyphs": (6, "script", ["ofl-1.1", "gpl-3.0", "other"]),
    "emoji": (8, "category", ["apache-2.0", "cc-by-4.0", "cc-by-sa-4.0"]),
    "fashion_mnist": (2, None, ["mit"]),
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
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; builders: \['digits', 'emoji'"):
        get_builder("nope")


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from recipes.data.build import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--name", "nope", "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--name", "digits", "--output", str(tmp_path), "--max-classes", "0"])
    assert "--max-classes must be a positive integer" in capsys.readouterr().err
