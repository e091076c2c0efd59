"""HyperFlowAdapter: a drift network on a Hugging Face vision backbone, and how it adapts to a task.

    adapter = HyperFlowAdapter(backbone, HyperFlowConfig())        # or HyperFlowAdapter.from_pretrained(...)
    task = adapter.adapt(support_images, support_labels)            # forward passes only, no autograd
    task.predict(query_images); task.save_pretrained("my-task")     # a plain PEFT LoRA adapter + the head

``adapt`` is one straight path: images -> pixel values (:mod:`.inputs`) -> frozen features at theta_0 ->
task encoding -> K integration steps of the drift -> adapted features of the support -> prototypes (plus
the head delta) -> an :class:`~hf_hyperflow.task.AdaptedTask`.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn
from torch.profiler import record_function

from .backbones import check_backbone, check_no_adapter, embed, model_type_of
from .backbones import images_per_pass as default_images_per_pass
from .cards import AdapterCardData, card_repo_id, render_adapter_card
from .config import FREE_FIELDS, HyperFlowConfig, check_saved_fields
from .domain_reference import DOMAIN_REFERENCE_FILE, DomainReference, statistics_vector
from .drift import DriftNet, TaskEncoding
from .heads import class_prototypes
from .hub import push_folder_to_hub, resolve_pretrained_folder
from .inputs import (
    PROCESSOR_FILE,
    check_images,
    check_pair,
    default_image_processor,
    encode_labels,
    load_image_processor,
    to_pixel_values,
)
from .io import add_checksum, attach_adapter_checked, load_safetensors_checked, read_json_checked
from .prefix import (
    FrozenPrefix,
    Uncacheable,
    block_output_sizes,
    cat_leaves,
    image_range,
    select_images,
    skip_prefix,
)
from .results import save_results_plot
from .state import HEAD_KEY, TaskState
from .stopping import any_task_judged, candidate_steps, choose_point, leave_one_out_loss
from .task import AdaptedTask, HyperFlowEmbedder
from .tuner.model import HyperFlowModel, peft_wrapping

__all__ = ["HyperFlowAdapter", "TaskBatch", "CPU_TASKS_PER_BATCH", "ACCELERATOR_TASKS_PER_BATCH"]

# Tasks adapt_many adapts together by default (benchmarks/adapt_speed.md measured the CPU value).
CPU_TASKS_PER_BATCH = 16
ACCELERATOR_TASKS_PER_BATCH = 64


@dataclass
class TaskBatch:
    """T tasks adapted together (or taken as they are, for direct transfer).

    Attributes:
        state: the final adapted state (T tasks); None for direct transfer (theta_0, no delta).
        prototypes: ``Tensor[T, C_max, D]`` prototypes (adapted features, plus the head delta).
        class_mask: ``BoolTensor[T, C_max]`` (False for padding classes).
        encoding: the drift network's task encoding (None for direct transfer).
        sizes: support images per task.
        times: per task, the integration time of its state (1.0 unless stopping='auto' or the domain gate chose an
            earlier point; None for direct transfer).
        domain_distances: per task, the support's distance to the training domains
            (:mod:`hf_hyperflow.domain_reference`); None without a domain reference.
    """

    state: TaskState | None
    prototypes: torch.Tensor
    class_mask: torch.Tensor
    encoding: TaskEncoding | None
    sizes: list[int]
    times: list[float] | None = None
    domain_distances: list[float] | None = None


def _padded_prototypes(features: torch.Tensor, labels: torch.Tensor, sizes: list[int],
                       num_classes: list[int]) -> torch.Tensor:
    """``Tensor[T, C_max, D]``: each task's class prototypes, zero rows for the classes it does not have."""
    c_max = max(num_classes)
    return torch.stack([
        nn.functional.pad(class_prototypes(f, y, c), (0, 0, 0, c_max - c))
        for f, y, c in zip(features.split(sizes), labels.split(sizes), num_classes, strict=True)
    ])


def _joined(parts: list[tuple]) -> tuple:
    """``(features, prefix, prefix output)`` passes over consecutive images joined into one."""
    kept = None if parts[0][1] is None else cat_leaves([output for _, _, output in parts])
    return torch.cat([features for features, _, _ in parts]), parts[0][1], kept


class HyperFlowAdapter:
    """A HyperFlow drift network on a Hugging Face vision backbone.

    Args:
        backbone: an ``AutoModel`` vision backbone (its layers get pass-through HyperFlow wrappers, as PEFT
            does; its outputs do not change outside a task-delta block).
        config: a :class:`HyperFlowConfig` (default: lora + shift + head, Euler, 10 steps).
        image_processor: turns PIL images into pixel_values; default: the backbone's own, or a
            ViT image processor at ``config.image_size``.

    Attributes:
        images_per_pass, images_per_late_pass: images per forward pass over a support set in the backbone's
            early, high-resolution blocks and in its later blocks (direct transfer's and adaptation's passes); None:
            :func:`hf_hyperflow.backbones.images_per_pass` for the device (all at once on an accelerator).
    """

    def __init__(self, backbone: nn.Module | PeftModel, config: HyperFlowConfig | None = None, image_processor=None,
                 *, adapter_name: str = "default"):
        if isinstance(backbone, PeftModel):
            if not isinstance(backbone.base_model, HyperFlowModel):
                raise TypeError("The PeftModel given does not carry a HyperFlow adapter.")
            self.model = backbone
        else:
            model_type_of(backbone)
            check_no_adapter(backbone, "a new HyperFlow adapter")
            config = copy.deepcopy(config) if config is not None else HyperFlowConfig()
            if not isinstance(config, HyperFlowConfig):
                raise TypeError(f"config must be a HyperFlowConfig, got {type(config).__name__}.")
            with peft_wrapping():
                self.model = get_peft_model(backbone, config, adapter_name=adapter_name)
        self.model.eval()
        self.image_processor = image_processor or default_image_processor(self.backbone, self.config.image_size)
        self.name_or_path: str | None = None
        self.revision: str | None = None
        self.images_per_pass: int | None = None
        self.images_per_late_pass: int | None = None
        self.domain_reference: DomainReference | None = None

    def unload(self) -> nn.Module:
        """Take the HyperFlow layers out of the backbone and return it as it was before (PEFT's ``unload``), e.g. to
        load another adapter onto it; this adapter and the tasks it adapted cannot be used afterwards."""
        return self.model.unload()

    # -- parts -------------------------------------------------------------------------------------
    @property
    def tuner(self) -> HyperFlowModel:
        return self.model.base_model

    @property
    def backbone(self) -> nn.Module:
        """The backbone (with pass-through HyperFlow layers)."""
        return self.model.base_model.model

    @property
    def config(self) -> HyperFlowConfig:
        return self.model.peft_config[self.model.active_adapter]

    @property
    def drift(self) -> DriftNet:
        return self.tuner.drift

    def _device_dtype(self):
        parameter = next(self.backbone.parameters())
        return parameter.device, parameter.dtype

    def pixel_values(self, images) -> torch.Tensor:
        """``Tensor[B, 3, H, W]`` on the backbone's device from PIL images or a pixel tensor."""
        device, dtype = self._device_dtype()
        return to_pixel_values(images, self.image_processor, device, dtype)

    def frozen_prefix(self) -> FrozenPrefix | None:
        """The blocks before the first adapted one (with ``first_adapted_block`` set), else None."""
        if self.config.first_adapted_block is None:
            return None
        if getattr(self, "_frozen_prefix", False) is False:
            self._frozen_prefix = FrozenPrefix.find(self.backbone)
        return self._frozen_prefix

    def task_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``Tensor[N, D]``: the features the drift network encodes tasks from: the frozen backbone at
        theta_0, without autograd (direct transfer needs them anyway)."""
        with torch.no_grad():
            return embed(self.backbone, pixel_values)

    def task_inputs(self, pixel_values: torch.Tensor, labels: torch.Tensor, sizes: list[int],
                    num_classes: list[int]) -> tuple[torch.Tensor, dict | None]:
        """What the drift network encodes T tasks from, in one pass of the frozen backbone at theta_0:
        ``(Tensor[N, D] features, module statistics or None)``; the statistics (``name -> Tensor[T, 3 C]``,
        see ``DriftNet.module_statistics``) only when the drift network reads them."""
        if not self.drift.statistics_size:
            return self.task_features(pixel_values), None
        with self.tuner.input_moments(pixel_values.shape[0]) as moments:
            features = self.task_features(pixel_values)
        return features, self.drift.module_statistics(moments, labels, sizes, num_classes)

    # -- adaptation --------------------------------------------------------------------------------
    def adapt(self, support_images, support_labels, classes: Sequence | None = None, *,
              steps: int | str | None = None, integrator: str | None = None,
              stopping: str | None = None) -> AdaptedTask:
        """Adapt to one task from its support set, by integrating the drift network (no autograd).

        Args:
            support_images: a list of PIL images or a pixel_values tensor ``[S, 3, H, W]``.
            support_labels: S labels, ints or strings.
            classes: optional list of the task's classes (their order sets the order of the logits).
            steps, integrator: override the config's number of steps and integrator; ``steps="auto"``
                integrates the config's steps and keeps, per task, the point of the path whose support set
                classifies itself best (leave-one-out; t=0 is direct transfer): see ``task.integration_time``.
            stopping: ``"fixed"`` (integrate to t=1) or ``"auto"`` (as ``steps="auto"``), replacing the config's
                stopping rule; None keeps it.

        With a domain reference (:attr:`domain_reference`, saved with the adapter) and the config's ``domain_gate``,
        a support set farther than the gate from every training source keeps direct transfer whatever the steps and
        stopping (``task.integration_time == 0.0``; ``task.domain_distance`` says how far it lay).
        """
        return self.adapt_many([(support_images, support_labels, classes)], steps=steps, integrator=integrator,
                               stopping=stopping)[0]

    @torch.no_grad()
    def adapt_many(self, tasks: Sequence[tuple], *, steps: int | str | None = None, integrator: str | None = None,
                   stopping: str | None = None, tasks_per_batch: int | None = None) -> list[AdaptedTask]:
        """Adapt several tasks in batches. ``tasks``: ``(support_images, support_labels)`` or
        ``(support_images, support_labels, classes)`` tuples; ``steps`` and ``stopping`` as in :meth:`adapt`. Returns one
        AdaptedTask per task, equal to what ``adapt`` returns for it (up to float rounding).

        Args:
            tasks_per_batch: tasks adapted together (default ``CPU_TASKS_PER_BATCH`` or
                ``ACCELERATOR_TASKS_PER_BATCH``): the per-image work is the same either way, so larger batches only
                save per-task overhead, while the features they hold take memory in proportion.
        """
        if not tasks:
            raise ValueError("adapt_many needs at least one task.")
        steps, stopping = _steps_and_stopping(steps, stopping)
        for k, task in enumerate(tasks):  # every task's inputs checked before any is adapted
            _check_task(task, k, len(tasks))
        chunk = tasks_per_batch or (CPU_TASKS_PER_BATCH if self._device_dtype()[0].type == "cpu"
                                    else ACCELERATOR_TASKS_PER_BATCH)
        adapted = []
        for start in range(0, len(tasks), chunk):
            supports = [self._support(*task) for task in tasks[start : start + chunk]]
            sizes = [len(labels) for _, labels, _ in supports]
            batch = self.adapt_batch(torch.cat([p for p, _, _ in supports]), torch.cat([y for _, y, _ in supports]),
                                     sizes, [len(names) for _, _, names in supports], steps=steps,
                                     integrator=integrator, stopping=stopping)
            adapted += [self._task(batch, i, names) for i, (_, _, names) in enumerate(supports)]
        return adapted

    @torch.no_grad()
    def direct_transfer(self, support_images, support_labels, classes: Sequence | None = None) -> AdaptedTask:
        """The unadapted baseline: prototypes of the frozen backbone's features (theta_0, no head delta)."""
        pixel_values, labels, names = self._support(support_images, support_labels, classes)
        batch = self.transfer_batch(pixel_values, labels, [len(labels)], [len(names)])
        return self._task(batch, 0, names)

    def adapt_batch(self, pixel_values: torch.Tensor, labels: torch.Tensor, sizes: list[int], num_classes: list[int],
                    *, steps: int | None = None, integrator: str | None = None, stopping: str | None = None,
                    task_features: torch.Tensor | None = None, module_statistics: dict | None = None) -> TaskBatch:
        """Integrate the drift for T tasks at once; differentiable w.r.t. the drift network when grad is on.

        Args:
            pixel_values: ``Tensor[N, 3, H, W]``, the support images of all tasks, task after task.
            labels: ``LongTensor[N]``, labels within each task.
            sizes: support images per task; num_classes: classes per task.
            stopping: ``"fixed"`` or ``"auto"`` (default: the config's; see :mod:`hf_hyperflow.stopping`).
            task_features, module_statistics: precomputed ``task_inputs(...)``, if at hand; then the caller owns the
                passes' context (e.g. meta-training's cached prefix) and an adapted pass takes all images at once.
                Without them the first pass is :meth:`frozen_features` and the adapted passes reuse its frozen
                prefix's output, a few tasks at a time on a CPU.
        """
        drift = self.drift
        steps = steps if steps is not None else self.config.steps
        prefix = prefix_output = None
        own_passes = task_features is None
        if own_passes:  # the first pass; the adapted ones reuse its frozen prefix's output
            with record_function("hyperflow.frozen_pass"):
                task_features, module_statistics, prefix, prefix_output = self._first_pass(
                    pixel_values, labels, sizes, num_classes)
        with record_function("hyperflow.task_encoding"):
            encoding = drift.encode_tasks(task_features, labels, sizes, num_classes, module_statistics)
        distances, outside = self._domain_distances(module_statistics)
        if outside is not None and bool(outside.all()):  # no task is integrated: direct transfer, no adapted pass
            return self._batch(drift.initial_state(encoding), encoding, task_features, labels, sizes, num_classes,
                               [0.0] * len(sizes), distances)
        # Where the rule can judge no task, it would keep the end of the path for every one: no other points to pass.
        auto = (stopping or self.config.stopping) == "auto" and any_task_judged(labels, sizes)
        points = candidate_steps(steps, self.config.stopping_points) if auto else None
        with record_function("hyperflow.drift"):
            path = drift.integrate(encoding, steps, method=integrator or self.config.integrator, return_path=auto,
                                   path_steps=points)

        adapts = bool(set(self.config.groups) & {"lora", "shift"})
        gated = outside.tolist() if outside is not None and bool(outside.any()) else None

        def support_features(states: list[TaskState]) -> list[torch.Tensor]:
            """The support at the given points of the path (after t = 0), all in one pass; tasks beyond the gate
            keep their frozen features without one, where this call runs its own passes."""
            with record_function("hyperflow.adapted_pass"):
                if gated is None or not own_passes:
                    return self._adapted_features(pixel_values, states, sizes, prefix, prefix_output, own_passes)
                return self._adapted_features_of_some(pixel_values, states, sizes, prefix, prefix_output,
                                                      task_features, [not out for out in gated])

        if auto:
            later = support_features(path[1:]) if adapts else [task_features] * (len(path) - 1)
            candidates = list(zip(path, [task_features, *later], strict=True))
            chosen = self._choose_points(candidates, labels, sizes, num_classes)
            times = [points[k] / steps for k in chosen]
            state = TaskState.cat([candidates[k][0].select(i) for i, k in enumerate(chosen)])
            features = torch.cat([candidates[k][1].split(sizes)[i] for i, k in enumerate(chosen)])
        else:
            state, times = path, [1.0] * len(sizes)
            features = support_features([state])[0] if adapts else task_features
        if gated is not None:  # those tasks keep theta_0: direct transfer
            start = drift.initial_state(encoding)
            state = TaskState.cat([(start if out else state).select(i) for i, out in enumerate(gated)])
            features = torch.cat([(task_features if out else features).split(sizes)[i] for i, out in enumerate(gated)])
            times = [0.0 if out else time for out, time in zip(gated, times, strict=True)]
        return self._batch(state, encoding, features, labels, sizes, num_classes, times, distances)

    def _domain_distances(self, module_statistics: dict | None) -> tuple[list[float] | None, torch.Tensor | None]:
        """``(distances, outside)``: per task, the support's distance to the training domains (None without a domain
        reference) and ``BoolTensor[T]``, whether it lies beyond the config's ``domain_gate`` (None: no gate)."""
        if self.domain_reference is None or module_statistics is None:
            return None, None
        vectors = statistics_vector(module_statistics, self.drift.modules_order)
        distances = self.domain_reference.distance(vectors)
        gate = self.config.domain_gate
        return distances.tolist(), (distances > gate if gate is not None else None)

    def _batch(self, state: TaskState, encoding: TaskEncoding, features: torch.Tensor, labels: torch.Tensor,
               sizes: list[int], num_classes: list[int], times: list[float],
               distances: list[float] | None) -> TaskBatch:
        """The TaskBatch of adapted states and their support ``features`` ``Tensor[N, D]`` (prototypes plus the head
        delta)."""
        with record_function("hyperflow.head"):
            prototypes = _padded_prototypes(features, labels, sizes, num_classes)
            if "head" in self.config.groups:
                prototypes = prototypes + state[HEAD_KEY]
        return TaskBatch(state=state, prototypes=prototypes, class_mask=encoding.class_mask, encoding=encoding,
                         sizes=list(sizes), times=times, domain_distances=distances)

    def _choose_points(self, candidates: list[tuple[TaskState, torch.Tensor]], labels: torch.Tensor,
                       sizes: list[int], num_classes: list[int]) -> list[int]:
        """Per task, the index of the candidate ``(state, support features)`` whose support set classifies itself
        best (leave-one-out); the last candidate where no class of the task has two images to judge by."""
        drift = self.drift
        chosen = []
        for i, (y, c) in enumerate(zip(labels.split(sizes), num_classes, strict=True)):
            losses = []
            for state, features in candidates:
                head = state[HEAD_KEY][i, :c] if HEAD_KEY in state else None
                losses.append(leave_one_out_loss(features.split(sizes)[i], y, c, head, drift.logit_scale,
                                                 drift.logit_bias))
            chosen.append(len(candidates) - 1 if losses[0] is None else choose_point(losses))
        return chosen

    def transfer_batch(self, pixel_values: torch.Tensor, labels: torch.Tensor, sizes: list[int],
                       num_classes: list[int], *, task_features: torch.Tensor | None = None) -> TaskBatch:
        """Direct transfer of T tasks (the arguments of :meth:`adapt_batch`): prototypes of the frozen features,
        no delta (``state`` None)."""
        features = task_features if task_features is not None else self.frozen_features(pixel_values)[0]
        counts = torch.tensor(num_classes, device=features.device)
        class_mask = torch.arange(max(num_classes), device=features.device)[None] < counts[:, None]
        return TaskBatch(state=None, prototypes=_padded_prototypes(features, labels, sizes, num_classes),
                         class_mask=class_mask, encoding=None, sizes=list(sizes))

    def query_logits(self, batch: TaskBatch, pixel_values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Logits of T tasks' query images: one ``Tensor[Q_i, C_i]`` per task (differentiable)."""
        if batch.state is None:
            features = embed(self.backbone, pixel_values)
        else:
            with self.tuner.task_deltas(batch.state, sizes):
                features = embed(self.backbone, pixel_values)
        out = []
        for i, f in enumerate(features.split(sizes)):
            c = int(batch.class_mask[i].sum())
            out.append(self.drift.logits(f, batch.prototypes[i, :c]))
        return out

    def _support(self, images, labels, classes: Sequence | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """``(pixel_values [S, 3, H, W], labels LongTensor[S] on their device, the task's C classes)``."""
        check_images(images)
        encoded, names = encode_labels(labels, classes)
        check_pair(images, encoded)
        pixel_values = self.pixel_values(images)
        return pixel_values, encoded.to(pixel_values.device), names

    def _first_pass(self, pixel_values: torch.Tensor, labels: torch.Tensor, sizes: list[int], num_classes: list[int]):
        """``(features, module statistics or None, frozen prefix, its output)`` of the first pass over T tasks'
        support (:meth:`frozen_features`, its passes bounded on a CPU); module statistics from the input moments
        recorded on the way."""
        if not self.drift.statistics_size:
            features, prefix, output = self.frozen_features(pixel_values, keep_prefix=True)
            return features, None, prefix, output
        plan = self._pass_plan(pixel_values, keep_prefix=True)  # any probe runs outside the recorded passes
        with self.tuner.input_moments(pixel_values.shape[0]) as moments:
            features, prefix, output = self._frozen_passes(pixel_values, *plan)
        return features, self.drift.module_statistics(moments, labels, sizes, num_classes), prefix, output

    @torch.no_grad()
    def frozen_features(self, pixel_values: torch.Tensor, keep_prefix: bool = False):
        """The first pass over a support set: ``(features Tensor[N, D] of the frozen backbone at theta_0, frozen
        prefix, its output)``, without autograd.

        On a CPU (see :func:`hf_hyperflow.backbones.images_per_pass`) the backbone's later blocks take
        ``images_per_late_pass`` images at a time and, within those, its early, high-resolution blocks
        (:meth:`FrozenPrefix.early`) ``images_per_pass``: activations stay in cache and peak memory at a few
        images' worth. With ``keep_prefix`` and a cacheable frozen prefix (``first_adapted_block``), the prefix's
        output is kept on the way for the adapted pass; else the last two are None.
        """
        return self._frozen_passes(pixel_values, *self._pass_plan(pixel_values, keep_prefix))

    def _pass_plan(self, pixel_values: torch.Tensor, keep_prefix: bool) -> tuple:
        """``(frozen prefix or None, images per pass or None, images per late pass or None, early blocks or None)``
        for :meth:`frozen_features` on images of this shape; probing the block sizes of a new shape runs one image
        through the backbone."""
        prefix = self.frozen_prefix() if keep_prefix else None
        side, device = pixel_values.shape[-1], pixel_values.device
        per_pass = self.images_per_pass or default_images_per_pass(side, device, support_size=pixel_values.shape[0])
        per_late_pass = self.images_per_late_pass or default_images_per_pass(side, device, late=True)
        if per_pass is None or pixel_values.shape[0] <= per_pass:
            return prefix, None, None, None
        return prefix, per_pass, per_late_pass, self._early_blocks(pixel_values, prefix)

    @torch.no_grad()
    def _frozen_passes(self, pixel_values: torch.Tensor, prefix: FrozenPrefix | None, per_pass: int | None,
                       per_late_pass: int | None, early: FrozenPrefix | None):
        """:meth:`frozen_features` by the plan of :meth:`_pass_plan`."""
        if per_pass is None:
            return self._whole_pass(pixel_values, prefix)
        if early is None:  # block outputs of one size (a ViT): every block a few images at a time
            return _joined([self._whole_pass(chunk, prefix) for chunk in pixel_values.split(per_pass)])
        parts = []
        for images in pixel_values.split(max(per_pass, per_late_pass or 0)):
            try:
                early_output = cat_leaves([early.compute(chunk) for chunk in images.split(per_pass)])
            except Uncacheable:
                parts.append(self._whole_pass(images, prefix))
                continue
            with early.replaced(early_output, images.shape[0]):
                parts.append(self._whole_pass(images, prefix))
        return _joined(parts)

    def _adapted_features(self, pixel_values: torch.Tensor, states: list[TaskState], sizes: list[int],
                          prefix: FrozenPrefix | None, prefix_output, in_groups: bool) -> list[torch.Tensor]:
        """``[Tensor[N, D]]``, one per state of ``states`` (e.g. points of a path): the support through the backbone
        with every task's delta, the frozen prefix skipped (its output reused). The states' passes run together,
        as more tasks of one batched pass. ``in_groups``: whole tasks at a time, at most ``images_per_late_pass``
        images (of one state) per pass where that is set (at least one task), as the first pass's later blocks ran.
        Without ``in_groups`` the caller's context holds the frozen prefix's output for these N images only, so
        each state has a pass of its own."""
        if not in_groups:
            return [self._joint_pass(pixel_values, [state], sizes, prefix, prefix_output)[0] for state in states]
        per_pass = self.images_per_late_pass or default_images_per_pass(pixel_values.shape[-1], pixel_values.device,
                                                                        late=True)
        if per_pass is None:
            return self._joint_pass(pixel_values, states, sizes, prefix, prefix_output)
        features, first, start = [], 0, 0
        while first < len(sizes):
            last = first + 1
            while last < len(sizes) and sum(sizes[first : last + 1]) <= per_pass:
                last += 1
            stop = start + sum(sizes[first:last])
            kept = None if prefix_output is None else image_range(prefix_output, start, stop, pixel_values.shape[0])
            features.append(self._joint_pass(pixel_values[start:stop], [s.select(slice(first, last)) for s in states],
                                             sizes[first:last], prefix, kept))
            first, start = last, stop
        return [torch.cat(parts) for parts in zip(*features, strict=True)]

    def _adapted_features_of_some(self, pixel_values: torch.Tensor, states: list[TaskState], sizes: list[int],
                                  prefix: FrozenPrefix | None, prefix_output, frozen: torch.Tensor,
                                  passed: list[bool]) -> list[torch.Tensor]:
        """:meth:`_adapted_features` (in groups) of the tasks where ``passed`` is True; the others' rows are their
        ``frozen`` features (``Tensor[N, D]``), with no pass."""
        kept = [i for i, keep in enumerate(passed) if keep]
        starts = [0, *itertools.accumulate(sizes)]
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in kept]).to(pixel_values.device)
        kept_output = None if prefix_output is None else select_images(prefix_output, rows, pixel_values.shape[0])
        kept_sizes = [sizes[i] for i in kept]
        adapted = self._adapted_features(pixel_values.index_select(0, rows), [s.select(kept) for s in states],
                                         kept_sizes, prefix, kept_output, True)
        frozen_parts = frozen.split(sizes)
        results = []
        for features in adapted:
            kept_parts = iter(features.split(kept_sizes))
            results.append(torch.cat([next(kept_parts) if keep else part
                                      for keep, part in zip(passed, frozen_parts, strict=True)]))
        return results

    def _joint_pass(self, pixel_values: torch.Tensor, states: list[TaskState], sizes: list[int],
                    prefix: FrozenPrefix | None, prefix_output) -> list[torch.Tensor]:
        """One pass of the same images (``Tensor[N, 3, H, W]``, tasks of ``sizes``) with each of ``states``:
        ``[Tensor[N, D]]`` per state."""
        count = len(states)
        images = pixel_values if count == 1 else pixel_values.repeat(count, 1, 1, 1)
        kept = prefix_output if count == 1 or prefix_output is None else cat_leaves([prefix_output] * count)
        state = states[0] if count == 1 else TaskState.cat(states)
        with self.tuner.task_deltas(state, sizes * count), skip_prefix(prefix, kept, images.shape[0]):
            return list(embed(self.backbone, images).chunk(count))

    def _whole_pass(self, pixel_values: torch.Tensor, prefix: FrozenPrefix | None):
        """``(features, prefix, its output)`` of one forward pass; the last two None without a cacheable prefix."""
        if prefix is not None:
            try:
                features, output = prefix.embed_and_keep(pixel_values)
                return features, prefix, output
            except Uncacheable:
                pass
        return embed(self.backbone, pixel_values), None, None

    def _early_blocks(self, pixel_values: torch.Tensor, prefix: FrozenPrefix | None) -> FrozenPrefix | None:
        """:meth:`FrozenPrefix.early` for this image shape (block sizes probed once), ending no later than
        ``prefix``; kept per shape."""
        shape, until = tuple(pixel_values.shape[1:]), prefix.blocks[-1][0] if prefix is not None else None
        sizes, found = self.__dict__.setdefault("_block_sizes", {}), self.__dict__.setdefault("_early", {})
        if shape not in sizes:
            sizes[shape] = block_output_sizes(self.backbone, pixel_values[:1])
        if (shape, until) not in found:
            found[shape, until] = FrozenPrefix.early(self.backbone, sizes[shape], until)
        return found[shape, until]

    def _task(self, batch: TaskBatch, index: int, classes: list) -> AdaptedTask:
        """Task ``index`` of a batch as an AdaptedTask (an exportable HyperFlow state unless direct transfer)."""
        drift = self.drift
        prototypes = batch.prototypes[index, : len(classes)]
        if not bool(torch.isfinite(prototypes).all()):
            raise RuntimeError(
                f"The prototypes of task {index} are not finite: the backbone's features or the integrated adapter state "
                f"overflowed ({'direct transfer' if batch.state is None else 'HyperFlow'}, {prototypes.dtype}). Run the "
                "backbone in float32, or integrate fewer steps."
            )
        scale, bias = drift.logit_scale.detach().clone(), drift.logit_bias.detach().clone()
        if batch.state is None:
            return AdaptedTask(HyperFlowEmbedder(self.tuner, None), prototypes, scale, bias, classes,
                               self.image_processor)
        state = batch.state.select(index)
        source = {"source_adapter": self.name_or_path, "source_adapter_revision": self.revision,
                  "support_size": batch.sizes[index], "base_model": self._base_model_name(),
                  "integration_time": batch.times[index] if batch.times is not None else None,
                  "domain_distance": batch.domain_distances[index] if batch.domain_distances is not None else None}
        return AdaptedTask(HyperFlowEmbedder(self.tuner, state), prototypes, scale, bias, classes,
                           self.image_processor, state=state, tuner=self.tuner, config=self.config, source=source)

    # -- persistence -------------------------------------------------------------------------------
    def _base_model_name(self) -> str:
        return (getattr(self.backbone.config, "_name_or_path", None) or self.config.base_model_name_or_path
                or self.config.backbone_model_type)

    def model_card(self, repo_id: str, *, results: dict | None = None, training_config: dict | None = None,
                   training_datasets: Sequence[str] = (), plot_path: str | None = None):
        """The adapter's model card (``huggingface_hub.ModelCard``), from ``model_cards/adapter_card.md``.

        Args:
            results: an evaluation ``results.json`` object (its accuracies go into the model-index metadata).
            training_config / training_datasets: how the drift network was trained.
            plot_path: repo-relative path of an accuracy-vs-latency image.
        """
        config = self.config
        parameters = sum(p.numel() for p in self.drift.parameters())
        return render_adapter_card(AdapterCardData(
            repo_id=card_repo_id(repo_id),
            base_model=self._base_model_name(),
            base_model_revision=config.backbone_fingerprint,
            backbone_model_type=config.backbone_model_type,
            feature_size=config.feature_size,
            groups=list(config.groups),
            target_modules=[n for n, layer in self.tuner.hyperflow_layers() if "lora" in layer.roles] or None,
            lora_rank=config.r,
            lora_alpha=float(config.lora_alpha),
            integrator=config.integrator,
            steps=config.steps,
            stopping=config.stopping,
            stopping_points=config.stopping_points,
            domain_gate=config.domain_gate if self.domain_reference is not None else None,
            domain_sources=self.domain_reference.sources if self.domain_reference is not None else [],
            drift_parameters=parameters,
            drift_bytes=sum(t.numel() * t.element_size() for t in self.drift.state_dict().values()),
            training_config=dict(training_config or {}),
            training_datasets=list(training_datasets),
            results=results,
            plot_path=plot_path,
        ))

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None,
                        results: dict | None = None, training_config: dict | None = None,
                        training_datasets: Sequence[str] = ()) -> None:
        """Write ``adapter_config.json`` (the HyperFlowConfig), ``adapter_model.safetensors`` (drift network and
        theta_0), ``domain_reference.safetensors`` (when the adapter has one: :attr:`domain_reference`), the image
        processor's ``preprocessor_config.json`` and the model card ``README.md``
        (``repo_id`` names the model in it, default the folder's name; with ``results`` an accuracy-vs-latency
        plot is drawn next to it)."""
        directory = Path(save_directory)
        self.model.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))
        add_checksum(directory / SAFETENSORS_WEIGHTS_NAME,
                     sidecars={directory / CONFIG_NAME: FREE_FIELDS, directory / PROCESSOR_FILE: ()})
        if self.domain_reference is not None:
            self.domain_reference.save(directory / DOMAIN_REFERENCE_FILE)
        plot_path = None
        if results is not None:
            save_results_plot(results, directory / "accuracy_vs_latency.png")
            plot_path = "accuracy_vs_latency.png"
        card = self.model_card(repo_id or directory.resolve().name, results=results, training_config=training_config,
                               training_datasets=training_datasets, plot_path=plot_path)
        card.save(str(directory / "README.md"))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, create_pr: bool = False,
                    results: dict | None = None, training_config: dict | None = None,
                    training_datasets: Sequence[str] = ()):
        """Push config, drift network (safetensors), image processor and model card to the Hub.

        Returns the ``huggingface_hub.CommitInfo`` (its ``oid`` is the revision ``from_pretrained`` can load).
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, results=results, training_config=training_config,
                                 training_datasets=training_datasets)
            commit = push_folder_to_hub(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                                        commit_message=commit_message or "Upload HyperFlow adapter", token=token)
        # Tasks adapted from now on record the pushed adapter as their source.
        self.name_or_path, self.revision = repo_id, commit.oid
        return commit

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, pretrained: str | os.PathLike, *, revision: str | None = None,
                        strict_backbone: bool = True, token: str | None = None) -> HyperFlowAdapter:
        """Load an adapter saved by :meth:`save_pretrained` (a folder or a Hub id) onto ``backbone``.

        Everything is checked before the backbone is touched: the config's fields (all that set what the adapter
        computes must be there), the backbone (model_type and weights' fingerprint), the weights' checksum; the
        weights must then fit the config exactly, else the backbone is left as it was.

        Args:
            strict_backbone: if True, a backbone whose weights differ from the ones the adapter was made for
                (content fingerprint) is an error; if False, a warning.

        Raises:
            FileNotFoundError / ValueError / TypeError: missing, corrupt, truncated or damaged files, fields missing
                or of the wrong type (each naming the file and what to do); an adapter for another backbone.
        """
        folder = resolve_pretrained_folder(pretrained, revision=revision, token=token,
                                           required_files=(CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PROCESSOR_FILE))
        config = _saved_config(folder / CONFIG_NAME)
        processor = load_image_processor(folder)
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        config.inference_mode = True
        # the files first (an edited fingerprint is an edited file), then the backbone they were made for
        tensors = load_safetensors_checked(weights, sidecars=(folder / CONFIG_NAME, folder / PROCESSOR_FILE))
        check_backbone(backbone, config.backbone_model_type, config.backbone_fingerprint, strict_backbone,
                       "HyperFlow adapter")
        model = attach_adapter_checked(backbone, config, tensors, weights)
        model.base_model.drift.requires_grad_(False)
        adapter = cls(model, image_processor=processor)
        adapter.domain_reference = DomainReference.load_if_present(folder, config.backbone_fingerprint)
        if config.domain_gate is not None and adapter.domain_reference is None:
            warnings.warn(f"{pretrained} sets domain_gate={config.domain_gate} but holds no {DOMAIN_REFERENCE_FILE}: "
                          "every task is integrated. Fit one with recipes/domain_reference.py.", stacklevel=2)
        adapter.name_or_path = str(pretrained)
        adapter.revision = revision or _snapshot_revision(folder)
        return adapter


def _saved_config(path: Path) -> HyperFlowConfig:
    """The HyperFlowConfig saved at ``path``, every field present and of the right type."""
    raw = read_json_checked(path)
    if raw.get("peft_type") != "HYPERFLOW":
        raise ValueError(f"{path} has peft_type={raw.get('peft_type')!r}, not 'HYPERFLOW': the folder does not hold a "
                         "HyperFlow adapter (a plain LoRA adapter loads with PeftModel.from_pretrained), or the file "
                         "was edited or damaged: save the adapter again.")
    check_saved_fields(raw, str(path))
    try:
        return HyperFlowConfig(**raw)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{path}: {error} Correct the file, or save the adapter again.") from None


def _steps_and_stopping(steps: int | str | None, stopping: str | None = None) -> tuple[int | None, str | None]:
    """``adapt``'s ``steps`` and ``stopping`` arguments as ``(steps, stopping)``: ``steps="auto"`` means the
    config's steps with stopping="auto"; otherwise ``stopping`` (None: the config's rule)."""
    if stopping not in (None, "fixed", "auto"):
        raise ValueError(f"stopping must be 'fixed', 'auto' or None (the config's), got {stopping!r}.")
    if steps == "auto":
        if stopping == "fixed":
            raise ValueError("steps='auto' chooses where to stop; it cannot be combined with stopping='fixed'.")
        return None, "auto"
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, 'auto' or None (the config's), got {steps!r}.")
    return steps, stopping


def _check_task(task, index: int, count: int) -> None:
    """One task of ``adapt_many``: ``(images, labels)`` or ``(images, labels, classes)`` whose labels encode and whose
    images pass :func:`~hf_hyperflow.inputs.check_images`; errors name the task."""
    if not isinstance(task, (tuple, list)) or len(task) not in (2, 3):
        raise TypeError(f"Task {index} of {count} must be a tuple (support_images, support_labels[, classes]), got "
                        f"{type(task).__name__}.")
    try:
        check_images(task[0])
        encoded, _ = encode_labels(task[1], task[2] if len(task) == 3 else None)
        check_pair(task[0], encoded)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Task {index} of {count}: {error}" if count > 1 else str(error)) from None


def _snapshot_revision(folder: Path) -> str | None:
    """The commit id of a Hub cache snapshot folder (``.../snapshots/<commit>``), else None."""
    return folder.name if folder.parent.name == "snapshots" and len(folder.name) == 40 else None
