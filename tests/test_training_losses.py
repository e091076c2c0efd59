"""Meta-training losses: flow matching on a problem with a known drift, padded classes, and the unrolled loss
(gradients reach the drift network only; the cached frozen prefix gives the same loss and gradients)."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET
from tolerances import assert_same_math

from hf_hyperflow.drift import DriftNet
from hf_hyperflow.heads import class_prototypes
from hf_hyperflow.integrators import integrate
from hf_hyperflow.prefix import PrefixCache
from hf_hyperflow.state import StateEntry, TaskState
from hf_hyperflow.training import (
    DriftObjective,
    UnrolledInputs,
    flow_inputs,
    flow_matching_loss,
    velocity_scales,
)
from hf_hyperflow.trajectories import trajectory_path

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
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)


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
    assert_same_math(again["loss"], plain["loss"])
    for name, parameter in adapter.drift.named_parameters():
        assert_same_math(parameter.grad, grads[name])
    # Kept per image: a second request computes nothing and returns the same tensor.
    misses = prefix.misses
    torch.testing.assert_close(prefix.outputs(support, keys), cached.support_prefix)
    assert prefix.misses == misses and prefix.hits >= 12


