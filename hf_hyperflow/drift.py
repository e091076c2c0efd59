"""DriftNet h_phi(theta, t | S): predicts d theta / dt of fine-tuning from the support set S.

Task encoding (once per task): support features at theta_0 -> class prototypes -> a shared MLP per
prototype -> mean and max pooling over classes (plus log ways and log shots) -> task embedding z.

Drift of a module's state (LoRA factors and / or shifts of one module): a shared trunk MLP over
[z, time embedding, learned module embedding, projection of the module's current state, and optionally a
projection of the statistics of the module's input over the support set at theta_0] down to R features,
followed by the module's own linear output map ``[numel, R]``. The input statistics (per channel: the
mean, the log variance and the spread of the class means relative to the spread of all inputs) tell the
drift how this task's data looks at the module itself, not only through the final features. Output projections start at zero, so an untrained drift network is
the identity map on theta_0 (direct transfer).

Drift of the head (a shift of every class prototype): a shared MLP over [prototype, z, time embedding,
current shift of that prototype], applied to each class: equivariant to the order of the classes.

Integration (:meth:`DriftNet.integrate`) runs in the coordinates of those output maps: the drift reads the
state only through linear maps (``state_in``, the head's first layer), and a sum of drifts is a sum of hidden
vectors through the output maps, so each evaluation works on ``[T, M, R]`` and ``[T, C, H]`` tensors and the
state is formed once, at the end (:class:`FlowCoordinates`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .heads import class_prototypes, prototype_logits
from .integrators import integrate
from .state import HEAD_KEY, StateEntry, TaskState

__all__ = ["DriftNet", "FlowCoordinates", "TaskEncoding", "time_embedding"]


def time_embedding(t: torch.Tensor, size: int) -> torch.Tensor:
    """Sinusoidal embedding of times ``t: Tensor[T]`` in [0, 1] -> ``Tensor[T, size]`` (size even)."""
    half = size // 2
    frequencies = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * (-math.log(1000.0) / max(half - 1, 1)))
    angles = t[:, None] * 1000.0 * frequencies[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


@dataclass
class TaskEncoding:
    """What the drift network knows of T tasks.

    Attributes:
        embedding: ``Tensor[T, H]``, the task embedding z.
        prototypes: ``Tensor[T, C, D]`` class prototypes at theta_0 (zeros for padded classes).
        class_mask: ``BoolTensor[T, C]``, False for padding when tasks have different numbers of classes.
        module_statistics: ``Tensor[T, M, P]``, the projected input statistics of the M modules (None when the
            drift network does not use them).
    """

    embedding: torch.Tensor
    prototypes: torch.Tensor
    class_mask: torch.Tensor
    module_statistics: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.embedding.shape[0]


def input_statistics(mean: torch.Tensor, mean_square: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     eps: float = 1e-5, segments: list[int] | None = None) -> torch.Tensor:
    """Per-channel statistics of one module's input over one task's support images.

    Args:
        mean, mean_square: ``Tensor[S, C]``, per image the mean of the input and of its square over the
            positions / tokens of each channel.
        labels: ``LongTensor[S]``, in ``0..num_classes-1``.
        segments: channel counts summing to C when the C channels are several modules' inputs side by side,
            each standardised on its own (as separate calls would); None: one module.

    Returns:
        ``Tensor[3 * C]``: the standardised channel means, the standardised log variances, and the standard
        deviation of the class means over the classes divided by the channel's standard deviation.
    """
    mean, mean_square = mean.float(), mean_square.float()
    channel_mean = mean.mean(0)
    variance = (mean_square.mean(0) - channel_mean.pow(2)).clamp_min(0) + eps
    class_means = class_prototypes(mean, labels, num_classes)  # [C_classes, C]
    spread = (class_means - class_means.mean(0)).pow(2).mean(0).sqrt() / variance.sqrt()  # std over classes
    segments = segments or [mean.shape[1]]
    return torch.cat([_standardise(channel_mean, segments, eps), _standardise(variance.log(), segments, eps), spread])


def _standardise(values: torch.Tensor, segments: list[int], eps: float) -> torch.Tensor:
    """``Tensor[C]`` shifted and scaled to mean 0 and standard deviation 1 within each segment of entries."""
    if len(segments) == 1:
        return (values - values.mean()) / (values.std(unbiased=False) + eps)
    counts = torch.tensor(segments, device=values.device)
    segment = torch.repeat_interleave(torch.arange(len(segments), device=values.device), counts)  # [C]
    sums = torch.zeros(len(segments), dtype=values.dtype, device=values.device)
    means = sums.index_add(0, segment, values) / counts
    centred = values - means[segment]
    deviations = (sums.index_add(0, segment, centred.pow(2)) / counts).sqrt()
    return centred / (deviations[segment] + eps)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class DriftNet(nn.Module):
    """The drift network, plus theta_0 (the fixed random LoRA A factors) and the classifier's scale / bias.

    Args:
        entries: the state entries of the lora / shift groups (shapes without the task axis), in module order.
        feature_size: D, the size of the backbone's pooled features.
        groups: adapted-state groups (``"head"`` adds the per-class prototype shift).
        hidden_size, time_embedding_size, module_embedding_size, state_projection_size: sizes.
        output_rank: R, the size of the trunk's output; each module's drift is its own linear map of it
            (``[numel, R]``), which keeps the network small for wide backbones.
        init_seed: seed of the LoRA A factors of theta_0.
        module_channels: input channels of each module (in module order), needed when
            ``statistics_size > 0``.
        statistics_size: P, the size of each module's projection of its input statistics (0: not used).
    """

    def __init__(
        self,
        entries: list[StateEntry],
        feature_size: int,
        groups: list[str],
        hidden_size: int = 128,
        time_embedding_size: int = 16,
        module_embedding_size: int = 16,
        state_projection_size: int = 16,
        output_rank: int = 16,
        init_seed: int = 0,
        module_channels: dict[str, int] | None = None,
        statistics_size: int = 0,
    ):
        super().__init__()
        self.entries = list(entries)
        self._entry_index = {e.key: i for i, e in enumerate(self.entries)}
        self.feature_size = feature_size
        self.groups = list(groups)
        self.time_embedding_size = time_embedding_size
        hidden = hidden_size
        # Modules in order, each with the slice of its entries in its flat state vector.
        self.modules_order: list[str] = []
        self.module_entries: dict[str, list[StateEntry]] = {}
        for entry in self.entries:
            if entry.module not in self.module_entries:
                self.modules_order.append(entry.module)
                self.module_entries[entry.module] = []
            self.module_entries[entry.module].append(entry)

        self.prototype_encoder = _mlp([feature_size, hidden, hidden])
        self.task_projection = _mlp([2 * hidden + 2, hidden, hidden])
        num_modules = len(self.modules_order)
        self.statistics_size = statistics_size if num_modules else 0
        if self.statistics_size:
            missing = [m for m in self.modules_order if not (module_channels or {}).get(m)]
            if missing:
                raise ValueError(f"statistics_size > 0 needs the input channels of every module; missing {missing[:3]}.")
            self.statistics_in = nn.ModuleList(
                nn.Linear(3 * module_channels[m], self.statistics_size) for m in self.modules_order)
        if num_modules:
            self.module_embedding = nn.Parameter(torch.randn(num_modules, module_embedding_size) * 0.02)
            self.state_in = nn.ParameterList()
            self.state_out_weight = nn.ParameterList()
            self.state_out_bias = nn.ParameterList()
            for module in self.modules_order:
                numel = sum(e.numel for e in self.module_entries[module])
                self.state_in.append(nn.Parameter(torch.randn(state_projection_size, numel) / math.sqrt(numel)))
                self.state_out_weight.append(nn.Parameter(torch.zeros(numel, output_rank)))
                self.state_out_bias.append(nn.Parameter(torch.zeros(numel)))
            self.trunk = _mlp([hidden + time_embedding_size + module_embedding_size + state_projection_size
                               + self.statistics_size, hidden, hidden, output_rank])
        if "head" in self.groups:
            self.head_net = _mlp([2 * feature_size + hidden + time_embedding_size, hidden, hidden, feature_size])
            nn.init.zeros_(self.head_net[-1].weight)
            nn.init.zeros_(self.head_net[-1].bias)
        # Cosine prototype classifier (P>M>F): logits = scale * (cos + bias).
        self.logit_scale = nn.Parameter(torch.tensor(10.0))
        self.logit_bias = nn.Parameter(torch.tensor(0.0))
        # theta_0: LoRA A factors drawn like PEFT's default (Kaiming uniform, a = sqrt(5)), fixed per adapter.
        generator = torch.Generator().manual_seed(init_seed)
        for i, entry in enumerate(self.entries):
            if entry.group == "lora" and entry.param == "A":
                fan_in = entry.numel // entry.shape[0]
                bound = 1.0 / math.sqrt(fan_in)
                a0 = (torch.rand(entry.shape, generator=generator) * 2 - 1) * bound
                self.register_buffer(f"theta0_{i}", a0)

    # ----------------------------------------------------------------------------------------------
    def encode_tasks(self, features: torch.Tensor, labels: torch.Tensor, sizes: list[int],
                     num_classes: list[int], module_statistics: dict | None = None) -> TaskEncoding:
        """Encode T tasks from their support features at theta_0.

        Args:
            features: ``Tensor[N, D]``, the support features of all tasks, task after task.
            labels: ``LongTensor[N]``, labels within each task (``0..num_classes[i]-1``).
            sizes: images per task (sums to N); num_classes: classes per task.
            module_statistics: ``module name -> Tensor[T, 3 * C_m]`` from :meth:`module_statistics`; needed
                when the network reads input statistics (``statistics_size > 0``).
        """
        c_max = max(num_classes)
        prototypes, masks, shots = [], [], []
        for f, y, c in zip(features.split(sizes), labels.split(sizes), num_classes, strict=True):
            p = class_prototypes(f, y, c)
            prototypes.append(F.pad(p, (0, 0, 0, c_max - c)))
            masks.append(torch.arange(c_max, device=features.device) < c)
            shots.append(len(y) / c)
        prototypes = torch.stack(prototypes)
        mask = torch.stack(masks)
        encoded = self.prototype_encoder(F.normalize(prototypes, dim=-1))  # [T, C, H]
        weights = mask[..., None].to(encoded.dtype)
        mean = (encoded * weights).sum(1) / weights.sum(1)
        maximum = encoded.masked_fill(~mask[..., None], float("-inf")).amax(1)
        stats = torch.tensor([[math.log(c), math.log(s)] for c, s in zip(num_classes, shots, strict=True)],
                             dtype=encoded.dtype, device=encoded.device)
        embedding = self.task_projection(torch.cat([mean, maximum, stats], dim=1))
        projected = self._project_statistics(module_statistics) if self.statistics_size else None
        return TaskEncoding(embedding=embedding, prototypes=prototypes, class_mask=mask,
                            module_statistics=projected)

    def module_statistics(self, module_moments: dict, labels: torch.Tensor, sizes: list[int],
                          num_classes: list[int]) -> dict[str, torch.Tensor]:
        """Per task, the statistics of each module's input over its support images (:func:`input_statistics`).

        Args:
            module_moments: ``module name -> (mean, mean_square)``, each ``Tensor[N, C_m]``: per support image
                the moments of the module's input at theta_0 (``HyperFlowModel.input_moments``).
            labels, sizes, num_classes: as in :meth:`encode_tasks`.

        Returns:
            ``module name -> Tensor[T, 3 * C_m]``.
        """
        missing = [m for m in self.modules_order if m not in (module_moments or {})]
        if missing:
            raise ValueError(f"No input moments were captured for the modules {missing[:3]}: run the support set "
                             f"through the backbone inside HyperFlowModel.input_moments().")
        channels = [module_moments[m][0].shape[1] for m in self.modules_order]
        mean, mean_square = (torch.cat([module_moments[m][j].float() for m in self.modules_order], 1) for j in (0, 1))
        per_task = torch.stack([input_statistics(a, b, y, c, segments=channels) for a, b, y, c in zip(
            mean.split(sizes), mean_square.split(sizes), labels.split(sizes), num_classes, strict=True)])
        parts = per_task.reshape(len(sizes), 3, -1).split(channels, dim=2)  # [T, 3, C_m] each
        return {m: part.reshape(len(sizes), -1) for m, part in zip(self.modules_order, parts, strict=True)}

    def _project_statistics(self, module_statistics: dict | None) -> torch.Tensor:
        """``Tensor[T, M, P]``: each module's statistics through its own projection."""
        missing = [m for m in self.modules_order if m not in (module_statistics or {})]
        if missing:
            raise ValueError(f"This drift network reads the input statistics of its modules, but none were given for "
                             f"{missing[:3]}: pass module_statistics (DriftNet.module_statistics of the moments "
                             f"captured at theta_0).")
        return torch.stack([self.statistics_in[m](module_statistics[module].to(self.statistics_in[m].weight.dtype))
                            for m, module in enumerate(self.modules_order)], 1)

    def initial_state(self, encoding: TaskEncoding) -> TaskState:
        """theta_0 for the encoded tasks: LoRA A = the fixed A_0, LoRA B = 0, shifts 0, head shift 0."""
        t = encoding.num_tasks
        device, dtype = encoding.embedding.device, encoding.embedding.dtype
        tensors = {}
        for _i, entry in enumerate(self.entries):
            if entry.group == "lora" and entry.param == "A":
                a0 = self.theta0(entry.key).to(device=device, dtype=dtype)
                tensors[entry.key] = a0.expand(t, *a0.shape).clone()
            else:
                tensors[entry.key] = torch.zeros(t, *entry.shape, device=device, dtype=dtype)
        if "head" in self.groups:
            tensors[HEAD_KEY] = torch.zeros_like(encoding.prototypes)
        return TaskState(tensors)

    def forward(self, state: TaskState, t: float | torch.Tensor, encoding: TaskEncoding) -> TaskState:
        """The drift d theta / dt at ``state`` and time ``t`` (a float or ``Tensor[T]``): a TaskState."""
        t_emb = self._time_embedding(t, encoding)
        out: dict[str, torch.Tensor] = {}
        if self.modules_order:
            hidden = self._module_hidden(self.state_projections(state), t_emb, encoding)  # [T, M, R]
            out.update(self._module_outputs(hidden, None))
        if "head" in self.groups:
            inputs = self._head_inputs(state[HEAD_KEY], t_emb, encoding)
            out[HEAD_KEY] = self.head_net(inputs) * encoding.class_mask[..., None].to(inputs.dtype)
        return TaskState({k: out[k] for k in state})

    def integrate(self, encoding: TaskEncoding, steps: int, method: str = "euler", state0: TaskState | None = None,
                  t0: float = 0.0, t1: float = 1.0, return_path: bool = False,
                  path_steps: Sequence[int] | None = None) -> TaskState | list[TaskState]:
        """Integrate the drift from ``state0`` (default theta_0) with the named integrator.

        Equal, up to float rounding, to ``integrate(lambda s, t: self(s, t, encoding), state0, ...)``, but the
        integrator runs in the coordinates of the output maps (:class:`FlowCoordinates`): each evaluation costs the
        trunk and the head on small tensors, and the state is formed once at the end (once per returned state).
        Arguments and return value as in :func:`hf_hyperflow.integrators.integrate`; with ``return_path``,
        ``path_steps`` (indices in ``0..steps``) picks the points of the path returned (default: all).
        """
        at_theta0 = state0 is None
        state0 = self.initial_state(encoding) if at_theta0 else state0
        flow = _ReducedFlow(self, encoding, state0, at_theta0)
        path = integrate(flow, flow.start(), steps, method=method, t0=t0, t1=t1, return_path=return_path)
        if not return_path:
            return flow.state(path)
        path_steps = range(len(path)) if path_steps is None else path_steps
        if any(not 0 <= k <= steps for k in path_steps):
            raise ValueError(f"path_steps must lie in 0..{steps}, got {list(path_steps)}.")
        return [state0 if k == 0 else flow.state(path[k]) for k in path_steps]  # step 0 is state0 itself

    # -- pieces shared by forward() and the reduced flow ------------------------------------------
    def _time_embedding(self, t: float | torch.Tensor, encoding: TaskEncoding) -> torch.Tensor:
        """``Tensor[T, E]`` for a float time or per-task times ``Tensor[T]``."""
        z = encoding.embedding
        times = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(encoding.num_tasks)
        return time_embedding(times, self.time_embedding_size)

    def state_projections(self, state: TaskState) -> torch.Tensor:
        """``Tensor[T, M, P]``: every module's displacement from theta_0, projected by its ``state_in``."""
        projections = []
        for m, module in enumerate(self.modules_order):
            flat = torch.cat([self._from_theta0(state, e).reshape(state.num_tasks, -1)
                              for e in self.module_entries[module]], 1)
            projections.append(flat @ self.state_in[m].T)
        return torch.stack(projections, 1)

    def _module_hidden(self, projections: torch.Tensor, t_emb: torch.Tensor, encoding: TaskEncoding) -> torch.Tensor:
        """The trunk over [z, time, module embedding, state projection (, input statistics)] tokens:
        ``Tensor[T, M, R]``."""
        num_tasks, num_modules = projections.shape[:2]
        parts = [
            encoding.embedding[:, None].expand(-1, num_modules, -1),
            t_emb[:, None].expand(-1, num_modules, -1),
            self.module_embedding[None].expand(num_tasks, -1, -1),
            projections,
        ]
        if self.statistics_size:
            parts.append(encoding.module_statistics)
        return self.trunk(torch.cat(parts, dim=2))

    def _module_outputs(self, hidden: torch.Tensor, bias_weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every module's output map of ``hidden: [T, M, R]``, split into its state entries.

        ``bias_weight: Tensor[T]`` scales the output biases (None: 1), for sums of drifts (:class:`FlowCoordinates`).
        """
        num_tasks = hidden.shape[0]
        out = {}
        for m, module in enumerate(self.modules_order):
            if bias_weight is None:
                flat = F.linear(hidden[:, m], self.state_out_weight[m], self.state_out_bias[m])
            else:
                flat = torch.addcmul(F.linear(hidden[:, m], self.state_out_weight[m]), bias_weight[:, None],
                                     self.state_out_bias[m])
            offset = 0
            for e in self.module_entries[module]:
                out[e.key] = flat[:, offset : offset + e.numel].reshape(num_tasks, *e.shape)
                offset += e.numel
        return out

    def _head_inputs(self, shift: torch.Tensor, t_emb: torch.Tensor, encoding: TaskEncoding) -> torch.Tensor:
        """``Tensor[T, C, 2D + H + E]``: [normalised prototype, its current shift, z, time] per class."""
        prototypes = F.normalize(encoding.prototypes, dim=-1)
        c = prototypes.shape[1]
        return torch.cat([prototypes, shift, encoding.embedding[:, None].expand(-1, c, -1),
                          t_emb[:, None].expand(-1, c, -1)], dim=2)

    def theta0(self, key: str) -> torch.Tensor:
        """The fixed LoRA A factor of theta_0 for a ``lora.A`` state key (shape without the task axis)."""
        return getattr(self, f"theta0_{self._entry_index[key]}")

    def _from_theta0(self, state: TaskState, entry: StateEntry) -> torch.Tensor:
        """``state[entry] - theta_0[entry]``: ``Tensor[T, ...]``."""
        if entry.group == "lora" and entry.param == "A":
            return state[entry.key] - self.theta0(entry.key).to(state[entry.key])
        return state[entry.key]

    def logits(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Cosine prototype classifier: ``scale * (cos(f, p_c) + bias)``.

        Args:
            features: ``Tensor[..., Q, D]``; prototypes: ``Tensor[..., C, D]``.

        Returns:
            ``Tensor[..., Q, C]``.
        """
        return prototype_logits(features, prototypes, self.logit_scale, self.logit_bias)


@dataclass
class FlowCoordinates:
    """T tasks' state ``state0 + sum_j c_j drift_j`` in the coordinates of the drift network's output maps.

    A drift is, per module m, ``hidden_m @ W_m^T + b_m`` (``W_m = state_out_weight[m]``) and for the head
    ``(hidden @ W^T + b) * class_mask`` (the head network's last layer): a linear combination of drifts is the
    same combination of their hidden vectors, with the combination's coefficient sum on the biases. The
    integrators only add these and scale them by floats or per-task ``Tensor[T]``, as they do TaskStates.

    Attributes:
        modules: ``Tensor[T, M, R]`` (None without the lora and shift groups).
        head: ``Tensor[T, C, H]``, the head network's last hidden layer (None without the head group).
        bias_weight: ``Tensor[T]``, the sum of the coefficients.
    """

    modules: torch.Tensor | None
    head: torch.Tensor | None
    bias_weight: torch.Tensor

    def _parts(self) -> tuple:
        return self.modules, self.head, self.bias_weight

    def _zip(self, other: FlowCoordinates, fn) -> FlowCoordinates:
        return FlowCoordinates(*(None if a is None else fn(a, b) for a, b in zip(self._parts(), other._parts(),
                                                                                    strict=True)))

    def __add__(self, other: FlowCoordinates) -> FlowCoordinates:
        return self._zip(other, torch.add) if isinstance(other, FlowCoordinates) else NotImplemented

    def __sub__(self, other: FlowCoordinates) -> FlowCoordinates:
        return self._zip(other, torch.sub) if isinstance(other, FlowCoordinates) else NotImplemented

    def __mul__(self, factor: float | torch.Tensor) -> FlowCoordinates:
        """Scale by a float, or per task by a ``Tensor[T]``."""
        if isinstance(factor, torch.Tensor) and factor.dim() == 1:
            def scale(v):
                return v * factor.reshape(-1, *([1] * (v.dim() - 1))).to(v.dtype)
        elif isinstance(factor, (int, float)) or (isinstance(factor, torch.Tensor) and factor.dim() == 0):
            def scale(v):
                return v * factor
        else:
            return NotImplemented
        return FlowCoordinates(*(None if v is None else scale(v) for v in self._parts()))

    __rmul__ = __mul__


def _composed_maps(net: DriftNet) -> dict[str, torch.Tensor]:
    """Every output map composed with the input map that reads its output back: ``kernel [M, R, P]`` and
    ``offset [M, P]`` per module (``state_out^T @ state_in^T``, ``bias @ state_in^T``), ``head_kernel [H, H1]`` and
    ``head_offset [H1]`` for the head. Without autograd they are kept until a parameter changes (adaptation reads
    the drift network's weights once, not at every call)."""
    versions = tuple((p.data_ptr(), p._version) for p in net.parameters())
    kept = getattr(net, "_composed", None)
    if not torch.is_grad_enabled() and kept is not None and kept[0] == versions:
        return kept[1]
    maps = {}
    if net.modules_order:
        maps["kernel"] = torch.stack([w.T @ p.T for w, p in zip(net.state_out_weight, net.state_in, strict=True)])
        maps["offset"] = torch.stack([b @ p.T for b, p in zip(net.state_out_bias, net.state_in, strict=True)])
    if "head" in net.groups:
        first, last, d = net.head_net[0], net.head_net[-1], net.feature_size
        shift_in = first.weight[:, d : 2 * d]  # [H1, D]: the first layer's columns that read the shifts
        maps["head_kernel"], maps["head_offset"] = last.weight.T @ shift_in.T, last.bias @ shift_in.T
    net._composed = (versions, maps) if not torch.is_grad_enabled() else None
    return maps


class _ReducedFlow:
    """The drift of encoded tasks as a function of :class:`FlowCoordinates` (what the integrators call), and the
    TaskState a point stands for.

    The drift reads the state only through linear maps (each module's ``state_in``, the head network's first
    layer on the prototype shifts), so those maps of a point are the maps of ``state0`` plus the point's
    coordinates through ``output map^T @ input map^T`` (``[R, P]`` per module, ``[H, H1]`` for the head).
    """

    def __init__(self, net: DriftNet, encoding: TaskEncoding, state0: TaskState, at_theta0: bool):
        self.net, self.encoding, self.state0 = net, encoding, state0
        reference = encoding.embedding
        self.mask = encoding.class_mask[..., None].to(reference.dtype)  # [T, C, 1]
        maps = _composed_maps(net)
        if net.modules_order:
            self.kernel, self.offset = maps["kernel"], maps["offset"]  # [M, R, P], [M, P]
            self.projections0 = (reference.new_zeros(encoding.num_tasks, *self.offset.shape) if at_theta0
                                 else net.state_projections(state0))  # [T, M, P]: 0 at theta_0
        if "head" in net.groups:
            first = net.head_net[0]
            no_time = reference.new_zeros(encoding.num_tasks, net.time_embedding_size)
            inputs = net._head_inputs(state0[HEAD_KEY], no_time, encoding)
            self.head_constant = F.linear(inputs, first.weight, first.bias)  # [T, C, H1]
            self.head_time = first.weight[:, -net.time_embedding_size:]  # [H1, E]
            self.head_kernel, self.head_offset = maps["head_kernel"], maps["head_offset"]  # [H, H1], [H1]
            self.head_hidden = net.head_net[1:-1]

    def start(self) -> FlowCoordinates:
        """The point ``state0`` (all coordinates 0)."""
        net, reference, num_tasks = self.net, self.encoding.embedding, self.encoding.num_tasks
        modules = head = None
        if net.modules_order:
            modules = reference.new_zeros(num_tasks, len(net.modules_order), self.kernel.shape[1])
        if "head" in net.groups:
            head = reference.new_zeros(num_tasks, self.mask.shape[1], self.head_kernel.shape[0])
        return FlowCoordinates(modules, head, reference.new_zeros(num_tasks))

    def __call__(self, point: FlowCoordinates, t: float | torch.Tensor) -> FlowCoordinates:
        """The drift at ``point`` and time ``t``, as coordinates (hidden vectors, bias weight 1)."""
        net, encoding, weight = self.net, self.encoding, point.bias_weight[:, None, None]
        t_emb = net._time_embedding(t, encoding)
        modules = head = None
        if point.modules is not None:
            moved = torch.einsum("tmr,mrp->tmp", point.modules, self.kernel) + weight * self.offset
            modules = net._module_hidden(self.projections0 + moved, t_emb, encoding)
        if point.head is not None:
            shift = self.mask * torch.addcmul(point.head @ self.head_kernel, weight, self.head_offset)
            head = self.head_hidden(self.head_constant + (t_emb @ self.head_time.T)[:, None] + shift)
        return FlowCoordinates(modules, head, torch.ones_like(point.bias_weight))

    def state(self, point: FlowCoordinates) -> TaskState:
        """The TaskState ``point`` stands for."""
        moved = {}
        if point.modules is not None:
            moved.update(self.net._module_outputs(point.modules, point.bias_weight))
        if point.head is not None:
            last = self.net.head_net[-1]
            moved[HEAD_KEY] = self.mask * torch.addcmul(
                F.linear(point.head, last.weight), point.bias_weight[:, None, None], last.bias)
        return TaskState({k: v + moved[k] for k, v in self.state0.items()})
