"""The demo (app.py): its input checks and Space files, and the page in a real browser (Debian's Chromium,
headless, driven by Playwright): upload images, press Adapt, read the predictions from the page and compare
them with the Python API's on the pretrained EfficientNet-Lite0; errors shown in the page.

Screenshots go to $HYPERFLOW_DEMO_SCREENSHOTS when set (``docs`` regenerates the README's), else to a
temporary folder.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import digit_images, missing_requirement, randomize_drift, write_image_folder
from tolerances import assert_same_math
from transformers import AutoModel

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

try:
    import app
except ImportError as error:  # gradio comes with the dev extra
    missing_requirement(f"the demo's tests need the dev extra: pip install -e '.[dev]' ({error})")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
CLASSES, SHOTS, QUERIES, STEPS = 3, 3, 2, 4


# -- without a browser ----------------------------------------------------------------------------------------
def gallery(paths) -> list[tuple[str, None]]:
    return [(str(p), None) for p in paths]


def test_read_support_checks_every_slot(tmp_path):
    folder = write_image_folder(tmp_path, digit_images(classes=2, per_class=2))
    a, b = sorted(folder.glob("digit_0/*.png")), sorted(folder.glob("digit_1/*.png"))
    images, labels = app.read_support(["zero", " one ", "", ""], [gallery(a), gallery(b), None, []])
    assert labels == ["zero", "zero", "one", "one"] and len(images) == 4
    for names, galleries, message in [
        (["", "one"], [gallery(a), gallery(b)], "Class 1 has images but no name"),
        (["zero", "one"], [gallery(a), None], "Class 'one' has no image"),
        (["same", "same"], [gallery(a), gallery(b)], "Two classes are named 'same'"),
        (["", ""], [None, None], "No support images"),
    ]:
        with pytest.raises(ValueError, match=message):
            app.read_support(names, galleries)


def test_read_queries_checks_the_labels(tmp_path):
    files = sorted(write_image_folder(tmp_path, digit_images(classes=1, per_class=2)).rglob("*.png"))
    got_files, images, labels = app.read_queries(gallery(files), "a, b", ["a", "b"])
    assert got_files == [str(f) for f in files] and len(images) == 2 and labels == ["a", "b"]
    assert app.read_queries(gallery(files), "  ", ["a", "b"])[2] is None
    with pytest.raises(ValueError, match="3 query labels for 2 query images"):
        app.read_queries(gallery(files), "a, b, a", ["a", "b"])
    with pytest.raises(ValueError, match=r"Query labels \['c'\] are not among the classes"):
        app.read_queries(gallery(files), "a, c", ["a", "b"])
    with pytest.raises(ValueError, match="No query images"):
        app.read_queries(None, "", ["a", "b"])


def test_steps_shown_along_the_path():
    assert app.steps_to_show(8) == [0, 1, 2, 4, 8]
    assert app.steps_to_show(5) == [0, 1, 2, 4, 5]
    assert app.steps_to_show(1) == [0, 1]


def test_the_hyperflow_heading_says_how_far_the_task_was_adapted():
    config = HyperFlowConfig(steps=4, statistics_size=4, domain_gate=2.2)

    def outcome(time, distance):
        return app.Outcome("HyperFlow", ["a"], None, 0.1, 1, integration_time=time, domain_distance=distance)

    assert app.hyperflow_detail(config, outcome(1.0, 1.3)) == " (4 euler steps)"
    assert app.hyperflow_detail(config, outcome(0.5, 1.3)) == " (4 euler steps, stopped at t = 0.5)"
    assert app.hyperflow_detail(config, outcome(0.0, 2.61)) == (
        " (kept direct transfer: these images lie outside the domains the adapter was trained on, distance 2.61 > 2.2)")
    config.domain_gate = None
    assert app.hyperflow_detail(config, outcome(0.0, 2.61)) == " (4 euler steps, stopped at t = 0)"


def test_missing_default_adapter_says_which_setting(tmp_path, monkeypatch, lite0):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="set HYPERFLOW_ADAPTER"):
        app.load_adapter(app.Settings(backbone=str(lite0)))


def test_space_card_and_requirements():
    front = REPO.joinpath("README.md").read_text().split("---\n")
    assert front[0] == "", "the README starts with the Space's YAML front matter"
    card = dict(line.split(": ", 1) for line in front[1].strip().splitlines())
    assert card["sdk"] == "gradio" and card["app_file"] == "app.py"
    project = tomllib.loads(REPO.joinpath("pyproject.toml").read_text())["project"]
    gradio = next(r for r in project["optional-dependencies"]["demo"] if r.startswith("gradio"))
    assert re.fullmatch(r"gradio>=([\d.]+),<\d+", gradio).group(1) == card["sdk_version"].strip('"')
    lines = REPO.joinpath("requirements.txt").read_text().splitlines()
    requirements = {line.split("#")[0].strip() for line in lines} - {""}
    assert requirements == set(project["dependencies"]) | set(project["optional-dependencies"]["demo"])


# -- in the browser -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    from hf_hyperflow.pretrained import build_efficientnet_lite0

    return build_efficientnet_lite0(tmp_path_factory.mktemp("backbone") / "efficientnet-lite0")


@pytest.fixture(scope="module")
def adapter_dir(lite0, tmp_path_factory):
    """An untrained adapter on Lite0 (64 px, last two blocks) with a random, non-zero drift: nothing trained."""
    config = HyperFlowConfig(groups=["lora", "shift", "head"], r=4, first_adapted_block=-2, image_size=64,
                             steps=STEPS, hidden_size=64, output_rank=8)
    adapter = HyperFlowAdapter(AutoModel.from_pretrained(lite0), config)
    randomize_drift(adapter, scale=0.02)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    adapter.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(lite0, adapter_dir, tmp_path_factory):
    """``python app.py`` on a loopback port, offline; yields its URL and the data folder it builds examples in."""
    root = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "HYPERFLOW_BACKBONE": str(lite0), "HYPERFLOW_ADAPTER": str(adapter_dir),
           "HYPERFLOW_DATA": str(root / "data"), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = (root / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process, root / "app.log")
        yield {"url": url, "data": root / "data"}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"app.py did not answer on {url} within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        missing_requirement(f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        missing_requirement(f"the browser tests need the dev extra: pip install -e '.[dev]' ({error})")

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server["url"], timeout=120_000)
    page.wait_for_selector("#adapt", timeout=120_000)
    yield page
    page.close()


@pytest.fixture
def screenshots(tmp_path) -> Path:
    folder = Path(os.environ.get("HYPERFLOW_DEMO_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fill_class(page, slot: int, name: str, files) -> None:
    page.fill(f"#class-{slot}-name textarea", name)
    if files:
        page.set_input_files(f"#class-{slot}-images input[type=file]", [str(f) for f in files])
        page.wait_for_function(f"document.querySelectorAll('#class-{slot}-images img').length >= {len(files)}")


def press_adapt(page) -> str:
    """Press Adapt; the status line once the answer is in."""
    page.click("#adapt")
    page.wait_for_function("/^(Adapted|Could not)/.test(document.querySelector('#status').innerText.trim())",
                           timeout=180_000)
    return page.inner_text("#status").strip()


def prediction_rows(page) -> list[list[str]]:
    """The predictions table as shown: one list of cell texts per row."""
    cells = page.eval_on_selector_all(
        "#predictions [role=gridcell]", "cs => cs.map(c => [+c.dataset.row, +c.dataset.col, c.innerText.trim()])")
    rows: dict[int, dict[int, str]] = {}
    for row, col, text in cells:
        rows.setdefault(row, {})[col] = text
    return [[cols[c] for c in sorted(cols)] for _, cols in sorted(rows.items())]


def api_adapter(lite0, adapter_dir) -> HyperFlowAdapter:
    return HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(lite0), adapter_dir)


def assert_page_equals_api(page, adapter, images, labels, queries, truth) -> None:
    """The table's labels and scores are those of adapt() and direct_transfer() for the same task (which differ:
    the drift is random, not zero); so is the accuracy along the integration steps."""
    tasks = [adapter.adapt(images, labels), adapter.direct_transfer(images, labels)]
    probabilities = [task.predict_proba(queries) for task in tasks]
    assert (probabilities[0] - probabilities[1]).abs().max() > 1e-4
    rows = prediction_rows(page)
    assert len(rows) == len(queries)
    for column, task, expected in zip((1, 3), tasks, probabilities, strict=True):
        assert [row[column] for row in rows] == task.predict(queries)
        shown = torch.tensor([float(row[column + 1]) for row in rows])
        assert_same_math(shown, expected.max(-1).values)
    assert [row[-1] for row in rows] == truth
    accuracies = app.accuracy_along_steps(adapter, images, labels, queries, truth)
    assert list(accuracies) == [0, 1, 2, 4]
    assert page.inner_text("#accuracy-steps").strip() == (
        "Query accuracy after 0, 1, 2, 4 integration steps (0 = direct transfer): "
        + ", ".join(f"{a:.0f}%" for a in accuracies.values()) + ".")
    assert page.locator(".query-card").count() == len(queries)


def test_uploaded_images_give_the_api_predictions(page, lite0, adapter_dir, tmp_path, screenshots):
    digits = digit_images(classes=CLASSES, per_class=SHOTS + QUERIES, size=48)
    names = sorted(digits)
    support = write_image_folder(tmp_path / "support", {n: shots[:SHOTS] for n, shots in digits.items()})
    query_folder = write_image_folder(tmp_path / "queries", {n: shots[SHOTS:] for n, shots in digits.items()})
    for slot, name in enumerate(names, start=1):
        fill_class(page, slot, name, sorted((support / name).glob("*.png")))
    query_files = sorted(query_folder.rglob("*.png"))
    page.set_input_files("#queries input[type=file]", [str(f) for f in query_files])
    truth = [f.parent.name for f in query_files]
    page.fill("#query-labels textarea", ", ".join(truth))
    assert press_adapt(page) == f"Adapted to {CLASSES} classes from {CLASSES * SHOTS} images; {len(query_files)} " \
                                "query images classified."
    images = [image for n in names for image in digits[n][:SHOTS]]
    queries = [image for n in names for image in digits[n][SHOTS:]]
    labels = [n for n in names for _ in range(SHOTS)]
    assert_page_equals_api(page, api_adapter(lite0, adapter_dir), images, labels, queries, truth)
    for method in ("hyperflow", "dt"):
        assert re.search(r"adapted in \d+ ms, peak memory [\d.]+ MiB; accuracy \d+%", page.inner_text(f"#{method}-stats"))
    page.screenshot(path=str(screenshots / "demo.png"), full_page=True)


def test_an_example_task_from_the_embedded_data(page, server, lite0, adapter_dir):
    page.click("#load-example")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Example:')", timeout=180_000)
    episode = app.example_episode(server["data"], "digits", seed=0)
    labels = [episode.classes[y] for y in episode.support_labels.tolist()]
    truth = [episode.classes[y] for y in episode.query_labels.tolist()]
    assert page.input_value("#query-labels textarea") == ", ".join(truth)
    assert press_adapt(page).startswith(f"Adapted to {episode.ways} classes")
    assert_page_equals_api(page, api_adapter(lite0, adapter_dir), episode.support_images, labels, episode.query_images, truth)


def test_errors_appear_in_the_page(page, tmp_path, screenshots):
    digits = digit_images(classes=2, per_class=3)
    folder = write_image_folder(tmp_path / "images", digits)
    fill_class(page, 1, "digit_0", sorted((folder / "digit_0").glob("*.png")))
    page.set_input_files("#queries input[type=file]", [str(f) for f in sorted((folder / "digit_1").glob("*.png"))])
    assert press_adapt(page) == "Could not adapt: A task needs at least two classes, got only ['digit_0']."
    page.screenshot(path=str(screenshots / "demo-error.png"), full_page=False)
    fill_class(page, 2, "digit_1", [])
    assert press_adapt(page) == "Could not adapt: Class 'digit_1' has no image: add at least one, or clear its name."
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    page.set_input_files("#class-2-images input[type=file]", [str(broken)])
    page.wait_for_function("document.querySelectorAll('#class-2-images img').length >= 1")
    status = press_adapt(page)
    assert status.startswith("Could not adapt: ") and "broken.png cannot be read as an image" in status, status
    assert "Traceback" not in page.inner_text("body")
