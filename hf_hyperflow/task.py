"""AdaptedTask: a backbone adapted to one few-shot task, with its cosine prototype classifier.

    task = adapter.adapt(support_images, support_labels)
    task.predict(query_images)           # class names (or ints) of the query images
    task.save_pretrained("my-task")      # a plain PEFT LoRA adapter + the head: stock PEFT loads it
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn
from transformers import AutoImageProcessor

from .backbones import embed, model_type_of, probe_feature_size
from .cards import TaskCardData, card_repo_id, render_task_card
from .config import HyperFlowConfig
from .export import to_lora
from .heads import prototype_logits
from .hub import push_folder_to_hub, resolve_pretrained_folder
from .inputs import processor_size, to_pixel_values
from .io import load_safetensors_checked, read_json_checked
from .state import TaskState
from .tuner.model import HyperFlowModel, peft_wrapping

__all__ = ["AdaptedTask", "HyperFlowEmbedder", "PeftEmbedder", "HEAD_FILE", "TASK_FILE"]

HEAD_FILE = "hyperflow_head.safetensors"
TASK_FILE = "hyperflow_task.json"


class HyperFlowEmbedder:
    """Features ``Tensor[B, D]`` of the backbone carrying one task's delta (HyperFlow layers, no merge);
    with ``state=None`` the backbone at theta_0 (direct transfer)."""

    def __init__(self, tuner: HyperFlowModel, state: TaskState | None):
        self.tuner, self.state = tuner, state

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            return embed(self.tuner.model, pixel_values)
        with self.tuner.task_deltas(self.state, [pixel_values.shape[0]]):
            return embed(self.tuner.model, pixel_values)


class PeftEmbedder:
    """Features ``Tensor[B, D]`` of a backbone carrying a stock PEFT (LoRA) adapter."""

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

    @property
    def integration_time(self) -> float | None:
        """How far along the drift's path this task was adapted: 1.0 for the whole path, 0.0 for direct
        transfer (``steps="auto"`` chooses per task); None for a task not made by HyperFlow integration."""
        return self._meta.get("integration_time")

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
        """The task's adapter as a stock PEFT LoRA config and state dict (keys as PEFT saves them); see
        :func:`hf_hyperflow.export.to_lora`."""
        if self.state is None or self._tuner is None:
            raise ValueError(
                "This task has no HyperFlow state to export as LoRA: it was loaded from a PEFT export (save it with "
                "save_pretrained), or it is direct transfer / full fine-tuning, which are not adapters."
            )
        return to_lora(self.state, self._tuner, self._config)

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
            save_file(tensors, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
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
            "integration_time": self._meta.get("integration_time"),
        }
        (directory / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(directory))
        card = self.model_card(repo_id or directory.name)
        card.save(str(directory / "README.md"))

    def model_card(self, repo_id: str):
        """The task's model card (``huggingface_hub.ModelCard``): classes, source adapter, stock-PEFT usage."""
        lora = json.loads(self._lora_config_json()) if self.state is not None else {}
        return render_task_card(TaskCardData(
            repo_id=card_repo_id(repo_id),
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
        folder = resolve_pretrained_folder(pretrained, required_files=(TASK_FILE, HEAD_FILE, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME),
                                           **kwargs)
        meta = read_json_checked(folder / TASK_FILE)
        head = load_safetensors_checked(folder / HEAD_FILE)
        load_safetensors_checked(folder / SAFETENSORS_WEIGHTS_NAME)
        model_type = model_type_of(backbone)
        if meta["backbone_model_type"] != model_type:
            raise ValueError(f"This task was adapted on a {meta['backbone_model_type']!r} backbone, but a "
                             f"{model_type!r} backbone was given.")
        processor = None
        if (folder / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(str(folder))
        size = probe_feature_size(backbone, processor_size(processor) or 224)
        if size != meta["feature_size"]:
            raise ValueError(f"This task expects features of size {meta['feature_size']}, but the backbone gives "
                             f"{size}: it was adapted on another backbone.")
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(backbone, str(folder))
        peft_model.eval()
        parameter = next(backbone.parameters())
        task = cls(PeftEmbedder(peft_model), head["prototypes"].to(parameter.device, parameter.dtype),
                   head["logit_scale"].to(parameter.device), head["logit_bias"].to(parameter.device),
                   meta["classes"], processor, source=meta)
        return task
