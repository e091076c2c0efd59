"""Meta-training: known-answer flow matching, the unrolled loss, configs, resume, and two processes through
``accelerate launch`` (tiny random backbones, synthetic or sliced data)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from hf_hyperflow.drift import DriftNet
from hf_hyperflow.heads import class_prototypes
from hf_hyperflow.integrators import integrate
from hf_hyperflow.prefix import PrefixCache
from hf_hyperflow.state import StateEntry, TaskState
from hf_hyperflow.training import (
    DriftObjective,
    UnrolledInputs,
    apply_overrides,
    config_from_dict,
    flow_inputs,
    flow_matching_loss,
    load_config,
    step_sample_ids,
    train,
    velocity_scales,
)
from hf_hyperflow.trajectories import trajectory_path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "configs" / "smoke.yaml"
TINY_RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1],
               "layer_type": "basic", "seed": 0}


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Each in-process run builds its own Accelerator: reset Accelerate's process-wide state around tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> str:
    """12 classes x 10 images of 32 px: a class colour and stripe direction, plus per-image noise."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    grid = np.arange(32)
    for c in range(12):
        colour = rng.uniform(40, 215, size=3)
        stripes = np.sin((grid[:, None] * math.cos(c) + grid[None, :] * math.sin(c)) * (0.3 + 0.05 * c))
        for _ in range(10):
            pixels = colour[None, None] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (32, 32, 3))
            images.append(_png(np.clip(pixels, 0, 255).astype(np.uint8)))
            labels.append(c)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{c:02d}" for c in range(12)])})
    folder = tmp_path_factory.mktemp("data") / "synthetic"
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(folder))
    return str(folder)


def tiny_config(output_dir, source: str, **changes) -> dict:
    """A run of a few seconds: tiny random ResNet, both losses, trajectories recorded first."""
    data = {
        "output_dir": str(output_dir),
        "backbone": {"random_init": dict(TINY_RESNET)},
        "adapter": {"groups": ["lora", "shift", "head"], "r": 2, "first_adapted_block": -1, "image_size": 32,
                    "steps": 3, "hidden_size": 32, "output_rank": 8},
        "datasets": [{"source": source, "class_split": {"fractions": [0.6, 0.4, 0.0], "seed": 0}}],
        "episodes": {"ways": 3, "shots": 2, "queries": 3, "seed": 0},
        "losses": {"unrolled": 1.0, "flow": 0.5},
        "flow": {"generate": {"episodes": 4, "steps": 4, "lr": 0.01}, "interpolation": "cubic",
                 "trajectories_per_step": 4},
        "validation": {"episodes": 4, "every": 3, "tasks_per_batch": 4},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        "training": {"max_steps": 6, "episodes_per_step": 4, "checkpoint_every": 2, "log_every": 2, "threads": 1,
                     "log_episodes": True},
    }
    return apply_overrides(data, changes)


# ------------------------------------------------------------------------------------------------
# Which episodes each rank uses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_every_episode_is_used_once_per_step_across_ranks(world_size, accumulation):
    per_step = 8
    for step in range(3):
        used = [i for rank in range(world_size) for micro in range(accumulation)
                for i in step_sample_ids(step, micro, per_step, accumulation, rank, world_size)]
        assert sorted(used) == list(range(step * per_step, (step + 1) * per_step))
        for rank in range(world_size):  # rank r takes i % world_size == r, as EpisodeSampler shards
            mine = [i for micro in range(accumulation)
                    for i in step_sample_ids(step, micro, per_step, accumulation, rank, world_size)]
            assert all(i % world_size == rank for i in mine)
    with pytest.raises(ValueError, match="cannot be split over 2 accumulation steps x 2 processes"):
        step_sample_ids(0, 0, 6, 2, 0, 2)


# ------------------------------------------------------------------------------------------------
# Flow matching on a problem with a known drift
# ------------------------------------------------------------------------------------------------
D, ALPHA, KNOTS = 8, 3.0, 11


def _gradient_flow_task(seed: int, head_map: torch.Tensor, shift_target: torch.Tensor):
    """Support features of a 3-5-way task and its fine-tuning optimum theta*.

    Fine-tuning is gradient flow on ``L = alpha / 2 ||theta - theta*||^2`` from theta_0 = 0, so
    ``theta(t) = (1 - exp(-alpha t)) theta*`` and the true drift is ``alpha (theta* - theta)``. The head optimum
    depends on the task: ``M @ p_c`` for every class with normalised prototype ``p_c``.
    """
    generator = torch.Generator().manual_seed(seed)
    ways, shots = 3 + seed % 3, 3
    centers = F.normalize(torch.randn(ways, D, generator=generator), dim=1) * 3
    labels = torch.arange(ways).repeat_interleave(shots)
    features = centers[labels] + 0.3 * torch.randn(len(labels), D, generator=generator)
    prototypes = F.normalize(class_prototypes(features, labels, ways), dim=1)
    star = TaskState({"shift.bias:block": shift_target[None], "head.prototypes:": (prototypes @ head_map.T)[None]})
    return features, labels, star


def _snapshots(star: TaskState) -> TaskState:
    """The K+1 snapshots theta(k / K) of the gradient flow, on the task axis."""
    t = torch.linspace(0, 1, KNOTS)
    return TaskState({k: (1 - torch.exp(-ALPHA * t)).reshape(-1, *[1] * (v.dim() - 1)) * v for k, v in star.items()})


def test_flow_matching_learns_a_known_gradient_flow():
    torch.manual_seed(0)
    drift = DriftNet([StateEntry("shift.bias:block", (6,))], feature_size=D, groups=["shift", "head"],
                     hidden_size=64, output_rank=8)
    generator = torch.Generator().manual_seed(1)
    head_map = torch.randn(D, D, generator=generator) / math.sqrt(D)
    shift_target = torch.randn(6, generator=generator)

    def task(seed):
        return _gradient_flow_task(seed, head_map, shift_target)

    groups = ["shift", "head"]
    scales = velocity_scales([_snapshots(task(s)[2]) for s in range(32)], groups)
    assert scales["shift"] == pytest.approx(float(shift_target.pow(2).sum()) * (1 - math.exp(-ALPHA)) ** 2, rel=1e-5)
    objective = DriftObjective(types.SimpleNamespace(drift=drift), unrolled_weight=0.0, flow_weight=1.0, scales=scales)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    steps, batch = 220, 12
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    times = torch.Generator().manual_seed(2)
    first = None
    for step in range(steps):  # a fresh batch of tasks every step
        tasks = [task(100 + step * batch + j) for j in range(batch)]
        inputs = flow_inputs(drift, [f for f, _, _ in tasks], [y for _, y, _ in tasks],
                             [trajectory_path(_snapshots(s), "cubic") for _, _, s in tasks],
                             torch.rand(batch, generator=times), groups)
        loss = objective(flow=inputs)["loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert float(loss.detach()) < 0.05 * first

    drift_errors, endpoint_errors = [], []
    with torch.no_grad():
        for seed in range(10_000, 10_012):  # tasks never seen in training
            features, labels, star = task(seed)
            encoding = drift.encode_tasks(features, labels, [len(labels)], [int(labels.max()) + 1])
            error = norm = 0.0
            for t in torch.linspace(0, 1, 6).tolist():
                theta = star * (1 - math.exp(-ALPHA * t))
                true = (star - theta) * ALPHA
                error += float((drift(theta, t, encoding) - true).squared_norms())
                norm += float(true.squared_norms())
            drift_errors.append(math.sqrt(error / norm))
            end = integrate(lambda s, t, e=encoding: drift(s, t, e), drift.initial_state(encoding), 20, method="rk4")
            target = star * (1 - math.exp(-ALPHA))
            endpoint_errors.append(math.sqrt(float((end - target).squared_norms() / target.squared_norms())))
    # An untrained drift (zero) has relative error 1; one that ignored the task would miss the head by ~100%.
    assert np.mean(drift_errors) < 0.15 and max(drift_errors) < 0.25, drift_errors
    assert np.mean(endpoint_errors) < 0.08 and max(endpoint_errors) < 0.15, endpoint_errors


def test_flow_loss_ignores_padded_classes_and_is_zero_on_the_drift_itself():
    torch.manual_seed(0)
    drift = DriftNet([StateEntry("shift.bias:block", (4,))], feature_size=D, groups=["shift", "head"])
    with torch.no_grad():
        for parameter in drift.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    generator = torch.Generator().manual_seed(3)
    tasks = [_gradient_flow_task(seed, torch.eye(D), torch.ones(4)) for seed in (0, 1)]  # 3 and 4 ways
    tasks = [(f, y, TaskState({"shift.bias:block": s["shift.bias:block"][:, :4], "head.prototypes:": s["head.prototypes:"]}))
             for f, y, s in tasks]
    paths = [trajectory_path(_snapshots(s), "linear") for _, _, s in tasks]
    inputs = flow_inputs(drift, [f for f, _, _ in tasks], [y for _, y, _ in tasks], paths,
                         torch.rand(2, generator=generator), ["shift", "head"])
    assert inputs.positions["head.prototypes:"].shape == (2, 4, D)  # padded to the largest task
    assert inputs.velocities["head.prototypes:"][0, 3].abs().sum() == 0
    with torch.no_grad():
        predicted = drift(inputs.positions, inputs.times,
                          drift.encode_tasks(inputs.features, inputs.labels, inputs.sizes, inputs.num_classes))
    exact = type(inputs)(**{**inputs.__dict__, "velocities": predicted})
    loss, terms = flow_matching_loss(drift, exact, {"shift": 1.0, "head": 1.0})
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10) and set(terms) == {"shift", "head"}
    # Garbage in the padded class of the target changes nothing.
    noisy = predicted.map(lambda t: t.clone())
    noisy["head.prototypes:"][0, 3] += 100.0
    loss, _ = flow_matching_loss(drift, type(inputs)(**{**inputs.__dict__, "velocities": noisy}), {"shift": 1, "head": 1})
    assert float(loss) == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------------------------------------
# The unrolled loss
# ------------------------------------------------------------------------------------------------
def _tiny_adapter():
    from transformers import AutoConfig, AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    settings = {k: v for k, v in TINY_RESNET.items() if k not in ("model_type", "seed")}
    torch.manual_seed(0)
    backbone = AutoModel.from_config(AutoConfig.for_model("resnet", **settings)).eval()
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(r=2, first_adapted_block=-1, image_size=32, steps=3,
                                                         hidden_size=32, output_rank=8))
    with torch.no_grad():  # a drift that moves the state, so that every part of the graph is exercised
        for name, parameter in adapter.drift.named_parameters():
            if name.startswith(("state_out", "head_net")):
                parameter.normal_(0, 0.05)
    return adapter


def test_unrolled_loss_reaches_only_the_drift_and_the_prefix_cache_is_exact():
    adapter = _tiny_adapter()
    generator = torch.Generator().manual_seed(0)
    support, query = torch.randn(12, 3, 32, 32, generator=generator), torch.randn(12, 3, 32, 32, generator=generator)
    inputs = UnrolledInputs(support=support, support_labels=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 0, 1]),
                            support_sizes=[6, 6], num_classes=[3, 2], query=query,
                            query_labels=torch.tensor([0, 1, 2, 2, 1, 0, 1, 0, 0, 1, 1, 0]), query_sizes=[6, 6])
    prefix = PrefixCache(adapter.backbone, max_bytes=2**20)
    assert prefix.active and prefix.prefix.blocks[-1][0] == "encoder.stages.0.layers.0"
    objective = DriftObjective(adapter, prefix=prefix.prefix)
    plain = objective(unrolled=inputs)
    plain["loss"].backward()
    grads = {n: p.grad.clone() for n, p in adapter.drift.named_parameters()}
    assert all(g is not None for g in grads.values()) and sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert all(p.grad is None and not p.requires_grad for p in adapter.backbone.parameters())
    assert [n for n, _ in objective.named_children()] == ["drift"]  # DDP would see the drift network only

    adapter.drift.zero_grad(set_to_none=True)
    keys = [("x", i) for i in range(12)]
    cached = UnrolledInputs(**{**inputs.__dict__, "support_prefix": prefix.outputs(support, keys),
                               "query_prefix": prefix.outputs(query, [("y", i) for i in range(12)])})
    again = objective(unrolled=cached)
    again["loss"].backward()
    torch.testing.assert_close(again["loss"], plain["loss"], rtol=1e-5, atol=1e-6)
    for name, parameter in adapter.drift.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)
    # Kept per image: a second request computes nothing and returns the same tensor.
    misses = prefix.misses
    torch.testing.assert_close(prefix.outputs(support, keys), cached.support_prefix)
    assert prefix.misses == misses and prefix.hits >= 12


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def test_smoke_config_is_valid_and_overrides_apply():
    config = load_config(SMOKE, ["--training.max_steps", "7", "--optimizer.lr=1e-3", "--datasets.0.max_classes", "30"])
    assert config.training.max_steps == 7 and config.optimizer.lr == 1e-3 and config.datasets[0].max_classes == 30
    assert config.backbone.random_init["model_type"] == "resnet" and config.adapter.config["first_adapted_block"] == -1


def test_efficientnet_lite0_config_is_valid():
    config = load_config(ROOT / "recipes" / "configs" / "efficientnet_lite0.yaml")
    assert config.backbone.build == "efficientnet_lite0" and config.adapter.config["image_size"] == 64
    assert config.losses.unrolled > 0 and config.losses.flow > 0 and config.flow.generate.episodes >= 100


@pytest.mark.parametrize("name", ["cpu_2proc", "single_gpu", "multi_gpu", "multi_node"])
def test_accelerate_launch_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / "configs" / "accelerate" / f"{name}.yaml"))
    expected = {"cpu_2proc": ("MULTI_GPU", True, 2, 1), "single_gpu": ("NO", False, 1, 1),
                "multi_gpu": ("MULTI_GPU", False, 8, 1), "multi_node": ("MULTI_GPU", False, 16, 2)}[name]
    assert (config.distributed_type.value, config.use_cpu, config.num_processes, config.num_machines) == expected


@pytest.mark.parametrize("changes,message", [
    ({"optimizer.lrr": 0.1}, "Unknown key 'optimizer.lrr'"),
    ({"trainer": {"steps": 3}}, "Unknown key 'trainer'"),
    ({"adapter.rank": 4}, "Unknown key 'adapter.rank'"),
    ({"datasets.0.source": "/nowhere/glyphs"}, r"datasets\[0\].source: /nowhere/glyphs does not exist"),
    ({"datasets.0.class_split": {"train": ["c00", "c01", "c02"], "validation": []}},
     r"datasets\[0\].class_split: the validation split has no classes"),
    ({"training.max_steps": 0}, "training.max_steps must be an integer >= 1, got 0"),
    ({"adapter.steps": 0}, "adapter.steps must be an integer >= 1, got 0"),
    ({"unrolled.steps": 0}, "unrolled.steps must be an integer >= 1, got 0"),
    ({"flow.generate.steps": 0}, "flow.generate.steps must be an integer >= 1, got 0"),
    ({"optimizer.lr": "fast"}, "optimizer.lr must be a number, got 'fast'"),
    ({"losses.flow": 0.0, "losses.unrolled": 0.0}, "give at least one a positive weight"),
    ({"training.report_to": "wandb"}, "training.report_to must be null or one of"),
    ({"training.episodes_per_step": 0}, "training.episodes_per_step must be an integer >= 1, got 0"),
])
def test_bad_config_names_the_key_before_any_work(tmp_path, synthetic_dataset, changes, message):
    data = tiny_config(tmp_path / "run", synthetic_dataset, **changes)
    with pytest.raises((ValueError, TypeError), match=message):
        config_from_dict(data)
    # The command line says the same and stops before creating anything.
    import yaml

    sys.path.insert(0, str(ROOT))
    from recipes.train import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["--config", str(path)]) == 2
    assert not (tmp_path / "run").exists()


def test_empty_class_split_from_the_data_fails_before_training(tmp_path, synthetic_dataset):
    data = tiny_config(tmp_path / "run", synthetic_dataset,
                       **{"datasets.0.class_split": {"fractions": [1.0, 0.0, 0.0], "seed": 0}})
    with pytest.raises(ValueError, match=r"datasets\[0\].class_split: the validation split has no classes"):
        train(config_from_dict(data))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "trajectories").exists()


# ------------------------------------------------------------------------------------------------
# Runs: resume, bf16, two processes
# ------------------------------------------------------------------------------------------------
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
    whole = train(config_from_dict(tiny_config(tmp_path / "whole", synthetic_dataset,
                                               **{"flow.generate.output": shared})))
    assert whole.step == 6 and (tmp_path / "whole" / "final" / "adapter_model.safetensors").is_file()

    class Crash(RuntimeError):
        pass

    def crash_at_five(step, record):
        if step == 5:
            raise Crash  # after step 5, whose checkpoint (every 2 steps) was not written
    config = config_from_dict(tiny_config(tmp_path / "crashed", synthetic_dataset, **{"flow.generate.output": shared}))
    with pytest.raises(Crash):
        train(config, callback=crash_at_five)
    assert [p.name for p in sorted((tmp_path / "crashed" / "checkpoints").iterdir())] == ["step_0000002",
                                                                                           "step_0000004"]
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run: pass --resume"):
        train(config)
    partial = train(config, resume=True, max_steps_this_run=1)  # a time-limited job: one step, then a checkpoint
    assert partial.step == 5 and partial.final_dir is None
    assert (tmp_path / "crashed" / "checkpoints" / "step_0000005" / "trainer_state.json").is_file()
    resumed = train(config, resume=True)
    assert resumed.step == 6

    final_whole = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    final_resumed = load_file(str(tmp_path / "crashed" / "final" / "adapter_model.safetensors"))
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        torch.testing.assert_close(final_resumed[key], final_whole[key], rtol=1e-5, atol=1e-6)
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
    result = train(config_from_dict(tiny_config(tmp_path / "reuse", synthetic_dataset, **reuse)))
    assert result.metrics["trajectories"] == 4 and result.metrics["history"][-1]["flow_loss"] > 0
    other = {**reuse, "adapter": {"r": 3, "first_adapted_block": -1, "image_size": 32}}
    with pytest.raises(ValueError, match=r"flow.trajectories\[0\]: .* another state layout"):
        train(config_from_dict(tiny_config(tmp_path / "other", synthetic_dataset, **other)))


def test_bf16_run_with_a_loader_worker_writes_a_loadable_adapter(tmp_path, synthetic_dataset):
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter

    data = tiny_config(tmp_path / "run", synthetic_dataset, **{
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
    from hf_hyperflow.training import EpisodeMix

    data = tiny_config(tmp_path / "run", synthetic_dataset, **{
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

    class Sampler(list):
        pass
    mix = EpisodeMix([Sampler(range(4000)), Sampler(range(4000))], [1.0, 3.0], seed=0)
    share = np.mean([mix.source_of(i) for i in range(4000)])
    assert 0.72 < share < 0.78  # weights 1 : 3
    assert [mix.source_of(i) for i in range(50)] == [mix.source_of(i) for i in range(50)]
    with pytest.raises(ValueError, match=r"Unknown key 'datasets\[1\].episodes.way'"):
        config_from_dict(apply_overrides(data, {"datasets.1.episodes": {"way": 2}}))


@pytest.mark.slow
def test_smoke_config_on_two_processes_through_accelerate_launch(tmp_path):
    """recipes/configs/smoke.yaml through `accelerate launch` (recipes/configs/accelerate/cpu_2proc.yaml: two gloo
    processes) on a slice of glyphs_default built by the data builder; compared with the same run in one process."""
    sys.path.insert(0, str(ROOT))
    from recipes.data import glyphs_default

    data_dir = tmp_path / "glyphs_default"
    glyphs_default.build(data_dir, max_classes=40)
    overrides = ["--datasets.0.source", str(data_dir), "--training.max_steps", "6", "--training.checkpoint_every",
                 "3", "--validation.every", "3", "--validation.episodes", "8", "--flow.generate.episodes", "4",
                 "--flow.generate.steps", "4", "--training.log_episodes", "true", "--flow.generate.output",
                 str(tmp_path / "trajectories")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
               str(29500 + os.getpid() % 1000), str(ROOT / "recipes" / "train.py"), "--config", str(SMOKE), "--cpu",
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
