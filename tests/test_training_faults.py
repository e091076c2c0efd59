"""Meta-training killed with SIGKILL at random moments and resumed each time ends bit for bit where an
uninterrupted run ends (drift weights, best and final adapters, validation accuracies, the episodes of each
step), at default settings: frozen-prefix cache on, both losses, trajectories recorded first (resumable too).

Each run is a real subprocess (``train(..., resume=True)``, as ``recipes/train.py --resume`` does); the kills
land anywhere: while the trajectories are recorded, in a step, while a checkpoint or ``best/`` is written.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3
SEED = int(os.environ.get("HYPERFLOW_FAULT_SEED", "0"))  # another seed: other kill moments
DRIVER = """
import json, sys
from hf_hyperflow.training import config_from_dict, train
config = config_from_dict(json.loads(open(sys.argv[1]).read()))
def say(step, record):
    print(f"step {step}", flush=True)
train(config, resume=True, callback=say)
print("done", flush=True)
"""


def _dataset(folder: Path) -> str:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    grid = np.arange(32)
    for c in range(10):
        colour = rng.uniform(40, 215, size=3)
        stripes = np.sin((grid[:, None] * math.cos(c) + grid[None, :] * math.sin(c)) * (0.3 + 0.05 * c))
        for _ in range(8):
            pixels = colour[None, None] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (32, 32, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            labels.append(c)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{c}" for c in range(10)])})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return str(folder)


def _config(output_dir: Path, source: str) -> dict:
    """A run of a few seconds at default settings (prefix cache on), checkpoints every 2 of 8 steps."""
    return {
        "output_dir": str(output_dir),
        "backbone": {"random_init": {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32],
                                     "depths": [1, 1], "layer_type": "basic", "seed": 0}},
        "adapter": {"groups": ["lora", "shift", "head"], "r": 2, "first_adapted_block": -1, "image_size": 32,
                    "steps": 3, "hidden_size": 32, "output_rank": 8},
        "datasets": [{"source": source, "class_split": {"fractions": [0.6, 0.4, 0.0], "seed": 0}}],
        "episodes": {"ways": 3, "shots": 2, "queries": 3, "seed": 0},
        "losses": {"unrolled": 1.0, "flow": 0.5},
        "flow": {"generate": {"episodes": 4, "steps": 4, "lr": 0.01}, "trajectories_per_step": 4},
        "validation": {"episodes": 4, "every": 3, "tasks_per_batch": 4},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        "training": {"max_steps": 8, "episodes_per_step": 4, "checkpoint_every": 2, "log_every": 2, "threads": 1,
                     "log_episodes": True},
    }


def _start(config_file: Path, driver: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(driver), str(config_file)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _run_to_the_end(config_file: Path, driver: Path) -> str:
    process = _start(config_file, driver)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0 and "done" in out, out[-3000:]
    return out


def _kill_at_random(config_file: Path, driver: Path, rng: random.Random) -> str:
    """Start the run and SIGKILL it at a random moment: after a random number of steps of this start (0: before
    its first step, during start-up or trajectory recording) and a random delay; returns where it was."""
    process = _start(config_file, driver)
    wait_steps, delay = rng.choice([0, 1, 1, 2, 2, 3]), rng.uniform(0.0, 1.5)
    seen, lines = 0, []
    began = time.monotonic()
    while seen < wait_steps:
        line = process.stdout.readline()
        lines.append(line)
        if not line:  # the run ended before the moment chosen
            process.wait(timeout=60)
            assert process.returncode == 0, "".join(lines)[-3000:]
            return "finished before the kill"
        seen += line.startswith("step ")
        assert time.monotonic() - began < 300, "the run made no progress"
    if wait_steps == 0:
        delay += rng.uniform(3.0, 15.0)  # somewhere in start-up, trajectory recording or the first steps
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return f"killed {delay:.2f} s after {seen} step(s) of this start"


def test_killed_at_random_moments_and_resumed_equals_uninterrupted(tmp_path):
    source = _dataset(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = tmp_path / f"{name}.json"
        runs[name].write_text(json.dumps(_config(tmp_path / name, source)))
    _run_to_the_end(runs["whole"], driver)

    rng = random.Random(SEED)
    moments = []
    while len(moments) < KILLS and not (tmp_path / "killed" / "final").is_dir():  # final/ is written last
        moments.append(_kill_at_random(runs["killed"], driver, rng))
    if not (tmp_path / "killed" / "final").is_dir():
        _run_to_the_end(runs["killed"], driver)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for folder in ("final", "best"):
        expected = load_file(str(whole / folder / "adapter_model.safetensors"))
        got = load_file(str(killed / folder / "adapter_model.safetensors"))
        assert got.keys() == expected.keys()
        differ = [k for k in expected if not got[k].equal(expected[k])]
        assert not differ, f"{folder}/ differs after kills {moments} (HYPERFLOW_FAULT_SEED={SEED}): {differ[:3]}"
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (whole, killed)]
    assert [v["accuracy"] for v in metrics[1]["validations"]] == [v["accuracy"] for v in metrics[0]["validations"]]
    assert metrics[1]["best_step"] == metrics[0]["best_step"] and metrics[1]["step"] == 8
    log = [(run / "episodes" / "rank_0.jsonl").read_text() for run in (whole, killed)]
    assert log[1] == log[0]
    leftovers = [p.name for p in killed.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers, leftovers
    assert not [p for p in killed.rglob("*.pkl")], "a checkpoint holds pickles"


def test_finished_run_is_not_overwritten(tmp_path):
    from hf_hyperflow.training import config_from_dict, train
    from hf_hyperflow.training.checkpoint import clear_run, recover_swapped_folders, save_adapter

    folder = tmp_path / "run"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "adapter_model.safetensors").write_bytes(b"the finished run's weights")
    config = config_from_dict(_config(folder, _dataset(tmp_path / "data")))
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"holds an earlier run \(final\) and no checkpoint to resume from: pass "
                                             r"overwrite=True \(recipes/train.py: --overwrite true\)"):
            train(config, resume=resume)
    assert (folder / "final" / "adapter_model.safetensors").read_bytes() == b"the finished run's weights"
    (folder / "metrics.json").write_text("{}")
    clear_run(folder)  # what overwrite=True does before the new run writes anything
    assert not (folder / "final").exists() and not (folder / "metrics.json").exists()

    # a swap of best/ killed half way: the previous best/ comes back whole
    (folder / ".old-best").mkdir()
    (folder / ".old-best" / "adapter_model.safetensors").write_bytes(b"previous best")
    (folder / ".tmp-best").mkdir()
    recover_swapped_folders(folder)
    assert (folder / "best" / "adapter_model.safetensors").read_bytes() == b"previous best"
    assert not (folder / ".tmp-best").exists() and not (folder / ".old-best").exists()

    class Saving:
        def save_pretrained(self, path):
            Path(path).mkdir()
            (Path(path) / "adapter_model.safetensors").write_bytes(b"new best")

    save_adapter(Saving(), folder / "best", {}, {})
    assert (folder / "best" / "adapter_model.safetensors").read_bytes() == b"new best"
    assert sorted(p.name for p in folder.iterdir()) == ["best"]


class _OneProcess:
    """What save_checkpoint / load_checkpoint use of an Accelerator, for one process."""

    is_main_process, process_index, num_processes, scaler = True, 0, 1, None

    def __init__(self):
        self.step = 0

    def wait_for_everyone(self):
        pass


def _trained_parts(seed: int):
    from transformers import get_scheduler

    torch.manual_seed(seed)
    drift = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(drift.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        drift(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return drift, optimizer, scheduler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hf_hyperflow.training.checkpoint import save_checkpoint

    accelerator = _OneProcess()
    accelerator.step = 3
    drift, optimizer, scheduler = _trained_parts(0)
    state = {"step": 3, "best_accuracy": float("nan"), "history": [{"loss": 0.5}]}
    folder = save_checkpoint(accelerator, tmp_path_factory.mktemp("run"), 3, state, 2, drift=drift,
                             optimizer=optimizer, scheduler=scheduler)
    _draws.extend([random.random(), float(np.random.rand()), float(torch.rand(()))])  # right after the save
    return folder, {k: v.clone() for k, v in drift.state_dict().items()}, optimizer.state_dict()


_draws: list[float] = []


def _restore(folder: Path):
    """Load ``folder`` into fresh parts: what train() does on resume."""
    from hf_hyperflow.training.checkpoint import load_checkpoint

    accelerator = _OneProcess()
    drift, optimizer, scheduler = _trained_parts(1)  # other values everywhere
    state = load_checkpoint(accelerator, folder, drift=drift, optimizer=optimizer, scheduler=scheduler)
    return state, drift, optimizer, scheduler, accelerator


def test_a_checkpoint_restores_everything(checkpoint):
    folder, weights, optimizer_state = checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ["accelerator.json", "drift.safetensors", "optimizer.json",
                                                         "optimizer.safetensors", "rng_0.json", "rng_0.safetensors",
                                                         "scheduler.json", "trainer_state.json"]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # anywhere else
    state, drift, optimizer, scheduler, accelerator = _restore(folder)
    # the random generators continue as they did right after the checkpoint was written
    assert [random.random(), float(np.random.rand()), float(torch.rand(()))] == _draws
    assert state["step"] == 3 and math.isnan(state["best_accuracy"]) and accelerator.step == 3
    assert all(torch.equal(drift.state_dict()[k], weights[k]) for k in weights)
    got = optimizer.state_dict()
    assert got["param_groups"] == [{**g, "betas": tuple(g["betas"])} for g in optimizer_state["param_groups"]]
    assert all(torch.equal(got["state"][i][n], v) for i, s in optimizer_state["state"].items() for n, v in s.items())
    assert scheduler.last_epoch == 3


FILES = ["accelerator.json", "drift.safetensors", "optimizer.json", "optimizer.safetensors", "rng_0.json",
         "rng_0.safetensors", "scheduler.json", "trainer_state.json"]


@pytest.mark.parametrize("name", FILES)
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.sampled_from(["cut", "byte", "field"]), where=st.floats(0.0, 0.999), xor=st.integers(1, 255))
def test_a_damaged_checkpoint_file_is_named_before_anything_is_restored(checkpoint, tmp_path, name, damage, where,
                                                                          xor):
    """Every file of a checkpoint cut anywhere, any byte changed, or (JSON) a field removed: resuming names the
    file (or, for bytes that change nothing, such as JSON whitespace, restores exactly)."""
    import shutil

    folder, weights, _ = checkpoint
    damaged = tmp_path / "step"
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(folder, damaged)
    path = damaged / name
    content = bytearray(path.read_bytes())
    if damage == "cut":
        path.write_bytes(bytes(content[: int(where * len(content))]))
    elif damage == "byte":
        content[int(where * len(content))] ^= xor
        path.write_bytes(bytes(content))
    elif name.endswith(".json"):
        data = json.loads(content)
        del data[sorted(data)[int(where * len(data))]]
        path.write_text(json.dumps(data))
    else:
        return
    try:
        _, drift, *_ = _restore(damaged)
    except (ValueError, FileNotFoundError) as error:
        assert name in str(error), f"the error does not name {name}: {error}"
        event(f"{name}: clear error")
        return
    assert all(torch.equal(drift.state_dict()[k], weights[k]) for k in weights)
    event(f"{name}: restored exactly")


def test_an_episode_log_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from types import SimpleNamespace

    from hf_hyperflow.training.loop import _Run

    log = tmp_path / "episodes" / "rank_0.jsonl"
    log.parent.mkdir()
    log.write_text('{"step": 0, "episodes": [0]}\n{"step": 1, "episodes": [1]}\n{"step": 2, "epis')
    run = SimpleNamespace(output_dir=tmp_path, rank=0)
    _Run._open_episode_log(run, 2)  # resumed from the checkpoint of step 2 (steps 0 and 1 done)
    assert log.read_text() == '{"step": 0, "episodes": [0]}\n{"step": 1, "episodes": [1]}\n'
    assert run.episode_log == log and not list(log.parent.glob(".*"))
