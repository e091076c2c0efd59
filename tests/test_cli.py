"""The hf-hyperflow command: adapt then predict on an image folder of real digits equals the Python API; bad
folders and files give one-line errors and non-zero exit statuses."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import digit_images, missing_requirement, save_tiny_adapter, write_image_folder
from transformers import AutoModel

from hf_hyperflow import HyperFlowAdapter
from hf_hyperflow.cli import main

CLASSES, SHOTS, QUERIES = 3, 3, 2


def command() -> str:
    """The installed console script of this environment."""
    found = shutil.which("hf-hyperflow", path=str(Path(sys.executable).parent))
    if found is None:
        missing_requirement("the hf-hyperflow console script is not installed in this environment: pip install -e .")
    return found


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny backbone and adapter (random, non-zero drift), a support folder and query images of digits."""
    root = tmp_path_factory.mktemp("cli")
    backbone, adapter = save_tiny_adapter(root)
    images = digit_images(classes=CLASSES, per_class=SHOTS + QUERIES)
    support = write_image_folder(root / "support", {name: shots[:SHOTS] for name, shots in images.items()})
    queries = write_image_folder(root / "queries", {name: shots[SHOTS:] for name, shots in images.items()})
    return {"root": root, "backbone": backbone, "adapter": adapter, "support": support,
            "queries": queries, "images": images}


def adapt_args(setup, support, output) -> list[str]:
    return ["adapt", "--backbone", str(setup["backbone"]), "--adapter", str(setup["adapter"]),
            "--support", str(support), "--output", str(output)]


def api_task(setup):
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(setup["backbone"]), setup["adapter"])
    names = sorted(setup["images"])
    return adapter.adapt([im for n in names for im in setup["images"][n][:SHOTS]], [n for n in names for _ in range(SHOTS)])


def query_files(setup) -> list[Path]:
    return sorted(setup["queries"].rglob("*.png"))


def test_adapt_then_predict_writes_the_api_predictions(setup):
    task_dir, out = setup["root"] / "task", setup["root"] / "predictions.csv"
    adapted = subprocess.run([command(), *adapt_args(setup, setup["support"], task_dir)], capture_output=True,
                             text=True, timeout=300)
    assert adapted.returncode == 0, adapted.stderr
    assert "Adapted to 3 classes (digit_0, digit_1, digit_2) from 9 images" in adapted.stdout
    predicted = subprocess.run([command(), "predict", "--task", str(task_dir), str(setup["queries"]), "--csv", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.strip() == f"Wrote {CLASSES * QUERIES} predictions to {out}"
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    task = api_task(setup)
    assert rows[0] == ["image", "label", "score", *task.classes]
    files = query_files(setup)
    expected = task.predict_proba([image for n in sorted(setup["images"]) for image in setup["images"][n][SHOTS:]])
    assert [row[0] for row in rows[1:]] == [str(f) for f in files]
    assert [row[1] for row in rows[1:]] == [task.classes[i] for i in expected.argmax(-1).tolist()]
    got = torch.tensor([[float(x) for x in row[3:]] for row in rows[1:]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([float(row[2]) for row in rows[1:]]), expected.max(-1).values)


def test_predict_to_standard_output_with_explicit_backbone(setup, capsys):
    task_dir = setup["root"] / "task_stdout"
    assert main(adapt_args(setup, setup["support"], task_dir)) == 0
    capsys.readouterr()
    files = query_files(setup)[:2]
    assert main(["predict", "--task", str(task_dir), "--backbone", str(setup["backbone"]), *map(str, files),
                 "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "image,label,score,digit_0,digit_1,digit_2"
    assert [line.split(",")[0] for line in lines[1:]] == [str(f) for f in files]


def break_folder(root: Path, case: str) -> None:
    {"empty class": lambda: (root / "digit_7").mkdir(),
     "non-image file": lambda: (root / "digit_1" / "readme.txt").write_text("labels"),
     "unreadable image": lambda: (root / "digit_2" / "cut.png").write_bytes(b"\x89PNG\r\n"),
     "one class": lambda: [shutil.rmtree(p) for p in root.iterdir() if p.name != "digit_0"]}[case]()


@pytest.mark.parametrize("case, message", [
    ("one class", "at least two classes"),
    ("empty class", "digit_7 has no images"),
    ("non-image file", "readme.txt is not an image file"),
    ("unreadable image", "cut.png cannot be read as an image"),
])
def test_bad_support_folders_fail_with_one_line(setup, tmp_path, capsys, case, message):
    support = write_image_folder(tmp_path / "support", digit_images(classes=CLASSES, per_class=1))
    break_folder(support, case)
    assert main(adapt_args(setup, support, tmp_path / "task")) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-hyperflow: error: ") and message in lines[0], captured.err
    assert not (tmp_path / "task").exists()


def test_the_console_script_exits_non_zero_on_a_bad_folder(setup, tmp_path):
    support = write_image_folder(tmp_path / "support", digit_images(classes=2, per_class=1))
    break_folder(support, "non-image file")
    result = subprocess.run([command(), *adapt_args(setup, support, tmp_path / "task")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"hf-hyperflow: error: {re.escape(str(support / 'digit_1' / 'readme.txt'))} is not an image "
                        r"file \(imagefolder reads \.jpg, \.jpeg, \.png, .* image extensions\): remove it from the "
                        r"support folder\.", lines[0]), lines[0]


def test_predict_errors(setup, tmp_path, capsys):
    task_dir = setup["root"] / "task_errors"
    assert main(adapt_args(setup, setup["support"], task_dir)) == 0
    (tmp_path / "notes.txt").write_text("text")
    cases = [
        (["--task", str(tmp_path / "none"), str(query_files(setup)[0])], "is not a folder"),
        (["--task", str(task_dir), str(tmp_path / "missing.png")], "missing.png does not exist"),
        (["--task", str(task_dir), str(tmp_path / "notes.txt")], "notes.txt cannot be read as an image"),
        (["--task", str(setup["adapter"]), str(query_files(setup)[0])], "hyperflow_task.json does not exist"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv", [["--help"], ["adapt", "--help"], ["predict", "--help"], ["data", "--help"],
                                  ["data", "build", "--help"], ["data", "list", "--help"], ["--version"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "hf-hyperflow" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["adapt"], ["predict", "--task", "t"], ["adapt", "--backbone", "b", "--adapter",
                                  "a", "--support", "s", "--output", "o", "--steps", "0"], ["frobnicate"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage: hf-hyperflow" in capsys.readouterr().err


def test_data_build_and_list(tmp_path, capsys):
    import importlib.metadata

    import datasets

    from hf_hyperflow.registry import ENTRY_POINT_GROUP

    if not importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        missing_requirement(f"no {ENTRY_POINT_GROUP} entry points in this environment: pip install -e .")

    assert main(["data", "build", "--name", "digits", "--output", str(tmp_path / "digits"), "--max-classes", "3"]) == 0
    built = datasets.load_from_disk(str(tmp_path / "digits"))
    assert built.features["label"].num_classes == 3
    assert capsys.readouterr().out.startswith(f"Built digits: 3 classes, {len(built)} images in ")
    assert main(["data", "list"]) == 0
    assert "digits\tsources at hand" in capsys.readouterr().out.splitlines()
    assert main(["data", "build", "--name", "nope", "--output", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No dataset named 'nope'; the builders are [" in err[0] and "'digits'" in err[0]


def test_no_installed_builders_is_a_clear_error(monkeypatch, capsys):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    assert main(["data", "list"]) == 1
    assert "No dataset builders are installed" in capsys.readouterr().err
