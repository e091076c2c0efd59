"""Episodic evaluation: CI, same episodes across methods, latency / memory fields, the CLI end to end."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import make_backbone, randomize_drift
from PIL import Image

from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
from hf_hyperflow.episodes import ClassSplit
from hf_hyperflow.evaluation import (
    Evaluator,
    add_paired_gains,
    add_ratios,
    measure_peak_memory,
    parse_method,
)
from hf_hyperflow.results import gain_fraction
from hf_hyperflow.stats import mean_confidence_interval

CLASSES = [f"class-{i:02d}" for i in range(10)]
SPLIT = ClassSplit(train=tuple(CLASSES[:4]), validation=tuple(CLASSES[4:7]), test=tuple(CLASSES[7:]))
SAMPLER = {"protocol": "fixed", "ways": 3, "shots": 2, "queries": 2, "split": "test", "class_split": SPLIT}


def colour_dataset(per_class: int = 6) -> datasets.Dataset:
    """Ten classes of 32 px images, each class a colour plus noise."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(len(CLASSES)):
        colour = rng.integers(0, 255, 3)
        for _ in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels))
            labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def dataset():
    return colour_dataset()


@pytest.fixture(scope="module")
def adapter():
    adapter = HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig(steps=2))
    randomize_drift(adapter)
    return adapter


def test_confidence_interval_on_known_samples():
    mean, half = mean_confidence_interval([50.0, 60.0, 70.0, 80.0])
    assert mean == 65.0
    assert half == pytest.approx(1.96 * np.std([50, 60, 70, 80]) / 2)


def test_parse_method_and_unknown_methods():
    assert parse_method("hyperflow:rk4:4").integrator == "rk4"
    assert parse_method("hyperflow:rk4:4").steps == 4
    assert parse_method("ft-lora").groups == ("lora",)
    assert parse_method("ft-blocks").groups == ("blocks",)
    assert parse_method("hyperflow:fixed").stopping == "fixed" and parse_method("hyperflow").stopping is None
    assert parse_method("ft-lora+shift").groups == ("lora", "shift")
    with pytest.raises(ValueError, match=r"a fine-tuning mix joins distinct groups"):
        parse_method("ft-lora+full")
    with pytest.raises(ValueError, match=r"a fine-tuning mix joins distinct groups"):
        parse_method("ft-lora+lora")
    with pytest.raises(ValueError, match=r"Unknown method 'ft-everything'.*'dt'"):
        parse_method("ft-everything")
    with pytest.raises(ValueError, match="integrator 'rk7' is unknown"):
        parse_method("hyperflow:rk7:4")


def test_parse_fine_tuning_with_its_optimizer_and_steps():
    one_step = parse_method("ft-lora+shift:sgd:1")
    assert (one_step.kind, one_step.groups, one_step.optimizer, one_step.steps) == ("ft", ("lora", "shift"), "sgd", 1)
    assert (parse_method("ft-head:adam:3").optimizer, parse_method("ft-head:adam:3").steps) == ("adam", 3)
    assert parse_method("ft-head").optimizer is None and parse_method("ft-head").steps is None
    for bad in ("ft-head:sgd", "ft-head:rmsprop:1", "ft-head:sgd:0", "ft-head:sgd:x", "ft-head:sgd:1:2"):
        with pytest.raises(ValueError, match=r"give ':<optimizer>:<steps>' with an optimizer of \['adam', 'sgd'\]"):
            parse_method(bad)
    with pytest.raises(ValueError, match=r"Unknown method 'ft-everything:sgd:1'"):
        parse_method("ft-everything:sgd:1")


def test_fine_tuning_methods_run_with_their_own_optimizer_and_steps(adapter, dataset, monkeypatch):
    """``ft-head:sgd:1`` fine-tunes (and chooses its lr) with one plain step, ``ft-head`` with the evaluator's
    steps and Adam; a domain drawing on every class chooses the lr on episodes of every class."""
    import hf_hyperflow.evaluation as evaluation
    import hf_hyperflow.finetune as finetune_module

    calls = []

    def recorded(*args, **kwargs):
        calls.append((kwargs["steps"], kwargs["optimizer"]))
        return finetune_module.finetune(*args, **kwargs)

    monkeypatch.setattr(evaluation, "finetune", recorded)
    evaluator = Evaluator(adapter, ["ft-head:sgd:1", "ft-head"], ft_steps=2, fixed_lr=1e-2, progress=False,
                          memory_episodes=0)
    out = evaluator.evaluate_dataset("colours", dataset, episodes=1, sampler_kwargs=SAMPLER)
    assert calls == [(1, "sgd"), (2, "adam")]
    assert set(out["methods"]) == {"ft-head:sgd:1", "ft-head"}
    chosen = []

    def choose(adapter, episodes, **kwargs):
        chosen.append((len(episodes), kwargs["steps"], kwargs["optimizer"], kwargs["augment_pool"]))
        return 0.0, {0.0: 1.0}

    monkeypatch.setattr(evaluation, "select_lr", choose)
    whole = {**SAMPLER, "split": None, "class_split": None, "ways": 8}  # 8 ways: more classes than any split holds
    Evaluator(adapter, ["ft-head:sgd:1"], lr_episodes=2, ft_augment_pool=3, progress=False,
              memory_episodes=0).evaluate_dataset("colours", dataset, episodes=1, sampler_kwargs=whole)
    assert chosen == [(2, 1, "sgd", 3)]  # the lr is chosen with the pseudo-queries the evaluation uses


def test_same_episodes_for_every_method_and_fields(adapter, dataset):
    evaluator = Evaluator(adapter, ["dt", "ft-shift", "ft-full", "hyperflow", "hyperflow:heun:2"], ft_steps=2,
                          fixed_lr=1e-3, memory_episodes=1, progress=False)
    out = evaluator.evaluate_dataset("colours", dataset, episodes=3, episodes_per_method={"ft-full": 2},
                                     sampler_kwargs=SAMPLER)
    rows = out["episode_rows"]  # once: every method ran on the first of the same seeded episodes
    assert len(rows) == 3 and all(len(support) == 6 and len(query) == 6 for support, query in rows)
    assert {m: len(a) for m, a in out["per_episode_accuracy"].items()} == {
        "dt": 3, "ft-shift": 3, "ft-full": 2, "hyperflow": 3, "hyperflow:heun:2": 3}
    methods = out["methods"]
    assert methods["ft-full"]["episodes"] == 2 and methods["dt"]["episodes"] == 3
    for row in methods.values():
        assert 0 <= row["accuracy"] <= 100 and row["ci95"] >= 0
        assert row["adapt_latency_s"] > 0 and row["query_latency_s"] > 0
        assert row["peak_memory_bytes"] > 0
        assert row["latency_vs_dt"] > 0 and row["latency_vs_ft_full"] > 0 and row["memory_vs_ft_full"] > 0
    assert methods["dt"]["latency_vs_dt"] == pytest.approx(1.0)
    # fine-tuning the whole backbone holds autograd buffers and Adam state: more memory than dt
    assert methods["ft-full"]["peak_memory_bytes"] > methods["dt"]["peak_memory_bytes"]


def test_memory_measurement_and_adapter_creation_are_quiet(capfd, recwarn):
    """No native log lines of the profiler's backend, no warning about code that is not the caller's."""
    measure_peak_memory(lambda: torch.ones(100, 100) * 2)
    HyperFlowAdapter(make_backbone("vit"), HyperFlowConfig())
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_start" not in err and "gpuGetDeviceCount" not in err, err
    assert [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_peak_memory_counts_what_is_alive_together():
    def two_alive():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB while a is alive
        return float(b.sum())

    def one_at_a_time():
        for _ in range(2):
            a = torch.ones(1000, 1000)
            del a

    assert 8e6 <= measure_peak_memory(two_alive) < 9e6
    assert 4e6 <= measure_peak_memory(one_at_a_time) < 5e6

    def inside_a_profiler_range():  # frees between operators inside a range happen when they happen
        with torch.profiler.record_function("region"):
            one_at_a_time()
            return two_alive()

    assert 8e6 <= measure_peak_memory(inside_a_profiler_range) < 9e6


def test_memory_measurement_leaves_no_garbage():
    """The profiler's results hold reference cycles; measure_peak_memory collects them before it returns, so that
    repeated measurements of long runs do not pile up their events."""
    import gc

    layer = torch.nn.Linear(32, 32)

    def work():
        for _ in range(20):
            layer(torch.randn(4, 32)).sum().backward()

    measure_peak_memory(work)  # first call: lazy imports and caches
    gc.collect()
    measure_peak_memory(work)
    assert gc.collect() == 0


def test_ratios_and_gain_fraction():
    summary = {"dt": {"accuracy": 50.0, "adapt_latency_s": 1.0, "peak_memory_bytes": 10},
               "ft-full": {"accuracy": 70.0, "adapt_latency_s": 100.0, "peak_memory_bytes": 1000},
               "ft-shift": {"accuracy": 60.0, "adapt_latency_s": 50.0, "peak_memory_bytes": 500},
               "hyperflow": {"accuracy": 58.0, "adapt_latency_s": 1.5, "peak_memory_bytes": 20}}
    add_ratios(summary)
    assert summary["hyperflow"]["latency_vs_dt"] == 1.5
    assert summary["hyperflow"]["latency_vs_ft_full"] == 0.015
    assert summary["hyperflow"]["memory_vs_ft_full"] == 0.02
    assert gain_fraction(summary) == pytest.approx(0.8)


def test_paired_gains_and_share_of_best_fine_tuning():
    accuracies = {"dt": [50.0, 60.0, 70.0, 80.0],
                  "ft-full": [60.0, 70.0],                  # +10 on the first two episodes
                  "ft-shift": [52.0, 62.0, 72.0, 82.0],     # +2 on all four
                  "hyperflow": [55.0, 63.0, 71.0, 79.0]}    # +5, +3, +1, -1
    summary = {name: {} for name in accuracies}
    add_paired_gains(summary, accuracies)
    assert summary["ft-full"]["gain_vs_dt"] == pytest.approx(10.0)
    assert summary["ft-full"]["gain_vs_dt_ci95"] == 0.0
    assert summary["hyperflow"]["gain_vs_dt"] == pytest.approx(2.0)
    assert summary["hyperflow"]["gain_vs_dt_ci95"] == pytest.approx(1.96 * 5 ** 0.5 / 2)
    assert summary["hyperflow"]["best_ft"] == "ft-full"
    assert summary["hyperflow"]["best_ft_episodes"] == 2
    assert summary["hyperflow"]["share_of_best_ft"] == pytest.approx(0.4)   # +4 of ft-full's +10
    assert summary["ft-shift"]["share_of_best_ft"] == pytest.approx(0.2)
    assert "gain_vs_dt" not in summary["dt"]


def test_share_is_none_when_no_fine_tuning_beats_dt():
    accuracies = {"dt": [50.0, 60.0], "ft-shift": [49.0, 59.0], "hyperflow": [51.0, 61.0]}
    summary = {name: {} for name in accuracies}
    add_paired_gains(summary, accuracies)
    assert summary["hyperflow"]["gain_vs_dt"] == pytest.approx(1.0)
    assert summary["hyperflow"]["share_of_best_ft"] is None


def test_validation_split_chooses_the_lr(adapter, dataset):
    evaluator = Evaluator(adapter, ["ft-head"], ft_steps=2, lr_grid=[0.0, 1e-2], lr_episodes=2, progress=False,
                          memory_episodes=0)
    out = evaluator.evaluate_dataset("colours", dataset, episodes=1, sampler_kwargs=SAMPLER)
    row = out["methods"]["ft-head"]
    assert row["lr"] in (0.0, 1e-2)
    assert set(row["lr_table"]) == {"0.0", "0.01"}


def test_evaluate_cli_end_to_end(adapter, dataset, tmp_path):
    from recipes.evaluate import main

    backbone_dir = tmp_path / "backbone"
    make_backbone("vit").save_pretrained(backbone_dir)
    from transformers import AutoModel

    trained = HyperFlowAdapter(AutoModel.from_pretrained(backbone_dir), HyperFlowConfig(steps=2))
    randomize_drift(trained)
    trained.save_pretrained(tmp_path / "adapter")
    dataset.save_to_disk(str(tmp_path / "colours"))
    SPLIT.save(tmp_path / "split.json")
    results = main(["--backbone", str(backbone_dir), "--adapter", str(tmp_path / "adapter"),
                    "--datasets", f"[colours={tmp_path / 'colours'}]", "--class_split", str(tmp_path / "split.json"),
                    "--episodes", "2", "--ways", "3", "--shots", "2", "--queries", "2",
                    "--methods", "[dt, ft-head, hyperflow, 'hyperflow:rk4:1']", "--ft_steps", "2", "--lr", "0.001",
                    "--batch_tasks", "2", "--steps_sweep", "[1, 2]", "--sweep_episodes", "1", "--progress", "false",
                    "--output", str(tmp_path / "out")])
    for name in ("results.json", "results.md", "accuracy_vs_latency.png", "accuracy_vs_steps.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"]["colours"].keys() == {"dt", "ft-head", "hyperflow", "hyperflow:rk4:1"}
    assert saved["batched_throughput"]["colours"]["tasks"] == 2
    assert results["meta"]["command"].startswith("python recipes/evaluate.py --backbone")
    from hf_hyperflow.results import load_results

    load_results(tmp_path / "out" / "results.json")  # the schema the model cards read


def test_cli_bad_arguments(tmp_path, capsys):
    from recipes.evaluate import main

    common = ["--backbone", "x", "--datasets", "[y]", "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match="Unknown method 'nope'"):
        main([*common, "--methods", "[dt, nope]"])
    with pytest.raises(SystemExit, match="need --adapter"):
        main([*common, "--methods", "[hyperflow]"])
    with pytest.raises(SystemExit, match=r"names \['ft-full'\], which are not in --methods"):
        main([*common, "--methods", "[dt]", "--episodes_per_method", "{ft-full: 3}"])
    with pytest.raises(SystemExit, match=r"Unknown key 'episodes-per-method'; the keys of the top level are "
                                         r"\['backbone', 'adapter'"):
        main([*common, "--episodes-per-method", "{ft-full: 3}"])
    with pytest.raises(SystemExit, match="--datasets is missing"):
        main(["--backbone", "x", "--output", str(tmp_path)])
    # a backbone path that is not there is named as such (not as a malformed Hub repo id)
    missing = ["--backbone", "/no/such/dir", "--datasets", "[y]", "--output", str(tmp_path), "--methods", "[dt]"]
    with pytest.raises(SystemExit, match=r"--backbone /no/such/dir: the folder does not exist"):
        main(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"holds no config.json, so it is not a saved transformers model"):
        main([*missing[:1], str(tmp_path / "empty"), *missing[2:]])


def test_dataset_without_the_needed_split(adapter, dataset):
    no_test = ClassSplit(train=tuple(CLASSES[:5]), validation=tuple(CLASSES[5:]), test=())
    evaluator = Evaluator(adapter, ["dt"], progress=False)
    with pytest.raises(ValueError, match="test"):
        evaluator.evaluate_dataset("colours", dataset, episodes=1, sampler_kwargs={**SAMPLER, "class_split": no_test})
