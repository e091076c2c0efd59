"""The transformers pipeline ``"few-shot-image-classification"`` (registered when ``hf_hyperflow`` is imported).

    from transformers import pipeline
    import hf_hyperflow  # noqa: F401  (registers the task)

    classifier = pipeline("few-shot-image-classification", model="path/or/backbone-id", adapter="org/adapter")
    classifier("query.jpg", support="my_photos/")                  # one subfolder of images per class
    classifier(["a.jpg", "b.jpg"], support_images=images, support_labels=labels, top_k=3)
    classifier("query.jpg", support="my_photos/", method="dt")    # direct transfer, the baseline

Each image gets the list of ``{"label", "score"}`` of its ``top_k`` classes, highest score first, as the
image-classification pipeline returns them. The adapted task is kept while the support set's content (and
the method, steps and integrator) stay the same, so repeated calls with one support set adapt once.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from transformers import AutoModel, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .adapter import HyperFlowAdapter
from .fingerprint import fingerprint
from .folders import load_support_folder
from .task import AdaptedTask

__all__ = ["FewShotImageClassificationPipeline", "TASK_NAME", "METHODS", "support_fingerprint"]

TASK_NAME = "few-shot-image-classification"
METHODS = ("hyperflow", "dt")
_SUPPORT_KEYS = ("support", "support_images", "support_labels")
_ADAPT_KEYS = ("method", "steps", "integrator")
_CACHED_TASKS = 4


def support_fingerprint(images, labels, **settings) -> str:
    """A content digest (:func:`~hf_hyperflow.fingerprint.fingerprint`) of a support set: the pixels (mode and
    size) of PIL images or the values of a ``Tensor[S, 3, H, W]``, the labels, and ``settings`` (method,
    steps...). Equal content, equal digest."""
    if isinstance(images, torch.Tensor):
        parts = [f"tensor{tuple(images.shape)}{images.dtype}", images]
    else:
        parts = [part for image in images for part in (f"{image.mode}{image.size}", image.tobytes())]
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    return fingerprint([*parts, json.dumps([labels, sorted(settings.items())], default=str)])


class FewShotImageClassificationPipeline(Pipeline):
    """Few-shot image classification: adapt a backbone to the classes of a support set with a HyperFlow adapter
    (forward passes only), then classify query images.

    Args:
        model: the backbone (an ``AutoModel`` vision model the adapter was made for).
        adapter: a HyperFlow adapter folder or Hub id, or a :class:`HyperFlowAdapter` built on ``model``.
        adapter_revision: revision of a Hub adapter. strict_backbone: see ``HyperFlowAdapter.from_pretrained``.
        image_processor: default the adapter's own (the one ``adapter.adapt`` uses).
        support / support_images / support_labels, method, steps, integrator, top_k: defaults for the calls (a
            call's own support set replaces this one; its own method / steps / integrator replace these).

    Call arguments:
        images: an image (PIL image, local path or URL) or a list of them.
        support: an image folder (one subfolder of images per class), or else
        support_images: PIL images, paths or URLs (or a ``Tensor[S, 3, H, W]``), with support_labels: S labels
            (names or ints; the returned labels are of the same kind).
        method: ``"hyperflow"`` (default) or ``"dt"`` (direct transfer: prototypes of the unadapted backbone).
        steps, integrator: override the adapter's integration settings.
        top_k: how many classes to return per image (default 5, at most the number of classes).
    """

    _load_processor = False
    _load_image_processor = False  # the adapter's own processor is used, so that results equal adapter.adapt's
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model, adapter: str | os.PathLike | HyperFlowAdapter | None = None, *,
                 adapter_revision: str | None = None, strict_backbone: bool = True, **kwargs):
        defaults = {key: kwargs.pop(key) for key in (*_SUPPORT_KEYS, *_ADAPT_KEYS) if key in kwargs}
        self.adapter = _resolve_adapter(model, adapter, adapter_revision, strict_backbone)
        self._tasks: OrderedDict[str, AdaptedTask] = OrderedDict()
        self._defaults = defaults
        super().__init__(model=model, **kwargs)
        if self.image_processor is None:
            self.image_processor = self.adapter.image_processor
        else:
            self.adapter.image_processor = self.image_processor
        self.adapter.model.to(self.device)  # the drift network lives beside the backbone, not inside it
        if _pick(defaults, _SUPPORT_KEYS):  # adapt to the construction's support set now
            params = self._sanitize_parameters(**defaults)
            for mine, new in zip((self._preprocess_params, self._forward_params, self._postprocess_params), params,
                                 strict=True):
                mine.update(new)

    def _sanitize_parameters(self, support=None, support_images=None, support_labels=None, method=None, steps=None,
                             integrator=None, top_k=None, timeout=None):
        """A call's support set, or its method / steps / integrator, adapts (or finds) the task it classifies
        with; the support set given at construction serves calls without one, and the method, steps and
        integrator given at construction serve calls that give none of them."""
        preprocess = {} if timeout is None else {"timeout": timeout}
        forward, postprocess = {}, {}
        given = _not_none(support=support, support_images=support_images, support_labels=support_labels)
        settings = _not_none(method=method, steps=steps, integrator=integrator)
        if given or settings:
            given = given or _pick(self._defaults, _SUPPORT_KEYS)
            if not given:
                raise ValueError(f"{settings} were given without a support set: pass support=FOLDER or "
                                 f"support_images=... with support_labels=....")
            task = self._adapted_task(**given, **(settings or _pick(self._defaults, _ADAPT_KEYS)))
            forward["task"] = task
            postprocess["classes"] = task.classes
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            postprocess["top_k"] = top_k
        return preprocess, forward, postprocess

    def _adapted_task(self, support=None, support_images=None, support_labels=None, method=None, steps=None,
                      integrator=None) -> AdaptedTask:
        """The task adapted to this support set, from the cache when its content was seen before."""
        images, labels = _support_set(support, support_images, support_labels)
        method = method or "hyperflow"
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if method == "dt" and (steps is not None or integrator is not None):
            raise ValueError("steps and integrator apply to method='hyperflow'; direct transfer integrates nothing.")
        key = support_fingerprint(images, labels, method=method, steps=steps, integrator=integrator)
        if key in self._tasks:
            self._tasks.move_to_end(key)
            return self._tasks[key]
        if method == "dt":
            task = self.adapter.direct_transfer(images, labels)
        else:
            task = self.adapter.adapt(images, labels, steps=steps, integrator=integrator)
        self._tasks[key] = task
        while len(self._tasks) > _CACHED_TASKS:
            self._tasks.popitem(last=False)
        return task

    def __call__(self, images, **kwargs):
        """Classify ``images`` (one image, or a list) among the support set's classes; see the class docstring.

        Returns:
            for one image, a list of ``{"label", "score"}``; for a list of images, one such list per image.
        """
        return super().__call__(images, **kwargs)

    def preprocess(self, image, timeout=None) -> dict[str, torch.Tensor]:
        """``{"pixel_values": Tensor[1, 3, H, W]}`` from a PIL image, a local path or a URL (converted to RGB)."""
        pixel_values = self.image_processor(images=load_image(image, timeout=timeout), return_tensors="pt")
        return {"pixel_values": pixel_values["pixel_values"].to(self.dtype)}

    def _forward(self, model_inputs, task: AdaptedTask | None = None) -> dict[str, torch.Tensor]:
        """``{"probabilities": Tensor[B, C]}`` of the adapted task's classes."""
        if task is None:
            raise ValueError("No support set: call the pipeline with support=FOLDER (one subfolder of images per "
                             "class) or with support_images=... and support_labels=....")
        return {"probabilities": task.predict_proba(model_inputs["pixel_values"])}

    def postprocess(self, model_outputs, classes: list | None = None, top_k: int = 5) -> list[dict]:
        """The ``top_k`` classes of one image as ``{"label", "score"}``, highest score first."""
        scores = model_outputs["probabilities"][0].float().tolist()
        ranked = [{"label": label, "score": score} for label, score in zip(classes, scores, strict=True)]
        ranked.sort(key=lambda entry: entry["score"], reverse=True)
        return ranked[:top_k]

    def save_pretrained(self, save_directory, **kwargs):
        """Not supported: the backbone carries the adapter's layers here. Save ``pipe.adapter`` (and load the
        backbone as it was), then rebuild with ``pipeline(TASK_NAME, model=backbone, adapter=folder)``."""
        raise NotImplementedError(
            f"A {TASK_NAME} pipeline is not saved as a whole: save its adapter with pipe.adapter.save_pretrained(DIR)"
            f" and build the pipeline again with pipeline({TASK_NAME!r}, model=BACKBONE, adapter=DIR)."
        )


def _not_none(**values) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def _pick(values: dict, keys: tuple[str, ...]) -> dict:
    return {key: values[key] for key in keys if key in values}


def _resolve_adapter(model, adapter, revision, strict_backbone) -> HyperFlowAdapter:
    if adapter is None:
        raise ValueError(f"The {TASK_NAME} pipeline needs adapter= (a HyperFlow adapter folder or Hub id, or a "
                         f"HyperFlowAdapter).")
    if isinstance(adapter, HyperFlowAdapter):
        if adapter.backbone is not model:
            raise ValueError("The HyperFlowAdapter given was built on another backbone: pass model=adapter.backbone.")
        return adapter
    if not isinstance(adapter, str | os.PathLike):
        raise TypeError(f"adapter must be a folder, a Hub id or a HyperFlowAdapter, got {type(adapter).__name__}.")
    return HyperFlowAdapter.from_pretrained(model, adapter, revision=revision, strict_backbone=strict_backbone)


def _support_set(support, support_images, support_labels) -> tuple[list | torch.Tensor, list]:
    """``(images, labels)`` of a support set given as a folder or as images (PIL, paths, URLs, a tensor) + labels."""
    if support is not None:
        if support_images is not None or support_labels is not None:
            raise ValueError("Give either support=FOLDER or support_images= with support_labels=, not both.")
        if not isinstance(support, str | os.PathLike):
            raise TypeError(f"support must be an image folder path (one subfolder per class), got "
                            f"{type(support).__name__}; pass images and labels as support_images=, support_labels=.")
        return load_support_folder(support)
    if support_images is None or support_labels is None:
        raise ValueError("support_images and support_labels go together: give both (or support=FOLDER).")
    if isinstance(support_images, torch.Tensor):
        return support_images, support_labels
    if not isinstance(support_images, list | tuple):
        raise TypeError(f"support_images must be a list of images (PIL, paths or URLs) or a Tensor[S, 3, H, W], "
                        f"got {type(support_images).__name__}.")
    return [load_image(image) for image in support_images], support_labels


PIPELINE_REGISTRY.register_pipeline(TASK_NAME, pipeline_class=FewShotImageClassificationPipeline, pt_model=AutoModel,
                                    type="image")
