"""Record fine-tuning trajectories of meta-training episodes into a trajectory store.

    accelerate launch recipes/make_trajectories.py --backbone DIR --dataset DIR --split train \\
        --episodes 1000 --steps 50 --lr 1e-3 --output trajectories/NAME [--resume true]

On CPU machines start several real processes with
``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no
--main_process_port 29511 recipes/make_trajectories.py --cpu true ...``; each process takes episodes
``i % processes == rank`` and writes its own shards. A killed run continues with ``--resume true``.

The adapter the trajectories live in (its state layout and theta_0) is either loaded (``--adapter DIR``) or
built from ``--groups / --r / --first_adapted_block / --init_seed``, and saved as ``OUTPUT/adapter`` at the
end of the run: train the drift network from that folder so that theta_0 matches. ``--help`` lists every option.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_hyperflow.checks import check_int  # noqa: E402
from hf_hyperflow.parsing import option, parse  # noqa: E402


@dataclass
class TrajectoriesConfig:
    """Which adapter, which episodes, how they are fine-tuned and where the store goes."""

    backbone: str = option("Folder (or Hub id) of a transformers vision backbone.", "")
    adapter: str | None = option("A saved HyperFlow adapter to take the state layout from.")
    groups: list[str] = option("State groups of a new adapter, and the groups fine-tuned.",
                               lambda: ["lora", "shift", "head"])
    r: int = option("LoRA rank of a new adapter.", 4)
    first_adapted_block: int | None = option("Adapt only blocks from this one on (negative: from the end).")
    image_size: int | None = option("Input side (default: the backbone's).")
    init_seed: int = option("Seed of the LoRA A factors of theta_0.", 0)
    dataset: str = option("A save_to_disk folder, parquet, image folder or Hub id.", "")
    split: str = option("Class split the episodes are drawn from.", "train")
    class_split: str | None = option("A ClassSplit JSON (default: seeded 70/15/15).")
    protocol: str = option("'fixed' or 'md'.", "fixed")
    ways: int | None = option("Classes per episode (fixed protocol).")
    shots: int | None = option("Support images per class (fixed protocol).")
    queries: int | None = option("Query images per class (fixed protocol).")
    episode_seed: int = option("Seed of the episode sampler.", 0)
    episodes: int = option("Number of episodes (indices 0..N-1).", 0)
    steps: int = option("Adam steps of each fine-tuning run.", 50)
    lr: float = option("Fine-tuning learning rate.", 1e-3)
    inits: int = option("Initialisations per episode (init 0 is theta_0).", 1)
    noise_std: float = option("Noise of the initialisations after the first.", 0.0)
    seed: int = option("Base seed of augmentation and noise.", 0)
    augment_pool: int | None = option("Pseudo-queries from N augmented copies.")
    snapshot_every: int = option("Keep every k-th snapshot (and the last).", 1)
    dtype: str = option("Stored dtype: float32, float16 or bfloat16.", "float32")
    shard_size: int = option("Trajectories per shard file.", 16)
    output: str = option("The trajectory store folder.", "")
    resume: bool = option("Continue the store in --output.", False)
    cpu: bool = option("Run on CPU even where an accelerator exists.", False)
    threads: int | None = option("torch CPU threads per process.")

    def __post_init__(self):
        for name in ("backbone", "dataset", "output"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is missing.")
        for name in ("episodes", "steps", "r", "inits", "snapshot_every", "shard_size"):
            check_int(getattr(self, name), f"--{name}", 1)
        if self.threads is not None:
            check_int(self.threads, "--threads", 1)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}.")


def build_adapter(config: TrajectoriesConfig, device: torch.device):
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    backbone = AutoModel.from_pretrained(config.backbone).to(device)
    if config.adapter is not None:
        return HyperFlowAdapter.from_pretrained(backbone, config.adapter)
    return HyperFlowAdapter(backbone, HyperFlowConfig(groups=config.groups, r=config.r, init_seed=config.init_seed,
                                                      first_adapted_block=config.first_adapted_block,
                                                      image_size=config.image_size))


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse(TrajectoriesConfig, sys.argv[1:] if argv is None else argv)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    from accelerate import Accelerator

    from hf_hyperflow.episodes import ClassSplit, EpisodeSampler, load_image_dataset
    from hf_hyperflow.trajectories import TrajectoryStore, record_trajectories

    accelerator = Accelerator(cpu=config.cpu)
    adapter = build_adapter(config, accelerator.device)
    output = Path(config.output)
    class_split = ClassSplit.load(config.class_split) if config.class_split is not None else None
    sampler = EpisodeSampler(load_image_dataset(config.dataset, split=config.split), protocol=config.protocol,
                             ways=config.ways, shots=config.shots, queries=config.queries, seed=config.episode_seed,
                             split=config.split, class_split=class_split, num_episodes=config.episodes)
    description = {"source": config.dataset, "split": config.split, "protocol": config.protocol, "ways": config.ways,
                   "shots": config.shots, "queries": config.queries, "episode_seed": config.episode_seed,
                   "class_split": config.class_split}
    stored_before = len(TrajectoryStore(output)) if (output / "store.json").is_file() else 0
    start = time.perf_counter()
    record_trajectories(
        adapter, sampler, output, groups=config.groups, steps=config.steps, lr=config.lr, inits=config.inits,
        noise_std=config.noise_std, seed=config.seed, augment_pool=config.augment_pool,
        snapshot_every=config.snapshot_every, dtype=config.dtype, shard_size=config.shard_size, resume=config.resume,
        accelerator=accelerator, dataset=description, progress=True)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        if not (output / "adapter").exists():
            adapter.save_pretrained(output / "adapter")
        stored = len(TrajectoryStore(output))
        new = stored - stored_before
        print(json.dumps({"output": str(output), "processes": accelerator.num_processes, "new": new,
                          "stored": stored, "seconds": round(seconds, 1),
                          "trajectories_per_hour": round(new * 3600 / seconds, 1) if new else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
