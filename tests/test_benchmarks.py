"""Every benchmark driver (benchmarks/*.py) runs, as its command line, on a tiny setting: synthetic data, a tiny
random backbone standing in for EfficientNet-Lite0 where a run folder is read, one or two episodes and steps.
The numbers are meaningless; what is checked is that each script still works against the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RESNET, write_image_dataset

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
CONFIG = ROOT / "recipes" / "configs" / "efficientnet_lite0.yaml"
pytestmark = pytest.mark.slow  # each script is a fresh process (imports, accelerate launches): minutes in all


def run(script: str, *args, cwd: Path = ROOT, timeout: int = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    """Data (glyphs_default with scripts, digits, fashion_mnist) and a run folder as recipes/quickstart.py leaves
    it: the backbone, the trained adapter, the class split and the teacher's trajectory store."""
    from transformers import AutoConfig, AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
    from hf_hyperflow.episodes import ClassSplit, EpisodeSampler, load_image_dataset
    from hf_hyperflow.trajectories import record_trajectories

    root = tmp_path_factory.mktemp("benchmarks")
    data, run_dir = root / "data", root / "run"
    write_image_dataset(data / "glyphs_default", classes=50, per_class=20, groups=10)
    write_image_dataset(data / "digits", classes=10, per_class=20, seed=1)
    write_image_dataset(data / "fashion_mnist", classes=10, per_class=20, seed=2)
    settings = {k: v for k, v in TINY_RESNET.items() if k not in ("model_type", "seed")}
    torch.manual_seed(0)
    backbone = AutoModel.from_config(AutoConfig.for_model("resnet", **settings)).eval()
    backbone.save_pretrained(run_dir / "efficientnet-lite0")
    adapter_fields = yaml.safe_load(CONFIG.read_text())["adapter"]
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(**adapter_fields))
    adapter.save_pretrained(run_dir / "training" / "best")
    dataset = load_image_dataset(data / "glyphs_default")
    split = ClassSplit.from_dataset(dataset, fractions=(0.7, 0.15, 0.15), seed=0, group_column="script")
    split_file = run_dir / "training" / "class_splits" / "glyphs_default.json"
    split_file.parent.mkdir(parents=True)
    split.save(split_file)
    store = run_dir / "training" / "trajectories"
    sampler = EpisodeSampler(dataset, ways=5, shots=5, queries=10, seed=1, split="train", class_split=split,
                             num_episodes=2)
    description = {"source": str(data / "glyphs_default"), "split": "train", "protocol": "fixed", "ways": 5,
                   "shots": 5, "queries": 10, "episode_seed": 1, "class_split": str(split_file)}
    record_trajectories(adapter, sampler, store / "glyphs_default", groups=("lora", "shift", "head"), steps=2,
                        lr=0.01, dataset=description)
    adapter.save_pretrained(store / "adapter")
    return {"root": root, "data": data, "run": run_dir}


def test_adapt_cost():
    assert "| adapt (pixel tensor) |" in run("adapt_cost.py", "--image-size", 32, "--ways", 2, "--shots", 1,
                                             "--steps", 1, "--repeats", 1, "--first-adapted-block", -2)


def test_adapt_speed(setting):
    output = setting["root"] / "adapt_speed.md"
    run("adapt_speed.py", "--label", "tiny", "--sizes", 32, "--tasks", "1,2", "--episodes", 1, "--repeats", 1,
        "--data", setting["data"], "--output", output, cwd=setting["root"])
    assert "tiny" in output.read_text()
    # --adapter: a trained adapter folder (here an untrained one saved) at its own image size only
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    sys.path.insert(0, str(BENCHMARKS))
    from adapt_speed import markdown, measured_adapter
    from speed_setup import shipped_settings

    backbone = AutoModel.from_pretrained(setting["root"] / "models" / "efficientnet-lite0")
    folder = setting["root"] / "lite0_adapter"
    HyperFlowAdapter(backbone, HyperFlowConfig(**shipped_settings(), image_size=32, domain_gate=2.0)).save_pretrained(
        folder)
    with pytest.warns(UserWarning, match="no domain_reference"):
        assert measured_adapter(folder, 32).config.domain_gate == 2.0
        with pytest.raises(SystemExit, match="adapts 32 px images; give --sizes 32"):
            measured_adapter(folder, 64)
    runs = json.loads(output.with_suffix(".json").read_text())
    runs["trained"] = {**runs["tiny"], "adapter": str(folder), "dataset": "digits"}
    assert f"({runs['tiny']['seconds']:.0f} s), adapter {folder}, dataset digits." in markdown(runs)


def test_page_faults(setting):
    output = setting["root"] / "page_faults.md"
    run("page_faults.py", "--label", "tiny", "--shots", 1, "--tasks", 1, "--repeats", 1, "--data", setting["data"],
        "--output", output, cwd=setting["root"])
    assert "| tiny | 5-way 1-shot | adapt, fixed |" in output.read_text()


def test_benchmark(setting):
    output = setting["root"] / "benchmark"
    run("benchmark.py", "--adapter", setting["run"] / "training" / "best", "--backbone",
        setting["run"] / "efficientnet-lite0", "--data", setting["data"], "--source",
        "glyphs_default=glyphs_default:script:2:3", "--out-of-domain", "digits", "--methods", "dt,hyperflow:auto",
        "--fine-tuning", "ft-lora+shift,ft-full", "--lr-grid", "1e-3,1e-2",
        "--episodes", 2, "--ft-episodes", 1, "--ft-full-episodes", 1, "--lr-episodes", 1, "--output", output)
    results = json.loads((output / "results" / "results.json").read_text())
    assert set(results["results"]) == {"glyphs_default (held-out groups)", "digits (out of domain)"}
    assert {"dt", "hyperflow:auto", "ft-lora+shift", "ft-full"} <= set(
        results["results"]["digits (out of domain)"])
    assert "## Targets" in (output / "RESULTS.md").read_text()
    run("benchmark.py", "--render-only", "--output", output)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # --jobs: the domains shared among worker processes, merged in the same order, the same episodes and accuracies
    two = setting["root"] / "benchmark_jobs"
    run("benchmark.py", "--adapter", setting["run"] / "training" / "best", "--backbone",
        setting["run"] / "efficientnet-lite0", "--data", setting["data"], "--source",
        "glyphs_default=glyphs_default:script:2:3", "--out-of-domain", "digits", "--methods", "dt,hyperflow:auto",
        "--fine-tuning", "ft-full", "--ft-lr", 1e-3, "--episodes", 2, "--ft-full-episodes", 1, "--jobs", 2,
        "--output", two)
    merged = json.loads((two / "results" / "results.json").read_text())
    assert list(merged["results"]) == list(results["results"]) and merged["meta"]["jobs"] == 2
    for domain, details in merged["details"].items():
        for method in ("dt", "hyperflow:auto"):
            assert details["per_episode_accuracy"][method] == results["details"][domain]["per_episode_accuracy"][method]
    from benchmarks.benchmark import _shares, parse_ft_lr

    assert _shares(["a=a:g", "b=b:g:1:3"], ["digits"], 2) == [(["a=a:g", "b=b:g:1:3"], []), ([], ["digits"])]
    assert _shares(["a=a:g"], ["digits"], 1) == [(["a=a:g"], ["digits"])]
    # --ft-lr: one lr, or one per fine-tuning method
    assert parse_ft_lr("0.01") == 0.01
    assert parse_ft_lr("ft-lora+shift=0.01,ft-full=1e-4") == {"ft-lora+shift": 0.01, "ft-full": 1e-4}
    for bad in ("ft-full", "ft-full=fast", "a=1=2"):
        with pytest.raises(Exception, match="METHOD=LR pairs"):
            parse_ft_lr(bad)


def test_validation(setting):
    output = setting["root"] / "validation"
    run("validation.py", "--adapter", setting["run"] / "training" / "best", "--backbone",
        setting["run"] / "efficientnet-lite0", "--class-splits", setting["run"] / "training" / "class_splits",
        "--source", f"glyphs_default={setting['data'] / 'glyphs_default'}:script:2:3",
        "--source", f"grey={setting['data'] / 'glyphs_default'}:script:2:3", "--without-colour", "grey",
        "--source", f"low={setting['data'] / 'glyphs_default'}:script:2:3", "--low-resolution", "low=8",
        "--source", f"digits={setting['data'] / 'digits'}:label:2:3", "--outside-training", "digits",
        "--methods", "dt,hyperflow,ft-head:sgd:1", "--lr-grid", "0,0.1", "--lr-episodes", 1, "--episodes", 2,
        "--output", output)
    results = json.loads((output / "results.json").read_text())["results"]
    assert "gain_vs_dt" in results["glyphs_default (validation)"]["hyperflow"]
    for name in ("glyphs_default (validation)", "digits (outside training)"):
        assert set(results[name]["ft-head:sgd:1"]["lr_table"]) == {"0.0", "0.1"}
    assert results["grey (validation)"]["dt"]["episodes"] == 2
    assert results["low (validation)"]["dt"]["episodes"] == 2
    assert results["digits (outside training)"]["dt"]["episodes"] == 2
    for flag, value in (("--without-colour", "glyphs"), ("--outside-training", "glyphs"),
                        ("--low-resolution", "glyphs=8")):
        with pytest.raises(AssertionError, match=f"{flag} names no --source"):
            run("validation.py", "--adapter", setting["run"] / "training" / "best", "--source",
                f"glyphs_default={setting['data'] / 'glyphs_default'}:script", flag, value, "--output", output)
    from benchmarks.validation import parse_low_resolution, validation_domains

    assert parse_low_resolution(["a=16", "b=8"]) == {"a": 16, "b": 8}
    for bad in ("a", "a=", "=8", "a=0", "a=x"):
        with pytest.raises(SystemExit, match="--low-resolution takes NAME=PIXELS"):
            parse_low_resolution([bad])
    # a source outside training draws its episodes from every class
    from hf_hyperflow.episodes import EpisodeSampler

    source = {"name": "digits", "path": str(setting["data"] / "digits"), "group_column": "label", "shots": 2,
              "queries": 3}
    (name, (dataset, kwargs)), = validation_domains([source], None, outside_training=["digits"]).items()
    assert name == "digits (outside training)" and kwargs["split"] is None and "class_split" not in kwargs
    sampler = EpisodeSampler(dataset, seed=0, **kwargs)
    classes = {name for k in range(20) for name in sampler[k].classes}
    assert len(classes) == dataset.features["label"].num_classes == 10


def test_path_study(setting):
    """Every point of the path recorded; its t = 0 is direct transfer, scored as the validation driver scores it."""
    output = setting["root"] / "path_study"
    source = f"glyphs_default={setting['data'] / 'glyphs_default'}:script:2:3"
    common = ["--adapter", setting["run"] / "training" / "best", "--backbone", setting["run"] / "efficientnet-lite0",
              "--source", source, "--episodes", 3, "--output", output]
    run("path_study.py", *common)
    records = [json.loads(line) for line in (output / "glyphs_default.jsonl").read_text().splitlines()]
    config = json.loads((setting["run"] / "training" / "best" / "adapter_config.json").read_text())
    assert [r["episode"] for r in records] == [0, 1, 2]
    assert all(len(r["loss"]) == len(r["loo_accuracy"]) == len(r["accuracy"]) == config["steps"] + 1 for r in records)
    run("validation.py", "--adapter", setting["run"] / "training" / "best", "--backbone",
        setting["run"] / "efficientnet-lite0", "--source", source, "--methods", "dt", "--episodes", 3,
        "--output", setting["root"] / "path_study_dt")
    dt = json.loads((setting["root"] / "path_study_dt" / "results.json").read_text())
    mean_dt = dt["results"]["glyphs_default (validation)"]["dt"]["accuracy"]
    assert abs(100 * sum(r["accuracy"][0] for r in records) / 3 - mean_dt) < 1e-3
    table = run("path_study.py", *common, "--rules", "end", "0,1", "lazy:0,1~0.2", "acc:0,1")
    assert "| end |" in table and "| lazy:0,1~0.2 |" in table and "| acc:0,1 |" in table
    # a source outside training, in grey: its t = 0 is validation.py's dt on the same episodes
    digits = ["--source", f"digits={setting['data'] / 'digits'}:label:2:3", "--outside-training", "digits",
              "--without-colour", "digits", "--episodes", 2]
    run("path_study.py", *common[:4], *digits, "--output", output)
    run("validation.py", *common[:4], *digits, "--methods", "dt", "--output", setting["root"] / "digits_dt")
    records = [json.loads(line) for line in (output / "digits.jsonl").read_text().splitlines()]
    dt = json.loads((setting["root"] / "digits_dt" / "results.json").read_text())["results"]
    assert abs(100 * sum(r["accuracy"][0] for r in records) / 2 - dt["digits (outside training)"]["dt"]["accuracy"]) < 1e-3
    with pytest.raises(AssertionError, match="--outside-training names no --source"):
        run("path_study.py", *common, "--outside-training", "digits")
    # a rule with a domain gate keeps t = 0 beyond it; records of an adapter without a domain reference cannot say
    assert all(r["domain_distance"] is None for r in records)
    sys.path.insert(0, str(ROOT))
    from benchmarks.path_study import choose, parse_rule

    near = {"loss": [1.0, 0.5], "loo_accuracy": [0.5, 1.0], "accuracy": [0.2, 0.9], "domain_distance": 1.0}
    far = {**near, "domain_distance": 3.0}
    assert choose(near, parse_rule("0,1>2.2")) == (1, 1) and choose(far, parse_rule("0,1>2.2")) == (0, 0)
    assert choose(near, parse_rule("end>2.2")) == choose(near, parse_rule("end"))
    assert choose(far, parse_rule("end>2.2")) == (0, 0)
    with pytest.raises(ValueError, match="record them again with an adapter that has a domain reference"):
        choose({**near, "domain_distance": None}, parse_rule("0,1>2.2"))


def test_paired_runs():
    """Each run's paired gain over dt and its paired difference against the first run, per episode."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.paired_runs import paired_table

    def run_of(dt, method):
        return {"results": {"d": {}}, "details": {"d": {"per_episode_accuracy": {"dt": dt, "m": method}}}}

    runs = {"first": run_of([0.5, 1.0, 0.0, 0.5], [1.0, 1.0, 0.5, 0.5]),
            "second": run_of([0.5, 1.0, 0.0, 0.5], [0.5, 1.0, 0.0, 1.0])}
    row = paired_table(runs, "m").splitlines()[-1]
    # gains over dt: first (50, 0, 50, 0) -> +25.00; second (0, 0, 0, 50) -> +12.50; second minus first
    # (-50, 0, -50, 50) -> -12.50, CI 1.96 * std / sqrt(4) = 1.96 * 41.46 / 2
    assert row.startswith("| d | 4 | 50.00 | +25.00 ±24.50 | +12.50 ±21.22 | -12.50 ±40.63 |")
    # two methods of one run: "m" against dt itself, named after "@"
    runs["third"] = runs["first"]
    row = paired_table(runs, "m", {"third": "dt"}).splitlines()[-1]
    assert row.endswith("| -12.50 ±40.63 | -25.00 ±24.50 |")
    del runs["third"]
    runs["second"]["details"]["d"]["per_episode_accuracy"]["dt"] = [0.5, 1.0, 0.0, 0.0]
    with pytest.raises(SystemExit, match="the episodes of 'first' and 'second' are not the same"):
        paired_table(runs, "m")
    # with the episodes' rows, the rows decide: a near tie of dt rounded another way on another CPU is no error
    for rows, run in zip(([[1], [2], [3], [4]], [[1], [2], [3], [4]]), runs.values(), strict=True):
        run["details"]["d"]["episode_rows"] = rows
    assert paired_table(runs, "m").splitlines()[-1].startswith("| d | 4 | 50.00 | +25.00 ±24.50 |")
    runs["second"]["details"]["d"]["episode_rows"] = [[1], [2], [3], [5]]
    with pytest.raises(SystemExit, match="the episodes of 'first' and 'second' are not the same"):
        paired_table(runs, "m")


def test_compact_results(setting):
    path = setting["root"] / "results.json"
    shutil.copyfile(BENCHMARKS / "fewer_steps" / "held_out" / "results.json", path)
    before = json.loads(path.read_text())
    run("compact_results.py", path)
    assert json.loads(path.read_text()) == before  # already compact: unchanged


def test_episode_throughput(setting):
    output = setting["root"] / "episode_throughput.md"
    run("episode_throughput.py", "--data", setting["data"], "--datasets", "digits", "--episodes", 1,
        "--forward-episodes", 1, "--output", output)
    assert "| digits |" in output.read_text()


def test_finetune_cost(setting):
    output = setting["root"] / "finetune_cost.md"
    run("finetune_cost.py", "--models", "tiny_vit", "--variants", "lora",
        "lora+shift+head, last block (cached prefix)", "--tasks", 1, "--trajectory-tasks", 1, "--steps", 1,
        "--output", output)
    assert "tiny_vit" in output.read_text()


def test_images_per_pass(setting):
    output = setting["root"] / "images_per_pass.md"
    run("images_per_pass.py", "--sizes", 32, "--images", 4, "--rounds", 1, "--output", output, cwd=setting["root"])
    assert output.is_file()


def test_profile_adapt(setting):
    output = setting["root"] / "profile_adapt.md"
    run("profile_adapt.py", "--sizes", 32, "--repeats", 1, "--data", setting["data"], "--output", output,
        cwd=setting["root"])
    assert "hyperflow" in output.read_text()


def test_scaling(setting):
    output = setting["root"] / "scaling.md"
    run("scaling.py", "--data", setting["data"], "--episodes", 1, "--ft-episodes", 1, "--md-episodes", 0,
        "--glyph-shapes", "5:1", "--fashion-shapes", "5:2", "--output", output, cwd=setting["root"])
    assert "glyphs 5-way 1-shot" in output.read_text() and output.with_suffix(".png").is_file()


def test_teacher_study(setting):
    output = setting["root"] / "teacher_study"
    run("teacher_study.py", "--backbone", setting["run"] / "efficientnet-lite0", "--source",
        f"glyphs={setting['data'] / 'glyphs_default'}:script", "--source",
        f"held_out={setting['data'] / 'glyphs_default'}:script", "--outside-training", "held_out", "--source",
        f"coarse={setting['data'] / 'glyphs_default'}:script", "--low-resolution", "coarse=4", "--sizes", 32,
        "--first-blocks", -1, "--variants", "shift", "--lrs", "1e-3", "--episodes", 2, "--steps", 1, "--output", output)
    readme = (output / "README.md").read_text()
    assert "| glyphs | 32 | 1 | shift, adam x1 |" in readme and "| held_out | 32 | 1 | shift, adam x1 |" in readme
    assert "| coarse | 32 | 1 | shift, adam x1 |" in readme
    run("teacher_study.py", "--backbone", setting["run"] / "efficientnet-lite0", "--source",
        f"glyphs={setting['data'] / 'glyphs_default'}:script", "--sizes", 32, "--first-blocks", -1, "--variants",
        "shift", "--lrs", "1e-1", "--episodes", 2, "--steps", 1, "--optimizer", "sgd", "--output", output)
    readme = (output / "README.md").read_text()
    assert "| glyphs | 32 | 1 | shift, adam x1 | 0.001 |" in readme
    assert "| glyphs | 32 | 1 | shift, sgd x1 | 0.1 |" in readme
    assert len((output / "records.jsonl").read_text().splitlines()) == 7  # dt once: it does not depend on the steps
    import numpy as np

    from benchmarks.teacher_study import episodes_for
    from hf_hyperflow.inputs import at_low_resolution

    source = {"name": "coarse", "path": str(setting["data"] / "glyphs_default"), "group_column": "script",
              "shots": 5, "queries": 15}
    (sharp,), (coarse,) = episodes_for(source, 1, 0), episodes_for(source, 1, 0, low_resolution=4)
    assert sharp.support_indices == coarse.support_indices
    thumbnail = at_low_resolution(sharp.support_images[:1], 4)[0]
    assert np.array_equal(np.asarray(coarse.support_images[0]), np.asarray(thumbnail))
    with pytest.raises(AssertionError, match="--low-resolution names no --source"):
        run("teacher_study.py", "--source", f"glyphs={setting['data'] / 'glyphs_default'}:script", "--low-resolution",
            "other=8", "--output", output)


def test_training_benchmark(setting):
    """The teacher-trajectory run and the validation curve (two ``accelerate launch`` runs on 2 processes) and the
    report; the throughput runs (four more launches of the same kind) are left to the full benchmark."""
    workdir = setting["root"] / "training_benchmark"
    common = ["--workdir", workdir, "--backbone", setting["run"] / "efficientnet-lite0", "--data",
              setting["data"] / "glyphs_default", "--trajectories", 2, "--curve-steps", 1, "--every", 1,
              "--validation-episodes", 1, "--teacher-episodes", 0, "--output", workdir / "report.md", "--plot",
              workdir / "curve.png"]
    for part in ("trajectories", "curve", "report"):
        run("training_benchmark.py", *common, "--only", part)
    report = (workdir / "report.md").read_text()
    assert "## Teacher trajectories" in report and "## Validation accuracy over training" in report
    assert (workdir / "curve.png").is_file()


def test_training_losses(setting):
    output = setting["root"] / "training_losses.md"
    run("training_losses.py", "--run", setting["run"], "--data", setting["data"], "--workdir",
        setting["root"] / "training_losses", "--episodes", 1, "--max-steps", 1, "--modes", "mixed", "--output", output)
    assert "| mixed |" in output.read_text()


def test_every_benchmark_is_run_here():
    drivers = {path.stem for path in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in path.read_text()}
    tested_elsewhere = {"gpu_benchmark"}  # tests/test_gpu_benchmark.py runs its --tiny CPU check
    tested = {name[len("test_"):] for name in globals() if name.startswith("test_")} - {"every_benchmark_is_run_here"}
    assert drivers == tested | tested_elsewhere


def test_gate_study(setting):
    """Episodes beyond the threshold take direct transfer's accuracy, the others keep the method's; the distances
    are those of the adapter's own reference."""
    from transformers import AutoModel

    from benchmarks.gate_study import gate_table, gated_accuracies
    from benchmarks.validation import validation_domains
    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
    from hf_hyperflow.domain_reference import DOMAIN_REFERENCE_FILE, DomainReference
    from hf_hyperflow.episodes import EpisodeSampler
    from hf_hyperflow.training.reference import support_statistics

    assert gated_accuracies([90.0, 80.0, 70.0], [60.0, 60.0, 60.0], [1.0, 3.0, 2.0], 2.0) == [90.0, 60.0, 70.0]
    rows = gate_table({"a": {"method": [90.0, 80.0], "dt": [60.0, 60.0], "distance": [1.0, 3.0]}},
                      [0.5, 2.0, 9.0]).splitlines()[2:]
    assert rows[0].startswith("| 0.5 | -25.00 ±") and rows[0].endswith("(100%) |")
    assert rows[1].startswith("| 2 | -10.00 ±") and rows[1].endswith("(50%) |")
    assert rows[2] == "| 9 | +0.00 ±0.00 (0%) |"

    backbone = AutoModel.from_pretrained(setting["run"] / "efficientnet-lite0").eval()
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(**{**yaml.safe_load(CONFIG.read_text())["adapter"],
                                                            "statistics_size": 3}))
    folder = setting["root"] / "gated_adapter"
    adapter.save_pretrained(folder)
    splits = setting["run"] / "training" / "class_splits"
    common = ["--backbone", setting["run"] / "efficientnet-lite0", "--class-splits", splits,
              "--source", f"glyphs_default={setting['data'] / 'glyphs_default'}:script:2:3"]
    run("validation.py", "--adapter", folder, *common, "--methods", "dt,hyperflow:auto", "--episodes", 3,
        "--output", setting["root"] / "gate_validation")
    results = setting["root"] / "gate_validation" / "results.json"
    output = setting["root"] / "gate.md"
    with pytest.raises(AssertionError, match="has no domain reference"):
        run("gate_study.py", "--adapter", folder, "--results", results, *common, "--output", output)

    source = {"name": "glyphs_default", "path": str(setting["data"] / "glyphs_default"), "group_column": "script",
              "shots": 2, "queries": 3}
    (dataset, kwargs), = validation_domains([source], splits).values()
    sampler = EpisodeSampler(dataset, **{**kwargs, "num_episodes": 4, "seed": 7})
    DomainReference.fit({"glyphs": support_statistics(adapter, sampler, 4)}).save(folder / DOMAIN_REFERENCE_FILE)
    evaluated = EpisodeSampler(dataset, **{**kwargs, "num_episodes": 3, "seed": 0})
    reference = DomainReference.load(folder / DOMAIN_REFERENCE_FILE)
    distances = sorted(float(reference.distance(support_statistics(adapter, evaluated, 3))[i]) for i in range(3))
    text = run("gate_study.py", "--adapter", folder, "--results", results, *common, "--gates",
               f"0,{(distances[0] + distances[1]) / 2!r},1e9", "--output", output)
    lines = [line for line in output.read_text().splitlines() if line.startswith("| ")]
    assert lines[0] == "| gate | glyphs_default (validation) |"
    shares = [line.rsplit("(", 1)[1] for line in lines[1:]]
    assert shares == ["100%) |", "67%) |", "0%) |"]  # the evaluated episodes' own distances
    saved = json.loads(results.read_text())["details"]["glyphs_default (validation)"]["per_episode_accuracy"]
    gain = 100.0 * sum(m - d for m, d in zip(saved["hyperflow:auto"], saved["dt"], strict=True)) / 3
    assert float(lines[1].split(" | ")[1].split(" ±")[0]) == pytest.approx(-gain, abs=0.005)
    assert lines[3] == "| 1e+09 | +0.00 ±0.00 (0%) |"
    assert "glyphs_default (validation): 3 episodes" in text
    with pytest.raises(AssertionError, match="episode 0 is not the validation run's"):
        run("gate_study.py", "--adapter", folder, "--results", results, *common, "--seed", 1, "--output", output)


def test_interleaved_latency(setting):
    """Each adapter's mean time over dt's, the later adapters' paired difference in units of dt's mean; a run needs
    two adapters of one image size."""
    from benchmarks.interleaved_latency import summarise

    rows = summarise({"dt": [1.0, 3.0], "a": [3.0, 5.0], "b": [4.0, 4.0]})
    assert rows["a"]["latency_vs_dt"] == pytest.approx(2.0) and rows["b"]["latency_vs_dt"] == pytest.approx(2.0)
    assert rows["b"]["minus_a_vs_dt"]["mean"] == pytest.approx(0.0)
    assert rows["b"]["minus_a_vs_dt"]["ci95"] == pytest.approx(1.96 * 0.5 / 2 ** 0.5)

    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter

    first = setting["run"] / "training" / "best"
    backbone = setting["run"] / "efficientnet-lite0"
    second = setting["root"] / "latency_second"
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(backbone), first)
    adapter.config.stopping = "fixed"
    adapter.save_pretrained(second)
    output = setting["root"] / "interleaved"
    common = ["--backbone", backbone, "--class-splits", setting["run"] / "training" / "class_splits",
              "--source", f"glyphs_default={setting['data'] / 'glyphs_default'}:script:2:3", "--episodes", 2,
              "--output", output]
    run("interleaved_latency.py", "--adapter", f"auto={first}", "--adapter", f"fixed={second}", *common)
    saved = json.loads((output / "results.json").read_text())
    row = saved["sources"]["glyphs_default (validation)"]
    assert set(row) == {"dt", "auto", "fixed"} and "minus_auto_vs_dt" in row["fixed"]
    assert row["auto"]["latency_vs_dt"] == pytest.approx(row["auto"]["adapt_latency_s"] / row["dt"]["adapt_latency_s"])
    assert "| glyphs_default (validation) |" in (output / "results.md").read_text()
    with pytest.raises(AssertionError, match="at least two --adapter"):
        run("interleaved_latency.py", "--adapter", f"auto={first}", *common)
