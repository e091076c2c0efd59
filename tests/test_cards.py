"""Model cards of adapters and tasks: metadata (model-index with the results, base model), text, and the errors of card data."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_RESULTS as RESULTS
from conftest import changed_results as _broken
from huggingface_hub import EvalResult, ModelCard

from hf_hyperflow.cards import AdapterCardData, TaskCardData, render_adapter_card, render_task_card


def card_data(**overrides) -> AdapterCardData:
    values = dict(repo_id="org/hyperflow-dinov2-small", base_model="facebook/dinov2-small",
                  backbone_model_type="dinov2", feature_size=384, groups=["lora", "shift", "head"],
                  target_modules=["query", "value"], lora_rank=4, lora_alpha=8.0, integrator="rk4", steps=4,
                  drift_parameters=1_234_567, drift_bytes=4_938_268,
                  training_config={"lr": 0.001, "loss": {"flow": 1.0, "unrolled": 0.5}},
                  training_datasets=["emoji-google", "noto-fonts"], results=json.loads(json.dumps(RESULTS)),
                  plot_path="accuracy_vs_latency.png", tags=["efficient"])
    values.update(overrides)
    return AdapterCardData(**values)


def test_adapter_card_round_trips_metadata_and_eval_results(tmp_path):
    card = render_adapter_card(card_data())
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    data = loaded.data.to_dict()
    assert data["library_name"] == "hf-hyperflow" and data["license"] == "apache-2.0"
    assert data["base_model"] == "facebook/dinov2-small" and data["base_model_relation"] == "adapter"
    assert data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["emoji-google", "noto-fonts"]
    assert data["tags"] == ["hyperflow", "peft", "few-shot", "image-classification", "dinov2", "efficient"]
    task = "Few-shot image classification (5-way 5-shot, 15 queries per class, 128 px images, fixed episodes)"
    assert loaded.data.model_name == "hyperflow-dinov2-small"
    assert loaded.data.eval_results == [
        EvalResult(task_type="image-classification", task_name=task, dataset_type=name, dataset_name=name,
                   metric_type="accuracy", metric_value=accuracy, metric_name=f"accuracy (%, mean of {n} episodes)",
                   metric_args={"ci95": ci, "episodes": n, "method": "hyperflow"})
        for name, accuracy, ci, n in (("emoji", 71.23, 1.31, 600), ("fonts", 45.5, 2.1, 300))
    ]
    text = loaded.text
    assert "| emoji | **hyperflow** | 71.2 | ± 1.3 | 600 | 50.0 ms | – | – | 4.17× | 0.0125× | 0.05× |" in text
    assert "| emoji | dt | 61.0 | ± 1.5 | 600 | 12.0 ms | 4.0 ms | 100.0 MiB | 1× | 0.003× | 0.2× |" in text
    assert "| emoji | ft-full | 75.0 | ± 1.2 | 600 | 4.00 s | – | 500.0 MiB | – | – | – |" in text
    assert "| fonts | dt | 40.0 | ± 2.0 | 300 | – | – | – | – | – | – |" in text
    assert "![Accuracy against adaptation latency](accuracy_vs_latency.png)" in text
    assert 'HyperFlowAdapter.from_pretrained(backbone, "org/hyperflow-dinov2-small")' in text
    assert 'AutoModel.from_pretrained("facebook/dinov2-small")' in text
    assert 'PeftModel.from_pretrained(backbone, "org/hyperflow-dinov2-small")' in text
    assert "| Drift network | 1,234,567 parameters (4.7 MiB on disk) |" in text
    assert "| Integrator | rk4, 4 steps |" in text
    assert "```yaml\nlr: 0.001\nloss:\n  flow: 1.0\n  unrolled: 0.5\n```" in text
    assert "python recipes/evaluate.py --adapter out/adapter" in text
    assert "## Limitations" in text


def test_adapter_card_without_results_or_hub_backbone(tmp_path):
    card = render_adapter_card(card_data(results=None, plot_path=None, base_model="effnet-lite0-local",
                                         training_datasets=[], training_config={}))
    data = card.data.to_dict()
    assert "model-index" not in data and "base_model" not in data and "datasets" not in data
    assert "No evaluation results were attached to this card." in card.text
    assert 'AutoModel.from_pretrained("path/to/effnet-lite0-local")' in card.text
    assert "`effnet-lite0-local` is not on the Hub: load the same checkpoint from a local folder." in card.text
    assert "The training data was not recorded." in card.text and "![" not in card.text


def test_adapter_card_picks_the_single_hyperflow_method_or_asks():
    results = _broken(lambda d: [per.__setitem__("hyperflow:rk4:4", per.pop("hyperflow"))
                                 for per in d["results"].values()])
    assert card_data(results=results).eval_method == "hyperflow:rk4:4"
    results["results"]["emoji"]["hyperflow:euler:8"] = dict(results["results"]["emoji"]["dt"])
    with pytest.raises(ValueError, match=r"Cannot tell which method of \['dt', 'ft-full', 'hyperflow:rk4:4', "
                                         r"'hyperflow:euler:8'\] is this adapter's: pass eval_method="):
        card_data(results=results)
    card = render_adapter_card(card_data(results=results, eval_method="hyperflow:euler:8"))
    assert [r.metric_value for r in card.data.eval_results] == [61.04]


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"repo_id": "not a repo"}, ValueError, "repo_id 'not a repo' is not a valid Hub repo id"),
    ({"base_model": ""}, TypeError, "base_model must be a non-empty string"),
    ({"lora_rank": None}, ValueError, "groups include 'lora' but lora_rank is None"),
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"groups": "lora"}, TypeError, "groups must be a list of non-empty strings"),
    ({"eval_method": "ft-lora"}, ValueError, r"eval_method 'ft-lora' is not in the results; they have \['dt'"),
    ({"results": None, "eval_method": "hyperflow"}, ValueError, "eval_method is set but there are no results"),
    ({"plot_path": "/tmp/plot.png"}, ValueError, "plot_path must be a path inside the repo"),
    ({"results": {"meta": {}, "results": {}}}, ValueError, "AdapterCardData.results: meta.backbone must be"),
    ({"training_config": [1]}, TypeError, "training_config must be a dict"),
])
def test_adapter_card_data_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        card_data(**overrides)


def test_task_card_states_classes_and_source_and_round_trips(tmp_path):
    card = render_task_card(TaskCardData(
        repo_id="org/emoji-task", base_model="facebook/dinov2-small", class_names=["cat", "dog", "owl"],
        source_adapter="org/hyperflow-dinov2-small", source_adapter_revision="a" * 40, lora_rank=4,
        lora_alpha=8.0, target_modules=["query", "value"], support_size=15, backbone_model_type="dinov2"))
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == {
        "base_model": "facebook/dinov2-small", "base_model_relation": "adapter", "library_name": "peft",
        "license": "apache-2.0", "pipeline_tag": "image-classification",
        "tags": ["hyperflow", "peft", "few-shot", "image-classification", "lora", "hf-hyperflow", "dinov2"]}
    text = loaded.text
    assert "A few-shot image classifier for 3 classes" in text
    assert "| 0 | cat |\n| 1 | dog |\n| 2 | owl |" in text
    assert (f"HyperFlow adapter [`org/hyperflow-dinov2-small`](https://huggingface.co/org/hyperflow-dinov2-small) "
            f"(revision `{'a' * 40}`)\nfrom 15 labelled support images.") in text
    assert 'model = PeftModel.from_pretrained(backbone, "org/emoji-task").eval()' in text
    assert 'head = load_file(hf_hub_download("org/emoji-task", "hyperflow_head.safetensors"))' in text


@pytest.mark.parametrize(("overrides", "match"), [
    ({"class_names": ["cat"]}, r"at least 2 classes"),
    ({"class_names": ["cat", "cat"]}, "class_names has duplicates"),
    ({"source_adapter": ""}, "source_adapter must be a non-empty string"),
])
def test_task_card_data_errors(overrides, match):
    values = dict(repo_id="org/t", base_model="b/m", class_names=["a", "b"], source_adapter="org/a")
    with pytest.raises((TypeError, ValueError), match=match):
        TaskCardData(**{**values, **overrides})


@pytest.mark.parametrize("stopping, points, expected", [
    ("auto", None, "| Stopping | per task, at the point of the path whose"),
    ("auto", 2, "| Stopping | per task, at the point of the path (t = 0, 1) whose"),
    ("auto", 3, "(t = 0, 0.5, 1)"),
    ("fixed", None, "| Stopping | fixed"),
    ("fixed", 3, "| Stopping | fixed: every task integrated to t = 1 |"),
    (None, None, None),
])
def test_adapter_card_states_the_stopping_rule(stopping, points, expected):
    text = str(render_adapter_card(card_data(stopping=stopping, stopping_points=points)))
    if expected is None:
        assert "| Stopping |" not in text
    else:
        assert expected in text


def test_adapter_card_states_the_domain_gate():
    text = str(render_adapter_card(card_data(domain_gate=2.2, domain_sources=["glyphs", "emoji"])))
    assert "| Domain gate | direct transfer (t = 0) for a support set farther than 2.2 from every training source " \
           "(glyphs, emoji)" in text
    assert "| Domain gate |" not in str(render_adapter_card(card_data()))
    with pytest.raises(ValueError, match=r"domain_gate must be a number > 0.0, got 0"):
        card_data(domain_gate=0)
