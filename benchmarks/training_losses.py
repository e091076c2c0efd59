"""Flow-only, unrolled-only and mixed meta-training, compared on the same teacher data and the same episodes.

    python benchmarks/training_losses.py --run runs/quickstart [--episodes 300] [--max-steps 80]
        [--output benchmarks/training_losses.md]

``--run`` is a run folder of recipes/quickstart.py: its backbone, its recorded teacher trajectories
(``training/trajectories/glyphs_default``) and its class split of glyphs_default are reused, so the three
trainings see the same fine-tuning trajectories and the same training classes and differ only in the loss
weights (``losses.flow`` / ``losses.unrolled``). Each training runs as ``python recipes/train.py`` (the same
code path as ``accelerate launch`` with one process) with the config of recipes/quickstart.py; its ``final`` adapter (the
same number of optimizer steps for every mode) is then evaluated with ``dt`` and ``hyperflow`` on the same
seeded episodes of the held-out scripts, digits and Fashion-MNIST; the report also gives each mode's
validation accuracy over training (40 episodes of the validation classes of glyphs_default). Writes the Markdown report and
``<report stem>.json`` next to it; nothing is edited by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

MODES = {"mixed": {"losses.flow": 1.0, "losses.unrolled": 1.0},
         "flow-only": {"losses.flow": 1.0, "losses.unrolled": 0.0},
         "unrolled-only": {"losses.flow": 0.0, "losses.unrolled": 1.0}}


def train_mode(mode: str, run: Path, workdir: Path, data: Path, max_steps: int, threads: int) -> tuple[Path, dict]:
    """Meta-train one mode in a subprocess; returns (its best adapter folder, its metrics.json)."""
    from recipes.quickstart import TRAINING_CONFIG, glyphs_dataset

    output_dir = workdir / mode
    overrides = {
        "output_dir": str(output_dir),
        "backbone.path": str(run / "efficientnet-lite0"),
        "flow.generate": "null",
        "flow.trajectories": json.dumps([str(run / "training" / "trajectories" / "glyphs_default")]),
        "training.max_steps": max_steps,
        "training.checkpoint_every": max(1, max_steps // 2),
        "training.threads": threads,
        "validation.episodes": 40,
        "validation.every": max(1, max_steps // 4),
        **MODES[mode],
    }
    command = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(TRAINING_CONFIG), "--cpu", "true",
               *glyphs_dataset(data / "glyphs_default")]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    metrics_file = output_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    if metrics.get("step") == max_steps and (output_dir / "final").is_dir():
        print(f"[training_losses] {mode}: {output_dir} already holds a finished {max_steps}-step run", flush=True)
        return output_dir / "final", metrics
    resume = ["--resume", "true"] if (output_dir / "checkpoints").exists() else []
    print(f"[training_losses] {mode}: {shlex.join(command + resume)}", flush=True)
    subprocess.run(command + resume, check=True, cwd=REPO)
    return output_dir / "final", json.loads(metrics_file.read_text())


def quickstart_domains(run: Path, data: Path) -> dict[str, tuple]:
    """``name -> (dataset, sampler_kwargs)``: the held-out scripts of glyphs_default (the test classes of ``run``'s
    class split), then digits and Fashion-MNIST (all classes); 5-way 5-shot 15-query episodes. Missing datasets
    are built into ``data`` first."""
    from hf_hyperflow.episodes import ClassSplit, load_image_dataset
    from hf_hyperflow.registry import build_missing

    build_missing(data, ("glyphs_default", "digits", "fashion_mnist"))
    fixed = {"protocol": "fixed", "ways": 5, "shots": 5, "queries": 15}
    glyph_split = ClassSplit.load(run / "training" / "class_splits" / "glyphs_default.json")
    return {
        "glyphs_default (held-out scripts)": (load_image_dataset(data / "glyphs_default"),
                                              {**fixed, "split": "test", "class_split": glyph_split}),
        **{f"{name} (out of domain)": (load_image_dataset(data / name), {**fixed, "split": None})
           for name in ("digits", "fashion_mnist")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/training_losses"))
    parser.add_argument("--episodes", type=int, default=300, help="evaluation episodes per domain")
    parser.add_argument("--max-steps", type=int, default=80, help="meta-training optimizer steps of every mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of training and evaluation")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/training_losses.md"))
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter
    from hf_hyperflow.evaluation import Evaluator, machine_description, run_evaluation

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    trajectories = args.run / "training" / "trajectories" / "glyphs_default"
    if not (trajectories / "store.json").is_file():
        raise FileNotFoundError(f"{trajectories} holds no trajectory store: run `python recipes/quickstart.py "
                                f"--output {args.run}` first (it records the teacher trajectories).")
    domains = quickstart_domains(args.run, args.data)
    report = {"meta": {"command": "python benchmarks/training_losses.py " + shlex.join(argv or sys.argv[1:]),
                       "machine": machine_description(), "date": date.today().isoformat(),
                       "episodes": args.episodes, "max_steps": args.max_steps, "run": str(args.run)},
              "modes": {}}
    for mode in args.modes:
        adapter_dir, metrics = train_mode(mode, args.run, args.workdir, args.data, args.max_steps, args.threads)
        adapter = HyperFlowAdapter.from_pretrained(AutoModel.from_pretrained(args.run / "efficientnet-lite0").eval(),
                                                   adapter_dir)
        results, _ = run_evaluation(Evaluator(adapter, ["dt", "hyperflow"], memory_episodes=0), domains,
                                    episodes=args.episodes, meta={}, batch_tasks=0)
        report["modes"][mode] = {
            "weights": MODES[mode], "adapter": str(adapter_dir), "train_seconds": metrics["train_seconds"],
            "best_step": metrics.get("best_step"), "validation_accuracy": metrics.get("best_accuracy"),
            "validation_curve": [(v["step"], v["accuracy"]) for v in metrics.get("validations", [])],
            "results": {domain: {m: {k: row[k] for k in ("accuracy", "ci95", "episodes", "adapt_latency_s")}
                                 for m, row in methods.items()} for domain, methods in results["results"].items()},
        }
    report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    args.output.write_text(text)
    print(text)


def render(report: dict) -> str:
    """The Markdown report of a ``report`` written by :func:`main`."""
    meta = report["meta"]
    lines = ["# Flow-only, unrolled-only and mixed meta-training", "",
             f"Command: `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta['seconds']:.0f} s in all).", "",
             f"Every mode: the EfficientNet-Lite0 config of recipes/quickstart.py (64 px, last two blocks adapted, "
             f"euler x 8), {meta['max_steps']} optimizer steps of 8 episodes / 16 trajectories, the same 64 teacher "
             f"trajectories and class split of `{meta['run']}`; the adapter evaluated is the one after the last "
             f"step (`final`). Evaluation: {meta['episodes']} 5-way 5-shot 15-query episodes per domain, the same "
             "seeded episodes for every mode and method; accuracy in %, ± the 95% CI half-width.", "",
             "| mode | losses (flow, unrolled) | train s | domain | dt % | hyperflow % | hyperflow - dt |",
             "|---|---|---|---|---|---|---|"]
    for mode, entry in report["modes"].items():
        weights = entry["weights"]
        for domain, methods in entry["results"].items():
            dt, flow = methods["dt"], methods["hyperflow"]
            lines.append(
                f"| {mode} | {weights['losses.flow']:g}, {weights['losses.unrolled']:g} | {entry['train_seconds']:.0f} "
                f"| {domain} | {dt['accuracy']:.2f} ± {dt['ci95']:.2f} | {flow['accuracy']:.2f} ± {flow['ci95']:.2f} "
                f"| {flow['accuracy'] - dt['accuracy']:+.2f} |")
    steps = sorted({step for entry in report["modes"].values() for step, _ in entry["validation_curve"]})
    lines += ["", "Validation accuracy (%) over meta-training (40 fixed episodes of the validation classes of "
              "glyphs_default, euler x 8; step 0 is the untrained drift network):", "",
              "| mode | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---|" * len(steps)]
    for mode, entry in report["modes"].items():
        curve = dict(entry["validation_curve"])
        lines.append(f"| {mode} | " + " | ".join(f"{100 * curve[s]:.2f}" if s in curve else "-" for s in steps) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
