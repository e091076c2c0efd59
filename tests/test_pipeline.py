"""The transformers pipeline "few-shot-image-classification": same answers as the Python API, task reuse,
direct transfer, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import digit_images, make_backbone, randomize_drift, save_tiny_adapter, write_image_folder
from tolerances import assert_same_math
from transformers import AutoModel, pipeline

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.pipeline import TASK_NAME, FewShotImageClassificationPipeline, support_fingerprint

CLASSES, SHOTS = 3, 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny backbone, a saved adapter with a random (non-zero) drift, a support folder, query images."""
    root = tmp_path_factory.mktemp("pipeline")
    backbone, adapter = save_tiny_adapter(root)
    images = digit_images(classes=CLASSES, per_class=SHOTS + 2)
    support = {name: shots[:SHOTS] for name, shots in images.items()}
    queries = [image for shots in images.values() for image in shots[SHOTS:]]
    return {"backbone": backbone, "adapter": adapter, "queries": queries, "support": support,
            "folder": write_image_folder(root / "support", support)}


def api_adapter(saved) -> HyperFlowAdapter:
    return HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(saved["backbone"]), saved["adapter"])


def support_lists(saved):
    names = sorted(saved["support"])
    return [image for name in names for image in saved["support"][name]], [n for n in names for _ in range(SHOTS)]


@pytest.fixture(scope="module")
def classifier(saved):
    return pipeline(TASK_NAME, model=str(saved["backbone"]), adapter=str(saved["adapter"]), device="cpu")


def assert_matches(results, probabilities, classes, top_k):
    """Each image's ``top_k`` entries are the API's classes in decreasing probability, with its scores."""
    assert len(results) == probabilities.shape[0]
    for entries, row in zip(results, probabilities, strict=True):
        order = torch.argsort(row, descending=True, stable=True)[:top_k].tolist()
        assert [e["label"] for e in entries] == [classes[i] for i in order]
        assert_same_math(torch.tensor([e["score"] for e in entries]), row[order])
        assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)


def test_pipeline_on_a_folder_equals_adapt_predict_proba(saved, classifier):
    assert isinstance(classifier, FewShotImageClassificationPipeline)
    images, labels = support_lists(saved)
    task = api_adapter(saved).adapt(images, labels)
    expected = task.predict_proba(saved["queries"])
    results = classifier(saved["queries"], support=saved["folder"])
    assert_matches(results, expected, task.classes, top_k=CLASSES)  # default top_k 5, capped at 3 classes
    assert [r[0]["label"] for r in results] == task.predict(saved["queries"])
    top2 = classifier(saved["queries"], support=saved["folder"], top_k=2, batch_size=4)
    assert_matches(top2, expected, task.classes, top_k=2)
    single = classifier(saved["queries"][0], support=saved["folder"], top_k=1)
    assert single == [results[0][0]]


def test_direct_transfer_and_integration_settings(saved, classifier):
    images, labels = support_lists(saved)
    adapter = api_adapter(saved)
    dt = adapter.direct_transfer(images, labels)
    results = classifier(saved["queries"], support_images=images, support_labels=labels, method="dt")
    assert_matches(results, dt.predict_proba(saved["queries"]), dt.classes, top_k=CLASSES)
    rk4 = adapter.adapt(images, labels, steps=2, integrator="rk4")
    results = classifier(saved["queries"], support=saved["folder"], steps=2, integrator="rk4")
    assert_matches(results, rk4.predict_proba(saved["queries"]), rk4.classes, top_k=CLASSES)
    hyperflow = adapter.adapt(images, labels).predict_proba(saved["queries"])
    assert (hyperflow - dt.predict_proba(saved["queries"])).abs().max() > 1e-4, "the random drift must matter"


def test_task_is_reused_while_the_support_content_is_unchanged(saved, monkeypatch):
    classifier = pipeline(TASK_NAME, model=AutoModel.from_pretrained(saved["backbone"]), adapter=str(saved["adapter"]),
                          device="cpu")
    calls = []
    adapt = classifier.adapter.adapt
    monkeypatch.setattr(classifier.adapter, "adapt", lambda *a, **k: calls.append(1) or adapt(*a, **k))
    images, labels = support_lists(saved)
    query = saved["queries"][0]
    first = classifier(query, support_images=images, support_labels=labels)
    copies = [image.copy() for image in images]  # other objects, same content
    assert classifier(query, support_images=copies, support_labels=labels) == first
    assert classifier(query, support=saved["folder"]) == first  # the same content, read from the files
    assert len(calls) == 1
    changed = copies[:-1] + [copies[-1].rotate(90)]
    classifier(query, support_images=changed, support_labels=labels)
    classifier(query, support_images=images, support_labels=labels[::-1])
    assert len(calls) == 3


def test_support_given_at_construction_and_integer_labels(saved):
    images, labels = support_lists(saved)
    numbers = [sorted(saved["support"]).index(name) for name in labels]
    classifier = pipeline(TASK_NAME, model=str(saved["backbone"]), adapter=str(saved["adapter"]), device="cpu",
                          support_images=images, support_labels=numbers, top_k=2)
    results = classifier(saved["queries"])
    task = api_adapter(saved).adapt(images, numbers)
    assert_matches(results, task.predict_proba(saved["queries"]), task.classes, top_k=2)
    assert all(isinstance(entry["label"], int) for entries in results for entry in entries)
    dt = classifier(saved["queries"], method="dt")  # the construction's support set, another method
    assert_matches(dt, api_adapter(saved).direct_transfer(images, numbers).predict_proba(saved["queries"]),
                   task.classes, top_k=2)
    by_default_dt = pipeline(TASK_NAME, model=str(saved["backbone"]), adapter=str(saved["adapter"]), device="cpu",
                             method="dt")
    assert by_default_dt(saved["queries"], support_images=images, support_labels=numbers, top_k=2) == dt
    assert by_default_dt(saved["queries"], support_images=images, support_labels=numbers, top_k=2,
                         method="hyperflow") == results


def test_an_adapter_object_and_tensor_support(saved):
    backbone = make_backbone("vit")
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(steps=2))
    randomize_drift(adapter, seed=3)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classifier = pipeline(TASK_NAME, model=backbone, adapter=adapter, device="cpu")
    results = classifier(saved["queries"], support_images=pixels, support_labels=["a", "b", "a", "b"])
    task = adapter.adapt(pixels, ["a", "b", "a", "b"])
    assert_matches(results, task.predict_proba(saved["queries"]), task.classes, top_k=2)
    with pytest.raises(ValueError, match="built on another backbone"):
        pipeline(TASK_NAME, model=make_backbone("vit"), adapter=adapter, device="cpu")


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "No support set"),
    ({"support_images": "x"}, ValueError, "go together"),
    ({"support": "F", "support_labels": ["a"]}, ValueError, "not both"),
    ({"support": "F", "method": "ft"}, ValueError, "method must be one of"),
    ({"support": "F", "method": "dt", "steps": 3}, ValueError, "direct transfer integrates nothing"),
    ({"support": "F", "top_k": 0}, ValueError, "top_k must be a positive integer"),
    ({"method": "dt"}, ValueError, "were given without a support set"),
    ({"support": ["a.png"]}, TypeError, "support must be an image folder path"),
])
def test_bad_calls_say_what_to_do(saved, classifier, kwargs, error, match):
    kwargs = {k: saved["folder"] if v == "F" else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        classifier(saved["queries"][0], **kwargs)


def test_construction_errors(saved):
    with pytest.raises(ValueError, match="needs adapter="):
        pipeline(TASK_NAME, model=str(saved["backbone"]), device="cpu")
    with pytest.raises(NotImplementedError, match="pipe.adapter.save_pretrained"):
        pipeline(TASK_NAME, model=str(saved["backbone"]), adapter=str(saved["adapter"]),
                 device="cpu").save_pretrained("anywhere")


def test_support_fingerprint_is_content_based(saved):
    images, labels = support_lists(saved)
    assert support_fingerprint(images, labels) == support_fingerprint([i.copy() for i in images], list(labels))
    assert support_fingerprint(images, labels) != support_fingerprint(images, labels, method="dt")
    assert support_fingerprint(images, labels) != support_fingerprint(images[::-1], labels)
    grey = [image.convert("L").convert("RGB") for image in images]
    assert support_fingerprint(images, labels) != support_fingerprint([i.convert("L") for i in grey], labels)
