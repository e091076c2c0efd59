"""Gradient fine-tuning of one few-shot task, as P>M>F does it at test time (Hu et al., CVPR 2022).

Per task: start from theta_0, run ``steps`` Adam steps (betas 0.9 / 0.999, no weight decay, constant lr; or
plain gradient steps with ``optimizer="sgd"``).
Every step recomputes the class prototypes from the clean support images with the current weights (plus
the head delta), turns the support set into a pseudo-query batch with DiffAugment (each image augmented
with probability 0.9, from a seeded generator) and minimises the cross-entropy of the cosine prototype
classifier ``scale * (cos(f, p_c) + bias)`` against the support labels.

What is optimised (``groups``):

- any mix of the adapter's state groups ``"lora"``, ``"shift"``, ``"head"``: a :class:`TaskState` of one
  task is optimised directly through the tuner's task-delta layers, so fine-tuning and HyperFlow share
  one parametrisation and a fine-tuning trajectory is a path in the drift network's state space; groups
  not chosen stay at theta_0;
- ``("full",)``: every backbone parameter. The backbone itself is never written to: the optimised
  parameters are copies run through ``torch.func.functional_call``, and the adapted task keeps them;
- ``("blocks",)``: every parameter of the adapted blocks (those from the config's ``first_adapted_block``
  on, plus the layers after the last block), the same way; the frozen prefix is cached as for state groups.

The backbone runs in eval mode (BatchNorm uses its running statistics and does not update them, dropout
is off), so every image's features depend on that image and the weights only.

Frozen-prefix cache: when the HyperFlow layers live only in the later blocks of the backbone (the config's
``first_adapted_block``), the blocks before them do not change during fine-tuning. Their output for the
clean support images is then computed once per task without autograd, and at every step those blocks are
replaced by modules that return it (the embedding stem still runs); with ``augment_pool=N`` the
pseudo-queries are drawn image by image from N augmented copies of the support made once per task, so
their prefix output is cached too. The result is the same as without the cache up to float rounding.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import HyperFlowAdapter
from .augment import diff_augment
from .backbones import embed
from .checks import check_int, check_number
from .config import ADAPTED_GROUPS
from .heads import class_prototypes, prototype_logits
from .prefix import FrozenPrefix, Uncacheable, cat_leaves, select_images, skip_prefix
from .state import HEAD_KEY, TaskState, parse_state_key
from .task import AdaptedTask, HyperFlowEmbedder

__all__ = [
    "DEFAULT_LR_GRID",
    "FINETUNE_GROUPS",
    "FineTuneResult",
    "finetune",
    "initial_state",
    "query_accuracy",
    "select_lr",
]

WEIGHT_GROUPS: tuple[str, ...] = ("full", "blocks")
FINETUNE_GROUPS: tuple[str, ...] = (*ADAPTED_GROUPS, *WEIGHT_GROUPS)
DEFAULT_LR_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


@dataclass
class FineTuneResult:
    """What :func:`finetune` returns.

    Attributes:
        task: the adapted task (prototypes from the fine-tuned features of the clean support, plus the head
            delta), ready for ``predict`` / ``logits``. For the state groups it carries the final state and
            exports like a HyperFlow task; for ``"full"`` it embeds with its own copy of the fine-tuned
            backbone parameters (the backbone object is unchanged) and has no state to export.
        trajectory: ``TaskState`` with ``steps + 1`` snapshots theta_0 .. theta_K on the task axis (every
            entry of the adapter's state, chosen groups or not), when ``record_trajectory`` was set; else None.
        losses: the support cross-entropy at theta_0 .. theta_{K-1} (the loss each step descended); empty when
            ``lr == 0`` (nothing moves, no step is run).
        seconds: wall-clock time of the whole fine-tuning, caches and final prototypes included.
        lr, steps, groups: the settings used.
        prefix_cached: whether the frozen-prefix cache was used.
        optimizer: ``"adam"`` or ``"sgd"``.
    """

    task: AdaptedTask
    trajectory: TaskState | None
    losses: list[float]
    seconds: float
    lr: float
    steps: int
    groups: tuple[str, ...]
    prefix_cached: bool = False
    optimizer: str = "adam"


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def check_groups(adapter: HyperFlowAdapter, groups) -> tuple[str, ...]:
    if isinstance(groups, str):
        groups = (groups,)
    if not isinstance(groups, Iterable):
        raise TypeError(f"groups must be a tuple of group names from {list(FINETUNE_GROUPS)}, got {groups!r}.")
    groups = tuple(groups)
    unknown = [g for g in groups if g not in FINETUNE_GROUPS]
    if not groups or unknown:
        raise ValueError(f"groups={groups!r} is not valid: pass a non-empty mix of {list(ADAPTED_GROUPS)}, or "
                         f"('full',) for the whole backbone, or ('blocks',) for every weight of the adapted blocks.")
    if len(set(groups)) != len(groups):
        raise ValueError(f"groups={groups!r} lists a group twice.")
    weights = [g for g in groups if g in WEIGHT_GROUPS]
    if weights and len(groups) > 1:
        raise ValueError(f"groups={groups!r}: {weights[0]!r} fine-tunes backbone weights and cannot be mixed with "
                         f"other groups; pass ({weights[0]!r},) alone.")
    if groups == ("blocks",) and adapter.config.first_adapted_block is None:
        raise ValueError("groups=('blocks',) fine-tunes the adapted blocks, but this adapter adapts every block "
                         "(first_adapted_block=None): use ('full',), or an adapter with first_adapted_block set.")
    missing = [g for g in groups if g not in WEIGHT_GROUPS and g not in adapter.config.groups]
    if missing:
        raise ValueError(f"groups {missing} are not part of this adapter's state (its config has groups="
                         f"{adapter.config.groups}); create the adapter with HyperFlowConfig(groups=[...]) including "
                         f"them.")
    return groups


def _check_support(pixel_values, labels) -> int:
    """Validate the support set; returns the number of classes C."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"support_pixel_values must be a float tensor [S, 3, H, W], got {type(pixel_values).__name__}"
                        f"; turn PIL images into one with adapter.pixel_values(images).")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"support_pixel_values must have shape [S, 3, H, W], got {tuple(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise TypeError(f"support_pixel_values must be floating point, got {pixel_values.dtype}.")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.long:
        raise TypeError("support_labels must be a LongTensor [S] of class indices 0..C-1"
                        + (f", got {labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                           else f", got {type(labels).__name__}") + ".")
    if labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"Got {pixel_values.shape[0]} support images but {labels.shape[0]} labels: give one label "
                         f"per image.")
    if labels.numel() == 0:
        raise ValueError("The support set is empty: a task needs labelled support images.")
    if int(labels.min()) < 0:
        raise ValueError(f"support_labels must be 0..C-1, got {int(labels.min())}.")
    num_classes = int(labels.max()) + 1
    present = torch.bincount(labels.cpu(), minlength=num_classes)
    empty = (present == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"support_labels must cover 0..C-1, but class(es) {empty[:10]} have no support image.")
    if num_classes < 2:
        raise ValueError("A task needs at least two classes, got one.")
    return num_classes


# ------------------------------------------------------------------------------------------------
# theta_0
# ------------------------------------------------------------------------------------------------
def initial_state(adapter: HyperFlowAdapter, num_classes: int) -> TaskState:
    """theta_0 of one task: every entry of the adapter's state with a task axis of 1.

    LoRA A factors are the adapter's fixed random A_0, LoRA B and shifts are zero, and (when the adapter
    has the head group) ``"head.prototypes:"`` is a zero ``Tensor[1, C, D]``.
    """
    check_int(num_classes, "num_classes", 1)
    drift = adapter.drift
    device, dtype = adapter._device_dtype()
    tensors = {}
    for entry in drift.entries:
        if entry.group == "lora" and entry.param == "A":
            tensors[entry.key] = drift.theta0(entry.key).to(device=device, dtype=dtype)[None].clone()
        else:
            tensors[entry.key] = torch.zeros(1, *entry.shape, device=device, dtype=dtype)
    if "head" in adapter.config.groups:
        tensors[HEAD_KEY] = torch.zeros(1, num_classes, adapter.config.feature_size, device=device, dtype=dtype)
    return TaskState(tensors)


def _check_state(adapter: HyperFlowAdapter, state: TaskState, num_classes: int) -> TaskState:
    reference = initial_state(adapter, num_classes)
    if not isinstance(state, TaskState):
        raise TypeError(f"initial_state must be a TaskState, got {type(state).__name__}.")
    if state.num_tasks != 1:
        raise ValueError(f"initial_state must hold one task (task axis 1), got {state.num_tasks}.")
    if set(state) != set(reference):
        differing = sorted(set(state) ^ set(reference))
        raise ValueError(f"initial_state does not have this adapter's entries; differing keys: {differing[:5]}. "
                         f"Start from hf_hyperflow.finetune.initial_state(adapter, num_classes).")
    for key, value in reference.items():
        if state[key].shape != value.shape:
            raise ValueError(f"initial_state[{key!r}] has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(value.shape)}.")
    return TaskState({k: state[k].detach().to(reference[k]).clone() for k in reference})


# ------------------------------------------------------------------------------------------------
# Full-backbone fine-tuning
# ------------------------------------------------------------------------------------------------
class _EmbedModule(nn.Module):
    """``embed(backbone, pixel_values)`` as a module, so that torch.func.functional_call can swap weights."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, pixel_values)


class _FunctionalEmbedder:
    """Features of the backbone with the given parameters in place of its own (the backbone is not changed).

    ``parameters``: ``name -> tensor`` with the backbone's parameter names.
    """

    def __init__(self, backbone: nn.Module, parameters: dict[str, torch.Tensor]):
        self.module = _EmbedModule(backbone)
        self.parameters = {f"backbone.{k}": v for k, v in parameters.items()}

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.module, self.parameters, (pixel_values,))


def _adapted_block_parameters(backbone: nn.Module) -> list[str]:
    """Names of the parameters after the frozen prefix: the adapted blocks and the layers after the last block."""
    prefix = FrozenPrefix.find(backbone)
    if prefix is None:
        raise ValueError("groups=('blocks',) needs a frozen prefix: set HyperFlowConfig(first_adapted_block=...).")
    module_names = [name for name, _ in backbone.named_modules()]
    last_frozen = prefix.blocks[-1][0]
    end = max(i for i, name in enumerate(module_names) if name == last_frozen or name.startswith(last_frozen + "."))
    after = set(module_names[end + 1:])
    return [name for name, _ in backbone.named_parameters() if name.rpartition(".")[0] in after]


# ------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------
def _support_loss(query_features, support_features, labels, num_classes, head, scale, bias):
    prototypes = class_prototypes(support_features, labels, num_classes)
    if head is not None:
        prototypes = prototypes + head
    return F.cross_entropy(prototype_logits(query_features, prototypes, scale, bias), labels)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def finetune(
    adapter: HyperFlowAdapter,
    support_pixel_values: torch.Tensor,
    support_labels: torch.Tensor,
    *,
    groups: Sequence[str] = ("lora", "shift", "head"),
    steps: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
    augment_probability: float = 0.9,
    record_trajectory: bool = False,
    augment_pool: int | None = None,
    prefix_cache: bool | None = None,
    initial: TaskState | None = None,
    classes: Sequence | None = None,
    optimizer: str = "adam",
) -> FineTuneResult:
    """Fine-tune one task by gradient descent (the P>M>F protocol; see the module docstring).

    Args:
        adapter: the HyperFlowAdapter whose backbone, state parametrisation, theta_0 and classifier scale /
            bias are used (the drift network is not).
        support_pixel_values: ``Tensor[S, 3, H, W]`` on the backbone's device.
        support_labels: ``LongTensor[S]`` in ``0..C-1``, every class present.
        groups: what is optimised: a mix of the adapter's ``"lora"``, ``"shift"``, ``"head"``, or ``("full",)``.
        steps: K, the number of optimizer steps.
        lr: the constant learning rate; 0 runs no step (theta stays theta_0).
        optimizer: ``"adam"`` (the P>M>F protocol's steps: the first moves every entry by about ``lr`` in the
            direction of its gradient's sign) or ``"sgd"`` (plain steps ``theta -= lr * gradient``, no momentum:
            ``steps=1`` is one step along the support loss's gradient at theta_0).
        seed: seed of the DiffAugment generator (and of the pool draws).
        augment_probability: chance that a pseudo-query image is augmented.
        record_trajectory: keep the snapshots theta_0 .. theta_K (state groups only).
        augment_pool: draw each step's pseudo-queries image by image from this many augmented copies of the
            support made once per task (their frozen-prefix output is then cached too); None: augment anew at
            every step.
        prefix_cache: use the frozen-prefix cache; None: whenever the backbone has blocks before its first
            HyperFlow layer (and the groups are not ``"full"``); True: require it.
        initial: the starting state (``TaskState`` of one task with every entry of
            :func:`initial_state`), e.g. theta_0 plus noise; default theta_0.
        classes: the task's class names, in label order (default ``0..C-1``).

    Returns:
        A :class:`FineTuneResult`.

    Raises:
        TypeError / ValueError: bad inputs (shapes, labels, groups, numbers), before any work.
    """
    if not isinstance(adapter, HyperFlowAdapter):
        raise TypeError(f"adapter must be a HyperFlowAdapter, got {type(adapter).__name__}.")
    groups = check_groups(adapter, groups)
    num_classes = _check_support(support_pixel_values, support_labels)
    check_int(steps, "steps", 1)
    check_number(lr, "lr", 0.0)
    check_int(seed, "seed", 0)
    check_number(augment_probability, "augment_probability", 0.0, 1.0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}.")
    if augment_pool is not None:
        check_int(augment_pool, "augment_pool", 1)
    full = groups[0] in WEIGHT_GROUPS
    if full and record_trajectory:
        raise ValueError("record_trajectory needs state groups (lora / shift / head); a full-backbone trajectory is "
                         "not a path in the adapter's state space.")
    if full and initial is not None:
        raise ValueError("initial applies to the state groups; full-backbone fine-tuning starts from the backbone.")
    if groups == ("full",) and prefix_cache:
        raise ValueError("prefix_cache=True is not possible with groups=('full',): every block is trained.")
    if classes is not None:
        classes = list(classes)
        if len(classes) != num_classes:
            raise ValueError(f"classes has {len(classes)} names but the labels have {num_classes} classes.")
    else:
        classes = list(range(num_classes))
    device, dtype = adapter._device_dtype()
    if support_pixel_values.device != device:
        raise ValueError(f"support_pixel_values is on {support_pixel_values.device} but the backbone is on {device}: "
                         f"move it with .to({str(device)!r}).")
    state0 = _check_state(adapter, initial, num_classes) if initial is not None else (
        None if full else initial_state(adapter, num_classes))

    backbone = adapter.backbone
    with _eval_mode(backbone):
        return _run(adapter, backbone, support_pixel_values.to(dtype), support_labels.to(device), num_classes, classes,
                    groups, steps, float(lr), seed, float(augment_probability), record_trajectory, augment_pool,
                    prefix_cache, state0, optimizer)


class _FineTuning:
    """One task's fine-tuning: what is optimised, the frozen prefix, pseudo-queries, the steps, the task at the end.

    The generator is seeded once; its draws come in a fixed order (the augmented pool, then each step's
    pseudo-queries), so that a seed gives the same run with the prefix cache or without.
    """

    def __init__(self, adapter, backbone, pixels, labels, num_classes, groups, seed, probability, augment_pool,
                 prefix_cache, state0):
        self.adapter, self.backbone, self.pixels, self.labels = adapter, backbone, pixels, labels
        self.num_classes, self.groups, self.probability = num_classes, groups, probability
        self.full = groups[0] in WEIGHT_GROUPS
        self.generator = torch.Generator().manual_seed(seed)
        self.scale = adapter.drift.logit_scale.detach()
        self.bias = adapter.drift.logit_bias.detach()
        self.trained_backbone = self.full or bool({"lora", "shift"} & set(groups))
        self.parameters, self.state, self.leaves = self._trainable(state0)
        self.prefix, self.clean_prefix = self._frozen_prefix(prefix_cache)
        self.pool, self.pool_prefix = self._augmented_pool(augment_pool)
        self.clean_features = None
        if not self.trained_backbone:  # the backbone is fixed: clean features once
            with torch.no_grad():
                self.clean_features = self.features(pixels, self.clean_prefix)

    def _trainable(self, state0):
        """``(parameters, state, leaves)``: copies of backbone weights ('full' / 'blocks') or the state of one
        task with the chosen groups requiring gradients."""
        backbone, groups = self.backbone, self.groups
        if self.full:
            names = (set(_adapted_block_parameters(backbone)) if groups == ("blocks",)
                     else {name for name, _ in backbone.named_parameters()})
            parameters = {name: p.detach().clone().requires_grad_(True) for name, p in backbone.named_parameters()
                          if name in names}
            self.functional = _FunctionalEmbedder(backbone, parameters)
            return parameters, None, list(parameters.values())
        chosen = set(groups)
        state = {k: (v.clone().requires_grad_(True) if parse_state_key(k)[0] in chosen else v)
                 for k, v in state0.items()}
        return None, state, [v for k, v in state.items() if parse_state_key(k)[0] in chosen]

    def _frozen_prefix(self, prefix_cache):
        """``(prefix, its output for the clean support)``, or ``(None, None)`` without a cacheable prefix."""
        if self.groups == ("full",) or prefix_cache is False:
            return None, None
        prefix = FrozenPrefix.find(self.backbone)
        if prefix is None:
            if prefix_cache:
                raise ValueError("prefix_cache=True, but this backbone has no block before its first HyperFlow layer; "
                                 "set HyperFlowConfig(first_adapted_block=...) to adapt only the last blocks.")
            return None, None
        try:
            return prefix, prefix.compute(self.pixels)
        except Uncacheable as error:
            if prefix_cache:
                raise ValueError(f"prefix_cache=True, but the frozen prefix cannot be cached: {error}.") from None
            return None, None

    def _augmented_pool(self, augment_pool):
        """``augment_pool`` augmented copies of the support ``Tensor[N * S, 3, H, W]`` and their prefix output."""
        if augment_pool is None:
            return None, None
        pool = torch.cat([diff_augment(self.pixels, self.generator, self.probability) for _ in range(augment_pool)])
        if self.prefix is None:
            return pool, None
        return pool, cat_leaves([self.prefix.compute(copy) for copy in pool.split(self.pixels.shape[0])])

    def features(self, batch: torch.Tensor, cached) -> torch.Tensor:
        """``Tensor[B, D]`` with the current weights; ``cached``: the batch's frozen-prefix output or None."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(skip_prefix(self.prefix, cached, batch.shape[0]))
            if self.full:
                return self.functional(batch)
            # Entries at theta_0 outside the chosen groups add exactly zero: leave them out of the forward pass.
            delta = TaskState({k: v for k, v in self.state.items()
                               if k != HEAD_KEY and parse_state_key(k)[0] in self.groups})
            if len(delta):
                stack.enter_context(self.adapter.tuner.task_deltas(delta, [batch.shape[0]]))
            return embed(self.backbone, batch)

    def pseudo_queries(self):
        """This step's pseudo-query images ``Tensor[S, 3, H, W]`` and their frozen-prefix output (or None)."""
        support_size = self.pixels.shape[0]
        if self.pool is None:
            pseudo = diff_augment(self.pixels, self.generator, self.probability)
            return pseudo, self.prefix.compute(pseudo) if self.prefix is not None else None
        copies = self.pool.shape[0] // support_size
        rows = torch.randint(copies, (support_size,), generator=self.generator) * support_size + torch.arange(support_size)
        pseudo = self.pool.index_select(0, rows.to(self.pool.device))
        return pseudo, (select_images(self.pool_prefix, rows, self.pool.shape[0])
                        if self.pool_prefix is not None else None)

    def loss(self) -> torch.Tensor:
        """The support cross-entropy of this step's pseudo-queries against the support's prototypes."""
        support_size = self.pixels.shape[0]
        pseudo, pseudo_prefix = self.pseudo_queries()
        if self.trained_backbone:
            cached = cat_leaves([self.clean_prefix, pseudo_prefix]) if self.prefix is not None else None
            both = self.features(torch.cat([self.pixels, pseudo]), cached)
            support_features, query_features = both[:support_size], both[support_size:]
        else:
            with torch.no_grad():
                query_features = self.features(pseudo, pseudo_prefix)
            support_features = self.clean_features
        head = self.state[HEAD_KEY][0] if self.state is not None and HEAD_KEY in self.state else None
        return _support_loss(query_features, support_features, self.labels, self.num_classes, head, self.scale,
                             self.bias)

    def snapshot(self) -> TaskState:
        return TaskState({k: v.detach().clone() for k, v in self.state.items()})

    @torch.no_grad()
    def task(self, classes: list) -> AdaptedTask:
        """The adapted task: prototypes from the final features of the clean support (plus the head delta)."""
        features = (self.clean_features if self.clean_features is not None
                    else self.features(self.pixels, self.clean_prefix))
        prototypes = class_prototypes(features, self.labels, self.num_classes)
        scale, bias, processor = self.scale.clone(), self.bias.clone(), self.adapter.image_processor
        if self.full:
            final = {k: v.detach() for k, v in self.parameters.items()}
            return AdaptedTask(_FunctionalEmbedder(self.backbone, final), prototypes, scale, bias, classes, processor)
        state = self.snapshot()
        if HEAD_KEY in state:
            prototypes = prototypes + state[HEAD_KEY][0]
        return AdaptedTask(HyperFlowEmbedder(self.adapter.tuner, state), prototypes, scale, bias, classes, processor,
                           state=state, tuner=self.adapter.tuner, config=self.adapter.config)


def _run(adapter, backbone, pixels, labels, num_classes, classes, groups, steps, lr, seed, probability,
         record_trajectory, augment_pool, prefix_cache, state0, optimizer) -> FineTuneResult:
    start = time.perf_counter()
    run = _FineTuning(adapter, backbone, pixels, labels, num_classes, groups, seed, probability, augment_pool,
                      prefix_cache, state0)
    snapshots = [run.snapshot()] if record_trajectory else []
    losses: list[float] = []
    torch_optimizer = _optimizer(optimizer, run.leaves, lr) if lr > 0 else None
    for _ in range(steps if lr > 0 else 0):
        loss = run.loss()
        torch_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch_optimizer.step()
        losses.append(float(loss.detach()))
        if record_trajectory:
            snapshots.append(run.snapshot())
    if record_trajectory and lr == 0:
        snapshots.extend(snapshots[:1] * steps)
    task = run.task(classes)
    trajectory = TaskState.cat(snapshots) if record_trajectory else None
    return FineTuneResult(task=task, trajectory=trajectory, losses=losses, seconds=time.perf_counter() - start, lr=lr,
                          steps=steps, groups=groups, prefix_cached=run.prefix is not None, optimizer=optimizer)


def _optimizer(name: str, leaves: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam as P>M>F runs it (betas 0.9 / 0.999, no weight decay) or plain SGD (no momentum, no weight decay)."""
    if name == "sgd":
        return torch.optim.SGD(leaves, lr=lr, momentum=0.0, weight_decay=0.0)
    return torch.optim.Adam(leaves, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)


# ------------------------------------------------------------------------------------------------
# Evaluation and lr selection
# ------------------------------------------------------------------------------------------------
def query_accuracy(task: AdaptedTask, query_pixel_values: torch.Tensor, query_labels: torch.Tensor) -> float:
    """Fraction of the query images (``Tensor[Q, 3, H, W]``, labels ``LongTensor[Q]``) the task classifies right."""
    if query_labels.dim() != 1 or query_labels.shape[0] != query_pixel_values.shape[0]:
        raise ValueError(f"Got {query_pixel_values.shape[0]} query images but labels of shape "
                         f"{tuple(query_labels.shape)}: give one label per image.")
    predictions = task.logits(query_pixel_values).argmax(-1)
    return float((predictions.cpu() == query_labels.cpu()).float().mean())


def select_lr(
    adapter: HyperFlowAdapter,
    episodes: Sequence,
    *,
    groups: Sequence[str] = ("lora", "shift", "head"),
    grid: Sequence[float] = DEFAULT_LR_GRID,
    steps: int = 50,
    seed: int = 0,
    **finetune_kwargs,
) -> tuple[float, dict[float, float]]:
    """Choose the learning rate of a domain from validation episodes (P>M>F: 5 episodes, grid {0, 1e-4, 1e-3, 1e-2}).

    Args:
        adapter: the adapter to fine-tune with.
        episodes: objects with ``support_images``, ``support_labels``, ``query_images``, ``query_labels``
            (images: PIL lists or pixel tensors; e.g. :class:`hf_hyperflow.episodes.Episode`).
        groups, steps: as in :func:`finetune`; episode ``j`` is fine-tuned with seed ``seed + j``.
        grid: the learning rates to try.
        finetune_kwargs: further keyword arguments of :func:`finetune`.

    Returns:
        ``(best_lr, table)``: ``table[lr]`` is the mean query accuracy over the episodes; the best is the
        highest, ties going to the lr listed first in ``grid``.
    """
    episodes = list(episodes)
    if not episodes:
        raise ValueError("select_lr needs at least one validation episode.")
    grid = list(grid)
    if not grid:
        raise ValueError("grid must list at least one learning rate.")
    for lr in grid:
        check_number(lr, "every lr of the grid", 0.0)
    for name in ("support_images", "support_labels", "query_images", "query_labels"):
        if any(not hasattr(e, name) for e in episodes):
            raise TypeError(f"every episode needs a {name!r} attribute (e.g. hf_hyperflow.episodes.Episode).")
    check_groups(adapter, groups)
    device = adapter._device_dtype()[0]
    prepared = [(adapter.pixel_values(e.support_images), torch.as_tensor(e.support_labels).to(device),
                 adapter.pixel_values(e.query_images), torch.as_tensor(e.query_labels)) for e in episodes]
    table: dict[float, float] = {}
    for lr in grid:
        accuracies = []
        for j, (support, labels, query, query_labels) in enumerate(prepared):
            result = finetune(adapter, support, labels, groups=groups, steps=steps, lr=lr, seed=seed + j,
                              **finetune_kwargs)
            accuracies.append(query_accuracy(result.task, query, query_labels))
        table[float(lr)] = sum(accuracies) / len(accuracies)
    best = max(table, key=lambda lr: (table[lr], -grid.index(lr)))
    return best, table
