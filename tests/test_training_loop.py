"""Meta-training runs: resume after a crash equals an uninterrupted run, bf16 with a loader worker, two datasets
with their own episode shapes, and two processes through ``accelerate launch`` (tiny random backbones)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from safetensors.torch import load_file

from hf_hyperflow.training import config_from_dict, load_config, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "configs" / "smoke.yaml"
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _read_log(folder: Path) -> dict[int, list]:
    """Step -> (episodes, trajectories) used by every rank, from the episode logs."""
    steps: dict[int, list] = {}
    for path in sorted((folder / "episodes").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).append((entry["episodes"], entry["trajectories"]))
    return steps


def _check_each_episode_once(log: dict[int, list], steps: int, per_step: int) -> None:
    assert sorted(log) == list(range(steps))
    for step, per_rank in log.items():
        episodes = [i for ranks_episodes, _ in per_rank for i in ranks_episodes]
        assert sorted(episodes) == list(range(step * per_step, (step + 1) * per_step)), (step, per_rank)
        trajectories = [t for _, ranks_trajectories in per_rank for t in ranks_trajectories]
        assert len(trajectories) == len(set(trajectories)) == per_step


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, synthetic_dataset):
    shared = str(tmp_path / "trajectories")  # both runs train on the same recorded trajectories
    whole = train(config_from_dict(tiny_train_config(tmp_path / "whole", synthetic_dataset,
                                               **{"flow.generate.output": shared})))
    assert whole.step == 6 and (tmp_path / "whole" / "final" / "adapter_model.safetensors").is_file()

    class Crash(RuntimeError):
        pass

    def crash_at_five(step, record):
        if step == 5:
            raise Crash  # after step 5, whose checkpoint (every 2 steps) was not written
    config = config_from_dict(tiny_train_config(tmp_path / "crashed", synthetic_dataset, **{"flow.generate.output": shared}))
    with pytest.raises(Crash):
        train(config, callback=crash_at_five)
    assert [p.name for p in sorted((tmp_path / "crashed" / "checkpoints").iterdir())] == ["step_0000002",
                                                                                           "step_0000004"]
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run: pass resume=True"):
        train(config)
    partial = train(config, resume=True, max_steps_this_run=1)  # a time-limited job: one step, then a checkpoint
    assert partial.step == 5 and partial.final_dir is None
    assert (tmp_path / "crashed" / "checkpoints" / "step_0000005" / "trainer_state.json").is_file()
    resumed = train(config, resume=True)
    assert resumed.step == 6
    written = {p.suffix for p in (tmp_path / "crashed").rglob("*") if p.is_file()}
    assert written <= {".json", ".safetensors", ".yaml", ".jsonl", ".md", ".png", ".arrow", ""}, written  # no pickles

    final_whole = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    final_resumed = load_file(str(tmp_path / "crashed" / "final" / "adapter_model.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.equal(final_resumed[key], final_whole[key]), key  # bit for bit
    initial = load_file(str(Path(shared) / "adapter" / "adapter_model.safetensors"))  # the untrained drift
    assert any(not torch.equal(initial[k], final_whole[k]) for k in initial)  # training moved the weights
    # No episode skipped or repeated: the resumed log equals the uninterrupted one.
    assert _read_log(tmp_path / "crashed") == _read_log(tmp_path / "whole")
    _check_each_episode_once(_read_log(tmp_path / "whole"), 6, 4)
    metrics = json.loads((tmp_path / "crashed" / "metrics.json").read_text())
    assert [v["step"] for v in metrics["validations"]] == [0, 3, 6]
    assert metrics["direct_transfer"]["accuracy"] == pytest.approx(metrics["validations"][0]["accuracy"])

    # The store named directly (as one recorded by recipes/make_trajectories.py), with the adapter it was made with.
    reuse = {"flow.generate": None, "flow.trajectories": [str(Path(shared) / "synthetic")], "losses.unrolled": 0.0,
             "adapter": {"pretrained": str(Path(shared) / "adapter")}, "training.max_steps": 2,
             "validation.episodes": 0}
    result = train(config_from_dict(tiny_train_config(tmp_path / "reuse", synthetic_dataset, **reuse)))
    assert result.metrics["trajectories"] == 4 and result.metrics["history"][-1]["flow_loss"] > 0
    other = {**reuse, "adapter": {"r": 3, "first_adapted_block": -1, "image_size": 32}}
    with pytest.raises(ValueError, match=r"flow.trajectories\[0\]: .* another state layout"):
        train(config_from_dict(tiny_train_config(tmp_path / "other", synthetic_dataset, **other)))


def test_bf16_run_with_a_loader_worker_writes_a_loadable_adapter(tmp_path, synthetic_dataset):
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter

    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{
        "training.mixed_precision": "bf16", "training.max_steps": 2, "losses.flow": 0.0, "flow.generate": None,
        "validation.every": 1, "training.log_every": 1, "training.num_workers": 1})  # episodes decoded in a worker
    result = train(config_from_dict(data))
    assert all(math.isfinite(h["loss"]) for h in result.metrics["history"])
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(str(tmp_path / "run" / "backbone")),
                                               str(result.best_dir))
    assert next(adapter.drift.parameters()).dtype == torch.float32
    saved = json.loads((result.best_dir / "training_config.json").read_text())
    assert saved["training"]["mixed_precision"] == "bf16"
    assert json.loads((result.best_dir / "metrics.json").read_text())["step"] == result.best_step


def test_two_datasets_with_their_own_episode_shapes_and_weights(tmp_path, synthetic_dataset):
    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{
        "losses.flow": 0.0, "flow.generate": None, "training.max_steps": 2, "validation.every": 2,
        "datasets": [{"source": synthetic_dataset, "name": "three_way", "class_split": {"fractions": [0.6, 0.4, 0.0]}},
                     {"source": synthetic_dataset, "name": "two_way_one_shot", "weight": 3.0, "max_classes": 8,
                      "class_split": {"fractions": [0.5, 0.5, 0.0], "seed": 1},
                      "episodes": {"ways": 2, "shots": 1, "queries": 2}}]})
    result = train(config_from_dict(data))
    last = result.metrics["validations"][-1]
    assert last["three_way"]["episodes"] == 4 and last["two_way_one_shot"]["episodes"] == 4
    assert last["accuracy"] == pytest.approx((last["three_way"]["accuracy"] + last["two_way_one_shot"]["accuracy"]) / 2)
    splits = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "run" / "class_splits").iterdir()}
    assert len(splits["two_way_one_shot"]["train"]) == 4 and len(splits["three_way"]["train"]) == 7


@pytest.mark.slow
def test_smoke_config_on_two_processes_through_accelerate_launch(tmp_path):
    """recipes/configs/smoke.yaml through `accelerate launch` (recipes/configs/accelerate/cpu_2proc.yaml: two gloo
    processes) on a slice of glyphs_default built by the data builder; compared with the same run in one process."""
    sys.path.insert(0, str(ROOT))
    from recipes.data import glyphs_default

    data_dir = tmp_path / "glyphs_default"
    glyphs_default.build(data_dir, max_classes=40)
    dataset = f"[{{source: {data_dir}, class_split: {{fractions: [0.7, 0.15, 0.15], seed: 0}}}}]"
    overrides = ["--datasets", dataset, "--training.max_steps", "6", "--training.checkpoint_every",
                 "3", "--validation.every", "3", "--validation.episodes", "8", "--flow.generate.episodes", "4",
                 "--flow.generate.steps", "4", "--training.log_episodes", "true", "--flow.generate.output",
                 str(tmp_path / "trajectories")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
               str(29500 + os.getpid() % 1000), str(ROOT / "recipes" / "train.py"), "--config", str(SMOKE), "--cpu", "true",
               "--output_dir", str(tmp_path / "two"), *overrides]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["step"] == 6

    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert len(metrics["drift_fingerprints"]) == 2 and len(set(metrics["drift_fingerprints"])) == 1
    log = _read_log(tmp_path / "two")
    assert all(len(per_rank) == 2 for per_rank in log.values())
    _check_each_episode_once(log, 6, 4)

    # The same run in one process sees the same episodes and trajectories and ends with the same weights.
    one = train(load_config(SMOKE, ["--output_dir", str(tmp_path / "one"), *overrides]))
    one_log, two_log = _read_log(tmp_path / "one"), log
    assert sorted(one_log) == sorted(two_log)
    for step in one_log:
        assert sorted(one_log[step][0][0]) == sorted(i for es, _ in two_log[step] for i in es)
        assert sorted(one_log[step][0][1]) == sorted(t for _, ts in two_log[step] for t in ts)
    weights_one = load_file(str(one.final_dir / "adapter_model.safetensors"))
    weights_two = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-3, atol=1e-5)


def test_the_loss_ends_the_path_whatever_the_stopping_rule(tmp_path, synthetic_dataset, monkeypatch):
    """The stopping rule chooses at inference: meta-training's loss is the query loss at t = 1 under either rule,
    and validation adapts with the adapter's own rule over the cached frozen prefix (a colour and a grey copy)."""
    from hf_hyperflow import HyperFlowAdapter

    calls = []
    adapt_batch = HyperFlowAdapter.adapt_batch

    def recorded(self, *args, stopping=None, **kwargs):
        calls.append((torch.is_grad_enabled(), stopping or self.config.stopping))
        return adapt_batch(self, *args, stopping=stopping, **kwargs)

    monkeypatch.setattr(HyperFlowAdapter, "adapt_batch", recorded)
    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{
        "losses.flow": 0.0, "flow.generate": None, "training.max_steps": 2, "validation.every": 2,
        "adapter.stopping": "auto",
        "datasets": [{"source": synthetic_dataset, "name": "colour", "class_split": {"fractions": [0.6, 0.4, 0.0]}},
                     {"source": synthetic_dataset, "name": "grey", "without_colour": True,
                      "class_split": {"fractions": [0.6, 0.4, 0.0]}}]})
    metrics = train(config_from_dict(data)).metrics
    assert {rule for grad, rule in calls if grad} == {"fixed"}  # the loss: every training step
    assert {rule for grad, rule in calls if not grad} == {"auto"}  # validation: what a user gets
    last = metrics["validations"][-1]
    assert last["colour"]["episodes"] == last["grey"]["episodes"] == 4
    assert metrics["prefix_cache"]["hits"] > 0


def test_teacher_trajectories_of_a_grey_dataset_are_rebuilt_in_grey(tmp_path, synthetic_dataset):
    """A trajectory store recorded on a dataset shown without colour says so, and the flow loss rebuilds its
    support sets in grey (not the colour images the teacher never saw)."""
    import numpy as np
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.training.trajectory_pool import TrajectoryPool

    data = tiny_train_config(tmp_path / "run", synthetic_dataset, **{
        "training.max_steps": 1, "validation.episodes": 0,
        "datasets": [{"source": synthetic_dataset, "name": "grey", "without_colour": True,
                      "class_split": {"fractions": [0.6, 0.4, 0.0]}}]})
    config = config_from_dict(data)
    train(config)
    folder = tmp_path / "run" / "trajectories" / "grey"
    assert json.loads((folder / "store.json").read_text())["dataset"]["without_colour"] is True
    backbone = AutoModel.from_pretrained(str(tmp_path / "run" / "backbone"))
    adapter = HyperFlowAdapter.from_pretrained(backbone, str(folder.parent / "adapter"))
    pool = TrajectoryPool([folder], adapter, config, [], prefix=None, transform=None)
    episode, _ = pool._episode(0, pool.stores[0][0].meta)
    for image in episode.support_images:
        values = np.asarray(image, dtype=np.int16)
        assert (values == values[..., :1]).all()
