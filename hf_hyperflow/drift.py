"""DriftNet h_phi(theta, t | S): predicts d theta / dt of fine-tuning from the support set S.

Task encoding (once per task): support features at theta_0 -> class prototypes -> a shared MLP per
prototype -> mean and max pooling over classes (plus log ways and log shots) -> task embedding z.

Drift of a module's state (LoRA factors and / or shifts of one module): a shared trunk MLP over
[z, time embedding, learned module embedding, projection of the module's current state] down to R
features, followed by the module's own linear output map ``[numel, R]``. Output projections start at zero, so an untrained drift network is
the identity map on theta_0 (direct transfer).

Drift of the head (a shift of every class prototype): a shared MLP over [prototype, z, time embedding,
current shift of that prototype], applied to each class: equivariant to the order of the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .heads import class_prototypes, prototype_logits
from .state import StateEntry, TaskState, state_key

__all__ = ["DriftNet", "TaskEncoding", "time_embedding"]


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
    """

    embedding: torch.Tensor
    prototypes: torch.Tensor
    class_mask: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.embedding.shape[0]


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
            self.trunk = _mlp([hidden + time_embedding_size + module_embedding_size + state_projection_size,
                               hidden, hidden, output_rank])
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
                     num_classes: list[int]) -> TaskEncoding:
        """Encode T tasks from their support features at theta_0.

        Args:
            features: ``Tensor[N, D]``, the support features of all tasks, task after task.
            labels: ``LongTensor[N]``, labels within each task (``0..num_classes[i]-1``).
            sizes: images per task (sums to N); num_classes: classes per task.
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
        return TaskEncoding(embedding=embedding, prototypes=prototypes, class_mask=mask)

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
            tensors[state_key("head", "prototypes")] = torch.zeros_like(encoding.prototypes)
        return TaskState(tensors)

    def forward(self, state: TaskState, t: float | torch.Tensor, encoding: TaskEncoding) -> TaskState:
        """The drift d theta / dt at ``state`` and time ``t`` (a float or ``Tensor[T]``): a TaskState."""
        num_tasks = encoding.num_tasks
        z = encoding.embedding
        times = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(num_tasks)
        t_emb = time_embedding(times, self.time_embedding_size)
        out: dict[str, torch.Tensor] = {}
        if self.modules_order:
            projections = []
            for m, module in enumerate(self.modules_order):
                # The module's displacement from theta_0 (LoRA A factors start at A_0, everything else at 0).
                flat = torch.cat([self._from_theta0(state, e).reshape(num_tasks, -1)
                                  for e in self.module_entries[module]], 1)
                projections.append(flat @ self.state_in[m].T)
            projections = torch.stack(projections, 1)  # [T, M, P]
            num_modules = len(self.modules_order)
            tokens = torch.cat([
                z[:, None].expand(-1, num_modules, -1),
                t_emb[:, None].expand(-1, num_modules, -1),
                self.module_embedding[None].expand(num_tasks, -1, -1),
                projections,
            ], dim=2)
            hidden = self.trunk(tokens)  # [T, M, R]
            for m, module in enumerate(self.modules_order):
                flat = hidden[:, m] @ self.state_out_weight[m].T + self.state_out_bias[m]
                offset = 0
                for e in self.module_entries[module]:
                    out[e.key] = flat[:, offset : offset + e.numel].reshape(num_tasks, *e.shape)
                    offset += e.numel
        if "head" in self.groups:
            key = state_key("head", "prototypes")
            prototypes = F.normalize(encoding.prototypes, dim=-1)
            c = prototypes.shape[1]
            inputs = torch.cat([
                prototypes, state[key], z[:, None].expand(-1, c, -1), t_emb[:, None].expand(-1, c, -1),
            ], dim=2)
            out[key] = self.head_net(inputs) * encoding.class_mask[..., None].to(z.dtype)
        return TaskState({k: out[k] for k in state})

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
