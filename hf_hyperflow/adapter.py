"""HyperFlowAdapter and AdaptedTask: the user-facing objects.

    adapter = HyperFlowAdapter(backbone, HyperFlowConfig())        # or HyperFlowAdapter.from_pretrained(...)
    task = adapter.adapt(support_images, support_labels)            # forward passes only, no autograd
    task.predict(query_images); task.save_pretrained("my-task")     # a plain PEFT LoRA adapter + the head
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from .backbones import backbone_fingerprint, embed, model_type_of, probe_feature_size
from .config import HyperFlowConfig
from .drift import DriftNet, TaskEncoding
from .heads import class_prototypes, prototype_logits
from .io import load_safetensors_checked, read_json_checked
from .prefix import FrozenPrefix, Uncacheable
from .state import TaskState, parse_state_key
from .tuner.model import HyperFlowModel

__all__ = ["HyperFlowAdapter", "AdaptedTask", "TaskBatch", "encode_labels", "default_image_processor"]

HEAD_FILE = "hyperflow_head.safetensors"
TASK_FILE = "hyperflow_task.json"
DRIFT_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def encode_labels(labels, classes: Sequence | None = None) -> tuple[torch.Tensor, list]:
    """Map user labels (ints or strings) to ``LongTensor[S]`` in ``0..C-1`` and the list of C classes.

    Without ``classes``, the classes are the sorted distinct labels; integer labels must then be
    ``0..C-1`` (a gap means a class without support images).

    Raises:
        TypeError: labels that are neither all ints nor all strings.
        ValueError: fewer than two classes, a class without support images, a label not in ``classes``.
    """
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.is_floating_point():
            raise TypeError(f"Labels as a tensor must be a 1-D integer tensor, got {labels.dtype} of shape "
                            f"{tuple(labels.shape)}.")
        labels = labels.tolist()
    labels = list(labels)
    if not labels:
        raise ValueError("No support labels were given: a task needs labelled support images.")
    if all(isinstance(y, str) for y in labels):
        kind = str
    elif all(isinstance(y, int) and not isinstance(y, bool) for y in labels) or all(
        hasattr(y, "__index__") and not isinstance(y, (str, bool)) for y in labels
    ):
        kind = int
        labels = [int(y) for y in labels]
    else:
        kinds = sorted({type(y).__name__ for y in labels})
        raise TypeError(f"Labels must be all ints or all strings, got a mix of {kinds}.")
    if classes is None:
        classes = sorted(set(labels))
        if kind is int and classes != list(range(len(classes))):
            missing = sorted(set(range(max(classes) + 1)) - set(classes))
            raise ValueError(
                f"Integer labels must be 0..C-1, but class(es) {missing[:10]} have no support image. Give each class "
                f"at least one support image, or pass classes=[...] to name the classes of the task."
            )
    else:
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes={classes!r} lists a class twice.")
        unknown = sorted({str(y) for y in labels if y not in classes})
        if unknown:
            raise ValueError(f"Labels {unknown[:10]} are not among classes={classes!r}.")
        empty = [c for c in classes if c not in set(labels)]
        if empty:
            raise ValueError(f"Class(es) {empty[:10]} have no support image: every class needs at least one.")
    if len(classes) < 2:
        raise ValueError(f"A task needs at least two classes, got only {classes!r}.")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[y] for y in labels], dtype=torch.long), classes


def default_image_processor(backbone: nn.Module, image_size: int):
    """A ViT image processor (PIL backend: the faster one on CPU for small batches) that resizes to
    ``image_size`` with the backbone's mean / std.

    The mean / std come from the backbone's own image processor when its folder has one, else from timm's
    ``pretrained_cfg``, else ImageNet's. When the backbone's own processor already outputs ``image_size``
    it is used as it is.
    """
    from transformers import AutoImageProcessor, ViTImageProcessorPil

    name = getattr(backbone.config, "_name_or_path", None) or ""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pretrained_cfg = getattr(backbone.config, "pretrained_cfg", None) or {}
    if pretrained_cfg:
        mean, std = pretrained_cfg.get("mean", mean), pretrained_cfg.get("std", std)
    if name and os.path.isdir(name):
        try:
            own = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError):
            own = None
        if own is not None:
            if _processor_size(own) == image_size:
                return own
            mean, std = getattr(own, "image_mean", None) or mean, getattr(own, "image_std", None) or std
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                image_std=list(std))


def to_pixel_values(images, image_processor, device=None, dtype=None) -> torch.Tensor:
    """``Tensor[B, 3, H, W]`` from a list of PIL images (converted to RGB, then processed) or a pixel tensor.

    Raises:
        TypeError: images of another type.
        ValueError: a tensor of the wrong rank or channel count, or an empty batch.
    """
    if isinstance(images, torch.Tensor):
        pixel_values = images
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be a 4-D tensor [B, 3, H, W], got shape {tuple(pixel_values.shape)}"
                + (" (add the batch axis with .unsqueeze(0))" if pixel_values.dim() == 3 else "") + "."
            )
        if pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have 3 channels on axis 1 ([B, 3, H, W]), got shape {tuple(pixel_values.shape)}."
                " Convert grayscale / RGBA images to RGB first (or pass PIL images)."
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor (as image processors return), got {pixel_values.dtype}.")
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("No images were given.")
        bad = sorted({type(im).__name__ for im in images if not isinstance(im, Image.Image)})
        if bad:
            raise TypeError(f"Images must be PIL images or one pixel_values tensor [B, 3, H, W]; got {bad}.")
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixel_values = image_processor(images=rgb, return_tensors="pt")["pixel_values"]
    else:
        raise TypeError(
            f"Images must be a list of PIL images or a pixel_values tensor [B, 3, H, W], got {type(images).__name__}."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("No images were given.")
    return pixel_values.to(device=device, dtype=dtype)


def _check_pair(images, labels) -> None:
    n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    n_labels = labels.shape[0] if isinstance(labels, torch.Tensor) else len(labels)
    if n_images != n_labels:
        raise ValueError(f"Got {n_images} support images but {n_labels} labels: give one label per image.")


# ------------------------------------------------------------------------------------------------
# Adapted tasks
# ------------------------------------------------------------------------------------------------
class _HyperFlowEmbedder:
    """Features of the backbone carrying one task's delta (HyperFlow layers, no merge)."""

    def __init__(self, tuner: HyperFlowModel, state: TaskState):
        self.tuner, self.state = tuner, state

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with self.tuner.task_deltas(self.state, [pixel_values.shape[0]]):
            return embed(self.tuner.model, pixel_values)


class _PeftEmbedder:
    """Features of a backbone carrying a stock PEFT (LoRA) adapter."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return embed(self.peft_model.base_model.model, pixel_values)


class AdaptedTask:
    """A backbone adapted to one few-shot task, with its cosine prototype classifier.

    Attributes:
        classes: the task's classes (the labels given to ``adapt``: names or ints); logits follow this order.
        prototypes: ``Tensor[C, D]``, class prototypes (adapted features, plus the head delta).
    """

    def __init__(self, embedder, prototypes: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                 classes: list, image_processor, *, state: TaskState | None = None, tuner: HyperFlowModel | None = None,
                 config: HyperFlowConfig | None = None, source: dict | None = None):
        self._embedder = embedder
        self.prototypes = prototypes
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.classes = list(classes)
        self.image_processor = image_processor
        self.state = state
        self._tuner = tuner
        self._config = config
        self._meta: dict = dict(source or {})

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """``Tensor[B, D]``: pooled features of the adapted backbone (PIL images or pixel_values)."""
        pixel_values = to_pixel_values(images, self.image_processor, self.prototypes.device, self.prototypes.dtype)
        return self._embedder(pixel_values)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """``Tensor[Q, C]``: ``scale * (cos(f_q, p_c) + bias)``."""
        return prototype_logits(self.embed(images), self.prototypes, self.logit_scale, self.logit_bias)

    def predict_proba(self, images) -> torch.Tensor:
        """``Tensor[Q, C]``: class probabilities (softmax of the logits), columns in ``self.classes`` order."""
        return self.logits(images).softmax(-1)

    def predict(self, images) -> list:
        """The predicted class of every image, of the same kind as the training labels (names or ints)."""
        return [self.classes[i] for i in self.logits(images).argmax(-1).tolist()]

    # -- export ------------------------------------------------------------------------------------
    def to_lora(self) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The task's adapter as a stock PEFT LoRA config and state dict (keys as PEFT saves them).

        LoRA factors are exported as they are; bias shifts of LoRA targets as ``lora_B`` biases (divided by the
        LoRA scaling, which PEFT applies to them); shifts of other modules (norm affines, depthwise convolutions)
        as ``modules_to_save`` copies of the module with shifted parameters.
        """
        if self.state is None or self._tuner is None:
            raise ValueError(
                "This task has no HyperFlow state to export as LoRA: it was loaded from a PEFT export (save it with "
                "save_pretrained), or it is direct transfer / full fine-tuning, which are not adapters."
            )
        config = self._config
        scaling = config.scaling
        layers = dict(self._tuner.hyperflow_layers())
        params_of: dict[str, set[str]] = {}
        for key in self.state:
            group, param, module = parse_state_key(key)
            if group != "head":
                params_of.setdefault(module, set()).add(param)
        # LoRA targets: modules with LoRA factors, and Linear / plain Conv2d modules with only a bias shift
        # (zero LoRA factors, the shift as lora_B bias: smaller than a copy of the module).
        lora_targets = [
            name for name, params in params_of.items()
            if "A" in params or (params == {"bias"} and isinstance(layers[name].get_base_layer(), (nn.Linear, nn.Conv2d))
                                 and getattr(layers[name].get_base_layer(), "groups", 1) == 1)
        ]
        copied = [name for name in params_of if name not in lora_targets]
        tensors: dict[str, torch.Tensor] = {}
        has_bias = any(f"shift.bias:{name}" in self.state for name in lora_targets)
        for name in lora_targets:
            base = layers[name].get_base_layer()
            is_conv = isinstance(base, nn.Conv2d)
            out = base.out_channels if is_conv else base.out_features
            a_key, b_key, bias_key = f"lora.A:{name}", f"lora.B:{name}", f"shift.bias:{name}"
            if a_key in self.state:
                a, b = self.state[a_key][0], self.state[b_key][0]
            else:
                in_shape = (base.in_channels, *base.kernel_size) if is_conv else (base.in_features,)
                a = torch.zeros(config.r, *in_shape)
                b = torch.zeros(out, config.r)
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b.reshape(out, config.r, 1, 1) if is_conv else b
            if has_bias:
                bias = self.state[bias_key][0] / scaling if bias_key in self.state else torch.zeros(out)
                tensors[f"{prefix}.lora_B.bias"] = bias
        # Shifts of modules without LoRA factors (norm affines, depthwise-conv biases...): modules_to_save copies
        # of the module with the shift added to its parameters (exact).
        for name in copied:
            base = layers[name].get_base_layer()
            prefix = f"base_model.model.{name}"
            for key, value in base.state_dict().items():
                shift_key = f"shift.{key}:{name}"
                if shift_key in self.state:
                    value = value + self.state[shift_key][0]
                tensors[f"{prefix}.{key}"] = value
        if not lora_targets:
            raise ValueError(
                "This task has no LoRA factors or Linear / Conv2d bias shifts, which a stock PEFT LoRA adapter needs "
                "(head-only or norm-only states cannot be exported as LoRA); adapt with groups including 'lora'."
            )
        backbone = self._tuner.model
        lora_config = LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=lora_targets or None,
            init_lora_weights=False,
            lora_bias=has_bias,
            modules_to_save=copied or None,
            base_model_name_or_path=getattr(backbone.config, "_name_or_path", None) or None,
        )
        return lora_config, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None) -> None:
        """Write a plain PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) that stock
        PEFT loads without this package, plus the head (``hyperflow_head.safetensors``: prototypes, scale, bias),
        the classes and provenance (``hyperflow_task.json``), the image processor and a model card
        (``README.md``; ``repo_id`` names the model in it, default the folder's name)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.state is not None:
            lora_config, tensors = self.to_lora()
            lora_config.save_pretrained(str(directory))
            save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
            self._meta["backbone_model_type"] = model_type = model_type_of(self._tuner.model)
            self._meta["backbone_fingerprint"] = fingerprint = self._config.backbone_fingerprint
        else:
            self._embedder.peft_model.save_pretrained(str(directory))
            model_type = self._meta["backbone_model_type"]
            fingerprint = self._meta.get("backbone_fingerprint")
        save_file(
            {"prototypes": self.prototypes.detach().cpu().contiguous(),
             "logit_scale": self.logit_scale.detach().cpu().reshape(()).contiguous(),
             "logit_bias": self.logit_bias.detach().cpu().reshape(()).contiguous()},
            str(directory / HEAD_FILE), metadata={"format": "pt"},
        )
        meta = {
            "classes": self.classes,
            "label_kind": "str" if self.classes and isinstance(self.classes[0], str) else "int",
            "backbone_model_type": model_type,
            "backbone_fingerprint": fingerprint,
            "feature_size": int(self.prototypes.shape[1]),
            "source_adapter": self._meta.get("source_adapter"),
            "source_adapter_revision": self._meta.get("source_adapter_revision"),
            "support_size": self._meta.get("support_size"),
            "base_model": self._meta.get("base_model"),
        }
        (directory / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(directory))
        card = self.model_card(repo_id or directory.name)
        card.save(str(directory / "README.md"))

    def model_card(self, repo_id: str):
        """The task's model card (``huggingface_hub.ModelCard``): classes, source adapter, stock-PEFT usage."""
        from .hub import TaskCardData, render_task_card

        lora = json.loads(self._lora_config_json()) if self.state is not None else {}
        return render_task_card(TaskCardData(
            repo_id=_card_repo_id(repo_id),
            base_model=self._meta.get("base_model") or self._meta.get("backbone_model_type") or "unknown",
            class_names=[str(c) for c in self.classes],
            source_adapter=self._meta.get("source_adapter") or "an untracked HyperFlow adapter",
            source_adapter_revision=self._meta.get("source_adapter_revision"),
            base_model_revision=self._meta.get("backbone_fingerprint"),
            backbone_model_type=self._meta.get("backbone_model_type"),
            lora_rank=lora.get("r"),
            lora_alpha=lora.get("lora_alpha"),
            target_modules=lora.get("target_modules"),
            support_size=self._meta.get("support_size"),
        ))

    def _lora_config_json(self) -> str:
        config, _ = self.to_lora()
        return json.dumps({"r": config.r, "lora_alpha": config.lora_alpha,
                           "target_modules": sorted(config.target_modules)})

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, create_pr: bool = False):
        """Push the task (plain PEFT LoRA adapter, head, classes, image processor, model card) to the Hub.

        Returns the ``huggingface_hub.CommitInfo``; ``PeftModel.from_pretrained(backbone, repo_id)`` loads it
        with stock PEFT and ``AdaptedTask.from_pretrained(backbone, repo_id)`` with its head.
        """
        import tempfile

        from .hub import push_folder_to_hub

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            return push_folder_to_hub(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                                      commit_message=commit_message or "Upload adapted task", token=token)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, pretrained: str | os.PathLike, **kwargs) -> AdaptedTask:
        """Load a task saved by :meth:`save_pretrained` onto ``backbone`` (through stock PEFT).

        The backbone then carries the task's LoRA adapter (it is wrapped in place, as PEFT does).

        Raises:
            FileNotFoundError: a file of the export is missing. ValueError: a corrupt or truncated file, or a
            backbone of another model_type / feature size.
        """
        from .hub import resolve_pretrained_folder

        folder = resolve_pretrained_folder(pretrained, required_files=(TASK_FILE, HEAD_FILE, CONFIG_FILE, DRIFT_FILE),
                                           **kwargs)
        meta = read_json_checked(folder / TASK_FILE)
        head = load_safetensors_checked(folder / HEAD_FILE)
        load_safetensors_checked(folder / DRIFT_FILE)
        model_type = model_type_of(backbone)
        if meta["backbone_model_type"] != model_type:
            raise ValueError(f"This task was adapted on a {meta['backbone_model_type']!r} backbone, but a "
                             f"{model_type!r} backbone was given.")
        from transformers import AutoImageProcessor

        processor = None
        if (folder / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(str(folder))
        size = probe_feature_size(backbone, _processor_size(processor) or 224)
        if size != meta["feature_size"]:
            raise ValueError(f"This task expects features of size {meta['feature_size']}, but the backbone gives "
                             f"{size}: it was adapted on another backbone.")
        peft_model = PeftModel.from_pretrained(backbone, str(folder))
        peft_model.eval()
        parameter = next(backbone.parameters())
        task = cls(_PeftEmbedder(peft_model), head["prototypes"].to(parameter.device, parameter.dtype),
                   head["logit_scale"].to(parameter.device), head["logit_bias"].to(parameter.device),
                   meta["classes"], processor, source=meta)
        return task


def _card_repo_id(name: str) -> str:
    """A valid Hub repo id for a card: ``name`` itself when valid, else its characters Hub ids allow."""
    import re

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        return name
    except HFValidationError:
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "hyperflow-adapter"
        return cleaned[:96]


def _processor_size(processor) -> int | None:
    """The output side of an image processor, when it states one."""
    for size in (getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None,
                 getattr(processor, "size", None)):
        if size is None:
            continue
        if isinstance(size, dict):
            side = size.get("height") or size.get("shortest_edge")
        else:  # transformers' SizeDict
            side = getattr(size, "height", None) or getattr(size, "shortest_edge", None)
        if side:
            return int(side)
    data_config = getattr(processor, "data_config", None) or {}
    if data_config.get("input_size"):
        return int(data_config["input_size"][-1])
    return None


# ------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------
@dataclass
class TaskBatch:
    """T tasks adapted together.

    Attributes:
        state: the final adapted state (T tasks).
        prototypes: ``Tensor[T, C_max, D]`` adapted prototypes (with the head delta).
        class_mask: ``BoolTensor[T, C_max]`` (False for padding classes).
        encoding: the drift network's task encoding.
        sizes: support images per task.
    """

    state: TaskState
    prototypes: torch.Tensor
    class_mask: torch.Tensor
    encoding: TaskEncoding
    sizes: list[int]


class HyperFlowAdapter:
    """A HyperFlow drift network on a Hugging Face vision backbone.

    Args:
        backbone: an ``AutoModel`` vision backbone (its layers get pass-through HyperFlow wrappers, as PEFT
            does; its outputs do not change outside a task-delta block).
        config: a :class:`HyperFlowConfig` (default: lora + shift + head, Euler, 10 steps).
        image_processor: turns PIL images into pixel_values; default: the backbone's own, or a
            ViT image processor at ``config.image_size``.
    """

    def __init__(self, backbone: nn.Module | PeftModel, config: HyperFlowConfig | None = None, image_processor=None,
                 *, adapter_name: str = "default"):
        if isinstance(backbone, PeftModel):
            if not isinstance(backbone.base_model, HyperFlowModel):
                raise TypeError("The PeftModel given does not carry a HyperFlow adapter.")
            self.model = backbone
        else:
            model_type_of(backbone)
            config = copy.deepcopy(config) if config is not None else HyperFlowConfig()
            if not isinstance(config, HyperFlowConfig):
                raise TypeError(f"config must be a HyperFlowConfig, got {type(config).__name__}.")
            self.model = get_peft_model(backbone, config, adapter_name=adapter_name)
        self.model.eval()
        self.image_processor = image_processor or default_image_processor(self.backbone, self.config.image_size)
        self.name_or_path: str | None = None
        self.revision: str | None = None

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

    # -- adaptation --------------------------------------------------------------------------------
    def adapt_batch(self, pixel_values: torch.Tensor, labels: torch.Tensor, sizes: list[int], num_classes: list[int],
                    *, steps: int | None = None, integrator: str | None = None,
                    task_features: torch.Tensor | None = None) -> TaskBatch:
        """Integrate the drift for T tasks at once; differentiable w.r.t. the drift network when grad is on.

        Args:
            pixel_values: ``Tensor[N, 3, H, W]``, the support images of all tasks, task after task.
            labels: ``LongTensor[N]``, labels within each task.
            sizes: support images per task; num_classes: classes per task.
            task_features: precomputed ``task_features(pixel_values)`` (``Tensor[N, D_enc]``), if at hand.
        """
        steps = steps if steps is not None else self.config.steps
        integrator = integrator or self.config.integrator
        drift = self.drift
        # The frozen prefix (blocks before the first adapted one) runs once for both passes over the support.
        prefix, prefix_output = (self.frozen_prefix(), None) if task_features is None else (None, None)
        if prefix is not None:
            try:
                prefix_output = prefix.compute(pixel_values)
            except Uncacheable:
                prefix = None

        def skipping_prefix():
            if prefix is None:
                return contextlib.nullcontext()
            return prefix.replaced(prefix_output, pixel_values.shape[0])

        if task_features is None:
            with skipping_prefix():
                task_features = self.task_features(pixel_values)
        features0 = task_features
        encoding = drift.encode_tasks(features0, labels, sizes, num_classes)
        state = drift.integrate(encoding, steps, method=integrator)
        groups = set(self.config.groups)
        if groups & {"lora", "shift"}:
            with skipping_prefix(), self.tuner.task_deltas(state, sizes):
                features = embed(self.backbone, pixel_values)
        else:
            features = features0
        c_max = max(num_classes)
        prototypes = torch.stack([
            nn.functional.pad(class_prototypes(f, y, c), (0, 0, 0, c_max - c))
            for f, y, c in zip(features.split(sizes), labels.split(sizes), num_classes, strict=True)
        ])
        if "head" in groups:
            prototypes = prototypes + state["head.prototypes:"]
        return TaskBatch(state=state, prototypes=prototypes, class_mask=encoding.class_mask, encoding=encoding,
                         sizes=list(sizes))

    def query_logits(self, batch: TaskBatch, pixel_values: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Logits of T tasks' query images: one ``Tensor[Q_i, C_i]`` per task (differentiable)."""
        with self.tuner.task_deltas(batch.state, sizes):
            features = embed(self.backbone, pixel_values)
        out = []
        for i, f in enumerate(features.split(sizes)):
            c = int(batch.class_mask[i].sum())
            out.append(self.drift.logits(f, batch.prototypes[i, :c]))
        return out

    @torch.no_grad()
    def adapt_many(self, tasks: Sequence[tuple], *, steps: int | None = None, integrator: str | None = None
                   ) -> list[AdaptedTask]:
        """Adapt several tasks in one batch. ``tasks``: ``(support_images, support_labels)`` or
        ``(support_images, support_labels, classes)`` tuples. Returns one AdaptedTask per task."""
        if not tasks:
            raise ValueError("adapt_many needs at least one task.")
        pixel_list, label_list, class_lists = [], [], []
        for task in tasks:
            images, labels, classes = (*task, None)[:3]
            pixel_values = self.pixel_values(images)
            _check_pair(pixel_values, labels)
            encoded, names = encode_labels(labels, classes)
            pixel_list.append(pixel_values)
            label_list.append(encoded.to(pixel_list[-1].device))
            class_lists.append(names)
        sizes = [p.shape[0] for p in pixel_list]
        batch = self.adapt_batch(torch.cat(pixel_list), torch.cat(label_list), sizes,
                                 [len(c) for c in class_lists], steps=steps, integrator=integrator)
        drift = self.drift
        states = [batch.state.select(i) for i in range(len(class_lists))]
        return [
            AdaptedTask(
                _HyperFlowEmbedder(self.tuner, states[i]),
                batch.prototypes[i, : len(names)],
                drift.logit_scale.detach().clone(),
                drift.logit_bias.detach().clone(),
                names,
                self.image_processor,
                state=states[i],
                tuner=self.tuner,
                config=self.config,
                source={"source_adapter": self.name_or_path, "source_adapter_revision": self.revision,
                        "support_size": sizes[i], "base_model": self._base_model_name()},
            )
            for i, names in enumerate(class_lists)
        ]

    def adapt(self, support_images, support_labels, classes: Sequence | None = None, *, steps: int | None = None,
              integrator: str | None = None) -> AdaptedTask:
        """Adapt to one task from its support set, by integrating the drift network (no autograd).

        Args:
            support_images: a list of PIL images or a pixel_values tensor ``[S, 3, H, W]``.
            support_labels: S labels, ints or strings.
            classes: optional list of the task's classes (their order sets the order of the logits).
            steps, integrator: override the config's number of steps and integrator.
        """
        return self.adapt_many([(support_images, support_labels, classes)], steps=steps, integrator=integrator)[0]

    @torch.no_grad()
    def direct_transfer(self, support_images, support_labels, classes: Sequence | None = None) -> AdaptedTask:
        """The unadapted baseline: prototypes of the frozen backbone's features (theta_0, no head delta)."""
        pixel_values = self.pixel_values(support_images)
        _check_pair(pixel_values, support_labels)
        labels, names = encode_labels(support_labels, classes)
        features = embed(self.backbone, pixel_values)
        prototypes = class_prototypes(features, labels.to(features.device), len(names))
        return AdaptedTask(lambda pv: embed(self.backbone, pv), prototypes, self.drift.logit_scale.detach().clone(),
                           self.drift.logit_bias.detach().clone(), names, self.image_processor)

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
        from .hub import AdapterCardData, render_adapter_card

        config = self.config
        parameters = sum(p.numel() for p in self.drift.parameters())
        return render_adapter_card(AdapterCardData(
            repo_id=_card_repo_id(repo_id),
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
        theta_0), the image processor's ``preprocessor_config.json`` and the model card ``README.md``
        (``repo_id`` names the model in it, default the folder's name; with ``results`` an accuracy-vs-latency
        plot is drawn next to it)."""
        directory = Path(save_directory)
        self.model.save_pretrained(str(directory))
        self.image_processor.save_pretrained(str(directory))
        plot_path = None
        if results is not None:
            from .hub import save_results_plot

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
        import tempfile

        from .hub import push_folder_to_hub

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

        Args:
            strict_backbone: if True, a backbone whose weights differ from the ones the adapter was made for
                (content fingerprint) is an error; if False, a warning.

        Raises:
            FileNotFoundError / ValueError: missing, corrupt or truncated files; an adapter for another backbone.
        """
        from transformers import AutoImageProcessor

        from .hub import resolve_pretrained_folder

        folder = resolve_pretrained_folder(pretrained, revision=revision, token=token,
                                           required_files=(CONFIG_FILE, DRIFT_FILE))
        raw = read_json_checked(folder / CONFIG_FILE)
        if raw.get("peft_type") != "HYPERFLOW":
            raise ValueError(f"{folder} holds a {raw.get('peft_type')!r} adapter, not a HyperFlow adapter.")
        config = HyperFlowConfig.from_pretrained(str(folder))
        model_type = model_type_of(backbone)
        if config.backbone_model_type and config.backbone_model_type != model_type:
            raise ValueError(
                f"This HyperFlow adapter was made for a {config.backbone_model_type!r} backbone, but the backbone "
                f"given is a {model_type!r}. Load it onto the backbone it was trained for."
            )
        fingerprint = backbone_fingerprint(backbone) if config.backbone_fingerprint else None
        if fingerprint is not None and fingerprint != config.backbone_fingerprint:
            message = (
                f"The backbone's weights (fingerprint {fingerprint}) differ from those this "
                f"adapter was trained with ({config.backbone_fingerprint}). Load the same checkpoint, or pass "
                f"strict_backbone=False to use it anyway."
            )
            if strict_backbone:
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
        load_safetensors_checked(folder / DRIFT_FILE)
        model = PeftModel.from_pretrained(backbone, str(folder), config=config, is_trainable=False)
        model.base_model.drift.requires_grad_(False)
        processor = None
        if (folder / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(str(folder))
        adapter = cls(model, image_processor=processor)
        adapter.name_or_path = str(pretrained)
        adapter.revision = revision or _snapshot_revision(folder)
        return adapter


def _snapshot_revision(folder: Path) -> str | None:
    """The commit id of a Hub cache snapshot folder (``.../snapshots/<commit>``), else None."""
    return folder.name if folder.parent.name == "snapshots" and len(folder.name) == 40 else None
