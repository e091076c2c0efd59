"""Support folders and image files: what is read, and the one-line errors for folders that cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import digit_images, write_image_folder
from PIL import Image

from hf_hyperflow.folders import SupportFolderError, image_files, load_image_files, load_support_folder


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "support", digit_images(classes=3, per_class=2))


def test_reads_images_and_class_names_in_order(folder):
    expected = digit_images(classes=3, per_class=2)
    images, labels = load_support_folder(folder)
    assert labels == ["digit_0", "digit_0", "digit_1", "digit_1", "digit_2", "digit_2"]
    flat = [image for name in sorted(expected) for image in expected[name]]
    for got, want in zip(images, flat, strict=True):
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_grayscale_and_hidden_files(folder):
    Image.new("L", (12, 12), 40).save(folder / "digit_1" / "grey.png")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "digit_0" / ".hidden.txt").write_text("not content")
    images, labels = load_support_folder(folder)
    assert len(images) == 7 and labels.count("digit_1") == 3
    assert all(image.mode == "RGB" for image in images)


@pytest.mark.parametrize("case, expected", [
    ("one_class", "a task needs at least two classes"),
    ("empty_class", "has no images"),
    ("text_file", "is not an image file"),
    ("corrupt_png", "cannot be read as an image"),
    ("loose_file", "is not in a class subfolder"),
    ("nested_folder", "is a folder inside the class folder"),
    ("missing", "is not a folder"),
])
def test_unusable_folders_raise_one_line_errors(tmp_path, case, expected):
    root = tmp_path / "support"
    classes = 1 if case == "one_class" else 2
    write_image_folder(root, digit_images(classes=classes, per_class=2))
    culprit = {
        "empty_class": lambda: (root / "digit_9").mkdir(),
        "text_file": lambda: (root / "digit_1" / "notes.txt").write_text("hello"),
        "corrupt_png": lambda: (root / "digit_0" / "broken.png").write_bytes(b"not a png"),
        "loose_file": lambda: Image.new("RGB", (8, 8)).save(root / "stray.png"),
        "nested_folder": lambda: (root / "digit_0" / "more").mkdir(),
        "missing": lambda: None,
    }.get(case, lambda: None)
    culprit()
    with pytest.raises(SupportFolderError) as error:
        load_support_folder(root / "absent" if case == "missing" else root)
    message = str(error.value)
    assert expected in message and "\n" not in message
    if case in ("empty_class", "text_file", "corrupt_png"):
        assert {"empty_class": "digit_9", "text_file": "notes.txt", "corrupt_png": "broken.png"}[case] in message


def test_image_files_expand_folders_and_report_missing(folder, tmp_path):
    files = image_files([folder / "digit_2", folder / "digit_0" / "00.png"])
    assert [f.name for f in files] == ["00.png", "01.png", "00.png"]
    assert [image.mode for image in load_image_files(files)] == ["RGB"] * 3
    with pytest.raises(SupportFolderError, match="does not exist"):
        image_files([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SupportFolderError, match="holds no files"):
        image_files([tmp_path / "empty"])
    (tmp_path / "bad.jpg").write_text("text")
    with pytest.raises(SupportFolderError, match="bad.jpg cannot be read as an image"):
        load_image_files([tmp_path / "bad.jpg"])
