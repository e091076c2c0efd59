"""Model cards of adapters and adapted tasks, rendered from the Jinja templates in ``model_cards/``.

The templates are package data (``hf_hyperflow/model_cards``, a link to the repository's ``model_cards/`` in a
checkout, copied into the wheel) read with ``importlib.resources``. Metadata goes through
``huggingface_hub.ModelCardData``: library, base model, datasets, tags and, with evaluation results, a
model-index with the adapter's accuracy per dataset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checks import check_int, check_number, check_str, check_str_list
from .hub import LIBRARY_NAME, is_hub_id
from .results import (
    format_bytes,
    headline_method,
    protocol_text,
    result_rows,
    validate_results,
)

__all__ = ["AdapterCardData", "TaskCardData", "render_adapter_card", "render_task_card", "card_repo_id",
           "template_text"]

ADAPTER_TEMPLATE = "adapter_card.md"
TASK_TEMPLATE = "task_card.md"
BASE_TAGS = ("hyperflow", "peft", "few-shot", "image-classification")


def template_text(name: str) -> str:
    """The text of a card template, ``hf_hyperflow/model_cards/<name>`` (package data)."""
    template = resources.files("hf_hyperflow").joinpath("model_cards", name)
    if not template.is_file():
        raise FileNotFoundError(f"The model card template {name} is missing from the package (hf_hyperflow/"
                                f"model_cards/{name}); reinstall hf-hyperflow.")
    return template.read_text(encoding="utf-8")


def card_repo_id(name: str) -> str:
    """A valid Hub repo id for a card: ``name`` itself when valid, else its characters Hub ids allow."""
    try:
        validate_repo_id(name)
        return name
    except HFValidationError:
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "hyperflow-adapter"
        return cleaned[:96]


def eval_results(results: dict, method: str) -> list[EvalResult]:
    """One model-index entry per dataset for ``method``: accuracy (%) with its 95% CI in the metric args."""
    meta = results["meta"]
    task_name = f"Few-shot image classification ({protocol_text(meta)})"
    out = []
    for dataset, methods in results["results"].items():
        if method not in methods:
            continue
        metrics = methods[method]
        out.append(EvalResult(
            task_type="image-classification",
            task_name=task_name,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type="accuracy",
            metric_value=float(metrics["accuracy"]),
            metric_name=f"accuracy (%, mean of {metrics['episodes']} episodes)",
            metric_args={"ci95": float(metrics["ci95"]), "episodes": int(metrics["episodes"]), "method": method},
        ))
    return out


def _check_repo_id(repo_id: Any, name: str = "repo_id") -> None:
    check_str(repo_id, name)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{name} {repo_id!r} is not a valid Hub repo id ('namespace/name'): {error}") from error


def _check_positive(card: Any, *names: str) -> None:
    """The named fields of a card are None or positive integers (``lora_alpha``, when present, a number > 0)."""
    for name in names:
        if getattr(card, name) is not None:
            check_int(getattr(card, name), name, 1)
    if getattr(card, "lora_alpha", None) is not None:
        check_number(card.lora_alpha, "lora_alpha", 0.0, strict_low=True)


def _stopping_times(steps: int | None, points: int | None) -> str | None:
    """The integration times the auto stopping rule judges, e.g. ``"t = 0, 0.5, 1"``; None if unknown."""
    if not steps or not points:
        return None
    from .stopping import candidate_steps  # torch: only when a card is rendered

    return "t = " + ", ".join(f"{k / steps:g}" for k in candidate_steps(steps, points))


def _target_summary(target_modules: str | Sequence[str] | None) -> str | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return f"`{target_modules}`"
    return ", ".join(f"`{m}`" for m in target_modules)


def _metadata(*, library_name: str, base_model: str, license: str, pipeline_tag: str, tags: Sequence[str],
              datasets: Sequence[str] = (), model_name: str | None = None,
              eval_results: list[EvalResult] | None = None) -> ModelCardData:
    extra: dict[str, Any] = {}
    if is_hub_id(base_model):
        extra = {"base_model": base_model, "base_model_relation": "adapter"}
    return ModelCardData(
        library_name=library_name,
        license=license,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        datasets=list(datasets) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )


def _render(template: str, metadata: ModelCardData, d: AdapterCardData | TaskCardData, **variables: Any) -> ModelCard:
    """Fill ``template`` with the metadata block and the variables both card kinds share, plus ``variables``."""
    return ModelCard.from_template(
        metadata,
        template_str=template_text(template),
        repo_id=d.repo_id,
        model_title=d.repo_id.split("/")[-1],
        backbone=d.base_model,
        backbone_is_hub_id=is_hub_id(d.base_model),
        backbone_revision=d.base_model_revision,
        backbone_model_type=d.backbone_model_type,
        **variables,
    )


@dataclass
class AdapterCardData:
    """What the model card of a HyperFlow adapter says.

    Args:
        repo_id: the Hub id the adapter is (or will be) pushed to; also the model name in the metadata.
        base_model: the backbone: a Hub id (goes into the ``base_model`` metadata) or a local name.
        base_model_revision: the backbone's revision or content fingerprint the adapter was trained on.
        backbone_model_type: transformers ``model_type`` of the backbone (``"dinov2"``...).
        feature_size: size D of the backbone's image embedding.
        groups: adapted parameter groups (``"lora"``, ``"shift"``, ``"head"``).
        target_modules: the LoRA target modules (names or a regex), as configured.
        lora_rank / lora_alpha: LoRA rank r and alpha of the ``lora`` group.
        integrator / steps: how the drift is integrated (``"euler"``, ``"rk4"``...) and in how many steps.
        stopping: ``"fixed"`` (every task integrated to t=1) or ``"auto"`` (each task stops where its support
            set classifies itself best); None leaves it out.
        stopping_points: how many evenly spaced points of the path ``"auto"`` judges (2: t = 0 and 1); shown
            only with ``"auto"``.
        domain_gate: the distance to the training sources beyond which a task keeps direct transfer
            (:mod:`hf_hyperflow.domain_reference`); None: every task is integrated.
        domain_sources: the training sources of the domain reference.
        drift_parameters / drift_bytes: size of the drift network (parameter count; bytes on disk).
        training_config: the meta-training configuration, shown as YAML.
        training_datasets: datasets the drift network was trained on (metadata ``datasets``).
        license: license id of the adapter.
        results: an evaluation ``results.json`` object (see :func:`load_results`), or None.
        eval_method: the results' method that is this adapter (default ``"hyperflow"``, or the only
            ``"hyperflow*"`` method); its accuracy per dataset goes into the model-index metadata.
        plot_path: repo-relative path of the accuracy-vs-latency image (see :func:`save_results_plot`).
        tags: extra tags.
        pipeline_tag: Hub pipeline tag.
    """

    repo_id: str
    base_model: str
    base_model_revision: str | None = None
    backbone_model_type: str | None = None
    feature_size: int | None = None
    groups: list[str] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    integrator: str | None = None
    steps: int | None = None
    stopping: str | None = None
    stopping_points: int | None = None
    domain_gate: float | None = None
    domain_sources: list[str] = field(default_factory=list)
    drift_parameters: int | None = None
    drift_bytes: int | None = None
    training_config: dict = field(default_factory=dict)
    training_datasets: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    results: dict | None = None
    eval_method: str | None = None
    plot_path: str | None = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str = "image-classification"

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        check_str(self.base_model, "base_model")
        for name in ("base_model_revision", "backbone_model_type", "integrator", "eval_method", "plot_path"):
            check_str(getattr(self, name), name, optional=True)
        check_str(self.license, "license")
        check_str(self.pipeline_tag, "pipeline_tag")
        check_str_list(self.groups, "groups")
        check_str_list(self.training_datasets, "training_datasets")
        check_str_list(self.tags, "tags")
        check_str_list(self.domain_sources, "domain_sources")
        if self.domain_gate is not None:
            check_number(self.domain_gate, "domain_gate", 0.0, strict_low=True)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            check_str_list(self.target_modules, "target_modules")
        _check_positive(self, "feature_size", "lora_rank", "steps", "drift_parameters", "drift_bytes")
        if self.stopping_points is not None:
            check_int(self.stopping_points, "stopping_points", 2)
        if "lora" in self.groups and self.lora_rank is None:
            raise ValueError("groups include 'lora' but lora_rank is None: give the LoRA rank.")
        if not isinstance(self.training_config, Mapping):
            raise TypeError(f"training_config must be a dict, got {type(self.training_config).__name__}.")
        if self.results is not None:
            validate_results(self.results, source="AdapterCardData.results")
            self.eval_method = headline_method(self.results, self.eval_method)
        elif self.eval_method is not None:
            raise ValueError("eval_method is set but there are no results.")
        if self.plot_path is not None:
            posix = PurePosixPath(self.plot_path)
            if posix.is_absolute() or ".." in posix.parts or "\\" in self.plot_path:
                raise ValueError(f"plot_path must be a path inside the repo such as 'accuracy_vs_latency.png', "
                                 f"got {self.plot_path!r}.")


def render_adapter_card(card_data: AdapterCardData) -> ModelCard:
    """The model card of a HyperFlow adapter, from ``model_cards/adapter_card.md``.

    Metadata: library_name, base_model (when a Hub id), datasets, tags, pipeline_tag, license and, with
    results, a model-index with the adapter's accuracy per dataset (95% CI in the metric args).
    """
    if not isinstance(card_data, AdapterCardData):
        raise TypeError(f"render_adapter_card takes an AdapterCardData, got {type(card_data).__name__}.")
    d = card_data
    model_index = eval_results(d.results, d.eval_method) if d.results is not None else None
    metadata = _metadata(
        library_name=LIBRARY_NAME, base_model=d.base_model, license=d.license, pipeline_tag=d.pipeline_tag,
        tags=[*BASE_TAGS, *([d.backbone_model_type] if d.backbone_model_type else []), *d.tags],
        datasets=d.training_datasets, model_name=d.repo_id.split("/")[-1], eval_results=model_index,
    )
    results_meta = d.results["meta"] if d.results is not None else None
    return _render(
        ADAPTER_TEMPLATE, metadata, d,
        feature_size=d.feature_size,
        groups=", ".join(f"`{g}`" for g in d.groups) if d.groups else None,
        target_modules=_target_summary(d.target_modules),
        lora_rank=d.lora_rank,
        lora_alpha=d.lora_alpha,
        integrator=d.integrator,
        steps=d.steps,
        stopping=d.stopping,
        stopping_times=_stopping_times(d.steps, d.stopping_points) if d.stopping == "auto" else None,
        domain_gate=d.domain_gate,
        domain_sources=", ".join(d.domain_sources) if d.domain_sources else None,
        drift_parameters=f"{d.drift_parameters:,}" if d.drift_parameters else None,
        drift_size=format_bytes(d.drift_bytes) if d.drift_bytes else None,
        training_config=yaml.safe_dump(dict(d.training_config), sort_keys=False).strip() if d.training_config else None,
        training_datasets=d.training_datasets,
        results_meta=results_meta,
        protocol=protocol_text(results_meta) if results_meta else None,
        result_rows=result_rows(d.results, d.eval_method) if d.results is not None else [],
        headline_method=d.eval_method,
        plot_path=d.plot_path,
    )


@dataclass
class TaskCardData:
    """What the model card of an adapted task (a plain PEFT LoRA adapter plus a prototype head) says.

    Args:
        repo_id: the Hub id the task is (or will be) pushed to.
        base_model: the backbone: a Hub id (goes into the ``base_model`` metadata) or a local name.
        class_names: the task's classes, in the order of the head's rows.
        source_adapter: the HyperFlow adapter (Hub id or name) that produced the task.
        source_adapter_revision: its revision (commit id) when known.
        base_model_revision: the backbone's revision or content fingerprint.
        backbone_model_type: transformers ``model_type`` of the backbone.
        lora_rank / lora_alpha / target_modules: the exported LoRA adapter's settings.
        support_size: number of labelled support images the task was adapted from.
        head_file / classes_file: files holding the head (prototypes [C, D], logit_scale, logit_bias) and
            the class names (``{"classes": [...]}``).
        license / tags / pipeline_tag: metadata.
    """

    repo_id: str
    base_model: str
    class_names: list[str]
    source_adapter: str
    source_adapter_revision: str | None = None
    base_model_revision: str | None = None
    backbone_model_type: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: str | list[str] | None = None
    support_size: int | None = None
    head_file: str = "hyperflow_head.safetensors"
    classes_file: str = "hyperflow_task.json"
    license: str = "apache-2.0"
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str = "image-classification"

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        for name in ("base_model", "source_adapter", "head_file", "classes_file", "license", "pipeline_tag"):
            check_str(getattr(self, name), name)
        for name in ("source_adapter_revision", "base_model_revision", "backbone_model_type"):
            check_str(getattr(self, name), name, optional=True)
        check_str_list(self.class_names, "class_names")
        if len(self.class_names) < 2:
            raise ValueError(f"A task has at least 2 classes, got {list(self.class_names)}.")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {list(self.class_names)}.")
        check_str_list(self.tags, "tags")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            check_str_list(self.target_modules, "target_modules")
        _check_positive(self, "lora_rank", "support_size")


def render_task_card(card_data: TaskCardData) -> ModelCard:
    """The model card of an adapted task, from ``model_cards/task_card.md``: its classes, the adapter it
    came from, and how to load it with stock PEFT (``library_name: peft``)."""
    if not isinstance(card_data, TaskCardData):
        raise TypeError(f"render_task_card takes a TaskCardData, got {type(card_data).__name__}.")
    d = card_data
    metadata = _metadata(
        library_name="peft", base_model=d.base_model, license=d.license, pipeline_tag=d.pipeline_tag,
        tags=[*BASE_TAGS, "lora", LIBRARY_NAME, *([d.backbone_model_type] if d.backbone_model_type else []), *d.tags],
    )
    return _render(
        TASK_TEMPLATE, metadata, d,
        class_names=list(d.class_names),
        source_adapter=d.source_adapter,
        source_adapter_is_hub_id=is_hub_id(d.source_adapter),
        source_adapter_revision=d.source_adapter_revision,
        lora_rank=d.lora_rank,
        lora_alpha=d.lora_alpha,
        target_modules=_target_summary(d.target_modules),
        support_size=d.support_size,
        head_file=d.head_file,
        classes_file=d.classes_file,
    )
