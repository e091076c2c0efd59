"""The results schema (errors name the field), reading results files, and the plot."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE_RESULTS as RESULTS
from conftest import changed_results as _broken
from PIL import Image

from hf_hyperflow.results import load_results, save_results_plot, validate_results


def test_load_results_reads_a_valid_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert load_results(path) == RESULTS


@pytest.mark.parametrize(("data", "message"), [
    ([], "should hold a JSON object, got list"),
    ({"meta": {}}, "missing ['results']"),
    (_broken(lambda d: d["meta"].pop("backbone")), "meta.backbone must be a non-empty string, got None"),
    (_broken(lambda d: d["meta"].update(ways=0)), "meta.ways must be a positive integer (or null), got 0"),
    (_broken(lambda d: d.update(results={})), "'results' must be a non-empty object"),
    (_broken(lambda d: d["results"]["emoji"]["dt"].update(accuracy=171.0)),
     "results['emoji']['dt'].accuracy must be a number in [0, 100] (percent), got 171.0"),
    (_broken(lambda d: d["results"]["emoji"]["dt"].update(accuracy=float("nan"))), ".accuracy must be a number"),
    (_broken(lambda d: d["results"]["fonts"]["hyperflow"].update(ci95=-1)), "['hyperflow'].ci95 must be a number >= 0"),
    (_broken(lambda d: d["results"]["fonts"]["dt"].pop("episodes")), "['dt'].episodes must be a positive integer"),
    (_broken(lambda d: d["results"]["emoji"]["hyperflow"].update(latency_vs_dt="fast")),
     "['hyperflow'].latency_vs_dt must be a number >= 0 (or absent), got 'fast'"),
    (_broken(lambda d: d["results"]["emoji"].update(dt=[1])), "results['emoji']['dt'] must be an object of metrics"),
])
def test_results_schema_errors_name_the_field(tmp_path, data, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as caught:
        load_results(path)
    assert str(caught.value).startswith(f"{path}") and message in str(caught.value)


def test_load_results_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "absent.json")
    (tmp_path / "cut.json").write_text('{"meta": {')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_results(tmp_path / "cut.json")


def test_results_plot_is_a_png_and_needs_latencies(tmp_path):
    path = save_results_plot(RESULTS, tmp_path / "plot" / "accuracy_vs_latency.png", highlight="hyperflow")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    no_latency = _broken(lambda d: [m.pop("adapt_latency_s", None) for per in d["results"].values()
                                    for m in per.values()])
    with pytest.raises(ValueError, match="No method in the results has adapt_latency_s"):
        save_results_plot(no_latency, tmp_path / "x.png")


def test_validate_results_returns_its_input():
    assert validate_results(RESULTS) is RESULTS


def test_protocol_text_names_the_episode_shape():
    from hf_hyperflow.results import protocol_text

    base = {"protocol": "fixed", "image_size": 64}
    assert protocol_text({**base, "ways": 5, "shots": 5, "queries": 15}).startswith("5-way 5-shot, 15 queries")
    assert protocol_text({**base, "ways": 5, "shots": None}).startswith("5-way, shots and queries per dataset")
    assert protocol_text({"protocol": "md"}).startswith("variable-way variable-shot")
