"""The stock-PEFT export of an adapted task: its HyperFlow state as a plain ``LoraConfig`` and LoRA tensors.

LoRA factors are exported as they are; bias shifts of LoRA targets as ``lora_B`` biases (divided by the LoRA
scaling, which PEFT applies to them); shifts of other modules (norm affines, depthwise convolutions) as
``modules_to_save`` copies of the module with the shift added to its parameters (exact). Linear and plain
Conv2d modules with only a bias shift become LoRA targets with zero factors (smaller than a copy).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

from .config import HyperFlowConfig
from .state import TaskState, parse_state_key
from .tuner.model import HyperFlowModel

__all__ = ["to_lora"]


def to_lora(state: TaskState, tuner: HyperFlowModel, config: HyperFlowConfig
            ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A task's state (one task) as a stock PEFT LoRA config and state dict (keys as PEFT saves them).

    Raises:
        ValueError: a state without LoRA factors or Linear / Conv2d bias shifts (head-only or norm-only).
    """
    layers = dict(tuner.hyperflow_layers())
    params_of: dict[str, set[str]] = {}
    for key in state:
        group, param, module = parse_state_key(key)
        if group != "head":
            params_of.setdefault(module, set()).add(param)
    lora_targets = [name for name, params in params_of.items() if _is_lora_target(params, layers[name])]
    if not lora_targets:
        raise ValueError(
            "This task has no LoRA factors or Linear / Conv2d bias shifts, which a stock PEFT LoRA adapter needs "
            "(head-only or norm-only states cannot be exported as LoRA); adapt with groups including 'lora'."
        )
    copied = [name for name in params_of if name not in lora_targets]
    has_bias = any(f"shift.bias:{name}" in state for name in lora_targets)
    tensors: dict[str, torch.Tensor] = {}
    for name in lora_targets:
        tensors.update(_lora_tensors(state, name, layers[name].get_base_layer(), config, has_bias))
    for name in copied:
        tensors.update(_shifted_copy(state, name, layers[name].get_base_layer()))
    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=lora_targets,
        init_lora_weights=False,
        lora_bias=has_bias,
        modules_to_save=copied or None,
        base_model_name_or_path=getattr(tuner.model.config, "_name_or_path", None) or None,
    )
    return lora_config, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _is_lora_target(params: set[str], layer: nn.Module) -> bool:
    """Modules with LoRA factors, and Linear / plain Conv2d modules whose only delta is a bias shift."""
    base = layer.get_base_layer()
    plain = isinstance(base, (nn.Linear, nn.Conv2d)) and getattr(base, "groups", 1) == 1
    return "A" in params or (params == {"bias"} and plain)


def _lora_tensors(state: TaskState, name: str, base: nn.Module, config: HyperFlowConfig,
                  has_bias: bool) -> dict[str, torch.Tensor]:
    """``lora_A`` ``[r, in(, kh, kw)]``, ``lora_B`` ``[out, r(, 1, 1)]`` and (with ``has_bias``) the ``lora_B``
    bias ``[out]`` of one target module; zero factors for a module with a bias shift only."""
    is_conv = isinstance(base, nn.Conv2d)
    out = base.out_channels if is_conv else base.out_features
    a_key, b_key, bias_key = f"lora.A:{name}", f"lora.B:{name}", f"shift.bias:{name}"
    if a_key in state:
        a, b = state[a_key][0], state[b_key][0]
    else:
        in_shape = (base.in_channels, *base.kernel_size) if is_conv else (base.in_features,)
        a = torch.zeros(config.r, *in_shape)
        b = torch.zeros(out, config.r)
    prefix = f"base_model.model.{name}"
    tensors = {f"{prefix}.lora_A.weight": a,
               f"{prefix}.lora_B.weight": b.reshape(out, config.r, 1, 1) if is_conv else b}
    if has_bias:
        tensors[f"{prefix}.lora_B.bias"] = state[bias_key][0] / config.scaling if bias_key in state else torch.zeros(out)
    return tensors


def _shifted_copy(state: TaskState, name: str, base: nn.Module) -> dict[str, torch.Tensor]:
    """A ``modules_to_save`` copy of a module: its parameters and buffers with the task's shifts added."""
    prefix = f"base_model.model.{name}"
    tensors = {}
    for key, value in base.state_dict().items():
        shift_key = f"shift.{key}:{name}"
        if shift_key in state:
            value = value + state[shift_key][0]
        tensors[f"{prefix}.{key}"] = value
    return tensors
