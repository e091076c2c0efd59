"""The hf-hyperflow command: adapt then predict on an image folder of real digits equals the Python API; bad
folders and files give one-line errors and non-zero exit statuses; train, evaluate and push run on a tiny setting
with the recipes' options and give what the recipes give; --help starts without torch."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import digit_images, missing_requirement, save_tiny_adapter, write_image_folder
from tolerances import assert_same_math
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
    assert "Warning" not in adapted.stderr, adapted.stderr  # nothing the project triggers reaches the user
    assert "Adapted to 3 classes (digit_0, digit_1, digit_2) from 9 images" in adapted.stdout
    predicted = subprocess.run([command(), "predict", "--task", str(task_dir), str(setup["queries"]), "--csv", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert "Warning" not in predicted.stderr, predicted.stderr
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
    assert_same_math(got, expected)
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
                                  ["data", "build", "--help"], ["data", "list", "--help"], ["--version"],
                                  ["train", "--help"], ["evaluate", "--help"], ["push", "-h"],
                                  ["domain-reference", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "hf-hyperflow" in capsys.readouterr().out


@pytest.mark.parametrize("name, options", [
    ("train", ["--config FILE", "--training.max_steps INT", "--datasets[].source STR", "--resume BOOL | STR"]),
    ("evaluate", ["--episodes_per_method DICT[STR, INT]", "--methods LIST[STR]", "--steps_sweep LIST[INT]"]),
    ("push", ["--folder STR", "--repo_id STR", "--card_only BOOL"]),
    ("domain-reference", ["--config STR", "--adapter STR", "--episodes INT", "--gate FLOAT | NONE"]),
])
def test_config_commands_list_every_option_with_its_help(name, options, capsys):
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-hyperflow {name} ")
    for option in options:
        assert option in out, option
    if name == "train":  # the help of every key, sections included, from the configs' own fields
        assert "Stop after this many optimizer steps" in out and "LoRA rank of the lora group" in out


def test_help_and_version_start_without_torch():
    """``hf-hyperflow --help`` (and the help of a command) load neither torch nor PEFT, which take seconds."""
    code = ("import sys\nfrom hf_hyperflow.cli import main\nfor argv in (['--help'], ['adapt', '--help'], "
            "['evaluate', '--help'], ['--version']):\n    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\nprint(sorted(m for m in ('torch', 'peft', 'transformers') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [[], ["adapt"], ["predict", "--task", "t"], ["adapt", "--backbone", "b", "--adapter",
                                  "a", "--support", "s", "--output", "o", "--steps", "0"], ["frobnicate"],
                                  ["adapt", "--backbone", "b", "--adapter", "a", "--support", "s", "--output", "o",
                                   "--frobnicate"]])
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


# ------------------------------------------------------------------------------------------------ train, evaluate, push
@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset):
    """``hf-hyperflow train`` on a tiny run (random ResNet, the unrolled loss, 2 steps); its stdout and folder."""
    import yaml
    from accelerate.state import AcceleratorState, GradientState
    from conftest import tiny_train_config

    root = tmp_path_factory.mktemp("train")
    data = tiny_train_config(root / "run", synthetic_dataset, **{"losses.flow": 0.0, "validation.every": 2})
    del data["flow"]
    (root / "train.yaml").write_text(yaml.safe_dump(data))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["train", "--config", str(root / "train.yaml"), "--training.max_steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert status == 0
    return {"root": root, "run": root / "run", "stdout": out.getvalue(), "data": synthetic_dataset}


def test_train_runs_the_config_with_overrides(trained):
    run = trained["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2  # --training.max_steps 2 overrode the file's 6
    assert json.loads((run / "training_config.json").read_text())["training"]["max_steps"] == 2
    for folder in ("best", "final"):
        assert (run / folder / "adapter_model.safetensors").is_file(), folder
    line = trained["stdout"].strip().splitlines()[-1]
    assert line.startswith("Trained to step 2 in ") and f"; best validation accuracy {metrics['best_accuracy']:.4f} " \
        f"at step {metrics['best_step']}; adapters saved to {run}/best and {run}/final" in line, line


def evaluate_options(trained, output) -> list[str]:
    return ["--backbone", str(trained["run"] / "backbone"), "--adapter", str(trained["run"] / "final"),
            "--datasets", f"[tiny={trained['data']}]", "--split", "all", "--episodes", "3", "--ways", "5",
            "--shots", "1", "--queries", "2", "--methods", "[dt, hyperflow]", "--memory_episodes", "0",
            "--batch_tasks", "2", "--progress", "false", "--output", str(output)]


def test_evaluate_gives_the_recipes_numbers(trained, tmp_path, capsys):
    from recipes.evaluate import main as recipe

    assert main(["evaluate", *evaluate_options(trained, tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == (f"Wrote results.json, results.md, accuracy_vs_latency.png to "
                                            f"{tmp_path / 'cli'}")
    recipe(evaluate_options(trained, tmp_path / "recipe"))
    got, expected = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("cli", "recipe"))
    assert got["meta"]["command"].startswith("hf-hyperflow evaluate --backbone ")
    assert expected["meta"]["command"].startswith("python recipes/evaluate.py --backbone ")
    assert got["details"] == expected["details"]  # the same seeded episodes (their rows), the same accuracies
    assert len(got["details"]["tiny"]["episode_rows"]) == 3
    for method in ("dt", "hyperflow"):
        assert got["results"]["tiny"][method]["accuracy"] == expected["results"]["tiny"][method]["accuracy"]


def test_push_writes_the_card_of_the_trained_adapter(trained, tmp_path, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(trained["run"] / "final", folder)
    assert main(["push", "--folder", str(folder), "--repo_id", "someone/tiny", "--base_model", "tiny-resnet",
                 "--card_only", "true", "--tags", "[tiny]"]) == 0
    assert capsys.readouterr().out.strip() == f"Wrote {folder / 'README.md'}"
    card = (folder / "README.md").read_text()
    assert "adapter for the vision backbone `tiny-resnet`" in card and "\n- tiny\n" in card.split("---")[1]
    assert 'HyperFlowAdapter.from_pretrained(backbone, "someone/tiny")' in card


def test_push_card_data_states_the_stopping_points_and_gate_of_the_shipped_adapter():
    from hf_hyperflow.commands.push import PushConfig, build_adapter_card_data

    folder = Path(__file__).resolve().parents[1] / "adapters" / "efficientnet_lite0"
    data = build_adapter_card_data(folder, "someone/lite0", PushConfig(folder=str(folder), repo_id="someone/lite0",
                                                                       base_model="efficientnet-lite0"))
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (data.stopping, data.stopping_points) == (saved["stopping"], saved["stopping_points"]) == ("auto", 2)
    assert data.domain_gate == saved["domain_gate"] is not None and data.domain_sources[:2] == ["glyphs", "emoji"]
    from hf_hyperflow.commands.push import safetensors_size

    assert (data.drift_parameters, data.drift_bytes) == safetensors_size([folder / "adapter_model.safetensors"])


@pytest.mark.parametrize("argv, message", [
    (["train"], "Give the run's YAML config: --config FILE"),
    (["train", "--config", "no/such.yaml"], "No config file at no/such.yaml"),
    (["train", "--config", "recipes/configs/smoke.yaml", "--training.max_stpes", "9"],
     "Unknown key 'training.max_stpes'; the keys of training are ['max_steps'"),
    (["evaluate", "--backbone", "b", "--datasets", "[d]", "--output", "o", "--episodes", "many"],
     "episodes: Couldn't parse 'many' into an int"),
    (["evaluate", "--backbone", "b", "--datasets", "[d]", "--output", "o", "--episode", "3"],
     "Unknown key 'episode'; the keys of the top level are ['backbone'"),
    (["evaluate", "--backbone", "b", "--output", "o"], "--datasets is missing"),
    (["push", "--folder", "f"], "Give the folder and the repo: --folder OUTPUT_DIR --repo_id namespace/name."),
    (["domain-reference", "--adapter", "a"], "--config is required."),
    (["domain-reference", "--config", "c", "--adapter", "a", "--gate", "0"], "--gate must be > 0, got 0"),
])
def test_config_command_usage_errors_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"usage: hf-hyperflow {argv[0]} ")
    assert lines[1].startswith(f"hf-hyperflow {argv[0]}: error: ") and message in lines[1], lines


def test_config_command_errors_in_what_was_given_exit_1(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["push", "--folder", str(tmp_path / "nowhere"), "--repo_id", "a/b"], "There is no folder at"),
        (["push", "--folder", str(tmp_path / "empty"), "--repo_id", "a/b", "--card_only", "true"],
         "it is not a saved adapter or task folder"),
        (["evaluate", "--backbone", str(setup["backbone"]), "--datasets", f"[{tmp_path / 'nowhere'}]",
          "--methods", "[dt]", "--output", str(tmp_path / "out")], "nowhere"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hf-hyperflow: error: ") and message in lines[0], lines


def test_output_closed_early_ends_quietly(setup, monkeypatch, capsys):
    """``hf-hyperflow predict ... | head -1``: when the reader of standard output has gone, the command ends with
    status 141 (as if killed by SIGPIPE) and no error message."""
    import os

    task_dir = setup["root"] / "task_pipe"
    assert main(adapt_args(setup, setup["support"], task_dir)) == 0
    capsys.readouterr()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone
    with open(write_end, "w", buffering=1) as closed:  # line-buffered: the first row meets the closed pipe
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["predict", "--task", str(task_dir), str(setup["queries"])]) == 141
        monkeypatch.undo()
    assert capsys.readouterr().err == ""
