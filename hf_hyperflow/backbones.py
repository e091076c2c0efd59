"""A uniform view over Hugging Face vision backbones.

One table says, per ``model_type``, which modules carry LoRA factors, which carry shifts (biases and
norm affines), how blocks are named (so that only the last blocks can be adapted) and how one feature
vector per image is pooled. Everything else is the same for every backbone: :func:`embed` and
:func:`probe_feature_size`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fingerprint import tensors_fingerprint

__all__ = [
    "BACKBONE_TABLE",
    "BackboneSpec",
    "backbone_spec",
    "check_no_adapter",
    "embed",
    "images_per_pass",
    "load_backbone",
    "model_type_of",
    "probe_feature_size",
    "resolve_adapted_modules",
    "SHIFTABLE_NORMS",
]

# Normalisation layers whose affine weight and bias can be shifted (subclasses included, e.g. timm's
# BatchNormAct2d and transformers' ConvNextLayerNorm).
SHIFTABLE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)


@dataclass(frozen=True)
class BackboneSpec:
    """How to adapt and pool one family of backbones.

    Attributes:
        lora_modules: regex (``re.search`` on the full module name) of the Linear / Conv2d modules that get
            LoRA factors by default.
        shift_modules: regex of the modules whose bias (Linear / Conv2d) or affine (norm layers) gets a
            shift by default.
        block_pattern: regex whose first group is the name of the block a module belongs to; blocks are
            numbered in module order, which is what ``first_adapted_block`` counts.
        pooling: ``"pooler"`` (``pooler_output``, flattened), ``"cls"`` (first token of
            ``last_hidden_state``) or ``"mean"`` (mean of ``last_hidden_state`` over tokens or space).
        exclude_modules: regex of modules never adapted (layers without a batch dimension).
    """

    lora_modules: str
    shift_modules: str
    block_pattern: str
    pooling: str = "pooler"
    exclude_modules: str | None = None


_VIT_LIKE = BackboneSpec(
    lora_modules=r"attention\.(q_proj|v_proj)$",
    shift_modules=r"(attention\.(q_proj|k_proj|v_proj)|layernorm_before|layernorm_after)$",
    block_pattern=r"^((?:encoder\.)?layers?\.\d+)\.",
    pooling="cls",
)
_CLIP_LIKE = BackboneSpec(
    lora_modules=r"self_attn\.(q_proj|v_proj)$",
    shift_modules=r"(self_attn\.(q_proj|k_proj|v_proj)|layer_norm1|layer_norm2)$",
    block_pattern=r"^(encoder\.layers\.\d+)\.",
    exclude_modules=r"^head\.",
)

BACKBONE_TABLE: dict[str, BackboneSpec] = {
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "dinov2": BackboneSpec(
        lora_modules=r"attention\.(q_proj|v_proj)$",
        shift_modules=r"(attention\.(q_proj|k_proj|v_proj)|norm1|norm2)$",
        block_pattern=r"^(encoder\.layer\.\d+)\.",
    ),
    "clip_vision_model": _CLIP_LIKE,
    "siglip_vision_model": _CLIP_LIKE,
    "swin": BackboneSpec(
        lora_modules=r"blocks\.\d+\.attention\.(q_proj|v_proj)$",
        shift_modules=r"blocks\.\d+\.(attention\.(q_proj|k_proj|v_proj)|layernorm_before|layernorm_after)$",
        block_pattern=r"^(encoder\.layers\.\d+\.blocks\.\d+)\.",
    ),
    "convnext": BackboneSpec(
        lora_modules=r"layers\.\d+\.(pwconv1|pwconv2)$",
        shift_modules=r"layers\.\d+\.(dwconv|layernorm)$",
        block_pattern=r"^(encoder\.stages\.\d+\.layers\.\d+)\.",
    ),
    "resnet": BackboneSpec(
        lora_modules=r"layers\.\d+\.layer\.\d+\.convolution$",
        shift_modules=r"layers\.\d+\.(layer\.\d+|shortcut)\.normalization$",
        block_pattern=r"^(encoder\.stages\.\d+\.layers\.\d+)\.",
    ),
    # Any timm model through transformers' TimmWrapperModel: EfficientNet / MobileNet names (conv_pw,
    # conv_pwl, conv_head, bn1..3) and timm ViT names (attn.qkv, mlp.fc1/fc2, norm1/norm2).
    "timm_wrapper": BackboneSpec(
        lora_modules=r"(blocks\.\d+\.\d+\.(conv_pw|conv_pwl|conv_exp)|conv_head|attn\.qkv|attn\.proj|mlp\.fc[12])$",
        shift_modules=r"(blocks\.\d+\.\d+\.bn[123]|timm_model\.bn2|blocks\.\d+\.norm[12])$",
        block_pattern=r"^(timm_model\.blocks\.\d+(?:\.\d+)?)\.(?!\d)",
    ),
}


def model_type_of(backbone: nn.Module) -> str:
    """The ``config.model_type`` of a transformers backbone, with a clear error for anything else."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise TypeError(
            f"Expected a transformers vision backbone (a PreTrainedModel with config.model_type), got "
            f"{type(backbone).__name__}. Load one with transformers.AutoModel.from_pretrained(...)."
        )
    return model_type


def load_backbone(name_or_path: str | os.PathLike, *, option: str = "backbone") -> nn.Module:
    """``AutoModel.from_pretrained(name_or_path)`` in eval mode, with errors that say what was wrong with the name.

    A local path (see :func:`hf_hyperflow.hub.looks_local`) must be a folder holding ``config.json``; anything else
    is taken as a Hub id.

    Raises:
        FileNotFoundError: a local path that does not exist, or a folder without ``config.json`` (``option`` names
            the setting in the message).
    """
    from transformers import AutoModel

    from .hub import looks_local

    text = os.fspath(name_or_path)
    if looks_local(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{option} {text}: the folder does not exist. Give the folder of a saved backbone "
                                    "(transformers' save_pretrained, e.g. one written by "
                                    "hf_hyperflow.pretrained.build_efficientnet_lite0) or a Hub id (namespace/name).")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{option} {text}: {'the folder' if path.is_dir() else 'it is a file and'} holds no "
                                    "config.json, so it is not a saved transformers model. Give the folder "
                                    "save_pretrained wrote, or a Hub id (namespace/name).")
    return AutoModel.from_pretrained(text).eval()


def check_no_adapter(backbone: nn.Module, what: str) -> None:
    """``backbone`` carries no adapter yet (no module wrapped by PEFT); ``what`` names what was to be put on it.

    Raises:
        ValueError: the backbone object already carries a HyperFlow adapter or a task's LoRA, saying the two ways on.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = next((name for name, module in backbone.named_modules() if isinstance(module, BaseTunerLayer)), None)
    if wrapped is not None:
        raise ValueError(f"This backbone object already carries an adapter ({wrapped} is wrapped), and a backbone "
                         f"object takes one HyperFlow adapter or task at a time. To put {what} on it, take the first one "
                         "off with its unload() (HyperFlowAdapter.unload() and AdaptedTask.unload() return the plain "
                         "backbone) and use that backbone, or load onto another copy of the backbone "
                         "(AutoModel.from_pretrained again).")


def backbone_spec(model_type: str) -> BackboneSpec:
    """The table entry for ``model_type``; an unknown type is an error that lists the known ones."""
    try:
        return BACKBONE_TABLE[model_type]
    except KeyError:
        raise ValueError(
            f"No default adaptation table for model_type={model_type!r}. Supported: "
            f"{sorted(BACKBONE_TABLE)}. For another backbone pass target_modules=... and shift_modules=... "
            f"(regexes over module names) in HyperFlowConfig."
        ) from None


def _pool(output, pooling: str) -> torch.Tensor:
    if pooling == "pooler":
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        pooling = "mean"
    hidden = output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if hidden.dim() == 4:  # [B, C, H, W]
        return hidden.mean(dim=(2, 3))
    return hidden.mean(dim=1)


def embed(backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """One feature vector per image.

    Args:
        backbone: a transformers vision backbone (``AutoModel``), possibly wrapped by HyperFlow layers.
        pixel_values: ``Tensor[B, 3, H, W]``.

    Returns:
        ``Tensor[B, D]``: ``pooler_output`` flattened where the table says so (and the model has one),
        else the CLS token or the mean of ``last_hidden_state`` over tokens / space.
    """
    model_type = model_type_of(backbone)
    pooling = BACKBONE_TABLE[model_type].pooling if model_type in BACKBONE_TABLE else "pooler"
    return _pool(backbone(pixel_values=pixel_values), pooling)


# On a CPU, passes over a few images keep activations in cache and bound peak memory. The early,
# high-resolution blocks take CPU_PASS_SIDES // side images at a time (8 at 64 px, 4 at 128 px), and no more than a
# quarter of the support set (at least CPU_SMALLEST_PASS): fine-tuning holds every support image's activations, so
# for a small support a pass of 8 would hold as much as a good part of that (5 images at 64 px: 7.3 MiB against
# 2.9 MiB in passes of 2, at 1.12x the time per image; 25 images: 1.13x for passes of 6 instead of 8, a cost that
# buys no needed memory there, see benchmarks/SPEED.md). The later blocks take CPU_LATE_PASS_IMAGES (fewer than 16 images
# would send their 1x1 convolutions to PyTorch's slower single-thread kernel). benchmarks/images_per_pass.md
# measured these among 2-25 and 25-100 images per pass, for supports of 5 to 100 images.
CPU_PASS_SIDES = 512
CPU_SMALLEST_PASS = 2
CPU_LATE_PASS_IMAGES = 25


def images_per_pass(image_size: int, device: torch.device, late: bool = False,
                    support_size: int | None = None) -> int | None:
    """How many images a forward pass over a support set takes at a time: in the early, high-resolution blocks
    ``CPU_PASS_SIDES // image_size``, and with ``support_size`` (the images passed) no more than a quarter of them
    (at least ``CPU_SMALLEST_PASS``); in the later blocks (``late``) ``CPU_LATE_PASS_IMAGES`` (never fewer than the
    early ones); at least 1, on a CPU; None (all at once) on an accelerator."""
    if device.type != "cpu":
        return None
    early = max(1, CPU_PASS_SIDES // image_size)
    if support_size is not None:
        early = min(early, max(CPU_SMALLEST_PASS, support_size // 4))
    return max(early, CPU_LATE_PASS_IMAGES) if late else early


def probe_feature_size(backbone: nn.Module, image_size: int) -> int:
    """The size D of :func:`embed`'s output, measured with one dummy forward (config fields can lie)."""
    parameter = next(backbone.parameters())
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=parameter.dtype, device=parameter.device)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        size = embed(backbone, dummy).shape[-1]
    backbone.train(was_training)
    return int(size)


def _compile(patterns: str | list[str] | None) -> re.Pattern | None:
    """A user pattern is a regex string, or a list of module-name suffixes (PEFT's convention)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return re.compile(patterns)
    return re.compile("(?:^|\\.)(?:" + "|".join(re.escape(p) for p in patterns) + ")$")


def resolve_adapted_modules(
    backbone: nn.Module,
    *,
    lora_modules: str | list[str] | None,
    shift_modules: str | list[str] | None,
    exclude_modules: str | list[str] | None = None,
    first_adapted_block: int | None = None,
) -> dict[str, frozenset[str]]:
    """Which modules get which roles (``"lora"``, ``"shift"``), in module order.

    ``None`` patterns fall back to the backbone table. ``first_adapted_block`` keeps only the modules of
    blocks ``first_adapted_block, ...`` (negative: counted from the end) and the modules after them;
    modules before the first block (embeddings) are then left out.

    Raises:
        ValueError: the patterns match nothing, or a LoRA target is not a Linear / plain Conv2d, or a shift
            target has no bias / affine to shift.
    """
    model_type = model_type_of(backbone)
    spec = BACKBONE_TABLE.get(model_type)
    if spec is None and (lora_modules is None or shift_modules is None):
        backbone_spec(model_type)  # raises the "no table entry" error
    lora_re = _compile(lora_modules) if lora_modules is not None else re.compile(spec.lora_modules)
    shift_re = _compile(shift_modules) if shift_modules is not None else re.compile(spec.shift_modules)
    excluded = [p for p in (_compile(exclude_modules), re.compile(spec.exclude_modules) if spec and
                            spec.exclude_modules else None) if p is not None]
    named = [(name, module) for name, module in backbone.named_modules() if name]
    positions, blocks = _block_positions(named, re.compile(spec.block_pattern) if spec else None)
    first = _first_block(first_adapted_block, len(blocks), model_type)
    roles: dict[str, frozenset[str]] = {}
    for name, module in named:
        if (first is not None and positions[name] < first) or any(p.search(name) for p in excluded):
            continue
        module_roles = _roles_of(name, module, lora_re, shift_re, lora_given=lora_modules is not None)
        if module_roles:
            roles[name] = frozenset(module_roles)
    if not roles:
        raise ValueError(
            f"No module of this {model_type} backbone matches target_modules / shift_modules "
            f"(first_adapted_block={first_adapted_block}). Check the patterns against "
            f"[name for name, _ in backbone.named_modules()]."
        )
    return roles


def _block_positions(named: list[tuple[str, nn.Module]], block_re: re.Pattern | None
                     ) -> tuple[dict[str, float], list[str]]:
    """Position of every module (the index of its block, or, outside blocks, just after the last block seen) and
    the block names in order."""
    block_names: list[str] = []
    positions: dict[str, float] = {}
    for name, _ in named:
        match = block_re.search(name) if block_re else None
        if match:
            if not block_names or block_names[-1] != match.group(1):
                block_names.append(match.group(1))
            positions[name] = len(block_names) - 1
        else:
            positions[name] = len(block_names) - 0.5
    return positions, block_names


def _first_block(first_adapted_block: int | None, blocks: int, model_type: str) -> int | None:
    """``first_adapted_block`` as an index into the blocks (negative counted from the end), checked."""
    if first_adapted_block is None:
        return None
    if not blocks:
        raise ValueError(f"first_adapted_block={first_adapted_block} needs numbered blocks, but no module of this "
                         f"{model_type} backbone matches the block pattern.")
    first = first_adapted_block if first_adapted_block >= 0 else blocks + first_adapted_block
    if not 0 <= first < blocks:
        raise ValueError(f"first_adapted_block={first_adapted_block} is out of range: this backbone has {blocks} "
                         f"blocks (use 0..{blocks - 1} or -{blocks}..-1).")
    return first


def _roles_of(name: str, module: nn.Module, lora_re: re.Pattern, shift_re: re.Pattern, lora_given: bool) -> set[str]:
    """The roles a module matched by the patterns can take: LoRA on Linear / plain Conv2d, a shift of a bias or of
    a norm's affine. A LoRA target the user named that cannot take factors is an error."""
    roles = set()
    if lora_re.search(name) and isinstance(module, (nn.Linear, nn.Conv2d)):
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or (type(module) is not nn.Conv2d and module.kernel_size != (1, 1))
        ):
            if lora_given:
                raise ValueError(
                    f"Module {name!r} ({type(module).__name__}, groups={module.groups}) cannot take LoRA factors: "
                    f"only Linear and plain (groups=1) Conv2d layers can. Remove it from target_modules."
                )
        else:
            roles.add("lora")
    if shift_re.search(name):
        if isinstance(module, SHIFTABLE_NORMS) and getattr(module, "weight", None) is not None:
            roles.add("shift")
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            roles.add("shift")
    return roles


def default_image_size(backbone: nn.Module) -> int:
    """The input side the backbone was made for: ``config.image_size``, timm's ``pretrained_cfg`` input
    size, or 224."""
    config = backbone.config
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    if isinstance(size, int) and size > 0:
        return size
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or {}
    input_size = pretrained_cfg.get("test_input_size") or pretrained_cfg.get("input_size")
    if input_size:
        return int(input_size[-1])
    return 224


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A content hash (sha256, first 16 hex digits) of the backbone's weights and buffers.

    Names are taken as in the plain backbone (tuner wrappers' ``base_layer`` stripped, tuner-only entries
    left out) and values as float32, so that wrapping the backbone does not change its fingerprint.
    """
    return tensors_fingerprint({
        name.replace(".base_layer", ""): tensor
        for name, tensor in backbone.state_dict().items()
        if "hyperflow_" not in name and torch.is_floating_point(tensor)
    })


def check_backbone(backbone: nn.Module, model_type: str, fingerprint: str, strict: bool, what: str) -> None:
    """``backbone`` is a ``model_type`` with the weights of content fingerprint ``fingerprint`` (what a saved
    adapter or task was made on; ``what`` names it in messages).

    Raises:
        ValueError: another model_type; other weights when ``strict`` (else a warning).
    """
    given = model_type_of(backbone)
    if given != model_type:
        raise ValueError(f"This {what} was made for a {model_type!r} backbone, but the backbone given is a "
                         f"{given!r}. Load it onto the backbone it was made for.")
    found = backbone_fingerprint(backbone)
    if found != fingerprint:
        message = (f"The backbone's weights (fingerprint {found}) differ from those this {what} was made with "
                   f"({fingerprint}). Load the same checkpoint, or pass strict_backbone=False to use it anyway.")
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
