"""The two training signals of the drift network and the module Accelerate trains.

1. Flow matching (the paper): at a random time t on an interpolated fine-tuning trajectory, the drift network
   (at the path's position, with the task encoded from the trajectory's support set) regresses the path's
   velocity. The error is a per-group normalised squared error: for every state group g (lora / shift / head)
   the squared error summed over the group's entries, divided by ``scale_g`` (the mean squared norm of
   theta_K - theta_0 of that group over the first trajectories of the store), averaged over tasks and groups.
2. Unrolled task loss: integrate K steps of the drift from theta_0 on a fresh episode, classify the
   episode's query images with the adapted backbone and its cosine prototype classifier, cross-entropy.
   Gradients reach only the drift network; the backbone stays frozen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..drift import DriftNet, TaskEncoding
from ..prefix import FrozenPrefix, skip_prefix
from ..state import HEAD_KEY, TaskState, parse_state_key

__all__ = ["UnrolledInputs", "FlowInputs", "flow_matching_loss", "velocity_scales", "flow_inputs",
           "episode_logits", "DriftObjective"]


@dataclass
class UnrolledInputs:
    """T episodes for the unrolled loss.

    Attributes:
        support: ``Tensor[S, 3, H, W]`` support images of all episodes, episode after episode.
        support_labels: ``LongTensor[S]``, labels within each episode.
        support_sizes: support images per episode; num_classes: classes per episode.
        query: ``Tensor[Q, 3, H, W]``; query_labels: ``LongTensor[Q]``; query_sizes: query images per episode.
        support_prefix / query_prefix: the frozen prefix's outputs for them (None without a prefix).
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    support_sizes: list[int]
    num_classes: list[int]
    query: torch.Tensor
    query_labels: torch.Tensor
    query_sizes: list[int]
    support_prefix: Any = None
    query_prefix: Any = None


@dataclass
class FlowInputs:
    """T points on trajectories for the flow-matching loss.

    Attributes:
        features: ``Tensor[N, D]``, support features at theta_0 of all tasks; labels: ``LongTensor[N]``.
        sizes: support images per task; num_classes: classes per task.
        times: ``Tensor[T]`` in [0, 1].
        positions / velocities: TaskStates of T tasks (every entry of the adapter's state; the head padded to
            the largest number of classes).
        groups: the groups the loss is computed on (those the trajectories fine-tuned).
        module_statistics: ``name -> Tensor[T, 3 C]`` (``DriftNet.module_statistics``), for a drift network
            that reads module input statistics (else None).
    """

    features: torch.Tensor
    labels: torch.Tensor
    sizes: list[int]
    num_classes: list[int]
    times: torch.Tensor
    positions: TaskState
    velocities: TaskState
    groups: list[str]
    module_statistics: dict | None = None


def flow_matching_loss(drift: DriftNet, inputs: FlowInputs, scales: dict[str, float],
                       encoding: TaskEncoding | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-group normalised squared error of the drift against the paths' velocities.

    ``loss = mean_g [ mean_tasks sum_{entries of g} ||drift - velocity||^2 / scale_g ]`` over the groups of
    ``inputs.groups``; padded head classes do not count.

    Returns:
        ``(loss, {group: its term})`` (0-d tensors).
    """
    if encoding is None:
        encoding = drift.encode_tasks(inputs.features, inputs.labels, inputs.sizes, inputs.num_classes,
                                      inputs.module_statistics)
    predicted = drift(inputs.positions, inputs.times, encoding)
    num_tasks = inputs.times.shape[0]
    terms: dict[str, torch.Tensor] = {}
    for key, target in inputs.velocities.items():
        group = parse_state_key(key)[0]
        if group not in inputs.groups:
            continue
        error = (predicted[key].float() - target.float()).pow(2)
        if key == HEAD_KEY:
            error = error * encoding.class_mask[..., None].to(error.dtype)
        term = error.sum() / (num_tasks * scales[group])
        terms[group] = terms[group] + term if group in terms else term
    if not terms:
        raise ValueError(f"No entry of the state belongs to the groups {inputs.groups}.")
    loss = torch.stack(list(terms.values())).mean()
    return loss, terms


def velocity_scales(trajectories: Sequence[TaskState] | Iterator[TaskState], groups: Sequence[str],
                    class_counts: Sequence[int] | None = None) -> dict[str, float]:
    """``scale_g``: the mean over trajectories of ``||theta_K - theta_0||^2`` restricted to group g.

    Args:
        trajectories: TaskStates with the K+1 snapshots on the task axis.
        groups: the groups to measure.

    Raises:
        ValueError: no trajectory, or a group that never moves (its scale would be 0).
    """
    totals = {g: 0.0 for g in groups}
    count = 0
    for snapshots in trajectories:
        count += 1
        for key, value in snapshots.items():
            group = parse_state_key(key)[0]
            if group in totals:
                totals[group] += float((value[-1].double() - value[0].double()).pow(2).sum())
    if count == 0:
        raise ValueError("velocity_scales needs at least one trajectory.")
    scales = {g: total / count for g, total in totals.items()}
    still = [g for g, s in scales.items() if not s > 0]
    if still:
        raise ValueError(f"The trajectories never move the group(s) {still}: a fine-tuning lr of 0, or groups that "
                         f"were not fine-tuned; remove them from the flow loss.")
    return scales


def _full_state(drift: DriftNet, partial: TaskState, num_classes: int, zeros: bool) -> TaskState:
    """Every entry of the drift's state for one task: ``partial``'s entries, the rest at theta_0 (or 0)."""
    tensors = {}
    reference = next(iter(partial.values()))
    for entry in drift.entries:
        if entry.key in partial:
            tensors[entry.key] = partial[entry.key]
        elif entry.group == "lora" and entry.param == "A" and not zeros:
            tensors[entry.key] = drift.theta0(entry.key).to(reference)[None]
        else:
            tensors[entry.key] = torch.zeros(1, *entry.shape, dtype=reference.dtype, device=reference.device)
    if "head" in drift.groups:
        tensors[HEAD_KEY] = partial[HEAD_KEY] if HEAD_KEY in partial else torch.zeros(
            1, num_classes, drift.feature_size, dtype=reference.dtype, device=reference.device)
    return TaskState(tensors)


def _pad_heads(states: list[TaskState], c_max: int) -> list[TaskState]:
    if HEAD_KEY not in states[0]:
        return states
    return [TaskState({k: (F.pad(v, (0, 0, 0, c_max - v.shape[1])) if k == HEAD_KEY else v) for k, v in s.items()})
            for s in states]


def flow_inputs(drift: DriftNet, features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], paths: Sequence,
                times: torch.Tensor, groups: Sequence[str], module_statistics: Sequence[dict] | None = None
                ) -> FlowInputs:
    """Assemble :class:`FlowInputs` from T tasks.

    Args:
        features: T tensors ``[S_i, D]`` (support features at theta_0); labels: T ``LongTensor[S_i]``.
        paths: T :class:`~hf_hyperflow.trajectories.StatePath` of one trajectory each (``position(t)`` /
            ``velocity(t)`` give TaskStates of one task with the fine-tuned entries).
        times: ``Tensor[T]`` in [0, 1].
        groups: the groups of the loss.
        module_statistics: T dicts ``name -> Tensor[1, 3 C]`` of module input statistics, or None.
    """
    num_classes = [int(y.max()) + 1 for y in labels]
    c_max = max(num_classes)
    positions, velocities = [], []
    device = features[0].device
    for path, t, c in zip(paths, times.tolist(), num_classes, strict=True):
        where = torch.tensor([t], dtype=torch.float32)
        positions.append(_full_state(drift, path.position(where).to(device), c, zeros=False))
        velocities.append(_full_state(drift, path.velocity(where).to(device), c, zeros=True))
    return FlowInputs(
        features=torch.cat(list(features)), labels=torch.cat(list(labels)).to(device),
        sizes=[f.shape[0] for f in features], num_classes=num_classes, times=times.to(device, torch.float32),
        positions=TaskState.cat(_pad_heads(positions, c_max)), velocities=TaskState.cat(_pad_heads(velocities, c_max)),
        groups=list(groups), module_statistics=_cat_statistics(module_statistics))


def _cat_statistics(per_task: Sequence[dict] | None) -> dict | None:
    """One dict of module input statistics for T tasks (None when not used)."""
    if not per_task or per_task[0] is None:
        return None
    return {name: torch.cat([m[name] for m in per_task]) for name in per_task[0]}


def episode_logits(adapter, inputs: UnrolledInputs, prefix: FrozenPrefix | None = None, *,
                   direct_transfer: bool = False, steps: int | None = None,
                   integrator: str | None = None, stopping: str | None = None) -> list[torch.Tensor]:
    """The unrolled forward pass of T episodes: adapt to each support set (``steps`` of ``integrator``, or direct
    transfer at theta_0), then classify the query images. One ``Tensor[Q_i, C_i]`` of logits per episode,
    differentiable w.r.t. the drift network when grad is on.

    Args:
        prefix: the frozen prefix the inputs' ``support_prefix`` / ``query_prefix`` outputs belong to (the
            backbone skips those blocks); None: the blocks run.
        stopping: where each task's path ends (see :meth:`HyperFlowAdapter.adapt_batch`): ``"fixed"`` (t = 1, the
            meta-training loss), ``"auto"``, or None for the adapter's own rule (what a user gets: validation).
    """
    with skip_prefix(prefix, inputs.support_prefix, inputs.support.shape[0]):
        if direct_transfer:
            batch = adapter.transfer_batch(inputs.support, inputs.support_labels, inputs.support_sizes,
                                           inputs.num_classes, task_features=adapter.task_features(inputs.support))
        else:
            features0, statistics = adapter.task_inputs(inputs.support, inputs.support_labels, inputs.support_sizes,
                                                        inputs.num_classes)
            batch = adapter.adapt_batch(inputs.support, inputs.support_labels, inputs.support_sizes,
                                        inputs.num_classes, steps=steps, integrator=integrator, stopping=stopping,
                                        task_features=features0, module_statistics=statistics)
    with skip_prefix(prefix, inputs.query_prefix, inputs.query.shape[0]):
        return adapter.query_logits(batch, inputs.query, inputs.query_sizes)


class DriftObjective(nn.Module):
    """The module Accelerate prepares: its only submodule is the drift network.

    ``forward(unrolled, flow)`` returns a dict with ``loss`` (the weighted sum) and its parts. The adapter
    (backbone, tuner) is kept as a plain attribute, outside the module tree, so that DDP synchronises the
    drift network alone and no gradient reaches the backbone.

    Args:
        adapter: the HyperFlowAdapter whose drift network is trained.
        unrolled_weight, flow_weight: weights of the two losses.
        steps, integrator: integration of the unrolled loss.
        scales: per-group scales of the flow loss.
        prefix: the frozen prefix whose outputs the unrolled inputs carry (None: they carry none).
    """

    def __init__(self, adapter, *, unrolled_weight: float = 1.0, flow_weight: float = 0.0, steps: int | None = None,
                 integrator: str | None = None, scales: dict[str, float] | None = None,
                 prefix: FrozenPrefix | None = None):
        super().__init__()
        self.drift = adapter.drift
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "prefix", prefix)
        self.unrolled_weight = float(unrolled_weight)
        self.flow_weight = float(flow_weight)
        self.steps = steps
        self.integrator = integrator
        self.scales = dict(scales or {})

    def unrolled_loss(self, inputs: UnrolledInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy over the episodes and the query accuracy (0-d tensors)."""
        # The loss is the query loss at the end of the path: the stopping rule chooses among its points at
        # inference and would pass no gradient to the tasks it stops at t = 0.
        logits = episode_logits(self.adapter, inputs, self.prefix, steps=self.steps, integrator=self.integrator,
                                stopping="fixed")
        losses, correct = [], 0
        for task_logits, labels in zip(logits, inputs.query_labels.split(inputs.query_sizes), strict=True):
            losses.append(F.cross_entropy(task_logits.float(), labels))
            correct += int((task_logits.argmax(-1) == labels).sum())
        accuracy = torch.tensor(correct / inputs.query.shape[0], device=inputs.query.device)
        return torch.stack(losses).mean(), accuracy

    def forward(self, unrolled: UnrolledInputs | None = None, flow: FlowInputs | None = None) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "unrolled_loss", "train_accuracy", "flow_loss", "flow_<group>"}`` (0-d
        tensors; the parts of the losses given)."""
        if unrolled is None and flow is None:
            raise ValueError("DriftObjective needs unrolled inputs, flow inputs or both.")
        out: dict[str, torch.Tensor] = {}
        total = None
        if unrolled is not None:
            loss, accuracy = self.unrolled_loss(unrolled)
            out["unrolled_loss"], out["train_accuracy"] = loss, accuracy
            total = self.unrolled_weight * loss
        if flow is not None:
            loss, terms = flow_matching_loss(self.drift, flow, self.scales)
            out["flow_loss"] = loss
            for group, term in terms.items():
                out[f"flow_{group}"] = term
            total = self.flow_weight * loss if total is None else total + self.flow_weight * loss
        out["loss"] = total
        return out
