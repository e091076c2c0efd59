"""Cost of gradient fine-tuning per task, trajectory throughput and storage; writes benchmarks/finetune_cost.md.

    python benchmarks/finetune_cost.py --backbone-dir /tmp/effl0 --dataset data/glyphs_default \\
        --tasks 1 --steps 50 --threads 1

For each backbone (the pretrained EfficientNet-Lite0 and a tiny random ViT) and each fine-tuning variant
(full, lora, shift, head, lora+shift+head; and lora+shift+head on the last block only, where the frozen
prefix is cached, with and without a pool of augmented copies), a fresh process fine-tunes ``--tasks``
5-way 5-shot tasks at 224 px for ``--steps`` steps and reports:

- seconds per task (wall clock, the whole :func:`hf_hyperflow.finetune.finetune` call);
- autograd memory: the peak, over the run, of the bytes of the tensors autograd holds for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters and trainable leaves left out)
  plus the trainable tensors, their gradients and Adam's two moments. On CUDA, ``torch.cuda.max_memory_allocated``
  is reported as well;
- the process's peak resident memory (``ru_maxrss``) and its growth during fine-tuning (a fresh process per
  variant, so that peaks do not carry over).

Then :func:`hf_hyperflow.trajectories.record_trajectories` stores a few trajectories for the variants
that make trajectories (lora+shift+head) and the bytes per stored trajectory and trajectories per hour are
measured from the store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

VARIANTS = {
    # name: (groups, adapt only the last block, augment pool)
    "full": (("full",), False, None),
    "lora": (("lora",), False, None),
    "shift": (("shift",), False, None),
    "head": (("head",), False, None),
    "lora+shift+head": (("lora", "shift", "head"), False, None),
    "lora+shift+head, last block (cached prefix)": (("lora", "shift", "head"), True, None),
    "lora+shift+head, last block, pool of 10": (("lora", "shift", "head"), True, 10),
}
MODELS = ("efficientnet_lite0", "tiny_vit")
TRAJECTORY_VARIANTS = ("lora+shift+head", "lora+shift+head, last block (cached prefix)",
                       "lora+shift+head, last block, pool of 10")
WAYS, SHOTS, IMAGE = 5, 5, 224
# first_adapted_block for "last block": the core's block count for timm EfficientNets lists each stage and
# each block, so -2 is the last block (timm_model.blocks.6.0) and the head conv / norm after it.
LAST_BLOCK = {"efficientnet_lite0": -2, "tiny_vit": -1}


# ------------------------------------------------------------------------------------------------
# Memory held by autograd
# ------------------------------------------------------------------------------------------------
class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorMeter:
    """Live bytes of the tensors autograd saves for backward (unique storages), and their peak.

    Storages of leaves (parameters, trainable tensors, inputs that need no grad but are leaves of the
    backbone) listed in ``exclude`` are not counted; a storage saved several times counts once.
    """

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self.live[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[pointer]

    def pack(self, tensor):
        if tensor.is_leaf and tensor.requires_grad:
            return tensor
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self.exclude or storage.nbytes() == 0:
            return tensor
        handle = _Saved(tensor)
        if pointer in self.live:
            self.live[pointer][0] += 1
        else:
            self.live[pointer] = [1, storage.nbytes()]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(handle, self._release, pointer)
        return handle

    @staticmethod
    def unpack(handle):
        return handle.tensor if isinstance(handle, _Saved) else handle

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


# ------------------------------------------------------------------------------------------------
# Models and tasks
# ------------------------------------------------------------------------------------------------
def build_adapter(model: str, backbone_dir: Path, first_adapted_block: int | None):
    import warnings

    from transformers import AutoConfig, AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model == "efficientnet_lite0":
            backbone = AutoModel.from_pretrained(str(backbone_dir))
        else:
            torch.manual_seed(0)
            backbone = AutoModel.from_config(AutoConfig.for_model(
                "vit", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                image_size=IMAGE, patch_size=16))
        return HyperFlowAdapter(backbone, HyperFlowConfig(groups=["lora", "shift", "head"], r=4, image_size=IMAGE,
                                                          first_adapted_block=first_adapted_block))


class RandomEpisodes:
    """Stand-in episodes of random pixels (when no dataset is given): ``WAYS`` x ``SHOTS`` support images."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        from types import SimpleNamespace

        generator = torch.Generator().manual_seed(i)
        return SimpleNamespace(support_images=torch.randn(WAYS * SHOTS, 3, IMAGE, IMAGE, generator=generator),
                               support_labels=torch.arange(WAYS).repeat_interleave(SHOTS),
                               classes=[str(c) for c in range(WAYS)], spec={"random": True, "index": i})


def episodes_for(dataset: str | None, count: int):
    if dataset is None:
        return RandomEpisodes(count)
    from hf_hyperflow.episodes import EpisodeSampler, load_image_dataset

    return EpisodeSampler(load_image_dataset(dataset), protocol="fixed", ways=WAYS, shots=SHOTS, queries=1, seed=0,
                          split="test", num_episodes=count)


def adapted_blocks(adapter, groups) -> list[str]:
    """Where the chosen groups act: the blocks (or modules outside blocks) whose HyperFlow layers they adapt,
    and "head" for the prototype shift."""
    from hf_hyperflow.prefix import innermost_blocks

    if groups == ("full",):
        return ["all parameters"]
    blocks = innermost_blocks(adapter.backbone)
    names = ["head"] if "head" in groups else []
    for name, layer in adapter.tuner.hyperflow_layers():
        if not layer.roles & set(groups):
            continue
        block = next((b for b in blocks if name.startswith(b + ".")), name)
        if block not in names:
            names.append(block)
    return names


# ------------------------------------------------------------------------------------------------
# Workers (one fresh process each)
# ------------------------------------------------------------------------------------------------
def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def finetune_worker(job: dict) -> dict:
    from hf_hyperflow.finetune import finetune, initial_state

    groups, last_block, pool = VARIANTS[job["variant"]]
    adapter = build_adapter(job["model"], Path(job["backbone_dir"]), LAST_BLOCK[job["model"]] if last_block else None)
    episodes = episodes_for(job["dataset"], job["tasks"])
    tasks = []
    for i in range(job["tasks"]):
        episode = episodes[i]
        tasks.append((adapter.pixel_values(episode.support_images),
                      torch.as_tensor(episode.support_labels, dtype=torch.long)))
    exclude = {p.untyped_storage().data_ptr() for p in adapter.backbone.parameters()}
    if groups == ("full",):
        trainable = sum(p.numel() for p in adapter.backbone.parameters())
    else:
        trainable = sum(v.numel() for k, v in initial_state(adapter, WAYS).items() if k.split(".")[0] in groups)
    rss_before = max_rss_bytes()
    cuda = torch.cuda.is_available()
    seconds, saved_peaks, cuda_peaks, cached = [], [], [], []
    for i, (pixels, labels) in enumerate(tasks):
        meter = SavedTensorMeter(exclude)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with meter.hooks():
            result = finetune(adapter, pixels, labels, groups=groups, steps=job["steps"], lr=1e-3, seed=i,
                              augment_pool=pool)
        seconds.append(result.seconds)
        saved_peaks.append(meter.peak)
        cached.append(result.prefix_cached)
        if cuda:
            cuda_peaks.append(torch.cuda.max_memory_allocated())
    return {
        "model": job["model"], "variant": job["variant"], "tasks": len(tasks), "steps": job["steps"],
        "seconds_per_task": sum(seconds) / len(seconds), "seconds": seconds,
        "trainable_numel": trainable, "optimizer_bytes": 4 * 4 * trainable,  # value, grad, Adam m and v (fp32)
        "saved_tensor_peak_bytes": max(saved_peaks), "rss_peak_bytes": max_rss_bytes(),
        "rss_growth_bytes": max_rss_bytes() - rss_before, "cuda_peak_bytes": max(cuda_peaks) if cuda else None,
        "prefix_cached": all(cached), "adapted": adapted_blocks(adapter, groups),
        "snapshot_numel": sum(v.numel() for v in initial_state(adapter, WAYS).values()),
    }


def trajectory_worker(job: dict) -> dict:
    from hf_hyperflow.trajectories import TrajectoryStore, record_trajectories

    groups, last_block, pool = VARIANTS[job["variant"]]
    adapter = build_adapter(job["model"], Path(job["backbone_dir"]), LAST_BLOCK[job["model"]] if last_block else None)
    episodes = episodes_for(job["dataset"], job["tasks"])
    with tempfile.TemporaryDirectory() as folder:
        store_dir = Path(folder) / "store"
        start = time.perf_counter()
        record_trajectories(adapter, episodes, store_dir, groups=groups, steps=job["steps"], lr=1e-3,
                            augment_pool=pool, shard_size=job["tasks"])
        seconds = time.perf_counter() - start
        store = TrajectoryStore(store_dir)
        shard_bytes = sum(p.stat().st_size for p in (store_dir / "shards").iterdir())
        snapshot_numel = sum(v[0].numel() for v in store[0].snapshots.values())
        count = len(store)
    return {"model": job["model"], "variant": job["variant"], "trajectories": count, "seconds": seconds,
            "trajectories_per_hour": count * 3600 / seconds, "bytes_per_trajectory": shard_bytes / count,
            "snapshots": job["steps"] + 1, "numel_per_snapshot": snapshot_numel,
            "tensor_bytes_per_trajectory": snapshot_numel * (job["steps"] + 1) * 4}


def run_worker(job: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"worker {job} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def write_report(path: Path, command: str, settings: dict, finetune_rows: list[dict], trajectory_rows: list[dict]):
    """The Markdown report: settings, the fine-tuning table, the trajectory table, notes and the raw rows."""
    lines = [*_finetune_table(command, settings, finetune_rows), *_trajectory_table(settings, finetune_rows,
                                                                                     trajectory_rows)]
    lines += _notes(settings, finetune_rows, trajectory_rows)
    path.write_text("\n".join(lines))


def _finetune_table(command: str, settings: dict, finetune_rows: list[dict]) -> list[str]:
    lines = [
        "# Cost of gradient fine-tuning (P>M>F protocol) and of trajectories",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {settings['date']}. Machine: {settings['machine']}. torch {settings['torch']}, "
        f"{settings['threads']} torch thread(s) per process, device {settings['device']}. "
        f"Load average when the run started: {settings['load']}; the 2 cores were shared with other work, "
        "so times are those of a busy machine.",
        "",
        f"Tasks: {WAYS}-way {SHOTS}-shot at {IMAGE} px, {settings['tasks']} task(s) per variant, "
        f"{settings['steps']} Adam steps each (lr 1e-3), pseudo-queries = DiffAugment(support), the "
        f"support and pseudo-query batches in one forward pass ({2 * WAYS * SHOTS} images a step). "
        f"Images: {settings['images']}.",
        "",
        "Backbones: EfficientNet-Lite0 (ImageNet weights, 3.4 M parameters, timm through transformers' "
        "TimmWrapperModel); tiny ViT (random, hidden 64, 4 layers, 4 heads, patch 16). HyperFlow state: "
        "LoRA r=4 on the table's targets, shifts of the table's biases / norms, head = per-class prototype shift.",
        "",
        "Memory columns: *autograd* = peak bytes of the tensors autograd saves for the backward pass (measured "
        "with `torch.autograd.graph.saved_tensors_hooks`, unique storages, parameters and trainable leaves "
        "excluded; gradients of activations during backward are not included, so this is a lower bound of "
        "backpropagation's memory) + the trainable tensors, their gradients and Adam's two moments "
        "(4 x 4 bytes per trainable number). *RSS peak* = the fresh worker process's peak resident memory "
        "(weights, images, runtime and all), *RSS growth* = its rise during fine-tuning.",
        "",
        "| backbone | variant | adapted | trainable numbers | s / task | autograd MiB (saved + optimiser) | "
        "RSS peak MiB | RSS growth MiB | prefix cached |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in finetune_rows:
        adapted = ", ".join(a.replace("timm_model.", "") for a in row["adapted"])
        if len(adapted) > 60:
            adapted = f"{', '.join(row['adapted'][:2])}, ... ({len(row['adapted'])} blocks / modules)"
        total = row["saved_tensor_peak_bytes"] + row["optimizer_bytes"]
        cuda = f", CUDA peak {mib(row['cuda_peak_bytes'])}" if row["cuda_peak_bytes"] else ""
        lines.append(
            f"| {row['model']} | {row['variant']} | {adapted} | {row['trainable_numel']:,} | "
            f"{row['seconds_per_task']:.1f} | {mib(total)} ({mib(row['saved_tensor_peak_bytes'])} + "
            f"{mib(row['optimizer_bytes'])}){cuda} | {mib(row['rss_peak_bytes'])} | {mib(row['rss_growth_bytes'])} | "
            f"{'yes' if row['prefix_cached'] else 'no'} |")
    return lines


def _trajectory_table(settings: dict, finetune_rows: list[dict], trajectory_rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Trajectories",
        "",
        "Measured with `record_trajectories` (one process, float32, every snapshot kept, "
        f"{settings['trajectory_tasks']} episode(s) per row): trajectories per hour of one process on this "
        "machine, and bytes per stored trajectory (shard files / trajectories). *Tensor bytes* = numbers per "
        "snapshot x snapshots x 4; the rest is the safetensors header with the records.",
        "",
        "| backbone | variant | numbers per snapshot | snapshots | trajectories / hour (1 process) | "
        "bytes / trajectory | tensor bytes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in trajectory_rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['numel_per_snapshot']:,} | {row['snapshots']} | "
            f"{row['trajectories_per_hour']:.1f} | {row['bytes_per_trajectory']:,.0f} | "
            f"{row['tensor_bytes_per_trajectory']:,} |")
    measured = {(row["model"], row["variant"]) for row in trajectory_rows}
    for row in finetune_rows:
        if row["variant"] in TRAJECTORY_VARIANTS and (row["model"], row["variant"]) not in measured:
            snapshots = row["steps"] + 1
            lines.append(
                f"| {row['model']} | {row['variant']} (not recorded: 3600 / s per task above; bytes = numbers x "
                f"snapshots x 4) | {row['snapshot_numel']:,} | {snapshots} | {3600 / row['seconds_per_task']:.1f} | "
                f"- | {row['snapshot_numel'] * snapshots * 4:,} |")
    return lines


def _notes(settings: dict, finetune_rows: list[dict], trajectory_rows: list[dict]) -> list[str]:
    return [
        "",
        "Storage options: `snapshot_every=k` keeps K/k + 1 snapshots (enough for the linear path: k = K, two "
        "snapshots) and `dtype=\"bfloat16\"` halves the bytes.",
        "",
        "## Reading the tables",
        "",
        "- LoRA and shifts in every block need backpropagation through every activation, so their time and "
        "memory are close to those of full fine-tuning; only the head alone needs no backward pass through the "
        "backbone (its cost is one forward pass of the pseudo-queries per step).",
        "- Adapting only the last block lets the frozen prefix run without autograd: the clean support's prefix "
        "output is computed once per task, the pseudo-queries' prefix still runs at every step (without "
        "autograd); with a pool of augmented copies it runs once per copy, so each step runs only the adapted "
        "suffix.",
        "- Each row is one task on a shared machine: treat differences of a few tens of percent between "
        "variants of similar cost as noise.",
        "",
        "<details><summary>Raw measurements (JSON)</summary>",
        "",
        "```json",
        json.dumps({"settings": settings, "finetune": finetune_rows, "trajectories": trajectory_rows}, indent=1),
        "```",
        "</details>",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone-dir", type=Path, default=None,
                        help="EfficientNet-Lite0 folder (default: built with hf_hyperflow.pretrained into a temp dir)")
    parser.add_argument("--dataset", default=None, help="dataset folder for real images (default: random pixels)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tasks", type=int, default=1, help="tasks per variant")
    parser.add_argument("--trajectory-tasks", type=int, default=2, help="episodes per trajectory measurement")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".md"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite --output from the raw measurements it already holds (no measuring)")
    args = parser.parse_args(argv)
    if args.rerender:
        text = args.output.read_text()
        command = text.split("Command: `", 1)[1].split("`", 1)[0]
        raw = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
        write_report(args.output, command, raw["settings"], raw["finetune"], raw["trajectories"])
        print(f"rewrote {args.output}")
        return 0
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        job = json.loads(args.worker)
        torch.set_num_threads(job["threads"])
        result = trajectory_worker(job) if job["kind"] == "trajectories" else finetune_worker(job)
        print(json.dumps(result), flush=True)
        return 0
    for name in ("tasks", "trajectory_tasks", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")

    command = "python benchmarks/finetune_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as scratch:
        backbone_dir = args.backbone_dir
        if backbone_dir is None and "efficientnet_lite0" in args.models:
            from hf_hyperflow.pretrained import build_efficientnet_lite0

            backbone_dir = build_efficientnet_lite0(Path(scratch) / "efficientnet_lite0")
        settings = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'unknown cpu'}",
            "torch": torch.__version__, "threads": args.threads,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()), "tasks": args.tasks, "steps": args.steps,
            "trajectory_tasks": args.trajectory_tasks,
            "images": f"5-way 5-shot episodes of {args.dataset} (test classes), resized to {IMAGE} px"
            if args.dataset else "random pixels (no dataset given)",
        }
        base = {"backbone_dir": str(backbone_dir), "dataset": args.dataset, "steps": args.steps,
                "threads": args.threads}
        finetune_rows, trajectory_rows = [], []
        for model in args.models:
            for variant in args.variants:
                row = run_worker({**base, "kind": "finetune", "model": model, "variant": variant,
                                  "tasks": args.tasks}, timeout=7200)
                print(json.dumps(row), flush=True)
                finetune_rows.append(row)
        for model in args.models:
            for variant in TRAJECTORY_VARIANTS:
                if variant not in args.variants or (model == "efficientnet_lite0" and variant == "lora+shift+head"):
                    continue  # all-block EfficientNet trajectories: see the fine-tuning row for their cost
                row = run_worker({**base, "kind": "trajectories", "model": model, "variant": variant,
                                  "tasks": args.trajectory_tasks}, timeout=7200)
                print(json.dumps(row), flush=True)
                trajectory_rows.append(row)
    write_report(args.output, command, settings, finetune_rows, trajectory_rows)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
