"""HyperFlowModel: the PEFT BaseTuner that injects per-task delta layers and owns the drift network."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..backbones import (
    SHIFTABLE_NORMS,
    backbone_fingerprint,
    default_image_size,
    model_type_of,
    probe_feature_size,
    resolve_adapted_modules,
)
from ..config import HyperFlowConfig
from ..drift import DriftNet
from ..state import StateEntry, TaskState, state_key
from .layer import HyperFlowConv2d, HyperFlowLayer, HyperFlowLinear, HyperFlowNorm

__all__ = ["HyperFlowModel", "channel_moments", "layer_state_entries", "peft_wrapping"]


def channel_moments(x: torch.Tensor, channels: int, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the mean of ``x`` and of ``x ** 2`` over everything but the channel axis.

    Args:
        x: a layer input with the channel axis at 1 (``[R, C, H, W]``) or last (``[R, ..., C]``), where the
            R rows are ``num_images`` images times rows per image (windows, when a model folds them in).
        channels: C.

    Returns:
        ``(mean, mean_square)``, each ``Tensor[num_images, C]`` in float32.
    """
    channels_first = x.dim() == 4 and x.shape[1] == channels
    if (not channels_first and x.shape[-1] != channels) or x.shape[0] % num_images:
        raise ValueError(f"Cannot read {channels} channels of {num_images} images from an input of shape "
                         f"{tuple(x.shape)}.")
    if channels_first:  # a product with 1/P over the contiguous positions: several times faster than mean()
        x = x.float().reshape(num_images, -1, channels, x.shape[2] * x.shape[3]).transpose(1, 2).flatten(2)
        weights = torch.full((x.shape[2],), 1.0 / x.shape[2], dtype=x.dtype, device=x.device)
        return x @ weights, x.pow(2) @ weights
    x = x.float().reshape(num_images, -1, channels)
    return x.mean(1), x.pow(2).mean(1)


def layer_state_entries(name: str, layer: HyperFlowLayer, rank: int) -> list[StateEntry]:
    """The state entries one layer reads (shapes without the task axis)."""
    base = layer.get_base_layer()
    entries = []
    if "lora" in layer.roles:
        if isinstance(base, nn.Conv2d):
            a_shape = (rank, base.in_channels, *base.kernel_size)
            out = base.out_channels
        else:
            a_shape = (rank, base.in_features)
            out = base.out_features
        entries.append(StateEntry(state_key("lora", "A", name), a_shape))
        entries.append(StateEntry(state_key("lora", "B", name), (out, rank)))
    if "shift" in layer.roles:
        if isinstance(layer, HyperFlowNorm):
            channels = base.weight.shape[0]
            entries.append(StateEntry(state_key("shift", "weight", name), (channels,)))
            if base.bias is not None:
                entries.append(StateEntry(state_key("shift", "bias", name), (channels,)))
        else:
            entries.append(StateEntry(state_key("shift", "bias", name), (base.bias.shape[0],)))
    return entries


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT calls that wrap a model (``get_peft_model``, ``PeftModel.from_pretrained``): PEFT 0.21 reads
    transformers' deprecated ``is_gradient_checkpointing`` there, a FutureWarning about PEFT's code that the caller
    can do nothing about. That one warning is silenced; every other passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


class HyperFlowModel(BaseTuner):
    """Injects HyperFlow layers into a transformers vision backbone and holds the drift network.

    After injection the backbone computes exactly what it computed before; inside
    :meth:`task_deltas` every layer adds the delta of each task to that task's rows.
    """

    prefix: str = "hyperflow_"
    tuner_layer_cls = HyperFlowLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self._resolved_roles: dict[str, dict[str, frozenset[str]]] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # -- injection ---------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: HyperFlowConfig, model_config: dict) -> HyperFlowConfig:
        model = self.model
        model_type = model_type_of(model)
        if peft_config.backbone_model_type is not None and peft_config.backbone_model_type != model_type:
            raise ValueError(
                f"This HyperFlow adapter was made for a {peft_config.backbone_model_type!r} backbone, but the "
                f"backbone given is a {model_type!r}. Load it onto the backbone it was trained for."
            )
        if peft_config.image_size is None:
            peft_config.image_size = default_image_size(model)
        feature_size = probe_feature_size(model, peft_config.image_size)
        if peft_config.feature_size is not None and peft_config.feature_size != feature_size:
            raise ValueError(
                f"This HyperFlow adapter expects backbone features of size {peft_config.feature_size}, but this "
                f"{model_type} backbone gives {feature_size}: it was made for another backbone size."
            )
        peft_config.backbone_model_type = model_type
        peft_config.feature_size = feature_size
        if peft_config.backbone_fingerprint is None:
            peft_config.backbone_fingerprint = backbone_fingerprint(model)
        if peft_config.adapted_modules is not None:
            # A saved adapter: exactly the modules it was made with.
            modules = dict(model.named_modules())
            missing = [name for name in peft_config.adapted_modules if name not in modules]
            if missing:
                raise ValueError(
                    f"This HyperFlow adapter adapts modules this {model_type} backbone does not have "
                    f"({missing[:3]}): it was made for another backbone."
                )
            roles = {name: frozenset(r) for name, r in peft_config.adapted_modules.items()}
        else:
            roles = resolve_adapted_modules(
                model,
                lora_modules=peft_config.target_modules,
                shift_modules=peft_config.shift_modules,
                exclude_modules=peft_config.exclude_modules,
                first_adapted_block=peft_config.first_adapted_block,
            )
            groups = set(peft_config.groups)
            roles = {name: r & groups for name, r in roles.items() if r & groups}
            peft_config.adapted_modules = {name: sorted(r) for name, r in roles.items()}
        self._resolved_roles[self._injecting_adapter] = roles
        return peft_config

    def _pre_injection_hook(self, model, config, adapter_name) -> None:
        self._injecting_adapter = adapter_name

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._resolved_roles.get(self._injecting_adapter, {})

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key):
        self.__dict__.pop("_hyperflow_layers", None)
        if isinstance(target, HyperFlowLayer):
            raise ValueError(f"{current_key} already carries a HyperFlow layer: one HyperFlow adapter per backbone.")
        roles = self._resolved_roles[adapter_name][current_key]
        if isinstance(target, SHIFTABLE_NORMS):
            new_module = HyperFlowNorm(target, adapter_name, roles)
        elif isinstance(target, nn.Conv2d):
            new_module = HyperFlowConv2d(target, adapter_name, roles)
        elif isinstance(target, nn.Linear):
            new_module = HyperFlowLinear(target, adapter_name, roles)
        else:
            raise ValueError(f"{current_key} is a {type(target).__name__}: HyperFlow adapts Linear, Conv2d and norms.")
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        device = next(iter(child.parameters()), torch.empty(0)).device
        new_module.to(device)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    def _post_injection_hook(self, model, config: HyperFlowConfig, adapter_name: str) -> None:
        entries = [e for name, layer in self.hyperflow_layers() for e in layer_state_entries(name, layer, config.r)]
        drift = DriftNet(
            entries,
            feature_size=config.feature_size,
            groups=config.groups,
            hidden_size=config.hidden_size,
            time_embedding_size=config.time_embedding_size,
            module_embedding_size=config.module_embedding_size,
            state_projection_size=config.state_projection_size,
            output_rank=config.output_rank,
            init_seed=config.init_seed,
            module_channels={name: layer.in_features for name, layer in self.hyperflow_layers()},
            statistics_size=config.statistics_size,
        )
        parameter = next(iter(model.parameters()))
        drift.to(device=parameter.device)
        if not hasattr(self, "hyperflow_drift"):
            self.hyperflow_drift = nn.ModuleDict()
        self.hyperflow_drift[adapter_name] = drift
        drift.requires_grad_(not config.inference_mode)

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("A backbone carries one HyperFlow adapter; load the other one onto another backbone.")

    @staticmethod
    def _check_target_module_compatiblity(peft_config, model, target_name):
        return None

    def _unloading_checks(self, adapter_names=None):
        return None

    def _unload_and_optionally_merge(self, *args, **kwargs):
        self.__dict__.pop("_hyperflow_layers", None)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # -- use ---------------------------------------------------------------------------------------
    @property
    def drift(self) -> DriftNet:
        """The drift network of the active adapter."""
        return self.hyperflow_drift[self.active_adapters[0]]

    def hyperflow_layers(self) -> list[tuple[str, HyperFlowLayer]]:
        """``(module name, layer)`` of every HyperFlow layer, in module order (found once: walking the whole
        backbone costs more than the layers' work on a small support set)."""
        found = self.__dict__.get("_hyperflow_layers")
        if found is None:
            found = [(name, m) for name, m in self.model.named_modules() if isinstance(m, HyperFlowLayer)]
            self.__dict__["_hyperflow_layers"] = found
        return found

    @contextlib.contextmanager
    def task_deltas(self, state: TaskState, sizes: list[int]):
        """Within this block, the backbone adds task i's delta to the rows of task i's images.

        Args:
            state: the adapted state of T tasks (the head group, if any, is ignored here).
            sizes: number of images of each task in the batches run inside the block (sums to the batch).
        """
        if state.num_tasks != len(sizes):
            raise ValueError(f"The state holds {state.num_tasks} tasks but {len(sizes)} task sizes were given.")
        config = self.peft_config[self.active_adapters[0]]
        layers = list(self.hyperflow_layers())
        try:
            for name, layer in layers:
                delta = {}
                for group, param in (("lora", "A"), ("lora", "B"), ("shift", "bias"), ("shift", "weight")):
                    key = state_key(group, param, name)
                    if key in state:
                        delta[param] = state[key]
                if delta:
                    layer.set_task_delta(delta, sizes, config.scaling)
            yield self
        finally:
            for _, layer in layers:
                layer.clear_task_delta()

    @contextlib.contextmanager
    def input_moments(self, num_images: int):
        """Within this block, the forward passes record the moments of each HyperFlow layer's input.

        Yields a dict filled when the block ends: ``module name -> (mean, mean_square)``, each
        ``Tensor[num_images, C]`` (float32, no autograd): per image, the mean of the input and of its square
        over the positions / tokens of each of its C input channels. The images may run in several passes of
        whole images, in order (e.g. a support set a few images at a time); together they make ``num_images``.
        """
        moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def record(name: str, channels: int):
            def hook(module, args):
                x = args[0].detach()  # [R, ...]: R rows of whole images
                rows.setdefault(name, []).append(channel_moments(x, channels, x.shape[0]))
            return hook

        handles = [layer.register_forward_pre_hook(record(name, layer.in_features))
                   for name, layer in self.hyperflow_layers()]
        try:
            yield moments
        finally:
            for handle in handles:
                handle.remove()
        for name, parts in rows.items():
            mean, mean_square = parts[0] if len(parts) == 1 else (torch.cat(p) for p in zip(*parts, strict=True))
            if mean.shape[0] == num_images:
                moments[name] = (mean, mean_square)
                continue
            if mean.shape[0] % num_images:
                raise ValueError(f"The passes inside input_moments({num_images}) ran {mean.shape[0]} rows through "
                                 f"{name}, not a whole number per image: run exactly the {num_images} support "
                                 f"images, each once.")
            moments[name] = (mean.reshape(num_images, -1, mean.shape[1]).mean(1),
                             mean_square.reshape(num_images, -1, mean.shape[1]).mean(1))

    @contextlib.contextmanager
    def merged_task(self, state: TaskState):
        """Merge one task's delta into the backbone weights (in place) within the block, then restore them."""
        if state.num_tasks != 1:
            raise ValueError(f"merged_task takes the state of one task, got {state.num_tasks}.")
        with self.task_deltas(state, [1]):
            merged = []
            try:
                for _, layer in self.hyperflow_layers():
                    if layer.task_delta is not None:
                        layer.merge()
                        merged.append(layer)
                yield self
            finally:
                for layer in merged:
                    layer.unmerge()
