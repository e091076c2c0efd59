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
from torch import nn

from .backbones import check_backbone, embed, model_type_of, probe_feature_size
from .cards import TaskCardData, card_repo_id, render_task_card
from .config import HyperFlowConfig
from .export import to_lora
from .heads import prototype_logits
from .hub import push_folder_to_hub, resolve_pretrained_folder
from .inputs import PROCESSOR_FILE, load_image_processor, processor_size, to_pixel_values
from .io import (
    add_checksum,
    attach_adapter_checked,
    check_tensor_shapes,
    load_safetensors_checked,
    read_json_checked,
    save_safetensors,
    unload_to_original,
)
from .state import TaskState
from .tuner.model import HyperFlowModel

__all__ = ["AdaptedTask", "HyperFlowEmbedder", "PeftEmbedder", "HEAD_FILE", "TASK_FILE"]

HEAD_FILE = "hyperflow_head.safetensors"
TASK_FILE = "hyperflow_task.json"
# Fields of the saved JSON files free to change after saving (provenance); the others set what the task computes.
TASK_PROVENANCE = ("source_adapter", "source_adapter_revision", "support_size", "base_model", "integration_time",
                   "domain_distance")
PEFT_PROVENANCE = ("peft_version", "base_model_name_or_path", "revision", "task_type", "auto_mapping", "inference_mode")


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

    @property
    def domain_distance(self) -> float | None:
        """How far the support set lay from the domains the drift network was trained on
        (:mod:`hf_hyperflow.domain_reference`; beyond the adapter's ``domain_gate`` the task keeps direct transfer,
        ``integration_time`` 0.0); None where the adapter has no domain reference."""
        return self._meta.get("domain_distance")

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        """``Tensor[B, D]``: pooled features of the adapted backbone (PIL images or pixel_values)."""
        pixel_values = to_pixel_values(images, self.image_processor, self.prototypes.device, self.prototypes.dtype)
        return self._embedder(pixel_values)

    @torch.no_grad()
    def logits(self, images) -> torch.Tensor:
        """``Tensor[Q, C]``: ``scale * (cos(f_q, p_c) + bias)``.

        Raises:
            ValueError: images :func:`~hf_hyperflow.inputs.check_images` refuses. RuntimeError: the backbone's
                features of these images are not finite (an overflow).
        """
        logits = prototype_logits(self.embed(images), self.prototypes, self.logit_scale, self.logit_bias)
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError(f"The logits of these images are not finite: the backbone's features overflowed "
                               f"({self.prototypes.dtype}); run the backbone in float32.")
        return logits

    def predict_proba(self, images) -> torch.Tensor:
        """``Tensor[Q, C]``: class probabilities (softmax of the logits), columns in ``self.classes`` order."""
        return self.logits(images).softmax(-1)

    def predict(self, images) -> list:
        """The predicted class of every image, of the same kind as the training labels (names or ints)."""
        return [self.classes[i] for i in self.logits(images).argmax(-1).tolist()]

    # -- export ------------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Take this loaded task's LoRA layers out of the backbone and return it as it was (PEFT's ``unload``); the
        task cannot be used afterwards.

        Raises:
            ValueError: a task adapted in this process, which runs on its adapter's backbone: unload the adapter.
        """
        if not isinstance(self._embedder, PeftEmbedder):
            raise ValueError("This task runs on the backbone of the HyperFlowAdapter that adapted it: call that "
                             "adapter's unload() to get the plain backbone back.")
        return unload_to_original(self._embedder.peft_model)

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
        (``README.md``; ``repo_id`` names the model in it, default the folder's name). The safetensors files
        carry the checksum of their tensors.

        Raises:
            ValueError: a task that is not an adapter (direct transfer, full fine-tuning), before anything is written.
        """
        if self.state is None and not isinstance(self._embedder, PeftEmbedder):
            kind = ("direct transfer (the backbone as it is, with class prototypes)"
                    if isinstance(self._embedder, HyperFlowEmbedder) else "full fine-tuning (every weight changed)")
            raise ValueError(
                f"This task is {kind}: it is not an adapter, so there are no adapter files to save. Keep "
                "task.prototypes and task.classes to classify with the backbone, or adapt with HyperFlow "
                "(adapter.adapt) or fine-tune with groups such as ('lora', 'shift', 'head') for a task that saves as "
                "a PEFT adapter."
            )
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        lora_sidecars = {directory / CONFIG_NAME: PEFT_PROVENANCE}
        if self.state is not None:
            lora_config, tensors = self.to_lora()
            lora_config.save_pretrained(str(directory))
            save_safetensors(tensors, directory / SAFETENSORS_WEIGHTS_NAME, sidecars=lora_sidecars)
            self._meta["backbone_model_type"] = model_type_of(self._tuner.model)
            self._meta["backbone_fingerprint"] = self._config.backbone_fingerprint
        else:
            self._embedder.peft_model.save_pretrained(str(directory))
            add_checksum(directory / SAFETENSORS_WEIGHTS_NAME, sidecars=lora_sidecars)
        meta = {
            "classes": self.classes,
            "label_kind": "str" if self.classes and isinstance(self.classes[0], str) else "int",
            "backbone_model_type": self._meta["backbone_model_type"],
            "backbone_fingerprint": self._meta["backbone_fingerprint"],
            "feature_size": int(self.prototypes.shape[1]),
            **{key: self._meta.get(key) for key in TASK_PROVENANCE},
        }
        (directory / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self.image_processor.save_pretrained(str(directory))
        save_safetensors({"prototypes": self.prototypes, "logit_scale": self.logit_scale.reshape(()),
                          "logit_bias": self.logit_bias.reshape(())}, directory / HEAD_FILE,
                         sidecars={directory / TASK_FILE: TASK_PROVENANCE, directory / PROCESSOR_FILE: ()})
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
    def from_pretrained(cls, backbone: nn.Module, pretrained: str | os.PathLike, *, strict_backbone: bool = True,
                        **kwargs) -> AdaptedTask:
        """Load a task saved by :meth:`save_pretrained` onto ``backbone`` (through stock PEFT).

        The backbone then carries the task's LoRA adapter (it is wrapped in place, as PEFT does). Every file is
        checked first (fields, checksums, shapes) and the backbone must be the one the task was adapted on (model
        type and weights' fingerprint); if the adapter's weights do not fit its config, the backbone is left as
        it was.

        Args:
            strict_backbone: if True, a backbone whose weights differ from the ones the task was adapted on is an
                error; if False, a warning.

        Raises:
            FileNotFoundError: a file of the export is missing. ValueError / TypeError: a corrupt, truncated or
            damaged file, a missing or malformed field, or a backbone of another model_type / feature size / weights.
        """
        folder = resolve_pretrained_folder(pretrained, required_files=(TASK_FILE, HEAD_FILE, CONFIG_NAME,
                                                                      SAFETENSORS_WEIGHTS_NAME, PROCESSOR_FILE), **kwargs)
        meta = _task_meta(folder / TASK_FILE)
        head = load_safetensors_checked(folder / HEAD_FILE, sidecars=(folder / TASK_FILE, folder / PROCESSOR_FILE))
        check_tensor_shapes(head, {"prototypes": (len(meta["classes"]), meta["feature_size"]), "logit_scale": (),
                                   "logit_bias": ()}, folder / HEAD_FILE, f"It does not fit {TASK_FILE}: save the task "
                            "again.")
        check_backbone(backbone, meta["backbone_model_type"], meta["backbone_fingerprint"], strict_backbone, "task")
        processor = load_image_processor(folder)
        size = probe_feature_size(backbone, processor_size(processor) or 224)
        if size != meta["feature_size"]:
            raise ValueError(f"This task expects features of size {meta['feature_size']}, but the backbone gives "
                             f"{size}: it was adapted on another backbone.")
        tensors = load_safetensors_checked(folder / SAFETENSORS_WEIGHTS_NAME, sidecars=(folder / CONFIG_NAME,))
        try:
            lora_config = LoraConfig.from_pretrained(str(folder))
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{folder / CONFIG_NAME} is not a valid LoRA config ({error}). Save the task again.") from None
        peft_model = attach_adapter_checked(backbone, lora_config, tensors, folder / SAFETENSORS_WEIGHTS_NAME)
        peft_model.eval()
        parameter = next(backbone.parameters())
        return cls(PeftEmbedder(peft_model), head["prototypes"].to(parameter.device, parameter.dtype),
                   head["logit_scale"].to(parameter.device), head["logit_bias"].to(parameter.device),
                   meta["classes"], processor, source=meta)


def _task_meta(path: Path) -> dict:
    """``hyperflow_task.json``, its required fields present and of the right types.

    Raises:
        ValueError: a missing field, or one of the wrong type, naming the file.
    """
    meta = read_json_checked(path)
    fix = "It was edited or written by another tool: save the task again."
    missing = [name for name in ("classes", "label_kind", "backbone_model_type", "backbone_fingerprint",
                                 "feature_size") if meta.get(name) is None]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}. {fix}")
    classes = meta["classes"]
    kind = {"str": str, "int": int}.get(meta["label_kind"]) if isinstance(meta["label_kind"], str) else None
    if (kind is None or not isinstance(classes, list) or len(classes) < 2 or len(set(map(repr, classes))) != len(classes)
            or not all(type(c) is kind for c in classes)):
        raise ValueError(f"{path}: classes must be a list of at least two distinct labels of the kind label_kind says "
                         f"('str' or 'int'), got classes={classes!r:.100} and label_kind={meta['label_kind']!r}. {fix}")
    if not all(isinstance(meta[n], str) and meta[n] for n in ("backbone_model_type", "backbone_fingerprint")):
        raise ValueError(f"{path}: backbone_model_type and backbone_fingerprint must be strings. {fix}")
    if type(meta["feature_size"]) is not int or meta["feature_size"] < 1:
        raise ValueError(f"{path}: feature_size must be a positive integer, got {meta['feature_size']!r}. {fix}")
    return meta
