"""Meta-training on the pretrained EfficientNet-Lite0: throughput of the two losses on 1 and 2 processes, and
validation accuracy over training, all through ``accelerate launch recipes/train.py``.

    python benchmarks/training_benchmark.py --workdir /tmp/hf_training_bench \\
        --output benchmarks/training_benchmark.md --plot benchmarks/training_accuracy.png

Runs, in order (each a separate ``accelerate launch`` of recipes/configs/efficientnet_lite0.yaml with overrides):

1. ``trajectories``: the fine-tuning teacher records ``--trajectories`` trajectories (2 processes).
2. ``throughput``: the unrolled loss and the flow loss alone, on 1 process and on 2 processes, with the same
   settings (episodes or trajectories per step over all processes); no validation. Every run starts with an
   empty frozen-prefix cache, so the first windows are cold.
3. ``curve``: both losses on 2 processes, validating every ``--every`` steps; the accuracy curve is plotted
   against the direct-transfer baseline and the teacher's accuracy on the first validation episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

from recipes.quickstart import TRAINING_CONFIG as CONFIG  # noqa: E402
from recipes.quickstart import glyphs_dataset  # noqa: E402


def launch(processes: int, output: Path, overrides: list[str], port: int, log: Path) -> tuple[dict, float]:
    """One ``accelerate launch`` of recipes/train.py; returns the run's metrics.json and the wall seconds."""
    if processes == 1:
        head = ["--num_processes", "1"]
    else:
        head = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(port)]
    command = [sys.executable, "-m", "accelerate.commands.launch", *head, "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "train.py"), "--config", str(CONFIG), "--cpu", "true",
               "--output_dir", str(output), *overrides]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"run failed ({done.returncode}); see {log}")
    return json.loads((output / "metrics.json").read_text()), seconds


def rates(metrics: dict, key: str) -> dict:
    """Units per second over the whole run and over its last logged window (warmest caches)."""
    history = metrics["history"]
    units = sum(h[key] * h["seconds"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    return {"overall": units / seconds, "last_window": history[-1][key], "train_seconds": seconds,
            "units": round(units)}


def teacher_accuracy(backbone: str, data: str, episodes: int, lr: float, steps: int,
                     threads: int) -> tuple[float, float, float]:
    """Query accuracy of fine-tuning (the teacher) on the first validation episodes, as the run draws them."""
    import torch
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig
    from hf_hyperflow.episodes import ClassSplit, EpisodeSampler, load_image_dataset
    from hf_hyperflow.finetune import finetune, query_accuracy
    from hf_hyperflow.stats import mean_confidence_interval

    torch.set_num_threads(threads)
    dataset = load_image_dataset(data)
    split = ClassSplit.from_dataset(dataset, fractions=(0.7, 0.15, 0.15), seed=0, group_column="script")
    sampler = EpisodeSampler(dataset, ways=5, shots=5, queries=10, seed=12345, split="validation", class_split=split,
                             num_episodes=episodes)
    adapter = HyperFlowAdapter(AutoModel.from_pretrained(backbone),
                               HyperFlowConfig(r=4, first_adapted_block=-2, image_size=64))
    start = time.perf_counter()
    accuracies = []
    for i in range(episodes):
        episode = sampler[i]
        result = finetune(adapter, adapter.pixel_values(episode.support_images), episode.support_labels, steps=steps,
                          lr=lr, seed=i, augment_pool=4)
        accuracies.append(query_accuracy(result.task, adapter.pixel_values(episode.query_images),
                                         episode.query_labels))
    mean, half = mean_confidence_interval(accuracies)
    return mean, half, (time.perf_counter() - start) / episodes


def plot(curve: dict, teacher: tuple[float, float] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    validations = curve["validations"]
    minutes = [v["train_seconds"] / 60 for v in validations]
    accuracy = [100 * v["accuracy"] for v in validations]
    name = next(k for k in validations[0] if isinstance(validations[0][k], dict))
    errors = [100 * v[name]["ci95"] for v in validations]
    direct = curve["direct_transfer"]
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.errorbar(minutes, accuracy, yerr=errors, marker="o", capsize=3, label="HyperFlow (validation, 95% CI)")
    axis.axhline(100 * direct["accuracy"], color="gray", linestyle="--",
                 label=f"direct transfer {100 * direct['accuracy']:.1f}%")
    if teacher is not None:
        axis.axhline(100 * teacher[0], color="green", linestyle=":", label=f"fine-tuning teacher {100 * teacher[0]:.1f}%"
                     " (first val. episodes)")
    axis.set_xlabel("training time (min, 2 CPU processes, excluding validation)")
    axis.set_ylabel("5-way 5-shot query accuracy (%)")
    axis.set_title("EfficientNet-Lite0 @ 64 px, glyphs_default validation scripts")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the runs are written")
    parser.add_argument("--backbone", default="/tmp/effl0", help="EfficientNet-Lite0 folder (built there if missing)")
    parser.add_argument("--data", default="data/glyphs_default", help="the glyphs_default dataset folder")
    parser.add_argument("--trajectories", type=int, default=48, help="fine-tuning trajectories recorded")
    parser.add_argument("--throughput-steps", type=int, default=16, help="optimizer steps of each throughput run")
    parser.add_argument("--curve-steps", type=int, default=80, help="optimizer steps of the accuracy run")
    parser.add_argument("--every", type=int, default=20, help="validation interval of the accuracy run")
    parser.add_argument("--validation-episodes", type=int, default=60)
    parser.add_argument("--teacher-episodes", type=int, default=20, help="0: skip the teacher reference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", type=Path, required=True, help="Markdown report")
    parser.add_argument("--plot", type=Path, required=True, help="PNG of validation accuracy over training")
    parser.add_argument("--only", choices=["trajectories", "throughput", "curve", "report"], default=None)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_file = args.workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("machine", {"platform": platform.platform(), "python": platform.python_version(),
                                   "cores": os.cpu_count()})
    store = args.workdir / "trajectories"
    common = ["--backbone.path", args.backbone, *glyphs_dataset(Path(args.data)), "--training.log_every", "4",
              "--training.threads", str(args.threads),
              "--flow.generate.output", str(store), "--flow.generate.episodes", str(args.trajectories)]
    if not Path(args.backbone).exists():
        common += ["--backbone.build", "efficientnet_lite0"]
    else:
        common += ["--backbone.build", "null"]

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    if args.only == "report":
        report(results, args)
        return 0
    if args.only in (None, "trajectories"):
        out = args.workdir / "trajectories_run"
        metrics, seconds = launch(2, out, [*common, "--losses.unrolled", "0", "--training.max_steps", "1",
                                           "--validation.episodes", "0"], 29541, args.workdir / "trajectories.log")
        results["trajectories"] = {"count": metrics["trajectories"], "wall_seconds": seconds, "processes": 2,
                                   "load": os.getloadavg()}
        save()
    if args.only in (None, "throughput"):
        results["throughput"] = {}
        for loss, key, steps in (("unrolled", "episodes_per_second", args.throughput_steps),
                                 ("flow", "trajectories_per_second", 3 * args.throughput_steps)):
            other = "flow" if loss == "unrolled" else "unrolled"
            for processes in (1, 2):
                name = f"{loss}_{processes}p"
                out = args.workdir / name
                load = os.getloadavg()
                metrics, seconds = launch(processes, out, [*common, f"--losses.{other}", "0", "--training.max_steps",
                                                           str(steps), "--validation.episodes", "0",
                                                           "--training.checkpoint_every", "1000"],
                                          29551 + processes, args.workdir / f"{name}.log")
                results["throughput"][name] = {**rates(metrics, key), "wall_seconds": seconds, "steps": steps,
                                               "load_before": load, "prefix_cache": metrics["prefix_cache"]}
                save()
    if args.only in (None, "curve"):
        out = args.workdir / "curve"
        metrics, seconds = launch(2, out, [*common, "--training.max_steps", str(args.curve_steps), "--validation.every",
                                           str(args.every), "--validation.episodes", str(args.validation_episodes),
                                           "--training.checkpoint_every", "1000"], 29561, args.workdir / "curve.log")
        results["curve"] = {"direct_transfer": metrics["direct_transfer"], "validations": metrics["validations"],
                            "wall_seconds": seconds, "steps": args.curve_steps, "history": metrics["history"]}
        if args.teacher_episodes:
            results["teacher"] = dict(zip(("accuracy", "ci95", "seconds_per_episode"), teacher_accuracy(
                args.backbone, args.data, args.teacher_episodes, lr=0.01, steps=20, threads=args.threads), strict=True))
        save()
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    teacher = results.get("teacher")
    if "curve" in results:
        plot(results["curve"], (teacher["accuracy"], teacher["ci95"]) if teacher else None, args.plot)
    lines = [f"# Meta-training on EfficientNet-Lite0 (measured {datetime.now(UTC):%Y-%m-%d})", "",
             "Command:", "", "```",
             f"python benchmarks/training_benchmark.py --workdir {args.workdir} --trajectories {args.trajectories} "
             f"--throughput-steps {args.throughput_steps} --curve-steps {args.curve_steps} --every {args.every} "
             f"--validation-episodes {args.validation_episodes} --teacher-episodes {args.teacher_episodes} "
             f"--threads {args.threads} "
             f"--output {args.output} --plot {args.plot}", "```", "",
             f"Machine: {results['machine']['platform']}, {results['machine']['cores']} CPU cores shared with other "
             f"jobs (load averages are given per run), no GPU, {args.threads} torch thread(s) per process. Config: recipes/configs/efficientnet_lite0.yaml "
             "(Lite0 at 64 px, last two blocks adapted with LoRA r=4 + shifts + head, 5-way 5-shot 10-query "
             "episodes of glyphs_default, class split by script), every run through `accelerate launch`.", ""]
    if "trajectories" in results:
        t = results["trajectories"]
        lines += ["## Teacher trajectories", "",
                  f"{t['count']} fine-tuning trajectories (20 Adam steps, lr 1e-2, augment pool 4) on 2 processes: "
                  f"{t['wall_seconds']:.0f} s wall including start-up "
                  f"({3600 * t['count'] / t['wall_seconds']:.0f} trajectories/hour).", ""]
    if "throughput" in results:
        lines += ["## Throughput", "",
                  "Same settings on 1 and 2 processes (8 episodes or 16 trajectories per optimizer step over all "
                  "processes); each run starts with an empty frozen-prefix cache. `overall` = all steps, "
                  "`last window` = the last 4 steps.", "",
                  "| loss | processes | steps | overall (units/s) | last window (units/s) | train s | wall s | "
                  "load before |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results["throughput"].items():
            loss, processes = name.split("_")
            unit = "episodes" if loss == "unrolled" else "trajectories"
            lines.append(f"| {loss} ({unit}) | {processes[:-1]} | {r['steps']} | {r['overall']:.2f} | "
                         f"{r['last_window']:.2f} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                         f"{r['load_before'][0]:.1f} |")
        lines.append("")
        speedup = {loss: results["throughput"][f"{loss}_2p"]["overall"] / results["throughput"][f"{loss}_1p"]["overall"]
                   for loss in ("unrolled", "flow") if f"{loss}_2p" in results["throughput"]}
        lines += [f"2 processes vs 1 (overall): unrolled x{speedup.get('unrolled', float('nan')):.2f}, flow "
                  f"x{speedup.get('flow', float('nan')):.2f}. The cores are shared with other jobs (load before each run "
                  "above), so a second process does not get a free core. The unrolled loss costs the adapted suffix "
                  "forward + backward per episode once the frozen prefix of its images is kept (the first steps also "
                  "compute the prefix of every new image). A flow step costs almost only the drift network's gradient "
                  "all-reduce over gloo (1.6 M parameters in this config) and, on first use of a trajectory, one "
                  "frozen forward of its support set on every process that draws it, which is why the second process "
                  "does not help the flow loss at this size.", ""]
    if "curve" in results:
        curve = results["curve"]
        direct = curve["direct_transfer"]
        name = next(k for k in direct if isinstance(direct[k], dict))
        lines += ["## Validation accuracy over training", "",
                  f"Both losses (unrolled 1.0 + flow 1.0), 2 processes, {curve['steps']} steps, "
                  f"{direct[name]['episodes']} fixed validation episodes. Direct transfer (frozen backbone, theta_0): "
                  f"{100 * direct['accuracy']:.2f} +- {100 * direct[name]['ci95']:.2f} %.", "",
                  f"![accuracy]({args.plot.name})", "", "| step | train time (s) | accuracy (%) | 95% CI |",
                  "|---|---|---|---|"]
        useful = None
        for v in curve["validations"]:
            lines.append(f"| {v['step']} | {v['train_seconds']:.0f} | {100 * v['accuracy']:.2f} | "
                         f"{100 * v[name]['ci95']:.2f} |")
            margin = max(v[name]["ci95"], direct[name]["ci95"])
            if useful is None and v["step"] > 0 and v["accuracy"] - direct["accuracy"] > margin:
                useful = v
        lines.append("")
        if teacher:
            lines.append(f"Fine-tuning teacher on the first {args.teacher_episodes} of these validation episodes: "
                         f"{100 * teacher['accuracy']:.1f} +- {100 * teacher['ci95']:.1f} % "
                         f"({teacher['seconds_per_episode']:.1f} s per episode).")
            lines.append("")
        generation = results.get("trajectories", {}).get("wall_seconds", 0.0)
        if useful is not None:
            lines.append(f"Useful adapter (validation accuracy above direct transfer by more than the larger 95% CI "
                         f"half-width): step {useful['step']}, after {useful['train_seconds']:.0f} s of training "
                         f"(+ {generation:.0f} s of trajectory recording = {useful['train_seconds'] + generation:.0f} "
                         "s).")
        else:
            lines.append(f"No validation beat direct transfer by more than its 95% CI within {curve['steps']} steps "
                         f"({curve['validations'][-1]['train_seconds']:.0f} s of training).")
        lines.append("")
    args.output.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
