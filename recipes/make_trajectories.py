"""Record fine-tuning trajectories of meta-training episodes into a trajectory store.

    accelerate launch recipes/make_trajectories.py --backbone DIR --dataset DIR --split train \\
        --episodes 1000 --steps 50 --lr 1e-3 --output trajectories/NAME [--resume]

On CPU machines start several real processes with
``accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no
--main_process_port 29511 recipes/make_trajectories.py --cpu ...``; each process takes episodes
``i % processes == rank`` and writes its own shards. A killed run continues with ``--resume``.

The adapter the trajectories live in (its state layout and theta_0) is either loaded (``--adapter DIR``) or
built from ``--groups / --r / --first-adapted-block / --init-seed``, and saved as ``OUTPUT/adapter`` at the
end of the run: train the drift network from that folder so that theta_0 matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("backbone and adapter")
    where.add_argument("--backbone", required=True, help="folder (or Hub id) of a transformers vision backbone")
    where.add_argument("--adapter", default=None, help="a saved HyperFlow adapter to take the state layout from")
    where.add_argument("--groups", nargs="+", default=["lora", "shift", "head"],
                       help="state groups of a new adapter, and the groups fine-tuned")
    where.add_argument("--r", type=int, default=4, help="LoRA rank of a new adapter")
    where.add_argument("--first-adapted-block", type=int, default=None,
                       help="adapt only blocks from this one on (negative: from the end)")
    where.add_argument("--image-size", type=int, default=None, help="input side (default: the backbone's)")
    where.add_argument("--init-seed", type=int, default=0, help="seed of the LoRA A factors of theta_0")
    data = parser.add_argument_group("episodes")
    data.add_argument("--dataset", required=True, help="a save_to_disk folder, parquet, image folder or Hub id")
    data.add_argument("--split", default="train", help="class split the episodes are drawn from")
    data.add_argument("--class-split", type=Path, default=None, help="a ClassSplit JSON (default: seeded 70/15/15)")
    data.add_argument("--protocol", choices=["fixed", "md"], default="fixed")
    data.add_argument("--ways", type=int, default=None)
    data.add_argument("--shots", type=int, default=None)
    data.add_argument("--queries", type=int, default=None)
    data.add_argument("--episode-seed", type=int, default=0, help="seed of the episode sampler")
    data.add_argument("--episodes", type=int, required=True, help="number of episodes (indices 0..N-1)")
    run = parser.add_argument_group("fine-tuning and storage")
    run.add_argument("--steps", type=int, default=50)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--inits", type=int, default=1, help="initialisations per episode (init 0 is theta_0)")
    run.add_argument("--noise-std", type=float, default=0.0, help="noise of the initialisations after the first")
    run.add_argument("--seed", type=int, default=0, help="base seed of augmentation and noise")
    run.add_argument("--augment-pool", type=int, default=None, help="pseudo-queries from N augmented copies")
    run.add_argument("--snapshot-every", type=int, default=1, help="keep every k-th snapshot (and the last)")
    run.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    run.add_argument("--shard-size", type=int, default=16, help="trajectories per shard file")
    run.add_argument("--output", required=True, type=Path, help="the trajectory store folder")
    run.add_argument("--resume", action="store_true", help="continue the store in --output")
    run.add_argument("--cpu", action="store_true", help="run on CPU even where an accelerator exists")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    args = parser.parse_args(argv)
    for name in ("episodes", "steps", "r", "inits", "snapshot_every", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be a positive integer")
    return args


def build_adapter(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    backbone = AutoModel.from_pretrained(args.backbone).to(device)
    if args.adapter is not None:
        return HyperFlowAdapter.from_pretrained(backbone, args.adapter)
    config = HyperFlowConfig(groups=args.groups, r=args.r, first_adapted_block=args.first_adapted_block,
                             image_size=args.image_size, init_seed=args.init_seed)
    return HyperFlowAdapter(backbone, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from hf_hyperflow.episodes import ClassSplit, EpisodeSampler, load_image_dataset
    from hf_hyperflow.trajectories import TrajectoryStore, record_trajectories

    accelerator = Accelerator(cpu=args.cpu)
    adapter = build_adapter(args, accelerator.device)
    dataset = load_image_dataset(args.dataset, split=args.split)
    class_split = ClassSplit.load(args.class_split) if args.class_split is not None else None
    sampler = EpisodeSampler(dataset, protocol=args.protocol, ways=args.ways, shots=args.shots, queries=args.queries,
                             seed=args.episode_seed, split=args.split, class_split=class_split,
                             num_episodes=args.episodes)
    description = {"source": str(args.dataset), "split": args.split, "protocol": args.protocol, "ways": args.ways,
                   "shots": args.shots, "queries": args.queries, "episode_seed": args.episode_seed,
                   "class_split": str(args.class_split) if args.class_split is not None else None}
    stored_before = len(TrajectoryStore(args.output)) if (args.output / "store.json").is_file() else 0
    start = time.perf_counter()
    record_trajectories(
        adapter, sampler, args.output, groups=args.groups, steps=args.steps, lr=args.lr, inits=args.inits,
        noise_std=args.noise_std, seed=args.seed, augment_pool=args.augment_pool, snapshot_every=args.snapshot_every,
        dtype=args.dtype, shard_size=args.shard_size, resume=args.resume, accelerator=accelerator,
        dataset=description, progress=True)
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        if not (args.output / "adapter").exists():
            adapter.save_pretrained(args.output / "adapter")
        stored = len(TrajectoryStore(args.output))
        new = stored - stored_before
        print(json.dumps({"output": str(args.output), "processes": accelerator.num_processes, "new": new,
                          "stored": stored, "seconds": round(seconds, 1),
                          "trajectories_per_hour": round(new * 3600 / seconds, 1) if new else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
